"""A Llama written with stock Flax NNX layers, mirroring transformers' LlamaForCausalLM.

Its module paths are the HF module names (model/layers/0/self_attn/q_proj is
model.layers.0.self_attn.q_proj), so a PEFT adapter saved from it loads into the HF model.
`from_hf(hf_model)` copies an HF model's weights (torch Linear [out, in] -> kernel [in, out]).
`from_pretrained(directory)` reads an HF checkpoint dir (config.json + *.safetensors) the same way,
so `--config.model.nnx=examples.nnx_llama:from_pretrained` trains it with `train.sft` (the trainer
calls the factory with config.model.path and reads the tokenizer from there). The model takes
(tokens, positions, segment_ids) as the trainer needs (segment 0 is padding, packed rows hold
several segments), and its config's `to_hf_dict()` declares the Llama family, so the trainer's
merged and GGUF exports work on it. It is an example of an NNX model jlora adapts, not one of
jlora's model families.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.models.attention import attention


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 128
  hidden_size: int = 32
  intermediate_size: int = 64
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def to_hf_dict(self) -> dict:
    """transformers' config.json fields: declares the Llama family to jlora's registry."""
    return {"model_type": "llama", **dataclasses.asdict(self)}


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,)))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * normed.astype(x.dtype)


def _rope(x, positions, theta: float):
  """HF's rotate_half convention: the two halves of the head are the rotated pairs."""
  half = x.shape[-1] // 2
  freqs = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs  # [b, t, half]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rotated * sin


def _linear(din, dout, rngs):
  return nnx.Linear(din, dout, use_bias=False, rngs=rngs)


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs):
    self.cfg = cfg
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.q_proj = _linear(d, h * hd, rngs)
    self.k_proj = _linear(d, kv * hd, rngs)
    self.v_proj = _linear(d, kv * hd, rngs)
    self.o_proj = _linear(h * hd, d, rngs)

  def __call__(self, x, positions, segment_ids):
    cfg = self.cfg
    b, t, _ = x.shape
    heads = lambda y, n: y.reshape(b, t, n, cfg.head_dim)
    q = _rope(heads(self.q_proj(x), cfg.num_attention_heads), positions, cfg.rope_theta)
    k = _rope(heads(self.k_proj(x), cfg.num_key_value_heads), positions, cfg.rope_theta)
    v = heads(self.v_proj(x), cfg.num_key_value_heads)
    # jlora's attention function (GQA without repeating K/V; blockwise, O(t) memory, on CPU): the
    # same one jlora's linen Llama calls, so the two compare as models of the same computation.
    out = attention(q, k, v, segment_ids, segment_ids).reshape(b, t, -1)
    return self.o_proj(out)


class Mlp(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs):
    self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, rngs)
    self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, rngs)
    self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x, positions, segment_ids):
    x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
    return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs):
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

  def __call__(self, tokens, positions=None, segment_ids=None):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x = self.embed_tokens(tokens)
    for layer in self.layers:
      x = layer(x, positions, segment_ids)
    return self.norm(x)


class LlamaForCausalLM(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.config = cfg
    self.model = Backbone(cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, rngs)

  def __call__(self, tokens, positions=None, segment_ids=None):
    return self.head(self.hidden_states(tokens, positions, segment_ids))

  # The call's two halves: with them jlora's trainer runs the head only where labels are, and
  # takes its gradient in the forward (jlora.models.nnx_causal).
  def hidden_states(self, tokens, positions=None, segment_ids=None):
    return self.model(tokens, positions, segment_ids)

  def head(self, hidden):
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)


def config_from_hf(hf_config) -> LlamaConfig:
  fields = [f.name for f in dataclasses.fields(LlamaConfig)]
  return LlamaConfig(**{f: getattr(hf_config, f) for f in fields if hasattr(hf_config, f)})


def from_hf(hf_model) -> LlamaForCausalLM:
  """An NNX Llama holding the weights of a transformers LlamaForCausalLM (torch)."""
  tensors = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
  return _with_weights(config_from_hf(hf_model.config), tensors)


def from_pretrained(directory) -> LlamaForCausalLM:
  """An NNX Llama from an HF checkpoint dir (config.json + *.safetensors), e.g. for train.sft."""
  from safetensors.numpy import load_file

  directory = Path(directory)
  hf_config = json.loads((directory / "config.json").read_text())
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  cfg = LlamaConfig(**{k: v for k, v in hf_config.items() if k in fields})
  tensors = {}
  for file in sorted(directory.glob("*.safetensors")):
    tensors.update(load_file(file))
  return _with_weights(cfg, tensors)


def _with_weights(cfg: LlamaConfig, tensors: dict) -> LlamaForCausalLM:
  """The model with HF-named tensors (torch Linear [out, in] -> kernel [in, out])."""
  model = LlamaForCausalLM(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def load(key_path, variable):
    path = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
    module, _, leaf = path.rpartition(".")
    if leaf == "kernel":
      return variable.replace(jnp.asarray(tensors[f"{module}.weight"].T, jnp.float32))
    name = f"{module}.weight" if leaf == "embedding" else path
    return variable.replace(jnp.asarray(tensors[name], jnp.float32))

  state = jax.tree_util.tree_map_with_path(
    load, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return nnx.merge(graphdef, state)

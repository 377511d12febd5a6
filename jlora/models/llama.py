"""Llama-family decoder (Llama 1-3, Mistral, Qwen2, SmolLM) in Flax linen.

Design constraints that shape this file:

* Only stock layers (`nn.Dense`, `nn.Embed`) carry weights, and they are always called through their
  normal methods (`dense(x)`, `embed(ids)`, `embed.attend(h)`). jlora adapts weights by intercepting
  those calls, so reading a kernel directly here would silently bypass an adapter.
* Module and param names mirror the Hugging Face checkpoints (`model/layers/self_attn/q_proj/kernel`),
  so loading and PEFT export are a rename plus a transpose.
* Every param is boxed with logical axis names, and the scanned layer axis is named "layers". Call
  `flax.linen.meta.unbox(variables["params"])` after `init`; `apply` accepts the plain arrays.

Usage::

    model = LlamaForCausalLM(config)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = flax.linen.meta.unbox(variables["params"])
    logits = model.apply({"params": params}, input_ids)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models.attention import attention

Array = jax.Array

# Logical axis name -> mesh axis, for a mesh with axes ("data", "fsdp", "tensor"). Use with
# `nn.logical_axis_rules(DEFAULT_RULES)` (activation constraints) and
# `nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, DEFAULT_RULES)` (param shardings).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("layers", None),
  ("seq", None),
  ("norm", None),
  ("head_dim", None),
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
REMAT_POLICIES = (
  "none",
  "full",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "nothing_saveable",
)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = (
    None  # HF dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
  )
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2: bias on q/k/v (never on o_proj)
  mlp_bias: bool = False
  max_position_embeddings: int = 2048
  sliding_window: int | None = None  # Mistral: attend only to the last `sliding_window` positions
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  model_type: str = "llama"

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} must be a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )
    rope_type = _rope_type(self.rope_scaling)
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}")

  def __hash__(self):
    # Modules holding this config get hashed (e.g. as static jit args); rope_scaling is a dict.
    values = [getattr(self, f.name) for f in dataclasses.fields(self)]
    return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v for v in values))

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> LlamaConfig:
    """Build from a HF `config.json` dict or a `transformers.PretrainedConfig`.

    Reads both the transformers 4.x layout (`rope_theta`, `rope_scaling`) and the 5.x one
    (`rope_parameters`). `overrides` (e.g. dtype, remat_policy) win over the file.
    """
    d = dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"Unsupported model_type {model_type!r}; jlora's Llama supports {list(SUPPORTED_MODEL_TYPES)}"
      )
    sliding_window = d.get("sliding_window")
    if model_type == "qwen2":
      if d.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=True (per-layer windows) is not supported")
      sliding_window = None  # Qwen2 configs carry a window they do not use
    required = (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
    )
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"HF config for model_type {model_type!r} lacks required fields {missing}")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    rope_scaling = rope if _rope_type(rope) != "default" else None
    kwargs = dict(
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads"),
      head_dim=d.get("head_dim"),
      rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope_theta),
      rope_scaling=rope_scaling,
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      # Qwen2 configs don't spell the bias out: it is part of the architecture.
      attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
      mlp_bias=bool(d.get("mlp_bias", False)),
      max_position_embeddings=d.get("max_position_embeddings", 2048),
      sliding_window=sliding_window,
      model_type=model_type,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_dict(self) -> dict:
    """The HF `config.json` content for this config (used when caching converted checkpoints)."""
    arch = {
      "llama": "LlamaForCausalLM",
      "mistral": "MistralForCausalLM",
      "qwen2": "Qwen2ForCausalLM",
    }
    rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
    return {
      "architectures": [arch[self.model_type]],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_hidden_layers,
      "num_attention_heads": self.num_attention_heads,
      "num_key_value_heads": self.num_key_value_heads,
      "head_dim": self.head_dim,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": self.rope_scaling,
      "rope_parameters": rope,
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_bias": self.attention_bias,
      "mlp_bias": self.mlp_bias,
      "max_position_embeddings": self.max_position_embeddings,
      "sliding_window": self.sliding_window,
      "hidden_act": "silu",
      "torch_dtype": "float32",
    }


def _rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
  if not rope_scaling:
    return "default"
  # Older configs call it "type"; transformers writes "rope_type".
  return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def rope_inv_freq(config: LlamaConfig) -> Array:
  """Inverse frequencies [head_dim // 2], including HF's linear and llama3 scaling."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = config.rope_scaling or {}
  rope_type = _rope_type(scaling)
  if rope_type == "linear":
    return inv_freq / scaling["factor"]
  if rope_type == "llama3":
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)
  return inv_freq


def rotate_half(x: Array) -> Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [b, s, heads, head_dim]; cos/sin: [b, s, head_dim] (HF's rotate_half layout)."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x * cos + rotate_half(x) * sin).astype(x.dtype)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
  """An empty KV cache for `apply(..., cache=...)`.

  k, v:        [layers, batch, max_len, kv_heads, head_dim]
  segment_ids: [batch, max_len] segment of each cached slot; 0 = empty or padding (never attended)
  index:       int32 scalar, the next slot to write; the same for every row, so shapes stay static

  Rows of different prompt lengths are left-padded with segment 0 (see train/generate.py).
  """
  shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
  dtype = dtype or config.dtype
  return {
    "k": jnp.zeros(shape, dtype),
    "v": jnp.zeros(shape, dtype),
    "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
    "index": jnp.zeros((), jnp.int32),
  }


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
      "scale", _partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
    )
    # Normalize in fp32 and cast back before scaling, as HF does, so bf16 runs match.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * xf.astype(self.dtype)


def _dense(
  config: LlamaConfig, features: int, names: tuple[str, str], use_bias: bool, name: str
) -> nn.Dense:
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    kernel_init=_partitioned(nn.initializers.normal(0.02), names),
    bias_init=_partitioned(nn.initializers.zeros, (names[1],)),
    name=name,
  )


class LlamaAttention(nn.Module):
  config: LlamaConfig

  def setup(self):
    c = self.config
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    self.q_proj = _dense(c, q_out, ("embed", "q_heads"), c.attention_bias, "q_proj")
    self.k_proj = _dense(c, kv_out, ("embed", "kv_heads"), c.attention_bias, "k_proj")
    self.v_proj = _dense(c, kv_out, ("embed", "kv_heads"), c.attention_bias, "v_proj")
    self.o_proj = _dense(c, c.hidden_size, ("q_heads", "embed"), False, "o_proj")

  def __call__(self, x, cos, sin, q_segments, kv_segments, q_offset, layer_cache):
    """x: [b, s, d]. Keys are the cache slots (if any) or the s new tokens.

    q_segments [b, s] / kv_segments [b, t]: attention is allowed within the same nonzero segment,
    and only to key slots at or before the query's slot (q_offset + i).
    """
    c = self.config
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, c.num_attention_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, s, c.num_key_value_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, s, c.num_key_value_heads, c.head_dim)
    q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("batch", "seq", "q_heads", "head_dim"))
    k = nn.with_logical_constraint(
      apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim")
    )
    v = nn.with_logical_constraint(v, ("batch", "seq", "kv_heads", "head_dim"))

    new_cache = None
    if layer_cache is not None:
      k = jax.lax.dynamic_update_slice(
        layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, q_offset, 0, 0)
      )
      v = jax.lax.dynamic_update_slice(
        layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, q_offset, 0, 0)
      )
      new_cache = {"k": k, "v": v}

    out = attention(
      q,
      k,
      v.astype(c.dtype),
      q_segments,
      kv_segments,
      q_offset=q_offset,
      sliding_window=c.sliding_window,
    )
    out = out.reshape(b, s, c.num_attention_heads * c.head_dim)
    return self.o_proj(out), new_cache


class LlamaMLP(nn.Module):
  config: LlamaConfig

  def setup(self):
    c = self.config
    self.gate_proj = _dense(c, c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "gate_proj")
    self.up_proj = _dense(c, c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "up_proj")
    self.down_proj = _dense(c, c.hidden_size, ("mlp", "embed"), c.mlp_bias, "down_proj")

  def __call__(self, x):
    h = nn.silu(self.gate_proj(x)) * self.up_proj(x)
    h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
    return self.down_proj(h)


class LlamaDecoderLayer(nn.Module):
  """One block. Signature follows `nn.scan`: (carry, *args) -> (carry, per-layer output)."""

  config: LlamaConfig

  def setup(self):
    c = self.config
    self.self_attn = LlamaAttention(c)
    self.mlp = LlamaMLP(c)
    self.input_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)

  def __call__(self, h, cos, sin, q_segments, kv_segments, q_offset, layer_cache):
    attn, new_cache = self.self_attn(
      self.input_layernorm(h), cos, sin, q_segments, kv_segments, q_offset, layer_cache
    )
    h = h + attn
    h = h + self.mlp(self.post_attention_layernorm(h))
    return nn.with_logical_constraint(h, ("batch", "seq", "embed")), new_cache


def _remat(layer_cls, config: LlamaConfig):
  if config.remat_policy == "none":
    return layer_cls
  policy = {
    "full": None,  # save nothing: recompute the whole block
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[config.remat_policy]
  # Under scan, CSE across iterations is impossible anyway; prevent_cse would only cost speed.
  return nn.remat(layer_cls, policy=policy, prevent_cse=not config.scan_layers)


class LlamaModel(nn.Module):
  config: LlamaConfig

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      embedding_init=_partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    layer = _remat(LlamaDecoderLayer, c)
    if c.scan_layers:
      self.layers = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        # cos, sin, segments and offset are shared by every layer; the cache is per layer.
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=c.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c)
    else:
      self.layers = [layer(c) for _ in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)

  def __call__(self, input_ids, positions, segment_ids, cache):
    c = self.config
    h = self.embed_tokens(input_ids)
    h = nn.with_logical_constraint(h, ("batch", "seq", "embed"))

    freqs = positions[..., None].astype(jnp.float32) * rope_inv_freq(c)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb).astype(c.dtype), jnp.sin(emb).astype(c.dtype)

    if cache is None:
      q_offset, kv_segments, layer_caches = 0, segment_ids, None
    else:
      q_offset = cache["index"]
      kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, q_offset))
      layer_caches = {"k": cache["k"], "v": cache["v"]}

    args = (cos, sin, segment_ids, kv_segments, q_offset)
    if c.scan_layers:
      h, new_layer_caches = self.layers(h, *args, layer_caches)
    else:
      per_layer = []
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], layer_caches)
        h, out = layer(h, *args, layer_cache)
        per_layer.append(out)
      new_layer_caches = (
        None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
      )

    new_cache = None
    if cache is not None:
      new_cache = {
        **new_layer_caches,
        "segment_ids": kv_segments,
        "index": q_offset + input_ids.shape[1],
      }
    return self.norm(h), new_cache


class LlamaForCausalLM(nn.Module):
  """Causal LM. See the module docstring for init/unbox/apply."""

  config: LlamaConfig

  def setup(self):
    c = self.config
    self.model = LlamaModel(c)
    if not c.tie_word_embeddings:
      self.lm_head = _dense(c, c.vocab_size, ("embed", "vocab"), False, "lm_head")

  def __call__(
    self,
    input_ids: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    *,
    logits_at: Array | None = None,
    return_hidden: bool = False,
    cache: dict | None = None,
  ):
    """Forward pass.

    input_ids:   int [batch, seq]
    positions:   int [batch, seq] RoPE positions; default 0..seq-1 (offset by the cache index).
    segment_ids: int [batch, seq]; tokens attend only within their own segment (packing),
                 causally; 0 marks padding. Default: all ones.
    logits_at:   int [batch, k]; apply the head only at these positions -> [batch, k, vocab].
    return_hidden: return the final normed hidden states [batch, seq, d] instead of logits.
    cache:       from `init_cache`; then returns (output, new_cache).

    Logits are in the compute dtype; upcast (or use chunked CE via `logits`) for the loss.
    """
    b, s = input_ids.shape
    if positions is None:
      start = 0 if cache is None else cache["index"]
      positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)

    h, new_cache = self.model(input_ids, positions, segment_ids, cache)
    if return_hidden:
      out = h
    else:
      if logits_at is not None:
        h = jnp.take_along_axis(h, logits_at[..., None].astype(jnp.int32), axis=1)
      out = self.logits(h)
    return out if cache is None else (out, new_cache)

  def logits(self, hidden: Array) -> Array:
    """The LM head on final hidden states (for chunked cross-entropy via `method=`)."""
    if self.config.tie_word_embeddings:
      out = self.model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return nn.with_logical_constraint(out, ("batch", "seq", "vocab"))

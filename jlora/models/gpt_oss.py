"""gpt-oss (OpenAI's open-weight MoE, transformers' `GptOssForCausalLM`) in Flax linen.

What gpt-oss changes relative to the MoE families of `jlora.models.moe`:

* Attention: q, k, v and o_proj have biases, and each head has a learned sink logit that joins its
  softmax denominator (`self_attn/sinks`, see jlora.models.attention). Layers alternate between a
  sliding window and full attention (`layer_types`), so the trunk is Gemma's, scanned over groups
  of layers (`model/layers/layers_0` is the stack of sliding layers 0, 2, ...).
* RoPE is YaRN-scaled (`rope_parameters`, with cos and sin times YaRN's attention factor).
* The router `mlp/router` has a bias; it picks the top-k logits and softmaxes over those k only.
* The experts (`mlp/experts/gate_up_proj`, `mlp/experts/down_proj`, each with a bias [E, out])
  compute a clamped SwiGLU: gate and up are the even and odd columns of gate_up (interleaved, as
  transformers stores them), gate clamped above and up on both sides at `swiglu_limit`, then
  `(up + 1) * gate * sigmoid(swiglu_alpha * gate)`. transformers keeps these weights [E, in, out],
  Flax's layout, so loading and export do not transpose them (`hf_experts_in_out`).

Checkpoints: bf16 / fp32 safetensors as transformers saves them. The released MXFP4 checkpoints
(`quantization_config.quant_method == "mxfp4"`) are refused: dequantize them with transformers
first (`Mxfp4Config(dequantize=True)`, then `save_pretrained`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.errors import UserError
from jlora.models.gemma import (
  GLOBAL,
  LOCAL,
  GemmaLayerGroup,
  GemmaModel,
  grouped_layer_stacks,
  layer_plan,
)
from jlora.models.gemma import init_cache as grouped_init_cache
from jlora.models.llama import (
  LlamaAttention,
  LlamaConfig,
  LlamaForCausalLM,
  RMSNorm,
  hf_config_dict,
  hf_shape_fields,
  linear,
  llama_fields,
  rope_attention_factor,
  rope_cos_sin,
  rope_inv_freq,
)
from jlora.models.moe import ROUTER_LOGITS, MoeConfig, MoeExperts

MODEL_TYPE = "gpt_oss"
HF_ARCHITECTURE = "GptOssForCausalLM"
# transformers' defaults for a config.json without rope_parameters (GptOssConfig.__post_init__)
DEFAULT_ROPE = {
  "rope_type": "yarn",
  "factor": 32.0,
  "beta_fast": 32.0,
  "beta_slow": 1.0,
  "truncate": False,
  "original_max_position_embeddings": 4096,
}


@dataclasses.dataclass(frozen=True)
class GptOssConfig(MoeConfig):
  layer_types: tuple[str, ...] | None = None  # None: sliding, full, sliding, ... (transformers')
  sliding_window: int | None = 128
  swiglu_alpha: float = 1.702
  swiglu_limit: float = 7.0
  attention_bias: bool = True
  rms_norm_eps: float = 1e-5
  rope_theta: float = 150000.0
  norm_topk_prob: bool = True  # the softmax runs over the k chosen logits: they sum to one
  model_type: str = MODEL_TYPE

  # transformers stores the experts [E, in, out] (see names.HFNames.experts_in_out)
  hf_experts_in_out = True
  __hash__ = LlamaConfig.__hash__

  def __post_init__(self):
    super().__post_init__()
    n = self.num_hidden_layers
    if self.layer_types is None:
      types = tuple(LOCAL if (i + 1) % 2 else GLOBAL for i in range(n))
      object.__setattr__(self, "layer_types", types)
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if len(self.layer_types) != n or set(self.layer_types) - {LOCAL, GLOBAL}:
      raise ValueError(
        f"layer_types: {list(self.layer_types)} is not valid; expected {n} entries, each "
        f"{LOCAL!r} or {GLOBAL!r}."
      )
    if LOCAL in self.layer_types and not self.sliding_window:
      raise ValueError(
        f"sliding_window: {self.sliding_window!r} is not valid with sliding layers; expected a "
        "positive integer."
      )
    if not self.scan_layers:
      raise ValueError("scan_layers: False is not supported for gpt-oss; expected True.")

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> GptOssConfig:
    d = hf_config_dict(hf_config, (MODEL_TYPE,), "jlora's gpt-oss")
    method = (d.get("quantization_config") or {}).get("quant_method")
    if method is not None:
      raise UserError(
        f"quantization_config.quant_method: {method!r} checkpoints are not loaded; expected a "
        "bf16/fp32 gpt-oss checkpoint (dequantize MXFP4 with transformers: Mxfp4Config("
        "dequantize=True), then save_pretrained)."
      )
    rope = d.get("rope_parameters") or d.get("rope_scaling") or DEFAULT_ROPE
    d = {**d, "rope_parameters": {"rope_theta": d.get("rope_theta") or 150000.0, **rope}}
    fields = llama_fields(d)
    return cls(
      **{
        **fields,
        "num_experts": d["num_local_experts"],
        "num_experts_per_tok": d.get("num_experts_per_tok", 4),
        "moe_intermediate_size": d["intermediate_size"],
        "layer_types": tuple(d["layer_types"]) if d.get("layer_types") else None,
        "sliding_window": d.get("sliding_window", 128),
        "swiglu_alpha": float(d.get("swiglu_alpha", 1.702)),
        "swiglu_limit": float(d.get("swiglu_limit", 7.0)),
        "attention_bias": bool(d.get("attention_bias", True)),
        "rms_norm_eps": d.get("rms_norm_eps", 1e-5),
        **overrides,
      }
    )

  def to_hf_dict(self) -> dict:
    rope = {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
    return {
      **hf_shape_fields(self, HF_ARCHITECTURE),
      "intermediate_size": self.moe_intermediate_size,
      "num_local_experts": self.num_experts,
      "num_experts_per_tok": self.num_experts_per_tok,
      "layer_types": list(self.layer_types),
      "sliding_window": self.sliding_window,
      "swiglu_alpha": self.swiglu_alpha,
      "swiglu_limit": self.swiglu_limit,
      "attention_bias": self.attention_bias,
      "rope_parameters": rope,
      "tie_word_embeddings": self.tie_word_embeddings,
      "max_position_embeddings": self.max_position_embeddings,
      "torch_dtype": "float32",
    }

  def hf_architecture(self) -> str:
    return HF_ARCHITECTURE

  def expert_files(self):
    return (), ()  # saved fused, as the model holds them

  @property
  def plan(self) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
    return layer_plan(self.layer_types)

  def layer_stacks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return grouped_layer_stacks(self.plan)


def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(weights, experts) [tokens, k]: the top k logits, softmaxed among themselves in fp32."""
  top, chosen = jax.lax.top_k(logits.astype(jnp.float32), k)
  return jax.nn.softmax(top, axis=-1), chosen


class GptOssExperts(MoeExperts):
  """Experts with biases and the clamped, interleaved SwiGLU (module docstring)."""

  bias = True

  def activate(self, gate_up: jax.Array) -> jax.Array:
    c = self.config
    gate = jnp.minimum(gate_up[..., ::2], c.swiglu_limit)
    up = jnp.clip(gate_up[..., 1::2], -c.swiglu_limit, c.swiglu_limit)
    return (up + 1) * gate * jax.nn.sigmoid(c.swiglu_alpha * gate)


class GptOssMoeBlock(nn.Module):
  config: GptOssConfig

  def setup(self):
    c = self.config
    self.router = linear(c, c.num_experts, ("embed", "expert"), True, "router")
    self.experts = GptOssExperts(c)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    logits = self.router(flat)
    self.sow("intermediates", ROUTER_LOGITS, logits)
    weights, chosen = route(logits, self.config.num_experts_per_tok)
    return self.experts(flat, weights, chosen).reshape(b, s, d)


class GptOssDecoderLayer(nn.Module):
  """norm -> attention (with sinks) -> residual; norm -> MoE -> residual."""

  config: GptOssConfig
  local: bool

  def setup(self):
    c = self.config
    self.self_attn = LlamaAttention(
      c,
      sliding_window=c.sliding_window if self.local else None,
      output_bias=c.attention_bias,
      with_sinks=True,
    )
    self.mlp = GptOssMoeBlock(c)
    self.input_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)

  def __call__(self, h, rope, q_segments, kv_segments, q_offset, layer_cache):
    cos, sin = rope
    attn, new_cache = self.self_attn(
      self.input_layernorm(h), cos, sin, q_segments, kv_segments, q_offset, layer_cache
    )
    h = h + attn
    h = h + self.mlp(self.post_attention_layernorm(h))
    return nn.with_logical_constraint(h, ("batch", "seq", "embed")), new_cache


class GptOssLayerGroup(GemmaLayerGroup):
  decoder_layer = GptOssDecoderLayer


class GptOssModel(GemmaModel):
  """Gemma's grouped trunk with gpt-oss layers: plain embeddings, one (YaRN) rope, Llama's norm."""

  layer_group = GptOssLayerGroup
  norm_offset = 0.0

  def embeddings(self, input_ids):
    return self.embed_tokens(input_ids)

  def rope(self, positions):
    c = self.config
    inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    return rope_cos_sin(positions, inv_freq, c.dtype, rope_attention_factor(c.rope_scaling))


class GptOssForCausalLM(LlamaForCausalLM):
  """gpt-oss causal LM: Llama's call protocol, the grouped trunk, an untied or tied head."""

  config: GptOssConfig
  trunk = GptOssModel

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
    return grouped_init_cache(self.config, batch, max_len, dtype)

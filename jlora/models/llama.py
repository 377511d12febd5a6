"""Llama-family decoder (Llama 1-3, Mistral, Qwen2, Qwen3, Phi-3, SmolLM) in Flax linen.

Qwen3 is Llama with per-head q/k RMSNorm before RoPE (`qk_norm`); Phi-3 is Llama with fused
`qkv_proj` and `gate_up_proj` layers (`fused_projections`), kept fused as in its checkpoint so that
adapters on them are PEFT's `qkv_proj` / `gate_up_proj` adapters.

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

from jlora.errors import UserError
from jlora.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jlora.models.attention import attention
from jlora.models.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from jlora.sharding import BATCH_AXES

Array = jax.Array

# Logical axis name -> mesh axis, for jlora.sharding's mesh (data, fsdp, tensor, expert). Use with
# `nn.logical_axis_rules(DEFAULT_RULES)` (activation constraints) and
# `nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, DEFAULT_RULES)` (param shardings).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("layers", None),
  ("seq", None),
  ("norm", None),
  ("head_dim", None),
  ("expert", "expert"),
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
# HF architecture class written into config.json, per model_type.
HF_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "phi3": "Phi3ForCausalLM",
}
# Config fields every family's HF config.json must carry (the rest have defaults).
REQUIRED_HF_FIELDS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
)
# Activation functions by their HF `hidden_act` name.
ACTIVATIONS = {
  "silu": nn.silu,
  "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
  "gelu": lambda x: nn.gelu(x, approximate=False),
}
REMAT_POLICIES = (
  "auto",
  "none",
  "full",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "dots_and_attention_saveable",
  "nothing_saveable",
)
# remat_policy="auto" rematerialises microbatches of at least this many tokens (rows x sequence)
# with "dots_and_attention_saveable"; shorter ones keep everything ("none"), which is faster.
LONG_ROW_TOKENS = 4096
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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
  qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
  fused_projections: bool = False  # Phi-3: one qkv_proj and one gate_up_proj Dense
  partial_rotary_factor: float = 1.0  # Phi-3: RoPE on the first factor * head_dim dims only
  hidden_act: str = "silu"
  # The `implementation` of jlora.models.attention.attention: auto (blockwise on CPU, cudnn on
  # GPU, splash on TPU) | blockwise | naive | cudnn | splash
  attention: str = "auto"
  attention_block_q: int = DEFAULT_BLOCK_Q  # blockwise attention's query / key block lengths
  attention_block_k: int = DEFAULT_BLOCK_K
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  remat_policy: str = "auto"  # see checkpoint_policy
  scan_layers: bool = True
  # Layers per iteration of the scanned loop (the params stay stacked either way): an int >= 1, or
  # "auto", every layer on CPU and 1 elsewhere (see `scan_unroll_for`).
  scan_unroll: int | str = 1
  model_type: str = "llama"

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.scan_unroll != "auto" and not (
      isinstance(self.scan_unroll, int) and self.scan_unroll >= 1
    ):
      raise ValueError(
        f"scan_unroll: {self.scan_unroll!r} is not valid; expected a layer count >= 1 or 'auto'."
      )
    check_attention_fields(self)
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
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
        f"hidden_act: {self.hidden_act!r} is not supported; expected one of {list(ACTIVATIONS)}."
      )

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
    d = hf_config_dict(hf_config, SUPPORTED_MODEL_TYPES, "jlora's Llama")
    return cls(**{**llama_fields(d), **overrides})

  def to_hf_dict(self) -> dict:
    """The HF `config.json` content for this config (used when caching converted checkpoints)."""
    rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
    if self.partial_rotary_factor != 1.0:
      rope["partial_rotary_factor"] = self.partial_rotary_factor
    return {
      **hf_shape_fields(self, self.hf_architecture()),
      "rope_theta": self.rope_theta,
      "rope_scaling": self.rope_scaling,
      "rope_parameters": rope,
      "partial_rotary_factor": self.partial_rotary_factor,
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_bias": self.attention_bias,
      "mlp_bias": self.mlp_bias,
      "max_position_embeddings": self.max_position_embeddings,
      "sliding_window": self.sliding_window,
      "hidden_act": self.hidden_act,
      "torch_dtype": "float32",
    }

  def hf_architecture(self) -> str:
    """The HF model class written into config.json."""
    return HF_ARCHITECTURES[self.model_type]

  def layer_stacks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Flax path of each scanned layer stack -> the HF layer index of each entry (see names.py)."""
    if not self.scan_layers:
      return ()
    return (("model/layers", tuple(range(self.num_hidden_layers))),)

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)


def llama_fields(d: Mapping[str, Any]) -> dict:
  """LlamaConfig's fields from a checked HF config dict (both transformers layouts), for the
  families built on Llama's attention (Llama itself, the MoE families)."""
  model_type = d["model_type"]
  sliding_window = d.get("sliding_window")
  if model_type in ("qwen2", "qwen3", "qwen3_moe"):
    if d.get("use_sliding_window"):
      raise ValueError(
        f"use_sliding_window: True (per-layer windows) is not supported for {model_type}; "
        "expected False."
      )
    sliding_window = None  # Qwen configs carry a window they do not use
  rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  rope_theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
  partial_rotary = rope.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor", 1.0)
  rope_scaling = rope if _rope_type(rope) != "default" else None
  return dict(
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
    qk_norm=model_type in ("qwen3", "qwen3_moe"),
    fused_projections=model_type == "phi3",
    partial_rotary_factor=float(partial_rotary),
    hidden_act=d.get("hidden_act", "silu"),
    model_type=model_type,
  )


HF_SHARED_FIELDS = (
  "model_type",
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "head_dim",
  "rms_norm_eps",
)


def hf_shape_fields(config, architecture: str) -> dict:
  """The config.json fields every family writes alike: the architecture class and the shapes."""
  return {"architectures": [architecture], **{k: getattr(config, k) for k in HF_SHARED_FIELDS}}


def hf_config_dict(hf_config: Any, model_types: tuple[str, ...], family: str) -> dict:
  """The config as a dict, after checking its model_type and the fields every family needs."""
  d = dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())
  model_type = d.get("model_type")
  if model_type not in model_types:
    raise UserError(
      f"Unsupported model_type {model_type!r}; {family} supports {list(model_types)}."
    )
  missing = [k for k in REQUIRED_HF_FIELDS if k not in d]
  if missing:
    raise UserError(
      f"HF config for model_type {model_type!r} lacks required fields {missing}; "
      "add them to config.json."
    )
  return d


def check_attention_fields(config) -> None:
  """The attention implementation and block sizes of any family's config."""
  if config.attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"config.model.attention: {config.attention!r} is not valid; expected one of "
      f"{', '.join(ATTENTION_IMPLEMENTATIONS)}."
    )
  for name in ("attention_block_q", "attention_block_k"):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.model.{name}: {value!r} is not valid; expected a positive integer.")


def _rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
  if not rope_scaling:
    return "default"
  # Older configs call it "type"; transformers writes "rope_type".
  return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def rope_inv_freq(dim: int, theta: float, rope_scaling: Mapping[str, Any] | None) -> Array:
  """Inverse frequencies [dim // 2], including HF's linear and llama3 scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = rope_scaling or {}
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
  if rope_type == "yarn":
    return yarn_inv_freq(inv_freq, dim, theta, scaling)
  return inv_freq


def yarn_inv_freq(inv_freq: Array, dim: int, theta: float, scaling: Mapping[str, Any]) -> Array:
  """YaRN (arXiv 2309.00071) as transformers computes it: frequencies that turn fewer than
  `beta_slow` times over the original context are divided by `factor`, those that turn more than
  `beta_fast` times are kept, and a linear ramp over the dims blends the two in between."""
  factor = scaling["factor"]
  old_len = scaling["original_max_position_embeddings"]
  fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

  def dim_of(rotations):  # the dim whose frequency turns `rotations` times over old_len
    return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = dim_of(fast), dim_of(slow)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low or 0.001), 0, 1)
  return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(rope_scaling: Mapping[str, Any] | None) -> float:
  """The factor on cos and sin: YaRN's `attention_factor` (default 0.1 ln(factor) + 1), else 1."""
  scaling = rope_scaling or {}
  if _rope_type(scaling) != "yarn":
    return 1.0
  if scaling.get("attention_factor") is not None:
    return float(scaling["attention_factor"])
  factor, mscale, mscale_all = (scaling.get(k) for k in ("factor", "mscale", "mscale_all_dim"))
  get_mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
  if mscale and mscale_all:
    return get_mscale(mscale) / get_mscale(mscale_all)
  return get_mscale(1.0)


def rotate_half(x: Array) -> Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rope_cos_sin(
  positions: Array, inv_freq: Array, dtype: Any, factor: float = 1.0
) -> tuple[Array, Array]:
  """cos, sin [b, s, 2 * len(inv_freq)] for int positions [b, s] (HF's rotate_half layout), each
  times `factor` (rope_attention_factor)."""
  freqs = positions[..., None].astype(jnp.float32) * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * factor).astype(dtype), (jnp.sin(emb) * factor).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [b, s, heads, head_dim]; cos/sin: [b, s, rotary_dim]. Dims past rotary_dim pass through
  (Phi-3's partial rotary)."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  rot = cos.shape[-1]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  out = x_rot * cos + rotate_half(x_rot) * sin
  if x_pass.shape[-1]:
    out = jnp.concatenate([out, x_pass], axis=-1)
  return out.astype(x.dtype)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
  """An empty KV cache for `apply(..., cache=...)`.

  k, v:        [layers, batch, max_len, kv_heads, head_dim]
  segment_ids: [batch, max_len] segment of each cached slot; 0 = empty or padding (never attended)
  index:       int32 scalar, the next slot to write; the same for every row, so shapes stay static

  Rows of different prompt lengths are left-padded with segment 0 (see train/generate.py).
  """
  return {
    **kv_buffers(config, (config.num_hidden_layers,), batch, max_len, dtype),
    "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
    "index": jnp.zeros((), jnp.int32),
  }


def kv_buffers(config, lead: tuple[int, ...], batch: int, max_len: int, dtype: Any) -> dict:
  """Zero k and v buffers [*lead, batch, max_len, kv_heads, head_dim] for one layer stack."""
  shape = (*lead, batch, max_len, config.num_key_value_heads, config.head_dim)
  dtype = dtype or config.dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_inputs(cache: dict | None, segment_ids: Array) -> tuple[Any, Array]:
  """(q_offset, kv_segments): where the new tokens go, and the segments of every key slot."""
  if cache is None:
    return 0, segment_ids
  q_offset = cache["index"]
  return q_offset, jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, q_offset))


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, normalised in fp32 (so bf16 runs stay finite and match HF).

  offset=0 (Llama): `scale * norm(x)`, with the scale applied after casting back, as HF's Llama.
  offset=1 (Gemma): `(1 + scale) * norm(x)` in fp32, then cast, as HF's Gemma; scale starts at 0.
  """

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", _partitioned(init, ("norm",)), (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (xf * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)
    return scale.astype(self.dtype) * xf.astype(self.dtype)


def linear(config, features: int, names: tuple[str, str], use_bias: bool, name: str) -> nn.Dense:
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
  """Self-attention with GQA, RoPE and the KV cache; the per-family switches are fields.

  The config supplies the shapes plus `attention_bias`, `qk_norm`, `fused_projections`,
  `rms_norm_eps` and `attention` (the implementation); the layer supplies its own window, score
  soft-cap, score scale and norm offset, so Gemma's local and global layers reuse this module, and
  whether o_proj has a bias and the heads have sinks (`sinks` [heads], gpt-oss).
  """

  config: Any
  sliding_window: int | None = None
  softcap: float | None = None
  scale: float | None = None  # None: 1 / sqrt(head_dim)
  norm_offset: float = 0.0
  output_bias: bool = False
  with_sinks: bool = False

  def setup(self):
    c = self.config
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    if c.fused_projections:
      self.qkv_proj = linear(
        c, q_out + 2 * kv_out, ("embed", "q_heads"), c.attention_bias, "qkv_proj"
      )
    else:
      self.q_proj = linear(c, q_out, ("embed", "q_heads"), c.attention_bias, "q_proj")
      self.k_proj = linear(c, kv_out, ("embed", "kv_heads"), c.attention_bias, "k_proj")
      self.v_proj = linear(c, kv_out, ("embed", "kv_heads"), c.attention_bias, "v_proj")
    self.o_proj = linear(c, c.hidden_size, ("q_heads", "embed"), self.output_bias, "o_proj")
    if self.with_sinks:
      init = _partitioned(nn.initializers.normal(0.02), ("q_heads",))
      self.sinks = self.param("sinks", init, (c.num_attention_heads,), c.param_dtype)
    if c.qk_norm:
      norm = lambda: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, self.norm_offset)
      self.q_norm, self.k_norm = norm(), norm()

  def project(self, x):
    """q [b, s, heads, d], k and v [b, s, kv_heads, d], before RoPE."""
    c = self.config
    b, s, _ = x.shape
    if c.fused_projections:
      q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
      q, k, v = jnp.split(self.qkv_proj(x), [q_out, q_out + kv_out], axis=-1)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.reshape(b, s, c.num_attention_heads, c.head_dim)
    k = k.reshape(b, s, c.num_key_value_heads, c.head_dim)
    v = v.reshape(b, s, c.num_key_value_heads, c.head_dim)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def __call__(self, x, cos, sin, q_segments, kv_segments, q_offset, layer_cache):
    """x: [b, s, d]. Keys are the cache slots (if any) or the s new tokens.

    q_segments [b, s] / kv_segments [b, t]: attention is allowed within the same nonzero segment,
    and only to key slots at or before the query's slot (q_offset + i).
    """
    c = self.config
    b, s, _ = x.shape
    q, k, v = self.project(x)
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
      sliding_window=self.sliding_window,
      softcap=self.softcap,
      scale=self.scale,
      sinks=self.sinks if self.with_sinks else None,
      implementation=c.attention,
      block_q=c.attention_block_q,
      block_k=c.attention_block_k,
    )
    out = out.reshape(b, s, c.num_attention_heads * c.head_dim)
    return self.o_proj(out), new_cache


class LlamaMLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); Phi-3 keeps gate and up fused in `gate_up_proj`."""

  config: Any

  def setup(self):
    c = self.config
    if c.fused_projections:
      self.gate_up_proj = linear(
        c, 2 * c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "gate_up_proj"
      )
    else:
      self.gate_proj = linear(c, c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "gate_proj")
      self.up_proj = linear(c, c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "up_proj")
    self.down_proj = linear(c, c.hidden_size, ("mlp", "embed"), c.mlp_bias, "down_proj")

  def __call__(self, x):
    if self.config.fused_projections:
      gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    h = ACTIVATIONS[self.config.hidden_act](gate) * up
    h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
    return self.down_proj(h)


class LlamaDecoderLayer(nn.Module):
  """One block. Signature follows `nn.scan`: (carry, *args) -> (carry, per-layer output)."""

  config: LlamaConfig
  mlp_block = LlamaMLP  # a class attribute: the MoE families swap in their sparse block

  def setup(self):
    c = self.config
    self.self_attn = LlamaAttention(c, sliding_window=c.sliding_window)
    self.mlp = self.mlp_block(c)
    self.input_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)

  def __call__(self, h, cos, sin, q_segments, kv_segments, q_offset, layer_cache):
    attn, new_cache = self.self_attn(
      self.input_layernorm(h), cos, sin, q_segments, kv_segments, q_offset, layer_cache
    )
    h = h + attn
    h = h + self.mlp(self.post_attention_layernorm(h))
    return nn.with_logical_constraint(h, ("batch", "seq", "embed")), new_cache


def remat(layer_cls, config):
  """`layer_cls` whose calls run under nn.remat with `checkpoint_policy(config.remat_policy, tokens)`.

  The policy is picked per call from the first argument's [batch, seq] shape, so "auto" can tell
  long rows from short ones. A call whose last argument (the per-layer KV cache) is not None is
  decoding, which takes no gradients, and runs plain. Python scalars among the arguments (q_offset
  = 0 in training) stay static, so attention still knows them at trace time (cuDNN / splash).
  """
  if config.remat_policy == "none":
    return layer_cls

  class Remat(layer_cls):
    def __call__(self, h, *args):
      rematerialise, policy = checkpoint_policy(config.remat_policy, h.shape[0] * h.shape[1])
      if not rematerialise or args[-1] is not None:
        return layer_cls.__call__(self, h, *args)
      # Indices count the module (0) and h (1).
      static = tuple(i + 2 for i, a in enumerate(args) if isinstance(a, (int, float)))
      call = nn.remat(
        layer_cls.__call__,
        policy=policy,
        # Under scan, CSE across iterations is impossible anyway; prevent_cse would only cost speed.
        prevent_cse=not config.scan_layers,
        static_argnums=static,
      )
      return call(self, h, *args)

  Remat.__name__ = Remat.__qualname__ = f"Remat{layer_cls.__name__}"
  return Remat


def checkpoint_policy(name: str, tokens: int) -> tuple[bool, Any]:
  """(rematerialise?, jax.checkpoint policy) for `remat_policy=name` on a microbatch of `tokens`.

  "dots_and_attention_saveable" keeps the outputs of the weight matmuls (the projections, the
  MLP and the LoRA factors' products: dots without batch dimensions) and the attention's output and
  logsumexp (named inside jlora.models.blockwise), and recomputes norms, RoPE and activations in the
  backward. Batched dots (naive attention's scores and probabilities) are not kept. "auto" uses it
  for microbatches of at least LONG_ROW_TOKENS tokens, where memory, not compute, is the limit.
  """
  if name == "auto":
    name = "dots_and_attention_saveable" if tokens >= LONG_ROW_TOKENS else "none"
  if name == "none":
    return False, None
  policies = jax.checkpoint_policies
  return True, {
    "full": None,  # save nothing: recompute the whole block
    "nothing_saveable": policies.nothing_saveable,
    "dots_saveable": policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
    "dots_and_attention_saveable": policies.save_from_both_policies(
      policies.dots_with_no_batch_dims_saveable,
      policies.save_only_these_names("attention_out", "attention_lse"),
    ),
  }[name]


def scan_unroll_for(config) -> int:
  """Layers per iteration of the scanned loop. "auto" unrolls every layer on CPU: each layer then
  reads its weights at a static offset of the stack instead of dynamic-slicing them inside a loop,
  which XLA:CPU runs faster (bench/moe.py: a Qwen3-MoE step ~10-20% faster); elsewhere 1."""
  if config.scan_unroll != "auto":
    return config.scan_unroll
  return config.num_hidden_layers if jax.default_backend() == "cpu" else 1


def scan_layers(layer_cls, length: int, n_broadcast: int, unroll: int = 1):
  """`nn.scan` of `layer_cls` over `length` steps with params stacked on a leading "layers" axis.

  The layer is called as (carry, *n_broadcast shared args, per-step input) -> (carry, output).
  unroll: steps per loop iteration (the params' layout does not change).
  """
  return nn.scan(
    layer_cls,
    variable_axes={"params": 0, "intermediates": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=(nn.broadcast,) * n_broadcast + (0,),
    length=length,
    unroll=unroll,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )


def cache_in_carry(layer_cls):
  """`layer_cls` for `scan_layers` with the carry (h, caches).

  caches None: the per-step input is this layer's cache (or None, training), scanned over as an
  input and an output. caches given (a decode step, one new token per row): the per-step input is
  the layer's index, every layer's KV cache rides in the carry and each layer writes the new
  token's column back in place; scanned over instead, the caches would be copied whole at every
  layer of every step (most of a CPU decode step at batch 16). Writing back the layer's whole
  cache rather than its new column made a SmolLM2-135M 16-row step ~4% slower (98.3 vs 94.4 ms,
  min of 8 interleaved, width 96).
  """

  class CacheInCarry(layer_cls):
    def __call__(self, carry, *args):
      (h, caches), (*shared, per_step) = carry, args
      if caches is None:
        h, new = layer_cls.__call__(self, h, *shared, per_step)
        return (h, None), new
      mine = jax.tree.map(lambda stack: stack[per_step], caches)
      h, new = layer_cls.__call__(self, h, *shared, mine)
      q_offset = shared[-1]  # the layer's shared args end with q_offset (`LlamaDecoderLayer`)

      def put(stack, layer):  # layer [b, columns, kv_heads, head_dim]: only its new column
        column = jax.lax.dynamic_slice_in_dim(layer, q_offset, 1, axis=1)
        return jax.lax.dynamic_update_slice(stack, column[None], (per_step, 0, q_offset, 0, 0))

      return (h, jax.tree.map(put, caches, new)), None

  CacheInCarry.__name__ = CacheInCarry.__qualname__ = f"CacheInCarry{layer_cls.__name__}"
  return CacheInCarry


def embed(config) -> nn.Embed:
  return nn.Embed(
    config.vocab_size,
    config.hidden_size,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    embedding_init=_partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
  )


class LlamaModel(nn.Module):
  config: LlamaConfig
  decoder_layer = LlamaDecoderLayer  # a class attribute: the MoE families swap in their block

  def setup(self):
    c = self.config
    self.embed_tokens = embed(c)
    layer = remat(self.decoder_layer, c)
    if c.scan_layers:
      # cos, sin, segments and offset are shared by every layer; the caches ride in the carry.
      unroll = scan_unroll_for(c)
      self.layers = scan_layers(cache_in_carry(layer), c.num_hidden_layers, 5, unroll)(c)
    else:
      self.layers = [layer(c) for _ in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)

  def __call__(self, input_ids, positions, segment_ids, cache):
    c = self.config
    h = self.embed_tokens(input_ids)
    h = nn.with_logical_constraint(h, ("batch", "seq", "embed"))
    inv_freq = rope_inv_freq(c.rotary_dim, c.rope_theta, c.rope_scaling)
    cos, sin = rope_cos_sin(positions, inv_freq, c.dtype, rope_attention_factor(c.rope_scaling))
    q_offset, kv_segments = cache_inputs(cache, segment_ids)
    layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}

    args = (cos, sin, segment_ids, kv_segments, q_offset)
    if c.scan_layers:
      if layer_caches is not None and input_ids.shape[1] == 1:  # a decode step
        (h, new_layer_caches), _ = self.layers(
          (h, layer_caches), *args, jnp.arange(c.num_hidden_layers)
        )
      else:
        (h, _), new_layer_caches = self.layers((h, None), *args, layer_caches)
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
  """Causal LM (implements `jlora.models.protocol.CausalLM`). See the module docstring.

  Other families subclass it with another `trunk` (the `model` submodule) and, where they cap
  logits, another `logits`; the call protocol below is written once here.
  """

  config: LlamaConfig
  trunk = LlamaModel  # a class attribute, not a dataclass field

  def setup(self):
    c = self.config
    self.model = self.trunk(c)
    if not c.tie_word_embeddings:
      self.lm_head = linear(c, c.vocab_size, ("embed", "vocab"), False, "lm_head")

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

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
    """An empty KV cache for `apply(..., cache=...)` (see the module-level `init_cache`)."""
    return init_cache(self.config, batch, max_len, dtype)

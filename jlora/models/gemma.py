"""Gemma 2 and Gemma 3 (text) decoders in Flax linen, sharing Llama's attention, MLP, norm and rope.

What Gemma changes relative to `jlora.models.llama`:

* RMSNorm scales by `(1 + w)` (in fp32), and every block has four norms: before and after attention,
  before and after the MLP.
* Embeddings are multiplied by sqrt(hidden_size); the head is tied; the MLP is GeGLU (gelu-tanh).
* Attention scores are scaled by `query_pre_attn_scalar ** -0.5`. Gemma 2 soft-caps scores (50) and
  final logits (30); Gemma 3 instead normalises each head's q and k (`(1 + w)` RMSNorm).
* Layers are local (sliding window) or global, in a repeating pattern (Gemma 2: local, global;
  Gemma 3: five local, one global). Gemma 3's local layers use their own RoPE base and its global
  layers may scale RoPE.

Local and global layers differ in kind, so one `nn.scan` over all layers does not fit. The model
scans over groups instead: `model/layers` is `nn.scan` over `GemmaLayerGroup`, one group being one
period of the pattern (`layers_0` ... `layers_{P-1}`, each stacked over the groups), and a model
whose depth is not a multiple of the period keeps the remainder in `model/tail` (a scan of length 1).
`GemmaConfig.layer_stacks` tells `names.HFNames` which HF layer each stacked entry is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from jlora.models.llama import (
  ACTIVATIONS,
  REMAT_POLICIES,
  LlamaAttention,
  LlamaForCausalLM,
  LlamaMLP,
  RMSNorm,
  cache_inputs,
  check_attention_fields,
  embed,
  hf_config_dict,
  hf_shape_fields,
  kv_buffers,
  remat,
  rope_cos_sin,
  rope_inv_freq,
  scan_layers,
)

Array = jax.Array

SUPPORTED_MODEL_TYPES = ("gemma2", "gemma3_text")
HF_ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
LOCAL, GLOBAL = "sliding_attention", "full_attention"
# Period of the local/global pattern when a config has no `layer_types`.
DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  vocab_size: int = 256000
  hidden_size: int = 2304
  intermediate_size: int = 9216
  num_hidden_layers: int = 26
  num_attention_heads: int = 8
  num_key_value_heads: int = 4
  head_dim: int = 256
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0  # global layers
  rope_scaling: Mapping[str, Any] | None = None  # global layers (Gemma 3: linear)
  rope_local_theta: float = 10000.0  # local layers
  layer_types: tuple[str, ...] | None = None  # None: the model_type's default pattern
  sliding_window: int = 4096
  query_pre_attn_scalar: float = 256.0
  attn_logit_softcapping: float | None = 50.0
  final_logit_softcapping: float | None = 30.0
  qk_norm: bool = False  # Gemma 3
  hidden_act: str = "gelu_pytorch_tanh"
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 8192
  attention: str = "auto"  # see LlamaConfig.attention
  attention_block_q: int = DEFAULT_BLOCK_Q
  attention_block_k: int = DEFAULT_BLOCK_K
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "auto"  # see jlora.models.llama.checkpoint_policy
  model_type: str = "gemma2"
  # Fixed by the architecture; fields so that Llama's attention and MLP read them like Llama's.
  attention_bias: bool = False
  mlp_bias: bool = False
  fused_projections: bool = False
  scan_layers: bool = True

  def __post_init__(self):
    if self.layer_types is None:
      period = DEFAULT_PATTERN[self.model_type]
      types = tuple(
        GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(self.num_hidden_layers)
      )
      object.__setattr__(self, "layer_types", types)
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {LOCAL, GLOBAL}:
      raise ValueError(
        f"layer_types: {list(self.layer_types)} is not valid; expected {self.num_hidden_layers} "
        f"entries, each {LOCAL!r} or {GLOBAL!r}."
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    check_attention_fields(self)
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
        f"hidden_act: {self.hidden_act!r} is not supported; expected one of {list(ACTIVATIONS)}."
      )
    if not self.scan_layers:
      raise ValueError("scan_layers: False is not supported for Gemma; expected True.")

  def __hash__(self):
    values = [getattr(self, f.name) for f in dataclasses.fields(self)]
    return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v for v in values))

  @property
  def plan(self) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
    return layer_plan(self.layer_types)

  def layer_stacks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return grouped_layer_stacks(self.plan)

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> GemmaConfig:
    """From an HF Gemma2Config / Gemma3TextConfig dict (transformers 4.x or 5.x layout)."""
    d = hf_config_dict(hf_config, SUPPORTED_MODEL_TYPES, "jlora's Gemma")
    model_type = d["model_type"]
    if d.get("use_bidirectional_attention"):
      raise ValueError("use_bidirectional_attention: True is not supported; expected False.")
    rope = dict(d.get("rope_parameters") or {})
    is_gemma3 = model_type == "gemma3_text"
    default_theta = 1_000_000.0 if is_gemma3 else 10000.0
    if GLOBAL in rope:  # transformers 5: one rope dict per layer type
      global_rope, local_rope = dict(rope[GLOBAL]), dict(rope.get(LOCAL) or {})
    else:
      global_rope = {**(d.get("rope_scaling") or {}), **rope}
      local_rope = {"rope_theta": d.get("rope_local_base_freq")}
    theta = global_rope.pop("rope_theta", None) or d.get("rope_theta") or default_theta
    local_theta = local_rope.get("rope_theta") or (10000.0 if is_gemma3 else theta)
    scaling = global_rope if global_rope.get("rope_type", "default") != "default" else None
    period = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern")
    types = d.get("layer_types")
    if types is None and period:
      n = d["num_hidden_layers"]
      types = [GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(n)]
    kwargs = dict(
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
      head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
      rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      rope_scaling=scaling,
      rope_local_theta=float(local_theta),
      layer_types=tuple(types) if types is not None else None,
      sliding_window=d.get("sliding_window") or 4096,
      query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
      attn_logit_softcapping=d.get("attn_logit_softcapping", None if is_gemma3 else 50.0),
      final_logit_softcapping=d.get("final_logit_softcapping", None if is_gemma3 else 30.0),
      qk_norm=is_gemma3,
      hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
      tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
      max_position_embeddings=d.get("max_position_embeddings", 8192),
      attention_bias=bool(d.get("attention_bias", False)),
      model_type=model_type,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_dict(self) -> dict:
    """config.json content that transformers 5 (and 4.x: rope_theta, rope_local_base_freq) reads."""
    global_rope = {
      "rope_type": "default",
      **(self.rope_scaling or {}),
      "rope_theta": self.rope_theta,
    }
    local_rope = {"rope_type": "default", "rope_theta": self.rope_local_theta}
    is_gemma3 = self.model_type == "gemma3_text"
    return {
      **hf_shape_fields(self, HF_ARCHITECTURES[self.model_type]),
      "rope_parameters": {GLOBAL: global_rope, LOCAL: local_rope} if is_gemma3 else global_rope,
      "layer_types": list(self.layer_types),
      "sliding_window": self.sliding_window,
      # transformers' strict config wants an int where the value is integral
      "query_pre_attn_scalar": int(self.query_pre_attn_scalar)
      if float(self.query_pre_attn_scalar).is_integer()
      else self.query_pre_attn_scalar,
      "attn_logit_softcapping": self.attn_logit_softcapping,
      "final_logit_softcapping": self.final_logit_softcapping,
      "hidden_activation": self.hidden_act,
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_bias": self.attention_bias,
      "max_position_embeddings": self.max_position_embeddings,
      "torch_dtype": "float32",
    }


def layer_plan(types: tuple[str, ...]) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
  """(pattern, repeats, tail): types == pattern * repeats + tail, shortest pattern."""
  for period in range(1, len(types) + 1):
    if all(types[i] == types[i % period] for i in range(len(types))):
      repeats = len(types) // period
      return types[:period], repeats, types[period * repeats :]
  raise AssertionError("unreachable: the whole list is a period of itself")


def grouped_layer_stacks(plan) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """The stacks of a model scanned over groups (`GemmaModel`): each position of the pattern is a
  stack `model/layers/layers_{j}` holding HF layers j, j + period, ...; the tail's under model/tail."""
  pattern, repeats, tail = plan
  period = len(pattern)
  stacks = [
    (f"model/layers/layers_{j}", tuple(g * period + j for g in range(repeats)))
    for j in range(period)
  ]
  stacks += [(f"model/tail/layers_{j}", (repeats * period + j,)) for j in range(len(tail))]
  return tuple(stacks)


class GemmaDecoderLayer(nn.Module):
  """One block: norm -> attention -> norm, residual; norm -> MLP -> norm, residual."""

  config: GemmaConfig
  local: bool

  def setup(self):
    c = self.config
    norm = lambda: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, offset=1.0)
    self.self_attn = LlamaAttention(
      c,
      sliding_window=c.sliding_window if self.local else None,
      softcap=c.attn_logit_softcapping,
      scale=c.query_pre_attn_scalar**-0.5,
      norm_offset=1.0,
    )
    self.mlp = LlamaMLP(c)
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()
    self.pre_feedforward_layernorm = norm()
    self.post_feedforward_layernorm = norm()

  def __call__(self, h, rope, q_segments, kv_segments, q_offset, layer_cache):
    cos, sin = rope["local" if self.local else "global"]
    attn, new_cache = self.self_attn(
      self.input_layernorm(h), cos, sin, q_segments, kv_segments, q_offset, layer_cache
    )
    h = h + self.post_attention_layernorm(attn)
    h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
    return nn.with_logical_constraint(h, ("batch", "seq", "embed")), new_cache


class GemmaLayerGroup(nn.Module):
  """Consecutive layers of the given kinds; the unit that `nn.scan` repeats."""

  config: GemmaConfig
  layer_types: tuple[str, ...]
  decoder_layer = GemmaDecoderLayer  # a class attribute: gpt-oss swaps in its own layer

  def setup(self):
    layer = remat(self.decoder_layer, self.config)
    self.layers = [layer(self.config, local=t == LOCAL) for t in self.layer_types]

  def __call__(self, h, rope, q_segments, kv_segments, q_offset, group_cache):
    """group_cache: {"k", "v"} [len(layer_types), b, t, kv_heads, d] or None."""
    new_caches = []
    for j, layer in enumerate(self.layers):
      layer_cache = None if group_cache is None else jax.tree.map(lambda a: a[j], group_cache)
      h, new_cache = layer(h, rope, q_segments, kv_segments, q_offset, layer_cache)
      new_caches.append(new_cache)
    if group_cache is None:
      return h, None
    return h, jax.tree.map(lambda *a: jnp.stack(a), *new_caches)


class GemmaModel(nn.Module):
  """The trunk scanned over groups of local and global layers (see the module docstring).

  Class attributes let another family with per-layer windows (gpt-oss) reuse it: its layer group,
  its final norm's offset, and the methods `embeddings` and `rope`."""

  config: GemmaConfig
  layer_group = GemmaLayerGroup
  norm_offset = 1.0

  def setup(self):
    c = self.config
    pattern, repeats, tail = c.plan
    self.embed_tokens = embed(c)
    # rope, segments and offset are shared by every group; the cache is per group.
    self.layers = scan_layers(self.layer_group, repeats, 4)(c, pattern)
    if tail:
      self.tail = scan_layers(self.layer_group, 1, 4)(c, tail)
    self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, offset=self.norm_offset)

  def embeddings(self, input_ids):
    c = self.config
    # HF multiplies by sqrt(d) rounded to the weights' dtype.
    normalizer = jnp.asarray(math.sqrt(c.hidden_size), c.param_dtype).astype(c.dtype)
    return self.embed_tokens(input_ids) * normalizer

  def rope(self, positions) -> dict:
    """{"local": (cos, sin), "global": (cos, sin)}."""
    c = self.config
    return {
      "global": rope_cos_sin(
        positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), c.dtype
      ),
      "local": rope_cos_sin(
        positions, rope_inv_freq(c.head_dim, c.rope_local_theta, None), c.dtype
      ),
    }

  def __call__(self, input_ids, positions, segment_ids, cache):
    c = self.config
    h = nn.with_logical_constraint(self.embeddings(input_ids), ("batch", "seq", "embed"))
    rope = self.rope(positions)
    q_offset, kv_segments = cache_inputs(cache, segment_ids)
    args = (rope, segment_ids, kv_segments, q_offset)
    h, layers_cache = self.layers(h, *args, None if cache is None else cache["layers"])
    tail_cache = None
    if c.plan[2]:
      h, tail_cache = self.tail(h, *args, None if cache is None else cache["tail"])
    new_cache = None
    if cache is not None:
      new_cache = {
        "layers": layers_cache,
        "segment_ids": kv_segments,
        "index": q_offset + input_ids.shape[1],
      }
      if tail_cache is not None:
        new_cache["tail"] = tail_cache
    return self.norm(h), new_cache


def init_cache(config: GemmaConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
  """An empty KV cache: {"layers": {"k", "v"} [groups, period, b, max_len, kv_heads, d],
  "tail": the same for the remainder (if any), "segment_ids", "index"} (see llama.init_cache)."""
  pattern, repeats, tail = config.plan
  cache = {
    "layers": kv_buffers(config, (repeats, len(pattern)), batch, max_len, dtype),
    "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
    "index": jnp.zeros((), jnp.int32),
  }
  if tail:
    cache["tail"] = kv_buffers(config, (1, len(tail)), batch, max_len, dtype)
  return cache


class GemmaForCausalLM(LlamaForCausalLM):
  """Gemma 2 / Gemma 3 causal LM: Llama's call protocol, Gemma's trunk, a soft-capped head."""

  config: GemmaConfig
  trunk = GemmaModel

  def logits(self, hidden: Array) -> Array:
    """The head; with final_logit_softcapping, `cap * tanh(logits / cap)` in fp32 (returned)."""
    out = super().logits(hidden)
    cap = self.config.final_logit_softcapping
    if cap is None:
      return out
    return cap * jnp.tanh(out.astype(jnp.float32) / cap)

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
    return init_cache(self.config, batch, max_len, dtype)

"""One attention function for every model family: training, eval and KV-cache decoding.

`attention(q, k, v, q_segments, kv_segments, ...)` takes queries `[b, s, heads, d]` and keys/values
`[b, t, kv_heads, d]` (GQA: `heads` is a multiple of `kv_heads`, and K/V are never repeated). A query at
slot `q_offset + i` may attend to key slot `j` when

* `j <= q_offset + i` (causal),
* `q_segments[b, i] == kv_segments[b, j] != 0` (packing; segment 0 is padding),
* and, with `sliding_window=w`, `j > q_offset + i - w`.

`sliding_window` may be a traced int32 scalar (per-layer windows under `nn.scan`); naive and blockwise
take it as data, the cuDNN / splash paths need a Python int. `softcap=c` applies `c * tanh(scores / c)`
to the scaled scores (Gemma 2). `scale` defaults to
`1 / sqrt(d)`. `sinks` [heads] (gpt-oss) is a learned logit per head that joins each row's softmax
denominator and attends to nothing: probabilities are `exp(score) / (sum exp(scores) + exp(sink))`.
The result is `[b, s, heads, d]` in the dtype of `v`; a query row that may attend to nothing
(padding) gets zeros.

Implementations (`implementation=`):

* `"naive"`: fp32 scores and a full `[b, kv, groups, s, t]` mask. The reference the tests compare
  against; memory grows with s * t.
* `"blockwise"`: flash-style pure JAX (`jlora.models.blockwise`): O(seq) memory, skips masked blocks,
  custom VJP. Runs on every backend; the default on CPU.
* `"cudnn"`: cuDNN's fused attention on NVIDIA GPUs, bf16/fp16, no softcap, q_offset 0, s == t.
  Chosen per batch at run time: rows of one segment followed by padding go through
  `jax.nn.dot_product_attention(implementation="cudnn")`; packed rows (the trainer's usual batch)
  through cuDNN's packed layout, given each segment's offset and length (`packed_segment_offsets`;
  the public entry point takes no segment ids); rows with more than one segment per 64 slots, or
  a segment split in two, go to blockwise. Calls outside the static limits go to blockwise.
* `"splash"`: TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), which takes
  segment ids and soft-capping; training/prefill shapes only (q_offset 0, s == t, lengths that are
  multiples of 128), no sinks, otherwise blockwise.
* `"auto"` (the default): the fastest implementation that supports the call on the current backend:
  cudnn on GPU, splash on TPU, blockwise elsewhere (naive for a decode step's one query per row)

The cudnn paths are checked against naive on an H200 by `python -m bench.gpu_attention` (CI has
no GPU). The splash path could not be run where this was written (no TPU); it is a thin wrapper
whose eligibility checks follow the JAX documentation, and it falls back to blockwise.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax

from jlora.models.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, blockwise_attention
from jlora.models.masking import attention_mask

Array = jax.Array

IMPLEMENTATIONS = ("auto", "naive", "blockwise", "cudnn", "splash")

__all__ = ["IMPLEMENTATIONS", "attention", "attention_mask", "naive_attention", "resolve"]


def naive_attention(
  q: Array,
  k: Array,
  v: Array,
  q_segments: Array,
  kv_segments: Array,
  *,
  q_offset: Array | int = 0,
  sliding_window: int | None = None,
  softcap: float | None = None,
  scale: float | None = None,
  sinks: Array | None = None,
) -> Array:
  """The reference: fp32 scores and a full `[b, kv_heads, groups, s, t]` mask."""
  b, s, n_heads, d = q.shape
  n_kv = k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  # GQA without materializing repeated K/V: group query heads by the KV head they share.
  q = q.reshape(b, s, n_kv, n_heads // n_kv, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
  scores = scores * scale
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  mask = attention_mask(q_segments, kv_segments, q_offset, sliding_window)[:, None, None]
  # A finite fill keeps fully masked rows (padding queries) free of NaNs; zeroing their
  # probabilities makes their output 0 rather than the mean of V.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  if sinks is None:
    probs = jax.nn.softmax(scores, axis=-1)
  else:  # one more column per row, the head's sink, dropped after the softmax
    sink = jnp.broadcast_to(
      sinks.astype(jnp.float32).reshape(1, n_kv, n_heads // n_kv, 1, 1), (*scores.shape[:-1], 1)
    )
    probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
  probs = jnp.where(mask, probs, 0.0).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, n_heads, d)


# --------------------------------------------------------------------------- cuDNN (NVIDIA GPU)


def _cudnn_eligible(q, k, v, q_offset, sliding_window, softcap) -> bool:
  """Static limits of cuDNN's fused attention as exposed by jax.nn.dot_product_attention."""
  return (
    jax.default_backend() == "gpu"
    and q.dtype in (jnp.bfloat16, jnp.float16)
    and k.dtype == q.dtype
    and v.dtype == q.dtype
    and softcap is None
    and (sliding_window is None or isinstance(sliding_window, int))
    and isinstance(q_offset, int)
    and q_offset == 0
    and q.shape[1] == k.shape[1]
    # jax's check_is_flash_attention refuses odd lengths when training with a mask (bias), and
    # the gradient is not known here: a 127-token row raised on an H200 instead of falling back.
    and q.shape[1] % 2 == 0
    and q.shape[-1] <= 128
    and q.shape[-1] % 8 == 0
  )


def _single_segment_lengths(segments: Array) -> tuple[Array, Array]:
  """(ok, lengths): ok when every row is one nonzero segment followed only by padding."""
  real = segments != 0
  lengths = jnp.sum(real, axis=1).astype(jnp.int32)
  prefix = jnp.arange(segments.shape[1])[None, :] < lengths[:, None]
  same = (segments == segments[:, :1]) | ~real
  return jnp.all((real == prefix) & same), lengths


def packed_segment_offsets(segments: Array, max_segments: int) -> tuple[Array, Array, Array]:
  """(ok, offsets [b, m + 1], lengths [b, m]) of each row's segments, in cuDNN's packed (THD)
  convention: a segment's first slot and length, unused entries -1. ok is False when some row
  holds more than `max_segments` segments or a segment in two separate runs (cuDNN packs
  contiguous segments only). Padding (segment 0) is no segment."""
  previous = jnp.pad(segments[:, :-1], ((0, 0), (1, 0)), constant_values=0)
  starts = (segments != 0) & (segments != previous)

  def one_row(row, row_starts):
    (first,) = jnp.nonzero(row_starts, size=max_segments + 1, fill_value=-1)
    ids = jnp.where(first >= 0, row[jnp.maximum(first, 0)], -1)
    lengths = jnp.sum(row[None, :] == ids[:, None], axis=1)
    lengths = jnp.where(first >= 0, lengths, -1).astype(jnp.int32)
    contiguous = jnp.sum(jnp.maximum(lengths, 0)) == jnp.sum(row != 0)
    return first[max_segments] < 0, contiguous, first.astype(jnp.int32), lengths[:max_segments]

  fits, contiguous, offsets, lengths = jax.vmap(one_row)(segments, starts)
  return jnp.all(fits & contiguous), offsets, lengths


def _cudnn_module():
  """JAX's cuDNN attention module, whose entry point takes packed segments (the public
  jax.nn.dot_product_attention does not); None where this JAX lacks it."""
  try:
    import jax._src.cudnn.fused_attention_stablehlo as cudnn
  except ImportError:
    return None
  takes_segments = "q_offsets" in inspect.signature(cudnn.dot_product_attention).parameters
  return cudnn if takes_segments else None


def _cudnn_attention(q, k, v, q_segments, kv_segments, *, sliding_window, scale, fallback):
  ok, q_lengths = _single_segment_lengths(q_segments)
  kv_ok, kv_lengths = _single_segment_lengths(kv_segments)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

  def padded(out):
    return jnp.where((q_segments != 0)[:, :, None, None], out, 0).astype(v.dtype)

  def fused(q, k, v):
    out = jax.nn.dot_product_attention(
      q,
      k,
      v,
      scale=scale,
      is_causal=True,
      query_seq_lengths=q_lengths,
      key_value_seq_lengths=kv_lengths,
      local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
      implementation="cudnn",
    )
    return padded(out)

  same = jnp.all(q_segments == kv_segments)
  # Packed rows: cuDNN's packed layout, with up to one segment per 64 slots (more go to
  # blockwise); positions restart per segment, so its per-segment causal mask is ours.
  cudnn = _cudnn_module()
  if cudnn is None:
    return lax.cond(ok & kv_ok & same, fused, fallback, q, k, v)
  packed_ok, offsets, lengths = packed_segment_offsets(q_segments, max(1, q.shape[1] // 64))

  def packed(q, k, v):
    out = cudnn.dot_product_attention(
      q,
      k,
      v,
      q_seqlen=lengths,
      kv_seqlen=lengths,
      q_offsets=offsets,
      kv_offsets=offsets,
      scale=scale,
      mask_type=cudnn.MaskType.CAUSAL,
      sliding_window_length=sliding_window,
    )
    return padded(out)

  branch = jnp.where(ok & kv_ok & same, 0, jnp.where(packed_ok & same, 1, 2))
  return lax.switch(branch, (fused, packed, fallback), q, k, v)


# --------------------------------------------------------------------------- splash (TPU)


def _splash_eligible(q, k, q_offset, sliding_window) -> bool:
  return (
    jax.default_backend() == "tpu"
    and (sliding_window is None or isinstance(sliding_window, int))
    and isinstance(q_offset, int)
    and q_offset == 0
    and q.shape[1] == k.shape[1]
    and q.shape[1] % 128 == 0
  )


def _splash_attention(q, k, v, q_segments, kv_segments, *, sliding_window, softcap, scale):
  # Imported here: Pallas TPU kernels are only importable/usable with a TPU backend.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, s, n_heads, d = q.shape
  n_kv = k.shape[2]
  groups = n_heads // n_kv
  shape = (s, s)
  if sliding_window is None:
    mask = splash.CausalMask(shape)
  else:
    mask = splash.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
  kernel = splash.make_splash_mqa_single_device(
    splash.MultiHeadMask([mask] * groups), attn_logits_soft_cap=softcap
  )
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  # [b, kv, groups, s, d] queries against [b, kv, s, d] keys: one MQA kernel call per KV head.
  qg = (q * scale).reshape(b, s, n_kv, groups, d).transpose(0, 2, 3, 1, 4)
  kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def one_row(q_row, k_row, v_row, q_seg, kv_seg):
    ids = splash.SegmentIds(q=q_seg, kv=kv_seg)
    return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

  out = jax.vmap(one_row)(qg, kg, vg, q_segments, kv_segments)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, s, n_heads, d)
  # Splash treats segment 0 like any other id; padding rows are zeroed to match the contract.
  return jnp.where((q_segments != 0)[:, :, None, None], out, 0).astype(v.dtype)


# --------------------------------------------------------------------------- dispatch


def resolve(
  implementation: str, q, k, v, *, q_offset=0, sliding_window=None, softcap=None, sinks=None
) -> str:
  """The implementation that will serve this call: `auto` and ineligible fast paths resolved.
  Only naive and blockwise take sinks."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"config.model.attention: {implementation!r} is not valid; expected one of "
      f"{', '.join(IMPLEMENTATIONS)}."
    )
  if implementation in ("naive", "blockwise") or sinks is not None:
    return implementation if implementation == "naive" else "blockwise"
  cudnn_ok = _cudnn_eligible(q, k, v, q_offset, sliding_window, softcap)
  splash_ok = _splash_eligible(q, k, q_offset, sliding_window)
  if implementation == "auto":
    # One query per row (a decode step): its scores are one row per key, nothing to block.
    fallback = "naive" if q.shape[1] == 1 else "blockwise"
    return "cudnn" if cudnn_ok else "splash" if splash_ok else fallback
  ok = cudnn_ok if implementation == "cudnn" else splash_ok
  return implementation if ok else "blockwise"


def attention(
  q: Array,
  k: Array,
  v: Array,
  q_segments: Array,
  kv_segments: Array,
  *,
  q_offset: Array | int = 0,
  sliding_window: int | None = None,
  softcap: float | None = None,
  scale: float | None = None,
  sinks: Array | None = None,
  implementation: str = "auto",
  block_q: int = DEFAULT_BLOCK_Q,
  block_k: int = DEFAULT_BLOCK_K,
) -> Array:
  """Dispatches to an implementation (module docstring); all compute what `naive_attention` does.

  `block_q` / `block_k` are the blockwise implementation's block lengths.
  """
  window = dict(q_offset=q_offset, sliding_window=sliding_window)
  chosen = resolve(implementation, q, k, v, **window, softcap=softcap, sinks=sinks)
  common = dict(sliding_window=sliding_window, softcap=softcap, scale=scale)
  if chosen == "naive":
    return naive_attention(
      q, k, v, q_segments, kv_segments, q_offset=q_offset, sinks=sinks, **common
    )

  def blockwise(q, k, v):
    return blockwise_attention(
      q,
      k,
      v,
      q_segments,
      kv_segments,
      q_offset=q_offset,
      block_q=block_q,
      block_k=block_k,
      sinks=sinks,
      **common,
    )

  if chosen == "cudnn":
    return _cudnn_attention(
      q,
      k,
      v,
      q_segments,
      kv_segments,
      sliding_window=sliding_window,
      scale=scale,
      fallback=blockwise,
    )
  if chosen == "splash":
    return _splash_attention(q, k, v, q_segments, kv_segments, **common)
  return blockwise(q, k, v)

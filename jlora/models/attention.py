"""One attention function for every model family: training, eval and KV-cache decoding.

`attention(q, k, v, q_segments, kv_segments, ...)` takes queries `[b, s, heads, d]` and keys/values
`[b, t, kv_heads, d]` (GQA: `heads` is a multiple of `kv_heads`, and K/V are never repeated). A query at
slot `q_offset + i` may attend to key slot `j` when

* `j <= q_offset + i` (causal),
* `q_segments[b, i] == kv_segments[b, j] != 0` (packing; segment 0 is padding),
* and, with `sliding_window=w`, `j > q_offset + i - w`.

`softcap=c` applies `c * tanh(scores / c)` to the scaled scores (Gemma 2). `scale` defaults to
`1 / sqrt(d)`. The result is `[b, s, heads, d]` in the dtype of `v`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("naive",)


def attention_mask(
  q_segments: Array,
  kv_segments: Array,
  q_offset: Array | int = 0,
  sliding_window: int | None = None,
) -> Array:
  """Boolean `[b, s, t]`: which key slots each query may attend to (see the module docstring)."""
  s, t = q_segments.shape[1], kv_segments.shape[1]
  q_pos = q_offset + jnp.arange(s)
  kv_pos = jnp.arange(t)
  allowed = kv_pos[None, :] <= q_pos[:, None]  # [s, t]
  if sliding_window is not None:
    allowed &= kv_pos[None, :] > q_pos[:, None] - sliding_window
  same_segment = (q_segments[:, :, None] == kv_segments[:, None, :]) & (
    kv_segments[:, None, :] != 0
  )
  return allowed[None] & same_segment


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
  mask = attention_mask(q_segments, kv_segments, q_offset, sliding_window)
  # A finite fill keeps fully masked rows (padding queries) free of NaNs.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, n_heads, d)


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
  implementation: str = "naive",
) -> Array:
  """Dispatches to an implementation; all of them compute what `naive_attention` computes."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}"
    )
  return naive_attention(
    q,
    k,
    v,
    q_segments,
    kv_segments,
    q_offset=q_offset,
    sliding_window=sliding_window,
    softcap=softcap,
    scale=scale,
  )

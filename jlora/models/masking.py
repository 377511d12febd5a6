"""Which key slots a query may attend to: the one masking rule every attention implementation uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_mask(
  q_segments: Array,
  kv_segments: Array,
  q_offset: Array | int = 0,
  sliding_window: int | None = None,
  *,
  kv_offset: Array | int = 0,
) -> Array:
  """Boolean `[b, s, t]`: query slot `q_offset + i` may attend to key slot `kv_offset + j` when

  * the key is not after the query (causal),
  * both carry the same segment id and it is not 0 (packing; 0 is padding),
  * and, with a sliding window `w`, the key is less than `w` slots before the query.

  `kv_offset` lets blockwise implementations ask for one block of the full mask.
  """
  s, t = q_segments.shape[1], kv_segments.shape[1]
  q_pos = q_offset + jnp.arange(s)
  kv_pos = kv_offset + jnp.arange(t)
  allowed = kv_pos[None, :] <= q_pos[:, None]  # [s, t]
  if sliding_window is not None:
    allowed &= kv_pos[None, :] > q_pos[:, None] - sliding_window
  same_segment = (q_segments[:, :, None] == kv_segments[:, None, :]) & (
    kv_segments[:, None, :] != 0
  )
  return allowed[None] & same_segment

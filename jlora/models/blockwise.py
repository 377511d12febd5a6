"""Flash-style attention in pure JAX: O(seq) memory, masked blocks skipped, runs on every backend.

`blockwise_attention` computes what `jlora.models.attention.naive_attention` computes (same
arguments, same masking rule) without ever holding a `[seq, seq]` array:

* Queries and keys are cut into blocks (`block_q`, `block_k`; lengths that are not a multiple are
  padded internally with segment 0, i.e. masked). For each query block an online softmax runs over
  the key blocks (Dao et al. 2022; FlashAttention-2, arXiv 2307.08691).
* A small `[query blocks, key blocks]` plan says which block pairs hold any allowed entry: blocks
  above the causal diagonal, outside the sliding window, or whose segment-id ranges (per block
  min/max over the nonzero ids) do not overlap are skipped. The loops run only over the range
  between the first and last needed block (`lax.fori_loop` with computed bounds, i.e. a while
  loop) and a `lax.cond` skips any unneeded block inside that range (possible only with unsorted
  segment ids), so skipped blocks cost nothing, not a masked matmul.
* A custom VJP saves only the output and the per-row logsumexp, and the backward recomputes the
  block probabilities (FlashAttention-2's backward), so the residuals are O(seq) per layer.
* Attention sinks (gpt-oss: a per-head logit in every row's softmax denominator) rescale each row
  after the loop: with L the row's logsumexp over its keys, the output times `sigmoid(L - sink)`.
  The loop returns L as a differentiable output (its cotangent adds `dL * p` to the scores'), so
  JAX differentiates the rescaling, the sinks included.
* GQA without repeating K and V: internally the queries are `[b, kv heads, seq * groups, d]`, the
  query heads that share a KV head stacked position-major as rows, so every block product is one
  plain matmul per (batch, KV head) whose contracting axis is already contiguous. (Grouping as
  `[b, kv, groups, seq, d]` made XLA:CPU copy-transpose the probabilities and their gradient in
  every backward block: see the `copy` ops in the compiled HLO.)

Query rows that may attend to nothing (padding, segment 0) get a zero output and zero gradients.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jlora.models.masking import attention_mask

Array = jax.Array

# Chosen with `python -m bench.attention_blocks` (table in BENCHMARKS.md, "Long rows"): forward +
# backward of one layer's attention at the SmolLM2-135M shape, fp32, on an idle 2-core AMD EPYC.
# 128 x 256, 256 x 256 and 256 x 384 were within ~10% of each other and of torch's fused CPU kernel
# at 2,048 and 8,192 tokens; 128 x 128 and 512 x 512 were 10-25% slower.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
_BLOCK_MULTIPLE = 8  # padded block lengths are rounded to this, to keep vector loops whole


@dataclasses.dataclass(frozen=True)
class _Static:
  """The hashable, trace-time part of a call (custom_vjp's non-differentiable argument)."""

  block_q: int
  block_k: int
  groups: int  # query heads per KV head: a query block is block_q * groups rows
  windowed: bool  # the window length itself is a (possibly traced) argument
  softcap: float | None
  scale: float


def blocking(n: int, block: int) -> tuple[int, int]:
  """(block length, number of blocks) covering n positions with blocks of at most `block`.

  Blocks are balanced (1,100 tokens with block 512 -> 3 blocks of 368, not 512 + 512 + 76) so
  that the internal padding stays below one multiple of 8 per block.
  """
  if n <= block:
    return n, 1
  count = -(-n // block)
  length = -(-n // count)
  length = -(-length // _BLOCK_MULTIPLE) * _BLOCK_MULTIPLE
  return length, -(-n // length)


def blockwise_attention(
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
  block_q: int = DEFAULT_BLOCK_Q,
  block_k: int = DEFAULT_BLOCK_K,
  sinks: Array | None = None,
) -> Array:
  """q [b, s, heads, d], k/v [b, t, kv_heads, d] -> [b, s, heads, d] in v's dtype.

  Same contract as `jlora.models.attention.attention`; `block_q` / `block_k` are the largest
  query / key block lengths.
  """
  b, s, n_heads, d = q.shape
  t, n_kv = k.shape[1], k.shape[2]
  groups = n_heads // n_kv
  bq, nq = blocking(s, block_q)
  bk, nk = blocking(t, block_k)
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  cap = None if softcap is None else float(softcap)
  static = _Static(bq, bk, groups, sliding_window is not None, cap, scale)

  pad_q, pad_k = nq * bq - s, nk * bk - t
  q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
  q_segments = jnp.pad(q_segments.astype(jnp.int32), ((0, 0), (0, pad_q)))
  kv_segments = jnp.pad(kv_segments.astype(jnp.int32), ((0, 0), (0, pad_k)))
  # Internal layout (see the module docstring): rows = (position, group), heads before rows.
  q = q.reshape(b, nq * bq, n_kv, groups, d).transpose(0, 2, 1, 3, 4)
  q = q.reshape(b, n_kv, nq * bq * groups, d)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  offset = jnp.asarray(q_offset, jnp.int32)
  # The window is data, not a trace-time constant, so a scanned model may vary it per layer.
  window = jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32)
  out, lse = _flash(static, q, k, v, q_segments, kv_segments, offset, window)
  out = out.reshape(b, n_kv, nq * bq, groups, d).transpose(0, 2, 1, 3, 4)
  out = out.reshape(b, nq * bq, n_heads, d)[:, :s]
  if sinks is None:
    return out
  lse = lse.reshape(b, n_kv, nq * bq, groups).transpose(0, 2, 1, 3).reshape(b, nq * bq, n_heads)
  # exp(L) / (exp(L) + exp(sink)); empty rows (L = +inf) keep their zeros
  keep = jax.nn.sigmoid(lse[:, :s] - sinks.astype(jnp.float32))
  return (out.astype(jnp.float32) * keep[..., None]).astype(out.dtype)


# --------------------------------------------------------------------------- the block plan


def _segment_ranges(segments: Array, blocks: int, length: int) -> tuple[Array, Array]:
  """Per block [b, blocks]: the smallest and largest nonzero segment id (empty: lo > hi)."""
  seg = segments.reshape(segments.shape[0], blocks, length)
  real = seg != 0
  big = jnp.iinfo(jnp.int32).max
  return jnp.min(jnp.where(real, seg, big), -1), jnp.max(jnp.where(real, seg, -big), -1)


def block_plan(
  static: _Static, q_segments: Array, kv_segments: Array, q_offset: Array, window: Array
) -> Array:
  """Bool [query blocks, key blocks]: whether the pair holds any allowed (query, key) entry."""
  bq, bk = static.block_q, static.block_k
  nq, nk = q_segments.shape[1] // bq, kv_segments.shape[1] // bk
  q_lo, q_hi = _segment_ranges(q_segments, nq, bq)
  k_lo, k_hi = _segment_ranges(kv_segments, nk, bk)
  overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
  q_first = q_offset + jnp.arange(nq) * bq
  q_last = q_first + bq - 1
  k_first = jnp.arange(nk) * bk
  needed = jnp.any(overlap, axis=0) & (k_first[None, :] <= q_last[:, None])
  if static.windowed:
    k_last = k_first + bk - 1
    needed &= k_last[None, :] > q_first[:, None] - window
  return needed


def _loop_range(needed: Array) -> tuple[Array, Array]:
  """[first, last + 1) of the True entries of a 1-D bool array; (0, 0) when there are none."""
  n = needed.shape[0]
  first = jnp.argmax(needed)
  end = n - jnp.argmax(needed[::-1])
  return jnp.where(jnp.any(needed), first, 0), jnp.where(jnp.any(needed), end, 0)


# --------------------------------------------------------------------------- one block pair


def _block_scores(static: _Static, qi: Array, kj: Array, mask: Array) -> tuple[Array, Array | None]:
  """Masked fp32 scores [b, kv, rows, bk] (-inf where not allowed) and tanh for the softcap."""
  raw = jnp.einsum("bkrd,bktd->bkrt", qi, kj, preferred_element_type=jnp.float32) * static.scale
  capped = None
  if static.softcap is not None:
    capped = jnp.tanh(raw / static.softcap)
    raw = static.softcap * capped
  return jnp.where(mask[:, None], raw, -jnp.inf), capped


def _slice(x: Array, index: Array, length: int, axis: int) -> Array:
  return lax.dynamic_slice_in_dim(x, index * length, length, axis=axis)


def _block_mask(static: _Static, q_segments, kv_segments, q_offset, window, i, j) -> Array:
  """[b, rows, bk]: the block's [b, bq, bk] mask with each query row repeated for its groups."""
  bq, bk = static.block_q, static.block_k
  mask = attention_mask(
    _slice(q_segments, i, bq, 1),
    _slice(kv_segments, j, bk, 1),
    q_offset + i * bq,
    window if static.windowed else None,
    kv_offset=j * bk,
  )
  return jnp.repeat(mask, static.groups, axis=1)


# --------------------------------------------------------------------------- forward


def _forward(static: _Static, q, k, v, q_segments, kv_segments, q_offset, window):
  """(out [b, kv, S * g, d] in v's dtype, logsumexp [b, kv, S * g] fp32; +inf on empty rows)."""
  bq, bk = static.block_q, static.block_k
  rows = bq * static.groups
  nq = q.shape[2] // rows
  needed = block_plan(static, q_segments, kv_segments, q_offset, window)

  def query_block(i, carry):
    out, lse = carry
    qi = _slice(q, i, rows, 2)

    def key_block(j, state):
      def update(state):
        m, total, acc = state
        mask = _block_mask(static, q_segments, kv_segments, q_offset, window, i, j)
        scores, _ = _block_scores(static, qi, _slice(k, j, bk, 2), mask)
        m_new = jnp.maximum(m, scores.max(-1))
        # A row with nothing allowed yet keeps m = -inf; subtracting 0 instead keeps exp() NaN-free.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(scores - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pv = jnp.einsum(
          "bkrt,bktd->bkrd",
          p.astype(v.dtype),
          _slice(v, j, bk, 2),
          preferred_element_type=jnp.float32,
        )
        return m_new, alpha * total + p.sum(-1), alpha[..., None] * acc + pv

      return lax.cond(needed[i, j], update, lambda state: state, state)

    init = (
      jnp.full(qi.shape[:3], -jnp.inf, jnp.float32),
      jnp.zeros(qi.shape[:3], jnp.float32),
      jnp.zeros(qi.shape, jnp.float32),
    )
    first, end = _loop_range(needed[i])
    m, total, acc = lax.fori_loop(first, end, key_block, init)
    empty = total == 0.0
    total = jnp.where(empty, 1.0, total)
    o = acc / total[..., None]
    lse_i = jnp.where(empty, jnp.inf, m + jnp.log(total))
    out = lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), i * rows, axis=2)
    lse = lax.dynamic_update_slice_in_dim(lse, lse_i, i * rows, axis=2)
    return out, lse

  init = (jnp.zeros(q.shape, v.dtype), jnp.zeros(q.shape[:3], jnp.float32))
  return lax.fori_loop(0, nq, query_block, init)


# --------------------------------------------------------------------------- backward


def _backward(static: _Static, residuals, cotangents):
  """FlashAttention-2's backward: per key block, loop over the query blocks that need it.

  The logsumexp's cotangent d_lse joins as d scores = p * (dp - delta + d_lse)."""
  q, k, v, q_segments, kv_segments, q_offset, window, out, lse = residuals
  d_out, d_lse = cotangents
  bq, bk = static.block_q, static.block_k
  rows = bq * static.groups
  nk = k.shape[2] // bk
  needed = block_plan(static, q_segments, kv_segments, q_offset, window)
  d_out = d_out.astype(v.dtype)
  # d_lse is zero unless sinks use the logsumexp; empty rows (lse = inf) have p = 0 anyway
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse

  def block_grads(i, j, kj, vj):
    """(dq_i, dk_j, dv_j) contributions of one block pair, fp32."""
    qi, d_out_i = _slice(q, i, rows, 2), _slice(d_out, i, rows, 2)
    mask = _block_mask(static, q_segments, kv_segments, q_offset, window, i, j)
    scores, capped = _block_scores(static, qi, kj, mask)
    p = jnp.exp(scores - _slice(lse, i, rows, 2)[..., None])
    dv = jnp.einsum(
      "bkrt,bkrd->bktd", p.astype(v.dtype), d_out_i, preferred_element_type=jnp.float32
    )
    dp = jnp.einsum("bkrd,bktd->bkrt", d_out_i, vj, preferred_element_type=jnp.float32)
    ds = p * (dp - _slice(delta, i, rows, 2)[..., None])
    if capped is not None:
      ds = ds * (1.0 - capped * capped)  # d/dx c*tanh(x/c) = 1 - tanh^2
    ds = (ds * static.scale).astype(q.dtype)
    dq = jnp.einsum("bkrt,bktd->bkrd", ds, kj, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkrt,bkrd->bktd", ds, qi, preferred_element_type=jnp.float32)
    return dq, dk, dv

  def key_block(j, carry):
    dq, dk, dv = carry
    kj, vj = _slice(k, j, bk, 2), _slice(v, j, bk, 2)

    def query_block(i, state):
      dq, dk_j, dv_j = state
      zeros = (jnp.zeros(q.shape[:2] + (rows, q.shape[3]), jnp.float32), dk_j * 0, dv_j * 0)
      # The cond returns only block-sized values: carrying the full dq through it could copy it.
      dq_i, dk_i, dv_i = lax.cond(needed[i, j], lambda: block_grads(i, j, kj, vj), lambda: zeros)
      dq = lax.dynamic_update_slice_in_dim(dq, _slice(dq, i, rows, 2) + dq_i, i * rows, axis=2)
      return dq, dk_j + dk_i, dv_j + dv_i

    first, end = _loop_range(needed[:, j])
    block_zeros = jnp.zeros(kj.shape, jnp.float32)
    dq, dk_j, dv_j = lax.fori_loop(first, end, query_block, (dq, block_zeros, block_zeros))
    dk = lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, axis=2)
    dv = lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, axis=2)
    return dq, dk, dv

  init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = lax.fori_loop(0, nk, key_block, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


# --------------------------------------------------------------------------- custom VJP


def _flash_primal(static, q, k, v, q_segments, kv_segments, q_offset, window):
  return _forward(static, q, k, v, q_segments, kv_segments, q_offset, window)


def _flash_fwd(static, q, k, v, q_segments, kv_segments, q_offset, window):
  out, lse = _forward(static, q, k, v, q_segments, kv_segments, q_offset, window)
  # Named so that a remat policy can keep them (see jlora.models.llama's remat policies):
  # without them the backward would have to rerun the whole forward loop.
  out = checkpoint_name(out, "attention_out")
  lse = checkpoint_name(lse, "attention_lse")
  return (out, lse), (q, k, v, q_segments, kv_segments, q_offset, window, out, lse)


_flash = jax.custom_vjp(_flash_primal, nondiff_argnums=(0,))
_flash.defvjp(_flash_fwd, _backward)

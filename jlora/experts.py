"""Grouped expert matmuls: the forward of mixture-of-experts weights, plain, quantized or adapted.

The experts of an MoE layer are one weight with an expert axis, a kernel [E, in, out] (Flax's
[in, out] orientation per expert; the logical axis is named "expert"). A layer routes each token to
its top-k experts; the k * tokens assignments are laid out by expert in rows called slots
(`sort_by_expert`, `Groups.dispatch`), so each expert's rows are contiguous, one grouped matmul runs
every expert on its own rows, and `Groups.combine` sums each token's k rows back. Dispatch and
combine are gathers both ways (`take_rows`): XLA:CPU runs a scatter-add (jnp.take's gradient) far
slower.

  ragged  `jax.lax.ragged_dot`: FLOPs scale with the assignments (top-k), not with E, on backends
          with a grouped kernel (GPU, TPU). XLA:CPU lowers it densely (E / k times the FLOPs).
  blocked each expert's region of slots padded to whole blocks of rows, and a loop over the blocks
          multiplying each by its own expert's weight, read in place, and skipping the all-padding
          blocks at the end: the FLOPs are the assignments' plus under one block per expert. A
          custom gradient loops the same way (see `_blockwise`). XLA:CPU runs these plain dots well.
  dense   every expert on every row, the right one kept by a one-hot contraction: E / k times the
          FLOPs; the simplest, kept as the reference for the others.
  auto    ragged on GPU and TPU, blocked on CPU (bench/moe.py measures all three).

An adapted expert weight is an ordinary `LoraWeight` whose roles are (batch, in, out): one node with
a [E, in, r] and b [E, r, out], PEFT's `target_parameters` convention of one A and B per expert. Its
low-rank path runs inside the same grouped matmul on the factors (each row meets its own expert's A
and B; blocked runs both paths in one loop): x A_e B_e, never W + BA. A quantized base is dequantized next to its matmul, as for Dense.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.lora import is_lora
from jlora.quant import dequantized

IMPLEMENTATIONS = ("auto", "ragged", "blocked", "dense")


@dataclasses.dataclass(frozen=True)
class Groups:
  """The top-k assignments laid out by expert, in `slots` rows.

  Expert e's assignments fill a contiguous region of slots that starts at a multiple of `block`
  (padded rows in between and after the last region hold zeros), so each block of rows belongs to
  one expert. block = 1 is the plain sort ragged_dot and dense use (no padding).

  slot [tokens * k]: the slot of each assignment (token-major, as `chosen` is flattened);
  source [slots]: the assignment each slot holds, tokens * k for padding; expert [slots]: the
  expert of each slot (padding: its region's, or the last expert past every region); weight
  [slots]: the routing weight, 0 for padding; sizes [E]: assignments per expert; k: assignments
  per token.
  """

  slot: jax.Array
  source: jax.Array
  expert: jax.Array
  weight: jax.Array
  sizes: jax.Array
  block: int
  k: int

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x [tokens, d] -> [slots, d]: each slot's token (zeros for padding)."""
    every = jnp.broadcast_to(x[:, None], (x.shape[0], self.k, x.shape[1])).reshape(-1, x.shape[1])
    return take_rows(every, self.source, self.slot)

  def combine(self, y: jax.Array) -> jax.Array:
    """y [slots, d] -> [tokens, d]: the sum of each token's k slots."""
    rows = take_rows(y, self.slot, self.source)
    return rows.reshape(-1, self.k, y.shape[1]).sum(1)


@jax.custom_vjp
def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """x[index] (rows; an index past the end gives zeros), where every row of x is taken exactly once
  and `inverse` says where (inverse[i]: the output row holding x[i], past the end if none).

  Its gradient is then the same gather the other way round: XLA:CPU runs gathers of rows far
  faster than the scatter-add jnp.take's gradient would be."""
  return x.at[index].get(mode="fill", fill_value=0)


def _take_rows_fwd(x, index, inverse):
  return take_rows(x, index, inverse), (index, inverse)


def _take_rows_bwd(indices, g):
  index, inverse = indices
  return take_rows(g, inverse, index), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def sort_by_expert(
  chosen: jax.Array, weights: jax.Array, num_experts: int, implementation: str = "auto"
) -> Groups:
  """chosen, weights: [tokens, k] expert ids and routing weights -> the slots for `implementation`
  (blocks of `block_rows` for blocked, the plain sort otherwise)."""
  flat = chosen.reshape(-1)
  n = flat.shape[0]
  block = block_rows(n, num_experts) if resolve(implementation) == "blocked" else 1
  order = jnp.argsort(flat, stable=True)  # sorted position -> assignment
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  padded = -(-sizes // block) * block
  region_ends = jnp.cumsum(padded)
  sorted_expert = flat[order]
  rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[sorted_expert]  # position within its expert
  sorted_slot = (region_ends - padded)[sorted_expert] + rank
  slots = num_slots(n, num_experts, block)
  source = jnp.full(slots, n, jnp.int32).at[sorted_slot].set(order.astype(jnp.int32))
  expert = jnp.searchsorted(region_ends, jnp.arange(slots), side="right")
  weight = weights.reshape(-1).at[source].get(mode="fill", fill_value=0)
  return Groups(
    slot=jnp.zeros(n, jnp.int32).at[order].set(sorted_slot.astype(jnp.int32)),
    source=source,
    expert=jnp.minimum(expert, num_experts - 1).astype(jnp.int32),
    weight=weight,
    sizes=sizes,
    block=block,
    k=chosen.shape[-1],
  )


def num_slots(n: int, num_experts: int, block: int) -> int:
  """Rows enough for n assignments with each expert's region padded to whole blocks (static)."""
  return -(-(n + num_experts * (block - 1)) // block) * block


def resolve(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"config.model.expert_matmul: {implementation!r} is not valid; expected one of "
      f"{', '.join(IMPLEMENTATIONS)}."
    )
  if implementation == "auto":
    return "blocked" if jax.default_backend() == "cpu" else "ragged"
  return implementation


def block_rows(n: int, num_experts: int) -> int:
  """Rows per block: about half an expert's mean share of the n rows (a power of two, 8 to 128),
  so the padding (under a block per expert) stays a fraction of the rows while each block's matmul
  is still large enough to run well."""
  share = max(1, n // (2 * num_experts))
  return int(min(128, max(8, 1 << (share - 1).bit_length())))


def blocked(fn, rows: tuple, weights: tuple, groups: Groups) -> jax.Array:
  """fn(row blocks..., weights of the block's expert...) on each block of rows: rows [slots, ...],
  weights [E, ...]. The blocks past the last expert's region (all padding) are skipped, so the
  FLOPs are the assignments' plus the padding, never E times them."""
  starts = jnp.arange(0, rows[0].shape[0], groups.block)
  in_use = starts < jnp.sum(-(-groups.sizes // groups.block) * groups.block)
  return _blockwise(fn, rows, weights, groups.expert[starts], in_use)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(fn, rows, weights, block_expert, in_use):
  """A loop over the blocks that reads each expert's weights in place: jnp.take of the weights per
  block (a batched matmul on a [blocks, in, out] copy) cost more than the matmuls it fed, and
  differentiating the loop would save that copy for the backward. The backward (below) is a loop
  too, reading the weights in place again."""

  def one(_, block):
    row_blocks, e, use = block
    w_e = tuple(w[e] for w in weights)
    out = jax.eval_shape(fn, *row_blocks, *w_e)
    zeros = lambda: jnp.zeros(out.shape, out.dtype)
    return None, jax.lax.cond(use, lambda: fn(*row_blocks, *w_e), zeros)

  _, out = jax.lax.scan(one, None, (_by_block(rows, block_expert), block_expert, in_use))
  return out.reshape(rows[0].shape[0], *out.shape[2:])


def _by_block(rows: tuple, block_expert) -> tuple:
  return tuple(r.reshape(block_expert.shape[0], -1, *r.shape[1:]) for r in rows)


def _blockwise_fwd(fn, rows, weights, block_expert, in_use):
  return _blockwise(fn, rows, weights, block_expert, in_use), (rows, weights, block_expert, in_use)


def _blockwise_bwd(fn, residuals, g):
  """Per block, fn's vjp: the rows' cotangents, and the weights' summed into their expert (a frozen
  weight's sum is unused and removed by dead-code elimination)."""
  rows, weights, block_expert, in_use = residuals

  def one(grads, block):
    row_blocks, g_block, e, use = block
    w_e = tuple(w[e] for w in weights)
    pull = lambda: jax.vjp(fn, *row_blocks, *w_e)[1](g_block)
    zeros = lambda: jax.tree.map(jnp.zeros_like, (*row_blocks, *w_e))
    d = jax.lax.cond(use, pull, zeros)
    grads = tuple(acc.at[e].add(dw) for acc, dw in zip(grads, d[len(rows) :]))
    return grads, d[: len(rows)]

  blocks = (_by_block(rows, block_expert), *_by_block((g,), block_expert), block_expert, in_use)
  dw, d_rows = jax.lax.scan(one, jax.tree.map(jnp.zeros_like, weights), blocks)
  d_rows = tuple(d.reshape(r.shape) for d, r in zip(d_rows, rows))
  return d_rows, dw, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _matmul(x, w):
  return x @ w.astype(x.dtype)


def _adapted_matmul(x, x_low, w, a, b_scaled):
  return x @ w.astype(x.dtype) + (x_low @ a.astype(x.dtype)) @ b_scaled.astype(x.dtype)


def grouped(x: jax.Array, w: jax.Array, groups: Groups, implementation: str) -> jax.Array:
  """Slot i of x [slots, in] times w[groups.expert[i]] ([E, in, out]) -> [slots, out]."""
  chosen = resolve(implementation)
  if chosen == "blocked":
    return blocked(_matmul, (x,), (w,), groups)
  if groups.block != 1:
    raise ValueError(f"{chosen} needs Groups sorted with block 1, not {groups.block}")
  if chosen == "ragged":
    return jax.lax.ragged_dot(x, w.astype(x.dtype), groups.sizes)
  one_hot = jax.nn.one_hot(groups.expert, w.shape[0], dtype=x.dtype)
  return jnp.einsum("ne,ni,eio->no", one_hot, x, w.astype(x.dtype))


def grouped_matmul(
  x: jax.Array, weight: Any, groups: Groups, implementation: str = "auto", x_low=None
) -> jax.Array:
  """`grouped(x, W)` for a plain, quantized or LoRA expert weight; LoRA adds the factored path
  scale * (x_low A_e) B_e, with x_low the adapter's (dropped-out) input, x by default. Blocked
  runs both paths in one loop over the blocks."""
  base = weight.base if is_lora(weight) else weight
  w = dequantized(base)
  if not is_lora(weight):
    return grouped(x, w, groups, implementation)
  x_low = x if x_low is None else x_low
  b_scaled = weight.b * weight.scale
  if resolve(implementation) == "blocked":
    return blocked(_adapted_matmul, (x, x_low), (w, weight.a, b_scaled), groups)
  low = grouped(x_low, weight.a, groups, implementation)
  return grouped(x, w, groups, implementation) + grouped(low, b_scaled, groups, implementation)


class GroupedDense(nn.Module):
  """The experts' counterpart of nn.Dense: a kernel [E, in, out] (and a bias [E, out]) applied to
  rows sorted by expert. `names` are the kernel's logical axes, "expert" first."""

  features: int
  num_experts: int
  names: tuple[str, str, str] = ("expert", "embed", "mlp")
  use_bias: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array, groups: Groups) -> jax.Array:
    shape = (self.num_experts, x.shape[-1], self.features)
    init = nn.with_logical_partitioning(self.kernel_init, self.names)
    if self.has_variable("params", "kernel"):  # may be a jlora node: read it without a shape check
      kernel = nn.meta.unbox(self.get_variable("params", "kernel"))
    else:
      kernel = self.param("kernel", init, shape, self.param_dtype)
    x = x.astype(self.dtype)
    y = grouped_matmul(x, kernel, groups, self.implementation, self._dropped(kernel, x))
    if self.use_bias:
      bias_init = nn.with_logical_partitioning(
        nn.initializers.zeros, (self.names[0], self.names[2])
      )
      bias = self.param("bias", bias_init, (self.num_experts, self.features), self.param_dtype)
      y = y + jnp.take(bias, groups.expert, axis=0).astype(y.dtype)
    return y.astype(self.dtype)

  def _dropped(self, kernel, x):
    """The adapter's input: x, with the node's dropout when a 'dropout' rng is passed."""
    rate = kernel.dropout if is_lora(kernel) else 0.0
    if not rate or not self.has_rng("dropout"):
      return None
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

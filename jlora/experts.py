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
  blocked each expert's region of slots padded to a small granule of rows; a loop over the experts
          (each one's weights sliced once) and within each over its region in chunks (as many
          large ones as fit, then at most one of each smaller size down to the granule), never
          visiting the padding after the last region: the FLOPs are the assignments' plus under
          one granule per expert, while most rows still go through large matmuls. An expert MLP (`grouped_mlp`) runs gate_up, the activation and down in one
          loop body, so a block's hidden rows stay in cache; a custom gradient loops the same way
          on the saved pre-activations (see `_chain`). XLA:CPU runs these plain dots well.
  dense   every expert on every row, the right one kept by a one-hot contraction: E / k times the
          FLOPs; the simplest, kept as the reference for the others.
  auto    ragged on GPU and TPU, blocked on CPU (bench/moe.py measures all three).

An adapted expert weight is an ordinary `LoraWeight` whose roles are (batch, in, out): one node with
a [E, in, r] and b [E, r, out], PEFT's `target_parameters` convention of one A and B per expert. Its
low-rank path runs inside the same grouped matmul on the factors (each row meets its own expert's A
and B; blocked runs both paths in one loop): x A_e B_e, never W + BA. A quantized base is
dequantized next to its matmul, as for Dense.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

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
  one expert. block = 1 is the plain sort ragged_dot and dense use (no padding). `chunks`: the row
  counts the blocked loop cuts a region into, largest first, each a multiple of the next and the
  last = block.

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
  chunks: tuple[int, ...] = (1,)

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
  (regions padded to the smallest of `chunk_rows` for blocked, the plain sort otherwise)."""
  flat = chosen.reshape(-1)
  n = flat.shape[0]
  chunks = chunk_rows(n, num_experts) if resolve(implementation) == "blocked" else (1,)
  block = chunks[-1]
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
    chunks=chunks,
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


def chunk_rows(n: int, num_experts: int) -> tuple[int, ...]:
  """The blocked loop's chunk sizes, powers of two: the largest about half an expert's mean share
  of the n rows (8 to 128), so most rows go through matmuls large enough to run well; then halves
  down to a quarter of it (at least 8), the granule each region is padded to, so the padding
  stays under a granule per expert."""
  share = max(1, n // (2 * num_experts))
  largest = int(min(128, max(8, 1 << (share - 1).bit_length())))
  sizes = [largest]
  while sizes[-1] > max(8, largest // 4):
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


class ExpertWeight(NamedTuple):
  """An expert weight as the grouped matmuls read it: w [E, in, out] (dequantized); when adapted,
  a [E, in, r] and b [E, r, out] already times the LoRA scale; bias [E, out] or None."""

  w: jax.Array
  a: jax.Array | None = None
  b: jax.Array | None = None
  bias: jax.Array | None = None


def expert_weight(weight: Any, bias: jax.Array | None = None) -> ExpertWeight:
  """A plain, quantized or LoRA expert kernel (and its bias) as an ExpertWeight."""
  if not is_lora(weight):
    return ExpertWeight(dequantized(weight), bias=bias)
  return ExpertWeight(dequantized(weight.base), weight.a, weight.b * weight.scale, bias)


def _apply(x: jax.Array, x_low: jax.Array, w: ExpertWeight) -> jax.Array:
  """One expert's weight on rows x (the adapter reads x_low, x with dropout)."""
  y = x @ w.w.astype(x.dtype)
  if w.a is not None:
    y = y + (x_low @ w.a.astype(x.dtype)) @ w.b.astype(x.dtype)
  return y if w.bias is None else y + w.bias.astype(y.dtype)


def blocked_chain(
  x: jax.Array, weights: tuple, groups: Groups, activate=None, masks: tuple | None = None
) -> jax.Array:
  """Rows x [slots, in] through the expert weights in turn (`activate` between two): each block of
  rows meets its own expert's weights, all the chain's in one loop body, so a block's hidden rows
  stay in cache. masks: per weight, the adapter's dropout mask on its input rows, or None."""
  rows = (-(-groups.sizes // groups.block) * groups.block).astype(jnp.int32)
  starts = jnp.cumsum(rows) - rows
  masks = masks or (None,) * len(weights)
  return _chain(activate, groups.chunks, x, tuple(masks), tuple(weights), starts, rows)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Needs:
  """Which inputs of `_chain` are differentiated (static, kept with the residuals)."""

  x: bool
  weights: tuple  # per weight, per leaf


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chain(activate, chunks, x, masks, weights, starts, rows):
  """Loop over the experts (reading each one's weights once), and within an expert over its region
  of rows in chunks (`_each_chunk`). The padding after the last expert's region is never visited,
  so the FLOPs are the assignments' plus under one granule per expert. Differentiating the loop
  would save every chunk's weights; the backward (below) loops the same way instead, on the
  pre-activations the forward saved, and makes weight gradients only for the weights that are
  trained."""
  return _chain_forward(activate, chunks, x, masks, weights, starts, rows)[0]


def _each_chunk(chunks: tuple[int, ...], start, rows, body, carry):
  """carry = body(start, size, carry) for the chunks that cut rows [start, start + rows): as many
  of the largest size as fit, then at most one of each smaller (rows is a multiple of the last)."""
  for size in chunks:
    count = rows // size
    step = lambda j, c, size=size, start=start: body(start + j * size, size, c)
    carry = jax.lax.fori_loop(0, count, step, carry)
    start, rows = start + count * size, rows - count * size
  return carry


def _rows(x, start, size):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size)


def _expert(tree, e):
  return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, e, keepdims=False), tree)


def _low(h, mask):
  return h if mask is None else h * mask


def _chain_forward(activate, chunks, x, masks, weights, starts, rows):
  out = jnp.zeros((x.shape[0], weights[-1].w.shape[-1]), x.dtype)
  saved = tuple(jnp.zeros((x.shape[0], w.w.shape[-1]), x.dtype) for w in weights[:-1])

  def per_expert(e, carry):
    ws = _expert(weights, e)

    def per_chunk(start, size, carry):
      out, saved = carry
      h = _rows(x, start, size)
      pre = []
      for i, w in enumerate(ws):
        if i:
          pre.append(h)
          h = activate(h)
        h = _apply(h, _low(h, _rows(masks[i], start, size)), w)
      saved = tuple(jax.lax.dynamic_update_slice_in_dim(s, p, start, 0) for s, p in zip(saved, pre))
      return jax.lax.dynamic_update_slice_in_dim(out, h, start, 0), saved

    return _each_chunk(chunks, starts[e], rows[e], per_chunk, carry)

  return jax.lax.fori_loop(0, starts.shape[0], per_expert, (out, saved))


def _chain_fwd(activate, chunks, x, masks, weights, starts, rows):
  needs = _Needs(
    x.perturbed, tuple(tuple(p.perturbed for p in jax.tree.leaves(w)) for w in weights)
  )
  value = lambda t: jax.tree.map(lambda p: p.value, t)
  x, masks, weights, starts, rows = map(value, (x, masks, weights, starts, rows))
  out, saved = _chain_forward(activate, chunks, x, masks, weights, starts, rows)
  return out, (needs, x, masks, weights, starts, rows, saved)


def _pull(fn, args: list, needs, g):
  """The cotangents of fn(*args) for the args whose need is True (None for the others)."""
  live = [i for i, n in enumerate(needs) if n]

  def of_live(*values):
    full = list(args)
    for i, v in zip(live, values):
      full[i] = v
    return fn(*full)

  grads = jax.vjp(of_live, *[args[i] for i in live])[1](g) if live else ()
  out = [None] * len(args)
  for i, d in zip(live, grads):
    out[i] = d
  return out


def _chain_bwd(activate, chunks, residuals, g):
  """Per chunk, last weight first: the pre-activation's (or the rows') cotangent, and the
  cotangents of the trained leaves, summed per expert and written once per expert."""
  needs, x, masks, weights, starts, rows, saved = residuals
  g = jnp.zeros(x.shape[:1] + weights[-1].w.shape[-1:], x.dtype) if _symbolic(g) else g
  trees = [jax.tree.structure(w) for w in weights]
  leaves = [jax.tree.leaves(w) for w in weights]
  acc = [[jnp.zeros_like(v) for v, n in zip(ls, ns) if n] for ls, ns in zip(leaves, needs.weights)]
  dx = jnp.zeros_like(x) if needs.x else None

  def per_expert(e, carry):
    dx, acc = carry
    ws = [_expert(ls, e) for ls in leaves]
    local = [[jnp.zeros_like(v[0]) for v in a] for a in acc]

    def per_chunk(start, size, carry):
      dx, local = carry
      cot = _rows(g, start, size)
      inputs = [_rows(x, start, size), *(_rows(s, start, size) for s in saved)]
      for i in reversed(range(len(ws))):
        mask = _rows(masks[i], start, size)

        def stage(h, *w_leaves, i=i, mask=mask):
          h = activate(h) if i else h
          return _apply(h, _low(h, mask), jax.tree.unflatten(trees[i], w_leaves))

        need_in = needs.x if i == 0 else True
        d = _pull(stage, [inputs[i], *ws[i]], (need_in, *needs.weights[i]), cot)
        local[i] = [s + v for s, v in zip(local[i], (v for v in d[1:] if v is not None))]
        cot = d[0]
      if dx is not None:
        dx = jax.lax.dynamic_update_slice_in_dim(dx, cot, start, 0)
      return dx, local

    dx, local = _each_chunk(chunks, starts[e], rows[e], per_chunk, (dx, local))
    acc = [
      [jax.lax.dynamic_update_index_in_dim(a, v, e, 0) for a, v in zip(ai, li)]
      for ai, li in zip(acc, local)
    ]
    return dx, acc

  dx, acc = jax.lax.fori_loop(0, starts.shape[0], per_expert, (dx, acc))
  dweights = []
  for tree, ns, a in zip(trees, needs.weights, acc):
    it = iter(a)
    dweights.append(jax.tree.unflatten(tree, [next(it) if n else None for n in ns]))
  return dx, None, tuple(dweights), None, None


def _symbolic(g) -> bool:
  return isinstance(g, jax.custom_derivatives.SymbolicZero)


_chain.defvjp(_chain_fwd, _chain_bwd, symbolic_zeros=True)


def grouped(x: jax.Array, w: jax.Array, groups: Groups, implementation: str) -> jax.Array:
  """Slot i of x [slots, in] times w[groups.expert[i]] ([E, in, out]) -> [slots, out]."""
  chosen = resolve(implementation)
  if chosen == "blocked":
    return blocked_chain(x, (ExpertWeight(w),), groups)
  if groups.block != 1:
    raise ValueError(f"{chosen} needs Groups sorted with block 1, not {groups.block}")
  if chosen == "ragged":
    return jax.lax.ragged_dot(x, w.astype(x.dtype), groups.sizes)
  one_hot = jax.nn.one_hot(groups.expert, w.shape[0], dtype=x.dtype)
  return jnp.einsum("ne,ni,eio->no", one_hot, x, w.astype(x.dtype))


def grouped_matmul(
  x: jax.Array,
  weight: Any,
  groups: Groups,
  implementation: str = "auto",
  mask: jax.Array | None = None,
  bias: jax.Array | None = None,
) -> jax.Array:
  """`grouped(x, W)` (+ the bias of each row's expert) for a plain, quantized or LoRA expert
  weight; LoRA adds the factored path scale * ((x * mask) A_e) B_e, mask being the adapter's
  dropout (none by default). Blocked runs both paths in one loop over the blocks."""
  if resolve(implementation) == "blocked":
    return blocked_chain(x, (expert_weight(weight, bias),), groups, masks=(mask,))
  w = expert_weight(weight)
  y = grouped(x, w.w, groups, implementation)
  if w.a is not None:
    low = grouped(_low(x, mask), w.a, groups, implementation)
    y = y + grouped(low, w.b, groups, implementation)
  return y if bias is None else y + jnp.take(bias, groups.expert, axis=0).astype(y.dtype)


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

  def __call__(self, x: jax.Array, groups: Groups) -> jax.Array:
    kernel, bias = self.parts(x.shape[-1])
    x = x.astype(self.dtype)
    y = grouped_matmul(x, kernel, groups, self.implementation, self.dropout_mask(x.shape), bias)
    return y.astype(self.dtype)

  @nn.compact
  def parts(self, in_features: int) -> tuple[Any, jax.Array | None]:
    """(kernel, bias or None): the kernel may be a jlora node (LoRA, quantized)."""
    shape = (self.num_experts, in_features, self.features)
    init = nn.with_logical_partitioning(self.kernel_init, self.names)
    if self.has_variable("params", "kernel"):  # may be a jlora node: read it without a shape check
      kernel = nn.meta.unbox(self.get_variable("params", "kernel"))
    else:
      kernel = self.param("kernel", init, shape, self.param_dtype)
    if not self.use_bias:
      return kernel, None
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, (self.names[0], self.names[2]))
    return kernel, self.param(
      "bias", bias_init, (self.num_experts, self.features), self.param_dtype
    )

  def dropout_mask(self, shape: tuple[int, ...]) -> jax.Array | None:
    """The adapter's dropout on its input rows (kept / (1 - rate), else 0), when its node has a
    rate and a 'dropout' rng is passed; None otherwise."""
    kernel = self.get_variable("params", "kernel")
    rate = kernel.dropout if is_lora(kernel) else 0.0
    if not rate or not self.has_rng("dropout"):
      return None
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(self.dtype)


def grouped_mlp(
  x: jax.Array, up: GroupedDense, down: GroupedDense, activate, groups: Groups
) -> jax.Array:
  """down(activate(up(x))) on rows sorted by expert. Blocked runs both weights in one loop body
  (`blocked_chain`); the other implementations call the two layers in turn."""
  if resolve(up.implementation) != "blocked":
    return down(activate(up(x, groups)), groups)
  up_kernel, up_bias = up.parts(x.shape[-1])
  x = x.astype(up.dtype)
  hidden = jax.eval_shape(activate, jax.ShapeDtypeStruct((1, up.features), x.dtype)).shape[-1]
  down_kernel, down_bias = down.parts(hidden)
  weights = (expert_weight(up_kernel, up_bias), expert_weight(down_kernel, down_bias))
  masks = (up.dropout_mask(x.shape), down.dropout_mask((x.shape[0], hidden)))
  return blocked_chain(x, weights, groups, activate, masks).astype(down.dtype)

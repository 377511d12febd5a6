"""Grouped expert matmuls: the forward of mixture-of-experts weights, plain, quantized or adapted.

The experts of an MoE layer are one weight with an expert axis, a kernel [E, in, out] (Flax's
[in, out] orientation per expert; the logical axis is named "expert"). A layer routes each token to
its top-k experts; the k * tokens assignments are sorted by expert (`sort_by_expert`), so each
expert's rows are contiguous, and one grouped matmul runs every expert on its own rows:

  ragged  `jax.lax.ragged_dot`: FLOPs scale with the assignments (top-k), not with E, on backends
          with a grouped kernel (GPU, TPU). XLA:CPU lowers it densely.
  blocked each expert's rows padded to a multiple of a block of rows, and each block multiplied by
          its own expert's weight (gathered per block): a batched matmul whose FLOPs are the
          assignments' plus at most one partial block per expert. Plain dots XLA:CPU runs well.
  dense   every expert on every row, the right one kept by a one-hot contraction: E / k times the
          FLOPs; the simplest, kept as the reference for the others.
  auto    ragged on GPU and TPU, blocked on CPU (bench/moe.py measures all three).

An adapted expert weight is an ordinary `LoraWeight` whose roles are (batch, in, out): one node with
a [E, in, r] and b [E, r, out], PEFT's `target_parameters` convention of one A and B per expert. Its
low-rank path runs inside the same grouped matmul on the factors (each row meets its own expert's A
and B): x A_e B_e, never W + BA. A quantized base is dequantized next to its matmul, as for Dense.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.lora import is_lora
from jlora.quant import dequantized

IMPLEMENTATIONS = ("auto", "ragged", "blocked", "dense")


@dataclasses.dataclass(frozen=True)
class Groups:
  """Top-k assignments sorted by expert.

  token [n]: the token of each sorted row; expert [n]: its expert; weight [n]: its routing weight;
  sizes [E]: rows per expert (the groups of ragged_dot). n = tokens * k.
  """

  token: jax.Array
  expert: jax.Array
  weight: jax.Array
  sizes: jax.Array


def sort_by_expert(chosen: jax.Array, weights: jax.Array, num_experts: int) -> Groups:
  """chosen, weights: [tokens, k] expert ids and routing weights -> the assignments by expert."""
  k = chosen.shape[-1]
  flat = chosen.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return Groups(
    token=order // k, expert=flat[order], weight=weights.reshape(-1)[order], sizes=sizes
  )


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
  """Rows per block: about an expert's mean share of the n rows (a power of two, 8 to 128), so the
  padding (at most one partial block per expert) stays a fraction of the rows."""
  share = max(1, n // num_experts)
  return int(min(128, max(8, 1 << (share - 1).bit_length())))


def blocked(x: jax.Array, w: jax.Array, groups: Groups) -> jax.Array:
  """`grouped` as a batched matmul over blocks of rows that each belong to one expert.

  Expert e's rows (contiguous, as sorted) move to a region padded to a multiple of the block size;
  there are at most n / block + E blocks, a static bound. Block j's expert is the one whose padded
  region holds row j * block; blocks past the last region hold zeros and change nothing.
  """
  n, num_experts = x.shape[0], w.shape[0]
  block = block_rows(n, num_experts)
  num_blocks = -(-(n + num_experts * (block - 1)) // block)
  padded = -(-groups.sizes // block) * block
  padded_ends = jnp.cumsum(padded)
  row_in_expert = jnp.arange(n) - (jnp.cumsum(groups.sizes) - groups.sizes)[groups.expert]
  slot = (padded_ends - padded)[groups.expert] + row_in_expert
  rows = jnp.zeros((num_blocks * block, x.shape[1]), x.dtype).at[slot].set(x)
  block_expert = jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block, side="right")
  weights = jnp.take(w, jnp.minimum(block_expert, num_experts - 1), axis=0).astype(x.dtype)
  out = jnp.einsum("bti,bio->bto", rows.reshape(num_blocks, block, -1), weights)
  return out.reshape(num_blocks * block, -1)[slot]


def grouped(x: jax.Array, w: jax.Array, groups: Groups, implementation: str) -> jax.Array:
  """Row i of x [n, in] times w[expert of row i] ([E, in, out]) -> [n, out]."""
  chosen = resolve(implementation)
  if chosen == "ragged":
    return jax.lax.ragged_dot(x, w.astype(x.dtype), groups.sizes)
  if chosen == "blocked":
    return blocked(x, w, groups)
  one_hot = jax.nn.one_hot(groups.expert, w.shape[0], dtype=x.dtype)
  return jnp.einsum("ne,ni,eio->no", one_hot, x, w.astype(x.dtype))


def grouped_matmul(
  x: jax.Array, weight: Any, groups: Groups, implementation: str = "auto", x_low=None
) -> jax.Array:
  """`grouped(x, W)` for a plain, quantized or LoRA expert weight; LoRA adds the factored path
  scale * (x_low A_e) B_e, with x_low the adapter's (dropped-out) input, x by default."""
  base = weight.base if is_lora(weight) else weight
  y = grouped(x, dequantized(base), groups, implementation)
  if not is_lora(weight):
    return y
  x_low = x if x_low is None else x_low
  low = grouped(x_low, weight.a, groups, implementation)
  return y + grouped(low, weight.b * weight.scale, groups, implementation).astype(y.dtype)


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

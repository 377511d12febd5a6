"""The forward of one adapted weight, given how its layer contracts: shared by linen and NNX.

A layer that uses a weight is described by one einsum `x_sub,k_sub->y_sub` between its
input and its weight (None for an embedding lookup). Whatever caught the call (linen's
method interceptor, NNX's scoped catch in `jlora.nnx_forward`) hands this module the
node, the input, that equation and a function running the layer on its base weight;
the output is

    y = layer(x; base) + scale * einsum(dropout(x), A, B)

so W + BA is never formed, and a quantized base is dequantized right next to its matmul,
in the forward and again in the backward (only the codes are kept between them).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import BATCH, IN, OUT
from jlora.lora import DoraWeight, factor_axes, is_lora, is_stacked, weight_norm
from jlora.quant import is_quantized
from jlora.tokens import is_token_rows, lookup_change, project_change

Equation = tuple[str, str, str]  # (x_sub, kernel_sub, y_sub); None for an embedding lookup


def fresh_letters(used: str, n: int) -> str:
  free = [c for c in string.ascii_letters if c not in used]
  return "".join(free[:n])


def parse_einsum(equation: str) -> tuple[list[str], str]:
  """(operand subscripts, output subscripts) of an explicit einsum string."""
  operands, _, y_sub = equation.replace(" ", "").partition("->")
  return operands.split(","), y_sub


def dot_general_equation(lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> Equation:
  """lax.dot_general(lhs, rhs, dimension_numbers) as einsum subscripts (lhs, rhs, out): the
  output is batch axes, then lhs's free axes, then rhs's free axes (dot_general's order)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = (
    tuple(tuple(int(a) % n for a in axes) for axes, n in zip(pair, (lhs_ndim, rhs_ndim)))
    for pair in dimension_numbers
  )
  letters = iter(string.ascii_letters)
  lhs = [next(letters) for _ in range(lhs_ndim)]
  shared = dict(zip(rhs_contract + rhs_batch, lhs_contract + lhs_batch))
  rhs = [lhs[shared[j]] if j in shared else next(letters) for j in range(rhs_ndim)]
  out = [lhs[i] for i in lhs_batch]
  out += [c for i, c in enumerate(lhs) if i not in lhs_contract + lhs_batch]
  out += [c for j, c in enumerate(rhs) if j not in shared]
  return "".join(lhs), "".join(rhs), "".join(out)


def dense_general_equation(x_ndim: int, axis, batch_dims, n_features: int) -> Equation:
  """A DenseGeneral / LinearGeneral layer: kernel = batch axes + contracted input axes +
  features, contracted with x by dot_general."""
  as_tuple = lambda axes: tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
  axis, batch_dims = as_tuple(axis), as_tuple(batch_dims)
  n_batch, n_axis = len(batch_dims), len(axis)
  contract = tuple(range(n_batch, n_batch + n_axis))
  numbers = ((axis, contract), (batch_dims, tuple(range(n_batch))))
  return dot_general_equation(x_ndim, n_batch + n_axis + n_features, numbers)


def roles_from_equation(x_sub: str, k_sub: str, y_sub: str) -> tuple[str, ...]:
  roles = []
  for c in k_sub:
    in_x, in_y = c in x_sub, c in y_sub
    if in_x and in_y:
      roles.append(BATCH)
    elif in_x:
      roles.append(IN)
    elif in_y:
      roles.append(OUT)
    else:
      raise ValueError(
        f"Kernel axis {c!r} of einsum {x_sub},{k_sub}->{y_sub} is summed out; jlora can't adapt it."
      )
  return tuple(roles)


def check_roles(where: str, node, equation: Equation) -> None:
  expected = roles_from_equation(*equation)
  if expected != node.roles:
    raise ValueError(
      f"The adapter at {where} was built for kernel roles {node.roles}, but the layer "
      f"contracts as {','.join(equation[:2])}->{equation[2]} (roles {expected}). Rebuild "
      "it with layout=jlora.trace_layout(model, ...)."
    )


def dropped(node, x, key) -> jax.Array:
  """The input of the adapter path: x with the node's dropout when `key` is given, else x."""
  if key is None or not node.dropout > 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - node.dropout, x.shape)
  return jnp.where(keep, x / (1.0 - node.dropout), 0).astype(x.dtype)


def _per_row(x_sub: str, used: str, y_sub: str) -> tuple[str, str, str]:
  """(row letter, x_sub, y_sub) with x's first (batch) axis named: each row picks its adapter."""
  if x_sub.startswith("..."):
    row = fresh_letters(x_sub + used + y_sub, 1)
    return row, row + x_sub, row + y_sub
  row = x_sub[0]
  if row not in y_sub or row in used:
    raise ValueError(
      f"Per-row adapters need the layer's first input axis to be the batch; the layer contracts "
      f"as {x_sub},{used}->{y_sub}."
    )
  return row, x_sub, y_sub


def low_rank(node, x, equation: Equation | None, adapter_ids=None) -> jax.Array:
  """scale * x A B as two contractions, input first (the only activation-sized temporary is
  [..., rank]); with stacked adapters each row of the batch gathers its own A and B."""
  stacked = is_stacked(node)
  if stacked and equation is not None and _reads_whole_stack(node, x, equation):
    return _every_adapter(node, x, equation, adapter_ids)
  if stacked:
    a, b = node.rows(adapter_ids)  # [batch, ...] each, the scale (0 for base rows) on b
  else:
    a, b = node.a, node.b
  if equation is None:  # embedding lookup: the rows of A are the token's low-rank code
    if stacked:
      return jnp.einsum("z...r,zrf->z...f", node.lookup(adapter_ids, x), b)
    return jnp.einsum("...r,rf->...f", jnp.take(a, x, axis=0) * node.scale, b)
  x_sub, k_sub, y_sub = equation
  rank = fresh_letters(x_sub + k_sub + y_sub, 1)
  (first, first_sub), (second, second_sub) = _first_and_second(node, x_sub, k_sub, rank, a, b)
  if stacked:
    row, x_sub, y_sub = _per_row(x_sub, k_sub + rank, y_sub)
    first_sub, second_sub = row + first_sub, row + second_sub
  mid_sub = "".join(c for c in x_sub if c not in first_sub or c in y_sub) + rank
  low = jnp.einsum(f"{x_sub},{first_sub}->{mid_sub}", x, first)
  if not stacked:
    # The scale goes on the [..., rank] activation: a scaled copy of a factor would be a
    # temporary kept alive from the forward to the backward, one per adapted weight.
    low = low * jnp.asarray(node.scale, low.dtype)
  return jnp.einsum(f"{mid_sub},{second_sub}->{y_sub}", low, second)


def _first_and_second(node, x_sub: str, k_sub: str, rank: str, a, b):
  """((first, its subscripts), (second, ...)): x meets the factor it shares axes with, A for a
  matmul, B for an embedding's attend."""
  a_sub, b_sub = ("".join(s) for s in factor_axes(k_sub, node.roles, rank))
  if not set(a_sub) & set(x_sub):
    return (b, b_sub), (a, a_sub)
  return (a, a_sub), (b, b_sub)


def _reads_whole_stack(node, x, equation: Equation) -> bool:
  """Whether every adapter on every token costs less than a copy of the factors per row: when
  the adapters times the tokens per row are at most the rows (a decode step's batch)."""
  x_sub, _, y_sub = equation
  letters = x_sub.replace("...", "")
  dims = x.shape[x.ndim - len(letters) :]
  contracted = math.prod(d for c, d in zip(letters, dims) if c not in y_sub)
  tokens_per_row = x.size // max(x.shape[0] * contracted, 1)
  return node.a.shape[0] * tokens_per_row <= x.shape[0]


def _every_adapter(node, x, equation: Equation, adapter_ids) -> jax.Array:
  """low_rank of a stacked node with fewer adapters than rows: x meets every adapter's factors
  and each row keeps its own adapter's result (a one-hot weight carrying its scale), so the
  stack is read once instead of gathered into a copy per row (a decode step's batch)."""
  x_sub, k_sub, y_sub = equation
  rank, which = fresh_letters(x_sub + k_sub + y_sub, 2)
  row, x_sub, y_sub = _per_row(x_sub, k_sub + rank + which, y_sub)
  (first, first_sub), (second, second_sub) = _first_and_second(
    node, x_sub, k_sub, rank, node.a, node.b
  )
  pick = node.row_weights(adapter_ids).astype(x.dtype)
  mid_sub = "".join(c for c in x_sub if c not in first_sub or c in y_sub) + which + rank
  low = jnp.einsum(f"{x_sub},{which}{first_sub}->{mid_sub}", x, first)
  low = jnp.einsum(f"{mid_sub},{row}{which}->{mid_sub}", low, pick)
  return jnp.einsum(f"{mid_sub},{which}{second_sub}->{y_sub}", low, second)


def _per_output(y, g, equation: Equation, roles) -> jax.Array:
  """y * g, with g laid out like the kernel's non-"in" axes (a DoRA magnitude ratio or bias)."""
  _, k_sub, y_sub = equation
  g_sub = "".join(c for c, r in zip(k_sub, roles) if r != IN)
  return jnp.einsum(f"{y_sub},{g_sub}->{y_sub}", y, g.astype(y.dtype))


def dora_output(node, y, y_dropped, lora, equation: Equation, bias, where: str) -> jax.Array:
  """PEFT's DoRA: y + (g - 1) * (base(x') - bias) + g * lora(x'), g = m / ||W + s*A@B||.

  x' is the dropped-out input when dropout is active (then base(x') is a second base
  matmul, as in PEFT), else x itself and base(x') is y. Without dropout this is
  g * (x W + s x A B) + bias. The norm is a constant of the backward (lora.weight_norm).
  """
  g = node.magnitude / weight_norm(node)
  out = y + _per_output(y_dropped, g - 1, equation, node.roles)
  out = out + _per_output(lora, g, equation, node.roles)
  if bias is not None:
    if tuple(bias.shape) != tuple(g.shape):
      raise ValueError(
        f"DoRA at {where}: the bias {tuple(bias.shape)} is not laid out like the "
        f"layer's outputs {tuple(g.shape)}; DoRA needs a per-output bias or none."
      )
    out = out - _per_output(jnp.ones_like(y), (g - 1) * bias, equation, node.roles)
  return out


def _zero_cotangent(leaf):
  if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
    return jnp.zeros_like(leaf)
  return np.zeros(jnp.shape(leaf), jax.dtypes.float0)


def _after(base, dy):
  """`base` made to depend on `dy` (each leaf + 0 * one element of dy): the same values (XLA
  doesn't fold a float times 0: it could be NaN), computable only once dy exists. An optimization
  barrier says the same to XLA, but the CPU backend removes barriers before it schedules."""
  zero = jnp.ravel(dy)[0] * 0
  return jax.tree.map(lambda leaf: leaf + zero.astype(leaf.dtype), base)


def dequantized_in_backward(base_layer: Callable, base, x) -> Callable:
  """base_layer(base, x) for a quantized base whose backward dequantizes it again, late.

  Only the 4-bit codes are kept from the forward, never a full-precision weight. The backward's
  dequantization reads the output's cotangent (see _after), so XLA can't schedule it early: with
  jax.checkpoint alone it may (the codes are there from the start), and in an unrolled layer
  stack (an NNX list of layers) it dequantized every layer's weight before the loss and kept
  them all alive through the peak. The base gets a zero cotangent (it is
  frozen); the layer's other inputs (closed-over biases, x) get their true ones.
  """
  run, consts = jax.closure_convert(base_layer, base, x)

  @jax.custom_vjp
  def layer(consts, base, x):
    return run(base, x, *consts)

  def forward(consts, base, x):
    return run(base, x, *consts), (consts, base, x)

  def backward(saved, dy):
    consts, base, x = saved
    base = _after(base, dy)
    _, vjp = jax.vjp(lambda consts, x: run(base, x, *consts), consts, x)
    d_consts, dx = vjp(dy)
    return d_consts, jax.tree.map(_zero_cotangent, base), dx

  layer.defvjp(forward, backward)
  return lambda base, x: layer(consts, base, x)


def adapted_output(
  weight,
  base_layer: Callable,
  x,
  equation: Equation | None,
  *,
  where: str,
  bias=None,
  adapter_ids=None,
  dropout_key=None,
  low=None,
  embedding: bool = False,
) -> jax.Array:
  """The output of a layer whose weight is a jlora node.

  base_layer(base, x) runs the layer on its base weight (`base` as stored, maybe quantized:
  base_layer dequantizes it). `equation` is how the layer contracts x with its weight (None
  for an embedding lookup). An `embedding`'s roles (rows in, features out) are not those of
  its attend's contraction, so they are not checked against it. `low`, when
  given, is x @ A computed already (jlora.intercept's shared-input siblings).
  """
  base = weight.base if is_lora(weight) or is_token_rows(weight) else weight
  # The base is never trained: a step that differentiates the whole tree (nnx.Optimizer over
  # the model's Params, jlora.optimizer on unsplit params) then gets zeros, not x^T dy, for it.
  base = jax.lax.stop_gradient(base)
  if is_quantized(base):
    base_layer = dequantized_in_backward(base_layer, base, x)
  y = base_layer(base, x)
  if is_token_rows(weight):  # trainable tokens: a lookup gains the rows' change, attend its columns
    if equation is None:
      return y + lookup_change(weight, x).astype(y.dtype)
    return project_change(weight, x, y)
  if not is_lora(weight):
    return y
  x_low = dropped(weight, x, dropout_key)
  if low is not None:
    lora = jnp.einsum("...r,ro->...o", low * jnp.asarray(weight.scale, low.dtype), weight.b)
  else:
    if equation is not None and not embedding:
      check_roles(where, weight, equation)
    lora = low_rank(weight, x_low, equation, adapter_ids)
  if isinstance(weight, DoraWeight):
    y_dropped = y if x_low is x else base_layer(base, x_low)
    return dora_output(weight, y, y_dropped, lora, equation, bias, where).astype(y.dtype)
  return y + lora.astype(y.dtype)

"""The forward of adapted weights: a linen method interceptor, and the layout trace.

`wrap(model.apply)` runs the model with a method interceptor installed. When an
nn.Dense / nn.DenseGeneral / nn.Einsum / nn.Embed finds one of jlora's nodes where
its weight should be, the interceptor runs the stock layer on the (dequantized) base
weight and adds the low-rank path

    y = layer(x; base) + scale * einsum(dropout(x), A, B)

so W + BA is never formed, and the base is dequantized right next to its matmul
(inside nn.scan, one layer at a time). Each layer is described by one einsum
x_sub,k_sub->y_sub between its input and its kernel; the low-rank path is the same
contraction with the kernel replaced by the pair (A, B).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jlora.config import BATCH, EMBEDDING, IN, KERNEL, OUT, is_node
from jlora.experts import GroupedDense
from jlora.lora import DoraWeight, factor_axes, is_lora, weight_norm
from jlora.multi import check_adapter_ids, is_stacked
from jlora.quant import dequantized, is_quantized
from jlora.tokens import is_token_rows, lookup_change, project_change

LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed)
# Sibling nn.Dense layers that usually read one input (HF names). When they do (the very same
# array), their A factors meet it as one wider matmul: one pass over x instead of three, forward
# and backward. Nothing else changes: the params keep one node per layer.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _weight_name(module) -> str:
  return EMBEDDING if isinstance(module, nn.Embed) else KERNEL


def _fresh_letters(used: str, n: int) -> str:
  free = [c for c in string.ascii_letters if c not in used]
  return "".join(free[:n])


def _layer_equation(module, method: str, x: jax.Array, call_kwargs) -> tuple[str, str, str] | None:
  """(x_sub, kernel_sub, y_sub) of the layer's contraction; None for an embedding lookup."""
  if isinstance(module, nn.Embed):
    return ("...f", "vf", "...v") if method == "attend" else None
  if isinstance(module, nn.Dense):
    return "...i", "io", "...o"
  if isinstance(module, nn.Einsum):
    equation = call_kwargs.get("einsum_str") or module.einsum_str
    operands, y_sub = equation.replace(" ", "").split("->")
    x_sub, k_sub = operands.split(",")
    return x_sub, k_sub, y_sub
  # nn.DenseGeneral: kernel = batch_shape + contracted input shape + features; its
  # dot_general output is (batch dims, remaining input dims, features).
  ndim = x.ndim
  norm = lambda axes: tuple(
    a % ndim for a in (axes if isinstance(axes, (tuple, list)) else (axes,))
  )
  axis, batch_dims = norm(module.axis), norm(module.batch_dims)
  n_features = len(module.features) if isinstance(module.features, (tuple, list)) else 1
  letters = iter(string.ascii_letters)
  x_letters = [next(letters) for _ in range(ndim)]
  out_letters = "".join(next(letters) for _ in range(n_features))
  k_sub = (
    "".join(x_letters[i] for i in batch_dims) + "".join(x_letters[i] for i in axis) + out_letters
  )
  free = "".join(x_letters[i] for i in range(ndim) if i not in axis and i not in batch_dims)
  y_sub = "".join(x_letters[i] for i in batch_dims) + free + out_letters
  return "".join(x_letters), k_sub, y_sub


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


def _layer_roles(module, method, x, call_kwargs) -> tuple[str, ...]:
  if isinstance(module, nn.Embed):
    return IN, OUT  # rows are looked up (the input side), columns are features
  return roles_from_equation(*_layer_equation(module, method, x, call_kwargs))


def _dropped(module, node, x, dropout_on: bool) -> jax.Array:
  """The input of the adapter path: x with the node's dropout when training, else x itself."""
  if not (dropout_on and node.dropout > 0):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - node.dropout, x.shape)
  return jnp.where(keep, x / (1.0 - node.dropout), 0).astype(x.dtype)


def _check_roles(module, node, equation) -> None:
  if equation is None or isinstance(module, nn.Embed):
    return
  expected = roles_from_equation(*equation)
  if expected != node.roles:
    raise ValueError(
      f"The adapter at {'/'.join(module.path)} was built for kernel roles {node.roles}, but the "
      f"layer contracts as {','.join(equation[:2])}->{equation[2]} (roles {expected}). Rebuild "
      "it with layout=jlora.trace_layout(model, ...)."
    )


def _per_row(x_sub: str, used: str, y_sub: str) -> tuple[str, str, str]:
  """(row letter, x_sub, y_sub) with x's first (batch) axis named: each row picks its adapter."""
  if x_sub.startswith("..."):
    row = _fresh_letters(x_sub + used + y_sub, 1)
    return row, row + x_sub, row + y_sub
  row = x_sub[0]
  if row not in y_sub or row in used:
    raise ValueError(
      f"Per-row adapters need the layer's first input axis to be the batch; the layer contracts "
      f"as {x_sub},{used}->{y_sub}."
    )
  return row, x_sub, y_sub


def _low_rank(module, method: str, node, x, call_kwargs, adapter_ids=None) -> jax.Array:
  """scale * x A B as two contractions, input first (the only activation-sized temporary is
  [..., rank]); with stacked adapters each row of the batch gathers its own A and B."""
  equation = _layer_equation(module, method, x, call_kwargs)
  _check_roles(module, node, equation)
  stacked = is_stacked(node)
  if stacked:
    a, b = node.rows(adapter_ids)  # [batch, ...] each, the scale (0 for base rows) on b
  else:
    a, b = node.a, node.b * node.scale  # the scale goes on a factor, never on activations
  if equation is None:  # embedding lookup: the rows of A are the token's low-rank code
    if stacked:
      return jnp.einsum("z...r,zrf->z...f", node.lookup(adapter_ids, x), b)
    return jnp.einsum("...r,rf->...f", jnp.take(a, x, axis=0), b)
  x_sub, k_sub, y_sub = equation
  rank = _fresh_letters(x_sub + k_sub + y_sub, 1)
  a_sub, b_sub = ("".join(s) for s in factor_axes(k_sub, node.roles, rank))
  # x meets the factor it shares axes with: A for a matmul, B for Embed.attend.
  (first, first_sub), (second, second_sub) = (a, a_sub), (b, b_sub)
  if not set(first_sub) & set(x_sub):
    (first, first_sub), (second, second_sub) = (second, second_sub), (first, first_sub)
  if stacked:
    row, x_sub, y_sub = _per_row(x_sub, k_sub + rank, y_sub)
    first_sub, second_sub = row + first_sub, row + second_sub
  mid_sub = "".join(c for c in x_sub if c not in first_sub or c in y_sub) + rank
  low = jnp.einsum(f"{x_sub},{first_sub}->{mid_sub}", x, first)
  return jnp.einsum(f"{mid_sub},{second_sub}->{y_sub}", low, second)


def _per_output(y, g, module, method, x, call_kwargs, roles):
  """y * g, with g laid out like the kernel's non-"in" axes (a DoRA magnitude ratio or bias)."""
  x_sub, k_sub, y_sub = _layer_equation(module, method, x, call_kwargs)
  g_sub = "".join(c for c, r in zip(k_sub, roles) if r != IN)
  return jnp.einsum(f"{y_sub},{g_sub}->{y_sub}", y, g.astype(y.dtype))


def _dora_output(module, method, node, y, y_dropped, lora, x, call_kwargs):
  """PEFT's DoRA: y + (g - 1) * (base(x') - bias) + g * lora(x'), g = m / ||W + s*A@B||.

  x' is the dropped-out input when dropout is active (then base(x') is a second base
  matmul, as in PEFT), else x itself and base(x') is y. Without dropout this is
  g * (x W + s x A B) + bias. The norm is a constant of the backward (lora.weight_norm).
  """
  g = node.magnitude / weight_norm(node)
  per_output = functools.partial(
    _per_output, module=module, method=method, x=x, call_kwargs=call_kwargs, roles=node.roles
  )
  out = y + per_output(y_dropped, g - 1) + per_output(lora, g)
  bias = module.variables.get("params", {}).get("bias")
  if bias is not None:
    if tuple(bias.shape) != tuple(g.shape):
      raise ValueError(
        f"DoRA at {'/'.join(module.path)}: the bias {tuple(bias.shape)} is not laid out like the "
        f"layer's outputs {tuple(g.shape)}; DoRA needs a per-output bias or none."
      )
    out = out - per_output(jnp.ones_like(y), (g - 1) * bias)
  return out


class _SharedInputs:
  """x @ concat(A_1, ..., A_n) for the LoRA siblings (SHARED_INPUT_GROUPS) of a layer.

  The first sibling called computes every sibling's [..., r] product and keeps the others'; a
  sibling uses a kept product only when it is called with the very same array (identity), so a
  model whose siblings read different inputs stays correct (it just computes some columns twice).
  """

  def __init__(self):
    self.kept: dict[tuple[int, str], tuple[jax.Array, jax.Array]] = {}

  def low(self, module, node, x, dropout_on: bool) -> jax.Array | None:
    """x @ A for `module` ([..., r]), or None when the layer is not part of a fusable group."""
    group = next((g for g in SHARED_INPUT_GROUPS if module.name in g), None)
    if group is None or not isinstance(module, nn.Dense) or not _fusable(node, dropout_on):
      return None
    key = (id(module.parent), module.name)
    kept = self.kept.pop(key, None)
    if kept is not None and kept[0] is x:
      return kept[1]
    parent_params = module.parent.variables.get("params", {})
    siblings = [module.name] + [
      name
      for name in group
      if name != module.name
      and _fusable(parent_params.get(name, {}).get(KERNEL), dropout_on)
      and parent_params[name][KERNEL].a.shape[:-1] == node.a.shape[:-1]
    ]
    if len(siblings) == 1:
      return None
    factors = [node.a] + [parent_params[name][KERNEL].a for name in siblings[1:]]
    low = jnp.einsum("...i,ir->...r", x, jnp.concatenate(factors, axis=-1))
    parts = jnp.split(low, np.cumsum([a.shape[-1] for a in factors])[:-1], axis=-1)
    for name, part in zip(siblings[1:], parts[1:]):
      self.kept[(id(module.parent), name)] = (x, part)
    return parts[0]


def _fusable(node, dropout_on: bool) -> bool:
  return (
    is_lora(node)
    and not is_stacked(node)
    and node.roles == (IN, OUT)
    and node.a.ndim == 2
    and not (dropout_on and node.dropout > 0)  # each layer draws its own dropout mask
  )


def _interceptor(dropout_on: bool, adapter_ids=None):
  shared = _SharedInputs()

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, LAYERS):
      return next_fun(*args, **kwargs)
    params = module.variables.get("params", {})
    weight = params.get(_weight_name(module))
    if not is_node(weight):
      return next_fun(*args, **kwargs)
    if context.method_name == "setup":
      # nn.Embed creates its param in setup; the node is consumed below instead.
      return None
    plain = module.clone(parent=None)

    def base_layer(base, *args):
      return plain.apply(
        {"params": {**params, _weight_name(module): dequantized(base)}},
        *args,
        method=context.method_name,
        **kwargs,
      )

    base = weight.base if is_lora(weight) or is_token_rows(weight) else weight
    if is_quantized(base):
      # Rematerialised, so the backward re-dequantizes instead of keeping every layer's
      # full-precision weight alive from the forward: only the 4-bit codes are stored.
      base_layer = jax.checkpoint(base_layer)
    y = base_layer(base, *args)
    if is_token_rows(weight):
      if isinstance(module, nn.Embed) and context.method_name == "__call__":
        return y + lookup_change(weight, args[0]).astype(y.dtype)
      return project_change(weight, args[0], y)
    if not is_lora(weight):
      return y
    method, x = context.method_name, args[0]
    x_low = _dropped(module, weight, x, dropout_on)
    low = shared.low(module, weight, x, dropout_on) if method == "__call__" else None
    if low is not None:
      lora = jnp.einsum("...r,ro->...o", low, weight.b * weight.scale)
    else:
      lora = _low_rank(module, method, weight, x_low, kwargs, adapter_ids)
    if isinstance(weight, DoraWeight):
      y_dropped = y if x_low is x else base_layer(base, x_low, *args[1:])
      return _dora_output(module, method, weight, y, y_dropped, lora, x, kwargs).astype(y.dtype)
    return y + lora.astype(y.dtype)

  return intercept


def wrap(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Returns `apply_fn` with the same signature, able to run params that hold jlora nodes.

  Adapter dropout is active when a 'dropout' rng is passed (`rngs={'dropout': key}`)
  and the call does not say `deterministic=True` (or `train=False`).

  Params from `jlora.stack_adapters` need `adapter_ids=` ([batch] ints): row i of the batch
  uses adapter ids[i] (its index in stack_adapters' dict, see jlora.adapter_ids), -1 the
  base model alone.
  """

  @functools.wraps(apply_fn)
  def wrapped(variables, *args, adapter_ids=None, **kwargs):
    if adapter_ids is not None:
      adapter_ids = check_adapter_ids(variables, adapter_ids)
    rngs = kwargs.get("rngs") or {}
    dropout_on = (
      "dropout" in rngs
      and kwargs.get("deterministic") is not True
      and kwargs.get("train") is not False
    )
    with nn.intercept_methods(_interceptor(dropout_on, adapter_ids)):
      return apply_fn(variables, *args, **kwargs)

  return wrapped


def trace_layout(model: nn.Module, *args, method=None, **kwargs) -> dict[str, tuple[str, ...]]:
  """Roles of every Dense/DenseGeneral/Einsum/Embed weight, by module path.

  Traces `model.init` abstractly (jax.eval_shape: no FLOPs, no memory) on example
  inputs and records how each layer contracts its input with its weight.
  Pass the result as `jlora.apply(..., layout=...)` or `jlora.quantize(..., layout=...)`.
  """
  layout: dict[str, tuple[str, ...]] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, GroupedDense) and context.method_name == "__call__":
      layout["/".join(module.path)] = (BATCH, IN, OUT)  # [E, in, out]: the expert axis is a batch
    elif isinstance(module, LAYERS) and context.method_name in ("__call__", "attend") and call_args:
      layout["/".join(module.path)] = _layer_roles(
        module, context.method_name, call_args[0], call_kwargs
      )
    return next_fun(*call_args, **call_kwargs)

  key = jax.random.key(0)
  init = functools.partial(model.init, method=method) if method is not None else model.init
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: init({"params": key, "dropout": key}, *args, **kwargs))
  return layout

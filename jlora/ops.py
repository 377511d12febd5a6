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
from flax import linen as nn

from jlora.config import BATCH, EMBEDDING, IN, KERNEL, OUT
from jlora.lora import factor_axes, is_lora
from jlora.quant import dequantized, is_quantized

LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed)


def _weight_name(module) -> str:
  return EMBEDDING if isinstance(module, nn.Embed) else KERNEL


def _is_node(x) -> bool:
  return getattr(x, "is_jlora_node", False)


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


def _low_rank(module, method: str, node, x, call_kwargs, dropout_on: bool) -> jax.Array:
  equation = _layer_equation(module, method, x, call_kwargs)
  a, b = node.a, node.b * node.scale  # the scale goes on a factor, never on activations
  if equation is None:  # embedding lookup: the rows of A are the token's low-rank code
    return jnp.einsum("...r,rf->...f", jnp.take(a, x, axis=0), b)
  x_sub, k_sub, y_sub = equation
  if not isinstance(module, nn.Embed):
    expected = roles_from_equation(x_sub, k_sub, y_sub)
    if expected != node.roles:
      raise ValueError(
        f"The adapter at {'/'.join(module.path)} was built for kernel roles {node.roles}, but the "
        f"layer contracts as {x_sub},{k_sub}->{y_sub} (roles {expected}). Rebuild it with "
        "layout=jlora.trace_layout(model, ...)."
      )
  rank = _fresh_letters(x_sub + k_sub + y_sub, 1)
  a_sub, b_sub = ("".join(s) for s in factor_axes(k_sub, node.roles, rank))
  if dropout_on and node.dropout > 0:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - node.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - node.dropout), 0).astype(x.dtype)
  # Two contractions, input first, so the only activation-sized intermediate is [..., rank].
  # x meets the factor it shares axes with: A for a matmul, B for Embed.attend.
  (first, first_sub), (second, second_sub) = (a, a_sub), (b, b_sub)
  if not set(first_sub) & set(x_sub):
    (first, first_sub), (second, second_sub) = (second, second_sub), (first, first_sub)
  mid_sub = "".join(c for c in x_sub if c not in first_sub or c in y_sub) + rank
  low = jnp.einsum(f"{x_sub},{first_sub}->{mid_sub}", x, first)
  return jnp.einsum(f"{mid_sub},{second_sub}->{y_sub}", low, second)


def _interceptor(dropout_on: bool):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, LAYERS):
      return next_fun(*args, **kwargs)
    params = module.variables.get("params", {})
    weight = params.get(_weight_name(module))
    if not _is_node(weight):
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

    base = weight.base if is_lora(weight) else weight
    if is_quantized(base):
      # Rematerialised, so the backward re-dequantizes instead of keeping every layer's
      # full-precision weight alive from the forward: only the 4-bit codes are stored.
      base_layer = jax.checkpoint(base_layer)
    y = base_layer(base, *args)
    if not is_lora(weight):
      return y
    lora = _low_rank(module, context.method_name, weight, args[0], kwargs, dropout_on)
    return y + lora.astype(y.dtype)

  return intercept


def wrap(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Returns `apply_fn` with the same signature, able to run params that hold jlora nodes.

  Adapter dropout is active when a 'dropout' rng is passed (`rngs={'dropout': key}`)
  and the call does not say `deterministic=True` (or `train=False`).
  """

  @functools.wraps(apply_fn)
  def wrapped(variables, *args, **kwargs):
    rngs = kwargs.get("rngs") or {}
    dropout_on = (
      "dropout" in rngs
      and kwargs.get("deterministic") is not True
      and kwargs.get("train") is not False
    )
    with nn.intercept_methods(_interceptor(dropout_on)):
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
    if isinstance(module, LAYERS) and context.method_name in ("__call__", "attend") and call_args:
      layout["/".join(module.path)] = _layer_roles(
        module, context.method_name, call_args[0], call_kwargs
      )
    return next_fun(*call_args, **call_kwargs)

  key = jax.random.key(0)
  init = functools.partial(model.init, method=method) if method is not None else model.init
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: init({"params": key, "dropout": key}, *args, **kwargs))
  return layout

"""How a linen layer's call is caught: a method interceptor, and the layout trace.

`wrap(model.apply)` runs the model with a method interceptor installed. When an
nn.Dense / nn.DenseGeneral / nn.Einsum / nn.Embed finds one of jlora's nodes where
its weight should be, the interceptor describes the layer by one einsum
x_sub,k_sub->y_sub between its input and its kernel, and `jlora.lowrank` runs the stock
layer on the (dequantized) base weight plus the low-rank path (inside nn.scan, one
layer at a time). The NNX side of this seam is `jlora.nnx_forward`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jlora import lowrank, nnx_forward
from jlora.boxes import EMBEDDING, KERNEL
from jlora.config import BATCH, IN, OUT, is_node
from jlora.experts import GroupedDense
from jlora.lora import is_lora, is_stacked
from jlora.multi import check_adapter_ids
from jlora.quant import dequantized

LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed)
# Sibling nn.Dense layers that usually read one input (HF names). When they do (the very same
# array), their A factors meet it as one wider matmul: one pass over x instead of three, forward
# and backward. Nothing else changes: the params keep one node per layer.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _weight_name(module) -> str:
  return EMBEDDING if isinstance(module, nn.Embed) else KERNEL


def _layer_equation(module, method: str, x: jax.Array, call_kwargs) -> tuple[str, str, str] | None:
  """(x_sub, kernel_sub, y_sub) of the layer's contraction; None for an embedding lookup."""
  if isinstance(module, nn.Embed):
    return ("...f", "vf", "...v") if method == "attend" else None
  if isinstance(module, nn.Dense):
    return "...i", "io", "...o"
  if isinstance(module, nn.Einsum):
    (x_sub, k_sub), y_sub = lowrank.parse_einsum(call_kwargs.get("einsum_str") or module.einsum_str)
    return x_sub, k_sub, y_sub
  n_features = len(module.features) if isinstance(module.features, (tuple, list)) else 1
  return lowrank.dense_general_equation(x.ndim, module.axis, module.batch_dims, n_features)


def _layer_roles(module, method, x, call_kwargs) -> tuple[str, ...]:
  if isinstance(module, nn.Embed):
    return IN, OUT  # rows are looked up (the input side), columns are features
  return lowrank.roles_from_equation(*_layer_equation(module, method, x, call_kwargs))


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
    method, x, rest = context.method_name, args[0], args[1:]

    def base_layer(base, x):
      return plain.apply(
        {"params": {**params, _weight_name(module): dequantized(base)}},
        x,
        *rest,
        method=method,
        **kwargs,
      )

    use_dropout = dropout_on and is_lora(weight) and weight.dropout > 0
    low = None
    if is_lora(weight) and method == "__call__":
      low = shared.low(module, weight, x, dropout_on)
    return lowrank.adapted_output(
      weight,
      base_layer,
      x,
      _layer_equation(module, method, x, kwargs),
      where="/".join(module.path),
      bias=params.get("bias"),
      adapter_ids=adapter_ids,
      dropout_key=module.make_rng("dropout") if use_dropout else None,
      low=low,
      embedding=isinstance(module, nn.Embed),
    )

  return intercept


def wrap(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Returns `apply_fn` with the same signature, able to run params that hold jlora nodes.

  Adapter dropout is active when a 'dropout' rng is passed (`rngs={'dropout': key}`)
  and the call does not say `deterministic=True` (or `train=False`).

  Params from `jlora.stack_adapters` need `adapter_ids=` ([batch] ints): row i of the batch
  uses adapter ids[i] (its index in stack_adapters' dict, see jlora.adapter_ids), -1 the
  base model alone.

  Given an NNX GraphDef (of `nnx.split(model)`) instead, it returns
  fn(state, *args, adapter_ids=None, dropout_key=None, **kwargs): see jlora.nnx_forward.
  """
  if isinstance(apply_fn, nnx.GraphDef):
    return nnx_forward.wrap(apply_fn)
  if getattr(apply_fn, "runs_jlora_nodes", False):
    return apply_fn  # it runs nodes itself (an NNX model's NnxCausalLM.apply, on nnx_forward)

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


def trace_layout(model, *args, method=None, **kwargs) -> dict[str, tuple[str, ...]]:
  """Roles of every Dense/DenseGeneral/Einsum/Embed weight, by module path.

  Traces `model.init` abstractly (jax.eval_shape: no FLOPs, no memory) on example
  inputs and records how each layer contracts its input with its weight.
  Pass the result as `jlora.apply(..., layout=...)` or `jlora.quantize(..., layout=...)`.
  An NNX model is traced through its call (`method`, default __call__) instead, which also
  records params that custom modules contract with jnp.einsum / lax.dot_general.
  """
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return nnx_forward.trace_layout(graphdef, state, *args, method=method or "__call__", **kwargs)
  layout: dict[str, tuple[str, ...]] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, GroupedDense) and context.method_name == "parts":
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

"""How an NNX model's use of an adapted weight is caught: scoped to the wrapped call.

    graphdef, state = nnx.split(model)
    state = jlora.apply(state, cfg, key)            # nodes sit inside the nnx.Param Variables
    logits = jlora.wrap(graphdef)(state, tokens)     # the NNX side of jlora.wrap

`wrap(graphdef)(state, ...)` merges a fresh model from (graphdef, state) inside the call
(the user's model instance is never touched) and runs it while jlora catches the two
places where a weight meets its input:

  * the stock layers' methods (nnx.Linear, LinearGeneral, Einsum, Embed and Embed.attend):
    the layer runs as written on its base weight, and the low-rank path is added from
    the layer's own contraction (its einsum string, its dot_general axes);
  * `jax.numpy.einsum` and `jax.lax.dot_general` called by any other module on a param
    that holds a node (tunix's and bonsai's `Einsum(w)`, MaxText's DenseGeneral): the node
    reaches the op because it is read as `self.w[...]`, and the op's own subscripts give
    the low-rank contraction.

Both catches are installed only while a wrapped call runs (nested and threaded calls
share one installation, counted), and only act on an operand that is a jlora node:
every other call of those functions, in this model or another, runs the original.
Because they act at trace time, the result works under jax.jit, nnx.jit, jax.grad,
nnx.vmap/nnx.scan stacks and sharding like any other JAX code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora import boxes, lowrank
from jlora import config as config_lib
from jlora.config import IN, OUT, is_node
from jlora.lora import is_lora
from jlora.multi import check_adapter_ids
from jlora.quant import dequantized

# The stock layers, with each method that reads its weight and the name of that weight.
STOCK_METHODS = (
  (nnx.Linear, "__call__", "kernel"),
  (nnx.LinearGeneral, "__call__", "kernel"),
  (nnx.Einsum, "__call__", "kernel"),
  (nnx.Embed, "__call__", "embedding"),
  (nnx.Embed, "attend", "embedding"),
)


@dataclasses.dataclass
class _Call:
  """What one wrapped call passes to the caught layers."""

  adapter_ids: Any = None
  dropout_key: Any = None
  n_dropouts: int = 0
  record: Callable | None = None  # trace_layout's recorder (path, roles)
  record_lookup: Callable | None = None  # trace_layout's recorder of weights read as tables

  def next_dropout_key(self):
    if self.dropout_key is None:
      return None
    self.n_dropouts += 1
    return jax.random.fold_in(self.dropout_key, self.n_dropouts)


_local = threading.local()
_lock = threading.Lock()
_installed: dict[tuple[Any, str], Any] = {}  # (owner, name) -> original, while installed
_users = 0


def _current() -> _Call:
  stack = getattr(_local, "calls", None)
  return stack[-1] if stack else _Call()


def _original(owner, name):
  return _installed.get((owner, name)) or getattr(owner, name)


@contextlib.contextmanager
def caught(call: _Call):
  """Installs the catches (once for all concurrent users) for the duration of one call."""
  global _users
  with _lock:
    if _users == 0:
      replacements = [
        *((cls, method, _stock_method(cls, method, name)) for cls, method, name in STOCK_METHODS),
        (jnp, "einsum", _caught_einsum),
        (jax.lax, "dot_general", _caught_dot_general),
      ]
      for owner, name, replacement in replacements:
        _installed[(owner, name)] = getattr(owner, name)
        setattr(owner, name, replacement)
    _users += 1
  _local.calls = [*getattr(_local, "calls", []), call]
  try:
    yield
  finally:
    _local.calls = _local.calls[:-1]
    with _lock:
      _users -= 1
      if _users == 0:
        for (owner, name), original in _installed.items():
          setattr(owner, name, original)
        _installed.clear()


# --------------------------------------------------------------------------- stock layers


class _Fixed:
  """Stands in for a Variable: `v[...]` / `v.value` give one array."""

  def __init__(self, value):
    self.value = value

  def __getitem__(self, index):
    return self.value[index]


class _WithWeight:
  """The module seen by its own method, with the weight attribute swapped for an array."""

  def __init__(self, module, weight_name: str, value):
    object.__setattr__(self, "_module", module)
    object.__setattr__(self, "_swap", (weight_name, _Fixed(value)))

  def __getattr__(self, name):
    weight_name, fixed = self._swap
    return fixed if name == weight_name else getattr(self._module, name)


def _stock_equation(module, method: str, x, kwargs) -> lowrank.Equation | None:
  if isinstance(module, nnx.Embed):
    return ("...f", "vf", "...v") if method == "attend" else None
  if isinstance(module, nnx.Einsum):
    (x_sub, k_sub), y_sub = lowrank.parse_einsum(kwargs.get("einsum_str") or module.einsum_str)
    return x_sub, k_sub, y_sub
  if isinstance(module, nnx.LinearGeneral):
    return lowrank.dense_general_equation(
      x.ndim, module.axis, tuple(module.batch_axis), len(module.out_features)
    )
  return "...i", "io", "...o"  # nnx.Linear


def _stock_method(cls, method: str, weight_name: str):
  original = getattr(cls, method)

  def run(module, x, *args, **kwargs):
    variable = getattr(module, weight_name, None)
    weight = variable.get_value() if isinstance(variable, nnx.Variable) else None
    if not is_node(weight):
      return original(module, x, *args, **kwargs)

    def base_layer(base, x):
      return original(_WithWeight(module, weight_name, dequantized(base)), x, *args, **kwargs)

    call = _current()
    equation = _stock_equation(module, method, x, kwargs)
    bias = getattr(module, "bias", None)
    return _adapted(
      weight,
      base_layer,
      x,
      equation,
      call,
      where=f"{type(module).__name__}.{method}",
      bias=bias.get_value() if isinstance(bias, nnx.Variable) else None,
      embedding=isinstance(module, nnx.Embed),
    )

  run.__wrapped__ = original
  return run


def _adapted(weight, base_layer, x, equation, call: _Call, *, where, bias=None, embedding=False):
  if call.record is not None:
    roles = (IN, OUT) if embedding else lowrank.roles_from_equation(*equation)
    call.record(weight, roles)
    return base_layer(weight.base, x)
  key = call.next_dropout_key() if is_lora(weight) and weight.dropout > 0 else None
  return lowrank.adapted_output(
    weight,
    base_layer,
    x,
    equation,
    where=where,
    bias=bias,
    adapter_ids=call.adapter_ids,
    dropout_key=key,
    embedding=embedding,
  )


# --------------------------------------------------------------------------- ops


def _caught_einsum(subscripts, *operands, **kwargs):
  original = _original(jnp, "einsum")
  nodes = [i for i, op in enumerate(operands) if is_node(op)]
  if not nodes or not isinstance(subscripts, str):
    return original(subscripts, *operands, **kwargs)
  subs, y_sub = lowrank.parse_einsum(subscripts)
  if len(operands) != 2 or len(nodes) != 1 or "->" not in subscripts:
    raise ValueError(
      f"jnp.einsum({subscripts!r}, ...) reads a jlora weight; jlora adapts an einsum of one "
      "input and one weight with an explicit output ('x,w->y')."
    )
  w_at = nodes[0]
  x = operands[1 - w_at]

  def base_layer(base, x):
    ops = [x, dequantized(base)] if w_at == 1 else [dequantized(base), x]
    return original(subscripts, *ops, **kwargs)

  equation = (subs[1 - w_at], subs[w_at], y_sub)
  return _adapted(operands[w_at], base_layer, x, equation, _current(), where=f"einsum {subscripts}")


def _caught_dot_general(lhs, rhs, dimension_numbers, *args, **kwargs):
  original = _original(jax.lax, "dot_general")
  if not (is_node(lhs) or is_node(rhs)):
    return original(lhs, rhs, dimension_numbers, *args, **kwargs)
  if is_node(lhs) and is_node(rhs):
    raise ValueError("lax.dot_general of two jlora weights: jlora adapts input x weight only.")
  w_at = 1 if is_node(rhs) else 0
  weight, x = (rhs, lhs) if w_at == 1 else (lhs, rhs)
  lhs_sub, rhs_sub, y_sub = lowrank.dot_general_equation(lhs.ndim, rhs.ndim, dimension_numbers)

  def base_layer(base, x):
    ops = (x, dequantized(base)) if w_at == 1 else (dequantized(base), x)
    return original(*ops, dimension_numbers, *args, **kwargs)

  equation = (lhs_sub, rhs_sub, y_sub) if w_at == 1 else (rhs_sub, lhs_sub, y_sub)
  return _adapted(weight, base_layer, x, equation, _current(), where="lax.dot_general")


# --------------------------------------------------------------------------- entry points


def wrap(graphdef: nnx.GraphDef, method: str = "__call__") -> Callable[..., Any]:
  """fn(state, *args, adapter_ids=None, dropout_key=None, **kwargs) -> the model's output.

  `state` is the nnx.State from nnx.split (plain, or holding jlora nodes: jlora.apply,
  quantize, stack_adapters, combine of a split). `method` names the model's method to run.
  Adapter dropout is active when `dropout_key` is given. Params from jlora.stack_adapters
  need `adapter_ids=` ([batch] ints, see jlora.adapter_ids).
  """
  if not isinstance(graphdef, nnx.GraphDef):
    raise TypeError(f"wrap: expected the GraphDef of nnx.split(model), got {type(graphdef)}.")

  def run(state, *args, adapter_ids=None, dropout_key=None, **kwargs):
    if adapter_ids is not None:
      adapter_ids = check_adapter_ids(state, adapter_ids)
    with caught(_Call(adapter_ids=adapter_ids, dropout_key=dropout_key)):
      model = nnx.merge(graphdef, state)
      _check_supported(model)
      return getattr(model, method)(*args, **kwargs)

  return run


def _check_supported(model) -> None:
  """A Flax layer that holds a node but is neither a stock layer jlora catches nor code that
  reaches jnp.einsum / lax.dot_general (nnx.Conv, ...) is an error, not a silent merge."""
  stock = tuple({cls for cls, _, _ in STOCK_METHODS})
  for path, module in nnx.iter_graph(model):
    if not isinstance(module, nnx.Module) or isinstance(module, stock):
      continue
    if not type(module).__module__.startswith("flax."):
      continue  # user code: its einsum / dot_general calls are caught
    held = [
      n for n, v in vars(module).items() if isinstance(v, nnx.Variable) and is_node(v.get_value())
    ]
    if held:
      where = "/".join(map(str, path)) or "(the model)"
      raise ValueError(
        f"{where}: jlora can't adapt the {held[0]!r} of an nnx.{type(module).__name__}; it adapts "
        f"nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed and modules that contract their "
        "param with jnp.einsum or lax.dot_general. Exclude it (LoraConfig.exclude)."
      )


def trace_layout(graphdef: nnx.GraphDef, state, *args, method: str = "__call__", **kwargs):
  """Roles of every weight the model's call contracts, by target path (abstract trace).

  Runs the model under jax.eval_shape with each weight wrapped in a probe node, so the stock
  layers and the einsum/dot_general catch report how each weight meets its input.
  """
  layout: dict[str, tuple[str, ...]] = {}
  lookups: set[str] = set()
  targets = config_lib.target_paths(state)

  def probe(key_path, leaf):
    path = targets.get(config_lib.path_str(key_path))
    if path is None or not boxes.is_nnx_variable(leaf):
      return leaf
    return leaf.replace(_Probe(base=leaf.get_value(), path=path))

  probed = jax.tree_util.tree_map_with_path(probe, state, is_leaf=config_lib.is_opaque)

  def record(node, roles):
    layout[node.path] = roles

  def run(probed):
    with caught(_Call(record=record, record_lookup=lookups.add)):
      return getattr(nnx.merge(graphdef, probed), method)(*args, **kwargs)

  jax.eval_shape(run, probed)
  return config_lib.TracedLayout(layout, lookups)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Probe:
  """trace_layout's stand-in for a weight: caught like a node, it reports its contraction."""

  base: Any
  path: str = dataclasses.field(metadata={"static": True})

  is_jlora_node = True

  @property
  def shape(self):
    return self.base.shape

  @property
  def ndim(self):
    return self.base.ndim

  # Uses jlora does not catch (an embedding table indexed by token ids, a tied head's `.T`, any
  # other jnp op) see the plain weight, so the trace goes on; such a use records no roles.
  @property
  def T(self):
    return self.base.T

  def __jax_array__(self):
    return self.base

  def __getitem__(self, index):
    if index is Ellipsis:
      return self
    call = _current()
    if call.record_lookup is not None:
      call.record_lookup(self.path)  # rows read by index: a table (an embedding), not a layer
    return self.base[index]

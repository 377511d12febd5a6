"""LoraConfig, and which kernels of a parameter tree it selects.

A parameter tree is addressed by "module paths": the '/'-joined keys down to the
module that owns a weight, e.g. ``model/layers/self_attn/q_proj``. Which leaves are
weights is `jlora.boxes.is_weight`: in linen a ``kernel`` (nn.Dense, nn.DenseGeneral,
nn.Einsum) or an ``embedding`` (nn.Embed), in NNX any ``nnx.Param`` of rank >= 2.
Biases, norm scales and scalars never are.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora import boxes
from jlora.boxes import EMBEDDING, KERNEL  # noqa: F401 (also imported from here)

Targets = str | Sequence[str]
# Token ids whose embedding rows train (PEFT's trainable_token_indices): a list (the input
# embedding, and a head tied to it), or {module name: ids} for several modules (an untied head).
TokenIndices = Sequence[int] | Mapping[str, Sequence[int]]

# "all-linear" skips the output head, as PEFT does: adapting it is rarely wanted and it
# is the largest matrix of a small model.
OUTPUT_HEAD_NAMES = ("lm_head", "output", "head")
# ... and the routers of MoE layers (PEFT's all-linear leaves them out too: in transformers they are
# not nn.Linear). The experts themselves are included.
ROUTER_NAMES = ("gate", "router")
# The logical axis of MoE expert weights ([E, in, out]): a batch axis of the kernel.
EXPERT_AXIS = "expert"
# loftq and eva need more than the weights (jlora.loftq: the quantization; jlora.eva: data).
DATA_INITS = ("loftq", "eva")
INITS = ("default", "gaussian", "pissa", *DATA_INITS)

# Roles of the axes of one (unstacked) kernel: "in" axes are contracted with the input,
# "out" axes appear in the output, "batch" axes appear in both (e.g. per-expert weights).
IN, OUT, BATCH = "in", "out", "batch"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how. Field names follow PEFT where PEFT has one."""

  rank: int = 8
  alpha: float = 8.0
  targets: Targets = ("q_proj", "v_proj")
  exclude: Targets | None = None
  dropout: float = 0.0
  use_rslora: bool = False
  use_dora: bool = False
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  init: str = "default"
  dtype: Any = jnp.float32
  trainable_token_indices: TokenIndices | None = None
  # LoftQ's alternations of quantize / truncated SVD (PEFT's LoftQConfig.loftq_iter).
  loftq_iters: int = 1
  # EVA's rank redistribution: a module may take up to round(rho * rank) (PEFT's EvaConfig.rho);
  # 1.0 keeps every module's rank.
  eva_rho: float = 2.0

  def __post_init__(self):
    _check_rank("rank", self.rank)
    _check_alpha("alpha", self.alpha)
    for key, value in dict(self.rank_pattern).items():
      _check_rank(f"rank_pattern[{key!r}]", value)
    for key, value in dict(self.alpha_pattern).items():
      _check_alpha(f"alpha_pattern[{key!r}]", value)
    if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
      raise ValueError(
        f"LoraConfig.dropout={self.dropout!r} is invalid: it must be a float in [0, 1)."
      )
    if not isinstance(self.use_dora, bool):
      raise ValueError(f"LoraConfig.use_dora={self.use_dora!r} is invalid: use True or False.")
    if self.use_dora and self.init == "pissa":
      raise ValueError(
        "LoraConfig.use_dora=True with init='pissa' is not supported; use init='default' for DoRA."
      )
    if self.init not in INITS:
      raise ValueError(
        f"LoraConfig.init={self.init!r} is unknown: valid values are {', '.join(map(repr, INITS))}."
      )
    check_targets("LoraConfig.targets", self.targets)
    if (
      isinstance(self.loftq_iters, bool)
      or not isinstance(self.loftq_iters, int)
      or self.loftq_iters < 1
    ):
      raise ValueError(
        f"LoraConfig.loftq_iters={self.loftq_iters!r} is invalid: use a positive integer (PEFT: 1..5)."
      )
    if (
      isinstance(self.eva_rho, bool)
      or not isinstance(self.eva_rho, (int, float))
      or self.eva_rho < 1
    ):
      raise ValueError(f"LoraConfig.eva_rho={self.eva_rho!r} is invalid: it must be a number >= 1.")
    if self.trainable_token_indices is not None:
      check_token_indices("LoraConfig.trainable_token_indices", self.trainable_token_indices)
    if self.exclude is not None:
      check_targets("LoraConfig.exclude", self.exclude)
    try:
      jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(
        f"LoraConfig.dtype={self.dtype!r} is not a dtype (use e.g. jnp.float32 or 'bfloat16')."
      ) from e

  def rank_for(self, path: str) -> int:
    return _pattern_value(self.rank_pattern, path, self.rank)

  def alpha_for(self, path: str) -> float:
    return _pattern_value(self.alpha_pattern, path, self.alpha)

  def scale_for(self, path: str) -> float:
    rank = self.rank_for(path)
    alpha = self.alpha_for(path)
    return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _check_rank(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(
      f"LoraConfig.{field}={value!r} is invalid: the rank must be a positive integer."
    )


def _check_alpha(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"LoraConfig.{field}={value!r} is invalid: alpha must be a positive number.")


def check_token_indices(field: str, spec) -> None:
  """A list of distinct non-negative ints, or {module name: such a list}."""
  groups = dict(spec) if isinstance(spec, Mapping) else {None: spec}
  for key, indices in groups.items():
    where = field if key is None else f"{field}[{key!r}]"
    ok = (
      isinstance(indices, (list, tuple))
      and indices
      and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
    )
    if not ok:
      raise ValueError(
        f"{where}={indices!r} is invalid: use a non-empty list of token ids (ints >= 0), or a "
        "dict {module name: list of token ids}, e.g. {'embed_tokens': [5], 'lm_head': [5]}."
      )
    if len(set(indices)) != len(indices):
      raise ValueError(f"{where}={indices!r} lists a token id twice.")


def check_targets(field: str, targets) -> None:
  if isinstance(targets, str):
    if targets != "all-linear":
      try:
        re.compile(targets)
      except re.error as e:
        raise ValueError(f"{field}={targets!r} is not a valid regular expression: {e}.") from e
    return
  if not targets or not all(isinstance(t, str) and t for t in targets):
    raise ValueError(
      f"{field}={targets!r} is invalid: use a regex string matched against the module path, a non-empty list "
      "of module names or path suffixes, or 'all-linear'."
    )


def _suffix_regex(key: str) -> str:
  # A pattern key matches the whole path or a suffix that starts at a '/' boundary (PEFT's rule).
  return rf"(?:.*/)?(?:{key})"


def _pattern_value(patterns: Mapping[str, Any], path: str, default):
  for key, value in dict(patterns).items():
    if re.fullmatch(_suffix_regex(key), path):
      return value
  return default


# --------------------------------------------------------------------------- paths


def path_str(key_path) -> str:
  parts = []
  for k in key_path:
    if getattr(k, "name", None) == "value":
      continue  # the value inside an NNX Variable: the Variable's path names the weight
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _weights_by_module(params) -> dict[str, list[tuple[str, str, Any]]]:
  """{module path: [(leaf name, full path, leaf) of each weight it holds]}."""
  found = {}

  def visit(key_path, leaf):
    full = path_str(key_path)
    module, _, name = full.rpartition("/")
    if boxes.is_weight(name, leaf):
      found.setdefault(module, []).append((name, full, leaf))

  jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_opaque)
  return found


def _target_path(module: str, name: str, weights: list) -> str:
  """A weight's target path: its module's, or module/name in a module holding several."""
  return f"{module}/{name}" if len(weights) > 1 else module


def target_paths(params) -> dict[str, str]:
  """{full path of each weight: its target path}, the path LoraConfig.targets and layouts name.

  A weight's target path is its module's path (``.../q_proj`` for ``q_proj/kernel``), except in a
  module that holds several weights (an NNX module whose call einsums two Params, as Gemma's MLP
  does with ``gate_proj`` and ``up_proj``): there each weight is its own target, named by the
  module path plus the param's name (``.../mlp/gate_proj``)."""
  return {
    full: _target_path(module, name, weights)
    for module, weights in _weights_by_module(params).items()
    for name, full, _ in weights
  }


def candidate_leaves(params) -> dict[str, tuple[str, Any]]:
  """Adaptable leaves as {target path (see `target_paths`): (leaf name, leaf)}."""
  return {
    _target_path(module, name, weights): (name, leaf)
    for module, weights in _weights_by_module(params).items()
    for name, _, leaf in weights
  }


def is_node(x) -> bool:
  """Is `x` one of jlora's weight nodes (LoraWeight and its variants, QuantizedWeight)?"""
  return getattr(type(x), "is_jlora_node", False)


def whole_weight(node, index):
  """`node[index]` for a jlora node: NNX code reads a weight as `variable[...]`, and a node
  stands for its whole weight (it reaches the layer, where jlora catches it)."""
  if index is Ellipsis:
    return node
  raise TypeError(
    f"A {type(node).__name__} can only be read whole (weight[...]), not indexed (rows looked up, "
    "as a custom embedding does): jlora adapts weights that a layer, jnp.einsum or "
    "lax.dot_general contracts with an input. Leave this weight out of the targets."
  )


class WeightNode:
  """What jlora's nodes (LoraWeight and its variants, TokenRows) share: a node stands where its
  base weight was, so it reports that weight's shape, dtype and rank, and is read whole."""

  is_jlora_node = True
  base: Any
  roles: tuple[str, ...]  # the per-layer axes' roles (IN, OUT, BATCH)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def n_lead(self) -> int:
    """Stacked (scanned) axes in front of the per-layer kernel axes."""
    return self.ndim - len(self.roles)

  def __getitem__(self, index):
    return whole_weight(self, index)


def is_opaque(x) -> bool:
  """What tree walks over params treat as one weight: boxes (linen metadata, NNX Variables)
  and jlora's nodes."""
  return boxes.is_box(x) or is_node(x)


def _matches(path: str, leaf_name: str, targets: Targets, lookups=frozenset()) -> bool:
  if isinstance(targets, str):
    if targets == "all-linear":
      name = path.rpartition("/")[2]
      return (
        boxes.weight_kind(leaf_name) == KERNEL
        and name not in OUTPUT_HEAD_NAMES + ROUTER_NAMES
        and path not in lookups
      )
    return re.fullmatch(targets, path) is not None
  return any(path == t or path.endswith("/" + t) for t in targets)


def select(
  params, targets: Targets, exclude: Targets | None = None, *, field: str = "targets", layout=None
) -> list[str]:
  """Module paths selected by `targets` minus `exclude`; an error if nothing matches.

  'all-linear' leaves out the weights a traced `layout` saw looked up as tables (its
  `lookups`: a custom embedding module's param, whatever its name)."""
  candidates = candidate_leaves(params)
  lookups = getattr(layout, "lookups", frozenset())
  chosen = [
    path
    for path, (name, _) in candidates.items()
    if _matches(path, name, targets, lookups)
    and not (exclude is not None and _matches(path, name, exclude, lookups))
  ]
  if not chosen:
    listing = (
      "\n  ".join(sorted(candidates))
      or "(none: the tree has no weights: linen 'kernel'/'embedding' leaves or NNX Params of rank >= 2)"
    )
    raise ValueError(
      f"{field}={targets!r} matched no weight. Module paths that could match:\n  {listing}"
    )
  return sorted(chosen)


# --------------------------------------------------------------------------- layouts


def map_selected(params, chosen, fn, layout=None):
  """Replaces each selected weight's value by fn(path, name, value, n_lead, roles), `path`
  being its target path (`target_paths`).

  jlora nodes already know their layout (n_lead, roles); other weights get it from
  `kernel_roles`. linen trees come back unboxed; NNX Variables stay, holding the new
  value (`boxes.reboxed`). Everything else is unchanged.
  """

  targets = target_paths(params)

  def visit(key_path, leaf):
    full = path_str(key_path)
    path, name = targets.get(full), full.rpartition("/")[2]
    value = boxes.unboxed(leaf)
    if path not in chosen:
      return boxes.reboxed(leaf, value)
    if is_node(value):
      n_lead, roles = value.n_lead, value.roles
    else:
      names = boxes.axis_names(leaf)
      n_lead, roles = kernel_roles(path, name, tuple(value.shape), layout, names)
    return boxes.reboxed(leaf, fn(path, name, value, n_lead, roles))

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_opaque)


Layout = Mapping[str, tuple[str, ...]]


class TracedLayout(dict):
  """What `jlora.trace_layout` returns on NNX: the roles of each weight the trace saw contracted,
  by target path, plus `lookups`: the weights it saw read as tables (rows indexed by token ids),
  which are embeddings whatever their param is called."""

  def __init__(self, roles=(), lookups=()):
    super().__init__(roles)
    self.lookups = frozenset(lookups)


def kernel_roles(
  path: str,
  leaf_name: str,
  shape: tuple[int, ...],
  layout: Layout | None,
  boxed_names: tuple | None = None,
  scan_axis_names=("layers",),
) -> tuple[int, tuple[str, ...]]:
  """(number of leading stacked axes, roles of the remaining axes) for one kernel.

  The roles come from, in order: an explicit layout (see `jlora.trace_layout`), the
  kernel being 2-D, or Flax axis metadata (linen boxes, NNX Variable metadata) naming the
  stacked (scan) axes. A kernel
  that none of these decide is an error: guessing from shapes would silently adapt
  the wrong axes.
  """
  if layout is not None and path in layout:
    roles = tuple(layout[path])
    n_lead = len(shape) - len(roles)
    if n_lead < 0:
      raise ValueError(f"layout[{path!r}]={roles} has more axes than the weight's shape {shape}.")
    return n_lead, roles
  if boxed_names is not None:
    n_lead = 0
    while n_lead < len(boxed_names) and boxed_names[n_lead] in scan_axis_names:
      n_lead += 1
    experts = tuple(BATCH for n in boxed_names[n_lead:] if n == EXPERT_AXIS)
    if len(shape) - n_lead - len(experts) == 2 and boxed_names[n_lead : n_lead + len(experts)] == (
      (EXPERT_AXIS,) * len(experts)
    ):
      return n_lead, (*experts, IN, OUT)
  elif len(shape) == 2:
    return 0, (IN, OUT)
  raise ValueError(
    f"Cannot tell which axes of the {leaf_name} at {path!r} (shape {shape}) are inputs, outputs or stacked "
    "layers. Pass layout=jlora.trace_layout(model, *example_inputs) (it traces the model abstractly, at "
    "no FLOP cost), or pass params boxed with Flax axis metadata that names the scan axis 'layers'."
  )

"""Which leaves of a parameter tree are weights, and the axis names they carry: linen and NNX.

Both Flax APIs hand jlora a pytree. They differ in how a weight is boxed:

  linen  params["q_proj"]["kernel"] is an array, or a `flax.linen.meta` box (Partitioned,
         LogicallyPartitioned) whose `names` are the weight's logical axis names.
  NNX    nnx.split(model)[1]["q_proj"]["kernel"] is an `nnx.Param` (a Variable) whose
         value is the array and whose metadata `out_sharding` (older Flax: `sharding_names`,
         `sharding`) holds the logical axis names.

Everything above this module (selection, apply, split, merge, IO) sees a weight as
(module path, kind, value, axis names) and never asks which API it came from. A linen
box is dropped when a weight is replaced (jlora's trees are plain arrays); an NNX
Variable is kept, holding the node as its value, because `nnx.merge` needs it.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.linen import meta

KERNEL = "kernel"
EMBEDDING = "embedding"
# The leaf names of linen's weight params (nn.Dense/DenseGeneral/Einsum: kernel, nn.Embed:
# embedding). An NNX Param is a weight whatever its name (tunix's einsum modules call it `w`).
LINEN_WEIGHT_NAMES = (KERNEL, EMBEDDING)
# Params that add to or scale a layer's output (nnx.LinearGeneral's bias is [heads, head_dim])
# are never weights, whatever their rank.
NOT_WEIGHT_NAMES = ("bias", "scale")
# Where NNX keeps the logical axis names of a Variable, newest Flax first.
NNX_AXIS_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def is_box(x) -> bool:
  """A linen axis-metadata box or an NNX Variable: one weight, with metadata around it."""
  return isinstance(x, (meta.AxisMetadata, nnx.Variable))


def is_nnx_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def unboxed(x) -> Any:
  """The value inside a box (an array or a jlora node); anything else as is."""
  if isinstance(x, nnx.Variable):
    return x.get_value()
  if isinstance(x, meta.AxisMetadata):
    return x.unbox()
  return x


def reboxed(box, value) -> Any:
  """`value` in place of the weight `box` held: an NNX Variable keeps its type and metadata,
  a linen box is dropped (jlora returns linen trees unboxed)."""
  if isinstance(box, nnx.Variable):
    return box.replace(value)
  return value


def axis_names(x) -> tuple | None:
  """The logical axis names a box carries, or None."""
  if isinstance(x, meta.Partitioned):
    return tuple(x.names)
  if isinstance(x, nnx.Variable):
    metadata = x.get_metadata()
    for key in NNX_AXIS_NAME_KEYS:
      names = metadata.get(key)
      if isinstance(names, (tuple, list)):
        return tuple(names)
  return None


def is_weight(name: str, leaf) -> bool:
  """Is the leaf called `name` a weight that LoRA or quantization may replace (rank >= 2)?"""
  if isinstance(leaf, nnx.Variable):
    if not isinstance(leaf, nnx.Param) or name in NOT_WEIGHT_NAMES:
      return False  # batch statistics, caches, rngs, biases: never weights
  elif name not in LINEN_WEIGHT_NAMES:
    return False
  return len(tuple(getattr(unboxed(leaf), "shape", ()))) >= 2


def weight_kind(name: str) -> str:
  """KERNEL (contracted with an input) or EMBEDDING (rows looked up) for a weight's leaf name."""
  return EMBEDDING if name == EMBEDDING else KERNEL


def unbox_tree(tree):
  """A linen tree without its metadata boxes; NNX Variables stay (nnx.merge needs them)."""
  return meta.unbox(tree)

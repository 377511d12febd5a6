"""Meshes, and shardings for trees that hold jlora nodes, derived from the base's.

The base model names the logical axes of its params (linen: nn.with_logical_partitioning;
NNX: the `out_sharding` metadata of its Variables, nnx.with_partitioning);
rules map them to the mesh axes data / fsdp / tensor / expert. An adapter then shards like
the weight it adapts: A takes the base's input-axis specs and an unsharded rank,
B an unsharded rank and the base's output-axis specs. Nothing is replicated by fiat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jlora import boxes
from jlora.lora import is_adapter

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# The mesh axes a batch's rows split over. The expert axis holds each device's share of the experts
# of an MoE layer and splits the rows like data parallelism everywhere else (on a dense model it is
# one more data axis).
BATCH_AXES = ("data", "fsdp", "expert")


def make_mesh(
  data: int = 1,
  fsdp: int = 1,
  tensor: int = 1,
  expert: int = 1,
  devices: Sequence | None = None,
) -> Mesh:
  """A (data, fsdp, tensor, expert) mesh over the first data*fsdp*tensor*expert devices; -1 in one
  axis takes the rest."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(
        f"mesh.{name}={size!r} is invalid: use a positive integer, or -1 for the remaining devices."
      )
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(
      f"Only one mesh axis may be -1; got -1 for {', '.join('mesh.' + n for n in free)}."
    )
  if free:
    rest = math.prod(s for s in sizes.values() if s != -1)
    if len(devices) % rest:
      raise ValueError(f"{len(devices)} devices can't be split with the fixed mesh axes {sizes}.")
    sizes[free[0]] = len(devices) // rest
  total = math.prod(sizes.values())
  if total > len(devices):
    raise ValueError(
      f"mesh {' x '.join(f'{n}={s}' for n, s in sizes.items())} = {total} "
      f"devices, but only {len(devices)} are available ({jax.default_backend()}). Make the product "
      "at most the device count (one axis may be -1 to take the rest)."
    )
  devices = devices[:total]
  # Auto axes: sharding is propagated by XLA from the annotated params and activations.
  return jax.make_mesh(
    tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def logical_specs(boxed_params, rules) -> dict:
  """PartitionSpecs over mesh axes for params whose boxes name logical axes: linen boxes, or
  NNX Variables (the spec stays inside its Variable, so the tree matches the nnx.State)."""
  return nn.logical_to_mesh(jax.tree.map(_logical_spec, boxed_params, is_leaf=boxes.is_box), rules)


def _logical_spec(x):
  if boxes.is_nnx_variable(x):
    return x.replace(PartitionSpec(*(boxes.axis_names(x) or ())))
  return nn.get_partition_spec(x)


def _padded(spec, ndim: int) -> tuple:
  spec = tuple(spec) if spec is not None else ()
  return spec + (None,) * (ndim - len(spec))


def adapter_specs(node, base_spec) -> object:
  """The node's PartitionSpecs: each trainable child's from the base's spec (node.field_axes)."""
  spec = _padded(base_spec, node.ndim)
  n_lead = node.ndim - len(node.roles)
  lead, per_layer = spec[:n_lead], spec[n_lead:]
  trained = {
    name: PartitionSpec(*lead, *axes)
    for name, axes in node.field_axes(per_layer, None).items()  # the rank axis is never sharded
  }
  base = node.base
  base_spec = (
    base.partition_spec(PartitionSpec(*spec))
    if hasattr(base, "partition_spec")
    else PartitionSpec(*spec)
  )
  return node.replace(base=base_spec, **trained)


def param_specs(params, base_specs):
  """Specs for `params` (which may hold LoraWeight / QuantizedWeight nodes) from the base's specs.

  `base_specs` has the structure of the plain base tree, one PartitionSpec per weight.
  Where `params` holds a node, the base's spec is expanded into the node's children.
  """

  def expand(spec, leaf):
    if is_adapter(leaf):
      return adapter_specs(leaf, spec)
    if hasattr(leaf, "partition_spec"):
      return leaf.partition_spec(PartitionSpec(*_padded(spec, leaf.ndim)))
    return spec if spec is not None else PartitionSpec()

  is_spec = lambda x: x is None or isinstance(x, PartitionSpec)
  return jax.tree.map(expand, base_specs, params, is_leaf=is_spec)


def named(mesh: Mesh, specs):
  """NamedShardings for a tree of PartitionSpecs (nodes included)."""
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def optimizer_state_shardings(state, param_shardings, mesh: Mesh):
  """Shardings for an optimizer state: every leaf that mirrors a param (optax's mu, nu, ...)
  takes that param's sharding, matched by key path; counters and scalars are replicated."""
  by_path = {
    jax.tree_util.keystr(p): s
    for p, s in jax.tree_util.tree_leaves_with_path(
      param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
  }

  def pick(path, _):
    key = jax.tree_util.keystr(path)
    matches = [p for p in by_path if key.endswith(p)]
    return by_path[max(matches, key=len)] if matches else NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(pick, state)

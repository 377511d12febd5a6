"""Several adapters on one base: stacked nodes, and batches whose rows pick their adapter.

  params = jlora.stack_adapters({"extract": "runs/a", "chat": chat_params}, base_params)
  ids = jlora.adapter_ids(params, ["extract", "chat", "base"])      # [2, ... , -1]
  logits = jlora.wrap(model.apply)({"params": params}, x, adapter_ids=ids)

A StackedLoraWeight holds one base and n adapters along an adapter axis that sits after
the stacked-layer axes (so nn.scan still slices layers first):

  a: [*lead, n, *batch_axes, *in_axes, r]     b: [*lead, n, *batch_axes, r, *out_axes]

Ranks may differ: every adapter is zero-padded to the largest rank, which changes nothing
(the padded columns of A meet zero rows of B). An adapter that does not adapt a weight
gets zero factors there. Each adapter keeps its own scale (a static tuple). In the
forward, row i gathers its own A and B (ids[i] = -1 takes scale 0: the base alone), so
the low-rank path stays two contractions, with a batch axis on the factors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora import boxes
from jlora import config as config_lib
from jlora.config import BATCH
from jlora.lora import DoraWeight, LoraWeight, is_lora, is_stacked
from jlora.peft import load_adapter
from jlora.tokens import is_token_rows

BASE = "base"  # the name that selects no adapter (id -1)


@struct.dataclass
class StackedLoraWeight(LoraWeight):
  """n adapters of one base weight (see the module docstring); `scale` is unused (1.0)."""

  stacked = True

  scales: tuple[float, ...] = struct.field(pytree_node=False, default=())
  names: tuple[str, ...] = struct.field(pytree_node=False, default=())

  def field_axes(self, kernel_axes, rank) -> dict[str, list]:
    # The adapter axis comes first and is never sharded: each device holds every adapter.
    return {name: [None, *axes] for name, axes in super().field_axes(kernel_axes, rank).items()}

  def delta(self):
    raise ValueError(
      "A StackedLoraWeight holds several adapters, so it has no single W + s*A@B; merge, "
      "unmerge and export take the params of one adapter (before stack_adapters)."
    )

  def _row_scales(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    safe = jnp.maximum(ids, 0)
    scales = jnp.asarray(self.scales, jnp.float32)[safe]
    return safe, jnp.where(ids >= 0, scales, 0.0)

  def rows(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row factors of one layer: A [batch, ...] and B [batch, ...] times the row's scale."""
    safe, scales = self._row_scales(ids)
    b = jnp.take(self.b, safe, axis=0)
    return jnp.take(self.a, safe, axis=0), b * scales.reshape(-1, *(1,) * (b.ndim - 1)).astype(
      b.dtype
    )

  def row_weights(self, ids: jax.Array) -> jax.Array:
    """[batch, n]: each row's weight on each adapter (its scale on its own, 0 elsewhere)."""
    safe, scales = self._row_scales(ids)
    return jax.nn.one_hot(safe, self.a.shape[0], dtype=jnp.float32) * scales[:, None]

  def lookup(self, ids: jax.Array, tokens: jax.Array) -> jax.Array:
    """Embedding lookup of each row's own A: [batch, ..., r], without gathering whole tables."""
    safe, _ = self._row_scales(ids)
    return self.a[safe.reshape(-1, *(1,) * (tokens.ndim - 1)), tokens]


def _nodes(params) -> dict[str, Any]:
  found = {}

  def visit(key_path, leaf):
    if is_lora(leaf):
      found[config_lib.path_str(key_path)] = leaf

  jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_lora)
  return found


def _base_leaves(base_params) -> dict[str, Any]:
  found = {}

  def visit(key_path, leaf):
    found[config_lib.path_str(key_path)] = boxes.unboxed(leaf)

  jax.tree_util.tree_map_with_path(visit, base_params, is_leaf=config_lib.is_opaque)
  return found


def _read(name: str, adapter, base_params, layout, model_config=None) -> dict[str, LoraWeight]:
  """One adapter's nodes by weight path, checked against the base."""
  if isinstance(adapter, (str, os.PathLike)):
    try:
      adapter = load_adapter(adapter, base_params, layout=layout, model_config=model_config)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"stack_adapters: adapter {name!r}: {e}") from e
  _refuse_token_rows(name, adapter)
  nodes = _nodes(boxes.unbox_tree(adapter))
  if not nodes:
    raise ValueError(f"stack_adapters: adapter {name!r} holds no LoRA nodes.")
  for path, node in nodes.items():
    if isinstance(node, (DoraWeight, StackedLoraWeight)):
      kind = "a DoRA adapter" if isinstance(node, DoraWeight) else "already stacked"
      raise ValueError(
        f"stack_adapters: adapter {name!r} is {kind} at {path}; only plain LoRA adapters stack."
      )
  return nodes


def _refuse_token_rows(name: str, adapter) -> None:
  """Trained token rows don't stack (each row of a batch would need its own table rows, and new
  tokens change the vocabulary): refused, rather than dropped."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(
    boxes.unbox_tree(adapter), is_leaf=is_token_rows
  )[0]:
    if is_token_rows(leaf):
      raise ValueError(
        f"stack_adapters: adapter {name!r} trains token rows at {config_lib.path_str(key_path)} "
        "(trainable_token_indices), which stacked adapters can't hold; only LoRA factors stack. "
        "Serve it alone, or jlora.merge it into its own base."
      )


def _check_base(name: str, nodes: Mapping[str, LoraWeight], base: Mapping[str, Any]) -> None:
  for path, node in nodes.items():
    if path not in base:
      raise ValueError(
        f"stack_adapters: adapter {name!r} adapts {path}, which base_params does not have; "
        "was it made for another model?"
      )
    if tuple(base[path].shape) != node.shape:
      raise ValueError(
        f"stack_adapters: adapter {name!r} was made for another base: its {path} has shape "
        f"{node.shape}, but base_params has {tuple(base[path].shape)}."
      )


def _pad_rank(node: LoraWeight, rank: int) -> tuple[jax.Array, jax.Array]:
  pad = rank - node.a.shape[-1]
  rank_axis_of_b = node.n_lead + node.roles.count(BATCH)
  a = jnp.pad(node.a, [(0, 0)] * (node.a.ndim - 1) + [(0, pad)])
  b_pad = [(0, 0)] * node.b.ndim
  b_pad[rank_axis_of_b] = (0, pad)
  return a, jnp.pad(node.b, b_pad)


def _stack_one(path, base, per_adapter: Sequence[LoraWeight | None], names) -> StackedLoraWeight:
  present = [n for n in per_adapter if n is not None]
  roles = {n.roles for n in present}
  if len(roles) > 1:
    raise ValueError(f"stack_adapters: the adapters of {path} disagree on its axis roles {roles}.")
  like = present[0]
  rank = max(n.a.shape[-1] for n in present)
  dtype = like.a.dtype
  pairs, scales = [], []
  for node in per_adapter:
    if node is None:  # this adapter leaves the weight alone: zero factors
      zero = like.replace(a=jnp.zeros_like(like.a), b=jnp.zeros_like(like.b))
      pairs.append(_pad_rank(zero, rank))
      scales.append(0.0)
    else:
      pairs.append(_pad_rank(node, rank))
      scales.append(float(node.scale))
  axis = like.n_lead  # the adapter axis sits after the stacked-layer axes
  return StackedLoraWeight(
    base=base,
    a=jnp.stack([a.astype(dtype) for a, _ in pairs], axis=axis),
    b=jnp.stack([b.astype(dtype) for _, b in pairs], axis=axis),
    scale=1.0,
    roles=like.roles,
    scales=tuple(scales),
    names=tuple(names),
  )


def stack_adapters(
  adapters: Mapping[str, Any],
  base_params,
  *,
  layout: config_lib.Layout | None = None,
  model_config=None,
):
  """params whose adapted weights hold every adapter of `adapters` ({name: params or PEFT dir}).

  Adapters given as params must have been built on `base_params` (same shapes); dirs are
  read with jlora.load_adapter onto it (`layout` and `model_config` as there). A quantized base works as is.
  Run the result with jlora.wrap(model.apply)(..., adapter_ids=jlora.adapter_ids(...)).
  """
  if not adapters:
    raise ValueError("stack_adapters: adapters is empty; pass {name: params or adapter dir}.")
  names = list(adapters)
  for name in names:
    if not isinstance(name, str) or not name or name == BASE:
      raise ValueError(
        f"stack_adapters: adapter name {name!r} is not valid; use a non-empty string other "
        f"than {BASE!r} (which selects the base model)."
      )
  base = _base_leaves(base_params)
  read = {}
  for name in names:
    read[name] = _read(name, adapters[name], base_params, layout, model_config)
    _check_base(name, read[name], base)
  paths = sorted(set().union(*(nodes.keys() for nodes in read.values())))
  stacked = {p: _stack_one(p, base[p], [read[n].get(p) for n in names], names) for p in paths}
  return jax.tree_util.tree_map_with_path(
    lambda kp, leaf: _replaced(leaf, stacked.get(config_lib.path_str(kp))),
    boxes.unbox_tree(base_params),
    is_leaf=config_lib.is_opaque,
  )


def _replaced(leaf, node):
  return leaf if node is None else boxes.reboxed(leaf, node)


def stacked_names(params) -> tuple[str, ...]:
  """The adapter names of params made by stack_adapters, in id order."""
  for leaf in jax.tree.leaves(params, is_leaf=is_stacked):
    if is_stacked(leaf):
      return leaf.names
  raise ValueError("The params hold no stacked adapters; build them with jlora.stack_adapters.")


def adapter_ids(params, names: Sequence[str | None]) -> jax.Array:
  """[batch] int32 ids for per-row adapter names; 'base' (or None) is -1, the base model alone."""
  known = stacked_names(params)
  ids = []
  for name in names:
    if name is None or name == BASE:
      ids.append(-1)
    elif name in known:
      ids.append(known.index(name))
    else:
      raise ValueError(
        f"adapter name {name!r} is not stacked in these params; valid names are "
        f"{list(known)} or {BASE!r}."
      )
  return jnp.asarray(ids, jnp.int32)


def check_adapter_ids(variables, ids) -> jax.Array:
  """ids as a [batch] int32 array; values are range-checked when they are concrete."""
  known = stacked_names(variables)
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(
      f"adapter_ids has shape {ids.shape} and dtype {ids.dtype}; expected one integer per row."
    )
  if not isinstance(ids, jax.core.Tracer):
    bad = [int(i) for i in np.asarray(ids) if not -1 <= i < len(known)]
    if bad:
      raise ValueError(
        f"adapter_ids: {bad[0]} is out of range; valid ids are -1 (the base) to "
        f"{len(known) - 1} (adapters {list(known)})."
      )
  return ids.astype(jnp.int32)

"""Trainable token rows: a frozen embedding (or output head) whose chosen vocabulary rows train.

  TokenRows(base, rows)   base: the frozen weight, an embedding [V, d] or a head kernel [d, V]
                          rows: [n, d], the current values of the vocabulary rows `indices`

PEFT's `trainable_token_indices` (its tensor `trainable_tokens_delta` holds these values, not a
difference). The forward gathers: an embedding lookup adds (rows - base rows) where the token is
one of `indices`, and a projection onto the vocabulary (Embed.attend, a head Dense) adds
x @ (rows - base rows)^T on those columns, so no [V, d] copy is formed and only `rows` gets a
gradient. A tied head is the embedding's own attend, so its rows train with the embedding.
Merging writes the rows into the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jlora import boxes
from jlora import config as config_lib
from jlora.config import EMBEDDING, IN, KERNEL, OUT
from jlora.quant import dequantized


@struct.dataclass
class TokenRows(config_lib.WeightNode):
  base: Any
  rows: Any
  indices: tuple[int, ...] = struct.field(pytree_node=False)
  # The vocabulary axis of base: 0 for an embedding [V, d], 1 for a head kernel [d, V].
  vocab_axis: int = struct.field(pytree_node=False, default=0)

  trainable_fields = ("rows",)
  roles = (IN, OUT)  # a 2-D table, never stacked: n_lead is 0

  def field_axes(self, kernel_axes, rank) -> dict[str, list]:
    del rank
    return {"rows": [None, kernel_axes[1 - self.vocab_axis]]}

  def base_rows(self) -> jax.Array:
    """The frozen values of the chosen rows, [n, d]."""
    table = jax.lax.stop_gradient(dequantized(self.base))
    rows = jnp.take(table, jnp.asarray(self.indices), axis=self.vocab_axis)
    return rows if self.vocab_axis == 0 else rows.T

  def change(self) -> jax.Array:
    """rows - base rows, [n, d]: what the forward adds."""
    return self.rows - self.base_rows().astype(self.rows.dtype)

  def merged(self) -> jax.Array:
    table = dequantized(self.base)
    rows = self.rows.astype(table.dtype)
    index = jnp.asarray(self.indices)
    return table.at[index].set(rows) if self.vocab_axis == 0 else table.at[:, index].set(rows.T)


def is_token_rows(x) -> bool:
  return isinstance(x, TokenRows)


def lookup_change(node: TokenRows, ids: jax.Array) -> jax.Array:
  """What an embedding lookup of `ids` gains: the change of each id that is a chosen row."""
  hit = (ids[..., None] == jnp.asarray(node.indices)).astype(node.rows.dtype)
  return jnp.einsum("...n,nd->...d", hit, node.change())


def project_change(node: TokenRows, x: jax.Array, y: jax.Array) -> jax.Array:
  """y (x projected onto the vocabulary) with x @ change^T added on the chosen columns."""
  extra = jnp.einsum("...d,nd->...n", x, node.change().astype(x.dtype))
  return y.at[..., jnp.asarray(node.indices)].add(extra.astype(y.dtype))


# --------------------------------------------------------------------------- apply


def token_targets(params, spec: config_lib.TokenIndices) -> dict[str, tuple[int, ...]]:
  """{module path: indices}. A list means the input embedding (PEFT's rule; a tied head follows
  it); a dict names modules as LoraConfig.targets does (e.g. 'embed_tokens', 'lm_head')."""
  candidates = config_lib.candidate_leaves(params)
  if not isinstance(spec, Mapping):
    embeddings = sorted(p for p, (name, _) in candidates.items() if name == EMBEDDING)
    if len(embeddings) != 1:
      raise ValueError(
        f"LoraConfig.trainable_token_indices: a list needs exactly one embedding, found "
        f"{embeddings}; pass a dict {{module name: token ids}}."
      )
    return {embeddings[0]: tuple(spec)}
  out = {}
  for name, indices in spec.items():
    paths = config_lib.select(params, [name], field=f"LoraConfig.trainable_token_indices[{name!r}]")
    for path in paths:
      out[path] = tuple(indices)
  return out


def token_node(path: str, leaf_name: str, value, indices: tuple[int, ...]) -> TokenRows:
  """The TokenRows for one embedding or 2-D head kernel, its rows starting at the base's values."""
  if value.ndim != 2 or leaf_name not in (EMBEDDING, KERNEL):
    raise ValueError(
      f"LoraConfig.trainable_token_indices selects {path!r} ({leaf_name}, shape "
      f"{tuple(value.shape)}); only a 2-D embedding or output-head kernel has token rows."
    )
  vocab_axis = 0 if leaf_name == EMBEDDING else 1
  vocab = value.shape[vocab_axis]
  bad = [i for i in indices if i >= vocab]
  if bad:
    raise ValueError(
      f"LoraConfig.trainable_token_indices: token ids {bad} are outside {path!r}'s vocabulary "
      f"of {vocab} rows (grow the vocabulary first, e.g. train.sft's config.tokens.add)."
    )
  node = TokenRows(base=value, rows=None, indices=tuple(indices), vocab_axis=vocab_axis)
  return node.replace(rows=node.base_rows())


# --------------------------------------------------------------------------- new tokens


def vocab_tables(params, vocab_size: int) -> dict[str, int]:
  """{flax path of every leaf with a vocabulary axis: that axis}: embeddings [V, d] and output
  head kernels [d, V] (OUTPUT_HEAD_NAMES) whose V is `vocab_size`."""
  found = {}
  for path, (name, leaf) in config_lib.candidate_leaves(params).items():
    shape = tuple(boxes.unboxed(leaf).shape)
    if name == EMBEDDING and len(shape) == 2 and shape[0] == vocab_size:
      found[f"{path}/{name}"] = 0
    head = path.rpartition("/")[2] in config_lib.OUTPUT_HEAD_NAMES
    if name == KERNEL and head and len(shape) == 2 and shape[1] == vocab_size:
      found[f"{path}/{name}"] = 1
  return found


def grow_vocab(params, old_size: int, new_size: int):
  """`params` with every vocabulary table grown from old_size to new_size rows, the new rows set
  to the mean of the old ones (HF's resize_token_embeddings(mean_resizing=True) draws them around
  that mean; the mean itself keeps this deterministic). Boxed leaves stay boxed, placed arrays
  keep their sharding."""
  if new_size <= old_size:
    return params
  tables = vocab_tables(params, old_size)

  def grow(key_path, leaf):
    axis = tables.get(config_lib.path_str(key_path))
    if axis is None:
      return leaf
    value = boxes.unboxed(leaf)
    mean = jnp.mean(value.astype(jnp.float32), axis=axis, keepdims=True).astype(value.dtype)
    extra = jnp.repeat(mean, new_size - old_size, axis=axis)
    grown = jnp.concatenate([value, extra], axis=axis)
    sharding = getattr(value, "sharding", None)
    if sharding is not None and not isinstance(sharding, jax.sharding.SingleDeviceSharding):
      grown = jax.device_put(grown, sharding)
    if boxes.is_nnx_variable(leaf):
      return leaf.replace(grown)
    return leaf.replace_boxed(grown) if hasattr(leaf, "replace_boxed") else grown

  return jax.tree_util.tree_map_with_path(grow, params, is_leaf=config_lib.is_opaque)


def add_tokens(model, params, tokenizer, tokens: list[str]):
  """(model, params, {table module path: ids}) after adding `tokens` to the (HF) tokenizer as
  special tokens, in place: the vocabulary grown to hold them (grow_vocab; the model rebuilt with
  the new vocab_size), and, for LoraConfig.trainable_token_indices, their ids in every vocabulary
  table (the embedding, an untied head). Tokens the tokenizer already has keep their ids."""
  tokenizer.add_special_tokens(
    {"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False
  )
  ids = tokenizer.convert_tokens_to_ids(list(tokens))
  old = model.config.vocab_size
  size = max(old, len(tokenizer))
  if size > old:
    model = model.clone(config=dataclasses.replace(model.config, vocab_size=size))
    params = grow_vocab(params, old, size)
  return model, params, {path.rpartition("/")[0]: ids for path in vocab_tables(params, size)}

"""LoraWeight, and LoRA as tree transforms: apply, split, combine, merge, unmerge.

An adapted weight is one pytree node that sits where the base leaf was:

  LoraWeight(base, a, b)   base: the frozen weight (an array, or a QuantizedWeight)
                           a: [*lead, *batch_axes, *in_axes, r]
                           b: [*lead, *batch_axes, r, *out_axes]

`lead` are stacked-layer axes (nn.scan); they are never recorded in static fields,
because nn.scan slices every child along its leading axis and the node must stay
valid per layer. The update it represents is  W = base + scale * A @ B  (Flax
kernels are [in, out], so A maps inputs to the rank and B the rank to outputs).
"""

from __future__ import annotations

import dataclasses
import math
import string
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora import boxes
from jlora import config as config_lib
from jlora.boxes import EMBEDDING
from jlora.config import BATCH, DATA_INITS, IN, OUT, LoraConfig
from jlora.quant import dequantized, is_quantized
from jlora.tokens import is_token_rows, token_node, token_targets


@struct.dataclass
class LoraWeight(config_lib.WeightNode):
  base: Any
  a: Any
  b: Any
  scale: float = struct.field(pytree_node=False)
  roles: tuple[str, ...] = struct.field(pytree_node=False)
  dropout: float = struct.field(pytree_node=False, default=0.0)

  stacked = False  # several adapters along an adapter axis (jlora.multi.StackedLoraWeight)
  # The children that are trained. split, combine, adapter_count, the optimizer labels, the
  # sharding specs and PEFT IO all loop over this (with field_axes), so a variant that adds a
  # trainable child declares it here once and nowhere else.
  trainable_fields = ("a", "b")

  def field_axes(self, kernel_axes, rank) -> dict[str, list]:
    """Per-layer axes of each trainable child, from anything per kernel axis (sizes, specs)."""
    a, b = factor_axes(kernel_axes, self.roles, rank)
    return {"a": a, "b": b}

  def merged(self) -> jax.Array:
    return merge_weight(self)

  def delta(self) -> jax.Array:
    """scale * A @ B, laid out like the base kernel."""
    # Stacked axes are counted on B, not the base: split()'s trainable half has base=None.
    lead = string.ascii_uppercase[
      : self.b.ndim - 1 - self.roles.count(OUT) - self.roles.count(BATCH)
    ]
    axes = string.ascii_lowercase[: len(self.roles)]
    a_sub, b_sub = ("".join(s) for s in factor_axes(axes, self.roles, "z"))
    return self.scale * jnp.einsum(f"{lead}{a_sub},{lead}{b_sub}->{lead}{axes}", self.a, self.b)

  def __jax_array__(self):
    # Reached only by code that uses the weight as a plain array (a custom layer that
    # jlora.wrap does not intercept). Correct, but it forms W + BA, so say so once.
    _warn_once(
      "A LoraWeight was used as a plain array outside nn.Dense/DenseGeneral/Einsum/Embed; "
      "it was merged (W + scale*A@B), which costs a full weight-sized matmul per call."
    )
    return merge_weight(self)


@struct.dataclass
class DoraWeight(LoraWeight):
  """DoRA (Liu et al. 2024): W' = m * (W + s*A@B) / ||W + s*A@B||, the norm per output unit.

  magnitude: [*lead, *batch_and_out_axes] (the kernel's non-"in" axes in kernel order; [out]
  for a Dense), initialised to ||W|| so the model starts at the base. The norm is taken over
  the "in" axes, as PEFT's torch.linalg.norm(weight, dim=1) over a torch [out, in] weight,
  and is a constant for the backward (PEFT detaches it, as the paper's section 4.3 says).
  """

  magnitude: Any = None

  trainable_fields = ("a", "b", "magnitude")

  def field_axes(self, kernel_axes, rank) -> dict[str, list]:
    kept = [x for x, r in zip(kernel_axes, self.roles) if r != IN]
    return {**super().field_axes(kernel_axes, rank), "magnitude": kept}


def trainable_children(node) -> dict[str, Any]:
  return {name: getattr(node, name) for name in node.trainable_fields}


def frozen_children(node) -> list[str]:
  """The node's pytree children that are not trained (the base)."""
  return [
    f.name
    for f in dataclasses.fields(node)
    if f.metadata.get("pytree_node", True) and f.name not in node.trainable_fields
  ]


def is_lora(x) -> bool:
  return isinstance(x, LoraWeight)


def is_adapter(x) -> bool:
  """A node with trainable children (LoraWeight and its variants, TokenRows): what split,
  combine, merge and the optimizer labels look for."""
  return bool(getattr(type(x), "trainable_fields", ()))


def is_stacked(x) -> bool:
  """A node holding several adapters (jlora.stack_adapters)."""
  return is_lora(x) and type(x).stacked


_warned: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    warnings.warn(message, stacklevel=3)


def factor_axes(kernel_axes, roles: tuple[str, ...], rank) -> tuple[list, list]:
  """How A and B lay out a per-layer kernel's axes: A = batch + in + rank, B = batch + rank + out.

  `kernel_axes` is anything per kernel axis (sizes, einsum letters, partition specs), so
  shapes, contractions and shardings all follow this one rule.
  """
  pick = lambda role: [x for x, r in zip(kernel_axes, roles) if r == role]
  return pick(BATCH) + pick(IN) + [rank], pick(BATCH) + [rank] + pick(OUT)


# --------------------------------------------------------------------------- apply


def apply(params, cfg: LoraConfig, key: jax.Array, *, layout: config_lib.Layout | None = None):
  """Replaces each kernel selected by `cfg.targets` with a LoraWeight. Pure.

  `params` may be plain arrays or boxed with Flax axis metadata (the result is
  unboxed either way). Kernels with more than two axes need their roles: from
  `layout` (see `jlora.trace_layout`) or from axis metadata naming the scan axis.
  """
  if cfg.init in DATA_INITS:
    raise ValueError(
      f"LoraConfig.init={cfg.init!r} needs more than the params: use jlora.{cfg.init}(...) "
      "(loftq: the quantization settings; eva: batches of inputs), which calls apply itself."
    )
  if any(is_lora(x) for x in jax.tree.leaves(params, is_leaf=is_lora)):
    raise ValueError(
      "apply: the params already hold LoRA adapters. Merge them first (jlora.merge), "
      "or split/combine to train the existing ones."
    )
  chosen = set(
    config_lib.select(params, cfg.targets, cfg.exclude, field="LoraConfig.targets", layout=layout)
  )
  keys = iter(jax.random.split(key, max(len(chosen), 1)))
  tokens = {}
  if cfg.trainable_token_indices is not None:
    tokens = token_targets(params, cfg.trainable_token_indices)
    both = sorted(chosen & set(tokens))
    if both:
      raise ValueError(
        f"LoraConfig: {both} are selected by targets and by trainable_token_indices; a weight "
        "takes a LoRA adapter or trainable token rows, not both. Exclude it from targets."
      )

  def adapt(path, name, value, n_lead, roles):
    if path in tokens:
      return token_node(path, name, value, tokens[path])
    return _new_adapter(path, name, value, n_lead, roles, cfg, next(keys))

  return config_lib.map_selected(params, chosen | set(tokens), adapt, layout)


def _new_adapter(path, name, base, n_lead, roles, cfg: LoraConfig, key) -> LoraWeight:
  shape = tuple(base.shape)
  lead, per_layer = shape[:n_lead], shape[n_lead:]
  fan_in = [d for d, r in zip(per_layer, roles) if r == IN]
  fan_out = [d for d, r in zip(per_layer, roles) if r == OUT]
  rank = cfg.rank_for(path)
  max_rank = min(math.prod(fan_in), math.prod(fan_out))
  if rank > max_rank:
    raise ValueError(
      f"LoraConfig rank {rank} for {path!r} exceeds the weight's smaller side {max_rank} "
      f"(shape {per_layer}); use rank <= {max_rank}, e.g. via rank_pattern={{{path.rpartition('/')[2]!r}: {max_rank}}}."
    )
  if cfg.use_dora and name == EMBEDDING:
    raise ValueError(
      f"LoraConfig.use_dora=True selects the embedding {path!r}; jlora supports DoRA on linear "
      "kernels only (vLLM serves no DoRA at all). Exclude it, e.g. exclude=("
      f"{path.rpartition('/')[2]!r},)."
    )
  scale = cfg.scale_for(path)
  a_axes, b_axes = factor_axes(per_layer, roles, rank)
  a_shape, b_shape = (*lead, *a_axes), (*lead, *b_axes)
  dtype = jnp.dtype(cfg.dtype)
  key_a, key_b = jax.random.split(key)
  if name == EMBEDDING:
    # PEFT initialises embedding adapters the other way round: A zero, B standard normal.
    a = jnp.zeros(a_shape, dtype)
    b = jax.random.normal(key_b, b_shape, dtype)
  elif cfg.init == "gaussian":
    a = jax.random.normal(key_a, a_shape, dtype) / rank
    b = jnp.zeros(b_shape, dtype)
  elif cfg.init == "pissa":
    return _pissa(base, n_lead, roles, rank, scale, cfg, path)
  else:
    # PEFT's kaiming_uniform_(a=sqrt(5)) on a [r, in] weight is U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(math.prod(fan_in))
    a = jax.random.uniform(key_a, a_shape, dtype, -bound, bound)
    b = jnp.zeros(b_shape, dtype)
  node = LoraWeight(base=base, a=a, b=b, scale=scale, roles=roles, dropout=cfg.dropout)
  return as_dora(node, dtype) if cfg.use_dora else node


def as_dora(node: LoraWeight, dtype=None) -> DoraWeight:
  """The DoRA node whose magnitude is ||W + s*A@B||, i.e. that computes exactly what `node` does."""
  magnitude = weight_norm(node)
  return DoraWeight(
    **{f.name: getattr(node, f.name) for f in dataclasses.fields(LoraWeight)},
    magnitude=magnitude.astype(dtype or node.a.dtype),
  )


def _in_axes(node: LoraWeight) -> tuple[int, ...]:
  # Stacked axes are counted on B, as in delta(): the trainable half of a split has base=None.
  n_lead = node.b.ndim - 1 - node.roles.count(OUT) - node.roles.count(BATCH)
  return tuple(n_lead + i for i, r in enumerate(node.roles) if r == IN)


def weight_norm(node: LoraWeight) -> jax.Array:
  """||W + s*A@B|| over the kernel's "in" axes (per output unit), W = dequant(base).

  A constant for the backward (DoRA's section 4.3, PEFT's detach), so it is computed
  from stop_gradient'ed inputs: autodiff records nothing here and the weight-sized sum
  is a temporary of the forward, never a residual kept for the backward.
  """
  node = jax.lax.stop_gradient(node)
  w = dequantized(node.base)
  full = w + node.delta().astype(w.dtype)
  return jnp.sqrt(jnp.sum(jnp.square(full), axis=_in_axes(node)))


def dora_factor(node: DoraWeight, norm: jax.Array) -> jax.Array:
  """m / norm, broadcastable against the kernel (size-1 "in" axes)."""
  return jnp.expand_dims(node.magnitude / norm, _in_axes(node))


def kernel_matrix(w, n_lead: int, roles) -> tuple[jax.Array, list[int], list[int]]:
  """(w as float32 [*lead, prod(in), prod(out)], in dims, out dims): the matrix that A @ B
  approximates (no batch axes)."""
  if BATCH in roles:
    raise ValueError(f"kernels with batch axes (roles {roles}) have no single matrix view.")
  shape = w.shape
  in_axes = [n_lead + i for i, r in enumerate(roles) if r == IN]
  out_axes = [n_lead + i for i, r in enumerate(roles) if r == OUT]
  in_dims = [shape[i] for i in in_axes]
  out_dims = [shape[i] for i in out_axes]
  matrix = jnp.transpose(w, (*range(n_lead), *in_axes, *out_axes)).astype(jnp.float32)
  return matrix.reshape(*shape[:n_lead], math.prod(in_dims), math.prod(out_dims)), in_dims, out_dims


def top_factors(matrix, in_dims, out_dims, rank: int, scale: float, dtype) -> tuple[jax.Array, ...]:
  """(a, b) with scale * a @ b the best rank-`rank` approximation of `matrix` (truncated SVD,
  the singular values split evenly between the factors), laid out for a kernel."""
  u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
  lead = matrix.shape[:-2]
  root = jnp.sqrt(s[..., :rank] / scale)
  a = (u[..., :rank] * root[..., None, :]).reshape(*lead, *in_dims, rank).astype(dtype)
  b = (root[..., :, None] * vt[..., :rank, :]).reshape(*lead, rank, *out_dims).astype(dtype)
  return a, b


def _pissa(base, n_lead, roles, rank, scale, cfg, path) -> LoraWeight:
  """PiSSA: the top-r singular directions move into A and B; the base keeps the residual."""
  if is_quantized(base):
    raise ValueError(
      f"LoraConfig.init='pissa' needs a full-precision base, but {path!r} is quantized. "
      "Apply PiSSA before jlora.quantize, or use init='default'."
    )
  if BATCH in roles:
    raise ValueError(
      f"LoraConfig.init='pissa' does not support kernels with batch axes ({path!r}, roles {roles})."
    )
  a, b = top_factors(*kernel_matrix(base, n_lead, roles), rank, scale, cfg.dtype)
  node = LoraWeight(base=base, a=a, b=b, scale=scale, roles=roles, dropout=cfg.dropout)
  return node.replace(base=(base - node.delta()).astype(base.dtype))


# --------------------------------------------------------------------------- split / merge


def split(params):
  """(trainable, frozen): the same tree structure, with complementary leaves.

  trainable holds each node with only its trainable_fields (the base is None) and None
  elsewhere; frozen holds each node with its trainable_fields None, and every other leaf.
  Differentiate only trainable.
  """

  def trainable_half(x):
    return x.replace(**dict.fromkeys(frozen_children(x))) if is_adapter(x) else None

  def frozen_half(x):
    return x.replace(**dict.fromkeys(x.trainable_fields)) if is_adapter(x) else x

  return (
    jax.tree.map(trainable_half, params, is_leaf=is_adapter),
    jax.tree.map(frozen_half, params, is_leaf=is_adapter),
  )


def combine(trainable, frozen):
  """Inverse of split."""

  def join(t, f):
    return f.replace(**trainable_children(t)) if is_adapter(t) else f

  return jax.tree.map(join, trainable, frozen, is_leaf=lambda x: x is None or is_adapter(x))


def merge_weight(node: LoraWeight) -> jax.Array:
  # QLoRA-correct: merge into dequant(W4), the weight the adapter was trained against.
  base = dequantized(node.base)
  merged = base + node.delta()
  if isinstance(node, DoraWeight):
    merged = dora_factor(node, weight_norm(node)) * merged
  return merged.astype(base.dtype)


def merge(params):
  """Every LoraWeight becomes the plain array base + scale * A @ B (DoRA: m * that / its norm),
  every TokenRows its table with the trained rows written in."""
  return jax.tree.map(lambda x: x.merged() if is_adapter(x) else x, params, is_leaf=is_adapter)


def weight_norms(params):
  """The DoRA norms ||W + s*A@B|| of `params` (None elsewhere), which unmerge needs for DoRA.

  A merged DoRA weight m * V / ||V|| keeps only V's direction, so V (and the base) can't be
  recovered from it and the adapters alone: take these norms before merging.
  """
  norm = lambda x: weight_norm(x) if isinstance(x, DoraWeight) else None
  return jax.tree.map(norm, params, is_leaf=is_lora)


def unmerge(merged, trainable, norms=None):
  """Undoes merge given the adapters: each adapted leaf becomes a node with base W - scale*A@B.

  `trainable` is the first half of `split` (or the full LoRA params). Its structure and every
  adapter's shape are checked against `merged`, and a mismatch is a ValueError naming the path.
  The values are trusted, and so is the choice of targets: nothing in `merged` records which
  adapters went into it, so adapters that fit but are not the merged ones (another run, other
  values, a subset of the targets) give bases that are off by the difference. DoRA nodes also
  need their `norms` (jlora.weight_norms of the params before merging).
  """
  merged = boxes.unbox_tree(merged)  # a merge of boxed params keeps the boxes; the result is plain
  _check_unmerge_pair(merged, trainable)

  def undo(t, w, n):
    if is_token_rows(t):
      raise ValueError(
        "unmerge: merged token rows overwrote the base's rows, which the adapters do not hold; "
        "keep the unmerged params (or the base) instead."
      )
    if not is_lora(t):
      return w
    if isinstance(t, DoraWeight):
      if n is None:
        raise ValueError(
          "unmerge: a DoRA adapter needs its weight norms; pass norms=jlora.weight_norms(params) "
          "taken before merging."
        )
      w = w / dora_factor(t, n)
    return t.replace(base=(w - t.delta()).astype(w.dtype))

  is_leaf = lambda x: x is None or is_adapter(x)
  if norms is None:
    norms = jax.tree.map(lambda _: None, trainable, is_leaf=is_leaf)
  return jax.tree.map(undo, trainable, merged, norms, is_leaf=is_leaf)


def _check_unmerge_pair(merged, trainable) -> None:
  slots = dict(
    (config_lib.path_str(p), x)
    for p, x in jax.tree_util.tree_flatten_with_path(
      trainable, is_leaf=lambda x: x is None or is_lora(x)
    )[0]
  )
  weights = dict(
    (config_lib.path_str(p), x)
    for p, x in jax.tree_util.tree_flatten_with_path(merged, is_leaf=is_lora)[0]
  )
  for missing, present, absent in (
    (sorted(set(weights) - set(slots)), "merged", "trainable"),
    (sorted(set(slots) - set(weights)), "trainable", "merged"),
  ):
    if missing:
      raise ValueError(
        f"unmerge: {missing[0]!r} is in the {present} tree but not in the {absent} tree "
        f"({len(missing)} such path(s)); pass the trainable half of split() of the params that "
        "were merged."
      )
  for path, node in slots.items():
    weight = weights[path]
    if is_lora(weight):
      raise ValueError(
        f"unmerge: {path!r} in merged is still a LoraWeight; pass jlora.merge(params)."
      )
    if not is_lora(node):
      continue
    expected = jax.eval_shape(node.delta).shape
    found = tuple(getattr(weight, "shape", ()))
    if tuple(expected) != found:
      raise ValueError(
        f"unmerge: the adapter at {path!r} (a {tuple(node.a.shape)}, b {tuple(node.b.shape)}) "
        f"makes a weight of shape {tuple(expected)}, but merged has {found} there."
      )


def adapter_count(params) -> int:
  """Number of trainable adapter values (every entry of every node's trainable_fields)."""
  return sum(
    int(np.size(leaf))
    for n in jax.tree.leaves(params, is_leaf=is_adapter)
    if is_adapter(n)
    for leaf in jax.tree.leaves(trainable_children(n))
  )

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

import math
import string
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.linen import meta

from jlora import config as config_lib
from jlora.config import BATCH, EMBEDDING, IN, OUT, LoraConfig
from jlora.quant import dequantized, is_quantized


@struct.dataclass
class LoraWeight:
  base: Any
  a: Any
  b: Any
  scale: float = struct.field(pytree_node=False)
  roles: tuple[str, ...] = struct.field(pytree_node=False)
  dropout: float = struct.field(pytree_node=False, default=0.0)

  is_jlora_node = True

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


def is_lora(x) -> bool:
  return isinstance(x, LoraWeight)


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
  if any(is_lora(x) for x in jax.tree.leaves(params, is_leaf=is_lora)):
    raise ValueError(
      "apply: the params already hold LoRA adapters. Merge them first (jlora.merge), "
      "or split/combine to train the existing ones."
    )
  chosen = set(config_lib.select(params, cfg.targets, cfg.exclude, field="LoraConfig.targets"))
  keys = iter(jax.random.split(key, max(len(chosen), 1)))

  def adapt(path, name, value, n_lead, roles):
    return _new_adapter(path, name, value, n_lead, roles, cfg, next(keys))

  return config_lib.map_selected(params, chosen, adapt, layout)


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
  return LoraWeight(base=base, a=a, b=b, scale=scale, roles=roles, dropout=cfg.dropout)


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
  shape = base.shape
  lead = shape[:n_lead]
  in_axes = [n_lead + i for i, r in enumerate(roles) if r == IN]
  out_axes = [n_lead + i for i, r in enumerate(roles) if r == OUT]
  in_dims = [shape[i] for i in in_axes]
  out_dims = [shape[i] for i in out_axes]
  matrix = jnp.transpose(base, (*range(n_lead), *in_axes, *out_axes)).astype(jnp.float32)
  matrix = matrix.reshape(*lead, math.prod(in_dims), math.prod(out_dims))
  u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
  root = jnp.sqrt(s[..., :rank] / scale)
  a = (u[..., :rank] * root[..., None, :]).reshape(*lead, *in_dims, rank).astype(cfg.dtype)
  b = (root[..., :, None] * vt[..., :rank, :]).reshape(*lead, rank, *out_dims).astype(cfg.dtype)
  node = LoraWeight(base=base, a=a, b=b, scale=scale, roles=roles, dropout=cfg.dropout)
  return node.replace(base=(base - node.delta()).astype(base.dtype))


# --------------------------------------------------------------------------- split / merge


def split(params):
  """(trainable, frozen): the same tree structure, with complementary leaves.

  trainable holds LoraWeight(None, a, b) and None elsewhere; frozen holds
  LoraWeight(base, None, None) and every other leaf. Differentiate only trainable.
  """
  trainable = jax.tree.map(
    lambda x: x.replace(base=None) if is_lora(x) else None, params, is_leaf=is_lora
  )
  frozen = jax.tree.map(
    lambda x: x.replace(a=None, b=None) if is_lora(x) else x, params, is_leaf=is_lora
  )
  return trainable, frozen


def combine(trainable, frozen):
  """Inverse of split."""

  def join(t, f):
    if is_lora(t):
      return f.replace(a=t.a, b=t.b)
    return f

  return jax.tree.map(join, trainable, frozen, is_leaf=lambda x: x is None or is_lora(x))


def merge_weight(node: LoraWeight) -> jax.Array:
  # QLoRA-correct: merge into dequant(W4), the weight the adapter was trained against.
  base = dequantized(node.base)
  return (base + node.delta()).astype(base.dtype)


def merge(params):
  """Every LoraWeight becomes the plain array base + scale * A @ B."""
  return jax.tree.map(lambda x: merge_weight(x) if is_lora(x) else x, params, is_leaf=is_lora)


def unmerge(merged, trainable):
  """Undoes merge given the adapters: each adapted leaf becomes LoraWeight(W - scale*A@B, a, b).

  `trainable` is the first half of `split` (or the full LoRA params). Its structure and every
  adapter's shape are checked against `merged`, and a mismatch is a ValueError naming the path.
  The values are trusted, and so is the choice of targets: nothing in `merged` records which
  adapters went into it, so adapters that fit but are not the merged ones (another run, other
  values, a subset of the targets) give bases that are off by the difference.
  """
  merged = meta.unbox(merged)  # a merge of boxed params keeps the boxes; the result is plain
  _check_unmerge_pair(merged, trainable)

  def undo(t, w):
    if is_lora(t):
      return t.replace(base=(w - t.delta()).astype(w.dtype))
    return w

  return jax.tree.map(undo, trainable, merged, is_leaf=lambda x: x is None or is_lora(x))


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
  """Number of trainable adapter values (A and B entries)."""
  return sum(
    int(np.prod(n.a.shape)) + int(np.prod(n.b.shape))
    for n in jax.tree.leaves(params, is_leaf=is_lora)
    if is_lora(n)
  )

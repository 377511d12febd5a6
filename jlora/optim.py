"""Optimizers that touch only adapter leaves, with LoRA+'s larger learning rate for B."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jlora import config as config_lib
from jlora.config import EMBEDDING
from jlora.lora import frozen_children, is_adapter, is_lora

ADAPTER, FROZEN = "adapter", "frozen"
# LoRA+ (Hayou et al. 2024) trains B with lr * ratio; PEFT's create_loraplus_optimizer puts
# lora_B and every 1-D trainable tensor (DoRA's magnitude) in that group.
LORAPLUS_FIELDS = ("b", "magnitude")


def adapter_labels(params):
  """'adapter' for every trainable child of a node (its trainable_fields), 'frozen' for the rest."""

  def label(x):
    if not is_adapter(x):
      return FROZEN
    as_label = lambda name, value: jax.tree.map(lambda _: name, getattr(x, value))
    return x.replace(
      **{f: as_label(FROZEN, f) for f in frozen_children(x)},
      **{f: as_label(ADAPTER, f) for f in x.trainable_fields},
    )

  return jax.tree.map(label, params, is_leaf=is_adapter)


def loraplus_factors(params, ratio: float, embedding_ratio: float = 1.0):
  """The learning-rate multiplier of every leaf: `ratio` for B (and DoRA's magnitude) of a
  kernel adapter, `embedding_ratio` for both factors of an embedding adapter, 1 elsewhere."""

  def factor(key_path, x):
    if not is_adapter(x):
      return jax.tree.map(lambda _: 1.0, x)
    if not is_lora(x):  # token rows train at the base lr
      return jax.tree.map(lambda _: 1.0, x)
    is_embedding = config_lib.path_str(key_path).rpartition("/")[2] == EMBEDDING
    per_field = lambda f: (
      embedding_ratio if is_embedding else (ratio if f in LORAPLUS_FIELDS else 1.0)
    )
    return x.replace(
      **{f: jax.tree.map(lambda _: 1.0, getattr(x, f)) for f in frozen_children(x)},
      **{f: jax.tree.map(lambda _, f=f: per_field(f), getattr(x, f)) for f in x.trainable_fields},
    )

  return jax.tree_util.tree_map_with_path(factor, params, is_leaf=is_adapter)


def scale_by_loraplus(ratio: float, embedding_ratio: float = 1.0) -> optax.GradientTransformation:
  """Multiplies each update by its leaf's LoRA+ factor (stateless).

  Placed after an optimizer whose update is linear in its learning rate (SGD, Adam, AdamW with
  decoupled decay), this is that optimizer with lr * factor for each leaf: PEFT's parameter
  groups, while clipping or any other transform before it still sees every leaf at once.
  """

  def update(updates, state, params=None):
    del params
    factors = loraplus_factors(updates, ratio, embedding_ratio)
    return jax.tree.map(lambda u, f: u * f if u is not None else None, updates, factors), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def adapter_leaves(tree) -> list:
  """The adapter leaves of `tree` (A, B, DoRA magnitudes, token rows), in tree order."""
  labels = jax.tree.leaves(adapter_labels(tree))
  return [x for x, label in zip(jax.tree.leaves(tree), labels, strict=True) if label == ADAPTER]


def on_adapter_leaves(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the list of adapter leaves; every other leaf's update is zero.

  The state is `tx`'s over that list, plain arrays with no jlora node inside, so containers that
  rebuild the pytrees they hold (nnx.Optimizer's OptState turns a node into an nnx.State) keep
  it as it was."""

  def init(params):
    return tx.init(adapter_leaves(params))

  def update(updates, state, params=None):
    chosen = adapter_leaves(updates)
    new, state = tx.update(chosen, state, None if params is None else adapter_leaves(params))
    new = iter(new)
    flat, treedef = jax.tree.flatten(updates)
    labels = jax.tree.leaves(adapter_labels(updates))
    out = [next(new) if label == ADAPTER else jnp.zeros_like(x) for x, label in zip(flat, labels)]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init, update)


def optimizer(
  tx: optax.GradientTransformation,
  params=None,
  *,
  loraplus_ratio: float | None = None,
  loraplus_embedding_ratio: float = 1.0,
) -> optax.GradientTransformation:
  """`tx` on the adapter leaves; frozen leaves get zero updates and hold no state.

  For a training step that keeps the whole tree together (it also takes jlora.split's trainable
  half). `params` is accepted for symmetry with the README's snippet; the labels are derived
  from the tree at init. `loraplus_ratio` (LoRA+, e.g. 16): B's learning rate is that many times
  `tx`'s, as PEFT's `create_loraplus_optimizer(..., loraplus_lr_ratio=)`; `tx` must scale its
  update linearly with its lr (SGD, Adam, AdamW and chains with clipping before them do).
  PEFT gives embedding adapters an absolute lr (`loraplus_lr_embedding`, 1e-6); here they get
  `loraplus_embedding_ratio` times `tx`'s lr (default: the same lr).
  """
  del params
  masked = on_adapter_leaves(tx)
  if loraplus_ratio is None:
    return masked
  if not loraplus_ratio > 0 or not loraplus_embedding_ratio > 0:
    raise ValueError(
      f"optimizer: loraplus_ratio={loraplus_ratio!r} and loraplus_embedding_ratio="
      f"{loraplus_embedding_ratio!r} must be positive (LoRA+ uses about 16 for B)."
    )
  return optax.chain(masked, scale_by_loraplus(loraplus_ratio, loraplus_embedding_ratio))

"""Optimizers that touch only adapter leaves."""

from __future__ import annotations

import jax
import optax

from jlora.lora import frozen_children, is_lora

ADAPTER, FROZEN = "adapter", "frozen"


def adapter_labels(params):
  """'adapter' for every trainable child of a node (its trainable_fields), 'frozen' for the rest."""

  def label(x):
    if not is_lora(x):
      return FROZEN
    as_label = lambda name, value: jax.tree.map(lambda _: name, getattr(x, value))
    return x.replace(
      **{f: as_label(FROZEN, f) for f in frozen_children(x)},
      **{f: as_label(ADAPTER, f) for f in x.trainable_fields},
    )

  return jax.tree.map(label, params, is_leaf=is_lora)


def optimizer(tx: optax.GradientTransformation, params=None) -> optax.GradientTransformation:
  """`tx` on the adapter leaves; frozen leaves get zero updates and hold no state.

  For a training step that keeps the whole tree together. With jlora.split you can
  instead pass only the trainable tree to `tx` directly. `params` is accepted for
  symmetry with the README's snippet; the labels are derived from the tree at init.
  """
  del params
  return optax.multi_transform({ADAPTER: tx, FROZEN: optax.set_to_zero()}, adapter_labels)

"""Optimizers that touch only adapter leaves."""

from __future__ import annotations

import jax
import optax

from jlora.lora import is_lora

ADAPTER, FROZEN = "adapter", "frozen"


def adapter_labels(params):
  """'adapter' for every A and B, 'frozen' for everything else (bases included)."""

  def label(x):
    if is_lora(x):
      return x.replace(base=jax.tree.map(lambda _: FROZEN, x.base), a=ADAPTER, b=ADAPTER)
    return FROZEN

  return jax.tree.map(label, params, is_leaf=is_lora)


def optimizer(tx: optax.GradientTransformation, params=None) -> optax.GradientTransformation:
  """`tx` on the adapter leaves; frozen leaves get zero updates and hold no state.

  For a training step that keeps the whole tree together. With jlora.split you can
  instead pass only the trainable tree to `tx` directly. `params` is accepted for
  symmetry with the README's snippet; the labels are derived from the tree at init.
  """
  del params
  return optax.multi_transform({ADAPTER: tx, FROZEN: optax.set_to_zero()}, adapter_labels)

"""The LoRA training step: loss on labelled positions only, accumulation, clipping, AdamW.

Only `trainable` (the A/B leaves) is differentiated; `frozen` is an ordinary input,
so XLA never computes a weight gradient for the base and optax holds no state for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.optim import scale_by_loraplus

# Tokens per cross-entropy chunk: bounds the live [chunk, vocab] fp32 logits.
CE_CHUNK = 1024


def label_budget(loss_mask: np.ndarray, multiple: int = 16) -> int:
  """Static number of labelled positions per row: the most any row has, rounded up."""
  most = int(loss_mask.sum(axis=1).max()) if loss_mask.size else 0
  return max(multiple, -(-most // multiple) * multiple)


def gather_labels(batch: dict[str, np.ndarray], budget: int) -> dict[str, np.ndarray]:
  """Adds label_pos / label_targets / label_mask [rows, budget]: where the head must run.

  The LM head is the largest matmul of a small model; running it (and the softmax)
  only at labelled positions is the biggest saving for SFT, where prompts are masked.
  """
  mask = batch["loss_mask"].astype(bool)
  rows = mask.shape[0]
  pos = np.zeros((rows, budget), np.int32)
  valid = np.zeros((rows, budget), np.int32)
  for r in range(rows):
    where = np.flatnonzero(mask[r])
    if len(where) > budget:
      raise ValueError(
        f"A row has {len(where)} labelled tokens, more than the label budget {budget}."
      )
    pos[r, : len(where)] = where
    valid[r, : len(where)] = 1
  targets = np.take_along_axis(batch["targets"], pos, axis=1) * valid
  return {**batch, "label_pos": pos, "label_targets": targets.astype(np.int32), "label_mask": valid}


def make_optimizer(
  lr: float,
  steps: int,
  warmup_steps: int,
  weight_decay: float,
  clip_norm: float,
  loraplus_ratio: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.999,
  min_lr_ratio: float = 0.1,
) -> tuple[optax.GradientTransformation, Callable]:
  """(AdamW after global-norm clipping, its lr schedule), as HF's Trainer (and so TRL) steps them.

  The schedule is HF's `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=min_lr_ratio)`,
  step for step: update k uses schedule(k); a warmup rises linearly from 0 (so update 0 has
  lr 0 when warmup_steps > 0, as in HF), then a cosine falls to min_lr_ratio * lr at `steps`.
  AdamW is torch's: eps 1e-8 outside the square root, bias correction, decoupled weight decay
  scaled by the scheduled lr, on every trainable leaf (HF decays all but biases and norms,
  which jlora never trains). The clip sees the gradient of the whole accumulated step.
  loraplus_ratio > 0 is LoRA+: B's lr (schedule and decay included) is that many times A's.
  """
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, lr, warmup_steps, max(steps, warmup_steps + 1), end_value=min_lr_ratio * lr
  )
  tx = optax.chain(
    optax.clip_by_global_norm(clip_norm),
    optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay),
  )
  if loraplus_ratio:
    tx = optax.chain(tx, scale_by_loraplus(loraplus_ratio))
  return tx, schedule


def loss_sum(apply_fn, model_cls, params, batch, rngs=None) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies, number of labelled tokens). Logits exist only in chunks."""
  hidden = apply_fn(
    {"params": params},
    batch["input_ids"],
    batch["positions"],
    batch["segment_ids"],
    return_hidden=True,
    rngs=rngs,
  )
  picked = jnp.take_along_axis(hidden, batch["label_pos"][..., None], axis=1)
  dim = picked.shape[-1]
  flat_h = picked.reshape(-1, dim)
  flat_t = batch["label_targets"].reshape(-1)
  flat_m = batch["label_mask"].reshape(-1).astype(jnp.float32)
  n = flat_h.shape[0]
  chunk = min(CE_CHUNK, n)
  pad = -n % chunk
  if pad:
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
    flat_t = jnp.pad(flat_t, (0, pad))
    flat_m = jnp.pad(flat_m, (0, pad))
  chunks = (flat_h.reshape(-1, chunk, dim), flat_t.reshape(-1, chunk), flat_m.reshape(-1, chunk))

  def chunk_loss(h, t, m):
    logits = apply_fn({"params": params}, h[None], method=model_cls.logits)[0].astype(jnp.float32)
    picked_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked_logit) * m)

  # With several chunks, rematerialise each: the backward recomputes one chunk's logits at a
  # time instead of keeping all of them. With one chunk that would only add a head forward.
  if len(chunks[0]) > 1:
    chunk_loss = jax.checkpoint(chunk_loss)

  def body(total, xs):
    return total + chunk_loss(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
  return total, jnp.sum(batch["label_mask"]).astype(jnp.float32)


def make_train_step(
  model, tx: optax.GradientTransformation, *, accum_steps: int = 1, dropout_rng: bool = False
):
  """step(trainable, opt_state, frozen, batch, step, rng) -> (trainable, opt_state, metrics).

  dropout_rng: feed the model a "dropout" rng (needed when any adapter has LoRA dropout > 0).

  The batch's leading axis holds accum_steps microbatches back to back; gradients are
  summed over them and divided by the total number of labelled tokens, so the result
  does not depend on how the batch is split. A non-finite loss or gradient leaves the
  state untouched and reports finite=False, so the caller still holds the last good state.
  """
  apply_fn = jlora.wrap(model.apply)
  model_cls = type(model)

  def micro_loss(trainable, frozen, batch, rng):
    rngs = {"dropout": rng} if dropout_rng else None
    return loss_sum(apply_fn, model_cls, jlora.combine(trainable, frozen), batch, rngs)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(trainable, opt_state, frozen, batch, step_no, rng):
    rng = jax.random.fold_in(rng, step_no)
    micro = jax.tree.map(
      lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch
    )

    def accumulate(carry, xs):
      grads, total, count = carry
      mb, i = xs
      (value, n), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, grads, g), total + value, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, total, count), _ = jax.lax.scan(accumulate, init, (micro, jnp.arange(accum_steps)))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = total / count
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}
    return keep(new_trainable, trainable), keep(new_opt_state, opt_state), metrics

  return step


def make_eval_step(model):
  apply_fn = jlora.wrap(model.apply)
  model_cls = type(model)

  def evaluate(trainable, frozen, batch):
    # Rows that only pad out the last eval batch carry weight 0.
    weighted = {**batch, "label_mask": batch["label_mask"] * batch["weight"][:, None]}
    return loss_sum(apply_fn, model_cls, jlora.combine(trainable, frozen), weighted)

  return evaluate


def tree_bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))

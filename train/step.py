"""The LoRA training step: loss on labelled positions only, accumulation, clipping, AdamW.

Only `trainable` (the A/B leaves) is differentiated; `frozen` is an ordinary input,
so XLA never computes a weight gradient for the base and optax holds no state for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.models.moe import ROUTER_LOGITS, router_aux_loss
from jlora.optim import scale_by_loraplus
from train.errors import UserError

# Tokens per cross-entropy chunk: bounds the live [chunk, vocab] fp32 logits.
CE_CHUNK = 1024
# A frozen head's gradient is taken in the forward from this many chunks on: with one chunk plain
# autodiff holds no more and ran faster (bench/frozen_head.py measures both).
FROZEN_HEAD_MIN_CHUNKS = 2


def label_budget(loss_mask: np.ndarray, multiple: int = 16) -> int:
  """Static number of labelled positions per row: the most any row has, rounded up."""
  most = int(loss_mask.sum(axis=-1).max()) if loss_mask.size else 0
  return max(multiple, -(-most // multiple) * multiple)


def gather_labels(batch: dict[str, np.ndarray], budget: int) -> dict[str, np.ndarray]:
  """Adds label_pos / label_targets / label_mask [..., budget]: where the head must run.

  The LM head is the largest matmul of a small model; running it (and the softmax)
  only at labelled positions is the biggest saving for SFT, where prompts are masked.
  Leading axes (rows, or pairs x 2) are kept.
  """
  lead = batch["loss_mask"].shape[:-1]
  mask = batch["loss_mask"].reshape(-1, batch["loss_mask"].shape[-1]).astype(bool)
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
  targets = np.take_along_axis(batch["targets"].reshape(rows, -1), pos, axis=1) * valid
  shaped = lambda x: x.reshape(*lead, budget)
  return {
    **batch,
    "label_pos": shaped(pos),
    "label_targets": shaped(targets.astype(np.int32)),
    "label_mask": shaped(valid),
  }


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


def token_logps(apply_fn, model_cls, params, batch, rngs=None, router_logits: bool = False):
  """log p(label_targets) at each label position, [rows, budget] (0 where label_mask is 0).
  Logits exist only in chunks of CE_CHUNK positions. router_logits=True (MoE models) also returns
  every MoE layer's router logits, [layers, rows * seq, experts], from the same forward."""
  hidden = apply_fn(
    {"params": params},
    batch["input_ids"],
    batch["positions"],
    batch["segment_ids"],
    return_hidden=True,
    rngs=rngs,
    **({"mutable": ["intermediates"]} if router_logits else {}),
  )
  if not router_logits:
    return token_logps_of_hidden(apply_fn, model_cls, params, batch, hidden)
  hidden, state = hidden
  logps = token_logps_of_hidden(apply_fn, model_cls, params, batch, hidden)
  return logps, stacked_router_logits(state)


def stacked_router_logits(state) -> jax.Array:
  """The router logits a forward sowed (jlora.models.moe.ROUTER_LOGITS), as [layers, tokens, E]:
  a scanned stack sows one [layers, tokens, E] array, unscanned layers one [tokens, E] each."""
  found = [
    leaf.reshape(-1, *leaf.shape[-2:])
    for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    if any(getattr(key, "key", None) == ROUTER_LOGITS for key in path)
  ]
  return jnp.concatenate(found, axis=0)


def token_logps_of_hidden(apply_fn, model_cls, params, batch, hidden) -> jax.Array:
  """token_logps from the final hidden states, the head run in chunks of CE_CHUNK positions."""
  picked = jnp.take_along_axis(hidden, batch["label_pos"][..., None], axis=1)
  rows, budget, dim = picked.shape
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
  h, t = flat_h.reshape(-1, chunk, dim), flat_t.reshape(-1, chunk)

  def head_of(params, x):
    return apply_fn({"params": params}, x[None], method=model_cls.logits)[0].astype(jnp.float32)

  head = functools.partial(head_of, params)
  # With several chunks, a frozen head's gradient is taken in the forward (no chunk's logits
  # recomputed in the backward).
  if len(h) >= FROZEN_HEAD_MIN_CHUNKS and not head_reads_trainable(head_of, params, h[0]):
    logps = frozen_head_logps(head, h, t)
  else:
    logps = chunked_logps(head, h, t)
  return (logps.reshape(-1) * flat_m)[:n].reshape(rows, budget)


def head_reads_trainable(head_of, params, x) -> bool:
  """Whether head_of(params, x) reads a trainable leaf of `params` (LoRA on lm_head, new token
  rows on a tied head), from one abstract trace. A leaf that reaches any operation counts, so a
  doubt answers True, which costs only the frozen-head path's saving."""
  trainable, frozen = jlora.split(params)
  if not jax.tree.leaves(trainable):
    return False
  jaxpr = jax.make_jaxpr(lambda tr: head_of(jlora.combine(tr, frozen), x))(trainable).jaxpr
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  return any(id(v) in used for v in jaxpr.invars)


def picked_logps(logits, targets) -> tuple[jax.Array, jax.Array]:
  """(log softmax(logits)[target], logsumexp(logits)) per row, without a [rows, vocab] log-softmax."""
  lse = jax.nn.logsumexp(logits, -1)
  return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - lse, lse


def chunked_logps(head, h, t) -> jax.Array:
  """log p(t) per position by plain autodiff, chunk by chunk (a head that trains, or one chunk).
  With several chunks each is rematerialised, so the backward recomputes one chunk's logits at a
  time instead of keeping all of them; with one chunk that would only add a head forward."""

  def chunk_logps(x, targets):
    return picked_logps(head(x), targets)[0]

  if len(h) > 1:
    chunk_logps = jax.checkpoint(chunk_logps)
  return jax.lax.scan(lambda carry, xs: (carry, chunk_logps(*xs)), None, (h, t))[1]


def frozen_head_logps(head, h, t) -> jax.Array:
  """log p(t) per position for a head that reads only frozen weights (the usual LoRA case).

  Each position's log-prob depends on its own hidden state only, through a head with no
  trainable weight, so its gradient w.r.t. that hidden state, (onehot(t) - softmax) pulled back
  through the head, is known in the forward. Under differentiation the forward computes it chunk
  by chunk and keeps only it ([positions, d]); the backward scales it by the incoming cotangent.
  No [positions, vocab] logits outlive their chunk and none is recomputed: the head's matmuls
  are the forward and the one pull-back that autodiff would run anyway (the idea of Liger's and
  Unsloth's fused linear cross-entropy, here without a kernel of our own)."""

  @jax.custom_vjp
  def logps(x, targets):  # undifferentiated (evaluation): the forward alone
    return chunked_logps(head, x, targets)

  def forward(x, targets):
    def one(carry, xs):
      x, targets = xs
      logits, pull_back = jax.vjp(head, x)
      out, lse = picked_logps(logits, targets)
      d_logits = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
      d_logits = d_logits - jnp.exp(logits - lse[:, None])
      return carry, (out, pull_back(d_logits)[0])

    return jax.lax.scan(one, None, (x, targets))[1]  # (log-probs, residuals d_x)

  def backward(d_x, g):
    return (g[..., None].astype(d_x.dtype) * d_x, None)

  logps.defvjp(forward, backward)
  return logps(h, t)


def loss_sum(apply_fn, model_cls, params, batch, rngs=None) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies, number of labelled tokens)."""
  total = -jnp.sum(token_logps(apply_fn, model_cls, params, batch, rngs))
  return total, jnp.sum(batch["label_mask"]).astype(jnp.float32)


class Objective(NamedTuple):
  """What a train step minimises, in two parts, so accumulation is exact for any normaliser.

  totals(batch) -> {name: array}: the normalisers (token or pair counts) of the whole step's
    batch, computed from its masks before any microbatch runs.
  micro(apply_fn, model_cls, trainable, frozen, microbatch, totals, rngs) -> (loss, metrics):
    the microbatch's share of the step's loss (already divided by the totals) and of each
    metric; the step sums both over microbatches.
  """

  totals: Callable
  micro: Callable


def sft_totals(batch) -> dict:
  return {"tokens": jnp.maximum(jnp.sum(batch["label_mask"]).astype(jnp.float32), 1.0)}


def sft_micro(apply_fn, model_cls, trainable, frozen, batch, totals, rngs):
  params = jlora.combine(trainable, frozen)
  total, _ = loss_sum(apply_fn, model_cls, params, batch, rngs)
  return total / totals["tokens"], {}


SFT = Objective(sft_totals, sft_micro)


def sft_with_router_loss(coef: float, top_k: int) -> Objective:
  """SFT plus coef times the router's load-balancing loss (jlora.models.moe.router_aux_loss), as
  transformers adds it when a MoE config has output_router_logits: over the real (non-padding)
  tokens of the batch. With grad accumulation each microbatch's router loss counts by its share
  of the real tokens (the loss is a product of means, so it can't split exactly)."""

  def totals(batch):
    real = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
    return {**sft_totals(batch), "real_tokens": jnp.maximum(real, 1.0)}

  def micro(apply_fn, model_cls, trainable, frozen, batch, totals, rngs):
    params = jlora.combine(trainable, frozen)
    logps, logits = token_logps(apply_fn, model_cls, params, batch, rngs, router_logits=True)
    real = (batch["segment_ids"] > 0).reshape(-1)
    share = jnp.sum(real) / totals["real_tokens"]
    aux = router_aux_loss(logits, top_k, real) * share
    return -jnp.sum(logps) / totals["tokens"] + coef * aux, {"router_aux_loss": aux}

  return Objective(totals, micro)


def objective_for(model, objective: Objective) -> Objective:
  """The task's objective, with the router loss added when the model is a MoE whose
  config.model.router_aux_loss_coef is set (SFT only)."""
  coef = getattr(model.config, "router_aux_loss_coef", 0.0)
  if not coef:
    return objective
  if objective is not SFT:
    raise UserError(
      f"config.model.router_aux_loss_coef: {coef!r} works with train.sft only; expected 0 here."
    )
  return sft_with_router_loss(coef, model.config.num_experts_per_tok)


def make_train_step(
  model,
  tx: optax.GradientTransformation,
  *,
  accum_steps: int = 1,
  dropout_rng: bool = False,
  objective: Objective = SFT,
):
  """step(trainable, opt_state, frozen, batch, step, rng) -> (trainable, opt_state, metrics).

  dropout_rng: feed the model a "dropout" rng (needed when any adapter has LoRA dropout > 0).
  objective: the loss (SFT's token cross-entropy by default; train.dpo passes its own).

  The batch's leading axis holds accum_steps microbatches back to back; each microbatch's loss
  is divided by the whole batch's totals (e.g. its labelled tokens) and summed, so the result
  does not depend on how the batch is split. A non-finite loss or gradient leaves the
  state untouched and reports finite=False, so the caller still holds the last good state.
  """
  apply_fn = jlora.wrap(model.apply)
  model_cls = type(model)
  objective = objective_for(model, objective)

  def micro_loss(trainable, frozen, batch, totals, rng):
    rngs = {"dropout": rng} if dropout_rng else None
    return objective.micro(apply_fn, model_cls, trainable, frozen, batch, totals, rngs)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(trainable, opt_state, frozen, batch, step_no, rng):
    rng = jax.random.fold_in(rng, step_no)
    totals = objective.totals(batch)
    micro = jax.tree.map(
      lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch
    )
    _, shapes = jax.eval_shape(micro_loss, trainable, frozen, batch, totals, rng)

    def accumulate(carry, xs):
      grads, loss, sums = carry
      mb, i = xs
      (value, parts), g = grad_fn(trainable, frozen, mb, totals, jax.random.fold_in(rng, i))
      sums = jax.tree.map(jnp.add, sums, parts)
      return (jax.tree.map(jnp.add, grads, g), loss + value, sums), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, shapes))
    (grads, loss, sums), _ = jax.lax.scan(accumulate, init, (micro, jnp.arange(accum_steps)))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **totals, **sums}
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

"""Preference tuning with LoRA / QLoRA: DPO, IPO, ORPO and SimPO on (prompt, chosen, rejected) pairs.

  python -m train.dpo --config configs/dpo.py [--config.dpo.loss=ipo ...] [--verbose]

The run is train.sft's (setup, restore, train, evaluate, finish; checkpoints, resume, outputs,
mesh, several processes, DoRA, QLoRA); this module supplies its `Task`: pairs as data
(train/pairs.py), the preference loss as the step's objective, and an evaluator of reward
accuracy, margin and log-probs beside the task metrics.

The reference model is the frozen base with the adapters off: `reference_params(frozen)` drops
every adapter node to its base (a quantized base stays quantized), a pure function of the params
the step already holds, so no second copy of the model exists. With config.dpo.precompute_ref the
reference log-probs of every training pair are computed once before training and saved in
output_dir (a resume reads them back); otherwise the step runs the base forward itself.

Losses (beta, label_smoothing, gamma as in TRL; logps are summed over the answer's tokens, avg_
is that divided by the answer's length, ref_ the reference's, d the chosen - rejected difference):
  sigmoid  DPO (Rafailov et al. 2023), TRL DPOTrainer loss_type='sigmoid', with cDPO's
           label_smoothing e: -(1-e) log s(beta d) - e log s(-beta d), d = d(logps - ref_logps)
  ipo      IPO (Azar et al. 2023, eq. 17), TRL DPOTrainer 'ipo' (length-normalised, as TRL):
           (d(avg logps - avg ref_logps) - 1/(2 beta))^2
  orpo     ORPO (Hong et al. 2024), TRL ORPOTrainer: NLL(chosen) - beta log s(log odds(avg logps)),
           no reference model; the NLL scores the whole chosen sequence, prompt included (as TRL
           and the paper's code by default; see with_prompt_scored)
  simpo    SimPO (Meng et al. 2024), TRL CPOTrainer loss_type='simpo' with cpo_alpha=0:
           -(1-e) log s(beta (d(avg logps) - gamma/beta)) - e log s(-...), no reference model
nll_weight adds that times the chosen answers' token-mean NLL to any loss (TRL's rpo_alpha /
cpo_alpha); ORPO's own NLL term always has weight 1. Rewards are beta (logps - ref_logps) for
sigmoid and ipo, beta avg logps for orpo and simpo (as TRL logs them).
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

import jlora
from jlora.lora import is_lora
from train import data as data_lib
from train import distributed, outputs, pairs, sft
from train import step as step_lib
from train.errors import UserError, run_cli
from train.evaluate import Evaluator, metric_names, put_batch, score

LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
REFERENCE_FILE = "reference_logps.safetensors"
# Arrays with a [pairs, 2, ...] layout that the model sees as [2 * pairs, ...] sequences.
SEQUENCE_KEYS = (
  "input_ids",
  "positions",
  "segment_ids",
  "label_pos",
  "label_targets",
  "label_mask",
)
PAIR_METRICS = (
  "reward_chosen",
  "reward_rejected",
  "reward_accuracy",
  "reward_margin",
  "logps_chosen",
  "logps_rejected",
)


# --------------------------------------------------------------------------- the losses


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
  return jnp.where(x < -math.log(2), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def pair_losses(kind: str, logps, lengths, ref_logps, beta: float, smoothing: float, gamma: float):
  """(loss per pair [p], rewards [p, 2]) from summed answer log-probs [p, 2] (chosen, rejected),
  answer lengths [p, 2] and the reference's summed log-probs [p, 2] (unused when reference-free)."""
  avg = logps / jnp.maximum(lengths, 1.0)
  smoothed = lambda z: -(1 - smoothing) * jax.nn.log_sigmoid(z) - smoothing * jax.nn.log_sigmoid(-z)
  if kind in REFERENCE_FREE:
    rewards = beta * avg
  else:
    rewards = beta * (logps - ref_logps)
  if kind == "sigmoid":
    ratios = logps - ref_logps
    return smoothed(beta * (ratios[:, 0] - ratios[:, 1])), rewards
  if kind == "ipo":
    ratios = (logps - ref_logps) / jnp.maximum(lengths, 1.0)
    return (ratios[:, 0] - ratios[:, 1] - 1 / (2 * beta)) ** 2, rewards
  if kind == "orpo":
    log_odds = (avg[:, 0] - avg[:, 1]) - (log1mexp(avg[:, 0]) - log1mexp(avg[:, 1]))
    return -beta * jax.nn.log_sigmoid(log_odds), rewards
  if kind == "simpo":
    return smoothed(beta * (avg[:, 0] - avg[:, 1] - gamma / beta)), rewards
  raise ValueError(f"unknown preference loss {kind!r}; expected one of {LOSSES}")


def reference_params(frozen):
  """The base model's params: every adapter node replaced by its (possibly quantized) base.
  The same arrays the step already holds, so the reference costs no memory."""
  return jax.tree.map(lambda x: x.base if is_lora(x) else x, frozen, is_leaf=is_lora)


def as_sequences(batch: dict) -> dict:
  """[pairs, 2, ...] -> [2 * pairs, ...] (chosen and rejected of a pair stay neighbours)."""
  return {k: batch[k].reshape(-1, *batch[k].shape[2:]) for k in SEQUENCE_KEYS}


def answer_mask(batch):
  """[p, 2, budget]: which label positions are answer tokens. All of them, unless the chosen
  side's prompt is scored too (see with_prompt_scored): then the last `answer_tokens` ones."""
  if "answer_tokens" not in batch:
    return batch["label_mask"]
  index = jnp.arange(batch["label_mask"].shape[-1])
  first = batch["label_mask"].sum(-1, keepdims=True) - batch["answer_tokens"][..., None]
  return (index >= first).astype(batch["label_mask"].dtype) * batch["label_mask"]


def sequence_logps(apply_fn, model_cls, params, batch, rngs=None):
  """(summed answer log-probs [p, 2], per-token log-probs at every label position [p, 2, budget])."""
  tokens = step_lib.token_logps(apply_fn, model_cls, params, as_sequences(batch), rngs)
  tokens = tokens.reshape(*batch["label_mask"].shape)
  return (tokens * answer_mask(batch)).sum(-1), tokens


def with_prompt_scored(arrays: dict) -> dict:
  """ORPO's NLL term scores the whole chosen sequence, prompt included (TRL's ORPOTrainer and the
  paper's code by default): the chosen side's loss_mask covers every real position, and
  `answer_tokens` [pairs, 2] keeps the answers' lengths for the odds ratio."""
  loss_mask = arrays["loss_mask"].copy()
  loss_mask[:, 0] = arrays["segment_ids"][:, 0] > 0
  return {**arrays, "loss_mask": loss_mask, "answer_tokens": arrays["loss_mask"].sum(-1)}


def pair_weight(batch):
  lead = batch["label_mask"].shape[0]
  return batch["weight"].astype(jnp.float32) if "weight" in batch else jnp.ones(lead, jnp.float32)


def make_objective(settings: dict) -> step_lib.Objective:
  """The step's objective for config.dpo (as a plain dict): the mean pair loss plus the weighted
  token-mean NLL of the chosen answers, each over the whole (accumulated) batch."""
  kind, beta = settings["loss"], settings["beta"]
  nll_weight = settings["nll_weight"] + (1.0 if kind == "orpo" else 0.0)

  def totals(batch):
    w = pair_weight(batch)
    chosen_tokens = jnp.sum(batch["label_mask"][:, 0].sum(-1) * w)
    return {
      "pairs": jnp.maximum(jnp.sum(w), 1.0),
      "chosen_tokens": jnp.maximum(chosen_tokens.astype(jnp.float32), 1.0),
    }

  def micro(apply_fn, model_cls, trainable, frozen, batch, totals, rngs):
    params = jlora.combine(trainable, frozen)
    logps, tokens = sequence_logps(apply_fn, model_cls, params, batch, rngs)
    lengths = answer_mask(batch).sum(-1).astype(jnp.float32)
    if kind in REFERENCE_FREE:
      ref = jnp.zeros_like(logps)
    elif "ref_logps" in batch:
      ref = batch["ref_logps"]
    else:  # the base forward, in the same compiled step
      ref, _ = sequence_logps(apply_fn, model_cls, reference_params(frozen), batch)
      ref = jax.lax.stop_gradient(ref)
    losses, rewards = pair_losses(
      kind, logps, lengths, ref, beta, settings["label_smoothing"], settings["gamma"]
    )
    w = pair_weight(batch)
    mean = lambda x: jnp.sum(x * w) / totals["pairs"]
    nll = -jnp.sum(tokens[:, 0] * w[:, None]) / totals["chosen_tokens"]
    preference = mean(losses)
    metrics = {
      "preference_loss": preference,
      "nll": nll,
      "reward_chosen": mean(rewards[:, 0]),
      "reward_rejected": mean(rewards[:, 1]),
      "reward_accuracy": mean((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
      "reward_margin": mean(rewards[:, 0] - rewards[:, 1]),
      "logps_chosen": mean(logps[:, 0]),
      "logps_rejected": mean(logps[:, 1]),
    }
    return preference + nll_weight * nll, jax.tree.map(jax.lax.stop_gradient, metrics)

  return step_lib.Objective(totals, micro)


def settings_of(config) -> dict:
  return config.dpo.to_dict()


# --------------------------------------------------------------------------- config and data


def check(config) -> None:
  d = config.dpo
  if d.loss not in LOSSES:
    raise UserError(
      f"config.dpo.loss: {d.loss!r} is not valid; expected one of {', '.join(map(repr, LOSSES))}."
    )
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  if not number(d.beta) or d.beta <= 0:
    raise UserError(f"config.dpo.beta: {d.beta!r} is not valid; expected a number > 0 (TRL: 0.1).")
  if not number(d.label_smoothing) or not 0 <= d.label_smoothing < 0.5:
    raise UserError(
      f"config.dpo.label_smoothing: {d.label_smoothing!r} is not valid; expected a number in "
      "[0, 0.5)."
    )
  for name in ("gamma", "nll_weight"):
    if not number(d[name]) or d[name] < 0:
      raise UserError(f"config.dpo.{name}: {d[name]!r} is not valid; expected a number >= 0.")
  if d.label_smoothing and d.loss not in ("sigmoid", "simpo"):
    raise UserError(
      f"config.dpo.label_smoothing: {d.label_smoothing!r} applies to the sigmoid and simpo "
      f"losses only, not {d.loss!r}; set it to 0."
    )
  if config.data.pack:
    raise UserError(
      "config.data.pack: True is not valid for preference pairs; set "
      "--config.data.pack=False (each pair is padded to config.data.max_length)."
    )


def tokenize(spec, tokenizer, config, field, split_name):
  """(rows, pair arrays, stats) of a preference data spec; an error if no pair is left."""
  rows = data_lib.load_rows(spec, split_name, field)
  arrays, stats = pairs.tokenize_pairs(
    rows,
    tokenizer,
    max_length=config.data.max_length,
    use_chat_template=config.data.use_chat_template,
    source=f"{field} = {spec!r}",
  )
  if stats["skipped_identical"]:
    sft.log(
      f"warning: {field}: {stats['skipped_identical']} pairs have identical chosen and rejected "
      "answers (no preference); skipped."
    )
  if not stats["pairs"]:
    raise UserError(
      f"{field} = {spec!r}: all {stats['rows']} pairs were skipped: "
      f"{stats['skipped_identical']} identical, {stats['skipped_prompt_too_long']} with a prompt "
      f"longer than max_length={config.data.max_length} (raise config.data.max_length)."
    )
  return rows, with_prompt_scored(arrays) if config.dpo.loss == "orpo" else arrays, stats


def load_train_data(config, tokenizer):
  _, arrays, stats = tokenize(config.data.train, tokenizer, config, "config.data.train", "train")
  sft.log(
    f"data: {stats['rows']} rows -> {stats['pairs']} pairs of {config.data.max_length} tokens; "
    f"{stats['truncated']} truncated (prompt start cut), {stats['skipped_prompt_too_long']} "
    f"skipped (prompt longer than max_length), {stats['skipped_identical']} skipped (chosen == "
    "rejected)"
  )
  return arrays, stats


# --------------------------------------------------------------------------- reference log-probs


def make_logps_fn(model, mesh):
  """jit(frozen-side params, batch) -> summed answer log-probs [p, 2], replicated."""
  apply_fn = jlora.wrap(model.apply)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
    lambda params, batch: sequence_logps(apply_fn, type(model), params, batch)[0],
    out_shardings=replicated,
  )


def compute_reference(model, frozen, arrays, mesh, batch_size: int, budget: int) -> np.ndarray:
  """The base model's summed answer log-probs of every pair, [pairs, 2] float32."""
  logps_fn = make_logps_fn(model, mesh)
  base = reference_params(frozen)
  out = []
  for ids in data_lib.eval_batch_ids(len(arrays["input_ids"]), batch_size):
    batch = put_batch(arrays, ids, budget, mesh)
    out.append(np.asarray(logps_fn(base, batch))[ids >= 0])
  return np.concatenate(out).astype(np.float32)


def prepare(t: sft.Trainer) -> None:
  """With config.dpo.precompute_ref, adds `ref_logps` [pairs, 2] to the training arrays: read
  back from this run's output_dir when a resume finds them there, else computed and saved."""
  if not t.config.dpo.precompute_ref or t.config.dpo.loss in REFERENCE_FREE:
    return
  path = t.out / REFERENCE_FILE
  n = len(t.train_arrays["input_ids"])
  saved = read_reference(path, t.record.run_id, n)
  if saved is None:
    sft.log(f"computing the reference log-probs of {n} pairs (the base model, adapters off) ...")
    saved = compute_reference(
      t.model, t.frozen, t.train_arrays, t.mesh, t.config.data.eval_batch_size, t.budget
    )
    if distributed.is_main():
      outputs.write_atomic(
        path, lambda tmp: save_file({"ref_logps": saved}, tmp, metadata={"run_id": t.record.run_id})
      )
  else:
    sft.log(f"reference log-probs of {n} pairs read from {path}")
  t.train_arrays = {**t.train_arrays, "ref_logps": saved}


def read_reference(path, run_id: str, pairs_count: int) -> np.ndarray | None:
  """This run's saved reference log-probs, or None (missing, another run's, or unreadable)."""
  if not path.exists():
    return None
  try:
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
      if (f.metadata() or {}).get("run_id") != run_id:
        return None
    value = load_file(path)["ref_logps"]
  except Exception as e:  # a damaged file is recomputed, as a damaged before.json is
    print(f"warning: {path} can't be read ({e}); recomputing it.", file=sys.stderr)
    return None
  return value if value.shape == (pairs_count, 2) else None


# --------------------------------------------------------------------------- evaluation


class PreferenceEvaluator(Evaluator):
  """Held-out pairs: the preference loss, reward accuracy and margin, chosen / rejected log-probs;
  and greedy generations from the prompts scored against the chosen answer (config.eval.metrics)."""

  # Evaluator.__init__ is not called: it reads SFT rows; generations() needs only what is set here.
  def __init__(self, config, model, tokenizer, mesh):
    self.config, self.model, self.tokenizer, self.mesh = config, model, tokenizer, mesh
    self.metrics = metric_names(config.eval.metrics)
    rows, self.arrays, self.stats = tokenize(
      config.data.eval, tokenizer, config, "config.data.eval", "validation"
    )
    self.budget = step_lib.label_budget(self.arrays["loss_mask"])
    if config.eval_examples:
      rows = rows[: config.eval_examples]
    self.examples = pairs.prompts_and_references(
      rows, tokenizer, use_chat_template=config.data.use_chat_template
    )
    self.apply_fn = jlora.wrap(model.apply)
    objective = make_objective(settings_of(config))
    model_cls, apply_fn = type(model), self.apply_fn

    def sums(trainable, frozen, batch):  # totals of 1: the micro's parts come back as sums
      ones = {"pairs": jnp.ones(()), "chosen_tokens": jnp.ones(())}
      _, parts = objective.micro(apply_fn, model_cls, trainable, frozen, batch, ones, None)
      return parts, objective.totals(batch)

    self.sums_fn = jax.jit(sums)
    self.ref = None
    self.warned: set[str] = set()

  def pair_scores(self, trainable, frozen) -> dict:
    if self.ref is None and self.config.dpo.loss not in REFERENCE_FREE:
      self.ref = compute_reference(
        self.model,
        frozen,
        self.arrays,
        self.mesh,
        self.config.data.eval_batch_size,
        self.budget,
      )
    arrays = self.arrays if self.ref is None else {**self.arrays, "ref_logps": self.ref}
    total: dict = {}
    for ids in data_lib.eval_batch_ids(len(arrays["input_ids"]), self.config.data.eval_batch_size):
      batch = put_batch(arrays, ids, self.budget, self.mesh, weighted=True)
      parts, counts = self.sums_fn(trainable, frozen, batch)
      parts["pairs"] = jnp.sum(batch["weight"])
      parts["chosen_tokens"] = counts["chosen_tokens"]
      for k, v in parts.items():
        total[k] = total.get(k, 0.0) + float(v)
    out = {k: total[k] / total["pairs"] for k in PAIR_METRICS}
    nll_weight = self.config.dpo.nll_weight + (self.config.dpo.loss == "orpo")
    nll = total["nll"] / total["chosen_tokens"]
    out["eval_loss"] = total["preference_loss"] / total["pairs"] + nll_weight * nll
    return out

  def loss(self, trainable, frozen) -> float:
    return self.pair_scores(trainable, frozen)["eval_loss"]

  def evaluate(self, trainable, frozen, eval_loss: float | None = None) -> dict:
    result = self.pair_scores(trainable, frozen)
    needed = self.metrics or self.config.samples
    texts = self.generations(trainable, frozen) if needed else []
    references = [e["reference"] for e in self.examples]
    for name in self.metrics:
      result[name] = score(name, texts, references, lambda m: self.warn(m))
    result["samples"] = texts[: self.config.samples]
    return result

  def warn(self, message: str) -> None:
    if message not in self.warned:
      self.warned.add(message)
      print(f"warning: {message}", file=sys.stderr)


def report_scores(summary: dict, n_eval: int) -> None:
  b, a = summary["before"], summary["after"]
  sft.log(f"eval loss: {b['eval_loss']:.4f} -> {a['eval_loss']:.4f}")
  sft.log(
    f"reward accuracy on held-out pairs: {b['reward_accuracy']:.1%} -> {a['reward_accuracy']:.1%}"
  )
  for name in (
    "reward_margin",
    "reward_chosen",
    "reward_rejected",
    "logps_chosen",
    "logps_rejected",
  ):
    sft.log(f"{name.replace('_', ' ')}: {b[name]:.4f} -> {a[name]:.4f}")
  for name in (k for k in a if k not in (*PAIR_METRICS, "eval_loss")):
    sft.log(f"{name} on {n_eval} eval prompts: {b[name]:.1%} -> {a[name]:.1%}")


TASK = sft.Task(
  command="train.dpo",
  default_config="configs/dpo.py",
  check=check,
  load_train_data=load_train_data,
  objective=lambda config: make_objective(settings_of(config)),
  make_evaluator=PreferenceEvaluator,
  prepare=prepare,
  report_scores=report_scores,
)


def run(config, progress: bool = True) -> dict:
  return sft.run(config, progress, task=TASK)


def main(argv: list[str] | None = None) -> None:
  sft.main(argv, task=TASK)


if __name__ == "__main__":
  run_cli(main)

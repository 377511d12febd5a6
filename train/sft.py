"""Supervised fine-tuning with LoRA / QLoRA.

  python -m train.sft --config configs/llama.py [--config.lora.rank=16 ...] [--verbose]

Loads a Llama-family base (HF dir, .gguf, hub id or an embedded model; or an NNX model from
`--config.model.nnx=package.module:factory`), optionally
quantizes it, adds LoRA adapters, and trains them with a step compiled over a
(data, fsdp, tensor, expert) mesh. Rerunning the same command resumes from the latest
checkpoint in output_dir; Ctrl-C (or SIGTERM) saves one at the end of the current step.
Outputs: a PEFT adapter, metrics.jsonl, loss.png, before.json, summary.json and, on
request, a merged HF checkpoint and GGUF files for llama.cpp.

The run is five stages, each a function below: setup (model, adapters, data, compiled
step), restore (the newest readable checkpoint), train (the loop), evaluate, finish
(adapter and summary). `Trainer` holds what setup builds for the later stages. What is trained
on comes from a `Task` (its data, loss, evaluator and report): `SFT` here, preference pairs in
train/dpo.py; every stage is shared.
"""

from __future__ import annotations

import dataclasses
import math
import runpy
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from absl import flags
from flax import linen as nn
from ml_collections import config_flags
from safetensors import SafetensorError
from tqdm import tqdm

import jlora
from jlora import sharding as shard_lib
from jlora.errors import read_json
from jlora.lora import is_adapter
from jlora.models import export as export_lib
from jlora.models import registry
from jlora.models.llama import DEFAULT_RULES
from jlora.models.loading import load_hf_dir, resolve_checkpoint
from jlora.models.nnx_causal import peft_names, weight_layout
from jlora.quant import is_quantized
from train import config as config_lib
from train import data as data_lib
from train import distributed, nnx_model, outputs
from train import step as step_lib
from train.checkpoint import Checkpointer
from train.errors import (
  Stopped,
  UserError,
  closest_first,
  exit_on_user_error,
  naming,
  run_cli,
  verbose_requested,
  writing,
)
from train.evaluate import Evaluator, put_batch


def log(message: str) -> None:
  if distributed.is_main():  # one copy of the log, from process 0
    tqdm.write(message, file=sys.stdout)


def mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Task:
  """What a run trains on and how it is judged; the stages below are the same for every task.

  command: the CLI module (`train.sft`), named in the resume hint.
  default_config: the config file used when the command line names none.
  check(config): task-specific config checks (one-line UserErrors), before the model loads.
  load_train_data(config, tokenizer) -> (arrays with a leading row axis, stats).
  objective(config) -> step.Objective: the loss the compiled step minimises.
  make_evaluator(config, model, tokenizer, mesh): an object with `loss(trainable, frozen)`,
    `evaluate(trainable, frozen, eval_loss=None)` -> {'eval_loss', scores..., 'samples'} and
    `examples` ([{'prompt_ids', 'reference'}]), like train.evaluate.Evaluator.
  prepare(trainer): runs after setup has built everything but the compiled step (e.g. adds
    reference log-probs to trainer.train_arrays).
  report_scores(summary, n_eval): logs the before -> after scores.
  """

  command: str
  default_config: str
  check: Callable[[Any], None]
  load_train_data: Callable
  objective: Callable[[Any], step_lib.Objective]
  make_evaluator: Callable
  prepare: Callable
  report_scores: Callable[[dict, int], None]


@dataclasses.dataclass
class Trainer:
  """What setup builds; restore, train, evaluate and finish read it."""

  task: Task
  config: Any
  out: Path
  mesh: Any
  record: outputs.RunRecord
  model: Any
  tokenizer: Any
  lora: jlora.LoraConfig
  trainable: Any
  frozen: Any
  train_arrays: dict
  data_stats: dict
  budget: int
  evaluator: Evaluator
  tx: Any
  schedule: Any
  opt_state: Any
  step_fn: Any
  checkpoints: Checkpointer
  rng: Any


class Interrupted(Exception):
  """SIGINT / SIGTERM arrived; the state at `step` is saved (if any step ran)."""

  def __init__(self, signum: int, step: int | None, out: Path, command: str = "train.sft"):
    self.signum, self.step, self.out = signum, step, out
    name = signal.Signals(signum).name
    saved = (
      f"saved checkpoint {step} in {out / 'checkpoints'}"
      if step is not None
      else "no step had run, nothing to save"
    )
    command = shlex.join(["python", "-m", command, *sys.argv[1:]])
    super().__init__(f"interrupted by {name}: {saved}. Rerun the same command to resume: {command}")


# --------------------------------------------------------------------------- setup


PATH_ERRORS = (ValueError, KeyError, TypeError, OSError, SafetensorError)


def load_model(config, mesh):
  """(model, base params placed on `mesh`, tokenizer). The params come boxed with their axis
  names, so jlora knows their layout. The config.model fields are checked against the
  checkpoint's family before any weight is read. With config.model.nnx, the model is the NNX
  model its factory builds (load_nnx_model); every later stage is the same."""
  if config.model.get("nnx") is not None:
    return load_nnx_model(config, mesh)
  path_errors = PATH_ERRORS
  with naming(f"config.model.path = {config.model.path!r}", path_errors):
    # A GGUF is converted by process 0; the others wait for it, then read its cache.
    directory = distributed.main_first(lambda: resolve_checkpoint(config.model.path))
    hf_config = read_json(Path(directory) / "config.json")
  overrides = config_lib.model_overrides(config, hf_config)
  with naming(f"config.model.path = {config.model.path!r}", path_errors):
    return load_hf_dir(directory, mesh=mesh, **overrides)


def load_nnx_model(config, mesh):
  """(NnxCausalLM, its nnx.State placed on `mesh` by its sharding metadata, tokenizer) from
  config.model.nnx = "package.module:factory" (see train.nnx_model)."""
  spec, path = config.model.nnx, config.model.path
  what = f"config.model.nnx = {spec!r}"
  model, state, tokenizer = nnx_model.load(spec, path, what, f"config.model.path = {path!r}", mesh)
  check_nnx_run(config, what, model.config)
  return model, state, tokenizer


def check_nnx_run(config, what: str, family) -> None:
  """What an NNX model can't do in the trainer, refused before any step runs."""
  if config.tokens.get("add") and family is None:
    raise UserError(
      f"config.tokens.add: the NNX model of {what} declares no registered family (model.config "
      "with a model_type, e.g. a to_hf_dict() method), so its vocab_size is unknown; declare it "
      "or drop config.tokens.add."
    )
  ignored = sorted(config_lib.model_overrides(config))
  if ignored:
    log(
      f"note: config.model.{', config.model.'.join(ignored)} apply to jlora's own families; "
      "the NNX factory builds its model as it is"
    )
  wanted = [name for name in ("export_merged", "export_gguf") if config.get(name)]
  if wanted and family is None:
    raise UserError(
      f"config.{wanted[0]}: the NNX model of {what} declares no registered family (model.config "
      f"with a model_type in {sorted(registry.MODEL_TYPES)}, e.g. a to_hf_dict() method), so "
      "jlora can't name its tensors for the export; turn it off or declare the family."
    )


def add_tokens(config, model, params, tokenizer):
  """(model, params, tokenizer, {table path: token ids}) with config.tokens.add in the tokenizer
  (as special tokens) and the vocabulary grown to hold them (new rows: the mean row)."""
  new = list(config.tokens.get("add") or [])
  if not new:
    return model, params, tokenizer, None
  old = model.config.vocab_size
  model, params, tables = jlora.tokens.add_tokens(model, params, tokenizer, new)
  ids = tokenizer.convert_tokens_to_ids(new)
  log(
    f"tokens: {dict(zip(new, ids))} train in {sorted(tables)} "
    f"(vocabulary {old} -> {model.config.vocab_size})"
  )
  return model, params, tokenizer, tables


# A conversation every chat template must render, with the contents it must write.
SAMPLE_CHAT = (
  {"role": "user", "content": "What is 2 + 2?"},
  {"role": "assistant", "content": "It is 4."},
)


def set_chat_template(config, tokenizer) -> None:
  """config.tokens.chat_template replaces the tokenizer's template, once it renders SAMPLE_CHAT
  with both messages' contents (the tokenizer's own special tokens are in scope, as in training)."""
  from jinja2.exceptions import TemplateError

  template = config_lib.chat_template_text(config)
  if not template:
    return
  shown = config.tokens.chat_template
  shown = shown if len(shown) <= 60 else shown[:57] + "..."
  tokenizer.chat_template = template
  try:
    text = tokenizer.apply_chat_template(list(SAMPLE_CHAT), tokenize=False)
  except (TemplateError, TypeError, ValueError) as e:
    raise UserError(
      f"config.tokens.chat_template: {shown!r} fails to render a sample conversation "
      f"(user, assistant): {' '.join(str(e).split())}"
    ) from None
  if not all(m["content"] in text for m in SAMPLE_CHAT):
    raise UserError(
      f"config.tokens.chat_template: {shown!r} renders a sample conversation without its "
      f"messages' contents (got {text[:80]!r}); expected a template that writes each "
      "message['content']."
    )
  log(f"chat template: {shown!r}")


def eva_data(config, model, arrays, batches: int = 2):
  """init='eva': (run, the first `batches` training batches, their labelled tokens), else None."""
  if config.lora.init != "eva":
    return None
  if "loss_mask" not in arrays:
    raise UserError("config.lora.init: 'eva' needs SFT data (rows with a loss mask).")
  rows = config.data.batch_size
  chunks = [{k: v[i * rows : (i + 1) * rows] for k, v in arrays.items()} for i in range(batches)]
  run = lambda p, b: jlora.wrap(model.apply)(
    {"params": p}, b["input_ids"], b["positions"], b["segment_ids"]
  )
  return run, [c for c in chunks if len(c["input_ids"])], lambda b: b["loss_mask"] > 0


def adapt(config, params, tokens=None, eva=None, layout=None):
  """(trainable, frozen): the base quantized by config.quant, adapted by config.lora, with the
  rows of `tokens` ({table path: ids}, from add_tokens) trainable; `eva`: eva_data's; `layout`:
  the weights' roles where the params carry none (nnx_causal.weight_layout)."""
  lora, quant = config_lib.library_config(config, "lora"), config_lib.quant_config(config)
  if tokens:
    lora = dataclasses.replace(lora, trainable_token_indices=tokens)
  key = jax.random.key(config.seed)
  with config_lib.user_words():
    return jlora.prepare_for_training(params, lora, key, quant=quant, eva_data=eva, layout=layout)


def describe_model(config, model) -> str:
  source = config.model.path if config.model.get("nnx") is None else f"NNX {config.model.nnx}"
  if model.config is None:
    return f"{source} (no registered family)"
  return f"{source} ({model.config.num_hidden_layers} layers, d={model.config.hidden_size})"


def param_summary(trainable, frozen) -> str:
  """The line PEFT's print_trainable_parameters prints."""
  params = jlora.combine(trainable, frozen)
  count = jlora.adapter_count(params)
  base = sum(
    math.prod(leaf.base.shape if is_adapter(leaf) else leaf.shape)
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: is_adapter(x) or is_quantized(x))
  )
  total = base + count
  return (
    f"trainable params: {count:,d} || all params: {total:,d} || "
    f"trainable%: {100 * count / total:.4f}"
  )


def load_train_data(config, tokenizer):
  arrays, stats = data_lib.prepare_spec(
    config.data.train,
    tokenizer,
    max_length=config.data.max_length,
    field="config.data.train",
    pack=config.data.pack,
    use_chat_template=config.data.use_chat_template,
    train_on_prompt=config.data.train_on_prompt,
    seed=config.seed,
  )
  rows = len(arrays["input_ids"])
  log(
    f"data: {stats['rows']} rows -> {rows} rows of {config.data.max_length} tokens; "
    f"{stats['truncated']} truncated, {stats['skipped_prompt_too_long']} skipped (prompt longer "
    f"than max_length), {stats['skipped_empty_completion']} skipped (empty completion), "
    f"{stats['label_tokens']:,d} label tokens"
  )
  if config.data.batch_size > rows:
    log(
      f"warning: config.data.batch_size={config.data.batch_size} is larger than the {rows} "
      f"training rows; each step repeats rows, and one epoch (every row once) is less than "
      "one step."
    )
  return arrays, stats


def compile_step(t: Trainer, example_batch):
  """The train step, jitted with its shardings and compiled for the batch's shapes."""
  sharding_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  trainable_sh, frozen_sh, opt_sh = (
    sharding_of(t.trainable),
    sharding_of(t.frozen),
    sharding_of(t.opt_state),
  )
  step = step_lib.make_train_step(
    t.model,
    t.tx,
    accum_steps=t.config.data.grad_accum,
    dropout_rng=t.lora.dropout > 0,
    objective=t.task.objective(t.config),
  )
  jitted = jax.jit(
    step,
    in_shardings=(trainable_sh, opt_sh, frozen_sh, sharding_of(example_batch), None, None),
    out_shardings=(trainable_sh, opt_sh, None),
    donate_argnums=(0, 1),
  )
  compiled = jitted.lower(t.trainable, t.opt_state, t.frozen, example_batch, 0, t.rng).compile()
  memory = compiled.memory_analysis()
  log(
    f"memory: frozen base {mib(step_lib.tree_bytes(t.frozen))}, adapters "
    f"{mib(step_lib.tree_bytes(t.trainable))}, optimizer {mib(step_lib.tree_bytes(t.opt_state))}; "
    f"compiled step (XLA): arguments {mib(memory.argument_size_in_bytes)}, temporaries "
    f"{mib(memory.temp_size_in_bytes)}, outputs {mib(memory.output_size_in_bytes)}"
  )
  return compiled


def setup(config, out: Path, mesh, record: outputs.RunRecord, task: Task) -> Trainer:
  """Model, adapters, data, evaluator, optimizer and the compiled step."""
  model, base, tokenizer = load_model(config, mesh)
  model, base, tokenizer, tokens = add_tokens(config, model, base, tokenizer)
  set_chat_template(config, tokenizer)
  arrays, stats = task.load_train_data(config, tokenizer)
  eva = eva_data(config, model, arrays)
  trainable, frozen = adapt(config, base, tokens, eva, weight_layout(model))
  del base
  log(f"model: {describe_model(config, model)}, quant: {config.quant.kind}")
  log(param_summary(trainable, frozen))
  log(
    f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} device(s); "
    f"{distributed.describe()}"
  )
  o = config.optim
  tx, schedule = step_lib.make_optimizer(
    o.lr, config.steps, o.warmup_steps, o.weight_decay, o.clip_norm, o.get("loraplus_ratio", 0.0)
  )
  opt_sh = shard_lib.optimizer_state_shardings(
    jax.eval_shape(tx.init, trainable), jax.tree.map(lambda x: x.sharding, trainable), mesh
  )
  t = Trainer(
    task=task,
    config=config,
    out=out,
    mesh=mesh,
    record=record,
    model=model,
    tokenizer=tokenizer,
    lora=config_lib.library_config(config, "lora"),
    trainable=trainable,
    frozen=frozen,
    train_arrays=arrays,
    data_stats=stats,
    budget=step_lib.label_budget(arrays["loss_mask"]),
    evaluator=task.make_evaluator(config, model, tokenizer, mesh),
    tx=tx,
    schedule=schedule,
    opt_state=jax.jit(tx.init, out_shardings=opt_sh)(trainable),
    step_fn=None,
    checkpoints=Checkpointer(out / "checkpoints"),
    rng=jax.random.key(config.seed),
  )
  task.prepare(t)
  first = data_lib.TrainIterator(arrays, config.data.batch_size, seed=config.seed).next_ids()
  t.step_fn = compile_step(t, put_batch(t.train_arrays, first, t.budget, mesh))  # as prepared
  return t


# --------------------------------------------------------------------------- restore


def restore(t: Trainer) -> tuple[dict, int, dict | None]:
  """(state, first step, data position): from the newest readable checkpoint, or fresh."""
  state = {"trainable": t.trainable, "opt_state": t.opt_state}

  def check(meta: dict) -> None:
    saved = meta.get("fingerprint")
    differences = config_lib.fingerprint_differences(
      saved if isinstance(saved, dict) else {}, t.record.fingerprint
    )
    if differences or meta.get("run_id") != t.record.run_id:
      raise UserError(
        f"{t.out / 'checkpoints'} holds checkpoints of another run "
        f"({'; '.join(differences) or 'another run id'}); use another config.output_dir, or "
        "pass --config.overwrite=True to replace them."
      )

  restored = t.checkpoints.restore_newest(state, check)
  if restored is None:
    return state, 0, None
  state, meta = restored
  log(f"resuming from step {meta['step']} ({t.out / 'checkpoints'})")
  return state, meta["step"], meta["data"]


def checkpoint_meta(t: Trainer, step: int, data_position: dict) -> dict:
  return {
    "step": step,
    "data": data_position,
    "fingerprint": t.record.fingerprint,
    "run_id": t.record.run_id,
  }


# --------------------------------------------------------------------------- train


class SignalFlag:
  """Records SIGINT / SIGTERM instead of dying, so the loop can save first. A second signal
  of the same kind stops at once, as the user then clearly wants."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    if self.signum == signum:  # the second one: stop now, the last saved checkpoint stays
      raise Stopped(signum, "a second time, before the current step was saved")
    self.signum = signum
    log(f"{signal.Signals(signum).name}: stopping after the current step (again to stop now)")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def agree(self) -> None:
    """With several processes, a signal that reached any of them stops all after this step."""
    signals = distributed.all_processes(self.signum or 0)
    self.signum = next((int(s) for s in signals if s), None)

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False


def train_step(t: Trainer, state: dict, step: int, ids) -> tuple[dict, dict, float]:
  """One optimizer step on the rows `ids`: (new state, metrics as floats, seconds)."""
  tick = time.perf_counter()
  batch = put_batch(t.train_arrays, ids, t.budget, t.mesh)
  trainable, opt_state, metrics = t.step_fn(
    state["trainable"], state["opt_state"], t.frozen, batch, step, t.rng
  )
  metrics = {k: float(v) for k, v in metrics.items()}
  return {"trainable": trainable, "opt_state": opt_state}, metrics, time.perf_counter() - tick


def stop_non_finite(t: Trainer, state, step: int, position, metrics, rows) -> None:
  # The step left the state untouched, so this is the last good one, before the bad batch.
  if t.checkpoints.latest_step() != step:  # else that very state is already saved
    t.checkpoints.save(step, state, checkpoint_meta(t, step, position))
  if distributed.is_main():
    outputs.write_metrics(t.out / "metrics.jsonl", rows)
  raise UserError(
    f"step {step + 1}: the loss is {metrics['loss']} (grad norm {metrics['grad_norm']}). Saved the "
    f"last good state as checkpoint {step} in {t.out / 'checkpoints'}. Lower config.optim.lr, or "
    "check the data."
  )


# Every objective's step reports these; a task's other metrics (e.g. rewards) join the rows.
STEP_METRICS = ("loss", "grad_norm", "finite", "tokens")


def train(t: Trainer, state, start: int, data_state, rows: list, flag: SignalFlag, progress: bool):
  """Steps start..config.steps: (final state, metric rows, train tokens/s after the first step)."""
  c, metrics_path = t.config, t.out / "metrics.jsonl"
  batches = data_lib.TrainIterator(t.train_arrays, c.data.batch_size, seed=c.seed, state=data_state)
  progress = progress and distributed.is_main()
  bar = tqdm(total=c.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
  segments = t.train_arrays["segment_ids"]
  row_tokens = (segments > 0).reshape(len(segments), -1).sum(axis=1)
  seconds = tokens = 0.0
  if flag.signum is not None:
    raise Interrupted(flag.signum, None, t.out, t.task.command)
  try:  # an error's line then starts on a line of its own, not after the progress bar
    for step in range(start, c.steps):
      position = batches.state()
      ids = batches.next_ids()
      state, metrics, elapsed = train_step(t, state, step, ids)
      if not metrics["finite"]:
        stop_non_finite(t, state, step, position, metrics, rows)
      n = int(row_tokens[ids].sum())
      flag.agree()  # every process stops after the same step
      if step > start:  # the first step after a (re)start includes warm-up effects
        seconds, tokens = seconds + elapsed, tokens + n
      done = step + 1 == c.steps
      row = {"step": step + 1, "loss": metrics["loss"], "lr": float(t.schedule(step))}
      row.update(grad_norm=metrics["grad_norm"], tokens_per_s=n / elapsed)
      row.update((k, v) for k, v in metrics.items() if k not in STEP_METRICS)  # the task's own
      if (step + 1) % c.eval_every == 0 or done:
        row["eval_loss"] = t.evaluator.loss(state["trainable"], t.frozen)
      rows.append(row)
      if (
        (step + 1) % c.log_every == 0 or done or flag.signum is not None
      ) and distributed.is_main():
        outputs.write_metrics(metrics_path, rows)
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{n / elapsed:,.0f}")
      if (step + 1) % c.save_every == 0 or done or flag.signum is not None:
        t.checkpoints.save(step + 1, state, checkpoint_meta(t, step + 1, batches.state()))
      if flag.signum is not None and not done:
        raise Interrupted(flag.signum, step + 1, t.out, t.task.command)
  finally:
    bar.close()
  t.checkpoints.close()
  return state, rows, tokens / seconds if seconds else None


# --------------------------------------------------------------------------- evaluate / finish


def evaluate_before(t: Trainer, resumed: bool) -> dict:
  """The base model's eval: this run's before.json when resuming, else computed and saved."""
  path = t.out / "before.json"
  saved = outputs.read_json(path) if resumed else None
  if isinstance(saved, dict) and saved.get("run_id") == t.record.run_id:
    return saved
  log("evaluating the base model ...")
  before = {"run_id": t.record.run_id, **t.evaluator.evaluate(t.trainable, t.frozen)}
  if distributed.is_main():
    outputs.write_json(path, before)
  return before


def scores(result: dict) -> dict:
  return {k: v for k, v in result.items() if k not in ("samples", "run_id")}


def write_gguf(t: Trainer, params) -> None:
  """model-<type>.gguf (merged) and, where llama.cpp can hold the adapters, adapter.gguf."""
  c = t.config
  pre = export_lib.source_tokenizer_pre(c.model.path)
  merged = t.out / f"model-{c.export_gguf}.gguf"
  jlora.export_gguf(
    merged, params, t.model.config, t.tokenizer, c.export_gguf, overwrite=True, tokenizer_pre=pre
  )
  log(f"wrote {merged} (llama-cli -m {merged})")
  try:
    jlora.save_adapter_gguf(t.out / "adapter.gguf", params, t.lora, t.model.config, overwrite=True)
  except ValueError as e:  # e.g. an adapted embedding: the merged file still has it
    log(f"no adapter.gguf: {e}")


def finish(t: Trainer, state, rows: list, before: dict, speed, started: float) -> dict:
  """Final eval, adapter, optional merged export, plot and summary.json."""
  c = t.config
  log("evaluating the fine-tuned model ...")
  final_loss = rows[-1].get("eval_loss") if rows and rows[-1]["step"] == c.steps else None
  after = t.evaluator.evaluate(state["trainable"], t.frozen, eval_loss=final_loss)
  save_adapter_and_export(t, state["trainable"])
  if distributed.is_main():
    outputs.plot_losses(t.out / "loss.png", rows)
  examples = t.evaluator.examples
  summary = {
    "run_id": t.record.run_id,
    "steps": c.steps,
    "wall_s": time.time() - started,
    "train_tokens_per_s": speed,
    "data": t.data_stats,
    "before": scores(before),
    "after": scores(after),
    "samples": [
      {
        "prompt": t.tokenizer.decode(e["prompt_ids"], skip_special_tokens=True),
        "reference": e["reference"],
        "before": b,
        "after": a,
      }
      for e, b, a in zip(examples, before["samples"], after["samples"])
    ],
  }
  if distributed.is_main():
    outputs.write_json(t.out / "summary.json", summary)
  return summary


def save_adapter_and_export(t: Trainer, trainable) -> None:
  """The PEFT adapter and, on request, the merged export: gathered from every process (each
  tensor checked complete), then written by process 0."""
  params = jlora.combine(distributed.gather_to_host(trainable), t.frozen)
  path = str(t.config.model.path)
  kept = f"the checkpoints in {t.out / 'checkpoints'} and earlier outputs are intact"
  if distributed.is_main():
    adapter_bytes = step_lib.tree_bytes(trainable)
    with writing(t.out / "adapter_model.safetensors", adapter_bytes, kept):
      jlora.save_adapter(
        t.out, params, t.lora, base_model_name_or_path=path, model_config=peft_names(t.model)
      )
      # PEFT users resize the base to this tokenizer (and use its template), then load.
      if t.config.tokens.get("add") or t.config.tokens.get("chat_template"):
        t.tokenizer.save_pretrained(str(t.out))
  model_bytes = step_lib.tree_bytes(t.frozen)
  if t.config.export_merged:
    # Merged on the mesh (every process takes part), then gathered weight by weight.
    merged = distributed.gather_to_host(jlora.merge(jlora.combine(trainable, t.frozen)))
    if distributed.is_main():
      with writing(t.out / "merged", model_bytes, kept):
        jlora.export_merged(t.out / "merged", merged, t.model.config, t.tokenizer)
  if t.config.export_gguf and distributed.is_main():
    with writing(t.out / f"model-{t.config.export_gguf}.gguf", model_bytes, kept):
      write_gguf(t, params)
  distributed.barrier("outputs-written")


def report_scores(summary: dict, n_eval: int) -> None:
  b, a = summary["before"], summary["after"]
  log(f"eval loss: {b['eval_loss']:.4f} -> {a['eval_loss']:.4f}")
  log(f"perplexity: {b['perplexity']:.2f} -> {a['perplexity']:.2f}")
  for name in (k for k in a if k not in ("eval_loss", "perplexity")):
    log(f"{name} on {n_eval} eval rows: {b[name]:.1%} -> {a[name]:.1%}")


def report(summary: dict, n_eval: int, out: Path, task: Task) -> None:
  task.report_scores(summary, n_eval)
  for i, s in enumerate(summary["samples"], 1):
    log(
      f"--- sample {i}\n{s['prompt'].strip()}\n  reference: {s['reference']}\n"
      f"  before:    {s['before']}\n  after:     {s['after']}"
    )
  tps = summary["train_tokens_per_s"]
  log(
    f"done in {summary['wall_s']:.0f} s"
    + (f", {tps:,.0f} train tokens/s" if tps else "")
    + f". Adapter (PEFT format), metrics.jsonl, loss.png and summary.json are in {out}"
  )


# --------------------------------------------------------------------------- the run


def claim(out: Path, config) -> tuple[outputs.RunRecord, bool]:
  """outputs.claim, decided by process 0 alone and shared, so every process agrees on the run."""

  def decide() -> list:
    record, resumed = outputs.claim(out, config)
    return [dataclasses.asdict(record), resumed]

  record, resumed = distributed.share_from_main(decide)
  return outputs.RunRecord(**record), resumed


SFT = Task(
  command="train.sft",
  default_config="configs/llama.py",
  check=lambda config: None,
  load_train_data=load_train_data,
  objective=lambda config: step_lib.SFT,
  make_evaluator=Evaluator,
  prepare=lambda trainer: None,
  report_scores=report_scores,
)


def run(config, progress: bool = True, task: Task = SFT) -> dict:
  """setup -> restore -> train -> evaluate -> finish. Every config value is checked first."""
  distributed.initialize(config.get("distributed"))  # before anything asks JAX for devices
  config_lib.check_config(config)
  task.check(config)
  started = time.time()
  out = outputs.check_output_dir(config.output_dir)
  record, resumed = claim(out, config)
  sizes = config_lib.mesh_sizes(config)
  mesh = shard_lib.make_mesh(**sizes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES), SignalFlag() as flag:
    t = setup(config, out, mesh, record, task)
    state, start, data_state = restore(t)
    before = evaluate_before(t, resumed and start > 0)
    rows = outputs.read_metrics(out / "metrics.jsonl", start) if start else []
    rows = rows or [{"step": 0, "eval_loss": before["eval_loss"]}]
    state, rows, speed = train(t, state, start, data_state, rows, flag, progress)
    summary = finish(t, state, rows, before, speed, started)
  report(summary, len(t.evaluator.examples), out, task)
  return summary


DEFAULT_CONFIG = "configs/llama.py"


def parse_flags(argv: list[str], default_config: str | None = None):
  """The config from the command line; a bad flag, config file or field is a UserError. Each call
  parses into fresh flag values, so a process (a test) can parse several command lines.
  `default_config`: the file to load when argv names none (another task's default)."""
  if default_config and not any(a == "--config" or a.startswith("--config=") for a in argv):
    argv = [argv[0], f"--config={default_config}", *argv[1:]]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    "Path to an ml_collections config file.",
    flag_values=values,
    lock_config=True,
    sys_argv=list(argv),
  )
  flags.DEFINE_bool("verbose", False, "Show full tracebacks and library logs.", flag_values=values)
  try:
    rest = values(argv)
  except flags.Error as e:
    raise UserError(str(e)) from e
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown field
    raise UserError(unknown_field_message(argv, innermost_text(e))) from e
  except (TypeError, ValueError) as e:  # a value of the wrong type for its field
    raise UserError(f"{e}") from e
  except OSError as e:  # the config file failed to load, seen by a later --config.FIELD
    raise config_file_error(e, argv) from e
  if len(rest) > 1:
    raise UserError(f"unexpected arguments {rest[1:]}; override fields as --config.FIELD=VALUE.")
  config = holder.value
  error = getattr(config, "__dict__", {}).get("_error")  # config_flags' stand-in for a failed load
  if error is not None:
    raise config_file_error(error, argv)
  return config


def config_file_error(error: BaseException, argv: list[str]) -> UserError:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  given = [
    value if flag == "--config" else flag.partition("=")[2]
    for flag, value in zip(argv, [*argv[1:], ""])
    if flag == "--config" or flag.startswith("--config=")
  ]
  name = given[-1] if given else DEFAULT_CONFIG
  return UserError(f"--config={name}: can't load it ({lines[-1] if lines else error}).")


def innermost_text(error: BaseException) -> str:
  """The message string at the bottom of exceptions wrapped in exceptions' args."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def section_fields(argv: list[str], section: str) -> list[str]:
  """The fields of `section` ('config.optim') in the config file the command line names."""
  given = [
    value if flag == "--config" else flag.partition("=")[2]
    for flag, value in zip(argv, [*argv[1:], ""])
    if flag == "--config" or flag.startswith("--config=")
  ]
  try:
    path = (given[-1] if given else DEFAULT_CONFIG).partition(":")[0]
    node = runpy.run_path(path)["get_config"]()
    for part in section.split(".")[1:]:
      node = node[part]
    return list(node.keys())
  except Exception:  # the file is checked, and reported, by the parse itself
    return []


def unknown_field_message(argv: list[str], message: str) -> str:
  """'--config.optim.learning_rate=1e-3: config.optim has no field 'learning_rate'; valid
  fields: lr, clip_norm, ... (closest first).'"""
  name = message.partition("\n")[0].strip("'\"")
  for arg in argv:
    path = arg.partition("=")[0].removeprefix("--")
    if path.startswith("config.") and path.rsplit(".", 1)[-1] == name:
      section = path.rpartition(".")[0]
      valid = closest_first(name, section_fields(argv, section))
      listed = f"; valid fields: {', '.join(valid)}." if valid else "."
      return f"{arg}: {section} has no field {name!r}{listed}"
  return f"unknown config field {name!r}."


def main(argv: list[str] | None = None, task: Task = SFT) -> None:
  """The command line. Flag parsing is inside the one error path too: a bad flag, a missing
  config file or an unknown field is one line and exit 2, like every other input error."""
  argv = sys.argv if argv is None else argv
  with exit_on_user_error(verbose_requested(argv)):
    config = parse_flags(argv, task.default_config)
    try:
      run(config, task=task)
    except Interrupted as e:
      print(str(e), file=sys.stderr)
      sys.exit(128 + e.signum)


if __name__ == "__main__":
  run_cli(main)

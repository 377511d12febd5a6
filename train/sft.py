"""Supervised fine-tuning with LoRA / QLoRA.

  python -m train.sft --config configs/llama.py [--config.lora.rank=16 ...]

Loads a Llama-family base (HF dir, .gguf, hub id or an embedded model), optionally
quantizes it, adds LoRA adapters, and trains them with a step compiled over a
(data, fsdp, tensor) mesh. Rerunning the same command resumes from the latest
checkpoint in output_dir. Outputs: a PEFT adapter, metrics.jsonl, loss.png,
summary.json and, on request, a merged HF checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import logging as absl_logging
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

import jlora
from jlora import sharding as shard_lib
from jlora.lora import is_lora
from jlora.models.llama import DEFAULT_RULES, LlamaConfig, LlamaForCausalLM
from jlora.models.loading import load_params, load_tokenizer, resolve_checkpoint
from jlora.quant import is_quantized
from train import data as data_lib
from train import step as step_lib
from train.checkpoint import Checkpointer
from train.generate import generate_ids

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
QUANT_KINDS = ("none", "nf4", "int4")
BATCH_AXES = ("data", "fsdp")


def log(message: str) -> None:
  tqdm.write(message, file=sys.stdout)


# --------------------------------------------------------------------------- config


def _dtype(field: str, value: str):
  if value not in DTYPES:
    raise ValueError(
      f"{field}={value!r} is not supported: use one of {', '.join(map(repr, DTYPES))}."
    )
  return DTYPES[value]


def parse_targets(value: str):
  """'all-linear'; 'q_proj,v_proj' (names or path suffixes); or a regex on the module path."""
  value = value.strip()
  if value == "all-linear":
    return value
  if re.fullmatch(r"[\w./-]+(\s*,\s*[\w./-]+)*", value):
    return [t.strip() for t in value.split(",")]
  return value


def lora_config(config) -> jlora.LoraConfig:
  c = config.lora
  return jlora.LoraConfig(
    rank=c.rank,
    alpha=float(c.alpha),
    dropout=float(c.dropout),
    targets=parse_targets(c.targets),
    exclude=parse_targets(c.exclude) if c.exclude else None,
    use_rslora=c.use_rslora,
    init=c.init,
    dtype=_dtype("config.lora.dtype", c.dtype),
  )


def check_config(config) -> None:
  if config.quant.kind not in QUANT_KINDS:
    raise ValueError(
      f"config.quant.kind={config.quant.kind!r} is unknown: valid values are "
      f"{', '.join(map(repr, QUANT_KINDS))}."
    )
  for field in (
    "steps",
    "data.batch_size",
    "data.grad_accum",
    "data.max_length",
    "data.eval_batch_size",
    "save_every",
    "eval_every",
    "log_every",
  ):
    value = config
    for part in field.split("."):
      value = value[part]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{field}={value!r} is invalid: it must be a positive integer.")
  if config.data.batch_size % config.data.grad_accum:
    raise ValueError(
      f"config.data.batch_size={config.data.batch_size} must be divisible by "
      f"config.data.grad_accum={config.data.grad_accum}."
    )


def fingerprint(config) -> str:
  """What a checkpoint must agree with to be resumed."""
  keep = {k: config[k].to_dict() for k in ("model", "data", "lora", "quant", "optim")}
  keep.update(seed=config.seed, steps=config.steps)
  return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- setup


def load_model(config, mesh):
  """The base model, loaded straight into its shardings, and the base's PartitionSpecs."""
  directory = resolve_checkpoint(config.model.path)
  hf_config = json.loads((directory / "config.json").read_text())
  model_config = LlamaConfig.from_hf(
    hf_config,
    dtype=_dtype("config.model.dtype", config.model.dtype),
    param_dtype=_dtype("config.model.param_dtype", config.model.param_dtype),
    remat_policy=config.model.remat_policy,
  )
  model = LlamaForCausalLM(model_config)
  example = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), example)
  base_specs = shard_lib.logical_specs(abstract["params"], DEFAULT_RULES)
  params = load_params(directory, model, shardings=shard_lib.named(mesh, base_specs))
  return model, params, load_tokenizer(directory), base_specs, jlora.trace_layout(model, example)


def adapt(config, model_params, base_specs, layout, mesh):
  params = model_params
  if config.quant.kind != "none":
    qcfg = jlora.QuantConfig(
      kind=config.quant.kind,
      block_size=config.quant.block_size,
      double_quant=config.quant.double_quant,
    )
    params = jlora.quantize(params, qcfg, layout=layout)
  params = jlora.apply(params, lora_config(config), jax.random.key(config.seed), layout=layout)
  shardings = shard_lib.named(mesh, shard_lib.param_specs(params, base_specs))
  return jax.device_put(params, shardings), shardings


def param_summary(params) -> str:
  """The line PEFT's print_trainable_parameters prints."""
  trainable = jlora.adapter_count(params)
  base = sum(
    math.prod(leaf.base.shape if is_lora(leaf) else leaf.shape)
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: is_lora(x) or is_quantized(x))
  )
  total = base + trainable
  return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


# --------------------------------------------------------------------------- evaluation


class Evaluator:
  """Eval loss over the eval split, and the task metric from greedy generations."""

  def __init__(self, config, model, tokenizer, mesh):
    self.config, self.model, self.tokenizer, self.mesh = config, model, tokenizer, mesh
    rows = data_lib.load_rows(config.data.eval, "validation", field="config.data.eval")
    self.arrays, self.stats = data_lib.prepare(
      config.data.eval,
      tokenizer,
      max_length=config.data.max_length,
      field="config.data.eval",
      split_name="validation",
      pack=config.data.pack,
      use_chat_template=config.data.use_chat_template,
      train_on_prompt=config.data.train_on_prompt,
      seed=config.seed,
      rows=rows,
    )
    self.budget = step_lib.label_budget(self.arrays["loss_mask"])
    if config.eval_examples:
      rows = rows[: config.eval_examples]
    self.examples = data_lib.prompts_and_references(
      rows, tokenizer, use_chat_template=config.data.use_chat_template
    )
    self.loss_fn = jax.jit(step_lib.make_eval_step(model))
    self.apply_fn = jlora.wrap(model.apply)

  def loss(self, trainable, frozen) -> float:
    total = count = 0.0
    for batch in data_lib.eval_batches(self.arrays, self.config.data.eval_batch_size):
      batch = put_batch(step_lib.gather_labels(batch, self.budget), self.mesh)
      value, n = self.loss_fn(trainable, frozen, batch)
      total, count = total + float(value), count + float(n)
    return total / max(count, 1.0)

  def generations(self, trainable, frozen) -> list[str]:
    eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
    outputs = generate_ids(
      self.model,
      jlora.combine(trainable, frozen),
      [e["prompt_ids"] for e in self.examples],
      self.config.max_new_tokens,
      eos_ids=eos,
      apply_fn=self.apply_fn,
    )
    return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]

  def evaluate(self, trainable, frozen, eval_loss: float | None = None) -> dict:
    texts = self.generations(trainable, frozen)
    hits = [data_lib.exact_match(t, e["reference"]) for t, e in zip(texts, self.examples)]
    if eval_loss is None:
      eval_loss = self.loss(trainable, frozen)
    return {
      "eval_loss": eval_loss,
      "exact_match": float(np.mean(hits)) if hits else 0.0,
      "samples": texts[: self.config.samples],
    }


def put_batch(batch: dict, mesh) -> dict:
  spec = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  return {k: jax.device_put(v, spec) for k, v in batch.items()}


# --------------------------------------------------------------------------- outputs


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
  """Metrics already logged, minus steps after `up_to_step` (they will be redone on resume)."""
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r["step"] <= up_to_step]


def write_metrics(path: Path, rows: list[dict]) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
  os.replace(tmp, path)


def plot_losses(path: Path, rows: list[dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------- the run


def run(config, progress: bool = True) -> dict:
  check_config(config)
  started = time.time()
  out = Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  mesh = shard_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  rows_per_device = config.data.batch_size // config.data.grad_accum
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows_per_device % shards:
    raise ValueError(
      f"config.data.batch_size / grad_accum = {rows_per_device} rows must divide evenly over the "
      f"data x fsdp = {shards} mesh shards."
    )

  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    model, base_params, tokenizer, base_specs, layout = load_model(config, mesh)
    params, shardings = adapt(config, base_params, base_specs, layout, mesh)
    del base_params
    trainable, frozen = jlora.split(params)
    trainable_sh, frozen_sh = jlora.split(shardings)
    log(
      f"model: {config.model.path} ({model.config.num_hidden_layers} layers, d={model.config.hidden_size}), "
      f"quant: {config.quant.kind}"
    )
    log(param_summary(params))
    log(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} device(s)")

    train_arrays, stats = data_lib.prepare(
      config.data.train,
      tokenizer,
      max_length=config.data.max_length,
      field="config.data.train",
      pack=config.data.pack,
      use_chat_template=config.data.use_chat_template,
      train_on_prompt=config.data.train_on_prompt,
      seed=config.seed,
    )
    log(
      f"data: {stats['rows']} rows -> {len(train_arrays['input_ids'])} rows of {config.data.max_length} tokens; "
      f"{stats['truncated']} truncated, {stats['skipped_prompt_too_long']} skipped (prompt longer than "
      f"max_length), {stats['label_tokens']:,d} label tokens"
    )
    budget = step_lib.label_budget(train_arrays["loss_mask"])
    evaluator = Evaluator(config, model, tokenizer, mesh)

    tx, schedule = step_lib.make_optimizer(
      config.optim.lr,
      config.steps,
      config.optim.warmup_steps,
      config.optim.weight_decay,
      config.optim.clip_norm,
    )
    opt_sh = shard_lib.follow_params(jax.eval_shape(tx.init, trainable), trainable_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    state = {"trainable": trainable, "opt_state": opt_state}
    rng = jax.random.key(config.seed)

    checkpoints = Checkpointer(out / "checkpoints")
    start, data_state = 0, None
    latest = checkpoints.latest_step()
    if latest is not None:
      state, meta = checkpoints.restore(latest, state)
      if meta["fingerprint"] != fingerprint(config):
        raise ValueError(
          f"{out} holds a checkpoint of a different run (config fingerprint {meta['fingerprint']} "
          f"!= {fingerprint(config)}). Use another config.output_dir, or delete {out / 'checkpoints'}."
        )
      start, data_state = meta["step"], meta["data"]
      log(f"resuming from step {start} ({out / 'checkpoints'})")
    batches = data_lib.TrainIterator(
      train_arrays, config.data.batch_size, seed=config.seed, state=data_state
    )

    example_batch = put_batch(
      step_lib.gather_labels(
        next(iter(data_lib.TrainIterator(train_arrays, config.data.batch_size, seed=config.seed))),
        budget,
      ),
      mesh,
    )
    batch_sh = jax.tree.map(lambda x: x.sharding, example_batch)
    train_step = jax.jit(
      step_lib.make_train_step(
        model, tx, accum_steps=config.data.grad_accum, dropout=config.lora.dropout > 0
      ),
      in_shardings=(trainable_sh, opt_sh, frozen_sh, batch_sh, None, None),
      out_shardings=(trainable_sh, opt_sh, None),
      donate_argnums=(0, 1),
    )
    compiled = train_step.lower(
      state["trainable"], state["opt_state"], frozen, example_batch, 0, rng
    ).compile()
    memory = compiled.memory_analysis()
    log(
      f"memory: frozen base {mib(step_lib.tree_bytes(frozen))}, adapters {mib(step_lib.tree_bytes(trainable))}, "
      f"optimizer {mib(step_lib.tree_bytes(opt_state))}; compiled step (XLA): arguments "
      f"{mib(memory.argument_size_in_bytes)}, temporaries {mib(memory.temp_size_in_bytes)}, outputs "
      f"{mib(memory.output_size_in_bytes)}"
    )

    before_path = out / "before.json"
    if before_path.exists():
      before = json.loads(before_path.read_text())
    else:
      log("evaluating the base model ...")
      before = evaluator.evaluate(state["trainable"], frozen)
      before_path.write_text(json.dumps(before, indent=1))
    metrics_path = out / "metrics.jsonl"
    rows = read_metrics(metrics_path, start)
    if start == 0:
      rows = [{"step": 0, "eval_loss": before["eval_loss"]}]

    meta = lambda step, data_position: {
      "step": step,
      "data": data_position,
      "fingerprint": fingerprint(config),
      "rng": jax.random.key_data(rng).tolist(),
    }
    bar = tqdm(
      total=config.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True
    )
    train_time = train_tokens = 0.0
    for step in range(start, config.steps):
      position = batches.state()
      host_batch = step_lib.gather_labels(next(batches), budget)
      tokens = int((host_batch["segment_ids"] > 0).sum())
      tick = time.perf_counter()
      new_trainable, new_opt, metrics = compiled(
        state["trainable"], state["opt_state"], frozen, put_batch(host_batch, mesh), step, rng
      )
      loss = float(metrics["loss"])
      elapsed = time.perf_counter() - tick
      state = {"trainable": new_trainable, "opt_state": new_opt}
      if not bool(metrics["finite"]):
        # The step left the state untouched, so this is the last good one, before the bad batch.
        if checkpoints.latest_step() != step:  # else that very state is already saved
          checkpoints.save(step, state, meta(step, position))
        write_metrics(metrics_path, rows)
        raise FloatingPointError(
          f"step {step + 1}: the loss is {loss} (grad norm {float(metrics['grad_norm'])}). Saved the last good "
          f"state as checkpoint {step} in {out / 'checkpoints'}. Lower config.optim.lr, or check the data."
        )
      if step > start:  # the first step after a (re)start includes warm-up effects
        train_time, train_tokens = train_time + elapsed, train_tokens + tokens
      row = {
        "step": step + 1,
        "loss": loss,
        "lr": float(schedule(step)),
        "grad_norm": float(metrics["grad_norm"]),
        "tokens_per_s": tokens / elapsed,
      }
      done = step + 1 == config.steps
      if (step + 1) % config.eval_every == 0 or done:
        row["eval_loss"] = evaluator.loss(state["trainable"], frozen)
      rows.append(row)
      if (step + 1) % config.log_every == 0 or done:
        write_metrics(metrics_path, rows)
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / elapsed:,.0f}")
      if (step + 1) % config.save_every == 0 or done:
        checkpoints.save(step + 1, state, meta(step + 1, batches.state()))
    bar.close()
    checkpoints.close()

    trainable = state["trainable"]
    log("evaluating the fine-tuned model ...")
    final_loss = rows[-1].get("eval_loss") if rows and rows[-1]["step"] == config.steps else None
    after = evaluator.evaluate(trainable, frozen, eval_loss=final_loss)
    params = jlora.combine(trainable, frozen)
    cfg = lora_config(config)
    jlora.save_adapter(out, params, cfg, base_model_name_or_path=str(config.model.path))
    if config.export_merged:
      jlora.export_merged(out / "merged", params, model.config, tokenizer)
    plot_losses(out / "loss.png", rows)

  summary = {
    "steps": config.steps,
    "wall_s": time.time() - started,
    "train_tokens_per_s": train_tokens / train_time if train_time else None,
    "before": {k: before[k] for k in ("eval_loss", "exact_match")},
    "after": {k: after[k] for k in ("eval_loss", "exact_match")},
    "samples": [
      {
        "prompt": tokenizer.decode(e["prompt_ids"], skip_special_tokens=True),
        "reference": e["reference"],
        "before": b,
        "after": a,
      }
      for e, b, a in zip(evaluator.examples, before["samples"], after["samples"])
    ],
  }
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  report(summary, len(evaluator.examples), out)
  return summary


def report(summary: dict, n_eval: int, out: Path) -> None:
  b, a = summary["before"], summary["after"]
  log(f"eval loss: {b['eval_loss']:.4f} -> {a['eval_loss']:.4f}")
  log(f"exact match on {n_eval} eval rows: {b['exact_match']:.1%} -> {a['exact_match']:.1%}")
  for i, s in enumerate(summary["samples"], 1):
    log(
      f"--- sample {i}\n{s['prompt'].strip()}\n  reference: {s['reference']}\n  before:    {s['before']}\n"
      f"  after:     {s['after']}"
    )
  tps = summary["train_tokens_per_s"]
  log(
    f"done in {summary['wall_s']:.0f} s"
    + (f", {tps:,.0f} train tokens/s" if tps else "")
    + f". Adapter (PEFT format), metrics.jsonl, loss.png and summary.json are in {out}"
  )


_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/llama.py", "Path to an ml_collections config file.", lock_config=True
)


def main(argv) -> None:
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file operation at INFO
  if len(argv) > 1:
    raise app.UsageError(
      f"Unexpected arguments: {argv[1:]}. Override fields as --config.FIELD=VALUE."
    )
  try:
    run(_CONFIG.value)
  except (FileNotFoundError, ValueError, FloatingPointError) as e:
    if os.environ.get("JLORA_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)

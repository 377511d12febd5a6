"""DPO step time and peak memory: jlora (train.dpo's objective) vs TRL's DPOTrainer + PEFT.

  python -m bench.dpo [--steps 3] [--warmup 1] [--pairs 2]

Same model (the embedded SmolLM2-135M-Instruct, fp32), LoRA (r=8, alpha=16, all-linear, as
configs/dpo.py), pairs (the first --pairs of data/prefs_train.jsonl, every step), sigmoid loss,
beta 0.1, reference = the base with adapters off on both sides (TRL: PEFT's disable_adapter),
activation checkpointing on both sides (configs/dpo.py's remat_policy; TRL's default
gradient_checkpointing=True). jlora's compiled step's temporaries (XLA's memory analysis) are
recorded too.
Each framework runs in its own process, one after the other; a step's time is the median of the
timed steps, peak memory the process's peak RSS. jlora pads each side to config.data.max_length
(112); TRL pads to the batch's longest sequence.
Writes bench/results/dpo.json.
"""

from __future__ import annotations

import argparse
import time

from bench import common
from configs.dpo import get_config

CONFIG = get_config()  # the default train.dpo run's sizes
MAX_LENGTH = CONFIG.data.max_length
RANK = CONFIG.lora.rank


def pair_rows(n: int) -> list[dict]:
  import json

  with open("data/prefs_train.jsonl") as f:
    return [json.loads(line) for line in f.read().splitlines()[:n]]


def worker_jlora(steps: int, warmup: int, n_pairs: int) -> dict:
  import jax

  import jlora
  from jlora.models import from_pretrained
  from train import data as data_lib
  from train import dpo, pairs
  from train import step as step_lib

  model, params, tokenizer = from_pretrained(common.MODEL, remat_policy=CONFIG.model.remat_policy)
  cfg = jlora.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets="all-linear")
  trainable, frozen = jlora.prepare_for_training(params, cfg, jax.random.key(0))
  del params
  arrays, _ = pairs.tokenize_pairs(pair_rows(n_pairs), tokenizer, max_length=MAX_LENGTH)
  budget = step_lib.label_budget(arrays["loss_mask"])
  batch = jax.device_put(step_lib.gather_labels(data_lib.take_rows(arrays, range(n_pairs)), budget))
  tx, _ = step_lib.make_optimizer(common.LR, steps + warmup, 0, 0.0, 1.0)
  opt_state = tx.init(trainable)
  settings = dict(loss="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5, nll_weight=0.0)
  step_fn = jax.jit(
    step_lib.make_train_step(model, tx, objective=dpo.make_objective(settings)),
    donate_argnums=(0, 1),
  )
  compiled = step_fn.lower(trainable, opt_state, frozen, batch, 0, jax.random.key(0)).compile()
  temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  times, losses = [], []
  for i in range(warmup + steps):
    tick = time.perf_counter()
    trainable, opt_state, metrics = compiled(
      trainable, opt_state, frozen, batch, i, jax.random.key(0)
    )
    losses.append(float(metrics["loss"]))
    times.append(time.perf_counter() - tick)
  result = {"times": times[warmup:], "warmup_times": times[:warmup], "losses": losses}
  return {**result, "step_temp_mib": temp_mib}


def worker_trl(steps: int, warmup: int, n_pairs: int) -> dict:
  import torch
  import transformers
  from datasets import Dataset
  from peft import LoraConfig, get_peft_model
  from trl import DPOConfig, DPOTrainer

  from jlora.models.loading import resolve_checkpoint

  directory = str(resolve_checkpoint(common.MODEL))
  base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  model = get_peft_model(
    base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", lora_dropout=0.0)
  )
  times: list[float] = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      self.tick = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      times.append(time.perf_counter() - self.tick)

  rows = pair_rows(n_pairs) * (steps + warmup)
  args = DPOConfig(
    output_dir="/tmp/bench-dpo-trl",
    per_device_train_batch_size=n_pairs,
    max_steps=steps + warmup,
    learning_rate=common.LR,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    bf16=False,  # TRL's configs default to bf16 autocast; both sides run fp32
    gradient_checkpointing=True,  # TRL's default, stated: jlora's side uses configs/dpo.py's remat
    max_length=MAX_LENGTH,
    train_sampling_strategy="sequential",
    save_strategy="no",
    disable_tqdm=True,
    beta=0.1,
  )
  trainer = DPOTrainer(
    model=model,
    args=args,
    train_dataset=Dataset.from_list(rows),
    processing_class=transformers.AutoTokenizer.from_pretrained(directory),
    callbacks=[Timer()],
  )
  trainer.train()
  losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
  return {"times": times[warmup:], "warmup_times": times[:warmup], "losses": losses}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--out", default="bench/results/dpo.json")
  parser.add_argument("--worker", choices=["jlora", "trl"], help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    fn = worker_jlora if args.worker == "jlora" else worker_trl
    result = fn(args.steps, args.warmup, args.pairs)
    result["peak_rss_mib"] = common.peak_rss_mib()
    common.write_worker_result(args.worker_out, result)
    return
  machine = common.machine()
  print(common.machine_line(machine), flush=True)
  results = {}
  for framework in ("trl", "jlora"):  # sequential: never two timing runs at once
    flags = ["--worker", framework, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    results[framework] = common.run_worker("bench.dpo", [*flags, "--pairs", str(args.pairs)])
    if "error" in results[framework]:
      raise SystemExit(f"{framework} failed:\n{results[framework]['error']}")
    r = results[framework]
    r["median_step_s"] = common.median(r["times"])
    print(f"{framework}: {r['median_step_s']:.2f} s/step, peak RSS {r['peak_rss_mib']:,.0f} MiB")
  speed = results["trl"]["median_step_s"] / results["jlora"]["median_step_s"]
  memory = results["jlora"]["peak_rss_mib"] / results["trl"]["peak_rss_mib"]
  print(f"jlora: {speed:.2f}x TRL's speed, {memory:.2f}x its peak RSS")
  machine["loadavg_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
  common.write_json(args.out, {"machine": machine, "pairs": args.pairs, "results": results})


if __name__ == "__main__":
  main()

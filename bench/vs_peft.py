"""The same LoRA training step in jlora (JAX) and in PEFT + transformers (torch), fp32 on CPU.

    python -m bench.vs_peft [--configs qv-r8,all-r16] [--steps 10] [--warmup 2] [--no-qlora]
                            [--out bench/results/vs_peft.json]

Model: the embedded SmolLM2-135M-Instruct; PEFT loads the HF dir that jlora's GGUF
conversion caches (config.json + model.safetensors, fp32), so both start from the
same weights. Batch: the first 4 packed rows (4 x 128 tokens) of data/extract_train.jsonl
from train.data.prepare_spec (chat template, loss on the assistant completion only).

Both sides: LoRA alpha = 2r, dropout 0, B = 0 at init; AdamW(lr=1e-4, betas 0.9/0.999,
eps 1e-8, weight decay 0), constant lr, no clipping; the same batch every step.

  jlora: train/step.py's make_train_step (the trainer's step: head only at labelled
         positions, chunked cross-entropy), jitted with trainable/opt_state donated.
         QLoRA rows: jlora.quantize(nf4, double quant, block 64) before jlora.apply.
  PEFT:  get_peft_model(AutoModelForCausalLM fp32, sdpa) with torch.optim.AdamW;
         loss = HF's own (labels=...). Packed rows get a 4-D block-causal bool mask and
         per-example position_ids, so attention matches jlora's segment masking.
         HF labels: labels[t+1] = targets[t] where loss_mask, else -100; labels[0] = -100,
         so HF's internal shift reproduces our targets. A target at the very last column
         cannot be expressed that way; then `shift_labels` is passed as well.

Each (framework, config) runs in its own subprocess, so peak RSS (ru_maxrss, which
includes loading the model) is per framework. Step time: median over --steps timed
steps after --warmup steps (the first jlora call includes compilation, so it is warm-up).
tokens/s counts all 4 x 128 positions. Ratio = jlora steps/s / PEFT steps/s from the
same invocation. bitsandbytes has no CPU 4-bit training path here, so QLoRA is jlora
only and compared against PEFT's fp32 LoRA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import common

CONFIGS = {  # name -> (targets, rank)
  "qv-r8": ("qv", 8),
  "qv-r16": ("qv", 16),
  "all-r8": ("all-linear", 8),
  "all-r16": ("all-linear", 16),
}
ROWS, SEQ = 4, 128


# --------------------------------------------------------------------------- workers (one per process)


def worker_jlora(config: str, steps: int, warmup: int, qlora: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jlora
  from jlora.models import from_pretrained
  from train import step as step_lib

  targets, rank = CONFIGS[config]
  t0 = time.perf_counter()
  model, params, tokenizer = from_pretrained(common.MODEL)
  layout = jlora.trace_layout(model, jnp.zeros((1, 8), jnp.int32))
  cfg = jlora.LoraConfig(
    rank=rank, alpha=2.0 * rank, targets=("q_proj", "v_proj") if targets == "qv" else targets
  )
  quant = jlora.QuantConfig(kind="nf4") if qlora else None
  trainable, frozen = jlora.prepare_for_training(
    params, cfg, jax.random.key(0), quant=quant, layout=layout
  )
  del params
  load_s = time.perf_counter() - t0

  host = common.bench_batch(tokenizer, ROWS, SEQ)
  batch = step_lib.gather_labels(host, step_lib.label_budget(host["loss_mask"]))
  batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()})
  tx = optax.adamw(common.LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  opt_state = tx.init(trainable)
  step_fn = jax.jit(step_lib.make_train_step(model, tx), donate_argnums=(0, 1))
  rng = jax.random.key(0)

  times, warm, losses = [], [], []
  for i in range(warmup + steps):
    tick = time.perf_counter()
    trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch, i, rng)
    loss = float(metrics["loss"])  # blocks until the step is done
    elapsed = time.perf_counter() - tick
    losses.append(loss)
    (times if i >= warmup else warm).append(elapsed)
  return {
    "framework": "jlora-qlora" if qlora else "jlora",
    "config": config,
    "load_s": load_s,
    "warmup_times": warm,
    "times": times,
    "losses": losses,
    "trainable_params": int(jlora.adapter_count(trainable)),
    "label_tokens": int(host["loss_mask"].sum()),
    "real_tokens": int((host["segment_ids"] > 0).sum()),
  }


def hf_inputs(host: dict):
  """input_ids, 4-D bool attention mask, position_ids and HF labels for the packed batch."""
  import numpy as np
  import torch

  seg = host["segment_ids"]
  rows, seq = seg.shape
  causal = np.tril(np.ones((seq, seq), bool))
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & causal[None]
  mask |= np.eye(seq, dtype=bool)[
    None
  ]  # padding queries attend to themselves (no NaN rows); unused by the loss
  m = host["loss_mask"].astype(bool)
  labels = np.full((rows, seq), -100, np.int64)
  labels[:, 1:] = np.where(m[:, :-1], host["targets"][:, :-1], -100)
  shift_labels = np.where(m, host["targets"], -100).astype(np.int64)
  out = {
    "input_ids": torch.from_numpy(host["input_ids"].astype(np.int64)),
    "attention_mask": torch.from_numpy(mask[:, None]),
    "position_ids": torch.from_numpy(host["positions"].astype(np.int64)),
    "labels": torch.from_numpy(labels),
  }
  if m[:, -1].any():  # a target the shifted labels cannot hold
    out["shift_labels"] = torch.from_numpy(shift_labels)
  return out


def worker_peft(config: str, steps: int, warmup: int) -> dict:
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM

  from jlora.models.loading import load_tokenizer, resolve_checkpoint

  torch.set_num_threads(os.cpu_count())
  targets, rank = CONFIGS[config]
  t0 = time.perf_counter()
  directory = resolve_checkpoint(common.MODEL)
  model = AutoModelForCausalLM.from_pretrained(
    str(directory), dtype=torch.float32, attn_implementation="sdpa"
  )
  cfg = LoraConfig(
    r=rank,
    lora_alpha=2 * rank,
    lora_dropout=0.0,
    bias="none",
    task_type="CAUSAL_LM",
    target_modules=["q_proj", "v_proj"] if targets == "qv" else "all-linear",
  )
  model = get_peft_model(model, cfg)
  model.train()
  load_s = time.perf_counter() - t0
  host = common.bench_batch(load_tokenizer(directory), ROWS, SEQ)
  inputs = hf_inputs(host)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=common.LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  times, warm, losses = [], [], []
  for i in range(warmup + steps):
    tick = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    value = float(loss.detach())
    elapsed = time.perf_counter() - tick
    losses.append(value)
    (times if i >= warmup else warm).append(elapsed)
  return {
    "framework": "peft",
    "config": config,
    "load_s": load_s,
    "warmup_times": warm,
    "times": times,
    "losses": losses,
    "trainable_params": int(sum(p.numel() for p in params)),
    "label_tokens": int(host["loss_mask"].sum()),
    "real_tokens": int((host["segment_ids"] > 0).sum()),
    "torch_threads": torch.get_num_threads(),
    "shift_labels_used": "shift_labels" in inputs,
  }


# --------------------------------------------------------------------------- driver


def run_one(framework: str, config: str, steps: int, warmup: int) -> dict:
  args = [
    "--worker",
    framework,
    "--configs",
    config,
    "--steps",
    str(steps),
    "--warmup",
    str(warmup),
  ]
  result = common.run_worker("bench.vs_peft", args)
  return {"framework": framework, "config": config, **result}


def summarize(result: dict) -> dict:
  if "error" in result:
    return result
  step_s = common.median(result["times"])
  return {
    **result,
    "median_step_s": step_s,
    "steps_per_s": 1.0 / step_s,
    "tokens_per_s": ROWS * SEQ / step_s,
    "min_step_s": min(result["times"]),
    "max_step_s": max(result["times"]),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}"
  )
  parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
  parser.add_argument(
    "--warmup", type=int, default=2, help="untimed steps first (jlora's first one compiles)"
  )
  parser.add_argument("--no-qlora", action="store_true", help="skip the jlora QLoRA (nf4) rows")
  parser.add_argument("--out", default="bench/results/vs_peft.json")
  parser.add_argument("--worker", choices=["jlora", "jlora-qlora", "peft"], help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  configs = [c.strip() for c in args.configs.split(",") if c.strip()]
  unknown = [c for c in configs if c not in CONFIGS]
  if unknown:
    parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
  if args.steps < 1 or args.warmup < 1:
    parser.error("--steps and --warmup must be >= 1 (jlora's first step compiles)")

  if args.worker:
    config = configs[0]
    if args.worker == "peft":
      result = worker_peft(config, args.steps, args.warmup)
    else:
      result = worker_jlora(config, args.steps, args.warmup, qlora=args.worker == "jlora-qlora")
    result["peak_rss_mib"] = common.peak_rss_mib()
    common.write_worker_result(args.worker_out, result)
    return

  machine = common.machine()
  print(common.machine_line(machine), flush=True)
  started = time.time()
  frameworks = ["peft", "jlora"] + ([] if args.no_qlora else ["jlora-qlora"])
  results = []
  for config in configs:
    for framework in frameworks:  # sequential: never two timing runs at once
      tick = time.time()
      load_before = os.getloadavg()[0]
      r = summarize(run_one(framework, config, args.steps, args.warmup))
      r["loadavg_1min_before"], r["loadavg_1min_after"] = load_before, os.getloadavg()[0]
      results.append(r)
      status = (
        "ERROR"
        if "error" in r
        else f"median {r['median_step_s']:.3f} s/step, rss {r['peak_rss_mib']:.0f} MiB"
      )
      print(
        f"  {config:8s} {framework:12s} {status} ({time.time() - tick:.0f} s wall, load "
        f"{load_before:.2f} -> {r['loadavg_1min_after']:.2f})",
        flush=True,
      )
      if "error" in r:
        print(r["error"], file=sys.stderr)

  rows = []
  by = {(r["config"], r["framework"]): r for r in results}
  for config in configs:
    peft = by.get((config, "peft"))
    for framework in frameworks:
      r = by[(config, framework)]
      if "error" in r:
        rows.append([config, framework, "error (see JSON)", "", "", "", "", "", "", ""])
        continue
      ratio = loss_ok = ""
      if framework != "peft" and peft and "error" not in peft:
        r["ratio_vs_peft_steps_per_s"] = peft["median_step_s"] / r["median_step_s"]
        r["step0_loss_diff_vs_peft"] = abs(r["losses"][0] - peft["losses"][0])
        r["step0_loss_agrees_1e-3"] = r["step0_loss_diff_vs_peft"] <= 1e-3
        ratio = f"{r['ratio_vs_peft_steps_per_s']:.2f}x"
        loss_ok = (
          f"{'yes' if r['step0_loss_agrees_1e-3'] else 'NO'} "
          f"(diff {r['step0_loss_diff_vs_peft']:.1e})"
        )
        if framework == "jlora-qlora":
          loss_ok += " (nf4 base: not expected to match)"
      elif framework == "peft":
        ratio = "1.00x"
      note = {
        "peft": "torch fp32 LoRA, sdpa",
        "jlora": "fp32 LoRA, train/step.py",
        "jlora-qlora": "nf4 base + fp32 LoRA; PEFT row is fp32 LoRA (bitsandbytes: no CPU 4-bit training)",
      }
      rows.append(
        [
          config,
          framework,
          f"{r['median_step_s']:.3f}",
          f"{r['steps_per_s']:.3f}",
          f"{r['tokens_per_s']:,.0f}",
          ratio,
          f"{r['peak_rss_mib']:,.0f}",
          f"{r['losses'][0]:.4f}",
          loss_ok,
          note[framework],
        ]
      )
  header = [
    "config",
    "framework",
    "median s/step",
    "steps/s",
    "tokens/s",
    "jlora/PEFT (steps/s)",
    "peak RSS MiB",
    "step-0 loss",
    "step-0 loss = PEFT (<=1e-3)",
    "notes",
  ]
  table = common.markdown_table(header, rows)
  print()
  print(
    f"SmolLM2-135M, batch {ROWS}x{SEQ} tokens, fp32, AdamW lr {common.LR}, median of {args.steps} steps after "
    f"{args.warmup} warm-up; tokens/s counts all {ROWS * SEQ} positions per step"
  )
  print(table)
  print(
    "QLoRA: bitsandbytes has no CPU 4-bit training path here, so nf4 QLoRA is jlora-only; its ratio is "
    "against PEFT's fp32 LoRA on the same config."
  )
  out = {
    "benchmark": "vs_peft",
    "machine": machine,
    "model": common.MODEL,
    "batch": [ROWS, SEQ],
    "lr": common.LR,
    "steps_timed": args.steps,
    "warmup": args.warmup,
    "wall_s": time.time() - started,
    "method": __doc__,
    "table_markdown": table,
    "results": results,
  }
  common.write_json(args.out, out)


if __name__ == "__main__":
  main()

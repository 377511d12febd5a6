"""One LoRA training step on one long row: jlora (blockwise, naive attention) vs PEFT + transformers.

    python -m bench.long_context [--seqs 512,2048,4096,8192,16384] [--steps 3] [--warmup 1]
                                 [--memory-limit-gib 22] [--frameworks peft,jlora,jlora-naive]
                                 [--out bench/results/long_context.json]

The step of issue 12: SmolLM2-135M-Instruct (embedded GGUF; PEFT loads the HF dir jlora's
conversion caches, so both start from the same weights), fp32, LoRA r=8 alpha 16 on q_proj and
v_proj, batch 1, cross-entropy on every position (next-token targets of one random row, the same
in both frameworks), AdamW(lr 1e-4), no clipping.

  jlora:        train/step.py's make_train_step, the default model config (attention "auto",
                i.e. blockwise on CPU; remat_policy "auto": dots_and_attention_saveable from
                4,096 tokens). Reports XLA's compiled temp bytes (memory_analysis) too.
  jlora-naive:  the same with attention="naive" (fp32 [seq, seq] scores per layer), until it can't.
  peft:         get_peft_model(AutoModelForCausalLM fp32, attn_implementation="sdpa"), labels = ids
                (HF shifts them), torch.optim.AdamW; no gradient checkpointing.

Each (framework, length) runs in its own subprocess, back to back, so peak RSS (ru_maxrss,
including the model load) is per run. s/step: median of --steps timed steps after --warmup
(jlora's first step compiles). Runs that would not fit are not started: jlora's compiled
argument + temp bytes, and PEFT's peak RSS extrapolated linearly from its previous length, are
compared with --memory-limit-gib; such cells say "needs X GiB". A run that fails anyway (e.g.
killed for memory) is recorded as an error and longer lengths of that framework are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from bench import common

SEQS = (512, 2048, 4096, 8192, 16384)
FRAMEWORKS = ("peft", "jlora", "jlora-naive")
RANK = 8
GIB = 2**30


def token_row(seq: int, vocab: int) -> np.ndarray:
  return np.random.default_rng(seq).integers(0, vocab, (1, seq)).astype(np.int32)


# --------------------------------------------------------------------------- workers (one per process)


def timed_steps(run_step, steps: int, warmup: int) -> dict:
  """Runs warmup + steps calls of run_step() -> float loss (blocking); the timings and losses."""
  times, warm, losses = [], [], []
  for i in range(warmup + steps):
    tick = time.perf_counter()
    losses.append(run_step())
    (times if i >= warmup else warm).append(time.perf_counter() - tick)
  return {"times": times, "warmup_times": warm, "losses": losses}


def worker_jlora(seq: int, attention: str, steps: int, warmup: int, limit: float) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models import from_pretrained
  from jlora.models.llama import checkpoint_policy
  from train import step as step_lib

  model, params, _ = from_pretrained(common.MODEL, attention=attention)
  layout = jlora.trace_layout(model, jnp.zeros((1, 8), jnp.int32))
  cfg = jlora.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets=("q_proj", "v_proj"))
  trainable, frozen = jlora.prepare_for_training(params, cfg, jax.random.key(0), layout=layout)
  del params
  ids = token_row(seq, model.config.vocab_size)
  mask = np.ones((1, seq), np.int32)
  mask[0, -1] = 0  # the last position has no next token
  host = {
    "input_ids": ids,
    "positions": np.arange(seq, dtype=np.int32)[None],
    "segment_ids": np.ones((1, seq), np.int32),
    "targets": np.concatenate([ids[:, 1:], np.zeros((1, 1), np.int32)], axis=1),
    "loss_mask": mask,
  }
  batch = jax.device_put(step_lib.gather_labels(host, step_lib.label_budget(mask)))
  tx = optax.adamw(common.LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  opt_state = tx.init(trainable)
  step_fn = jax.jit(step_lib.make_train_step(model, tx), donate_argnums=(0, 1))
  rng = jax.random.key(0)
  tick = time.perf_counter()
  compiled = step_fn.lower(trainable, opt_state, frozen, batch, 0, rng).compile()
  memory = compiled.memory_analysis()
  out = {
    "compile_s": time.perf_counter() - tick,
    "temp_bytes": int(memory.temp_size_in_bytes),
    "argument_bytes": int(memory.argument_size_in_bytes),
    "remat": checkpoint_policy(model.config.remat_policy, seq)[0],
    "remat_policy": model.config.remat_policy,
  }
  needs = (memory.temp_size_in_bytes + memory.argument_size_in_bytes) / GIB
  if needs > limit:
    return {**out, "skipped": f"needs {needs:.1f} GiB (compiled arguments + temporaries)"}
  state = {"trainable": trainable, "opt": opt_state}

  def run_step():
    state["trainable"], state["opt"], metrics = compiled(
      state["trainable"], state["opt"], frozen, batch, 0, rng
    )
    return float(metrics["loss"])

  return {**out, **timed_steps(run_step, steps, warmup)}


def worker_peft(seq: int, steps: int, warmup: int) -> dict:
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM

  from jlora.models.loading import resolve_checkpoint

  torch.set_num_threads(os.cpu_count())
  model = AutoModelForCausalLM.from_pretrained(
    str(resolve_checkpoint(common.MODEL)), dtype=torch.float32, attn_implementation="sdpa"
  )
  cfg = LoraConfig(
    r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
  )
  model = get_peft_model(model, cfg)
  model.train()
  ids = torch.from_numpy(token_row(seq, model.config.vocab_size).astype(np.int64))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=common.LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  def run_step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return float(loss.detach())

  return {"torch_threads": torch.get_num_threads(), **timed_steps(run_step, steps, warmup)}


# --------------------------------------------------------------------------- driver


def run_one(framework: str, seq: int, args) -> dict:
  worker = ["--worker", framework, "--seqs", str(seq), "--steps", str(args.steps)]
  worker += ["--warmup", str(args.warmup), "--memory-limit-gib", str(args.memory_limit_gib)]
  tick, load = time.time(), os.getloadavg()[0]
  result = {"framework": framework, "seq": seq, **common.run_worker("bench.long_context", worker)}
  result.update(wall_s=time.time() - tick, loadavg_1min_before=load)
  if "times" in result:
    result["median_step_s"] = common.median(result["times"])
    result["ms_per_token"] = 1000 * result["median_step_s"] / seq
  return result


def peft_estimate(results: list[dict], seq: int) -> float | None:
  """PEFT's peak RSS at `seq`, extrapolated linearly from its longest finished run (GiB)."""
  done = [r for r in results if r["framework"] == "peft" and "times" in r]
  if not done:
    return None
  last = max(done, key=lambda r: r["seq"])
  return last["peak_rss_mib"] / 1024 * seq / last["seq"]


def cell(r: dict | None, key: str, fmt: str) -> str:
  if r is None:
    return "–"
  if "skipped" in r:
    return f"cannot run ({r['skipped'].split(' (')[0]})"
  if "error" in r:
    return "failed (see JSON)"
  return format(r[key], fmt) if key in r else "–"


def table(results: list[dict], seqs: list[int]) -> tuple[str, dict]:
  by = {(r["framework"], r["seq"]): r for r in results}
  rows = []
  for seq in seqs:
    j, n, p = by.get(("jlora", seq)), by.get(("jlora-naive", seq)), by.get(("peft", seq))
    ratio = "–"
    if j and p and "median_step_s" in j and "median_step_s" in p:
      ratio = f"{p['median_step_s'] / j['median_step_s']:.2f}×"
    gib = lambda r, key: cell(r, key, ".1f") if r is None or key not in r else f"{r[key] / GIB:.1f}"
    rss = lambda r: cell(r, "peak_rss_gib", ".1f")
    rows.append(
      [
        f"{seq:,}",
        cell(j, "median_step_s", ".2f"),
        cell(j, "ms_per_token", ".2f"),
        gib(j, "temp_bytes"),
        rss(j),
        cell(n, "median_step_s", ".2f"),
        gib(n, "temp_bytes"),
        cell(p, "median_step_s", ".2f"),
        cell(p, "ms_per_token", ".2f"),
        rss(p),
        ratio,
      ]
    )
  header = [
    "tokens",
    "jlora s/step",
    "jlora ms/token",
    "jlora temp GiB",
    "jlora peak RSS GiB",
    "naive s/step",
    "naive temp GiB",
    "PEFT s/step",
    "PEFT ms/token",
    "PEFT peak RSS GiB",
    "jlora / PEFT speed",
  ]
  longest = {
    f: max((r["seq"] for r in results if r["framework"] == f and "times" in r), default=None)
    for f in FRAMEWORKS
  }
  return common.markdown_table(header, rows), longest


def drive(args, seqs: list[int], frameworks: list[str]) -> list[dict]:
  results, stopped = [], set()
  for seq in seqs:
    for framework in frameworks:  # sequential: never two timing runs at once
      if framework in stopped:
        continue
      estimate = peft_estimate(results, seq) if framework == "peft" else None
      if estimate is not None and estimate > args.memory_limit_gib:
        r = {"framework": framework, "seq": seq, "skipped": f"needs ~{estimate:.0f} GiB"}
        r["skipped"] += " (peak RSS extrapolated linearly from the previous length)"
      else:
        r = run_one(framework, seq, args)
      if "peak_rss_mib" in r:
        r["peak_rss_gib"] = r["peak_rss_mib"] / 1024
      results.append(r)
      if "times" not in r:
        stopped.add(framework)  # longer rows need more memory still
      status = r.get("skipped") or (
        "ERROR" if "error" in r else f"{r['median_step_s']:.2f} s/step"
      ) + (f", rss {r['peak_rss_gib']:.1f} GiB" if "peak_rss_gib" in r else "")
      print(f"  {seq:6d} {framework:12s} {status}", flush=True)
      if "error" in r:
        print(r["error"], file=sys.stderr)
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--seqs", default=",".join(map(str, SEQS)), help="comma-separated lengths")
  parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"subset of {FRAMEWORKS}")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
  parser.add_argument("--memory-limit-gib", type=float, default=22.0)
  parser.add_argument("--out", default="bench/results/long_context.json")
  parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  seqs = [int(x) for x in args.seqs.split(",") if x.strip()]
  frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
  if unknown := [f for f in frameworks if f not in FRAMEWORKS]:
    parser.error(f"--frameworks: {unknown} are not valid; expected a subset of {FRAMEWORKS}")
  if args.steps < 1 or args.warmup < 1:
    parser.error("--steps and --warmup must be >= 1 (jlora's first step compiles)")

  if args.worker:
    if args.worker == "peft":
      result = worker_peft(seqs[0], args.steps, args.warmup)
    else:
      attention = "naive" if args.worker == "jlora-naive" else "auto"
      result = worker_jlora(seqs[0], attention, args.steps, args.warmup, args.memory_limit_gib)
    result["peak_rss_mib"] = common.peak_rss_mib()
    common.write_worker_result(args.worker_out, result)
    return

  machine = common.machine()
  print(common.machine_line(machine), flush=True)
  started = time.time()
  results = drive(args, seqs, frameworks)
  markdown, longest = table(results, seqs)
  print()
  print(markdown)
  print("longest sequence trained:", longest)
  common.write_json(
    args.out,
    {
      "benchmark": "long_context",
      "machine": machine,
      "model": common.MODEL,
      "lora": {"rank": RANK, "alpha": 2 * RANK, "targets": ["q_proj", "v_proj"]},
      "steps_timed": args.steps,
      "warmup": args.warmup,
      "memory_limit_gib": args.memory_limit_gib,
      "wall_s": time.time() - started,
      "method": __doc__,
      "table_markdown": markdown,
      "longest_trained": longest,
      "results": results,
    },
  )


if __name__ == "__main__":
  main()

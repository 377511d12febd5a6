"""The same LoRA run in jlora and in PEFT + PyTorch, step by step: loss, grad norm, lr, final adapter.

    python -m bench.fidelity [--steps 20] [--out bench/results/fidelity.json]
                             [--plot bench/results/fidelity_loss.png]

Both sides start from the same base (the embedded SmolLM2-135M-Instruct; PyTorch loads the
HF dir that jlora's GGUF conversion caches) and the same initial adapter (jlora's A/B,
written with jlora.save_adapter and loaded with PeftModel.from_pretrained). They train on
the same batches in the same order: unpacked rows (one example per row, right-padded, loss
on the assistant completion only) from train.data, drawn by train.data.TrainIterator.

  jlora:   train/step.py's make_optimizer and make_train_step, the trainer's own step.
  PyTorch: a plain loop written the way transformers' Trainer (and so TRL's SFTTrainer) runs
           a step: each microbatch's loss is HF's own (sum of token cross-entropies over
           `num_items_in_batch`, the labelled tokens of the whole accumulated step), backward
           per microbatch, then clip_grad_norm_ once, torch.optim.AdamW (weight decay on the
           parameters HF's Trainer.get_decay_parameter_names picks), and the LambdaLR of
           get_cosine_with_min_lr_schedule_with_warmup, stepped after the optimizer.

Each side runs in its own process, one after the other (peak RSS per framework, no
contention). Everything is fp32 on CPU; LoRA dropout is 0. The JSON holds the per-step table; the plot
shows both loss curves. `python -m bench.report` copies them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

# Per-step agreement the run must reach (issue 17), fp32.
TARGETS = {"loss_rel": 1e-4, "grad_norm_rel": 1e-3, "lr_rel": 1e-6, "adapter_abs": 1e-4}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything both sides share. The defaults are the benchmark's run."""

  steps: int = 20
  rows: int = 4  # rows per optimizer step
  seq: int = 256
  accum: int = 2  # microbatches per step: rows / accum rows each
  rank: int = 16
  alpha: float = 32.0
  targets: str = "all-linear"
  lr: float = 1e-3
  warmup_steps: int = 3
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  min_lr_ratio: float = 0.1
  seed: int = 0


# --------------------------------------------------------------------------- data


def train_batches(arrays: dict, s: Settings) -> list[dict]:
  """The first s.steps batches train.sft would draw from these row arrays."""
  from train import data as data_lib

  rows = data_lib.TrainIterator(arrays, s.rows, seed=s.seed)
  return [next(rows) for _ in range(s.steps)]


def hf_microbatch(host: dict) -> dict:
  """A microbatch the way TRL's collator builds it: right-padded input_ids, a 2-D attention
  mask, and unshifted `labels` (-100 where not trained) that HF's loss shifts itself."""
  import torch

  mask = host["loss_mask"].astype(bool)
  if mask[:, -1].any():
    raise ValueError(
      "A row has a label at its last position (it fills max_length), which unshifted HF labels "
      "cannot hold; use a longer --seq."
    )
  labels = np.full(mask.shape, -100, np.int64)
  labels[:, 1:] = np.where(mask[:, :-1], host["targets"][:, :-1], -100)
  return {
    "input_ids": torch.from_numpy(host["input_ids"].astype(np.int64)),
    "attention_mask": torch.from_numpy((host["segment_ids"] > 0).astype(np.int64)),
    "labels": torch.from_numpy(labels),
  }


def microbatches(batch: dict, accum: int) -> list[dict]:
  """Consecutive row blocks, as make_train_step splits its batch."""
  n = len(batch["input_ids"]) // accum
  return [{k: v[i * n : (i + 1) * n] for k, v in batch.items()} for i in range(accum)]


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(str(path))


def read_adapter(directory: Path) -> dict[str, np.ndarray]:
  """The tensors of a PEFT adapter dir, by PEFT key."""
  return read_adapter_file(Path(directory) / "adapter_model.safetensors")


# --------------------------------------------------------------------------- the two runs


def run_jlora(model_dir: Path, arrays: dict, batches: list[dict], s: Settings, work: Path) -> dict:
  """Trains with train/step.py; writes the initial adapter to work/initial for PEFT to load."""
  import jax
  import jax.numpy as jnp

  import jlora
  from jlora.models import from_pretrained
  from train import step as step_lib

  model, params, _ = from_pretrained(model_dir)
  layout = jlora.trace_layout(model, jnp.zeros((1, 8), jnp.int32))
  cfg = jlora.LoraConfig(rank=s.rank, alpha=s.alpha, targets=s.targets)
  trainable, frozen = jlora.prepare_for_training(params, cfg, jax.random.key(s.seed), layout=layout)
  del params
  initial = jlora.combine(trainable, frozen)
  jlora.save_adapter(work / "initial", initial, cfg, base_model_name_or_path=str(model_dir))
  del initial
  tx, schedule = step_lib.make_optimizer(
    s.lr, s.steps, s.warmup_steps, s.weight_decay, s.clip_norm, min_lr_ratio=s.min_lr_ratio
  )
  opt_state = tx.init(trainable)
  step_fn = jax.jit(step_lib.make_train_step(model, tx, accum_steps=s.accum), donate_argnums=(0, 1))
  budget = step_lib.label_budget(arrays["loss_mask"])  # as train.sft: one static shape
  rng = jax.random.key(s.seed)
  out = {"loss": [], "grad_norm": [], "lr": [], "tokens": [], "step_s": []}
  for i, batch in enumerate(batches):
    tick = time.perf_counter()
    trainable, opt_state, metrics = step_fn(
      trainable, opt_state, frozen, step_lib.gather_labels(batch, budget), i, rng
    )
    out["loss"].append(float(metrics["loss"]))
    out["step_s"].append(time.perf_counter() - tick)
    out["grad_norm"].append(float(metrics["grad_norm"]))
    out["tokens"].append(int(metrics["tokens"]))
    out["lr"].append(float(schedule(i)))  # what train.sft logs for this step
    if not bool(metrics["finite"]):
      raise FloatingPointError(f"jlora step {i}: non-finite loss or gradient")
  jlora.save_adapter(work / "final", jlora.combine(trainable, frozen), cfg)
  out["adapter"] = read_adapter(work / "final")
  return out


def decay_groups(model, weight_decay: float) -> list[dict]:
  """torch param groups as HF's Trainer.create_optimizer builds them."""
  from transformers import Trainer

  # The method only reads `model` (HF's rule: no decay for biases and norms), so no Trainer is built.
  decay = set(Trainer.get_decay_parameter_names(None, model))
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  groups = [
    {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
    {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
  ]
  return [g for g in groups if g["params"]]


def run_torch(model_dir: Path, adapter_dir: Path, batches: list[dict], s: Settings) -> dict:
  """PEFT + torch, the Trainer's step written out: loss / num_items_in_batch, clip once, AdamW, LambdaLR."""
  import torch
  import transformers
  from peft import PeftModel, get_peft_model_state_dict

  base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
  model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(
    decay_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.999), eps=1e-8
  )
  sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(
    opt, s.warmup_steps, s.steps, min_lr_rate=s.min_lr_ratio
  )
  out = {"loss": [], "grad_norm": [], "lr": [], "tokens": [], "step_s": []}
  for batch in batches:
    tick = time.perf_counter()
    micro = [hf_microbatch(mb) for mb in microbatches(batch, s.accum)]
    # Trainer._get_num_items_in_batch: labelled tokens of the whole accumulated step.
    num_items = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro)
    loss = 0.0
    for mb in micro:
      value = model(**mb, num_items_in_batch=num_items).loss
      value.backward()
      loss += float(value.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, s.clip_norm)
    lr = sched.get_last_lr()[0]  # the lr this update uses (the Trainer logs the same)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    out["step_s"].append(time.perf_counter() - tick)
    out["loss"].append(loss)
    out["grad_norm"].append(float(grad_norm))
    out["lr"].append(float(lr))
    out["tokens"].append(int(num_items))
  out["adapter"] = {
    k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()
  }
  return out


# --------------------------------------------------------------------------- comparison


def rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-30) if a != b else 0.0


def compare(j: dict, t: dict, s: Settings) -> dict:
  """Per-step rows and the worst differences; PyTorch is the reference."""
  if sorted(j["adapter"]) != sorted(t["adapter"]):
    raise ValueError(
      f"the adapters hold different tensors: {sorted(set(j['adapter']) ^ set(t['adapter']))}"
    )
  rows = [
    {
      "step": i,
      "tokens": t["tokens"][i],
      "jlora_tokens": j["tokens"][i],
      "loss_jlora": j["loss"][i],
      "loss_torch": t["loss"][i],
      "loss_rel": rel(j["loss"][i], t["loss"][i]),
      "grad_norm_jlora": j["grad_norm"][i],
      "grad_norm_torch": t["grad_norm"][i],
      "grad_norm_rel": rel(j["grad_norm"][i], t["grad_norm"][i]),
      "lr_jlora": j["lr"][i],
      "lr_torch": t["lr"][i],
      "lr_rel": rel(j["lr"][i], t["lr"][i]),
      "clipped": t["grad_norm"][i] > s.clip_norm,
    }
    for i in range(len(t["loss"]))
  ]
  worst = {k: max(r[k] for r in rows) for k in ("loss_rel", "grad_norm_rel", "lr_rel")}
  worst["adapter_abs"] = max(
    float(np.max(np.abs(j["adapter"][k] - t["adapter"][k]))) for k in t["adapter"]
  )
  return {
    "rows": rows,
    "worst": worst,
    "adapter_max_abs_value": max(float(np.max(np.abs(v))) for v in t["adapter"].values()),
    "adapter_tensors": len(t["adapter"]),
    "met": {k: worst[k] <= TARGETS[k] for k in TARGETS},
  }


def table_markdown(rows: list[dict]) -> str:
  header = [
    "step",
    "label tokens",
    "loss jlora",
    "loss PyTorch",
    "rel. diff",
    "grad norm jlora",
    "grad norm PyTorch",
    "rel. diff",
    "lr jlora",
    "lr PyTorch",
    "clipped",
  ]
  body = [
    [
      r["step"],
      r["tokens"],
      f"{r['loss_jlora']:.6f}",
      f"{r['loss_torch']:.6f}",
      f"{r['loss_rel']:.1e}",
      f"{r['grad_norm_jlora']:.5f}",
      f"{r['grad_norm_torch']:.5f}",
      f"{r['grad_norm_rel']:.1e}",
      f"{r['lr_jlora']:.4e}",
      f"{r['lr_torch']:.4e}",
      "yes" if r["clipped"] else "no",
    ]
    for r in rows
  ]
  return common.markdown_table(header, body)


def plot(path: Path, rows: list[dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [r["step"] for r in rows]
  fig, (top, bottom) = plt.subplots(
    2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
  )
  top.plot(steps, [r["loss_torch"] for r in rows], "o", ms=7, mfc="none", label="PEFT + PyTorch")
  top.plot(steps, [r["loss_jlora"] for r in rows], "-", label="jlora")
  top.set_ylabel("train loss (nats/token)")
  top.grid(alpha=0.3)
  top.legend()
  bottom.semilogy(steps, [max(r["loss_rel"], 1e-12) for r in rows], ".-")
  bottom.axhline(TARGETS["loss_rel"], color="r", ls="--", lw=1, label="target")
  bottom.set_ylabel("rel. diff")
  bottom.set_xlabel("optimizer step")
  bottom.grid(alpha=0.3)
  bottom.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + ".tmp" + path.suffix)
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


# --------------------------------------------------------------------------- driver


def benchmark_data(s: Settings):
  """(model dir, row arrays, data stats, batches) of the benchmark: every process builds the same."""
  from jlora.models.loading import load_tokenizer, resolve_checkpoint
  from train import data as data_lib

  model_dir = resolve_checkpoint(common.MODEL)
  arrays, stats = data_lib.prepare_spec(
    common.DATA, load_tokenizer(model_dir), max_length=s.seq, pack=False, seed=s.seed
  )
  return model_dir, arrays, stats, train_batches(arrays, s)


def worker(side: str, s: Settings, work: Path) -> None:
  """One side in its own process (peak memory per framework); results go to work/<side>.*"""
  from safetensors.numpy import save_file

  model_dir, arrays, _, batches = benchmark_data(s)
  tick = time.time()
  if side == "jlora":
    out = run_jlora(model_dir, arrays, batches, s, work)
  else:
    out = run_torch(model_dir, work / "initial", batches, s)
  out["wall_s"], out["peak_rss_mib"] = time.time() - tick, common.peak_rss_mib()
  save_file(out.pop("adapter"), str(work / f"{side}.safetensors"))
  (work / f"{side}.json").write_text(json.dumps(out))


def run_side(side: str, s: Settings, work: Path) -> dict:
  rc, output = common.run_child(
    ["-m", "bench.fidelity", "--worker", side, "--steps", str(s.steps), "--work", str(work)]
  )
  if rc != 0:
    raise SystemExit(f"the {side} run failed:\n{output[-3000:]}")
  out = json.loads((work / f"{side}.json").read_text())
  out["adapter"] = read_adapter_file(work / f"{side}.safetensors")
  print(
    f"{side}: {s.steps} steps in {out['wall_s']:.0f} s, peak RSS {out['peak_rss_mib']:.0f} MiB",
    flush=True,
  )
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--steps", type=int, default=Settings.steps)
  parser.add_argument("--out", default="bench/results/fidelity.json")
  parser.add_argument("--plot", default="bench/results/fidelity_loss.png")
  parser.add_argument("--worker", choices=["jlora", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--work", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps: {args.steps} is not valid; expected a positive integer.")
  s = Settings(steps=args.steps)
  if args.worker:
    worker(args.worker, s, Path(args.work))
    return

  machine = common.machine()
  print(common.machine_line(machine), flush=True)
  started = time.time()
  _, _, stats, _ = benchmark_data(s)  # converts the GGUF once, before the workers start
  with tempfile.TemporaryDirectory() as tmp:
    j = run_side("jlora", s, Path(tmp))  # also writes the initial adapter PyTorch loads
    t = run_side("torch", s, Path(tmp))
  result = compare(j, t, s)
  table = table_markdown(result["rows"])
  print(table)
  print("worst:", {k: f"{v:.2e}" for k, v in result["worst"].items()}, "met:", result["met"])
  plot(Path(args.plot), result["rows"])
  common.write_json(
    args.out,
    {
      "command": "python -m bench.fidelity" + (f" --steps {s.steps}" if s.steps != 20 else ""),
      "settings": dataclasses.asdict(s),
      "model": common.MODEL,
      "data": {"file": common.DATA, **{k: int(v) for k, v in stats.items()}},
      "machine": machine,
      "wall_s": time.time() - started,
      **{
        f"{side}_{key}": r[key]
        for side, r in (("jlora", j), ("torch", t))
        for key in ("wall_s", "peak_rss_mib", "step_s")
      },
      "targets": TARGETS,
      "plot": args.plot,
      "table_markdown": table,
      **result,
    },
  )


if __name__ == "__main__":
  main()

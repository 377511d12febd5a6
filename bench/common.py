"""Helpers shared by the benchmarks: machine description, the benchmark batch, RSS, tables."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile

MODEL = "smollm2-135m-instruct"
DATA = "data/extract_train.jsonl"
LR = 1e-4  # every benchmark trains with AdamW at this rate, weight decay 0


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
    try:
      module = __import__(name)
      out[name] = getattr(module, "__version__", "?")
    except Exception:  # not installed, or broken: the benchmark says so rather than failing here
      out[name] = None
  return out


def machine() -> dict:
  load = os.getloadavg()
  return {
    "nproc": os.cpu_count(),
    "cpu": cpu_model(),
    "loadavg_at_start": [round(x, 2) for x in load],
    **versions(),
  }


def machine_line(m: dict) -> str:
  return (
    f"machine: {m['nproc']} x {m['cpu']} (nproc={m['nproc']}), load avg at start {m['loadavg_at_start'][0]}; "
    f"jax {m.get('jax')}, torch {m.get('torch')}, transformers {m.get('transformers')}, peft {m.get('peft')}"
  )


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)
  print(f"wrote {path}")


def peak_rss_mib() -> float:
  """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs) -> float:
  return float(statistics.median(xs))


def bench_batch(tokenizer, rows: int = 4, max_length: int = 128) -> dict:
  """The first `rows` packed rows of the bundled SFT set, in the trainer's convention (train/data.py)."""
  from train import data as data_lib

  arrays, _ = data_lib.prepare_spec(DATA, tokenizer, max_length=max_length, pack=True)
  if len(arrays["input_ids"]) < rows:
    raise SystemExit(
      f"{DATA} packs into only {len(arrays['input_ids'])} rows of {max_length}; need {rows}."
    )
  return {k: v[:rows].copy() for k, v in arrays.items()}


def run_child(args: list[str], env: dict | None = None) -> tuple[int, str]:
  """Runs `python ...args` in its own process (environment `env`, default this one's);
  returns (rc, combined output)."""
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
  return proc.returncode, proc.stdout + proc.stderr


def run_worker(module: str, worker_args: list[str], env: dict | None = None) -> dict:
  """Runs `python -m module ...worker_args --worker-out FILE` in its own process; returns the JSON
  the worker wrote, or {"error": ..., "rc": ...} with the tail of its output when it failed."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    path = f.name
  try:
    rc, output = run_child(["-m", module, *worker_args, "--worker-out", path], env=env)
    if rc != 0:
      return {"error": output[-3000:], "rc": rc}
    with open(path) as f:
      return json.load(f)
  finally:
    os.unlink(path)


def write_worker_result(path: str, result: dict) -> None:
  """What a worker process hands back to run_worker."""
  with open(path, "w") as f:
    json.dump(result, f)


def flops_of(compiled) -> float:
  """XLA's FLOP count of a compiled program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)

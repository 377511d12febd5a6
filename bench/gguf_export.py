"""GGUF export of the embedded SmolLM2 with LoRA adapters on every linear layer: wall time, file size
and the export's extra host memory (peak RSS growth over the loaded model, and the numpy peak that
tracemalloc sees), per type. The claim under test: the export streams layer by layer, so its extra
memory is a small fraction of the file and never a merged copy of the model.

  python -m bench.gguf_export [--types f16,q8_0,q4_0] [--out bench/results/gguf_export.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp

import jlora
from bench.common import MODEL, machine, machine_line, write_json
from jlora.models import from_pretrained


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def measure(params, config, tokenizer, dtype: str, directory: Path) -> dict:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := current RSS
  before = _status("VmRSS:")
  tracemalloc.start()
  start = time.perf_counter()
  path = jlora.export_gguf(directory / f"m-{dtype}.gguf", params, config, tokenizer, dtype)
  seconds = time.perf_counter() - start
  traced = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  size = path.stat().st_size
  return {
    "dtype": dtype,
    "seconds": round(seconds, 2),
    "file_mib": round(size / 2**20, 1),
    "rss_growth_mib": round((_status("VmHWM:") - before) / 2**20, 1),
    "traced_peak_mib": round(traced / 2**20, 1),
    "rss_growth_over_file": round((_status("VmHWM:") - before) / size, 3),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--types", default="f16,q8_0,q4_0")
  parser.add_argument("--out", default="bench/results/gguf_export.json")
  args = parser.parse_args()
  info = machine()
  print(machine_line(info))
  model, params, tokenizer = from_pretrained(MODEL)
  ids = jnp.zeros((1, 8), jnp.int32)
  lora_cfg = jlora.LoraConfig(rank=16, alpha=32.0, targets="all-linear")
  params = jlora.apply(params, lora_cfg, jax.random.key(0), layout=jlora.trace_layout(model, ids))
  model_mib = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    # The first export compiles the per-layer slicing and merge; time the later ones.
    jlora.export_gguf(Path(tmp) / "warm.gguf", params, model.config, tokenizer, "f32")
    for dtype in args.types.split(","):
      rows.append(measure(params, model.config, tokenizer, dtype, Path(tmp)))
      print(rows[-1])
  write_json(
    args.out, {"machine": info, "model": MODEL, "params_mib": round(model_mib, 1), "rows": rows}
  )


if __name__ == "__main__":
  main()

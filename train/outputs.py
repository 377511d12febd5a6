"""The output dir: whose run it holds, and files written whole (tmp + rename) with the user's umask.

`run.json` names the run that owns the dir: a run id, made when the run starts from step 0, and
the settings it was started with (`train.config.fingerprint`). A new run refuses a dir that holds
another run's outputs, naming what is there and how to proceed; `before.json` and `summary.json`
carry the run id, so a new run never pairs itself with an old run's numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from train.config import fingerprint, fingerprint_differences
from train.errors import UserError, writing

RUN_FILE = "run.json"
# Everything a run writes into its output dir; only these are ever replaced or removed.
OUTPUT_NAMES = (
  RUN_FILE,
  "checkpoints",
  "metrics.jsonl",
  "before.json",
  "summary.json",
  "loss.png",
  "adapter_config.json",
  "adapter_model.safetensors",
  "merged",
  "reference_logps.safetensors",  # train.dpo's precomputed reference log-probs
)
DISPOSABLE = (RUN_FILE, "before.json")
# Virtual file systems: writing a run there is never what the user meant.
SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


@dataclasses.dataclass(frozen=True)
class RunRecord:
  run_id: str
  fingerprint: dict


# --------------------------------------------------------------------------- atomic files


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
  """write(tmp) then rename over `path`. The tmp file is made by open(), so it gets the user's
  umask (0644 under 022), unlike mkstemp's 0600."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with writing(path, kept=f"the previous {path.name} is intact"):
      write(str(tmp))
      os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text(path: Path, text: str) -> None:
  write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, obj) -> None:
  write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: Path):
  """The JSON in `path`, or None if it is missing or unreadable (a run rewrites it then)."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return None


# --------------------------------------------------------------------------- output dir


def check_output_dir(value: str) -> Path:
  """The output dir, created if missing; a UserError if it can't hold a run."""
  out = Path(value).expanduser().absolute()
  if any(out == Path(r) or Path(r) in out.parents for r in SYSTEM_ROOTS):
    raise UserError(
      f"config.output_dir: {value!r} is inside a system file system ({', '.join(SYSTEM_ROOTS)}); "
      "use a directory on a normal disk."
    )
  if out.exists() and not out.is_dir():
    raise UserError(f"config.output_dir: {value!r} is a file; expected a directory.")
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test.{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    why = "the file system is read-only" if e.errno == errno.EROFS else e.strerror
    raise UserError(
      f"config.output_dir: {value!r} can't be written ({why}); use a writable directory."
    ) from None
  return out


def claim(out: Path, config) -> tuple[RunRecord, bool]:
  """(the run that owns `out`, whether it is resumed). Refuses another run's outputs unless
  config.overwrite, which removes them (and only them) first."""
  # A run that stopped before its first step leaves only these: nothing to keep.
  present = sorted(n for n in OUTPUT_NAMES if (out / n).exists() and n not in DISPOSABLE)
  record = read_json(out / RUN_FILE)
  current = fingerprint(config)
  if present and config.overwrite:
    for name in present:
      target = out / name
      shutil.rmtree(target) if target.is_dir() else target.unlink()
    present, record = [], None
  if present and not (isinstance(record, dict) and "fingerprint" in record):
    raise UserError(
      f"config.output_dir: {str(out)!r} already holds outputs of another run "
      f"({', '.join(present)}); use another config.output_dir, or pass --config.overwrite=True "
      "to replace them."
    )
  if present:
    differences = fingerprint_differences(record["fingerprint"], current)
    if differences:
      raise UserError(
        f"config.output_dir: {str(out)!r} holds a run with other settings "
        f"({'; '.join(differences)}); use another config.output_dir to keep it, or pass "
        "--config.overwrite=True to replace it."
      )
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
      return RunRecord(record["run_id"], current), True
  record = RunRecord(f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}", current)
  write_json(out / RUN_FILE, dataclasses.asdict(record))
  return record, False


# --------------------------------------------------------------------------- metrics and plot


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
  """Metrics already logged, minus steps after `up_to_step` (they will be redone on resume)."""
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r["step"] <= up_to_step]


def write_metrics(path: Path, rows: list[dict]) -> None:
  write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


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
  write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
  plt.close(fig)

"""Training checkpoints with orbax: adapters, optimizer state, step, data position, rng.

The base model is never saved: it is reloaded from its own checkpoint. State trees
(LoraWeight nodes, optax namedtuples) are stored as a flat {path: array} dict and
restored into the structure of a freshly built state, so orbax only ever sees plain
arrays. Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact. A checkpoint damaged
later (a truncated file) is set aside (renamed, never deleted) with a warning naming it, and the run
resumes from the newest readable one.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from train import distributed
from train.errors import first_line, writing

# Damaged checkpoints are renamed to this prefix + step: kept for the user, invisible to orbax.
DAMAGED_PREFIX = "damaged-"


def _flatten(tree) -> dict[str, jax.Array]:
  return {
    jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _unflatten(like, flat: dict[str, Any]):
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  missing = [
    jax.tree_util.keystr(p) for p, _ in paths_and_leaves if jax.tree_util.keystr(p) not in flat
  ]
  if missing:
    raise ValueError(
      f"The checkpoint does not match this run's adapters/optimizer; missing {missing[:5]}. "
      "Was it written with another LoRA config? Use a new output_dir."
    )
  return jax.tree_util.tree_unflatten(
    treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths_and_leaves]
  )


class Checkpointer:
  """A CheckpointManager under `<output_dir>/checkpoints`."""

  def __init__(self, directory: str | Path, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    latest = self.latest_step()
    kept = f"checkpoint {latest} is intact" if latest is not None else "no checkpoint was lost"
    flat = _flatten(state)
    needed = sum(x.size * x.dtype.itemsize for x in flat.values())
    with writing(self.directory / str(step), needed, kept):
      try:
        self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)),
          force=True,
        )
        self.manager.wait_until_finished()
      except Exception:
        self._remove_partial(step)  # the space a failed save took, so the rerun has it back
        raise

  def _remove_partial(self, step: int) -> None:
    if not distributed.is_main():
      return
    for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
      shutil.rmtree(partial, ignore_errors=True)
    self.manager.reload()

  def read_meta(self, step: int) -> dict:
    """The meta dict of `step` alone: cheap, and read before any array is restored."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore_newest(
    self, like: Any, check_meta: Callable[[dict], None]
  ) -> tuple[Any, dict] | None:
    """(state, meta) of the newest checkpoint that reads, or None if there is none.

    `check_meta(meta)` runs before the arrays are restored and raises to refuse a checkpoint
    (e.g. one of a run with other settings). A checkpoint that can't be read (damaged, partial)
    is set aside, renamed `damaged-<step>-<time>` and never deleted, so the run resumes from the
    newest good one and saves that step again later; with none left the run starts over.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # orbax/tensorstore raise many types for a damaged file
        self.set_aside(step, e)
        continue
      check_meta(meta)
      try:
        return self.restore(step, like)[0], meta
      except Exception as e:
        self.set_aside(step, e)
    return None

  def set_aside(self, step: int, error: BaseException) -> Path:
    """Renames checkpoint `step` out of orbax's sight (process 0 does it, the others wait)."""
    target = self.directory / f"{DAMAGED_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if distributed.is_main():
      os.replace(self.directory / str(step), target)
      print(
        f"warning: checkpoint {self.directory / str(step)} can't be read "
        f"({first_line(error, 200)}); set it aside as {target} and resume from an older one.",
        file=sys.stderr,
      )
    distributed.barrier(f"checkpoint-{step}-set-aside")
    self.manager.reload()
    return target

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """The state at `step`, laid out (shape, dtype, sharding) like `like`, and its meta dict."""
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _flatten(like)
    )
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return _unflatten(like, restored["state"]), dict(restored["meta"])

  def close(self) -> None:
    self.manager.close()

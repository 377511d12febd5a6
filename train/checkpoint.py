"""Training checkpoints with orbax: adapters, optimizer state, step, data position, rng.

The base model is never saved: it is reloaded from its own checkpoint. State trees
(LoraWeight nodes, optax namedtuples) are stored as a flat {path: array} dict and
restored into the structure of a freshly built state, so orbax only ever sees plain
arrays. Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact. A checkpoint damaged
later (a truncated file) is skipped with a warning naming it, in favour of the newest readable one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.errors import UserError, first_line


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
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_flatten(state)), meta=ocp.args.JsonSave(meta)
      ),
      force=True,
    )
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    """The meta dict of `step` alone: cheap, and read before any array is restored."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore_newest(
    self, like: Any, check_meta: Callable[[dict], None]
  ) -> tuple[Any, dict] | None:
    """(state, meta) of the newest checkpoint that reads, or None if there is none.

    `check_meta(meta)` runs before the arrays are restored and raises to refuse a checkpoint
    (e.g. one of a run with other settings). A checkpoint that can't be read is reported on
    stderr and skipped; if none can be read, the error says so in one line.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        meta = self.read_meta(step)
      except Exception as e:  # orbax/tensorstore raise many types for a damaged file
        _skip(self.directory / str(step), e)
        continue
      check_meta(meta)
      try:
        return self.restore(step, like)[0], meta
      except Exception as e:
        _skip(self.directory / str(step), e)
    if steps:
      raise UserError(
        f"No checkpoint in {self.directory} can be read (steps {sorted(steps)}); delete that "
        "directory to start over, or pass --config.overwrite=True."
      )
    return None

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


def _skip(path: Path, error: Exception) -> None:
  print(
    f"warning: checkpoint {path} can't be read ({first_line(error, 200)}); trying an older one.",
    file=sys.stderr,
  )

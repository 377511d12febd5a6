"""Training checkpoints with orbax: adapters, optimizer state, step, data position, rng.

The base model is never saved: it is reloaded from its own checkpoint. State trees
(LoraWeight nodes, optax namedtuples) are stored as a flat {path: array} dict and
restored into the structure of a freshly built state, so orbax only ever sees plain
arrays. Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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

"""Writing files safely: host copies of (sharded) arrays, and atomic writes that never leave a partial
file under the final name and never replace a user's file unless asked."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np


def host_array(x, name: str) -> np.ndarray:
  """A host copy of a (possibly sharded) array; never an empty or partial tensor."""
  if isinstance(x, jax.Array):
    if not x.is_fully_addressable:
      raise ValueError(
        f"{name} is sharded across processes (not fully addressable from this one), so this process "
        "can't write it. Gather it first, e.g. jax.experimental.multihost_utils.process_allgather(x, "
        "tiled=True), then save from process 0."
      )
    x = jax.device_get(x)
  out = np.asarray(x)
  expected = tuple(getattr(x, "shape", out.shape))
  if out.shape != expected or (out.size == 0 and math.prod(expected) != 0):
    raise ValueError(f"{name}: gathered {out.shape} for an array of shape {expected}.")
  return out


def check_new_file(path: Path, overwrite: bool, field: str = "path") -> Path:
  """`path` as a Path whose parent exists; an existing file is refused unless overwrite=True."""
  path = Path(path).expanduser()
  if path.is_dir():
    raise ValueError(f"{field}: {str(path)!r} is a directory; expected a file name.")
  if path.exists() and not overwrite:
    raise FileExistsError(
      f"{field}: {str(path)!r} already exists; pass overwrite=True to replace it, or choose "
      "another name."
    )
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
  """write(tmp_name) then rename over `path`: readers never see a half-written file, and a failed
  write leaves nothing under `path`."""
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    write(tmp)
    # mkstemp makes 0600, and safetensors' save_file replaces the file with a new 0600 one, so
    # the mode is set after writing: a saved file gets the user's umask.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
  os.umask(mask)
  return mask


def write_json(path: Path, obj) -> None:
  atomic_write(
    path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  )


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file

  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

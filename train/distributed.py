"""Several processes, one training run: start-up, each process's rows, gathering for outputs.

JAX runs one process per host (a TPU pod slice, a GPU node, or `python -m train.launch` on one
machine). Every process runs the same program over the global mesh (`jax.devices()`); XLA moves
data between them. This module holds the few places where a process must know it is one of many.

Start-up (`initialize`)
  - `config.distributed.coordinator` / `num_processes` / `process_id`, or the environment variables
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (config fields win), call
    `jax.distributed.initialize` with those values. JAX itself reads only the coordinator address
    from the environment, so the other two are passed explicitly.
  - With none of them set, a cluster that JAX can describe itself (SLURM with several tasks, Open MPI,
    a multi-host Cloud TPU) gets `jax.distributed.initialize()` with no arguments, as JAX documents.
  - Otherwise nothing happens: a single process runs exactly as before.

The global batch (`put_rows`, `put_array`)
  Every process tokenizes and packs the whole dataset the same way (packing is seeded, and its input
  is the same rows in the same order), so the packed row arrays are identical everywhere. The
  shuffled order depends only on the seed and the epoch. A global batch is therefore a list of row
  indices that every process computes alike, whatever the number of processes; that is what makes
  results independent of the process count and lets a run resume on another count (the data
  position in the checkpoint is an (epoch, index) into that order). Each process then materialises
  only the rows that its own devices hold under the batch sharding (`local_row_range`: a contiguous
  block, since a process's devices are adjacent in the mesh), and
  `jax.make_array_from_process_local_data` assembles the global array from those slices. No process
  ever builds or transfers the whole batch.

Decisions and outputs (`share_from_main`, `gather_to_host`, `is_main`)
  What every process must agree on (which run owns the output dir) is decided by process 0 and
  broadcast. Arrays sharded over several processes are gathered (`process_allgather`) before
  process 0 writes them; every gathered tensor is checked to have its full shape and not be empty.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from train.errors import UserError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclass(frozen=True)
class Settings:
  """Where this process finds the others. Each value names where it came from, for errors."""

  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  sources: Mapping[str, str]  # field -> how the user set it ("JAX_NUM_PROCESSES", ...)
  timeout_s: int = 300
  heartbeat_s: int = 100


def _pick(config_value, unset, env_name: str, config_name: str, environ) -> tuple[object, str]:
  if config_value != unset and config_value is not None:
    return config_value, config_name
  return environ.get(env_name) or None, env_name


def _as_int(value, source: str, minimum: int) -> int | None:
  if value is None:
    return None
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or number < minimum or str(value).strip() != str(number):
    raise UserError(f"{source}={value!r} is not valid; expected an integer >= {minimum}.")
  return number


def settings(distributed=None, environ: Mapping[str, str] = os.environ) -> Settings:
  """The start-up values from `config.distributed` (may be None) and the environment."""
  get = (lambda k, d: getattr(distributed, k, d)) if distributed is not None else (lambda k, d: d)
  coordinator, c_src = _pick(
    get("coordinator", ""), "", ENV_COORDINATOR, "config.distributed.coordinator", environ
  )
  num, n_src = _pick(
    get("num_processes", 0), 0, ENV_NUM_PROCESSES, "config.distributed.num_processes", environ
  )
  pid, p_src = _pick(
    get("process_id", -1), -1, ENV_PROCESS_ID, "config.distributed.process_id", environ
  )
  timeout = _as_int(get("timeout_s", 300), "config.distributed.timeout_s", 1)
  heartbeat = _as_int(get("heartbeat_s", 100), "config.distributed.heartbeat_s", 1)
  return Settings(
    coordinator=coordinator or None,
    num_processes=_as_int(num, n_src, 1),
    process_id=_as_int(pid, p_src, 0),
    sources={"coordinator": c_src, "num_processes": n_src, "process_id": p_src},
    timeout_s=timeout,
    heartbeat_s=heartbeat,
  )


def detected_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
  """The multi-process cluster JAX can describe by itself, or None (the same tests JAX runs)."""
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in environ for k in slurm) and environ["SLURM_NTASKS"].strip() not in ("", "1"):
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in environ:
    return "Open MPI"
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "Cloud TPU"
  return None


def check_settings(s: Settings) -> None:
  """One-line errors for settings that can't start a run, before JAX tries (and waits)."""
  src = s.sources
  if s.num_processes is None:
    raise UserError(
      f"{src['coordinator'] if s.coordinator else src['process_id']} is set but "
      f"{src['num_processes']} is not; set it to the number of processes in the run."
    )
  if s.coordinator is None:
    raise UserError(
      f"{src['num_processes']}={s.num_processes} needs a coordinator: set "
      f"{ENV_COORDINATOR} (or config.distributed.coordinator) to host:port of process 0."
    )
  host, _, port = s.coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(
      f"{src['coordinator']}={s.coordinator!r} is not valid; expected host:port, e.g. 10.0.0.1:1234."
    )
  if s.process_id is None:
    raise UserError(
      f"{src['num_processes']}={s.num_processes} needs this process's id: set {ENV_PROCESS_ID} "
      f"(or config.distributed.process_id) to 0..{s.num_processes - 1}."
    )
  if s.process_id >= s.num_processes:
    raise UserError(
      f"{src['process_id']}={s.process_id} is not valid; expected 0..{s.num_processes - 1} "
      f"for {src['num_processes']}={s.num_processes}."
    )


def initialize(distributed=None, environ: Mapping[str, str] = os.environ) -> str:
  """Joins the other processes of the run, if any. Returns what was done, for the log."""
  if jax.distributed.is_initialized():
    return f"process {jax.process_index()} of {jax.process_count()}"
  s = settings(distributed, environ)
  explicit = (s.coordinator, s.num_processes, s.process_id) != (None, None, None)
  if not explicit:
    cluster = detected_cluster(environ)
    if cluster is None:
      return "single process"
    _join(f"the {cluster} coordinator", s, None, None, None)
    return f"process {jax.process_index()} of {jax.process_count()} ({cluster})"
  if s.num_processes == 1 and s.coordinator is None:
    return "single process"
  check_settings(s)
  if s.process_id != 0:  # process 0 serves the coordinator; the others must reach it
    wait_for_coordinator(s)
  _join(f"the coordinator at {s.coordinator}", s, s.coordinator, s.num_processes, s.process_id)
  return f"process {s.process_id} of {s.num_processes} (coordinator {s.coordinator})"


def wait_for_coordinator(s: Settings, poll_s: float = 0.25) -> None:
  """Waits until the coordinator accepts connections, or raises a one-line error.

  JAX aborts the whole process (a fatal C++ check, no Python exception) when it can't register
  with the coordinator in time, so this process checks that it can reach it first.
  """
  host, _, port = s.coordinator.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + s.timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(2.0, s.timeout_s)):
        return
    except OSError as e:
      if time.monotonic() + poll_s > deadline:
        raise UserError(
          f"process {s.process_id} could not reach the coordinator at "
          f"{s.sources['coordinator']}={s.coordinator} within config.distributed.timeout_s="
          f"{s.timeout_s} s ({e.strerror or e}); start process 0 there, or fix the address."
        ) from None
      time.sleep(poll_s)


def _join(what: str, s: Settings, coordinator, num_processes, process_id) -> None:
  try:
    jax.distributed.initialize(
      coordinator,
      num_processes,
      process_id,
      initialization_timeout=s.timeout_s,
      heartbeat_timeout_seconds=s.heartbeat_s,
    )
  except Exception as e:  # JAX raises XlaRuntimeError / RuntimeError / ValueError here
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
      f"process {process_id if process_id is not None else '?'} could not join {what} within "
      f"config.distributed.timeout_s={s.timeout_s} s ({first[:200]}); check that every process "
      "was started and that the address is reachable."
    ) from e


# --------------------------------------------------------------------------- who does what


def is_main() -> bool:
  """Process 0 writes the outputs and the logs."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def describe() -> str:
  n = jax.process_count()
  return "single process" if n == 1 else f"process {jax.process_index()} of {n}"


def main_first(fn: Callable[[], object]):
  """fn() on process 0, then on the others once it is done (e.g. a conversion they then read)."""
  result = fn() if is_main() else None
  barrier("main-first")
  return result if is_main() else fn()


def all_processes(value: int) -> list[int]:
  """Every process's `value` (a small int), in process order; a collective when there are many."""
  if jax.process_count() == 1:
    return [int(value)]
  return np.asarray(multihost_utils.process_allgather(np.int32(value))).ravel().tolist()


def share_from_main(fn: Callable[[], object]):
  """fn() run on process 0 only, its JSON-able result given to every process.

  For decisions every process must take alike (which run owns the output dir, whether to
  resume). A `UserError` on process 0 is raised on every process, so none waits for the others.
  """
  if jax.process_count() == 1:
    return fn()
  if is_main():
    try:
      message = {"value": fn()}
    except UserError as e:
      message = {"error": str(e)}
    data = np.frombuffer(json.dumps(message).encode(), np.uint8)
  else:
    data = np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buffer = data if is_main() else np.zeros(size, np.uint8)
  message = json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))))
  if "error" in message:
    raise UserError(message["error"])
  return message["value"]


# --------------------------------------------------------------------------- the global batch


def local_row_range(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop): the rows of a batch of `global_shape` that this process's devices hold."""
  spans = {
    index[0].indices(global_shape[0])[:2]
    for index in sharding.addressable_devices_indices_map(global_shape).values()
  }
  start, stop = min(s for s, _ in spans), max(e for _, e in spans)
  covered = np.zeros(stop - start, bool)
  for s, e in spans:
    covered[s - start : e - start] = True
  if not covered.all():  # never for the meshes make_mesh builds: a process's devices are adjacent
    raise ValueError(f"this process's rows {sorted(spans)} are not one contiguous range.")
  return start, stop


def put_rows(
  rows_of: Callable[[np.ndarray], dict[str, np.ndarray]],
  row_ids: np.ndarray,
  sharding: NamedSharding,
) -> dict[str, jax.Array]:
  """The global batch of `row_ids` as arrays laid out by `sharding`, built from local rows only.

  `rows_of(ids)` materialises the rows `ids` (a dict of [len(ids), ...] arrays); it is called once,
  with this process's share of `row_ids`.
  """
  n = len(row_ids)
  start, stop = local_row_range(sharding, (n,))
  local = rows_of(np.asarray(row_ids)[start:stop])
  return {
    k: jax.make_array_from_process_local_data(sharding, v, (n, *v.shape[1:]))
    for k, v in local.items()
  }


def put_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array every process holds, placed by rows: each process transfers only its rows."""
  start, stop = local_row_range(sharding, value.shape)
  return jax.make_array_from_process_local_data(sharding, value[start:stop], value.shape)


# --------------------------------------------------------------------------- outputs


def to_host(x, name: str = "array") -> np.ndarray:
  """The full value of a (possibly process-sharded) array, on every process; checked complete."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    value = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  else:
    value = np.asarray(x)
  expected = tuple(x.shape)
  if value.shape != expected or (value.size == 0 and math.prod(expected) != 0):
    raise RuntimeError(f"{name}: gathered shape {value.shape} for an array of shape {expected}.")
  return value


def gather_to_host(tree):
  """`to_host` on every array leaf of `tree` (jlora nodes keep their structure)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: to_host(x, jax.tree_util.keystr(path)) if hasattr(x, "shape") else x, tree
  )

"""Starts one run as several JAX processes on this machine, to try and test multi-host code.

  python -m train.launch --processes 2 [--devices-per-process 4] -- --config configs/llama.py ...

Everything after `--` goes to `python -m train.sft` (or `--module`). Each process gets
`JAX_COORDINATOR_ADDRESS` (a free local port), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` and its own
fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=K`); JAX's CPU collectives
(gloo) carry the traffic between them. Process 0's output is streamed; the others write to
`<log-dir>/process-<i>.log` (default: `<output_dir>/logs` when `--config.output_dir` is given).

If one process fails or is killed, the others are stopped too (SIGTERM, then SIGKILL after
`--grace` seconds) and the launcher exits with the failed process's status (128 + signal for a
signal), after printing the end of its log. It is a teaching and test tool: real clusters start
their processes with their own launchers (srun, mpirun, a TPU pod's per-worker command).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.errors import OneLineParser

DEVICE_FLAG = "--xla_force_host_platform_device_count"
POLL_S = 0.1


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, coordinator: str, processes: int, index: int, devices: int) -> dict:
  flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
  return {
    **base,
    "JAX_COORDINATOR_ADDRESS": coordinator,
    "JAX_NUM_PROCESSES": str(processes),
    "JAX_PROCESS_ID": str(index),
    "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"]),
    "JAX_PLATFORMS": base.get("JAX_PLATFORMS", "cpu"),
  }


def output_dir_of(args: list[str]) -> str | None:
  """--config.output_dir=X or --config.output_dir X, as absl parses it."""
  for i, arg in enumerate(args):
    if arg.startswith("--config.output_dir="):
      return arg.split("=", 1)[1]
    if arg == "--config.output_dir" and i + 1 < len(args):
      return args[i + 1]
  return None


def exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def tail(path: Path, lines: int = 20) -> str:
  with contextlib.suppress(OSError):
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
  return ""


def stop(procs: list[subprocess.Popen], grace: float) -> None:
  """SIGTERM every live process (a trainer saves and exits), SIGKILL what is left after `grace`."""
  for p in procs:
    if p.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(POLL_S)
  for p in procs:
    if p.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        p.kill()
      p.wait()


def supervise(procs, logs, timeout: float | None, grace: float) -> int:
  """Waits for all; the first failure (or the timeout) stops the rest. Returns the exit status."""
  started = time.monotonic()
  while True:
    codes = [p.poll() for p in procs]
    failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
    if failed is not None:
      stop(procs, grace)
      status = exit_status(codes[failed])
      # Echoed lines carry the process's tag, so they never pass for the launcher's own `error:` line.
      echoed = tail(logs[failed]).splitlines() if logs[failed] else []
      where = "".join(f"\n  [process {failed}] {line}" for line in echoed)
      where = f"; its log ends with:{where}" if where else ""
      print(f"launch: process {failed} exited with status {status}{where}", file=sys.stderr)
      return status
    if all(c == 0 for c in codes):
      return 0
    if timeout is not None and time.monotonic() - started > timeout:
      stop(procs, grace)
      print(f"launch: --timeout={timeout:g} s reached; stopped every process.", file=sys.stderr)
      return 124
    time.sleep(POLL_S)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  if "--" in argv:
    cut = argv.index("--")
    own, rest = argv[:cut], argv[cut + 1 :]
  else:
    own, rest = argv, []
  parser = OneLineParser(prog="python -m train.launch", description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, required=True, help="number of JAX processes")
  parser.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices each")
  parser.add_argument("--module", default="train.sft", help="the module each process runs")
  parser.add_argument("--log-dir", default=None, help="where processes 1.. write their output")
  parser.add_argument("--timeout", type=float, default=None, help="stop everything after S s")
  parser.add_argument("--grace", type=float, default=10.0, help="SIGTERM-to-SIGKILL delay (s)")
  args = parser.parse_args(own)
  for flag, value, least in (
    ("--processes", args.processes, 1),
    ("--devices-per-process", args.devices_per_process, 1),
    ("--grace", args.grace, 0),
  ):
    if not value >= least or value != value:
      parser.error(f"{flag}={value} is not valid; expected a number >= {least}.")
  if args.timeout is not None and not args.timeout > 0:
    parser.error(f"--timeout={args.timeout} is not valid; expected a number of seconds > 0.")
  if not module_exists(args.module):
    parser.error(
      f"--module={args.module!r} is not valid; no such module (expected e.g. train.sft)."
    )
  return args, rest


def module_exists(name: str) -> bool:
  """Whether `python -m name` would find the module (its parent packages are imported to look)."""
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):  # a missing parent package, or an empty name
    return False


def _terminate(signum, frame):
  raise KeyboardInterrupt  # stop the processes as for Ctrl-C


def main(argv: list[str] | None = None) -> int:
  args, rest = parse(sys.argv[1:] if argv is None else argv)
  signal.signal(signal.SIGTERM, _terminate)
  log_dir = Path(
    args.log_dir
    or (Path(output_dir_of(rest)) / "logs" if output_dir_of(rest) else tempfile.mkdtemp())
  )
  log_dir.mkdir(parents=True, exist_ok=True)
  coordinator = f"127.0.0.1:{free_port()}"
  procs, logs, files = [], [], []
  command = [sys.executable, "-m", args.module, *rest]
  try:
    for i in range(args.processes):
      env = process_env(dict(os.environ), coordinator, args.processes, i, args.devices_per_process)
      if i == 0:
        log, out = None, None
      else:
        log = log_dir / f"process-{i}.log"
        out = open(log, "w")  # noqa: SIM115 (closed below, after the process exits)
        files.append(out)
      stderr = subprocess.STDOUT if out else None
      procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=stderr))
      logs.append(log)
    if args.processes > 1:
      print(f"launch: {args.processes} processes; processes 1.. log to {log_dir}", file=sys.stderr)
    return supervise(procs, logs, args.timeout, args.grace)
  except KeyboardInterrupt:
    stop(procs, args.grace)
    return 130
  finally:
    for f in files:
      f.close()


if __name__ == "__main__":
  sys.exit(main())

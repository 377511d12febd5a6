"""A stand-in for train.sft in the launcher's tests: records what it was given, then acts as told.

  python -m tests.launch_probe <dir> ok|fail-1|fail-1-stuck

fail-1: process 1 exits with status 3, the others sleep; fail-1-stuck: the others also ignore
SIGTERM, as a process blocked in a collective may.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS")

out, action = Path(sys.argv[1]), sys.argv[2]
index = os.environ["JAX_PROCESS_ID"]
record = {k: os.environ.get(k) for k in KEYS} | {"pid": os.getpid()}
(out / f"{index}.json").write_text(json.dumps(record))
print(f"probe {index} says hello", flush=True)
if action == "fail-1-stuck":
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
if action == "ok":
  sys.exit(0)
if action.startswith("fail-1") and index == "1":
  time.sleep(0.5)
  sys.exit(3)
time.sleep(600)

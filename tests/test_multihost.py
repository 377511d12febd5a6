"""Several JAX processes on this machine (train.launch, gloo CPU collectives) against one process.

The multi-process runs are slow (each process compiles the whole run); they share runs through
module fixtures: one 2-process run is the reference that the 1-process runs, the resumed runs and
PEFT are compared with.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import tiny
from train import distributed
from train.errors import UserError

# Small and fast: 4 steps of 8 rows, a checkpoint every 2 steps, one short generation.
FAST = {
  "data.batch_size": 8,
  "data.eval_batch_size": 8,
  "steps": 4,
  "save_every": 2,
  "eval_every": 100,
  "eval_examples": 2,
  "samples": 1,
  "max_new_tokens": 2,
}
OUTPUTS = {
  "adapter_config.json",
  "adapter_model.safetensors",
  "before.json",
  "checkpoints",
  "logs",
  "loss.png",
  "metrics.jsonl",
  "run.json",
  "summary.json",
}


def _env(**extra) -> dict:
  # The JAX_ settings of a distributed run are the test's to give; the compilation cache's stay.
  cache = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k.startswith(cache)}
  env.pop("XLA_FLAGS", None)
  return {**env, "PYTHONPATH": str(tiny.REPO), **extra}


def _sft_args(files, out: Path, **overrides) -> list[str]:
  """The tiny run's flags; for files["module"] == "train.dpo", train.dpo's with its config."""
  config = "dpo.py" if files.get("module") == "train.dpo" else "llama.py"
  flat = {**FAST, **overrides}
  return tiny.cli_args(files["model"], files["train"], files["eval"], out, config, **flat)


def _module(files) -> str:
  return files.get("module", "train.sft")


def _launch(files, out: Path, processes=2, devices=4, timeout=900, **overrides):
  command = [
    sys.executable,
    "-m",
    "train.launch",
    f"--processes={processes}",
    f"--devices-per-process={devices}",
    f"--timeout={timeout - 20}",
    f"--module={_module(files)}",
    "--",
    *_sft_args(files, out, **overrides),
  ]
  return subprocess.run(
    command, env=_env(), cwd=tiny.REPO, capture_output=True, text=True, timeout=timeout
  )


def _one_process(files, out: Path, devices: int, **overrides):
  env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run(
    [sys.executable, "-m", _module(files), *_sft_args(files, out, **overrides)],
    env=env,
    cwd=tiny.REPO,
    capture_output=True,
    text=True,
    timeout=900,
  )


def _ok(result) -> None:
  assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


def _assert_same_adapter(got_dir: Path, want_dir: Path, atol: float) -> None:
  got = load_file(got_dir / "adapter_model.safetensors")
  want = load_file(want_dir / "adapter_model.safetensors")
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].shape == want[key].shape and got[key].size, key
    np.testing.assert_allclose(got[key], want[key], atol=atol, rtol=0, err_msg=key)


# --------------------------------------------------------------------------- start-up (fast)


@pytest.mark.parametrize(
  "env, message",
  [
    ({"JAX_NUM_PROCESSES": "2"}, r"JAX_NUM_PROCESSES=2 needs a coordinator: set JAX_COORDINATOR"),
    ({"JAX_NUM_PROCESSES": "two"}, r"JAX_NUM_PROCESSES='two' is not valid; expected an integer"),
    (
      {"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "localhost:1234"},
      r"needs this process's id: set JAX_PROCESS_ID",
    ),
    (
      {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "h:1"},
      r"JAX_PROCESS_ID=2 is not valid; expected 0..1",
    ),
    (
      {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "nohost"},
      r"JAX_COORDINATOR_ADDRESS='nohost' is not valid; expected host:port",
    ),
    ({"JAX_PROCESS_ID": "0"}, r"JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not"),
  ],
)
def test_bad_start_up_settings_are_one_line_errors(env, message):
  with pytest.raises(UserError, match=message):
    distributed.initialize(None, env)


def test_config_fields_win_over_the_environment():
  class Fields:
    coordinator, num_processes, process_id, timeout_s, heartbeat_s = "h:9", 4, 3, 5, 7

  s = distributed.settings(Fields, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
  assert (s.coordinator, s.num_processes, s.process_id, s.timeout_s) == ("h:9", 4, 3, 5)
  assert s.sources["num_processes"] == "config.distributed.num_processes"


def test_single_process_and_cluster_detection():
  assert distributed.initialize(None, {}) == "single process"
  assert distributed.initialize(None, {"JAX_NUM_PROCESSES": "1"}) == "single process"
  slurm = dict.fromkeys(
    ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"), "0"
  )
  assert distributed.detected_cluster({**slurm, "SLURM_NTASKS": "4"}) == "SLURM"
  assert distributed.detected_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
  assert distributed.detected_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1"}) == "Open MPI"
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "Cloud TPU"
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "w0"}) is None


def test_unreachable_coordinator_is_a_one_line_error_not_a_hang(tmp_path):
  port = __import__("train.launch", fromlist=["free_port"]).free_port()  # nobody listens there
  env = _env(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
  args = ["--config", str(tiny.REPO / "configs" / "llama.py"), "--config.distributed.timeout_s=2"]
  args.append(f"--config.output_dir={tmp_path / 'out'}")
  started = time.monotonic()
  result = subprocess.run(
    [sys.executable, "-m", "train.sft", *args],
    env=env,
    cwd=tiny.REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert f"coordinator at JAX_COORDINATOR_ADDRESS=127.0.0.1:{port} within" in lines[0]
  assert time.monotonic() - started < 90


# --------------------------------------------------------------------------- the launcher (fast)


def _probe(tmp_path, action: str, processes: int = 3, grace: float = 2.0):
  command = [sys.executable, "-m", "train.launch", f"--processes={processes}"]
  command += ["--devices-per-process=2", f"--grace={grace}", f"--log-dir={tmp_path / 'logs'}"]
  command += ["--module=tests.launch_probe", "--", str(tmp_path), action]
  started = time.monotonic()
  result = subprocess.run(
    command, env=_env(), cwd=tiny.REPO, capture_output=True, text=True, timeout=60
  )
  records = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(processes)]
  return result, records, time.monotonic() - started


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  status = Path(f"/proc/{pid}/status")
  return not (status.exists() and "zombie" in status.read_text())


def test_launcher_gives_each_process_its_place(tmp_path):
  result, records, _ = _probe(tmp_path, "ok")
  assert result.returncode == 0, result.stderr
  assert "probe 0 says hello" in result.stdout  # process 0 is streamed
  assert "probe 1" not in result.stdout
  assert "probe 2 says hello" in (tmp_path / "logs" / "process-2.log").read_text()
  assert [r["JAX_PROCESS_ID"] for r in records] == ["0", "1", "2"]
  assert {r["JAX_NUM_PROCESSES"] for r in records} == {"3"}
  assert len({r["JAX_COORDINATOR_ADDRESS"] for r in records}) == 1
  assert all("--xla_force_host_platform_device_count=2" in r["XLA_FLAGS"] for r in records)


@pytest.mark.parametrize("action", ["fail-1", "fail-1-stuck"])
def test_launcher_stops_every_process_when_one_fails(tmp_path, action):
  # fail-1-stuck: the survivors ignore SIGTERM, so they get SIGKILL after the grace period.
  result, records, elapsed = _probe(tmp_path, action, grace=1.0)
  assert result.returncode == 3
  assert "process 1 exited with status 3" in result.stderr
  assert elapsed < 30
  assert not any(_alive(r["pid"]) for r in records)


# --------------------------------------------------------------------------- training (slow)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return tiny.sft_files(tmp_path_factory.mktemp("multihost"))


@pytest.fixture(scope="module")
def two(files):
  """The reference: 2 processes x 4 CPU devices, mesh data=8."""
  out = files["root"] / "two"
  result = _launch(files, out)
  _ok(result)
  return out, result


@pytest.mark.slow
def test_two_processes_write_one_complete_copy_of_each_output(two):
  out, result = two
  assert {p.name for p in out.iterdir()} == OUTPUTS
  assert sorted(p.name for p in (out / "logs").iterdir()) == ["process-1.log"]
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["steps"] == 4 and len(summary["samples"]) == 1
  assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  tensors = load_file(out / "adapter_model.safetensors")
  assert tensors and all(t.size for t in tensors.values())
  # Only process 0 logs: one "done" line, in process 0's stream.
  assert result.stdout.count("done in") == 1
  assert "done in" not in (out / "logs" / "process-1.log").read_text()


@pytest.fixture(scope="module")
def pair_files(files):
  """train.dpo's inputs: 16 training and 8 eval preference pairs, the same tiny model."""
  from tests.test_dpo import preference_rows

  rows = preference_rows(24)
  root = files["root"]
  (root / "pairs-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
  (root / "pairs-eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
  paths = {"train": root / "pairs-train.jsonl", "eval": root / "pairs-eval.jsonl"}
  return {**files, **paths, "module": "train.dpo"}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_nf4_and_dpo(pair_files):
  """One pair of runs covers three things: a QLoRA (nf4) base sharded over two processes, with the
  merged export gathered from both; train.dpo's pairs, reference log-probs (precomputed and saved
  by process 0) and preference metrics on several processes; and train.dpo SIGKILLed in one
  process after a checkpoint, whose rerun reads the saved reference log-probs back instead of
  computing them again, resumes, and ends as the uninterrupted two-process run does.
  The sharded and uninterrupted one-process runs are tested against each other in test_sft and
  in test_sigkill_one_process_then_resume_on_two_and_on_one."""
  quant = {"quant.kind": "nf4", "quant.block_size": 16, "steps": 4, "save_every": 2}
  quant.update({"export_merged": True, "dpo.precompute_ref": True})
  two, one = pair_files["root"] / "two-nf4", pair_files["root"] / "one-8-nf4"
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  one_args = [sys.executable, "-m", "train.dpo", *_sft_args(pair_files, one, **quant)]
  with ThreadPoolExecutor(2) as pool:  # side by side: the tiny runs are mostly compiles
    launched = pool.submit(_launch, pair_files, two, **quant)
    tiny.kill_at_checkpoint(one_args, env, one, step=2)
    resumed = subprocess.run(
      one_args, env=env, cwd=tiny.REPO, capture_output=True, text=True, timeout=600
    )
    _ok(launched.result())
  _ok(resumed)
  assert "resuming from step 2" in resumed.stdout
  assert "reference log-probs of 16 pairs read from" in resumed.stdout
  _assert_same_adapter(two, one, atol=1e-5)
  for name in ("metrics.jsonl", "reference_logps.safetensors"):
    assert (two / name).exists() and (one / name).exists(), name
  np.testing.assert_allclose(
    load_file(two / "reference_logps.safetensors")["ref_logps"],
    load_file(one / "reference_logps.safetensors")["ref_logps"],
    rtol=1e-5,
    atol=1e-5,
  )
  summaries = [json.loads((d / "summary.json").read_text()) for d in (two, one)]
  for key in ("reward_accuracy", "reward_margin", "logps_chosen"):
    assert np.isclose(summaries[0]["after"][key], summaries[1]["after"][key], atol=1e-4), key
  # The merged export is gathered from both processes: complete, and equal to one process's.
  got = load_file(two / "merged" / "model.safetensors")
  want = load_file(one / "merged" / "model.safetensors")
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].shape == want[key].shape and got[key].size, key
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)


def _children(pid: int) -> list[int]:
  return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_sigkill_one_process_then_resume_on_two_and_on_one(files, two):
  """Also the single-process SIGKILL case: the copy resumes in one process. (train.dpo's own
  SIGKILL test runs one process from start to end.)"""
  out = files["root"] / "killed"
  command = [sys.executable, "-m", "train.launch", "--processes=2", "--devices-per-process=4"]
  command += ["--grace=5", "--", *_sft_args(files, out)]
  launcher = subprocess.Popen(
    command, env=_env(), cwd=tiny.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  deadline = time.monotonic() + 600
  while not (out / "checkpoints" / "2").is_dir():
    assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
    assert time.monotonic() < deadline, "no checkpoint at step 2 in time"
    time.sleep(0.05)
  processes = _children(launcher.pid)
  assert len(processes) == 2
  os.kill(processes[1], signal.SIGKILL)
  killed_at = time.monotonic()
  launcher.wait(timeout=60)
  assert time.monotonic() - killed_at < 30, "the other process must be stopped promptly"
  assert launcher.returncode == 128 + signal.SIGKILL
  assert not any(_alive(p) for p in processes)
  assert not (out / "adapter_model.safetensors").exists(), "the run finished before the kill"

  # A copy resumes on one process (8 devices), the original on two processes.
  other = files["root"] / "killed-then-one"
  shutil.copytree(out, other)
  with ThreadPoolExecutor(2) as pool:  # the two resumes side by side
    resuming = pool.submit(_launch, files, out)
    one = pool.submit(_one_process, files, other, devices=8).result()
    resumed = resuming.result()
  _ok(resumed)
  assert "resuming from step" in resumed.stdout
  _assert_same_adapter(out, two[0], atol=1e-6)
  _ok(one)
  assert "resuming from step" in one.stdout
  _assert_same_adapter(other, two[0], atol=1e-5)
  for run in (out, other):
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "resumed metrics must not repeat steps"


@pytest.mark.slow
@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"mesh.data": 2}, r"config.mesh.data=2 .* uses 2 of the 4 devices of 2 processes"),
    ({"data.batch_size": 6}, r"config.data.batch_size: 6 .* do not split over .* = 4 shards"),
  ],
)
def test_bad_multi_process_configs_are_one_line_errors(files, tmp_path, overrides, message):
  result = _launch(files, tmp_path / "out", devices=2, timeout=200, **overrides)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and __import__("re").search(message, errors[0]), result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.ref
def test_gathered_adapter_loads_in_peft_with_jlora_logits(files, two):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  import jax.numpy as jnp

  import jlora
  from jlora.models import from_pretrained

  ids = np.random.RandomState(0).randint(0, 300, (2, 12))
  model, base, _ = from_pretrained(files["model"])
  ours = jlora.wrap(model.apply)({"params": jlora.load_adapter(two[0], base)}, jnp.asarray(ids))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(files["model"]), dtype=torch.float32)
  with torch.no_grad():  # before PEFT wraps (and changes) the model in place
    plain = hf.eval()(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
  reference = peft.PeftModel.from_pretrained(hf, str(two[0])).eval()
  with torch.no_grad():
    theirs = reference(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
  assert not np.allclose(plain, theirs, atol=1e-3), "the adapter must change the logits"


SHARDED_LOAD = r"""
import json, sys
import jax, numpy as np
from flax.linen import meta
from jlora import sharding as shard_lib
from jlora.models import loading
from jlora.models.llama import DEFAULT_RULES, LlamaForCausalLM
from jlora.models.loading import load_params
from tests import tiny

directory = tiny.make_checkpoint(sys.argv[1], tied=False, layers=3, hidden=48)
model, full, _ = loading.load_hf_dir(directory)
full = meta.unbox(full)  # load_hf_dir boxes params as model.init does
mesh = shard_lib.make_mesh(2, 2, 2)
abstract = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
specs = shard_lib.logical_specs(abstract["params"], DEFAULT_RULES)
reads = []
block = loading.read_block
def spy(slices, transpose, stacked, leaf, index):
  out = block(slices, transpose, stacked, leaf, index)
  reads.append((out.size, int(np.prod(leaf.shape))))
  return out
loading.read_block = spy
sharded = load_params(directory, model, shardings=shard_lib.named(mesh, specs))
same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), sharded, full)
split = jax.tree.map(lambda s: any(a is not None for a in s), specs,
                     is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
print(json.dumps({"same": all(jax.tree.leaves(same)), "reads": reads,
                  "sharded_leaves": sum(jax.tree.leaves(split)), "leaves": len(jax.tree.leaves(split))}))
"""


def test_sharded_load_reads_only_each_devices_slices(tmp_path):
  result = subprocess.run(
    [sys.executable, "-c", SHARDED_LOAD, str(tmp_path / "model")],
    env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    cwd=tiny.REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["same"], "sharded loading must give the same values as a full read"
  assert report["sharded_leaves"] >= 5
  # Each device reads its own block (JAX may skip repeated ones): a whole tensor is read only for
  # the replicated params.
  full_reads = sum(got == whole for got, whole in report["reads"])
  assert len(report["reads"]) >= report["leaves"]
  assert len(report["reads"]) - full_reads >= 2 * report["sharded_leaves"]
  assert full_reads <= 8 * (report["leaves"] - report["sharded_leaves"])


def test_helpers_on_two_real_processes(tmp_path):
  command = [sys.executable, "-m", "train.launch", "--processes=2", "--devices-per-process=2"]
  command += ["--timeout=150", "--module=tests.multihost_probe", "--", str(tmp_path)]
  result = subprocess.run(
    command, env=_env(), cwd=tiny.REPO, capture_output=True, text=True, timeout=180
  )
  assert result.returncode == 0, result.stderr[-3000:]
  got = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
  rows = np.arange(24 * 3).reshape(24, 3)[::-1]
  # Each process built only its half of the global batch, and the halves make the whole.
  assert sorted(got[0]["asked"]) == list(range(12, 24))
  assert sorted(got[1]["asked"]) == list(range(12))
  for g in got:
    assert g["gathered"] == rows.tolist()
    assert g["sum"] == rows.sum(axis=0).tolist()
    assert g["shared"] == {"run": "from process 0", "by": 0}
    assert g["error"] == "main says no"
  assert got[1]["joined"].startswith("process 1 of 2")

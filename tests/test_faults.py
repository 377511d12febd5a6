"""Faults a run must survive: damaged checkpoints (set aside, never wedging the run), a full disk
at every write site (one line, nothing saved lost, the rerun resumes), and data or settings that
changed under a resume (refused, nothing overwritten). The reference is an uninterrupted run: a
run that survived a fault must end with exactly its adapter."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
from jlora.models import from_pretrained
from tests import tiny
from train import config as config_lib
from train import outputs, sft
from train.checkpoint import DAMAGED_PREFIX, Checkpointer
from train.errors import UserError

pytestmark = pytest.mark.slow

RUN = {"steps": 4, "save_every": 1, "eval_examples": 2, "samples": 1, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The tiny inputs and one uninterrupted run, whose adapter every surviving run must equal.
  It keeps three checkpoints (2, 3, 4; the trainer keeps two), so one has a middle to damage."""
  files = tiny.sft_files(tmp_path_factory.mktemp("faults"))
  out = files["root"] / "uninterrupted"
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sft, "Checkpointer", functools.partial(Checkpointer, max_to_keep=3))
    sft.run(config(files, out), progress=False)
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3", "4"]
  return files, out


def config(files, out, **overrides):
  return tiny.sft_config(files["model"], files["train"], files["eval"], out, **RUN, **overrides)


def assert_same_adapter(a: Path, b: Path) -> None:
  x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
  assert x.keys() == y.keys()
  for key in x:
    np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def damage(checkpoint: Path) -> None:
  for f in checkpoint.rglob("*"):
    if f.is_file() and f.stat().st_size > 16:
      f.write_bytes(f.read_bytes()[:8])


@pytest.mark.parametrize(
  "damaged,resumed_from",
  [(("3",), 4), (("3", "4"), 2), (("2", "3", "4"), None)],
  ids=["middle", "newest-and-middle", "every"],  # the second reads past a damaged newest and middle
)
def test_damaged_checkpoints_are_set_aside_and_the_run_finishes_equal(
  uninterrupted, tmp_path, capsys, damaged, resumed_from
):
  """Checkpoints 2, 3, 4 of a finished run, some damaged, the adapter gone: the rerun resumes
  from the newest good one (reading past a damaged middle one), or starts over with none, and
  ends with the uninterrupted run's adapter. What it read and found damaged is set aside."""
  files, ref = uninterrupted
  out = tmp_path / "run"
  shutil.copytree(ref, out)
  (out / "adapter_model.safetensors").unlink()
  for step in damaged:
    damage(out / "checkpoints" / step)
  sft.run(config(files, out), progress=False)  # before: StepAlreadyExistsError on reaching step 4
  assert_same_adapter(out, ref)
  logged = capsys.readouterr()
  resumed = re.findall(r"resuming from step (\d+)", logged.out)
  assert resumed == ([str(resumed_from)] if resumed_from else []), logged.out
  aside = sorted(
    p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(DAMAGED_PREFIX)
  )
  read = [step for step in damaged if resumed_from is None or int(step) > resumed_from]
  assert [name.split("-")[1] for name in aside] == read  # renamed, not deleted
  assert all((out / "checkpoints" / step).is_dir() for step in damaged if step not in read)
  assert all(f"set it aside as {out / 'checkpoints' / name}" in logged.err for name in aside)


def test_damage_in_the_middle_resumes_from_the_newest(tmp_path):
  state = {"w": jnp.arange(6.0)}
  checkpoints = Checkpointer(tmp_path / "checkpoints", max_to_keep=3)
  for step in (1, 2, 3):
    checkpoints.save(step, {"w": state["w"] * step}, {"step": step})
  damage(tmp_path / "checkpoints" / "2")
  restored, meta = checkpoints.restore_newest(state, lambda meta: None)
  assert meta["step"] == 3
  np.testing.assert_array_equal(restored["w"], np.arange(6.0) * 3)
  damage(tmp_path / "checkpoints" / "3")
  restored, meta = checkpoints.restore_newest(state, lambda meta: None)
  assert meta["step"] == 1 and checkpoints.manager.all_steps() == [1]  # 2 and 3 set aside
  checkpoints.save(3, state, {"step": 3})  # a step that was set aside is saved again
  assert checkpoints.latest_step() == 3


# The trainer as `python -m train.sft` runs it, except that the save of checkpoint `slow_from`
# (and later) waits inside orbax's temporary directory, after the arrays are written and before
# the step's metadata is, until the test removes the marker file: a save that is still going on
# when the signals come, at a point the test knows.
SLOW_SAVE = """
import runpy, sys, time
from pathlib import Path
import orbax.checkpoint as ocp

marker, slow_from = Path(sys.argv[1]), int(sys.argv[2])
write_json = ocp.JsonCheckpointHandler._save_fn

def slow_write_json(self, item, directory):
  if isinstance(item, dict) and item.get("step", 0) >= slow_from:
    marker.write_text(str(directory))
    deadline = time.time() + 120
    while marker.exists() and time.time() < deadline:
      time.sleep(0.02)
  return write_json(self, item, directory)

ocp.JsonCheckpointHandler._save_fn = slow_write_json
sys.argv = ["train.sft", *sys.argv[3:]]
runpy.run_module("train.sft", run_name="__main__")
"""


def wait_for(condition, proc, what: str, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:  # it may have ended just after the check
      assert condition(), f"the run ended before {what}"
      return
    assert time.time() < deadline, f"no {what} in time"
    time.sleep(0.02)


def test_a_second_sigint_during_the_save_then_the_rerun_finishes_equal(
  uninterrupted, tmp_path, capsys
):
  """Ctrl-C, then Ctrl-C again while checkpoint 2 is being written, in a real process: exit 130,
  one line, no traceback; checkpoint 1 stays, and the rerun resumes from it and ends with the
  uninterrupted run's adapter."""
  files, ref = uninterrupted
  out, marker = tmp_path / "run", tmp_path / "saving"
  stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
  argv = tiny.cli_args(files["model"], files["train"], files["eval"], out, **RUN)
  with stdout.open("w") as out_file, stderr.open("w") as err_file:
    proc = subprocess.Popen(
      [sys.executable, "-c", SLOW_SAVE, str(marker), "2", *argv],
      env={**os.environ, "PYTHONPATH": str(tiny.REPO)},
      cwd=tiny.REPO,
      stdout=out_file,
      stderr=err_file,
    )
  try:
    wait_for(marker.exists, proc, "save of checkpoint 2")
    proc.send_signal(signal.SIGINT)
    # Two signals sent at once can arrive as one: the second goes after the first is handled.
    wait_for(lambda: "SIGINT: stopping" in stdout.read_text(), proc, "first SIGINT handled")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "error:" in stderr.read_text(), proc, "second SIGINT handled")
    marker.unlink()  # lets the stalled write go on, as a slow disk would
    proc.wait(timeout=120)
  finally:
    marker.unlink(missing_ok=True)
    proc.kill()
  err = stderr.read_text()
  lines = err.strip().splitlines()  # the progress bar's lines, then ours
  assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
  assert [line for line in lines if "error" in line.lower()] == lines[-1:], err[-3000:]
  assert lines[-1].startswith("error: stopped by SIGINT a second time"), lines[-1]
  assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
  assert not (out / "adapter_model.safetensors").exists()

  capsys.readouterr()
  sft.main(["train.sft", *argv])
  assert "resuming from step 1 " in capsys.readouterr().out
  assert_same_adapter(out, ref)


# --------------------------------------------------------------------------- changed under a resume


@pytest.mark.parametrize(
  "change,named",
  [
    (lambda files, c: files["train"].write_text(files["train"].read_text()[:-200]), "config.data"),
    (lambda files, c: setattr(c.lora, "rank", 8), "config.lora.rank: 4 -> 8"),
    (lambda files, c: setattr(c.optim, "lr", 5e-3), "config.optim.lr: 0.01 -> 0.005"),
    (lambda files, c: setattr(c, "seed", 1), "config.seed: 0 -> 1"),
    (lambda files, c: setattr(c.model, "rope_theta", 1e5), "config.model.rope_theta"),
  ],
  ids=["data", "rank", "lr", "seed", "model-field"],
)
def test_a_changed_resume_is_refused_and_nothing_is_overwritten(
  uninterrupted, tmp_path, change, named
):
  files, ref = uninterrupted
  files = {**files, "train": tmp_path / "train.jsonl"}
  shutil.copy(uninterrupted[0]["train"], files["train"])
  out = tmp_path / "run"
  shutil.copytree(ref, out)
  first = config(files, out)
  run = json.loads((out / "run.json").read_text())
  run["fingerprint"] = config_lib.fingerprint(first)  # as if the run had used this data file
  (out / "run.json").write_text(json.dumps(run))
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  again = config(files, out)
  change(files, again)
  with pytest.raises(UserError, match="holds a run with other settings") as error:
    outputs.claim(out, again)
  assert named in str(error.value) and "--config.overwrite=True" in str(error.value)
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- a full disk


def enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


class LibraryError(Exception):
  """How orbax or safetensors' Rust core re-word an ENOSPC."""


def wrapped_enospc(*args, **kwargs):
  try:
    enospc()
  except OSError as e:
    raise LibraryError("IoError(Os { code: 28, kind: StorageFull })") from e


def test_disk_full_during_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
  state = {"w": jnp.arange(4.0)}
  checkpoints = Checkpointer(tmp_path / "checkpoints")
  checkpoints.save(1, state, {"step": 1})
  monkeypatch.setattr(checkpoints.manager, "save", wrapped_enospc)
  with pytest.raises(
    UserError, match=r"disk full: could not write .*checkpoints/2 .*checkpoint 1 is"
  ):
    checkpoints.save(2, {"w": state["w"] * 2}, {"step": 2})
  monkeypatch.undo()
  restored, meta = checkpoints.restore_newest(state, lambda meta: None)
  assert meta["step"] == 1
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))


@pytest.mark.parametrize(
  "write",
  [
    lambda out: outputs.write_metrics(out / "metrics.jsonl", [{"step": 2, "loss": 1.0}]),
    lambda out: outputs.write_json(out / "summary.json", {"run_id": "new"}),
    lambda out: outputs.plot_losses(out / "loss.png", [{"step": 1, "loss": 1.0}]),
  ],
  ids=["metrics", "json", "plot"],
)
def test_disk_full_while_writing_an_output_keeps_the_previous_file(tmp_path, monkeypatch, write):
  for name in ("metrics.jsonl", "summary.json", "loss.png"):
    (tmp_path / name).write_text("previous")
  # The write succeeds, its rename fails: as when the disk fills between the two.
  fake_os = types.SimpleNamespace(replace=enospc, getpid=os.getpid, remove=os.remove)
  monkeypatch.setattr(outputs, "os", fake_os)
  with pytest.raises(UserError, match=r"disk full: could not write .*previous .* is intact"):
    write(tmp_path)
  assert all((tmp_path / n).read_text() == "previous" for n in ("metrics.jsonl", "summary.json"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl", "summary.json"]


@pytest.mark.parametrize("site", ["save_adapter", "export_merged", "export_gguf"])
def test_disk_full_while_exporting_names_the_file(uninterrupted, tmp_path, monkeypatch, site):
  files, _ = uninterrupted
  model, base, tokenizer = from_pretrained(files["model"])
  lora = jlora.LoraConfig(rank=4, targets="all-linear")
  trainable, frozen = jlora.split(jlora.apply(base, lora, jax.random.key(0)))
  c = types.SimpleNamespace(
    model=types.SimpleNamespace(path=str(files["model"])),
    export_merged=site == "export_merged",
    export_gguf="f32" if site == "export_gguf" else "",
    tokens={},
  )
  t = types.SimpleNamespace(
    out=tmp_path, frozen=frozen, lora=lora, config=c, model=model, tokenizer=tokenizer
  )
  monkeypatch.setattr(jlora, site, wrapped_enospc)
  target = {"save_adapter": "adapter_model", "export_merged": "merged", "export_gguf": "gguf"}
  with pytest.raises(UserError, match=rf"disk full: could not write \S*{target[site]}"):
    sft.save_adapter_and_export(t, trainable)


def test_disk_full_on_a_real_file_system_then_resume(uninterrupted, tmp_path, capsys):
  """A 300 KiB tmpfs fills during the run: one line, exit 2; given room, the rerun resumes and
  ends with the uninterrupted run's adapter."""
  files, ref = uninterrupted
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)]).returncode:
    pytest.skip("can't mount a tmpfs here (needs root); the injected ENOSPC tests cover the sites")
  try:
    out = mount / "run"
    argv = ["train.sft", *tiny.cli_args(files["model"], files["train"], files["eval"], out, **RUN)]
    with pytest.raises(SystemExit) as stop:
      sft.main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and last.startswith("error: disk full: could not write"), last
    subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
    sft.main(argv)
    assert_same_adapter(out, ref)
  finally:
    subprocess.run(["umount", str(mount)])

"""train/config.py and train/outputs.py: checks that need no model (fast)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from configs.llama import get_config
from train import config as C
from train import outputs
from train.errors import UserError


def test_lora_and_quant_sections_hold_every_library_field():
  config = get_config()
  for name, cls in C.LIBRARY_SECTIONS.items():
    assert set(config[name]) == {f.name for f in dataclasses.fields(cls)}, name
  config.quant.kind = "nf4"
  config.lora.rank_pattern = {"o_proj": 2}
  config.lora.alpha_pattern = {"q_proj": 3.0}
  config.lora.exclude = "down_proj,up_proj"
  config.quant.targets = ["q_proj"]
  lora, quant = C.library_config(config, "lora"), C.quant_config(config)
  assert (lora.rank, lora.rank_pattern, lora.alpha_pattern) == (16, {"o_proj": 2}, {"q_proj": 3.0})
  assert lora.exclude == ["down_proj", "up_proj"] and quant.targets == ["q_proj"]


@pytest.mark.parametrize(
  "value,expected",
  [
    ("all-linear", "all-linear"),
    ("q_proj", ["q_proj"]),
    ("q_proj, v_proj", ["q_proj", "v_proj"]),
    (".*(q|v)_proj", ".*(q|v)_proj"),
    (["q_proj"], ["q_proj"]),
  ],
)
def test_parse_targets(value, expected):
  assert C.parse_targets(value) == expected


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("lora.rank", 0, r"config.lora.rank=0 is invalid"),
    ("lora.rank_pattern", {"o_proj": -2}, r"config.lora.rank_pattern\['o_proj'\]=-2"),
    ("optim.lr", 0.0, r"config.optim.lr: 0.0 is not valid; expected a number in \(0, 1\)"),
    ("optim.lr", 1.0, r"config.optim.lr: 1.0 is not valid"),
    ("optim.lr", float("nan"), r"config.optim.lr: nan is not valid"),
    ("steps", 0, r"config.steps: 0 is not valid; expected a positive integer"),
    ("data.grad_accum", 3, r"config.data.batch_size: 4 is not divisible by"),
    ("eval.metrics", "bleu", r"config.eval.metrics: 'bleu' is not valid"),
    ("model.dtype", "float3", r"config.model.dtype: 'float3' is not a dtype"),
  ],
)
def test_bad_values_name_the_config_field(field, value, message):
  config = get_config()
  *section, key = field.split(".")
  (config[section[0]] if section else config)[key] = value
  with pytest.raises(UserError, match=message):
    C.check_config(config)


@pytest.mark.parametrize(
  "mesh,devices,expected",
  [
    ((-1, 1, 1, 1), 4, {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1}),
    ((1, -1, 2, 1), 8, {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}),
    ((2, 2, 1, 1), 4, {"data": 2, "fsdp": 2, "tensor": 1, "expert": 1}),
    ((2, 1, 1, -1), 8, {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}),
  ],
)
def test_mesh_sizes_use_every_device(mesh, devices, expected):
  config = get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.expert = mesh
  config.data.batch_size = config.data.eval_batch_size = 8  # rows for every data shard
  assert C.mesh_sizes(config, devices) == expected


def test_rows_must_split_over_the_expert_axis_too():
  config = get_config()
  config.mesh.data, config.mesh.expert = 2, 4
  config.data.batch_size, config.data.grad_accum = 4, 1
  with pytest.raises(
    UserError, match=r"config.mesh.data x config.mesh.fsdp x config.mesh.expert = 8"
  ):
    C.mesh_sizes(config, 8)


@pytest.mark.parametrize(
  "mesh,devices,message",
  [
    ((3, 1, 1), 4, r"config.mesh.data=3 .* uses 3 of the 4 devices, leaving 1 idle \(devices 3..3"),
    ((2, 2, 2), 4, r"needs 8 devices, but only 4 exist"),
    ((-1, 3, 1), 4, r"config.mesh.data: -1 can't take the rest of the 4 devices"),
    ((-1, -1, 1), 4, r"at most one axis"),
    ((0, 1, 1), 4, r"config.mesh.data: 0 is not valid"),
    ((1, 1, 4), 4, None),
  ],
)
def test_mesh_errors_name_config_mesh(mesh, devices, message):
  config = get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  if message is None:  # 4 rows per step over data x fsdp = 1 shard: fine
    C.mesh_sizes(config, devices)
    return
  with pytest.raises(UserError, match=message):
    C.mesh_sizes(config, devices)


def test_batch_must_split_over_the_data_shards():
  config = get_config()
  config.data.batch_size = 6
  with pytest.raises(UserError, match=r"6 rows per microbatch do not split over .* = 4 shards"):
    C.mesh_sizes(config, 4)


def test_fingerprint_differences_name_each_field():
  old = C.fingerprint(get_config())
  config = get_config()
  config.lora.rank, config.optim.lr = 8, 2e-4
  config.lora.rank_pattern = {"o_proj": 2}
  assert C.fingerprint_differences(old, C.fingerprint(config)) == [
    "config.lora.rank: 16 -> 8",
    "config.lora.rank_pattern: {} -> {'o_proj': 2}",
    "config.optim.lr: 0.001 -> 0.0002",
  ]
  json.dumps(old)  # stored in run.json and checkpoint meta as plain JSON


def test_claim_keeps_one_run_per_dir(tmp_path):
  config = get_config()
  record, resumed = outputs.claim(tmp_path, config)
  assert not resumed and json.loads((tmp_path / "run.json").read_text())["run_id"] == record.run_id
  # No outputs yet (a run that stopped before its first step): a changed config just starts over.
  config.lora.rank = 8
  again, _ = outputs.claim(tmp_path, config)
  assert again.run_id != record.run_id
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "metrics.jsonl").write_text("")
  same, resumed = outputs.claim(tmp_path, config)
  assert resumed and same.run_id == again.run_id
  config.lora.rank = 4
  with pytest.raises(
    UserError, match=r"holds a run with other settings \(config.lora.rank: 8 -> 4\)"
  ):
    outputs.claim(tmp_path, config)
  config.overwrite = True
  fresh, resumed = outputs.claim(tmp_path, config)
  assert not resumed and not (tmp_path / "checkpoints").exists()
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("where", ["file", "/proc/jlora", "/sys/jlora"])
def test_output_dir_that_cannot_hold_a_run(tmp_path, where):
  if where == "file":
    where = tmp_path / "file"
    where.write_text("")
  with pytest.raises(UserError, match=r"config.output_dir: .*(is a file|system file system)"):
    outputs.check_output_dir(str(where))


def test_output_dir_on_a_read_only_file_system(tmp_path, monkeypatch):
  import errno
  from pathlib import Path

  # A real read-only mount needs privileges a test can't assume, so the OS answer is simulated
  # at the one call that meets it first: creating the directory.
  def read_only(self, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(self))

  monkeypatch.setattr(Path, "mkdir", read_only)
  where = str(tmp_path / "mnt" / "run")
  with pytest.raises(UserError) as raised:
    outputs.check_output_dir(where)
  assert str(raised.value) == (
    f"config.output_dir: {where!r} can't be written (the file system is read-only); "
    "use a writable directory."
  )


def test_output_dir_without_write_permission(tmp_path):
  import os

  if os.geteuid() == 0:
    pytest.skip("root may write into a read-only directory")
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o555)
  with pytest.raises(
    UserError, match=r"config.output_dir: .* can't be written \(Permission denied\)"
  ):
    outputs.check_output_dir(str(locked / "run"))

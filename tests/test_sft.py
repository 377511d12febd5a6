"""End-to-end SFT on a tiny random Llama written as an HF checkpoint dir in the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import jlora
from jlora.models import from_pretrained
from tests import tiny
from train import sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  return {
    "model": tiny.make_checkpoint(root / "model"),
    "train": tiny.write_rows(root / "train.jsonl", 48),
    "eval": tiny.write_rows(root / "eval.jsonl", 8, start=1000),
    "root": root,
  }


@pytest.fixture(scope="module")
def finished(files):
  """One uninterrupted run, shared by the tests that inspect its outputs."""
  out = files["root"] / "run"
  summary = sft.run(
    tiny.sft_config(files["model"], files["train"], files["eval"], out, export_merged=True),
    progress=False,
  )
  return out, summary


def test_run_writes_every_output_and_learns(files, finished):
  out, summary = finished
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in train)
  assert train[-1]["loss"] < train[0]["loss"]
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  config = json.loads((out / "adapter_config.json").read_text())
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
  tensors = load_file(out / "adapter_model.safetensors")
  assert tensors and all(t.size for t in tensors.values())

  # The adapter loads back onto the base, and the merged export equals the adapted model.
  model, base, _ = from_pretrained(files["model"])
  adapted = jlora.load_adapter(out, base)
  ids = jnp.asarray(
    np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 12)), jnp.int32
  )
  expected = jlora.wrap(model.apply)({"params": adapted}, ids)
  merged_model, merged, _ = from_pretrained(out / "merged")
  np.testing.assert_allclose(merged_model.apply({"params": merged}, ids), expected, atol=1e-4)
  assert not np.allclose(model.apply({"params": base}, ids), expected, atol=1e-4)


SHARDED = r"""
import json, sys
import jax
from jax.sharding import PartitionSpec as P
from train import sft
from tests import tiny
model_dir, train_file, eval_file, root = sys.argv[1:]
losses = {}
for name, mesh in {"single": (1, 1, 1), "2x2x2": (2, 2, 2)}.items():
  config = tiny.sft_config(model_dir, train_file, eval_file, f"{root}/{name}", steps=3, eval_every=100,
                           save_every=100, eval_examples=1, samples=1, max_new_tokens=2)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  sft.run(config, progress=False)
  rows = [json.loads(l) for l in open(f"{root}/{name}/metrics.jsonl")]
  losses[name] = [r["loss"] for r in rows if "loss" in r]
config.lora.targets = "all-linear"
m = sft.shard_lib.make_mesh(2, 2, 2)
with jax.set_mesh(m), sft.nn.logical_axis_rules(sft.DEFAULT_RULES):
  model, params, _, specs, layout = sft.load_model(config, m)
  params, _ = sft.adapt(config, params, specs, layout, m)
node = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
embed = params["model"]["embed_tokens"]["embedding"]
print(json.dumps({"losses": losses, "base": str(node.base.sharding.spec), "a": str(node.a.sharding.spec),
                  "b": str(node.b.sharding.spec), "embed": str(embed.sharding.spec),
                  "devices": len(node.base.sharding.device_set)}))
"""


def _env(**extra):
  return {**os.environ, "PYTHONPATH": str(tiny.REPO), **extra}


def test_sharded_run_matches_single_device(files):
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      SHARDED,
      str(files["model"]),
      str(files["train"]),
      str(files["eval"]),
      str(files["root"] / "sharded"),
    ],
    env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  single, sharded = report["losses"]["single"], report["losses"]["2x2x2"]
  assert len(single) == len(sharded) == 3
  np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)
  # q_proj kernel [layers, embed, q_heads]: embed on fsdp, heads on tensor; A and B follow the base.
  assert report["base"] == str(P(None, "fsdp", "tensor"))
  assert report["a"] == str(P(None, "fsdp", None))
  assert report["b"] == str(P(None, None, "tensor"))
  assert report["embed"] == str(P("tensor", "fsdp"))
  assert report["devices"] == 8


def test_sigkill_then_resume_ends_with_the_same_adapter(files, finished):
  out = files["root"] / "killed"
  args = [
    sys.executable,
    "-m",
    "train.sft",
    *tiny.cli_args(files["model"], files["train"], files["eval"], out),
  ]
  proc = subprocess.Popen(
    args, env=_env(), cwd=tiny.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  deadline = time.time() + 300
  while not (out / "checkpoints" / "4").is_dir():
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline, "no checkpoint at step 4 in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"

  resumed = subprocess.run(
    args, env=_env(), cwd=tiny.REPO, capture_output=True, text=True, timeout=300
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step 4" in resumed.stdout
  reference = load_file(finished[0] / "adapter_model.safetensors")
  got = load_file(out / "adapter_model.safetensors")
  assert reference.keys() == got.keys()
  for key in reference:
    np.testing.assert_allclose(got[key], reference[key], atol=1e-6, rtol=0, err_msg=key)
  steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)), "resumed metrics must not repeat steps"


def test_qlora_run(files):
  summary = sft.run(
    tiny.sft_config(
      files["model"],
      files["train"],
      files["eval"],
      files["root"] / "qlora",
      **{"quant.kind": "nf4", "quant.block_size": 16, "steps": 3, "save_every": 3},
    ),
    progress=False,
  )
  assert np.isfinite(summary["after"]["eval_loss"])
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_non_finite_loss_stops_after_saving_the_last_good_state(files):
  out = files["root"] / "nan"
  config = tiny.sft_config(
    files["model"],
    files["train"],
    files["eval"],
    out,
    **{"optim.lr": 1e30, "optim.clip_norm": 1e30, "optim.warmup_steps": 1},
  )
  with pytest.raises(
    FloatingPointError, match=r"step \d+: the loss is (nan|inf).*Saved the last good state"
  ):
    sft.run(config, progress=False)
  saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert saved, "a checkpoint of the last good state must exist"


# --------------------------------------------------------------------------- bad input


def _config(files, tmp_path, **overrides):
  return tiny.sft_config(
    files["model"], files["train"], files["eval"], tmp_path / "out", **overrides
  )


def test_missing_data_file(files, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.data.train.*nope.jsonl"):
    sft.run(
      _config(files, tmp_path, **{"data.train": str(tmp_path / "nope.jsonl")}), progress=False
    )


def test_rows_missing_fields(files, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
  with pytest.raises(ValueError, match=r"row 1.*'completion'"):
    sft.run(_config(files, tmp_path, **{"data.train": str(bad)}), progress=False)


def test_empty_dataset(files, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match=r"empty"):
    sft.run(_config(files, tmp_path, **{"data.train": str(empty)}), progress=False)


def test_model_path_that_does_not_exist(files, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"does not exist"):
    sft.run(_config(files, tmp_path, **{"model.path": str(tmp_path / "no-model")}), progress=False)


def test_bad_config_values(files, tmp_path):
  with pytest.raises(
    ValueError, match=r"config.quant.kind='fp3' is unknown: valid values are 'none', 'nf4', 'int4'"
  ):
    sft.run(_config(files, tmp_path, **{"quant.kind": "fp3"}), progress=False)
  with pytest.raises(ValueError, match=r"config.steps=0 is invalid"):
    sft.run(_config(files, tmp_path, steps=0), progress=False)


def test_prompts_longer_than_max_length_are_counted_and_skipped(files, tmp_path, capsys):
  rows = tmp_path / "long.jsonl"
  long_prompt = {
    "messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x"}]
  }
  rows.write_text(
    tiny.write_rows(tmp_path / "ok.jsonl", 16).read_text() + json.dumps(long_prompt) + "\n"
  )
  sft.run(
    _config(files, tmp_path, steps=1, save_every=1, eval_every=1, **{"data.train": str(rows)}),
    progress=False,
  )
  assert "1 skipped (prompt longer than max_length)" in capsys.readouterr().out


def test_unknown_config_key_is_rejected_by_the_cli(files, tmp_path):
  args = tiny.cli_args(files["model"], files["train"], files["eval"], tmp_path / "out")
  result = subprocess.run(
    [sys.executable, "-m", "train.sft", *args, "--config.lora.rnak=4"],
    env=_env(),
    cwd=tiny.REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "rnak" in result.stderr


@pytest.mark.parametrize("name", ["llama", "llama3", "qlora"])
def test_shipped_configs_load_and_validate(name):
  import importlib

  config = importlib.import_module(f"configs.{name}").get_config()
  sft.check_config(config)
  sft.lora_config(config)
  assert config.quant.kind in sft.QUANT_KINDS

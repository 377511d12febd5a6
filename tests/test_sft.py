"""End-to-end SFT on a tiny random Llama written as an HF checkpoint dir in the test."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import jlora
from jlora.models import from_pretrained
from tests import tiny
from train import config as config_lib
from train import sft
from train.errors import UserError

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
from train import sft
from tests import tiny
model_dir, train_file, eval_file, root, name = sys.argv[1:]
mesh = {"single": (1, 1, 1), "2x2x2": (2, 2, 2)}[name]
config = tiny.sft_config(model_dir, train_file, eval_file, f"{root}/{name}", steps=3, eval_every=100,
                         save_every=100, eval_examples=1, samples=1, max_new_tokens=2)
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
sft.run(config, progress=False)
rows = [json.loads(l) for l in open(f"{root}/{name}/metrics.jsonl")]
report = {"losses": [r["loss"] for r in rows if "loss" in r]}
if name == "2x2x2":
  m = sft.shard_lib.make_mesh(*mesh)
  with jax.set_mesh(m), sft.nn.logical_axis_rules(sft.DEFAULT_RULES):
    model, params, _ = sft.load_model(config, m)
    params = sft.jlora.combine(*sft.adapt(config, params))
  node = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  embed = params["model"]["embed_tokens"]["embedding"]
  report.update(base=str(node.base.sharding.spec), a=str(node.a.sharding.spec),
                b=str(node.b.sharding.spec), embed=str(embed.sharding.spec),
                devices=len(node.base.sharding.device_set))
print(json.dumps(report))
"""


def _env(**extra):
  return {**os.environ, "PYTHONPATH": str(tiny.REPO), **extra}


def test_sharded_run_matches_single_device(files):
  # The trainer uses every device, so the single-device run is a process that has only one.
  args = [str(files[k]) for k in ("model", "train", "eval")] + [str(files["root"] / "sharded")]
  procs = {
    name: subprocess.Popen(
      [sys.executable, "-c", SHARDED, *args, name],
      env=_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name, devices in (("single", 1), ("2x2x2", 8))
  }
  reports = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    reports[name] = json.loads(out.strip().splitlines()[-1])
  single, sharded = reports["single"]["losses"], reports["2x2x2"]["losses"]
  report = reports["2x2x2"]
  assert len(single) == len(sharded) == 3
  np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)
  # q_proj kernel [layers, embed, q_heads]: embed on fsdp, heads on tensor; A and B follow the base.
  assert report["base"] == str(P(None, "fsdp", "tensor"))
  assert report["a"] == str(P(None, "fsdp", None))
  assert report["b"] == str(P(None, None, "tensor"))
  assert report["embed"] == str(P("tensor", "fsdp"))
  assert report["devices"] == 8


def test_qlora_dora_run_saves_a_peft_dora_adapter(files):
  """QLoRA (nf4) with DoRA through the trainer: it learns and writes PEFT's DoRA keys. A plain
  QLoRA run is tested in test_fidelity (against its dequantized base) and in test_multihost."""
  out = files["root"] / "qlora_dora"
  config = tiny.sft_config(
    files["model"],
    files["train"],
    files["eval"],
    out,
    **{"quant.kind": "nf4", "quant.block_size": 16, "lora.use_dora": True},
    **{"steps": 3, "save_every": 3},
  )
  with pytest.warns(UserWarning, match="vLLM does not serve DoRA"):
    summary = sft.run(config, progress=False)
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  assert tiny.read_json(out / "adapter_config.json")["use_dora"] is True
  assert any(
    k.endswith("lora_magnitude_vector") for k in load_file(out / "adapter_model.safetensors")
  )


def test_non_finite_loss_stops_after_saving_the_last_good_state(files):
  # lr >= 1 is refused up front, so a NaN comes from the model: a final norm scale of inf.
  from safetensors.numpy import save_file

  model = tiny.make_checkpoint(files["root"] / "nan-model")
  tensors = load_file(model / "model.safetensors")
  tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.inf)
  save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
  out = files["root"] / "nan"
  config = tiny.sft_config(model, files["train"], files["eval"], out, eval_examples=1, samples=0)
  with pytest.raises(
    UserError, match=r"step \d+: the loss is (nan|inf).*Saved the last good state"
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
  with pytest.raises(UserError, match=r"line 2.*'completion'"):
    sft.run(_config(files, tmp_path, **{"data.train": str(bad)}), progress=False)


def test_empty_dataset(files, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(UserError, match=r"empty"):
    sft.run(_config(files, tmp_path, **{"data.train": str(empty)}), progress=False)


def test_model_path_that_does_not_exist(files, tmp_path):
  with pytest.raises(UserError, match=r"config.model.path = .*no-model.*does not exist"):
    sft.run(_config(files, tmp_path, **{"model.path": str(tmp_path / "no-model")}), progress=False)


def test_bad_config_values(files, tmp_path):
  with pytest.raises(
    UserError, match=r"config.quant.kind: 'fp3' is not valid; expected one of 'none', 'nf4', 'int4'"
  ):
    sft.run(_config(files, tmp_path, **{"quant.kind": "fp3"}), progress=False)
  with pytest.raises(UserError, match=r"config.steps: 0 is not valid"):
    sft.run(_config(files, tmp_path, steps=0), progress=False)


@pytest.mark.parametrize(
  "spec, why",
  [
    ("nnx_llama", r"expected 'package.module:factory'"),
    ("no_such_module:make", r"No module named 'no_such_module'"),
    ("tests.tiny:no_such_factory", r"has no attribute 'no_such_factory'"),
    (
      "tests.tiny:TINY_VOCAB_SIZE",
      r"TINY_VOCAB_SIZE in tests.tiny is not a function \(its type is int\)",
    ),
    ("tests.tiny:read_json", r"the factory returned dict; expected an nnx.Module"),
  ],
)
def test_a_bad_nnx_factory_is_one_line_naming_config_model_nnx(files, tmp_path, spec, why):
  # read_json(config.model.path) fails on a directory: point the path at a JSON file instead.
  path = tiny.write_rows(tmp_path / "rows.jsonl", 1) if spec.endswith("read_json") else None
  if path is not None:
    path.write_text("{}")
  overrides = {"model.nnx": spec, **({"model.path": str(path)} if path else {})}
  with pytest.raises(UserError, match=rf"^config.model.nnx = '{re.escape(spec)}': .*{why}"):
    sft.run(_config(files, tmp_path, **overrides), progress=False)


def test_an_nnx_models_split_that_is_not_its_call_is_one_line(files, tmp_path):
  """hidden_states / head that do not make the model's call would train on another model's
  loss: the loader compares head(hidden_states(x)) with the call on an example row."""
  spec = "tests.nnx_tiny:llama_with_a_wrong_split"
  with pytest.raises(
    UserError,
    match=rf"^config.model.nnx = '{re.escape(spec)}' \(the model's hidden_states and head\): "
    r"head\(hidden_states\(\.\.\.\)\) differs from the model's call by up to",
  ):
    sft.run(_config(files, tmp_path, **{"model.nnx": spec}), progress=False)


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


@pytest.mark.parametrize("name", ["llama", "llama3", "qlora"])
def test_shipped_configs_load_and_validate(name):
  import importlib

  config = importlib.import_module(f"configs.{name}").get_config()
  config_lib.check_config(config)
  assert isinstance(config_lib.library_config(config, "lora"), jlora.LoraConfig)


# --------------------------------------------------------------------------- plain-text data, every format

QA = [
  ("What is the capital of France?", "Paris"),
  ("Name a primary colour.", "Red"),
  ("How many legs has a spider?", "Eight"),
  ("Translate 'cat' to French.", "Chat"),
  ("What is two plus two?", "Four"),
  ("Opposite of hot?", "Cold"),
]


def _rows(fmt: str, n: int) -> list[dict]:
  out = []
  for i in range(n):
    (q, a), (q2, a2) = QA[i % len(QA)], QA[(i + 1) % len(QA)]
    if fmt == "messages":  # multi-turn: both answers are learned
      turns = [("user", q), ("assistant", a), ("user", q2), ("assistant", a2)]
      out.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    elif fmt == "alpaca":
      out.append({"instruction": q, "input": f"row {i}", "output": a})
    elif fmt == "prompt_completion":
      out.append({"prompt": q, "completion": a})
    elif fmt == "conversational":
      out.append(
        {
          "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
          "completion": [{"role": "assistant", "content": a}],
        }
      )
    elif fmt == "text":
      out.append({"text": f"{q} {a}. {q2} {a2}."})
  return out


def _expected_label_tokens(tokenizer, fmt: str, rows: list[dict]) -> int:
  """Labels counted by hand: each answer plus the template's end-of-turn token (ChatML), or
  every token of a text row plus eos, less the first (nothing predicts it)."""
  if fmt == "text":
    return sum(len(tokenizer.encode(r["text"])) for r in rows)
  if fmt == "messages":
    answers = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
  elif fmt == "alpaca":
    answers = [r["output"] for r in rows]
  elif fmt == "conversational":
    answers = [r["completion"][0]["content"] for r in rows]
  else:
    answers = [r["completion"] for r in rows]
  return sum(len(tokenizer.encode(a + "<|im_end|>", add_special_tokens=False)) for a in answers)


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.mark.parametrize(
  "fmt", ["messages", "alpaca", "prompt_completion", "conversational", "text", "parquet_dir"]
)
def test_plain_text_answers_in_every_format(files, tmp_path, fmt):
  import datasets

  from jlora.models.loading import load_tokenizer

  kind = "prompt_completion" if fmt == "parquet_dir" else fmt
  train_rows, eval_rows = _rows(kind, 12), _rows(kind, 3)
  if fmt == "parquet_dir":
    train = tmp_path / "train"
    train.mkdir()
    for part in range(2):
      datasets.Dataset.from_list(train_rows[part::2]).to_parquet(str(train / f"{part}.parquet"))
  else:
    train = _write(tmp_path / "train.jsonl", train_rows)
  evals = _write(tmp_path / "eval.jsonl", eval_rows)
  config = tiny.sft_config(
    files["model"], train, evals, tmp_path / "out", steps=1, eval_every=1, save_every=1
  )
  config.eval.metrics = ""  # a generic run: loss and perplexity only
  config.eval_examples, config.samples, config.max_new_tokens = 1, 1, 2
  summary = sft.run(config, progress=False)
  tokenizer = load_tokenizer(files["model"])
  assert summary["data"]["label_tokens"] == _expected_label_tokens(tokenizer, kind, train_rows)
  assert summary["data"]["skipped_empty_completion"] == 0
  for stage in ("before", "after"):
    assert set(summary[stage]) == {"eval_loss", "perplexity"}
    assert summary[stage]["perplexity"] == pytest.approx(np.exp(summary[stage]["eval_loss"]))
  assert len(summary["samples"]) == 1 and all(
    {"before", "after"} <= set(s) for s in summary["samples"]
  )


def test_metrics_on_plain_text_answers_warn_and_count_misses(files, tmp_path, capsys):
  evals = _write(tmp_path / "eval.jsonl", _rows("prompt_completion", 3))
  config = tiny.sft_config(
    files["model"], files["train"], evals, tmp_path / "out", steps=1, eval_every=1, save_every=1
  )
  config.eval_examples, config.samples, config.max_new_tokens = 2, 1, 2
  summary = sft.run(config, progress=False)  # the bundled config asks for both metrics
  assert summary["after"]["json_fields"] == 0.0 and "exact_match" in summary["after"]
  err = capsys.readouterr().err
  assert err.count("json_fields can't score eval row 0") == 1


# --------------------------------------------------------------------------- never lose a user's work


def test_output_dir_of_another_run_is_refused(files, finished, tmp_path):
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "adapter_config.json").write_text("{}")
  with pytest.raises(
    UserError,
    match=r"holds outputs of another run \(adapter_config.json\).*"
    r"another config.output_dir.*--config.overwrite=True",
  ):
    sft.run(tiny.sft_config(files["model"], files["train"], files["eval"], foreign), progress=False)
  assert (foreign / "adapter_config.json").read_text() == "{}"
  # The finished run's dir, with other settings: each differing field is named, nothing is read.
  config = tiny.sft_config(files["model"], files["train"], files["eval"], finished[0])
  config.lora.rank, config.optim.lr = 8, 0.002
  with pytest.raises(UserError, match=r"config.lora.rank: 4 -> 8; config.optim.lr: 0.01 -> 0.002"):
    sft.run(config, progress=False)


def test_files_get_the_users_umask(finished):
  out, _ = finished
  mask = os.umask(0o022)
  os.umask(mask)
  for name in (
    "adapter_model.safetensors",
    "adapter_config.json",
    "summary.json",
    "metrics.jsonl",
    "before.json",
    "run.json",
    "loss.png",
  ):
    assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_before_and_summary_belong_to_one_run(files, finished, tmp_path):
  from train import outputs

  out, summary = finished
  before = json.loads((out / "before.json").read_text())
  assert (
    before["run_id"] == summary["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
  )
  # Same settings but no checkpoints (deleted): a new run, so the old before.json is not reused.
  copy = tmp_path / "copy"
  shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
  config = tiny.sft_config(files["model"], files["train"], files["eval"], copy, export_merged=True)
  record, resumed = outputs.claim(copy, config)
  assert not resumed and record.run_id != summary["run_id"]
  trainer = types.SimpleNamespace(
    out=copy, record=record, evaluator=_CountingEvaluator(), trainable=None, frozen=None
  )
  fresh = sft.evaluate_before(trainer, resumed)
  assert trainer.evaluator.calls == 1 and fresh["run_id"] == record.run_id


class _CountingEvaluator:
  calls = 0

  def evaluate(self, trainable, frozen):
    self.calls += 1
    return {"eval_loss": 1.0, "samples": []}


def test_unreadable_checkpoint_falls_back_to_an_older_one(tmp_path, capsys):
  from train.checkpoint import Checkpointer

  state = {"w": jnp.arange(6.0)}
  checkpoints = Checkpointer(tmp_path / "checkpoints")
  for step in (1, 2):
    checkpoints.save(step, {"w": state["w"] * step}, {"step": step})
  for f in (tmp_path / "checkpoints" / "2").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "meta" not in f.parts:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  restored, meta = checkpoints.restore_newest(state, lambda meta: None)
  assert meta["step"] == 1
  np.testing.assert_array_equal(restored["w"], np.arange(6.0))
  assert f"checkpoint {tmp_path / 'checkpoints' / '2'} can't be read" in capsys.readouterr().err
  # A refusal by check_meta comes before any array is read, and is not a fallback.
  with pytest.raises(UserError, match="other run"):
    checkpoints.restore_newest(state, lambda meta: (_ for _ in ()).throw(UserError("other run")))
  for f in (tmp_path / "checkpoints" / "1").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  assert checkpoints.restore_newest(state, lambda meta: None) is None  # every one set aside
  assert sorted(p.name.split("-")[1] for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_sigterm_saves_then_resume_finishes_with_rank_pattern_from_the_cli(files, tmp_path, capsys):
  """SIGTERM in a real process mid-run: exit 143, one line, a checkpoint; the rerun (in this
  process, as the command line gives it) resumes from it and keeps the CLI's rank_pattern."""
  out = tmp_path / "out"
  argv = tiny.cli_args(files["model"], files["train"], files["eval"], out, steps=40, save_every=100)
  argv += ["--config.lora.targets=q_proj,o_proj", "--config.lora.rank_pattern={'o_proj': 2}"]
  args = [sys.executable, "-m", "train.sft", *argv]
  proc = subprocess.Popen(
    args, env=_env(), cwd=tiny.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 300
  while (
    not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().split()) < 3
  ):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "no training step in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  match = re.search(
    r"interrupted by SIGTERM: saved checkpoint (\d+) in .*Rerun the same command", err
  )
  assert match and "Traceback" not in err, err[-3000:]
  assert (out / "checkpoints" / match.group(1)).is_dir()

  capsys.readouterr()
  sft.main(["train.sft", *argv])
  assert f"resuming from step {match.group(1)}" in capsys.readouterr().out
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["rank_pattern"] == {"o_proj": 2}
  tensors = load_file(out / "adapter_model.safetensors")
  ranks = {k.split(".")[-3]: v.shape[0] for k, v in tensors.items() if "lora_A" in k}
  assert ranks == {"q_proj": 4, "o_proj": 2}


# --------------------------------------------------------------------------- one error path

# Run as a user runs them, each in a fresh interpreter: the cases that need a file or the hub.
# The config-only cases run in process in tests/test_bad_inputs.py.
BAD_CLI = [
  (["--config.optim.lr=1e12"], ["config.optim.lr", "1000000000000.0"]),
  (["--config.data.train={bad_jsonl}"], ["config.data.train", "bad.jsonl", "line 2"]),
  (["--config.data.train=no-such-user-xyz/no-such-set:test"], ["config.data.train", "no-such-set"]),
  (["--config.model.path={broken_model}"], ["config.model.path", "broken"]),
]


def test_bad_cli_inputs_exit_2_with_one_line(files, tmp_path):
  (tmp_path / "file").write_text("")
  bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}])
  bad.write_text(bad.read_text() + '{"prompt": "c", \n')
  broken = tmp_path / "broken"
  shutil.copytree(files["model"], broken)
  (broken / "model.safetensors").write_bytes(b"\0" * 10)
  values = {"file": tmp_path / "file", "bad_jsonl": bad, "broken_model": broken}
  env = _env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  base = [sys.executable, "-m", "train.sft"]
  base += tiny.cli_args(files["model"], files["train"], files["eval"], tmp_path / "out")
  pending = list(BAD_CLI)
  while pending:  # a few at a time: each is a fresh interpreter
    batch, pending = pending[:4], pending[4:]
    procs = [
      (
        subprocess.Popen(
          base + [a.format(**values) for a in extra],
          env=env,
          cwd=tiny.REPO,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
        ),
        extra,
        expect,
      )
      for extra, expect in batch
    ]
    for proc, extra, expect in procs:
      _, err = proc.communicate(timeout=300)
      lines = [line for line in err.splitlines() if line.strip()]
      assert proc.returncode == 2, (extra, err[-2000:])
      assert len(lines) == 1 and lines[0].startswith("error: "), (extra, err[-2000:])
      for text in expect:
        assert text.format(**values) in lines[0], (extra, lines[0])


def test_an_nnx_model_trains_through_the_same_stages(files, finished, tmp_path):
  """config.model.nnx: the NNX Llama of examples/nnx_llama.py, read from the linen run's
  checkpoint, goes through the same data, step, eval, generation and outputs: before training
  (B = 0) its eval loss and greedy samples are the linen model's, it learns, and its merged
  export reloads as a linen model whose logits are the NNX LoRA model's."""
  from flax import nnx

  sys.path.insert(0, str(tiny.REPO / "examples"))
  import nnx_llama

  out = tmp_path / "nnx"
  overrides = {"model.nnx": "examples.nnx_llama:from_pretrained", "export_merged": True}
  overrides.update(steps=2, eval_every=2, save_every=2, eval_examples=2)  # samples: the first 2
  config = tiny.sft_config(files["model"], files["train"], files["eval"], out, **overrides)
  summary = sft.run(config, progress=False)
  _, linen = finished
  assert summary["before"]["eval_loss"] == pytest.approx(linen["before"]["eval_loss"], rel=1e-4)
  assert [s["before"] for s in summary["samples"]] == [s["before"] for s in linen["samples"]]
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]

  graphdef, state = nnx.split(nnx_llama.from_pretrained(files["model"]))
  tuned = jlora.load_adapter(out, state)
  ids = np.arange(12, dtype=np.int32)[None] % 50 + 3
  model, merged, _ = jlora.models.from_pretrained(out / "merged")
  np.testing.assert_allclose(
    model.apply({"params": merged}, ids), jlora.wrap(graphdef)(tuned, ids), atol=1e-4
  )

"""The one error path, table-driven: each bad input to `train.sft`, `train.generate` and
`train.launch`, its exit status, and the one `error:` line it must print (the flag or field as
typed, the value, and what is valid). Run in process (each command line parses into fresh flag
values), so most cases cost milliseconds: they fail in the config checks before a model loads."""

from __future__ import annotations

import errno
import json
import signal

import pytest

from jlora.models.gemma import GLOBAL, LOCAL, GemmaConfig
from tests import tiny
from train import generate, launch, sft
from train.errors import Stopped, exit_on_user_error, writing


@pytest.fixture(scope="module")
def bad_input_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad-inputs")
  out = tiny.sft_files(root)
  gemma = GemmaConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=4,
    query_pre_attn_scalar=16.0,
  )
  out["gemma"] = tiny.make_checkpoint(root / "gemma", config=gemma)
  (root / "a-file").write_text("")
  return out


def one_line(capsys, main, argv) -> tuple[int, str]:
  """(exit status, the one stderr line) of `main(argv)` run in this process."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as stop:
    main(argv)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err[-3000:]
  return stop.value.code, lines[0]


def sft_argv(files, tmp_path, *extra: str) -> list[str]:
  args = tiny.cli_args(files["model"], files["train"], files["eval"], tmp_path / "out")
  return ["train.sft", *args, *(a.format(**files) for a in extra)]


# (extra flags, expected fragments of the line). Every case fails before step 1.
SFT_CONFIG = [
  (["--config.optim.learning_rate=1e-3"], ["config.optim has no field", "valid fields: lr,"]),
  (["--config.lora.rnk=8"], ["--config.lora.rnk=8", "valid fields: rank,"]),
  (["--config.model.rope_thta=1e4"], ["valid fields: rope_theta,"]),
  (["--config.data.batchsize=2"], ["config.data has no field", "valid fields: batch_size"]),
  (["--config.stepz=3"], ["'stepz'", "steps"]),
  (["--config.lora.rank=abc"], ["--config.lora.rank=abc", "'abc'"]),
  (["--config.lora.rank=0"], ["config.lora.rank", "0"]),
  (["--config.lora.dropout=1.5"], ["config.lora.dropout", "1.5"]),
  (["--config.lora.targets=no_such_layer"], ["config.lora.targets", "no_such_layer"]),
  # An MoE expert target on a dense model: the line lists the weights there are.
  (["--config.lora.targets=experts.gate_up_proj"], ["experts.gate_up_proj", "mlp/up_proj"]),
  (["--config.optim.lr=0"], ["config.optim.lr", "expected a number in (0, 1)"]),
  (["--config.optim.weight_decay=-1"], ["config.optim.weight_decay", "-1"]),
  (["--config.optim.warmup_steps=-2"], ["config.optim.warmup_steps", "-2"]),
  (["--config.steps=0"], ["config.steps", "positive integer"]),
  (["--config.data.batch_size=3", "--config.data.grad_accum=2"], ["config.data.batch_size: 3"]),
  (["--config.data.max_length=1"], ["config.data.max_length", "1"]),
  (["--config.quant.kind=fp3"], ["config.quant.kind", "'fp3'", "'nf4'"]),
  (["--config.mesh.data=3"], ["config.mesh.data=3", "only 1 exist"]),
  (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], ["at most one axis"]),
  (["--config.eval.metrics=bleu"], ["config.eval.metrics", "bleu"]),
  (["--config.export_gguf=q3_k"], ["config.export_gguf", "q3_k"]),
  (["--config.tokens.chat_template=/no/such.jinja"], ["config.tokens.chat_template", "no file"]),
  # Rendered with the tokenizer's own special tokens, once it is loaded (braces doubled: format).
  (["--config.tokens.chat_template={{% for %}}"], ["'{% for %}' fails to render a sample"]),
  (["--config.tokens.chat_template={{{{ 'hi' }}}}"], ["without its messages' contents"]),
  (["--config.model.dtype=float3"], ["config.model.dtype", "float3"]),
  (["--config.model.remat_policy=bogus"], ["remat_policy", "bogus"]),
  (["--config.model.attention=flash"], ["config.model.attention", "flash"]),
  (["--config.model.attention_block_q=0"], ["config.model.attention_block_q", "0"]),
  (["--config.model.layer_types=('full_attention',)"], ["layer_types", "LlamaConfig", "gemma"]),
  (["--config.model.path=/no/such/model"], ["config.model.path", "/no/such/model"]),
  (["--config.output_dir={root}/a-file"], ["config.output_dir", "is a file"]),
  (["--config.output_dir=/proc/jlora-run"], ["config.output_dir", "/proc/jlora-run"]),
  (["--config.data.train={root}/missing.jsonl"], ["config.data.train", "missing.jsonl"]),
  (["--config.data.train={root}/a-file"], ["config.data.train", "extension"]),
  (["--config=no/such/config.py"], ["--config=no/such/config.py"]),
  (["stray"], ["unexpected arguments", "stray"]),
]


@pytest.mark.parametrize("extra,expected", SFT_CONFIG, ids=lambda v: str(v)[:60])
def test_sft_bad_config_is_one_line(bad_input_files, tmp_path, capsys, extra, expected):
  files = bad_input_files
  status, line = one_line(capsys, sft.main, sft_argv(files, tmp_path, *extra))
  assert status == 2 and line.startswith("error: "), line
  for text in expected:
    assert text in line, (text, line)


def test_every_model_config_field_is_settable_and_checked_by_its_family(
  bad_input_files, tmp_path, capsys
):
  files = bad_input_files
  """Gemma's layer_types is taken on a Gemma checkpoint (and checked against its 2 layers);
  rope_theta and attention_block_q on a Llama; the values reach the model config."""
  config = sft.parse_flags(
    sft_argv(files, tmp_path, "--config.model.rope_theta=5e5", "--config.model.attention_block_q=8")
  )
  from train import config as config_lib

  hf = json.loads((files["model"] / "config.json").read_text())
  assert config_lib.model_overrides(config, hf) == {
    "rope_theta": 5e5,
    "attention_block_q": 8,
    **{k: v for k, v in config_lib.model_overrides(config).items() if k not in ("rope_theta",)},
  }
  gemma_hf = json.loads((files["gemma"] / "config.json").read_text())
  config = sft.parse_flags(
    sft_argv(files, tmp_path, f"--config.model.layer_types=('{GLOBAL}', '{LOCAL}')")
  )
  from jlora.models import registry

  overrides = config_lib.model_overrides(config, gemma_hf)
  assert registry.config_from_hf(gemma_hf, **overrides).layer_types == (GLOBAL, LOCAL)
  config.model.layer_types = (GLOBAL,)
  with pytest.raises(Exception, match=r"config.model: layer_types: \['full_attention'\] is not"):
    config_lib.model_overrides(config, gemma_hf)


GENERATE = [
  (["--prompt", "hi", "--max_new_tokens", "0"], ["--max_new_tokens", "0"]),
  (["--prompt", "hi", "--temperature", "-1"], ["--temperature", "-1"]),
  (["--prompt", "hi", "--top_p", "0"], ["--top_p", "0"]),
  (["--prompt", "hi", "--top_p", "x"], ["--top_p", "'x'"]),
  (["--max_new_tokens", "3"], ["--prompt"]),
  (["--prompt", "hi", "--model", "/no/such/model"], ["--model '/no/such/model'", "does not exist"]),
  (["--prompt", "hi", "--model", "{root}/a-file"], ["--model", "a-file"]),
  (["--prompt", "hi", "--adapter", "/no/such/adapter"], ["--adapter", "/no/such/adapter"]),
  (["--prompt", "hi", "--adapter", "{root}/model"], ["--adapter", "model", "adapter_config"]),
  (["--prompt", "hi", "--merged"], ["--merged", "--adapter"]),
  (["--prompt", "hi", "--adapter", "a=x", "--adapter", "a=y"], ["--adapter", "given twice"]),
  (["--prompt", "hi", "--adapter", "base=x", "--adapter", "b=y"], ["'base'", "reserved"]),
  (["--prompt", "hi", "--use", "a"], ["--use", "NAME=DIR"]),
]


@pytest.mark.parametrize("argv,expected", GENERATE, ids=lambda v: str(v)[:60])
def test_generate_bad_input_is_one_line(bad_input_files, capsys, argv, expected):
  files = bad_input_files
  argv = [a.format(**files) for a in argv]
  if "--model" not in argv:
    argv += ["--model", str(files["model"])]
  status, line = one_line(capsys, generate.main, argv)
  assert status == 2 and line.startswith("error: "), line
  for text in expected:
    assert text in line, (text, line)


LAUNCH = [
  (["--processes", "0"], ["--processes=0", ">= 1"]),
  (["--processes", "two"], ["--processes", "'two'"]),
  (["--processes", "2", "--devices-per-process", "0"], ["--devices-per-process=0"]),
  (["--processes", "2", "--timeout", "0"], ["--timeout=0.0"]),
  (["--processes", "2", "--grace", "-1"], ["--grace=-1.0"]),
  (["--processes", "2", "--module", "no_such_module.x"], ["--module='no_such_module.x'"]),
  (["--processes", "2", "--module", "train.nosuch"], ["--module='train.nosuch'"]),
  (["--devices-per-process", "2"], ["--processes"]),
  (["--processes", "2", "--bogus"], ["unrecognized arguments", "--bogus"]),
]


@pytest.mark.parametrize("argv,expected", LAUNCH, ids=lambda v: str(v)[:60])
def test_launch_bad_input_is_one_line_without_usage(capsys, argv, expected):
  status, line = one_line(capsys, launch.main, argv)
  assert status == 2 and line.startswith("error: "), line
  for text in expected:
    assert text in line, (text, line)


# --------------------------------------------------------------------------- the exit path itself


def _missing_file():
  try:
    open("/no/such/dir/file")
  except OSError as e:
    return e


@pytest.mark.parametrize(
  "error,status,expected",
  [
    (KeyboardInterrupt(), 130, "interrupted (SIGINT)"),
    (Stopped(signal.SIGTERM, "while saving"), 143, "stopped by SIGTERM while saving"),
    (Stopped(signal.SIGINT), 130, "stopped by SIGINT; rerun the same command"),
    (_missing_file(), 2, "/no/such/dir/file: No such file or directory"),
    (
      OSError(errno.ENOSPC, "No space left on device", "/x/y"),
      2,
      "disk full: could not write /x/y",
    ),
    (OSError(errno.EROFS, "Read-only file system", "/x/z"), 2, "/x/z: Read-only file system"),
  ],
  ids=lambda v: type(v).__name__,
)
def test_signals_and_environment_errors_are_one_line(capsys, error, status, expected):
  def main(_):
    with exit_on_user_error():
      raise error

  got, line = one_line(capsys, main, [])
  assert got == status and line.startswith("error: ") and expected in line, line


def test_disk_full_inside_a_library_error_names_the_path_and_the_size(tmp_path):
  class LibraryError(Exception):
    pass

  with pytest.raises(Exception, match=r"disk full: could not write .*adapter.* 1\.0 MiB"):
    with writing(tmp_path / "adapter", needed_bytes=2**20):
      try:
        raise OSError(errno.ENOSPC, "No space left on device")
      except OSError as e:
        raise LibraryError("IoError(Os { code: 28, kind: StorageFull })") from e


def test_a_second_signal_during_a_save_is_one_line_with_the_signals_status(capsys):
  """The first Ctrl-C asks the loop to stop after the step; a second one (say, during the
  checkpoint save) stops at once: one line and 130, not a KeyboardInterrupt traceback."""

  def main(_):
    with exit_on_user_error(), sft.SignalFlag() as flag:
      flag._handle(signal.SIGINT, None)
      assert flag.signum == signal.SIGINT
      flag._handle(signal.SIGINT, None)  # what the handler does on the second signal

  status, line = one_line(capsys, main, [])
  assert status == 130 and "stopped by SIGINT a second time" in line, line

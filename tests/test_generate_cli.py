"""`python -m train.generate` with bad input: one `error:` line naming the flag or file and the
value, exit status 2, no traceback; `--verbose` shows the traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import jax
import pytest

import jlora
from jlora.models import LlamaConfig, from_pretrained
from tests.tiny import REPO, TINY_VOCAB_SIZE, random_hf_state, save_gguf, save_numpy_checkpoint
from train.errors import UserError
from train.generate import main

CONFIG = LlamaConfig(
  vocab_size=TINY_VOCAB_SIZE,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  num_key_value_heads=1,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  state = random_hf_state(CONFIG)
  model_dir = save_numpy_checkpoint(root / "model", CONFIG, state)
  gguf = save_gguf(root / "tiny.gguf", CONFIG, state).read_bytes()
  (root / "empty.gguf").write_bytes(b"")
  (root / "truncated.gguf").write_bytes(gguf[: len(gguf) // 2])
  _, params, _ = from_pretrained(model_dir)
  cfg = jlora.LoraConfig(rank=8, targets=["q_proj", "v_proj"])
  adapter = root / "adapter"
  jlora.save_adapter(adapter, jlora.apply(params, cfg, jax.random.key(0)), cfg)
  bad_json = shutil.copytree(adapter, root / "bad_json")
  (bad_json / "adapter_config.json").write_text('{"r": 4,\n "lora_alpha": }')
  truncated = shutil.copytree(adapter, root / "truncated_weights")
  weights = truncated / "adapter_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-100])
  no_config = shutil.copytree(adapter, root / "no_config")
  (no_config / "adapter_config.json").unlink()
  (root / "a_file").write_text("x")
  return root


# (extra argv, substrings the one error line must hold: the flag or file, and the value)
BAD_INPUTS = {
  "negative temperature": (["--temperature", "-1"], ["--temperature", "-1.0", ">= 0"]),
  "nan temperature": (["--temperature", "nan"], ["--temperature", "nan"]),
  "temperature not a number": (["--temperature", "hot"], ["--temperature", "'hot'"]),
  "top_p zero": (["--top_p", "0"], ["--top_p", "0.0", "(0, 1]"]),
  "top_p above one": (["--top_p", "1.5"], ["--top_p", "1.5"]),
  "max_new_tokens zero": (["--max_new_tokens", "0"], ["--max_new_tokens", "0", ">= 1"]),
  "max_new_tokens negative": (["--max_new_tokens", "-1"], ["--max_new_tokens", "-1"]),
  "max_new_tokens past the context": (
    ["--max_new_tokens", "100000"],
    ["--max_new_tokens", "100000", "context length"],
  ),
  "merged without adapter": (["--merged"], ["--merged", "--adapter"]),
  "missing model": (["--model", "{root}/nope"], ["{root}/nope", "does not exist"]),
  "empty gguf": (["--model", "{root}/empty.gguf"], ["empty.gguf", "0 bytes", "truncated"]),
  "truncated gguf": (["--model", "{root}/truncated.gguf"], ["truncated.gguf", "truncated"]),
  "missing adapter": (["--adapter", "{root}/nope"], ["--adapter", "{root}/nope", "does not exist"]),
  "adapter is a file": (["--adapter", "{root}/a_file"], ["--adapter", "a_file", "not a directory"]),
  "adapter without config": (
    ["--adapter", "{root}/no_config"],
    ["no_config", "adapter_config.json"],
  ),
  "malformed adapter_config.json": (
    ["--adapter", "{root}/bad_json"],
    ["bad_json/adapter_config.json", "line 2, column 16"],
  ),
  "truncated adapter weights": (
    ["--adapter", "{root}/truncated_weights"],
    ["truncated_weights/adapter_model.safetensors", "truncated"],
  ),
  "several adapters, one unnamed": (
    ["--adapter", "a={root}/adapter", "--adapter", "{root}/adapter"],
    ["--adapter", "{root}/adapter", "NAME=DIR"],
  ),
  "adapter named base": (["--adapter", "base={root}/adapter"], ["--adapter", "'base'", "reserved"]),
  "named adapter missing": (
    ["--adapter", "a={root}/adapter", "--adapter", "b={root}/nope"],
    ["--adapter", "{root}/nope", "does not exist"],
  ),
  "use without named adapters": (["--use", "a,base"], ["--use", "'a,base'", "NAME=DIR"]),
  "use of an unknown name": (
    ["--adapter", "a={root}/adapter", "--use", "a,zz"],
    ["--use", "'a,zz'", "['a'] or 'base'"],
  ),
  "merged with named adapters": (
    ["--adapter", "a={root}/adapter", "--merged"],
    ["--merged", "single --adapter DIR"],
  ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, files, capsys):
  extra, expected = BAD_INPUTS[case]
  argv = ["--model", str(files / "model"), "--prompt", "the", "--max_new_tokens", "2"]
  argv += [a.format(root=files) for a in extra]
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  for part in expected:
    assert part.format(root=files) in err[0], err[0]


def test_cli_process_prints_one_line_and_verbose_shows_traceback(files):
  argv = [sys.executable, "-m", "train.generate", "--prompt", "hi"]
  argv += ["--model", str(files / "truncated.gguf")]
  quiet = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert quiet.returncode == 2
  lines = quiet.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "truncated.gguf" in lines[-1]
  assert "Traceback" not in quiet.stderr
  with pytest.raises(UserError, match="truncated.gguf"):  # --verbose: the exception, not exit 2
    main([*argv[3:], "--verbose"])


def test_good_adapter_generates_and_an_nnx_model_decodes_the_same_tokens(files, capsys):
  """A good adapter generates; with --nnx, examples/nnx_llama.py (which mirrors transformers'
  Llama) read from the same checkpoint decodes, greedily and with the adapter, what jlora's
  linen Llama decodes."""
  argv = ["--model", str(files / "model"), "--adapter", str(files / "adapter")]
  argv += ["--prompt", "the", "--prompt", "a longer prompt", "--max_new_tokens", "5"]
  main(argv)
  linen = capsys.readouterr().out
  main([*argv, "--nnx", "examples.nnx_llama:from_pretrained"])
  assert capsys.readouterr().out == linen and len(linen.strip()) > 10
  with pytest.raises(SystemExit) as stopped:  # a bad factory is the flag's one error line
    main([*argv, "--nnx", "examples.nnx_llama:no_such_factory"])
  assert stopped.value.code == 2 and "--nnx 'examples.nnx_llama:no_such_factory'" in (
    capsys.readouterr().err
  )

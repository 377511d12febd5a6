"""The tokenizer rebuilt from a GGUF's own fields, with no torch.

References: the `tokenizers` tokenizer a tiny GGUF was exported from (no torch needed), and, in the
`ref` tests, transformers' own GGUF tokenizer converter (whose reader imports torch).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jlora.errors import UserError
from jlora.models.gguf_tokenizer import gguf_tokenizer
from tests.gguf_reference import llama_cpp_tool
from tests.tiny import REPO

CHATML = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
  {"role": "system", "content": "You answer in JSON."},
  {"role": "user", "content": "Lena, 29, Porto 🇵🇹?"},
  {"role": "assistant", "content": '{"name": "Lena", "age": 29}'},
  {"role": "user", "content": "And  the\tyear?\n\n2018"},
]
# Llama 3's split regex, as its tokenizer.json writes it.
LLAMA3_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"


def varied_strings(n: int = 300, seed: int = 0) -> list[str]:
  """Text the tokenizers were not designed around: unicode, emoji, code, whitespace runs, digits,
  special tokens inline, and random mixtures of them."""
  pieces = [
    "Hello world",
    " leading space",
    "trailing space ",
    "a  b   c    d",
    "\t\ttabs\tand\nnew\n\nlines\r\n",
    "héllo wörld ñ ß ø",
    "日本語のテキスト",
    "Привет, мир",
    "مرحبا بالعالم",
    "😀👍🏽🇵🇹 👩‍👩‍👧",
    "def f(x):\n    return x ** 2  # square",
    "for (int i = 0; i < 10; ++i) { a[i] = i; }",
    '{"name": "Beatriz Varga", "age": 46, "year": 2010}',
    "1234567890 3.14159 -42 1e-9 ½ ² ٣",
    "don't I'll we've THEY'RE",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more",
    f"{USER_DEFINED}thinking{USER_DEFINED}",
    "",
    " ",
    "   \n   ",
    "A" * 50,
    "x\u00a0y\u200bz",
  ]
  rng = random.Random(seed)
  out = list(pieces)
  while len(out) < n:
    out.append("".join(rng.choice(pieces) for _ in range(rng.randint(2, 4))))
  return out


# --------------------------------------------------------------------------- tiny GGUFs


def _byte_level_source(pre: str):
  """A byte-level BPE trained here, with the pre-tokenizer that `tokenizer.ggml.pre` names."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  if pre == "llama-bpe":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  else:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=600,
    special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(_training_text(), trainer)
  tok.add_tokens([USER_DEFINED])
  return tok


def _sentencepiece_source():
  """A SentencePiece-style BPE (byte fallback, '▁' word prefix) trained here."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
  tok.decoder = decoders.Sequence(
    [
      decoders.Replace("▁", " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(content=" ", left=1),
    ]
  )
  byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
  trainer = trainers.BpeTrainer(
    vocab_size=700,
    special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
    show_progress=False,
  )
  tok.train_from_iterator(_training_text(), trainer)
  return tok


def _training_text() -> list[str]:
  lines = (REPO / "data" / "extract_train.jsonl").read_text().splitlines()[:300]
  return lines + varied_strings(40, seed=1)


def write_gguf(path: Path, source, *, model: str, pre: str = "default", scores: bool = False):
  """A `tokenizers` BPE tokenizer exported as GGUF tokenizer fields, as llama.cpp's converter does."""
  import gguf

  vocab = source.get_vocab(with_added_tokens=True)
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  model_json = json.loads(source.to_str())["model"]
  merges = [" ".join(m) if isinstance(m, list) else m for m in model_json["merges"]]
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model(model)
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  if model == "gpt2":
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    bos, eos, pad = (tokens.index(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    writer.add_add_bos_token(False)
  else:
    types = [
      6 if t.startswith("<0x") else 2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 1
      for t in tokens
    ]
    bos, eos, pad = 1, 2, 0
    writer.add_unk_token_id(0)
  writer.add_token_types(types)
  if scores:  # SentencePiece files carry scores (here: -merge rank) instead of merges
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
  else:
    writer.add_token_merges(merges)
  writer.add_bos_token_id(bos)
  writer.add_eos_token_id(eos)
  writer.add_pad_token_id(pad)
  writer.add_chat_template(CHATML)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  byte_level = {pre: _byte_level_source(pre) for pre in ("default", "llama-bpe")}
  spm = _sentencepiece_source()
  files = {
    f"gpt2-{pre}": (write_gguf(root / f"gpt2-{pre}.gguf", src, model="gpt2", pre=pre), src)
    for pre, src in byte_level.items()
  }
  files["llama-merges"] = (write_gguf(root / "spm.gguf", spm, model="llama"), spm)
  files["llama-scores"] = (
    write_gguf(root / "spm-scores.gguf", spm, model="llama", scores=True),
    spm,
  )
  return files


@pytest.mark.parametrize("name", ["gpt2-default", "gpt2-llama-bpe", "llama-merges"])
def test_tiny_gguf_tokenizer_matches_its_source(tiny_ggufs, name):
  path, source = tiny_ggufs[name]
  ours = gguf_tokenizer(path)
  strings = varied_strings()
  spm = name.startswith("llama")
  for text in strings:
    expected = source.encode(text, add_special_tokens=False).ids
    if spm:  # llama.cpp adds BOS to a SentencePiece vocabulary by default
      expected = [1, *expected]
    assert ours(text)["input_ids"] == expected, text
  assert (
    ours.decode(ours("héllo 😀 wörld")["input_ids"], skip_special_tokens=True) == "héllo 😀 wörld"
  )
  if spm:
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
    return
  vocab = source.get_vocab(with_added_tokens=True)
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
    vocab["<|im_start|>"],
    vocab["<|im_end|>"],
    vocab["<|endoftext|>"],
  )
  # Control tokens are special (skipped on decode); the user-defined one stays whole but is text.
  ids = ours(f"<|im_start|>a{USER_DEFINED}b<|im_end|>")["input_ids"]
  assert vocab[USER_DEFINED] in ids and ids[0] == vocab["<|im_start|>"]
  assert ours.decode(ids, skip_special_tokens=True) == f"a{USER_DEFINED}b"
  rendered = ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
  expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
  assert rendered == expected + "<|im_start|>assistant\n"


def test_unsupported_tokenizer_model_is_named(tmp_path):
  import gguf

  writer = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "llama")
  writer.add_tokenizer_model("t5")
  writer.add_token_list(["<pad>", "a"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(
    UserError, match=r"tokenizer.ggml.model='t5' is not supported.*'gpt2', 'llama'"
  ):
    gguf_tokenizer(tmp_path / "t5.gguf")


# --------------------------------------------------------------------------- no torch


NO_TORCH = textwrap.dedent(
  """
  import json, sys
  sys.modules["torch"] = None  # importing torch now fails, as on a clean install
  from jlora.models import from_pretrained
  model, params, tok = from_pretrained(sys.argv[1], cache_dir=sys.argv[2])
  conversation = json.loads(sys.argv[3])
  print(json.dumps({
    "rendered": tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
    "ids": tok("<|im_start|>user\\nhi<|im_end|>")["input_ids"],
    "special": [tok.bos_token, tok.eos_token, tok.pad_token],
    "torch_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "peft")),
  }))
  """
)


def _convert_without_torch(model: str, tmp_path: Path) -> dict:
  env = {**os.environ, "HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run(
    [sys.executable, "-c", NO_TORCH, model, str(tmp_path / "cache"), json.dumps(CONVERSATION)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["torch_modules"] == ["torch"]  # only our None placeholder: nothing imported torch
  assert list((tmp_path / "cache").iterdir()), "the GGUF was not converted into the fresh cache"
  return result


def test_tiny_gguf_converts_and_loads_without_torch(tmp_path):
  from jlora.models import LlamaConfig
  from tests.tiny import TINY_VOCAB_SIZE, random_hf_state, save_gguf

  config = LlamaConfig(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
  )
  gguf_path = save_gguf(tmp_path / "tiny.gguf", config, random_hf_state(config))
  result = _convert_without_torch(str(gguf_path), tmp_path)
  assert result["special"] == ["<|im_start|>", "<|im_end|>", None]
  expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
  assert result["rendered"] == expected + "<|im_start|>assistant\n"


@pytest.mark.slow
def test_embedded_smollm2_converts_and_loads_without_torch(tmp_path):
  result = _convert_without_torch("smollm2-135m-instruct", tmp_path)
  # SmolLM2's vocabulary starts with its control tokens: <|endoftext|>, <|im_start|>, <|im_end|>.
  assert result["ids"][0] == 1 and result["ids"][-1] == 2
  assert result["special"] == ["<|im_start|>", "<|im_end|>", "<|im_end|>"]
  expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
  assert result["rendered"] == expected + "<|im_start|>assistant\n"


# --------------------------------------------------------------------------- vs transformers


def _transformers_gguf_tokenizer(path: Path):
  pytest.importorskip("torch")  # transformers' GGUF reader imports it
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same_tokenizer(ours, theirs, strings):
  mismatches = [s for s in strings if ours(s)["input_ids"] != theirs(s)["input_ids"]]
  assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, e.g. {mismatches[:3]}"
  for s in strings[:60]:
    ids = ours(s)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
      ids, skip_special_tokens=True
    )
  for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
    assert getattr(ours, attr) == getattr(theirs, attr), attr
  assert ours.added_tokens_decoder == theirs.added_tokens_decoder
  assert len(ours) == len(theirs)
  if theirs.chat_template:
    render = lambda tok: tok.apply_chat_template(
      CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    assert render(ours) == render(theirs)


@pytest.mark.ref
@pytest.mark.parametrize("name", ["gpt2-default", "gpt2-llama-bpe", "llama-merges", "llama-scores"])
def test_tiny_gguf_tokenizer_matches_transformers(tiny_ggufs, name):
  path, _ = tiny_ggufs[name]
  _assert_same_tokenizer(gguf_tokenizer(path), _transformers_gguf_tokenizer(path), varied_strings())


@pytest.mark.ref
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers():
  from jlora.models.loading import embedded_gguf_path

  try:
    path = embedded_gguf_path("smollm2-135m-instruct")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  inline = [
    f"{a}<|im_start|>{b}<|im_end|><repo_name>{c}"
    for a, b, c in zip(*[iter(varied_strings(90))] * 3)
  ]
  theirs = _transformers_gguf_tokenizer(path)
  # transformers' GGUF converter ignores tokenizer.ggml.pre = "smollm" (it splits like GPT-2);
  # SmolLM2's own tokenizer.json splits numerals first, as llama.cpp does for "smollm".
  from tokenizers import pre_tokenizers

  theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  _assert_same_tokenizer(gguf_tokenizer(path), theirs, varied_strings() + inline + NUMERALS)


# Numerals of several scripts: llama.cpp's "smollm" pre-tokenizer isolates each \p{N}.
NUMERALS = [
  "²³½٣Ⅻ",
  "x² + y³ = 12345",
  "٣ أيام و 2024 يوم",
  "第12章 Ⅻ 3½",
  " 7 77 777 7777",
  "一二三 ①②③",
]
# llama.cpp's regexes for tokenizer.ggml.pre = "smollm" (src/llama-vocab.cpp), applied in order.
LLAMA_CPP_SMOLLM = (
  r"\p{N}",
  r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
)


def llama_cpp_split(text: str, patterns) -> list[str]:
  """llama.cpp's unicode_regex_split: each regex splits every piece, keeping matches and gaps."""
  import regex

  pieces = [text]
  for pattern in patterns:
    out = []
    for piece in pieces:
      start = 0
      for match in regex.finditer(pattern, piece):
        out += [piece[start : match.start()], match.group()]
        start = match.end()
      out.append(piece[start:])
    pieces = [p for p in out if p]
  return pieces


@pytest.mark.parametrize("pre", ["smollm", "starcoder"])
def test_digit_splitting_pre_tokenizers_split_as_llama_cpp(pre):
  from jlora.models.gguf_tokenizer import pre_tokenizer

  byte = dict(zip(range(256), _byte_alphabet_strings()))
  for text in NUMERALS + varied_strings(40):
    ours = [piece for piece, _ in pre_tokenizer(pre).pre_tokenize_str(text)]
    expected = [
      "".join(byte[b] for b in p.encode()) for p in llama_cpp_split(text, LLAMA_CPP_SMOLLM)
    ]
    assert ours == expected, text


def _byte_alphabet_strings() -> list[str]:
  """GPT-2's byte -> printable character table (bytes_to_unicode), written out independently."""
  keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return [out[b] for b in range(256)]


def test_unknown_pre_tokenizer_is_refused():
  from jlora.models.gguf_tokenizer import pre_tokenizer

  with pytest.raises(UserError, match=r"tokenizer.ggml.pre = 'klingon'.*supported: .*smollm"):
    pre_tokenizer("klingon")


def test_rebuilt_smollm_tokenizer_exports_its_pre_tokenizer_name():
  """export_gguf called from Python names the pre-tokenizer from the tokenizer it is given: the one
  rebuilt from SmolLM2's GGUF is named "smollm" again, not "gpt-2"."""
  from jlora.models import gguf_vocab
  from jlora.models.loading import embedded_gguf_path

  try:
    path = embedded_gguf_path("smollm2-135m-instruct")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  tok = gguf_tokenizer(path)
  assert gguf_vocab.pre_tokenizer_name(json.loads(tok.backend_tokenizer.to_str())) == "smollm"
  assert tok.tokenize("²3") == ["Â²", "3"]


def test_truncated_and_empty_gguf_are_one_line_errors(tmp_path, tiny_ggufs):
  path, _ = tiny_ggufs["gpt2-default"]
  data = path.read_bytes()
  cases = {"empty.gguf": b"", "truncated.gguf": data[: len(data) // 2], "junk.gguf": b"x" * 100}
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(
      UserError, match=rf"{name} is not a readable GGUF file.*truncated or corrupted"
    ):
      gguf_tokenizer(tmp_path / name)


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smollm2_tokenizer_matches_llama_tokenize():
  """llama.cpp's own tokenizer on the embedded SmolLM2 GGUF, on a multilingual and numeral probe.
  Needs llama-tokenize (built from llama.cpp's source; see the README); skipped without it."""
  from jlora.models.loading import embedded_gguf_path

  binary = llama_cpp_tool("llama-tokenize")
  if binary is None:
    pytest.skip("llama-tokenize not found (set LLAMA_CPP_BIN to llama.cpp's build/bin)")
  path = embedded_gguf_path("smollm2-135m-instruct")
  ours = gguf_tokenizer(path)
  probe = NUMERALS + [
    "naïve café — Ünïcödé ✓",
    "Привет, мир 2024",
    "東京は晴れ。",
    "e=mc² ≈ 3.0×10⁸",
  ]
  for text in probe:
    out = subprocess.run(
      [binary, "-m", str(path), "-p", text, "--ids", "--no-bos", "--log-disable"],
      capture_output=True,
      text=True,
      check=True,
    ).stdout
    theirs = json.loads(out.strip().splitlines()[-1])
    assert ours.encode(text, add_special_tokens=False) == theirs, text

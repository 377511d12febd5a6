"""A transformers fast tokenizer rebuilt from a GGUF file's own tokenizer fields, without torch.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary, merges or scores, token types,
special token ids and the chat template as metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
This module reads those with the `gguf` package and builds the `tokenizers` pipeline they describe,
wrapped as a `transformers.PreTrainedTokenizerFast`. transformers' own GGUF tokenizer converter
would do the same, but its GGUF reader imports torch, which a clean install of jlora does not have.
The reference tests check this builder against that converter.

Supported `tokenizer.ggml.model` values:
  * "gpt2": byte-level BPE with the file's merges (SmolLM, Llama 3, Qwen2, ...). Pre-tokenization
    follows `tokenizer.ggml.pre` as llama.cpp does (`pre_tokenizer`): GPT-2's regex, single
    numerals then GPT-2's (SmolLM, StarCoder), or Llama 3's / Qwen2's regex; an unknown name is
    refused.
  * "llama": SentencePiece-style BPE over a vocabulary with scores (Llama 2, Mistral, ...): merges
    come from the file or are derived from the scores, with byte fallback and a "▁" word prefix.
Token types 3 (control) become special tokens and 4 (user-defined) plain added tokens, so neither is
ever cut into pieces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jlora.errors import UserError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPIECE_UNDERLINE = "\u2581"

_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex its merges were learned with (llama.cpp's names).
PRE_TOKENIZER_SPLITS = {
  **dict.fromkeys(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3_SPLIT
  ),
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# Names llama.cpp splits with GPT-2's regex alone ('default', and a GGUF without the field, too).
GPT2_PRE = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion", None)
# Names llama.cpp splits first into single numerals (\p{N}: ² ½ ٣ Ⅻ too), then with GPT-2's regex.
DIGITS_PRE = (
  "smollm",
  "starcoder",
  "refact",
  "command-r",
  "codeshell",
  "exaone",
  "minerva-7b",
  "mellum",
)


def pre_tokenizer(name: str | None):
  """The `tokenizers` pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` = `name`; an unknown
  name is refused rather than guessed, since a wrong split changes every token id."""
  from tokenizers import Regex, pre_tokenizers

  if name in GPT2_PRE:
    return pre_tokenizers.ByteLevel(add_prefix_space=False)
  if name in DIGITS_PRE:  # tokenizers' Digits splits on char::is_numeric: \p{N} exactly
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
      ]
    )
  if name in PRE_TOKENIZER_SPLITS:
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[name]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  known = sorted(n for n in (*GPT2_PRE, *DIGITS_PRE, *PRE_TOKENIZER_SPLITS) if n)
  raise UserError(
    f"tokenizer.ggml.pre = {name!r}: jlora can't rebuild this llama.cpp pre-tokenizer; supported: "
    f"{', '.join(known)}. Load the model from its HF dir (with tokenizer.json) instead."
  )


def gguf_tokenizer(gguf_path: str | Path, reader=None):
  """The `PreTrainedTokenizerFast` a GGUF file describes, with its special tokens and chat template.

  `reader` is an open `gguf.GGUFReader` for the file, to avoid parsing it twice.
  """
  if reader is None:
    reader = open_gguf(gguf_path)
  fields = _tokenizer_fields(reader, gguf_path)
  model = fields.get("tokenizer.ggml.model")
  builder = TOKENIZER_BUILDERS.get(model)
  if builder is None:
    raise UserError(
      f"{gguf_path}: tokenizer.ggml.model={model!r} is not supported; "
      f"supported: {', '.join(map(repr, sorted(TOKENIZER_BUILDERS)))}."
    )
  backend = builder(fields)
  return _wrap(backend, fields)


def open_gguf(gguf_path: str | Path):
  """A `gguf.GGUFReader`, with a truncated or malformed file reported as one `UserError`."""
  from gguf import GGUFReader

  try:
    return GGUFReader(str(gguf_path))
  except Exception as e:  # the reader fails with whatever numpy hits first (reshape, unpack, ...)
    size = Path(gguf_path).stat().st_size
    raise UserError(
      f"{gguf_path} is not a readable GGUF file ({size:,} bytes; {type(e).__name__}: {e}); "
      "it may be truncated or corrupted: download or convert it again."
    ) from e


def _tokenizer_fields(reader, gguf_path) -> dict[str, Any]:
  fields = {
    key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")
  }
  if not fields.get("tokenizer.ggml.tokens"):
    raise UserError(f"{gguf_path} holds no tokenizer (no tokenizer.ggml.tokens field).")
  return fields


# --------------------------------------------------------------------------- builders


@functools.cache
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's printable spelling of each byte, as byte-level vocabularies write tokens."""
  from tokenizers import pre_tokenizers

  # ByteLevel.alphabet() is unordered; the mapping itself is GPT-2's bytes_to_unicode.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  printable += range(ord("®"), ord("ÿ") + 1)
  spelling, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      spelling[byte] = chr(byte)
    else:
      spelling[byte] = chr(256 + extra)
      extra += 1
  assert set(spelling.values()) == set(pre_tokenizers.ByteLevel.alphabet())
  return spelling


def _byte_level_bpe(fields: Mapping[str, Any]):
  from tokenizers import Tokenizer, decoders, models

  spelling = _byte_alphabet()
  alphabet = set(spelling.values())
  # A token written outside the byte alphabet (some converters store special tokens as plain text)
  # is respelled byte by byte, so the BPE model can reach it.
  vocab = {
    (token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode())): i
    for i, token in enumerate(fields["tokenizer.ggml.tokens"])
  }
  merges = [tuple(m.split(" ")) for m in fields.get("tokenizer.ggml.merges", [])]
  backend = Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=merges,
      dropout=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
    )
  )
  backend.pre_tokenizer = pre_tokenizer(fields.get("tokenizer.ggml.pre"))
  backend.decoder = decoders.ByteLevel()
  return backend


def _sentencepiece_bpe(fields: Mapping[str, Any]):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  tokens = fields["tokenizer.ggml.tokens"]
  vocab = {token: i for i, token in enumerate(tokens)}
  if "tokenizer.ggml.merges" in fields:
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
  elif "tokenizer.ggml.scores" in fields:
    merges = merges_from_scores(vocab, dict(zip(tokens, fields["tokenizer.ggml.scores"])))
  else:
    raise UserError("tokenizer.ggml.model='llama' needs tokenizer.ggml.merges or .scores.")
  unk_id = fields.get("tokenizer.ggml.unknown_token_id")
  backend = Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=merges,
      unk_token=tokens[unk_id] if unk_id is not None else None,
      fuse_unk=True,
      byte_fallback=True,
      dropout=None,
    )
  )
  backend.pre_tokenizer = pre_tokenizers.Metaspace(
    replacement=SPIECE_UNDERLINE, prepend_scheme="first", split=False
  )
  backend.decoder = decoders.Sequence(
    [
      decoders.Replace(SPIECE_UNDERLINE, " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(content=" ", left=1),
    ]
  )
  return backend


def merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple]:
  """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
  pieces, best-scored token first (ties: shorter left piece, then vocabulary order)."""
  merges = []
  for token, score in scores.items():
    pairs = [
      (token[:i], token[i:], score)
      for i in range(1, len(token))
      if token[:i] in vocab and token[i:] in vocab
    ]
    merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
  merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
  return [(left, right) for left, right, _ in merges]


TOKENIZER_BUILDERS: dict[str, Callable] = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


# --------------------------------------------------------------------------- wrapper


def _wrap(backend, fields: Mapping[str, Any]):
  from tokenizers import AddedToken
  from transformers import PreTrainedTokenizerFast

  tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type") or ()
  byte_level = fields.get("tokenizer.ggml.model") == "gpt2"
  alphabet = set(_byte_alphabet().values())
  # In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp
  # mislabel; adding it would grow the vocabulary past the model's, so it is skipped.
  control = [
    AddedToken(t, normalized=False, special=True)
    for t, kind in zip(tokens, types)
    if kind == CONTROL and (not byte_level or set(t) <= alphabet)
  ]
  vocab = backend.get_vocab()
  user_defined = [
    AddedToken(t, normalized=False, special=False)
    for t, kind in zip(tokens, types)
    if kind == USER_DEFINED and t in vocab
  ]
  kwargs = {
    name: tokens[fields[f"tokenizer.ggml.{key}"]]
    for name, key in (
      ("bos_token", "bos_token_id"),
      ("eos_token", "eos_token_id"),
      ("unk_token", "unknown_token_id"),
      ("pad_token", "padding_token_id"),
    )
    if f"tokenizer.ggml.{key}" in fields
  }
  # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
  kwargs["add_bos_token"] = bool(
    fields.get("tokenizer.ggml.add_bos_token", fields.get("tokenizer.ggml.model") == "llama")
  )
  kwargs["add_eos_token"] = bool(fields.get("tokenizer.ggml.add_eos_token", False))
  if "tokenizer.chat_template" in fields:
    kwargs["chat_template"] = fields["tokenizer.chat_template"]
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
  if control:
    tokenizer.add_special_tokens(
      {"additional_special_tokens": control}, replace_extra_special_tokens=False
    )
  if user_defined:
    tokenizer.add_tokens(user_defined)
  return tokenizer

"""A Hugging Face fast tokenizer as llama.cpp's GGUF tokenizer keys (no torch, no llama.cpp).

Two tokenizer models are written, chosen from the tokenizer's own `tokenizer.json`:

  * byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): `tokenizer.ggml.model = "gpt2"`, the tokens as the
    byte-level strings of the vocab, the merges, and `tokenizer.ggml.pre`, the name llama.cpp gives
    the pre-tokenizer (its split regex);
  * BPE with byte fallback (Llama 2, Mistral: SentencePiece models converted to `tokenizers`):
    `tokenizer.ggml.model = "llama"` with scores. llama.cpp's SentencePiece tokenizer merges the pair
    whose merged token has the highest score; SentencePiece BPE gives the pieces descending scores in
    vocab order, so a token's score is minus its id.

Token types follow llama.cpp's converter: added tokens that are special (or look it, `<|...|>`) are
CONTROL, other added tokens USER_DEFINED, `<0xXX>` byte tokens BYTE, ids the tokenizer lacks (a
vocab padded to the embedding size) `[PAD{i}]` UNUSED. The merges, the bos/eos/unk/pad ids, the
add_bos/add_eos flags and the chat template are read by the gguf package's own `SpecialVocab`.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import gguf

from jlora.models.gguf_tokenizer import PRE_TOKENIZER_SPLITS

# llama.cpp's name for a pre-tokenizer -> the `tokenizers` pre_tokenizer it stands for, as a
# signature of (type, distinguishing field) pairs; the split regexes are the ones the GGUF reader
# (gguf_tokenizer) rebuilds. Only exact matches are named.
PRE_TOKENIZERS = {
  "gpt-2": (("ByteLevel", True),),
  "smollm": (("Digits", True), ("ByteLevel", True)),
  "llama-bpe": (("Split", PRE_TOKENIZER_SPLITS["llama-bpe"]), ("ByteLevel", False)),
  "qwen2": (("Split", PRE_TOKENIZER_SPLITS["qwen2"]), ("ByteLevel", False)),
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _signature(pre_tokenizer: dict | None) -> tuple:
  if not pre_tokenizer:
    return ()
  steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer["type"] == "Sequence" else None
  out = []
  for step in steps if steps is not None else [pre_tokenizer]:
    kind = step["type"]
    if kind == "ByteLevel":
      out.append((kind, bool(step.get("use_regex", True))))
    elif kind == "Digits":
      out.append((kind, bool(step.get("individual_digits"))))
    elif kind == "Split":
      pattern = step.get("pattern", {})
      out.append((kind, pattern.get("Regex", pattern.get("String"))))
    else:
      out.append((kind, None))
  return tuple(out)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
  """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer; 'default' (with a warning)
  when its pre-tokenizer is none llama.cpp names."""
  signature = _signature(tokenizer_json.get("pre_tokenizer"))
  for name, known in PRE_TOKENIZERS.items():
    if signature == known:
      return name
  warnings.warn(
    f"The tokenizer's pre-tokenizer {signature} is none of those jlora can name for llama.cpp "
    f"({sorted(PRE_TOKENIZERS)}); writing tokenizer.ggml.pre='default', so llama.cpp may split text "
    "differently. Pass tokenizer_pre=<llama.cpp's name> to export_gguf to set it.",
    stacklevel=3,
  )
  return "default"


def _looks_special(token: str) -> bool:
  return token.startswith("<|") and token.endswith("|>")


def vocab_entries(tokenizer_json: dict, vocab_size: int, sentencepiece: bool):
  """(tokens, token types, scores) for ids 0..vocab_size-1."""
  vocab: dict[str, int] = dict(tokenizer_json["model"]["vocab"])
  added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
  by_id = {i: t for t, i in vocab.items()}
  by_id.update({i: t["content"] for i, t in added.items()})
  if by_id and max(by_id) >= vocab_size:
    raise ValueError(
      f"tokenizer: it has token id {max(by_id)}, but the model's vocab_size is {vocab_size}; "
      "expected every id below vocab_size."
    )
  tokens, types, scores = [], [], []
  for i in range(vocab_size):
    token = by_id.get(i)
    score = 0.0
    if token is None:
      token, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
    elif i in added:
      special = added[i].get("special") or _looks_special(token)
      kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    elif sentencepiece and _BYTE_TOKEN.fullmatch(token):
      kind = gguf.TokenType.BYTE
    else:
      kind, score = gguf.TokenType.NORMAL, -float(i)
    tokens.append(token)
    types.append(int(kind))
    scores.append(score)
  return tokens, types, scores


def add_tokenizer(
  writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, pre: str | None = None
) -> None:
  """Writes the `tokenizer.*` keys of a transformers fast tokenizer into `writer`."""
  if not hasattr(tokenizer, "save_pretrained"):
    raise TypeError(
      f"tokenizer: got {type(tokenizer).__name__}; expected a transformers tokenizer (e.g. the "
      "one jlora.models.from_pretrained returns)."
    )
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    tokenizer_file = Path(tmp) / "tokenizer.json"
    if not tokenizer_file.is_file():
      raise ValueError(
        "tokenizer: it saved no tokenizer.json (a slow tokenizer?); expected a fast tokenizer."
      )
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
      raise ValueError(
        f"tokenizer: its model is {model.get('type')!r}; GGUF export supports BPE tokenizers "
        "(byte-level like GPT-2/Llama 3/Qwen2, or with byte fallback like Llama 2/Mistral)."
      )
    sentencepiece = bool(model.get("byte_fallback"))
    tokens, types, scores = vocab_entries(tokenizer_json, vocab_size, sentencepiece)
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    if not sentencepiece:
      writer.add_tokenizer_pre(pre or pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:
      writer.add_token_scores(scores)
    special = gguf.SpecialVocab(tmp, load_merges=not sentencepiece, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)

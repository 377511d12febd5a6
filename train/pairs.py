"""Preference pairs for train.dpo: rows -> [pairs, 2, max_length] arrays (0 = chosen, 1 = rejected).

Accepted rows (TRL's preference formats):
  {'prompt': str, 'chosen': str, 'rejected': str}                      standard
  {'prompt': [messages], 'chosen': [messages] | str, 'rejected': ...}   conversational
  {'chosen': [messages], 'rejected': [messages]}                        implicit prompt: the
      messages both share (the history) are the prompt, the rest the two answers
Each side is rendered like train.data renders an SFT row: with the chat template when the
tokenizer has one (the prompt with the generation prompt, then the answer through its end-of-turn
token), else prompt + answer + eos. Only answer tokens are scored (loss_mask); the prompt never is.

A side longer than max_length + 1 tokens keeps its end (TRL's truncation_mode='keep_end': the
prompt's start is cut, the answer stays whole) and the pair is counted as truncated. A pair whose
prompt alone is longer than max_length is skipped and counted; so is one whose chosen and rejected
answers are identical (it carries no preference), with a warning.
"""

from __future__ import annotations

import numpy as np

from train import data as data_lib
from train.errors import UserError

SIDES = ("chosen", "rejected")
PAIR_HELP = (
  "preference rows need 'chosen' and 'rejected' (strings or message lists) and, unless both "
  "are full conversations sharing their history, a 'prompt'"
)


def row_names(rows) -> list[str]:
  """How errors name each row: as the file numbers it (train.data's `line N`) when the rows came
  from a file, else `row N`, counted from 1."""
  return getattr(rows, "names", None) or [f"row {i + 1}" for i in range(len(rows))]


def _checked(value, where, source, field) -> list[dict]:
  for j, m in enumerate(value):
    for key in ("role", "content"):
      if not isinstance(m, dict) or m.get(key) is None:
        raise UserError(f"{source}: {where} is missing field '{field}[{j}].{key}'")
  if not value:
    raise UserError(f"{source}: {where} field {field!r} is an empty list")
  return [{"role": m["role"], "content": m["content"]} for m in value]


def split_row(row: dict, where: str, source: str) -> tuple[list[dict] | str, list, list]:
  """(prompt, chosen, rejected): the prompt as a string or messages, each answer as messages
  (a string answer becomes one assistant message)."""
  for side in SIDES:
    if row.get(side) is None:
      present = sorted(k for k in row if row[k] is not None)
      raise UserError(
        f"{source}: {where} is missing field {side!r} (row keys: {present}); {PAIR_HELP}"
      )
  prompt = row.get("prompt")
  if prompt is None:
    if not all(isinstance(row[s], list) for s in SIDES):
      raise UserError(f"{source}: {where} is missing field 'prompt'; {PAIR_HELP}")
    chosen, rejected = (_checked(row[s], where, source, s) for s in SIDES)
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
      shared += 1
    if shared == 0:
      raise UserError(
        f"{source}: {where} has no 'prompt' and its chosen and rejected conversations share "
        "no first message; add a 'prompt' field"
      )
    return chosen[:shared], chosen[shared:], rejected[shared:]
  if isinstance(prompt, str):
    if not all(isinstance(row[s], str) for s in SIDES):
      raise UserError(f"{source}: {where}: a string 'prompt' needs string 'chosen' and 'rejected'")
    return prompt, row["chosen"], row["rejected"]
  prompt = _checked(prompt, where, source, "prompt")
  answers = []
  for side in SIDES:
    value = row[side]
    if isinstance(value, str):
      value = [{"role": "assistant", "content": value}]
    answers.append(_checked(value, where, source, side))
  return prompt, *answers


def encode_side(tokenizer, prompt, answer, chat: bool, where: str, source: str):
  """(prompt ids, answer ids) of one side, untruncated."""
  if chat:
    if isinstance(prompt, str):
      prompt = [{"role": "user", "content": prompt}]
      answer = [{"role": "assistant", "content": answer}]
    prompt_text = data_lib.render_chat(tokenizer, prompt, True)
    # As TRL's DPOTrainer: the answer is everything the template renders after the prompt.
    full = data_lib.render_chat(tokenizer, prompt + answer, False)
    if not full.startswith(prompt_text) or len(full) == len(prompt_text):
      raise UserError(
        f"{source}: {where}: the chat template does not render the prompt (with the "
        "generation prompt) as a prefix of the prompt and answer, so the answer can't be located"
      )
    p = tokenizer.encode(prompt_text, add_special_tokens=False)
    return p, tokenizer.encode(full[len(prompt_text) :], add_special_tokens=False)
  if not isinstance(prompt, str):
    raise UserError(
      f"{source}: {where}: chat messages need a chat template; set "
      "config.data.use_chat_template=True with a tokenizer that has one, or use string rows."
    )
  if tokenizer.eos_token_id is None:
    raise UserError(f"{source}: plain (no chat template) pairs end in eos; the tokenizer has none.")
  p = tokenizer.encode(prompt, add_special_tokens=True)
  return p, tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]


def _example(prompt_ids, answer_ids, max_length: int) -> tuple[dict, bool]:
  """The SFT-style example (input_ids, targets, loss_mask on the answer), keep_end-truncated."""
  ids = np.asarray(list(prompt_ids) + list(answer_ids), np.int32)
  scored = np.asarray([False] * len(prompt_ids) + [True] * len(answer_ids))
  truncated = len(ids) > max_length + 1
  if truncated:
    ids, scored = ids[-(max_length + 1) :], scored[-(max_length + 1) :]
  example = dict(input_ids=ids[:-1], targets=ids[1:], loss_mask=scored[1:].astype(np.int32))
  return example, truncated


def tokenize_pairs(
  rows, tokenizer, *, max_length: int, use_chat_template: bool = True, source: str = "dataset"
) -> tuple[dict[str, np.ndarray], dict]:
  """Arrays {input_ids, targets, loss_mask, segment_ids, positions} [pairs, 2, max_length] and
  stats (rows, pairs, truncated, skipped_prompt_too_long, skipped_identical, tokens)."""
  chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
  examples = []
  stats = dict(rows=len(rows), pairs=0, truncated=0, skipped_prompt_too_long=0)
  stats.update(skipped_identical=0, tokens=0)
  for where, row in zip(row_names(rows), rows):
    prompt, chosen, rejected = split_row(row, where, source)
    if chosen == rejected:
      stats["skipped_identical"] += 1
      continue
    sides = [encode_side(tokenizer, prompt, a, chat, where, source) for a in (chosen, rejected)]
    if len(sides[0][0]) > max_length:
      stats["skipped_prompt_too_long"] += 1
      continue
    pair = [_example(p, a, max_length) for p, a in sides]
    stats["truncated"] += any(t for _, t in pair)
    examples += [e for e, _ in pair]
    stats["pairs"] += 1
    stats["tokens"] += sum(len(e["input_ids"]) for e, _ in pair)
  flat = data_lib.pad_examples(examples, max_length)
  return {k: v.reshape(-1, 2, max_length) for k, v in flat.items()}, stats


def prompts_and_references(rows, tokenizer, *, use_chat_template: bool = True, source="dataset"):
  """Per pair {'prompt_ids', 'reference'}: the prompt as training renders it, and the chosen
  answer's text, for generate-then-score evaluation."""
  chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
  out = []
  for where, row in zip(row_names(rows), rows):
    prompt, chosen, _ = split_row(row, where, source)
    if chat:
      messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
      ids = tokenizer.encode(
        data_lib.render_chat(tokenizer, messages, True), add_special_tokens=False
      )
    else:
      ids = tokenizer.encode(prompt, add_special_tokens=True)
    reference = chosen if isinstance(chosen, str) else chosen[-1]["content"]
    out.append({"prompt_ids": list(ids), "reference": reference})
  return out

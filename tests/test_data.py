"""Tests for train/data.py and the bundled dataset (offline, fast)."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from train import data as D
from train.errors import UserError
from train.evaluate import exact_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "data")

CHATML = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _make_tokenizer(chat_template=CHATML):
  # Byte-level BPE so decode(encode(text)) == text exactly, like the real GPT-2-style tokenizer.
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  corpus = [
    "Extract name, age, city, year and job as JSON.",
    '{"name": "Maria Lopez", "age": 34, "city": "Lyon", "year": 2019, "job": "nurse"}',
    "Maria Lopez, 34, moved to Lyon in 2019 to work as a nurse. user assistant system",
    "Translate to French: the cat sleeps. Le chat dort. What is two plus two? Four.",
  ]
  tok.train_from_iterator(corpus, trainer)
  hf = PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
  )
  if chat_template:
    hf.chat_template = chat_template
  return hf


@pytest.fixture(scope="module")
def tok():
  return _make_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
  return _make_tokenizer(chat_template=None)


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _full_tokens(ex):
  return np.concatenate([ex["input_ids"], ex["targets"][-1:]])


def _labels_text(tok, ex):
  return tok.decode(ex["targets"][ex["loss_mask"] == 1].tolist())


CHAT_ROW = {
  "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Translate to French: the cat sleeps."},
    {"role": "assistant", "content": "Le chat dort."},
  ]
}
ALPACA_ROW = {
  "instruction": "Translate to French:",
  "input": "the cat sleeps.",
  "output": "Le chat dort.",
}
PC_ROW = {"prompt": "What is two plus two?", "completion": " Four."}


# ---------------------------------------------------------------------------
# Rendering and masking


def test_chat_masks_all_assistant_turns(tok):
  (ex,), stats = D.tokenize_rows([CHAT_ROW], tok, max_length=256)
  assert _labels_text(tok, ex) == "Four.<|im_end|>Le chat dort.<|im_end|>"
  text = tok.decode(_full_tokens(ex).tolist())
  assert text == tok.apply_chat_template(CHAT_ROW["messages"], tokenize=False)
  # Piecewise encoding equals whole-string encoding for ChatML boundaries.
  assert _full_tokens(ex).tolist() == tok.encode(text, add_special_tokens=False)
  assert stats["label_tokens"] == int(ex["loss_mask"].sum()) and stats["examples"] == 1
  # Targets are input_ids shifted left by one.
  np.testing.assert_array_equal(ex["targets"][:-1], ex["input_ids"][1:])


# SmolLM2-135M-Instruct's template: injects a default system prompt when there is none.
SMOLLM2_TEMPLATE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
  "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_smollm2_template_default_system_prompt():
  tok = _make_tokenizer(SMOLLM2_TEMPLATE)
  (ex,), _ = D.tokenize_rows([PC_ROW], tok, max_length=256)
  text = tok.decode(_full_tokens(ex).tolist())
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant")
  assert _labels_text(tok, ex) == " Four.<|im_end|>"


def test_history_rewriting_template_supervises_last_turn_only():
  # A template that drops earlier assistant turns from history breaks the prefix
  # property for them; only the final answer is then supervised.
  template = (
    "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
  )
  tok = _make_tokenizer(template)
  (ex,), _ = D.tokenize_rows([CHAT_ROW], tok, max_length=256)
  assert _labels_text(tok, ex) == "Le chat dort.<|im_end|>"


@pytest.mark.parametrize(
  "row,prompt,answer",
  [
    (ALPACA_ROW, "Translate to French:\n\nthe cat sleeps.", "Le chat dort."),
    (PC_ROW, "What is two plus two?", " Four."),
    ({"instruction": "What is two plus two?", "output": "Four."}, "What is two plus two?", "Four."),
  ],
)
def test_alpaca_and_prompt_completion_chat_template(tok, row, prompt, answer):
  (ex,), _ = D.tokenize_rows([row], tok, max_length=256)
  assert _labels_text(tok, ex) == answer + "<|im_end|>"
  expected = tok.apply_chat_template(
    [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
  )
  assert tok.decode(_full_tokens(ex).tolist()) == expected
  # Everything before the answer is masked out.
  n_prompt = len(
    tok.encode(expected[: expected.index(answer + "<|im_end|>")], add_special_tokens=False)
  )
  assert ex["loss_mask"][: n_prompt - 1].sum() == 0
  assert ex["loss_mask"][n_prompt - 1 :].sum() > 0


@pytest.mark.parametrize(
  "row,text,answer",
  [
    (ALPACA_ROW, "Translate to French:\n\nthe cat sleeps.\n\nLe chat dort.", "Le chat dort."),
    (PC_ROW, "What is two plus two? Four.", " Four."),
  ],
)
def test_plain_concatenation_without_template(tok, plain_tok, row, text, answer):
  for t, kw in ((plain_tok, {}), (tok, {"use_chat_template": False})):
    (ex,), _ = D.tokenize_rows([row], t, max_length=256, **kw)
    assert t.decode(_full_tokens(ex).tolist()) == text + "<|im_end|>"
    assert _labels_text(t, ex) == answer + "<|im_end|>"


def test_messages_without_template_is_a_clear_error(plain_tok):
  with pytest.raises(UserError, match="chat template"):
    D.tokenize_rows([CHAT_ROW], plain_tok, max_length=64)


@pytest.mark.parametrize("row", [CHAT_ROW, ALPACA_ROW, PC_ROW])
def test_train_on_prompt_unmasks_everything(tok, row):
  (ex,), _ = D.tokenize_rows([row], tok, max_length=256, train_on_prompt=True)
  assert ex["loss_mask"].all()
  (ex2,), _ = D.tokenize_rows([row], tok, max_length=256)
  assert 0 < ex2["loss_mask"].sum() < ex["loss_mask"].sum()


CONVERSATIONAL_PC_ROW = {
  "prompt": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
  ],
  "completion": [{"role": "assistant", "content": "Four."}],
}


def test_prompt_completion_as_message_lists(tok):
  (ex,), _ = D.tokenize_rows([CONVERSATIONAL_PC_ROW], tok, max_length=256)
  # Hand-written ChatML: only the assistant answer and its end marker are labels.
  expected = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
    "<|im_start|>assistant\nFour.<|im_end|>\n"
  )
  assert tok.decode(_full_tokens(ex).tolist()) == expected
  assert _labels_text(tok, ex) == "Four.<|im_end|>"
  # A string completion after a message-list prompt is one assistant turn.
  row = {**CONVERSATIONAL_PC_ROW, "completion": "Four."}
  (ex2,), _ = D.tokenize_rows([row], tok, max_length=256)
  np.testing.assert_array_equal(ex2["loss_mask"], ex["loss_mask"])


def test_text_rows_are_trained_on_every_token(tok, plain_tok):
  text = "Le chat dort. What is two plus two? Four."
  for t in (tok, plain_tok):  # a chat template is never applied to text rows
    (ex,), stats = D.tokenize_rows([{"text": text}], t, max_length=256)
    tokens = t.encode(text, add_special_tokens=True) + [t.eos_token_id]
    assert ex["input_ids"].tolist() == tokens[:-1] and ex["targets"].tolist() == tokens[1:]
    assert ex["loss_mask"].tolist() == [1] * (len(tokens) - 1)
    assert stats["label_tokens"] == len(tokens) - 1


@pytest.mark.parametrize(
  "empty",
  [
    {"prompt": "What is two plus two?", "completion": "  "},
    {"instruction": "Translate:", "output": ""},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
    {"text": "\n"},
  ],
)
def test_rows_with_empty_completions_are_skipped_and_counted(tok, empty):
  keep = {"text": "Four."} if "text" in empty else {k: v for k, v in PC_ROW.items()}
  if "instruction" in empty:
    keep = ALPACA_ROW
  if "messages" in empty:
    keep = CHAT_ROW
  examples, stats = D.tokenize_rows([keep, empty, keep], tok, max_length=256)
  assert len(examples) == 2 and stats["skipped_empty_completion"] == 1


# ---------------------------------------------------------------------------
# Truncation / skipping


def test_truncation_and_prompt_too_long_counts(tok):
  short = {"prompt": "Four.", "completion": " Four."}
  long_answer = {"prompt": "Four.", "completion": " Le chat dort." * 20}
  long_prompt = {"prompt": "Le chat dort. " * 30, "completion": " Four."}
  n_prompt = len(D.encode_row(tok, long_prompt, "prompt_completion")[0]) - 8
  max_length = 40
  assert n_prompt > max_length
  examples, stats = D.tokenize_rows(
    [short, long_answer, long_prompt, short], tok, max_length=max_length
  )
  assert stats["rows"] == 4 and stats["examples"] == 3
  assert stats["truncated"] == 2  # the long answer (kept) and the long prompt (then skipped)
  assert stats["skipped_prompt_too_long"] == 1
  assert len(examples[1]["input_ids"]) == max_length and examples[1]["loss_mask"].sum() > 0
  assert stats["tokens"] == sum(len(e["input_ids"]) for e in examples)
  assert stats["label_tokens"] == sum(int(e["loss_mask"].sum()) for e in examples)


def test_prepare_all_skipped_is_an_error(tmp_path, tok):
  path = _write_jsonl(
    tmp_path / "x.jsonl", [{"prompt": "Le chat dort. " * 30, "completion": "Four."}]
  )
  with pytest.raises(UserError, match="max_length"):
    D.prepare_spec(path, tok, max_length=16)


# ---------------------------------------------------------------------------
# Packing


def _random_examples(rng, n, max_length):
  out = []
  for _ in range(n):
    L = int(rng.integers(1, max_length + 1))
    toks = rng.integers(3, 300, L + 1).astype(np.int32)
    mask = (rng.random(L) < 0.6).astype(np.int32)
    out.append(dict(input_ids=toks[:-1], targets=toks[1:], loss_mask=mask))
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packing_invariants(seed):
  rng = np.random.default_rng(seed)
  max_length = 32
  examples = _random_examples(rng, 60, max_length)
  packed = D.pack_examples(examples, max_length, seed=seed)
  assert all(v.dtype == np.int32 and v.shape == packed["input_ids"].shape for v in packed.values())
  assert packed["input_ids"].shape[1] == max_length
  assert len(packed["input_ids"]) < len(examples)  # actually packs
  recovered = []
  for r in range(len(packed["input_ids"])):
    seg = packed["segment_ids"][r]
    n_seg = seg.max()
    # Segments are 1..k, contiguous, in order, then padding only.
    nz = seg[seg > 0]
    assert (np.diff(nz) >= 0).all() and set(nz) == set(range(1, n_seg + 1))
    assert (seg[len(nz) :] == 0).all()
    pad = seg == 0
    for k in ("input_ids", "targets", "loss_mask", "positions"):
      assert (packed[k][r][pad] == 0).all()
    for s in range(1, n_seg + 1):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(packed["positions"][r][idx], np.arange(len(idx)))
      recovered.append(
        tuple(np.concatenate([packed[k][r][idx] for k in ("input_ids", "targets", "loss_mask")]))
      )
  # Every example appears exactly once, whole: nothing split or lost.
  want = sorted(
    tuple(np.concatenate([e[k] for k in ("input_ids", "targets", "loss_mask")])) for e in examples
  )
  assert sorted(recovered) == want
  assert packed["loss_mask"].sum() == sum(e["loss_mask"].sum() for e in examples)


def test_packed_tokens_equal_unpacked(tok):
  # The format is per dataset, so tokenize each format separately.
  examples = []
  for row in (CHAT_ROW, ALPACA_ROW, PC_ROW):
    examples += D.tokenize_rows([row] * 5, tok, max_length=128)[0]
  packed = D.pack_examples(examples, 128, seed=3)
  padded = D.pad_examples(examples, 128)
  assert padded["input_ids"].shape == (len(examples), 128)
  assert set(np.unique(padded["segment_ids"])) == {0, 1}
  for k in ("input_ids", "targets", "loss_mask"):
    assert sorted(packed[k][packed["segment_ids"] > 0].tolist()) == sorted(
      padded[k][padded["segment_ids"] > 0].tolist()
    )
  assert packed["loss_mask"][packed["segment_ids"] == 0].sum() == 0
  assert padded["loss_mask"][padded["segment_ids"] == 0].sum() == 0


# ---------------------------------------------------------------------------
# Batching


def _rows_arrays(n, max_length=8):
  ids = np.arange(n * max_length, dtype=np.int32).reshape(n, max_length)
  return {k: ids + i for i, k in enumerate(D.BATCH_KEYS)}


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_shuffle_deterministic_and_seeded():
  arrays = _rows_arrays(13)
  a = _take(D.TrainIterator(arrays, 4, seed=1), 10)
  b = _take(D.TrainIterator(arrays, 4, seed=1), 10)
  c = _take(D.TrainIterator(arrays, 4, seed=2), 10)
  for x, y in zip(a, b):
    for k in D.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
  for batch in a:
    assert set(batch) == set(D.BATCH_KEYS)
    assert all(v.shape == (4, 8) and v.dtype == np.int32 for v in batch.values())


def test_every_row_once_per_epoch_and_epochs_differ():
  arrays = _rows_arrays(12)
  it = D.TrainIterator(arrays, 4, seed=0)
  epochs = [np.concatenate([b["input_ids"][:, 0] for b in _take(it, 3)]) // 8 for _ in range(3)]
  for e in epochs:
    assert sorted(e.tolist()) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1])
  assert it.state() == {"epoch": 3, "index": 0}


@pytest.mark.parametrize("n,batch,skip", [(13, 4, 7), (5, 8, 3), (10, 5, 0), (9, 3, 4)])
def test_resume_from_state(n, batch, skip):
  arrays = _rows_arrays(n)
  it = D.TrainIterator(arrays, batch, seed=7)
  _take(it, skip)
  state = it.state()
  assert set(state) == {"epoch", "index"} and all(type(v) is int for v in state.values())
  expected = _take(it, 6)
  restored = D.TrainIterator(arrays, batch, seed=7, state=json.loads(json.dumps(state)))
  other = D.TrainIterator(arrays, batch, seed=7)
  other.restore(state)
  for it2 in (restored, other):
    for x, y in zip(expected, _take(it2, 6)):
      for k in D.BATCH_KEYS:
        np.testing.assert_array_equal(x[k], y[k])


def test_bad_state_is_rejected():
  with pytest.raises(UserError, match="index"):
    D.TrainIterator(_rows_arrays(4), 2, state={"epoch": 0, "index": 9})


def test_eval_batches_one_pass_with_weights():
  arrays = _rows_arrays(10)
  batches = list(D.eval_batches(arrays, 4))
  assert len(batches) == 3
  assert [b["weight"].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
  real = np.concatenate([b["input_ids"][b["weight"] == 1] for b in batches])
  np.testing.assert_array_equal(real, arrays["input_ids"])
  last = batches[-1]
  assert all(v.shape[0] == 4 for v in last.values())
  assert (last["loss_mask"][2:] == 0).all() and (last["segment_ids"][2:] == 0).all()


# ---------------------------------------------------------------------------
# Loading and errors


def test_load_json_jsonl_parquet(tmp_path):
  rows = [PC_ROW, {"prompt": "a", "completion": "b"}]
  p1 = _write_jsonl(tmp_path / "r.jsonl", rows)
  p2 = tmp_path / "r.json"
  p2.write_text(json.dumps(rows))
  import datasets

  p3 = str(tmp_path / "r.parquet")
  datasets.Dataset.from_list(rows).to_parquet(p3)
  for p in (p1, str(p2), p3):
    assert D.load_rows(p, "train", "config.data.train") == rows


def test_missing_file_names_path_and_field(tmp_path):
  path = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError) as e:
    D.load_rows(path, "train", "config.data.eval")
  assert path in str(e.value) and "config.data.eval" in str(e.value)


def test_malformed_file_names_path(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "a", "completion": \n')
  with pytest.raises(UserError) as e:
    D.load_rows(str(path), "train", "config.data.train")
  assert str(path) in str(e.value) and "config.data.train" in str(e.value)


def test_empty_dataset(tmp_path):
  for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match="empty") as e:
      D.load_rows(str(path), "train", "config.data.train")
    assert str(path) in str(e.value)


def test_hub_error_is_readable(monkeypatch):
  # Force offline mode so the test does not spend seconds on network retries.
  import datasets
  import huggingface_hub.constants

  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(UserError, match="config.data.train.*hub dataset.*split 'test'") as e:
    D.load_rows("no-such-user-xyz/no-such-dataset-xyz:test", "train", "config.data.train")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "rows,index,field",
  [
    ([PC_ROW, {"prompt": "x"}], 1, "completion"),
    ([ALPACA_ROW, ALPACA_ROW, {"instruction": "x", "input": "y"}], 2, "output"),
    ([CHAT_ROW, {"messages": [{"role": "user"}]}], 1, "messages[0].content"),
    ([CHAT_ROW, {"other": 1}], 1, "messages"),
  ],
)
def test_rows_missing_fields(tmp_path, tok, rows, index, field):
  with pytest.raises(UserError) as e:
    D.tokenize_rows(rows, tok, max_length=64)
  assert f"row {index + 1}" in str(e.value) and repr(field) in str(e.value)
  # Through a file, where arrow fills missing keys with None.
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  with pytest.raises(UserError) as e:
    D.prepare_spec(path, tok, max_length=64)
  assert (
    f"line {index + 1}" in str(e.value) and repr(field) in str(e.value) and path in str(e.value)
  )


def test_unknown_format_lists_accepted(tok):
  with pytest.raises(UserError) as e:
    D.tokenize_rows([{"body": "hello"}], tok, max_length=64)
  msg = str(e.value)
  assert (
    "text" in msg
    and "messages" in msg
    and "instruction" in msg
    and "prompt" in msg
    and "completion" in msg
  )


@pytest.mark.parametrize(
  "spec,expected",
  [
    ("org/name", ("org/name", None)),
    ("org/name:validation", ("org/name", "validation")),
    ("some_dir:test", ("some_dir", "test")),
    ("a/b.jsonl", ("a/b.jsonl", None)),
  ],
)
def test_parse_spec(spec, expected):
  assert D.parse_spec(spec) == expected


def test_existing_path_with_a_colon_is_not_split(tmp_path):
  path = _write_jsonl(tmp_path / "a:b.jsonl", [PC_ROW])
  assert D.parse_spec(path) == (path, None)
  assert D.load_rows(path) == [PC_ROW]


def test_directory_of_parquet_files(tmp_path):
  import datasets

  rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
  (tmp_path / "flat").mkdir()
  datasets.Dataset.from_list(rows[:3]).to_parquet(str(tmp_path / "flat" / "part-0.parquet"))
  datasets.Dataset.from_list(rows[3:]).to_parquet(str(tmp_path / "flat" / "part-1.parquet"))
  got = D.load_rows(str(tmp_path / "flat"), "train", "config.data.train")
  assert sorted(got, key=lambda r: r["prompt"]) == rows
  # The eval split name falls back to the only split a flat directory has.
  assert len(D.load_rows(str(tmp_path / "flat"), "validation", "config.data.eval")) == 5


def test_dataset_repo_layout_and_split_suffix(tmp_path):
  # A script-free hub repo layout, loaded from disk by the same code path as a hub name.
  import datasets

  repo = tmp_path / "repo" / "data"
  repo.mkdir(parents=True)
  train = [{"text": f"train {i}"} for i in range(4)]
  valid = [{"text": f"valid {i}"} for i in range(2)]
  datasets.Dataset.from_list(train).to_parquet(str(repo / "train-00000-of-00001.parquet"))
  datasets.Dataset.from_list(valid).to_parquet(str(repo / "validation-00000-of-00001.parquet"))
  root = str(tmp_path / "repo")
  assert D.load_rows(root) == train
  assert D.load_rows(root, "validation", "config.data.eval") == valid
  assert D.load_rows(f"{root}:validation") == valid
  with pytest.raises(UserError, match=r"no split 'test'.*\['train', 'validation'\]"):
    D.load_rows(f"{root}:test")


def test_malformed_jsonl_line_is_named(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(PC_ROW) + "\n\n" + json.dumps(PC_ROW) + "\n{oops\n")
  with pytest.raises(UserError, match=r"config.data.train = .*bad.jsonl.*line 4 is not valid JSON"):
    D.load_rows(str(path), "train", "config.data.train")


# ---------------------------------------------------------------------------
# Metric


@pytest.mark.parametrize(
  "pred,ok",
  [
    ('{"name": "Maria Lopez", "age": 34}', True),
    ('  {"age":34,\n "name":"Maria Lopez"}  \n', True),
    ('{"name": "Maria Lopez", "age": "34"}', False),
    ('{"name": "Maria Lopez", "age": 34} extra', False),
    ('{"name": "Maria Lopez", "age": 34', False),
    ("", False),
    ('{"name": "Maria Lopez", "age": 34, "city": null}', False),
  ],
)
def test_exact_match(pred, ok):
  assert bool(exact_match(pred, '{"name": "Maria Lopez", "age": 34}')) is ok


# ---------------------------------------------------------------------------
# Bundled dataset


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_bundled_dataset_reproducible_and_disjoint(tmp_path):
  train_path = os.path.join(DATA_DIR, "extract_train.jsonl")
  eval_path = os.path.join(DATA_DIR, "extract_eval.jsonl")
  assert os.path.getsize(train_path) + os.path.getsize(eval_path) < 1_000_000
  subprocess.run(
    [sys.executable, os.path.join(DATA_DIR, "make_dataset.py"), "--out-dir", str(tmp_path)],
    check=True,
    capture_output=True,
  )
  for name in ("extract_train.jsonl", "extract_eval.jsonl"):
    assert filecmp.cmp(os.path.join(DATA_DIR, name), tmp_path / name, shallow=False), name
  train, ev = _read(train_path), _read(eval_path)
  assert len(train) == 1500 and len(ev) == 100
  keys = ["name", "age", "city", "year", "job"]
  names = {}
  for split, rows in (("train", train), ("eval", ev)):
    names[split] = set()
    for row in rows:
      system, user, asst = row["messages"]
      assert (system["role"], user["role"], asst["role"]) == ("system", "user", "assistant")
      assert "JSON" in system["content"]
      record = json.loads(asst["content"])
      assert list(record) == keys and asst["content"] == json.dumps(record)
      sentence = user["content"]
      for k in keys:
        assert str(record[k]) in sentence
      assert exact_match(asst["content"], asst["content"])
      names[split].add(record["name"])
  assert not names["train"] & names["eval"]
  assert not {r["messages"][1]["content"] for r in train} & {
    r["messages"][1]["content"] for r in ev
  }


def test_bundled_dataset_through_pipeline(tok):
  rows = D.load_rows(os.path.join(DATA_DIR, "extract_eval.jsonl"), "train", "config.data.eval")
  examples, stats = D.tokenize_rows(rows, tok, max_length=256)
  assert (
    stats["examples"] == 100 and stats["truncated"] == 0 and stats["skipped_prompt_too_long"] == 0
  )
  for ex, row in zip(examples[:10], rows):
    assert _labels_text(tok, ex) == row["messages"][-1]["content"] + "<|im_end|>"
  prompts = D.prompts_and_references(rows[:3], tok)
  for p, row in zip(prompts, rows):
    assert tok.decode(p["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert p["reference"] == row["messages"][-1]["content"]


# ---------------------------------------------------------------------------
# Task metrics (train/evaluate.py)


def test_exact_match_on_plain_text_answers():
  assert exact_match("  Paris\n", "Paris") == 1.0
  assert exact_match("Paris, France", "Paris") == 0.0


def test_json_fields_counts_matching_fields():
  from train.evaluate import json_fields

  reference = '{"name": "Ana", "age": 34, "city": "Lyon", "job": "nurse"}'
  assert json_fields('{"name": "Ana", "age": 34, "city": "Paris"}', reference) == 0.5
  assert json_fields('{"job": "nurse", "city": "Lyon", "age": 34, "name": "Ana"}', reference) == 1
  assert json_fields("not json", reference) == 0.0
  assert json_fields('["Ana", 34]', reference) == 0.0


def test_unscorable_rows_are_misses_with_one_warning():
  from train.evaluate import score

  warnings = []
  references = ['{"a": 1}', "Paris", "Lyon", '{"a": 2}']
  predictions = ['{"a": 1}', "Paris", "Lyon", '{"a": 3}']
  # Two plain-text references can't be scored by json_fields: misses, one warning.
  assert score("json_fields", predictions, references, warnings.append) == 0.25
  assert len(warnings) == 1 and "json_fields" in warnings[0] and "row 1" in warnings[0]
  assert score("exact_match", predictions, references, warnings.append) == 0.75
  assert len(warnings) == 1

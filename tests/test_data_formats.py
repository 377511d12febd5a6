"""The data people bring: ShareGPT and OpenAI tool-call rows, labelled exactly on the assistant
tokens as the chat template itself marks them (transformers' `return_assistant_tokens_mask` over
the template's `{% generation %}` spans, an independent reference), and bad rows refused before
step 1 with the file, the line and the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import tiny
from train import data as D
from train.errors import UserError

# ChatML that renders tool calls and marks what the assistant says with {% generation %}.
TOOLS_TEMPLATE = (
  "{% for m in messages %}"
  "{% if m['role'] == 'assistant' %}"
  "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] }}"
  "{% for c in m.get('tool_calls') or [] %}"
  "{{ '<tool_call>' + c['function']['name'] + ' ' }}{{ c['function']['arguments'] | tojson }}"
  "{{ '</tool_call>' }}{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
  "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The template's role check, as Llama-2 / Mistral templates do it.
STRICT_TEMPLATE = (
  "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
  "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOOL_ROW = {
  "messages": [
    {"role": "system", "content": "You can call get_weather."},
    {"role": "user", "content": "Weather in Lyon?"},
    {
      "role": "assistant",
      "content": None,
      "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}
      ],
    },
    {"role": "tool", "tool_call_id": "1", "content": '{"temp": 21}'},  # JSON-looking: a string
    {"role": "assistant", "content": "It is 21 degrees in Lyon."},
  ]
}
SHAREGPT_ROW = {
  "conversations": [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "What is two plus two?"},
    {"from": "gpt", "value": "Four."},
    {"from": "human", "value": "And the cat?"},
    {"from": "gpt", "value": "Le chat dort."},
  ]
}


@pytest.fixture(scope="module")
def tok():
  tokenizer = tiny.make_tokenizer()
  tokenizer.chat_template = TOOLS_TEMPLATE
  return tokenizer


def template_reference(tok, messages):
  """(ids, assistant mask) as the chat template itself marks the assistant's tokens."""
  out = tok.apply_chat_template(
    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
  )
  return list(out["input_ids"]), np.asarray(out["assistant_masks"], bool)


@pytest.mark.parametrize("row,fmt", [(TOOL_ROW, "messages"), (SHAREGPT_ROW, "sharegpt")])
def test_labels_cover_exactly_the_assistant_tokens(tok, row, fmt):
  assert D.detect_format([row]) == fmt
  messages = D.row_to_messages(row, fmt, 0)
  ids, is_completion = D.encode_row(tok, row, fmt)
  ref_ids, ref_mask = template_reference(tok, messages)
  n = len(ref_ids)  # the template ends after the last <|im_end|>'s newline; so do we
  assert list(ids[:n]) == ref_ids and not is_completion[n:].any()
  np.testing.assert_array_equal(is_completion[:n], ref_mask)
  assert ref_mask.sum() > 0


def test_tool_turns_keep_strings_as_strings(tok):
  messages = D.row_to_messages(TOOL_ROW, "messages", 0)
  assert messages[3]["content"] == '{"temp": 21}' and messages[3]["tool_call_id"] == "1"
  text = tok.decode(D.encode_row(tok, TOOL_ROW, "messages")[0])
  assert '<|im_start|>tool\n{"temp": 21}<|im_end|>' in text
  assert '<tool_call>get_weather {"city": "Lyon"}</tool_call>' in text


def test_files_in_both_formats_load_and_tokenize(tok, tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_text(json.dumps(TOOL_ROW) + "\n\n" + json.dumps(TOOL_ROW) + "\n")
  arrays, stats = D.prepare_spec(str(path), tok, max_length=128, pack=False)
  assert stats["examples"] == 2 and arrays["loss_mask"].sum() > 0
  sharegpt = tmp_path / "sharegpt.json"
  sharegpt.write_text(json.dumps([SHAREGPT_ROW] * 3))
  arrays, stats = D.prepare_spec(str(sharegpt), tok, max_length=128, pack=False)
  assert stats["examples"] == 3


def _bad(messages):
  return {"messages": messages}


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}
BAD_ROWS = [
  (_bad([U, {"role": "robot", "content": "x"}]), "'messages[1].role' is 'robot'; expected one of"),
  (
    _bad([U, {"role": "assistant", "content": 3}]),
    "'messages[1].content' must be a string, got int",
  ),
  (_bad([U, {"role": "assistant", "content": ["a"]}]), "must be a string, got list"),
  (_bad([]), "field 'messages' must be a non-empty list"),
  (_bad([U, "ok"]), "'messages[1]' must be an object"),
  (_bad([U, {"content": "ok"}]), "missing field 'messages[1].role'"),
  (_bad([U, {"role": "assistant"}]), "missing field 'messages[1].content'"),
  (_bad([U, {"role": "user", "tool_calls": [], "content": "x"}]), "'messages[1].tool_calls'"),
  (_bad([U, {"role": "assistant", "tool_calls": "f()"}]), "must be a list of objects"),
  (_bad([U]), "no message with role 'assistant'"),
  ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}, "'bot'"),
  ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}, "conversations[1]"),
  ({"conversations": "human: hi"}, "field 'conversations' must be a non-empty list"),
  ({"prompt": "a", "completion": 5}, "field 'completion' must be a string"),
  ({"instruction": "a", "output": None, "input": "b"}, "missing field 'output'"),
]


GOOD_ROWS = {
  "conversations": SHAREGPT_ROW,
  "prompt": {"prompt": "a", "completion": "b"},
  "instruction": {"instruction": "a", "output": "b"},
}


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=lambda v: str(v)[:40])
def test_bad_rows_name_the_file_the_line_and_the_field(tok, tmp_path, row, message):
  good = next((g for key, g in GOOD_ROWS.items() if key in row), {"messages": [U, A]})
  path = tmp_path / "rows.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")  # line 3: after a blank
  with pytest.raises(UserError) as error:
    D.prepare_spec(str(path), tok, max_length=64)
  line = str(error.value)
  assert str(path) in line and "line 3" in line and message in line, line


def test_a_template_that_rejects_a_row_gives_its_message_and_the_row(tmp_path):
  tokenizer = tiny.make_tokenizer()
  tokenizer.chat_template = STRICT_TEMPLATE
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in ({"messages": [U, A]}, {"messages": [A, U, A]})))
  with pytest.raises(UserError, match=r"line 2: the chat template rejects .*roles must alternate"):
    D.prepare_spec(str(path), tokenizer, max_length=64)


def test_tool_rows_are_refused_where_the_template_has_no_tools(tmp_path):
  tokenizer = tiny.make_tokenizer()  # ChatML without tool calls
  with pytest.raises(UserError, match="does not render tool calls"):
    D.encode_row(tokenizer, TOOL_ROW, "messages", index="line 1")


@pytest.mark.parametrize(
  "data,where",
  [
    ('{"text": "caf\xe9"}\n'.encode("latin-1"), "line 1, column 14: byte 0xe9"),
    (b'{"text": "a"}\n{"text": "b\xff"}\n', "line 2, column 12: byte 0xff"),
  ],
  ids=["latin-1", "stray-0xff"],
)
def test_undecodable_bytes_name_the_line_and_the_encoding(tmp_path, data, where):
  path = tmp_path / "rows.jsonl"
  path.write_bytes(data)
  with pytest.raises(UserError, match="is not valid UTF-8") as error:
    D.load_rows(str(path))
  assert where in str(error.value) and str(path) in str(error.value)


@pytest.mark.slow
def test_a_run_trains_on_sharegpt_and_tool_call_rows(tmp_path):
  """train.sft end to end on a file mixing tool-call chat rows, on a model whose template renders
  tools; and on ShareGPT rows: the loss goes down."""
  from transformers import AutoTokenizer

  from train import sft

  files = tiny.sft_files(tmp_path)
  tokenizer = AutoTokenizer.from_pretrained(files["model"])
  tokenizer.chat_template = TOOLS_TEMPLATE
  tokenizer.save_pretrained(files["model"])
  tool_rows = tmp_path / "tool_rows.jsonl"
  tool_rows.write_text(json.dumps(TOOL_ROW) + "\n")
  sharegpt_rows = tmp_path / "sharegpt.jsonl"
  sharegpt_rows.write_text(json.dumps(SHAREGPT_ROW) + "\n")
  for data in (tool_rows, sharegpt_rows):
    out = tmp_path / f"run-{data.stem}"
    config = tiny.sft_config(
      files["model"], data, data, out, steps=3, eval_every=3, samples=0, **{"eval.metrics": ""}
    )
    summary = sft.run(config, progress=False)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"], data
    assert summary["data"]["label_tokens"] > 0

"""SFT data pipeline: load rows, render them with the tokenizer, pack, batch.

Pipeline:  load_rows -> tokenize_rows -> pack_examples / pad_examples ->
TrainIterator (shuffled, infinite, resumable) or eval_batches (one pass).
`prepare_spec` runs the first three steps in one call, from a file path or dataset spec.

Label convention (the trainer relies on this)
---------------------------------------------
Every batch is a dict of numpy int32 arrays of shape [batch, max_length]:

  input_ids[b, t]   token fed to the model at position t
  targets[b, t]     the token the model must predict at position t, i.e. the
                    token that follows input_ids[b, t] in the same example
  loss_mask[b, t]   1 if targets[b, t] counts in the loss, else 0
  segment_ids[b, t] 1, 2, 3, ... one id per packed example; 0 = padding
  positions[b, t]   position of the token inside its own example (restarts at
                    0 for each example; 0 on padding)

An example of n+1 tokens occupies n positions: input_ids = tokens[:-1] and
targets = tokens[1:]. So targets is input_ids shifted left by one inside a
segment, and at the last position of a segment it is the example's final token
(usually the end-of-turn/eos token), which never appears in input_ids. No
target ever crosses from one example into the next. The loss is
    sum(loss_mask * xent(logits, targets)) / sum(loss_mask)
and attention must be restricted to equal, non-zero segment_ids (causal).
Padding positions have input_ids = targets = loss_mask = segment_ids = 0.

eval_batches adds `weight` [batch] int32: 1 for real rows, 0 for rows that only
pad the last batch to a static shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from train.errors import UserError, first_line

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
FORMAT_HELP = (
  "accepted row formats: chat {'messages': [{'role', 'content'}, ...]} (OpenAI tool_calls and "
  "'tool' turns included), ShareGPT {'conversations': [{'from', 'value'}, ...]}, "
  "alpaca {'instruction', optional 'input', 'output'}, "
  "{'prompt', 'completion'} (strings, or lists of messages), "
  "{'text'} (continued pre-training: loss on every token)"
)
# Chat roles a row may use; a template sees only these.
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` -> the chat role.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "tool": "tool"}
LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


# ----------------------------------------------------------------------------
# Loading


class Rows(list):
  """Loaded rows, with the name the file gives each: 'line 12' of a JSON Lines file, 'row 3'."""

  def __init__(self, rows, names: Sequence[str] | None = None):
    super().__init__(rows)
    self.names = list(names) if names is not None else [f"row {i + 1}" for i in range(len(self))]


def row_name(rows: Sequence[dict], index: int) -> str:
  """How an error names row `index`: as the file numbers it, else 'row N' counted from 1."""
  return rows.names[index] if isinstance(rows, Rows) else f"row {index + 1}"


def _label(index) -> str:
  return index if isinstance(index, str) else f"row {index + 1}"


def parse_spec(spec: str) -> tuple[str, str | None]:
  """(source, split or None) of a data spec: a file, a directory, or a hub dataset name, with an
  optional ':split' suffix (`org/name:validation`, `my_dir:test`). A path that exists as typed
  is never split, so a file name holding ':' still works."""
  if os.path.exists(spec):
    return spec, None
  source, sep, split = spec.rpartition(":")
  if sep and source and re.fullmatch(r"[A-Za-z0-9_.\-]+", split):
    return source, split
  return spec, None


def json_kind(value) -> str:
  """What a parsed JSON value is, in JSON's words: 'an array', 'a number', ..."""
  kinds = {list: "an array", str: "a string", bool: "true or false", int: "a number"}
  kinds.update({float: "a number", type(None): "null", dict: "an object"})
  return kinds.get(type(value), type(value).__name__)


def load_rows(spec: str, split_name: str = "train", field: str = "config.data.train") -> list[dict]:
  """Rows of a local .json/.jsonl/.parquet file, a directory of such files (or a dataset repo
  layout), or a hub dataset split. `split_name` is used when the spec names no split.

  `field` is the config field that held `spec`; it only goes into errors so
  the user knows which setting to fix.
  """
  if not isinstance(spec, str) or not spec:
    raise UserError(f"{field}: {spec!r} is not valid; expected a file, a directory or a hub name.")
  import datasets  # deferred: importing datasets costs about a second

  datasets.disable_progress_bars()  # "Generating train split" bars on every load
  datasets.logging.set_verbosity_error()
  source, split = parse_spec(spec)
  where = f"{field} = {spec!r}"
  ext = os.path.splitext(source)[1].lower()
  if ext in LOCAL_EXTENSIONS and not os.path.isdir(source):
    if split is not None:
      raise UserError(f"{where}: a single file has no splits; drop the ':{split}' suffix.")
    return _load_file(source, where)
  elif os.path.isdir(source):
    ds = _pick_split(_load_local(datasets.load_dataset, source, where), split, split_name, where)
  elif os.path.exists(source):
    raise UserError(
      f"{where}: the file has extension {ext!r}; local data must be one of "
      f"{sorted(LOCAL_EXTENSIONS)}, or a directory of such files."
    )
  else:
    ds = _load_hub(datasets.load_dataset, source, split or split_name, where)
  if len(ds) == 0:
    raise UserError(f"{where}: the dataset is empty, it has no rows.")
  return ds.to_list()


def _load_file(path: str, where: str):
  """A local file's rows. JSON is parsed here, value for value (datasets' arrow schema would fill
  absent keys with None and unify types across rows); rows are named by their line."""
  import datasets

  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{where}: no such file (cwd {os.getcwd()!r}); expected a local "
      f"{'/'.join(LOCAL_EXTENSIONS)} file, a directory or a hub dataset name."
    )
  if os.path.getsize(path) == 0:
    raise UserError(f"{where}: the file is empty, it has no rows.")
  builder = LOCAL_EXTENSIONS[os.path.splitext(path)[1].lower()]
  if builder == "json":
    return read_json_rows(path, where)
  try:
    return datasets.load_dataset(builder, data_files=path, split="train").to_list()
  except Exception as e:  # datasets' own error types vary by version
    if isinstance(e, StopIteration) or "corresponds to no data" in str(e):
      raise UserError(f"{where}: the file is empty, it has no rows.") from None
    raise UserError(f"{where}: could not read it as {builder}: {type(e).__name__}: {e}") from e


def _decode(data: bytes, where: str) -> str:
  """UTF-8 text, or an error naming the line, column and byte that is not UTF-8."""
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise UserError(
      f"{where}: line {line}, column {column}: byte 0x{data[e.start]:02x} is not valid UTF-8, "
      "the encoding JSON files must have; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
    ) from None


def read_json_rows(path: str, where: str) -> Rows:
  """The rows of a JSON Lines file (or one JSON array), each named by its line number."""
  text = _decode(Path(path).read_bytes(), where)
  stripped = text.lstrip()
  if not stripped:
    raise UserError(f"{where}: the file is empty, it has no rows.")
  if stripped.startswith("["):  # one JSON array, not JSON lines
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f"{where}: line {e.lineno} is not valid JSON ({e.msg}).") from None
    for i, row in enumerate(rows):
      if not isinstance(row, dict):
        raise UserError(f"{where}: row {i + 1} is {json_kind(row)}, not a JSON object.")
    if not rows:
      raise UserError(f"{where}: the file is empty, it has no rows.")
    return Rows(rows)
  rows, names = [], []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(
        f"{where}: line {number} is not valid JSON ({e.msg} at column {e.colno})."
      ) from None
    if not isinstance(row, dict):
      raise UserError(f"{where}: line {number} is {json_kind(row)}, not a JSON object.")
    rows.append(row)
    names.append(f"line {number}")
  if not rows:
    raise UserError(f"{where}: the file is empty, it has no rows.")
  return Rows(rows, names)


def _load_local(load_dataset, directory: str, where: str):
  try:
    return load_dataset(directory)
  except Exception as e:  # no data files, mixed formats, ...
    raise UserError(
      f"{where}: could not read the directory as a dataset ({first_line(e)}); it "
      f"should hold {'/'.join(LOCAL_EXTENSIONS)} files, optionally in a dataset repo layout."
    ) from e


def _pick_split(splits, split: str | None, default: str, where: str):
  """The named split; without a name, `default` or, if the data has only one split, that one."""
  names = sorted(splits)
  if split is not None and split not in splits:
    raise UserError(f"{where}: there is no split {split!r}; the data has splits {names}.")
  if split is None:
    if default in splits:
      split = default
    elif len(names) == 1:
      split = names[0]
    else:
      raise UserError(
        f"{where}: the data has splits {names} and none is {default!r}; name one with "
        f"':{names[0]}' after the path."
      )
  return splits[split]


def _load_hub(load_dataset, name: str, split: str, where: str):
  try:
    return load_dataset(name, split=split)
  except Exception as e:  # offline / unknown name / unknown split: all end up here
    raise UserError(
      f"{where}: could not load it as a hub dataset (split {split!r}): {first_line(e)}. A local "
      f"file must end in {'/'.join(LOCAL_EXTENSIONS)}; hub datasets need "
      "network access or a warm HF datasets cache."
    ) from e


def content_fingerprint(spec) -> str:
  """What a data spec holds, in a line: a local file's size and sha256, a directory's files',
  or a hub dataset's cached revision. A resumed run compares it with the one it started with."""
  if not isinstance(spec, str) or not spec:
    return repr(spec)
  source, split = parse_spec(spec)
  path = Path(source)
  if path.is_file():
    return f"{path.stat().st_size:,d} bytes, sha256 {_sha256([path])}"
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    size = sum(p.stat().st_size for p in files)
    return f"{len(files)} files, {size:,d} bytes, sha256 {_sha256(files, root=path)}"
  refs = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface" / "hub"))
  ref = refs / f"datasets--{source.replace('/', '--')}" / "refs" / "main"
  revision = ref.read_text().strip() if ref.is_file() else "revision unknown (not cached)"
  return f"hub dataset {source}{f':{split}' if split else ''} at {revision}"


def _sha256(files, root: Path | None = None) -> str:
  digest = hashlib.sha256()
  for file in files:
    if root is not None:
      digest.update(str(file.relative_to(root)).encode() + b"\0")
    with open(file, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()[:16]


def detect_format(rows: Sequence[dict], source: str = "dataset") -> str:
  """One of FORMATS, decided from the columns of the dataset (union over rows)."""
  if not rows:
    raise UserError(f"{source}: no rows")
  columns: set[str] = set()
  for row in rows:
    columns.update(k for k, v in row.items() if v is not None)
  if "messages" in columns:
    return "messages"
  if "conversations" in columns:
    return "sharegpt"
  if "instruction" in columns:
    return "alpaca"
  if "prompt" in columns or "completion" in columns:
    return "prompt_completion"
  if "text" in columns:
    return "text"
  raise UserError(f"{source}: unknown row format, columns {sorted(columns)}; {FORMAT_HELP}")


def _missing(row: dict, key: str) -> bool:
  # Loading through arrow fills absent keys with None, so None means missing too.
  return row.get(key) is None


def _require(row: dict, keys: Sequence[str], index: int, source: str, lists_ok=False) -> None:
  for key in keys:
    if _missing(row, key):
      present = sorted(k for k in row if row[k] is not None)
      raise UserError(f"{source}: {_label(index)} is missing field {key!r} (row keys: {present})")
    if not isinstance(row[key], str) and not (lists_ok and isinstance(row[key], list)):
      what = "a string or a list of messages" if lists_ok else "a string"
      raise UserError(
        f"{source}: {_label(index)} field {key!r} must be {what}, got {type(row[key]).__name__}"
      )


def row_to_prompt_completion(
  row: dict, fmt: str, index: int, source: str = "dataset"
) -> tuple[str, str]:
  """(prompt, completion) of an alpaca or plain-string prompt/completion row."""
  if fmt == "alpaca":
    _require(row, ("instruction", "output"), index, source)
    prompt = row["instruction"]
    extra = row.get("input")
    if extra:
      prompt = f"{prompt}\n\n{extra}"
    return prompt, row["output"]
  if fmt == "prompt_completion":
    _require(row, ("prompt", "completion"), index, source)
    return row["prompt"], row["completion"]
  raise ValueError(f"row_to_prompt_completion: format {fmt!r} is not alpaca or prompt_completion")


# Keys a message may carry besides role and content (OpenAI's tool calling).
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name")


def _check_messages(messages, index, source: str, field: str) -> list[dict]:
  """The messages, each checked: a known role, string content (an assistant turn that only calls
  tools may have none), tool calls as a list of objects. Strings are kept as strings, even ones
  that look like JSON."""
  if not isinstance(messages, list) or not messages:
    raise UserError(
      f"{source}: {_label(index)} field {field!r} must be a non-empty list, got {messages!r}"
    )
  out = []
  for j, m in enumerate(messages):
    where = f"{source}: {_label(index)} field '{field}[{j}]"
    if not isinstance(m, dict):
      raise UserError(f"{where}' must be an object with 'role' and 'content', got {m!r}")
    if m.get("role") is None:
      raise UserError(f"{source}: {_label(index)} is missing field '{field}[{j}].role'")
    if m["role"] not in ROLES:
      raise UserError(f"{where}.role' is {m['role']!r}; expected one of {', '.join(ROLES)}.")
    calls = m.get("tool_calls")
    if calls is not None and (
      m["role"] != "assistant"
      or not isinstance(calls, list)
      or not all(isinstance(c, dict) for c in calls)
    ):
      raise UserError(
        f"{where}.tool_calls' must be a list of objects on an assistant message, got {calls!r}"
      )
    content = m.get("content")
    if content is None and not calls:
      raise UserError(f"{source}: {_label(index)} is missing field '{field}[{j}].content'")
    if content is not None and not isinstance(content, str):
      raise UserError(
        f"{where}.content' must be a string, got {type(content).__name__} {content!r:.60}"
      )
    message = {"role": m["role"], "content": content if content is not None else ""}
    message.update((k, m[k]) for k in MESSAGE_EXTRAS if m.get(k) is not None)
    out.append(message)
  return out


def sharegpt_messages(row: dict, index, source: str) -> list[dict]:
  """ShareGPT's {'conversations': [{'from': 'human'|'gpt'|'system'|'tool', 'value'}]} as chat
  messages."""
  turns = row.get("conversations")
  if not isinstance(turns, list) or not turns:
    raise UserError(
      f"{source}: {_label(index)} field 'conversations' must be a non-empty list, got {turns!r}"
    )
  messages = []
  for j, turn in enumerate(turns):
    speaker = turn.get("from") if isinstance(turn, dict) else None
    if speaker not in SHAREGPT_ROLES:
      raise UserError(
        f"{source}: {_label(index)} field 'conversations[{j}].from' is {speaker!r}; expected one "
        f"of {', '.join(SHAREGPT_ROLES)}."
      )
    messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
  return _check_messages(messages, index, source, "conversations")


def row_to_messages(row: dict, fmt: str, index: int, source: str = "dataset") -> list[dict]:
  """Chat messages of a row: alpaca and prompt/completion become user + assistant turns; a
  prompt/completion row may also hold message lists (TRL's conversational form)."""
  if fmt == "messages":
    if row.get("messages") is None:
      raise UserError(f"{source}: {_label(index)} is missing field 'messages'")
    out = _check_messages(row["messages"], index, source, "messages")
  elif fmt == "sharegpt":
    out = sharegpt_messages(row, index, source)
  elif fmt == "prompt_completion" and isinstance(row.get("prompt"), list):
    _require(row, ("prompt", "completion"), index, source, lists_ok=True)
    completion = row["completion"]
    if isinstance(completion, str):
      completion = [{"role": "assistant", "content": completion}]
    out = _check_messages(row["prompt"], index, source, "prompt")
    out += _check_messages(completion, index, source, "completion")
  else:
    prompt, completion = row_to_prompt_completion(row, fmt, index, source)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
  if not any(m["role"] == "assistant" for m in out):
    raise UserError(
      f"{source}: {_label(index)} has no message with role 'assistant', so nothing to train on"
    )
  return out


def has_empty_completion(row: dict, fmt: str, index: int, source: str = "dataset") -> bool:
  """True if nothing in the row is to be learned: every answer (or the text) is blank."""
  if fmt == "text":
    _require(row, ("text",), index, source)
    return not row["text"].strip()
  messages = row_to_messages(row, fmt, index, source)
  answers = [m["content"] for m in messages if m["role"] == "assistant"]
  return all(not str(a).strip() for a in answers)


# ----------------------------------------------------------------------------
# Rendering and tokenization


def render_chat(tokenizer, messages, add_generation_prompt: bool) -> str:
  """The chat template's text. A template without a system role (Gemma 2's raises on one) gets
  the system message as the start of the first user turn, as Gemma 3's own template puts it."""
  from jinja2.exceptions import TemplateError

  try:
    return tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
  except TemplateError:
    if not messages or messages[0]["role"] != "system":
      raise
    return render_chat(tokenizer, fold_system(messages), add_generation_prompt)


def fold_system(messages: list[dict]) -> list[dict]:
  """[system, user, ...] -> [user (system + blank line + user), ...]."""
  system, *rest = messages
  if not rest or rest[0]["role"] != "user":
    return [{"role": "user", "content": system["content"]}, *rest]
  first = {**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}
  return [first, *rest[1:]]


def chat_pieces(
  tokenizer, messages: list[dict], index: int = 0, source: str = "dataset"
) -> list[tuple[str, bool]]:
  """Split the rendered conversation into (text, is_completion) pieces.

  An assistant turn's completion is the text between the conversation rendered
  up to it with add_generation_prompt=True and the conversation rendered
  through it, minus trailing whitespace (so "...<|im_end|>" is learned but
  the newline the template puts after it is not). This relies on the template
  rendering prefixes as prefixes; templates that rewrite history (e.g. drop
  earlier reasoning) break that for earlier turns, which we then leave
  unsupervised. Only the last assistant turn must satisfy it.
  """
  full = render_chat(tokenizer, messages, False)
  spans = []
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prefix = render_chat(tokenizer, messages[:i], True)
    through = render_chat(tokenizer, messages[: i + 1], False).rstrip()
    ok = through.startswith(prefix) and full.startswith(through) and len(through) > len(prefix)
    if not ok:
      if i == last:
        raise UserError(
          f"{source}: {_label(index)}: the chat template does not render the conversation "
          f"prefix (with add_generation_prompt=True) as a prefix of the full conversation, "
          f"so the assistant answer cannot be located"
        )
      continue
    if spans and len(prefix) < spans[-1][1]:  # overlapping spans would double-label tokens
      continue
    spans.append((len(prefix), len(through)))
  pieces, pos = [], 0
  for start, end in spans:
    pieces += [(full[pos:start], False), (full[start:end], True)]
    pos = end
  pieces.append((full[pos:], False))
  return [p for p in pieces if p[0]]


def uses_tools(messages: list[dict]) -> bool:
  return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def check_template_takes(tokenizer, messages: list[dict], index, source: str) -> None:
  """Tool calls and tool turns need a chat template that renders them (one that reads
  `tool_calls`); others would drop or garble them, so such rows are refused."""
  template = getattr(tokenizer, "chat_template", None) or ""
  if uses_tools(messages) and "tool_calls" not in str(template):
    raise UserError(
      f"{source}: {_label(index)} holds tool calls or 'tool' turns, but this model's chat template "
      "does not render tool calls; use a model whose template supports tools, or drop those turns."
    )


@contextlib.contextmanager
def template_errors(index, source: str):
  """A chat template that raises on a conversation (e.g. roles out of order): its own message,
  with the row."""
  from jinja2.exceptions import TemplateError

  try:
    yield
  except TemplateError as e:
    raise UserError(
      f"{source}: {_label(index)}: the chat template rejects this conversation: {e}"
    ) from None


def _has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def encode_row(
  tokenizer,
  row: dict,
  fmt: str,
  *,
  use_chat_template: bool = True,
  index: int = 0,
  source: str = "dataset",
) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, is_completion) for one row, untruncated.

  Pieces are encoded separately and concatenated so the completion boundary
  is exact; with ChatML-like templates the boundaries sit next to special
  tokens, where encoding the whole string would split the same way.
  A `text` row is never templated and is all completion: continued pre-training.
  """
  if fmt == "text":
    ids = tokenizer.encode(row["text"], add_special_tokens=True) + _eos(tokenizer, source)
    return np.asarray(ids, np.int32), np.ones(len(ids), bool)
  if use_chat_template and _has_chat_template(tokenizer):
    ids, completion = [], []
    messages = row_to_messages(row, fmt, index, source)
    check_template_takes(tokenizer, messages, index, source)
    with template_errors(index, source):
      pieces = chat_pieces(tokenizer, messages, index, source)
    for text, is_completion in pieces:
      piece = tokenizer.encode(text, add_special_tokens=False)
      ids += piece
      completion += [is_completion] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(completion, bool)
  if fmt in ("messages", "sharegpt") or isinstance(row.get("prompt"), list):
    why = "use_chat_template is False" if not use_chat_template else "the tokenizer has none"
    raise UserError(
      f"{source}: {_label(index)}: chat messages need a chat template, but {why}; set "
      "config.data.use_chat_template=True with a tokenizer that has one, or use string "
      "prompt/completion, alpaca or text rows."
    )
  prompt, answer = row_to_prompt_completion(row, fmt, index, source)
  if fmt == "alpaca":
    prompt += "\n\n"
  # add_special_tokens on the prompt lets tokenizers that want a BOS (Llama) add it.
  p = tokenizer.encode(prompt, add_special_tokens=True)
  a = tokenizer.encode(answer, add_special_tokens=False) + _eos(tokenizer, source)
  return np.asarray(p + a, np.int32), np.asarray([False] * len(p) + [True] * len(a), bool)


def _eos(tokenizer, source: str) -> list[int]:
  if tokenizer.eos_token_id is None:
    raise UserError(
      f"{source}: plain (no chat template) formatting appends eos, but the tokenizer has no "
      "eos_token."
    )
  return [tokenizer.eos_token_id]


def tokenize_rows(
  rows: Sequence[dict],
  tokenizer,
  *,
  max_length: int,
  use_chat_template: bool = True,
  train_on_prompt: bool = False,
  source: str = "dataset",
  fmt: str | None = None,
) -> tuple[list[dict], dict]:
  """Examples {'input_ids', 'targets', 'loss_mask'} (1-D int32, length <= max_length) and stats.

  A row whose answer is empty is dropped (counted in 'skipped_empty_completion'):
  it has nothing to learn. A row of more than max_length + 1 tokens is cut at the
  end (counted in 'truncated'); one whose cut leaves no completion token to predict
  is dropped (counted in 'skipped_prompt_too_long'), not an error, so one long
  prompt cannot stop a run.
  """
  if not isinstance(max_length, (int, np.integer)) or max_length < 2:
    raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
  fmt = fmt or detect_format(rows, source)
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; {FORMAT_HELP}")
  examples = []
  stats = dict(rows=len(rows), examples=0, truncated=0, skipped_prompt_too_long=0)
  stats.update(skipped_empty_completion=0, tokens=0, label_tokens=0)
  for i, row in enumerate(rows):
    name = row_name(rows, i)
    if has_empty_completion(row, fmt, name, source):
      stats["skipped_empty_completion"] += 1
      continue
    ids, is_completion = encode_row(
      tokenizer, row, fmt, use_chat_template=use_chat_template, index=name, source=source
    )
    if len(ids) > max_length + 1:
      stats["truncated"] += 1
      ids, is_completion = ids[: max_length + 1], is_completion[: max_length + 1]
    if not is_completion[1:].any():
      stats["skipped_prompt_too_long"] += 1
      continue
    mask = np.ones(len(ids) - 1, bool) if train_on_prompt else is_completion[1:]
    examples.append(dict(input_ids=ids[:-1], targets=ids[1:], loss_mask=mask.astype(np.int32)))
    stats["examples"] += 1
    stats["tokens"] += len(ids) - 1
    stats["label_tokens"] += int(mask.sum())
  return examples, stats


# ----------------------------------------------------------------------------
# Packing and padding


def _empty(n_rows: int, max_length: int) -> dict[str, np.ndarray]:
  return {k: np.zeros((n_rows, max_length), np.int32) for k in BATCH_KEYS}


def pad_examples(examples: Sequence[dict], max_length: int) -> dict[str, np.ndarray]:
  """One example per row, right-padded; segment_ids 1 on tokens, 0 on padding."""
  out = _empty(len(examples), max_length)
  for r, ex in enumerate(examples):
    _place(out, r, 0, 1, ex, max_length)
  return out


def _place(out, row, start, segment, ex, max_length):
  n = len(ex["input_ids"])
  if n > max_length:
    raise ValueError(
      f"example of {n} positions does not fit max_length={max_length}; tokenize with the same max_length"
    )
  sl = slice(start, start + n)
  out["input_ids"][row, sl] = ex["input_ids"]
  out["targets"][row, sl] = ex["targets"]
  out["loss_mask"][row, sl] = ex["loss_mask"]
  out["segment_ids"][row, sl] = segment
  out["positions"][row, sl] = np.arange(n)


def pack_examples(
  examples: Sequence[dict], max_length: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """Greedy first-fit packing of whole examples into rows of max_length.

  Examples are visited in a seeded random order so the same file neighbours
  do not always share a row. Packing happens once; epochs shuffle rows.
  """
  order = np.random.default_rng(seed).permutation(len(examples))
  free = np.zeros(0, np.int64)  # free positions per open row
  placement = []  # (row, start, segment) per visited example
  segments = []
  for k in order:
    n = len(examples[k]["input_ids"])
    if n > max_length:
      raise ValueError(
        f"example {k} has {n} positions > max_length={max_length}; tokenize with the same max_length"
      )
    fits = np.flatnonzero(free >= n)
    if len(fits):
      row = int(fits[0])
    else:
      row = len(free)
      free = np.append(free, max_length)
      segments.append(0)
    segments[row] += 1
    placement.append((k, row, max_length - int(free[row]), segments[row]))
    free[row] -= n
  out = _empty(len(free), max_length)
  for k, row, start, segment in placement:
    _place(out, row, start, segment, examples[k], max_length)
  return out


def prepare_spec(
  spec: str,
  tokenizer,
  *,
  max_length: int,
  field: str = "config.data.train",
  split_name: str = "train",
  pack: bool = True,
  use_chat_template: bool = True,
  train_on_prompt: bool = False,
  seed: int = 0,
  rows: Sequence[dict] | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
  """load_rows + tokenize_rows + pack/pad: row arrays [rows, max_length] and stats.

  `rows`: the rows of `spec` when the caller has already loaded them (they are not read again).
  """
  if rows is None:
    rows = load_rows(spec, split_name, field)
  examples, stats = tokenize_rows(
    rows,
    tokenizer,
    max_length=max_length,
    use_chat_template=use_chat_template,
    train_on_prompt=train_on_prompt,
    source=f"{field} = {spec!r}",
  )
  if not examples:
    raise UserError(
      f"{field} = {spec!r}: all {stats['rows']} rows were skipped: "
      f"{stats['skipped_empty_completion']} have an empty completion and "
      f"{stats['skipped_prompt_too_long']} a prompt that fills max_length={max_length} "
      "(raise config.data.max_length)."
    )
  arrays = pack_examples(examples, max_length, seed) if pack else pad_examples(examples, max_length)
  stats["packed_rows"] = len(arrays["input_ids"])
  return arrays, stats


# ----------------------------------------------------------------------------
# Batching


class TrainIterator:
  """Infinite shuffled batches over row arrays, resumable from state().

  Epoch e visits the rows in the order permutation(default_rng([seed, e])).
  Batches read that stream continuously, so a batch may straddle two epochs;
  this keeps every batch full (static shapes) and every row seen once per
  epoch. state() = {'epoch', 'index'} is the next read position.
  """

  def __init__(
    self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0, state: dict | None = None
  ):
    n = len(arrays["input_ids"])
    if n == 0:
      raise ValueError("TrainIterator: no rows to batch")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    self.arrays = arrays
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.n = n
    self.epoch, self.index = 0, 0
    self._perm_epoch, self._perm = None, None
    if state is not None:
      self.restore(state)

  def _order(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
      self._perm_epoch = epoch
    return self._perm

  def state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "index": int(self.index)}

  def restore(self, state: dict) -> None:
    epoch, index = state.get("epoch"), state.get("index")
    if (
      not all(isinstance(v, (int, np.integer)) for v in (epoch, index))
      or epoch < 0
      or not 0 <= index < self.n
    ):
      raise UserError(
        f"data iterator state must be {{'epoch': int >= 0, 'index': 0..{self.n - 1}}}, got {state!r}"
      )
    self.epoch, self.index = int(epoch), int(index)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return take_rows(self.arrays, self.next_ids())

  def next_ids(self) -> np.ndarray:
    """The row indices of the next batch, without materialising it (a process takes its share)."""
    picks = []
    need = self.batch_size
    while need:
      order = self._order(self.epoch)
      take = order[self.index : self.index + need]
      picks.append(take)
      need -= len(take)
      self.index += len(take)
      if self.index == self.n:
        self.epoch, self.index = self.epoch + 1, 0
    return np.concatenate(picks)


def take_rows(arrays: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
  """The rows `ids` of every array in `arrays` (BATCH_KEYS and any other, e.g. a pair axis or
  reference log-probs); an id of -1 is an all-zero padding row."""
  ids = np.asarray(ids)
  real = ids >= 0
  picked = lambda a: a[np.where(real, ids, 0)]
  return {
    k: np.where(real.reshape(-1, *[1] * (a.ndim - 1)), picked(a), 0) for k, a in arrays.items()
  }


def eval_batch_ids(n_rows: int, batch_size: int) -> Iterator[np.ndarray]:
  """eval_batches' row ids: one pass in order, the last batch padded with -1 (weight 0)."""
  for start in range(0, n_rows, batch_size):
    ids = np.full(batch_size, -1, np.int64)
    stop = min(start + batch_size, n_rows)
    ids[: stop - start] = np.arange(start, stop)
    yield ids


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """One pass in file/pack order; the last batch is padded with all-zero rows of weight 0."""
  for ids in eval_batch_ids(len(arrays["input_ids"]), batch_size):
    yield {**take_rows(arrays, ids), "weight": (ids >= 0).astype(np.int32)}


# ----------------------------------------------------------------------------
# Generation-time evaluation


def prompts_and_references(
  rows: Sequence[dict], tokenizer, *, use_chat_template: bool = True, source: str = "dataset"
) -> list[dict]:
  """Per row {'prompt_ids': list[int], 'reference': str} for generate-then-score eval.

  The prompt is everything before the last assistant answer, rendered the way
  training renders it (with the generation prompt), so the model continues
  exactly where it was trained to. A `text` row is split in half by tokens: the
  model continues the first half, the second half is the reference.
  """
  fmt = detect_format(rows, source)
  chat = use_chat_template and _has_chat_template(tokenizer)
  out = []
  for n, row in enumerate(rows):
    i = row_name(rows, n)  # errors name the row as the file numbers it
    if fmt == "text":
      _require(row, ("text",), i, source)
      ids = tokenizer.encode(row["text"], add_special_tokens=True)
      cut = max(1, len(ids) // 2)
      reference = tokenizer.decode(ids[cut:], skip_special_tokens=True)
      out.append({"prompt_ids": list(ids[:cut]), "reference": reference})
      continue
    messages = row_to_messages(row, fmt, i, source)
    last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
    if chat:
      with template_errors(i, source):
        text = render_chat(tokenizer, messages[:last], True)
      ids = tokenizer.encode(text, add_special_tokens=False)
    else:
      prompt, _ = row_to_prompt_completion(row, fmt, i, source)
      ids = tokenizer.encode(prompt + ("\n\n" if fmt == "alpaca" else ""), add_special_tokens=True)
    out.append({"prompt_ids": list(ids), "reference": messages[last]["content"]})
  return out

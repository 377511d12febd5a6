"""Evaluation during training: eval loss and perplexity always, task metrics when asked.

Loss and perplexity need nothing from the task, so every run reports them, and shows a few
greedy generations before and after training. `config.eval.metrics` (a comma list) adds
task metrics scored on those generations:
  exact_match  the answer equals the reference (as JSON values when the reference is JSON)
  json_fields  the share of the reference JSON object's fields the answer gets right
A metric that can't be scored on a row (json_fields on a plain-text reference) counts the row
as a miss and warns once; it never stops training.
"""

from __future__ import annotations

import json
import math
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

import jlora
from jlora.sharding import BATCH_AXES
from train import data as data_lib
from train import distributed
from train import step as step_lib
from train.errors import UserError
from train.generate import generate_ids


class Unscorable(ValueError):
  """The metric does not apply to this row (e.g. json_fields on a reference that is not JSON)."""


def _json_value(text: str):
  """The one JSON value `text` holds (surrounding whitespace allowed), or raise ValueError."""
  text = text.strip() if isinstance(text, str) else ""
  value, end = json.JSONDecoder().raw_decode(text)
  if text[end:].strip():
    raise ValueError("trailing text after the JSON value")
  return value


def exact_match(prediction: str, reference: str) -> float:
  """1.0 iff the answer equals the reference: as JSON values when the reference is JSON (key
  order and whitespace don't matter, types do: 34 != "34"), else as text after stripping."""
  try:
    expected = _json_value(reference)
  except ValueError:
    return float(prediction.strip() == reference.strip())
  try:
    return float(_json_value(prediction) == expected)
  except ValueError:
    return 0.0


def json_fields(prediction: str, reference: str) -> float:
  """The share of the reference object's top-level fields whose value the answer matches."""
  try:
    expected = _json_value(reference)
  except ValueError:
    expected = None
  if not isinstance(expected, dict) or not expected:
    raise Unscorable(f"the reference is not a non-empty JSON object: {reference[:60]!r}")
  try:
    got = _json_value(prediction)
  except ValueError:
    return 0.0
  if not isinstance(got, dict):
    return 0.0
  return sum(k in got and got[k] == v for k, v in expected.items()) / len(expected)


METRICS = {"exact_match": exact_match, "json_fields": json_fields}


def metric_names(value) -> list[str]:
  """config.eval.metrics as a list: 'exact_match,json_fields', a list of names, or ''."""
  if isinstance(value, str):
    return [m.strip() for m in value.split(",") if m.strip()]
  return list(value or ())


def check_metrics(value) -> None:
  names = metric_names(value) if isinstance(value, (str, list, tuple)) or value is None else None
  if names is None or any(n not in METRICS for n in names):
    raise UserError(
      f"config.eval.metrics: {value!r} is not valid; expected a comma list of "
      f"{', '.join(METRICS)} (or '' for loss and perplexity only)."
    )


def score(metric: str, predictions, references, warn=None) -> float:
  """Mean of `metric` over rows; a row it can't score is a miss, reported once through `warn`."""
  fn, total, warned = METRICS[metric], 0.0, False
  for i, (prediction, reference) in enumerate(zip(predictions, references)):
    try:
      total += fn(prediction, reference)
    except Unscorable as e:
      if not warned and warn is not None:
        warn(f"{metric} can't score eval row {i} ({e}); such rows count as misses.")
      warned = True
  return total / len(references) if references else 0.0


def perplexity(loss: float) -> float:
  return math.exp(loss) if loss < 700 else math.inf


def put_batch(arrays: dict, ids, budget: int, mesh, weighted: bool = False) -> dict:
  """The global batch of rows `ids` (-1: padding of weight 0), sharded over (data, fsdp).

  Each process builds only the rows its own devices hold (see train/distributed.py).
  """

  def rows_of(local_ids):
    batch = step_lib.gather_labels(data_lib.take_rows(arrays, local_ids), budget)
    return {**batch, "weight": (local_ids >= 0).astype(np.int32)} if weighted else batch

  return distributed.put_rows(rows_of, ids, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))


def _warn_once(warned: set, message: str) -> None:
  if message not in warned:
    warned.add(message)
    tqdm.write(f"warning: {message}", file=sys.stderr)


class Evaluator:
  """Eval loss over the eval split, greedy generations, and the configured metrics."""

  def __init__(self, config, model, tokenizer, mesh):
    self.config, self.model, self.tokenizer, self.mesh = config, model, tokenizer, mesh
    self.metrics = metric_names(config.eval.metrics)
    rows = data_lib.load_rows(config.data.eval, "validation", field="config.data.eval")
    self.arrays, self.stats = data_lib.prepare_spec(
      config.data.eval,
      tokenizer,
      max_length=config.data.max_length,
      field="config.data.eval",
      split_name="validation",
      pack=config.data.pack,
      use_chat_template=config.data.use_chat_template,
      train_on_prompt=config.data.train_on_prompt,
      seed=config.seed,
      rows=rows,
    )
    self.budget = step_lib.label_budget(self.arrays["loss_mask"])
    if config.eval_examples:
      rows = rows[: config.eval_examples]
    self.examples = data_lib.prompts_and_references(
      rows, tokenizer, use_chat_template=config.data.use_chat_template
    )
    self.loss_fn = jax.jit(step_lib.make_eval_step(model))
    self.apply_fn = jlora.wrap(model.apply)
    self._warned: set[str] = set()

  def loss(self, trainable, frozen) -> float:
    total = count = 0.0
    n_rows = len(self.arrays["input_ids"])
    for ids in data_lib.eval_batch_ids(n_rows, self.config.data.eval_batch_size):
      batch = put_batch(self.arrays, ids, self.budget, self.mesh, weighted=True)
      value, n = self.loss_fn(trainable, frozen, batch)
      total, count = total + float(value), count + float(n)
    return total / max(count, 1.0)

  def generations(self, trainable, frozen) -> list[str]:
    eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
    prompts = [e["prompt_ids"] for e in self.examples]
    # The prompts are split over the data-parallel devices (of every process): pad to a multiple.
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    padded = prompts + prompts[:1] * (-len(prompts) % shards)
    sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
    outputs = generate_ids(
      self.model,
      jlora.combine(trainable, frozen),
      padded,
      self.config.max_new_tokens,
      eos_ids=eos,
      apply_fn=self.apply_fn,
      place=lambda x: distributed.put_array(x, sharding),
    )[: len(prompts)]
    return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]

  def evaluate(self, trainable, frozen, eval_loss: float | None = None) -> dict:
    """{'eval_loss', 'perplexity', one entry per metric, 'samples'}."""
    if eval_loss is None:
      eval_loss = self.loss(trainable, frozen)
    result = {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}
    needed = self.metrics or self.config.samples
    texts = self.generations(trainable, frozen) if needed else []
    references = [e["reference"] for e in self.examples]
    for name in self.metrics:
      result[name] = score(name, texts, references, lambda m: _warn_once(self._warned, m))
    result["samples"] = texts[: self.config.samples]
    return result

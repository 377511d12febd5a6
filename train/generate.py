"""Text generation with the KV cache: one jitted prefill, then one jitted step per token.

Library use::

    model, params, tokenizer = jlora.models.from_pretrained("smollm2-135m-instruct")
    print(generate(model, params, tokenizer, ["What is the capital of France?"], max_new_tokens=32))

`apply_fn` may replace `model.apply`, e.g. `jlora.wrap(model.apply)` with params holding LoRA nodes.

CLI::

    python -m train.generate --model smollm2-135m-instruct --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.llama import LlamaForCausalLM, init_cache
from train.errors import UserError, exit_on_user_error, verbose_requested

# Prompts are padded up to a multiple of this, so prompts of similar length share one compiled prefill.
PROMPT_BUCKET = 16


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """logits [b, vocab] -> token ids [b]. Greedy when temperature == 0, else temperature + nucleus."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p.
    kept = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _decode_fns(apply_fn: Callable, temperature: float, top_p: float):
  """Jitted (prefill, step), cached so repeated generate calls (e.g. eval during training) reuse them."""

  def forward(params, ids, positions, segments, cache):
    last = jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)
    logits, cache = apply_fn(
      {"params": params}, ids, positions, segments, cache=cache, logits_at=last
    )
    return logits[:, -1], cache

  @jax.jit
  def prefill(params, ids, positions, segments, cache, key):
    logits, cache = forward(params, ids, positions, segments, cache)
    return sample_token(logits, key, temperature, top_p), cache

  @jax.jit
  def step(params, token, position, cache, key):
    logits, cache = forward(
      params, token[:, None], position[:, None], jnp.ones_like(token)[:, None], cache
    )
    return sample_token(logits, key, temperature, top_p), cache

  return prefill, step


def generate_ids(
  model: LlamaForCausalLM,
  params,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  eos_ids: Sequence[int] = (),
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  apply_fn: Callable | None = None,
) -> list[list[int]]:
  """Generate from token-id prompts; returns the new ids per prompt, cut after the first eos."""
  apply_fn = apply_fn or model.apply
  batch = len(prompts)
  prompt_len = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
  # Left-pad so every row's last prompt token sits at the same slot and decoding writes one column.
  ids = np.zeros((batch, prompt_len), np.int32)
  segments = np.zeros((batch, prompt_len), np.int32)
  for row, p in enumerate(prompts):
    ids[row, prompt_len - len(p) :] = p
    segments[row, prompt_len - len(p) :] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  cache = init_cache(model.config, batch, prompt_len + max_new_tokens)

  prefill, step = _decode_fns(apply_fn, float(temperature), float(top_p))
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  token, cache = prefill(params, ids, positions, segments, cache, keys[0])
  position = jnp.asarray(positions[:, -1] + 1)
  eos = np.asarray(list(eos_ids), np.int32)
  out = [np.asarray(token)]
  done = np.isin(out[-1], eos)
  for i in range(1, max_new_tokens):
    if done.all():
      break
    token, cache = step(params, token, position, cache, keys[i])
    position = position + 1
    out.append(np.asarray(token))
    done |= np.isin(out[-1], eos)

  tokens = np.stack(out, axis=1)
  eos_set = set(eos_ids)
  results = []
  for row in tokens.tolist():
    stop = next((i for i, t in enumerate(row) if t in eos_set), None)
    results.append(row if stop is None else row[: stop + 1])
  return results


def chat_prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
  messages = ([{"role": "system", "content": system}] if system else []) + [
    {"role": "user", "content": prompt}
  ]
  encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  # transformers 5 returns a BatchEncoding here; 4.x returned the id list.
  return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def generate(
  model: LlamaForCausalLM,
  params,
  tokenizer,
  prompts: Sequence[str],
  max_new_tokens: int = 128,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  apply_fn: Callable | None = None,
  system: str | None = None,
) -> list[str]:
  """Chat-format each prompt as a user turn (after an optional system message); return the replies."""
  eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  new_ids = generate_ids(
    model,
    params,
    [chat_prompt_ids(tokenizer, p, system) for p in prompts],
    max_new_tokens,
    eos_ids=eos_ids,
    temperature=temperature,
    top_p=top_p,
    seed=seed,
    apply_fn=apply_fn,
  )
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


class _OneLineParser(argparse.ArgumentParser):
  """argparse, but a usage error is one `error: ...` line and exit 2, like every other user error."""

  def error(self, message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  from jlora.models import DEFAULT_MODEL

  parser = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  add("--model", default=DEFAULT_MODEL, help="HF dir, .gguf file, hub id or embedded name")
  add("--adapter", help="PEFT adapter dir (adapter_config.json + adapter_model.safetensors)")
  add("--merged", action="store_true", help="merge the adapter into the base before generating")
  add("--prompt", action="append", required=True, help="user message; repeat for a batch")
  add("--system", help="system message placed before each prompt")
  add("--max_new_tokens", type=int, default=128, help="at least 1")
  add("--temperature", type=float, default=0.0, help="0 is greedy decoding; > 0 samples")
  add("--top_p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
  add("--seed", type=int, default=0)
  add("--verbose", action="store_true", help="show the full traceback of an error")
  return parser


def check_args(args: argparse.Namespace) -> None:
  """Every flag checked before the model loads; a bad one is a one-line `UserError`."""

  def bad(flag: str, value, expected: str) -> UserError:
    return UserError(f"{flag}: {value!r} is not valid; expected {expected}.")

  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise bad("--temperature", args.temperature, "a number >= 0 (0 is greedy decoding)")
  if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
    raise bad("--top_p", args.top_p, "a number in (0, 1]")
  if args.max_new_tokens < 1:
    raise bad("--max_new_tokens", args.max_new_tokens, "an integer >= 1")
  if args.merged and not args.adapter:
    raise UserError("--merged: it merges an adapter, so it needs --adapter DIR as well.")
  if args.adapter is not None:
    adapter = Path(args.adapter).expanduser()
    if not adapter.is_dir():
      state = "is a file, not a directory" if adapter.exists() else "does not exist"
      raise UserError(
        f"--adapter: {args.adapter!r} {state}; expected a PEFT adapter directory "
        "(adapter_config.json + adapter_model.safetensors)."
      )
    if not os.access(adapter, os.R_OK | os.X_OK):
      raise UserError(f"--adapter: {args.adapter!r} is not readable (permission denied).")


def main(argv: Sequence[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  with exit_on_user_error(verbose_requested(argv)):
    args = _parser().parse_args(argv)
    check_args(args)
    run(args)


def run(args: argparse.Namespace) -> None:
  import jlora
  from jlora.models import from_pretrained

  # from_pretrained boxes params with their axis names, so jlora knows the layer axis unaided.
  model, params, tokenizer = from_pretrained(args.model)
  context = model.config.max_position_embeddings
  if args.max_new_tokens > context:  # the KV cache is sized by it: a huge value exhausts memory
    raise UserError(
      f"--max_new_tokens: {args.max_new_tokens} is not valid; expected at most the model's "
      f"context length, {context}."
    )
  apply_fn = None
  if args.adapter:
    try:
      params = jlora.load_adapter(args.adapter, params)
    except ValueError as e:  # load_adapter raises ValueError only for an adapter it can't load
      raise UserError(f"--adapter {args.adapter}: {e}") from e
    if args.merged:
      params = jlora.merge(params)
    else:
      apply_fn = jlora.wrap(model.apply)

  replies = generate(
    model,
    params,
    tokenizer,
    args.prompt,
    args.max_new_tokens,
    args.temperature,
    args.top_p,
    args.seed,
    apply_fn,
    args.system,
  )
  for prompt, reply in zip(args.prompt, replies):
    if len(args.prompt) > 1:
      print(f"### {prompt}")
    print(reply)


if __name__ == "__main__":
  main()

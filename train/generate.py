"""Text generation with the KV cache: one jitted prefill, then one jitted step per token.

Library use::

    model, params, tokenizer = jlora.models.from_pretrained("smollm2-135m-instruct")
    print(generate(model, params, tokenizer, ["What is the capital of France?"], max_new_tokens=32))

`apply_fn` may replace `model.apply`, e.g. `jlora.wrap(model.apply)` with params holding LoRA nodes.

CLI::

    python -m train.generate --model smollm2-135m-instruct --prompt "What is the capital of France?"
    python -m train.generate --model DIR --nnx examples.nnx_llama:from_pretrained --prompt "..."

Several adapters on one base, one batch, one compiled program (every prompt runs under every
name in --use; 'base' is the model without adapters)::

    python -m train.generate --adapter extract=runs/a --adapter chat=runs/b \
        --prompt "..." --use extract,chat,base
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
from safetensors import SafetensorError

from jlora.models.nnx_causal import peft_names, weight_layout
from jlora.models.protocol import CausalLM
from train.distributed import to_host
from train.errors import OneLineParser, UserError, exit_on_user_error, naming, verbose_requested

# What reading a bad model or adapter path raises, reported under the flag that gave the path.
MODEL_ERRORS = (ValueError, KeyError, TypeError, OSError, SafetensorError)
# Prompts are padded up to a multiple of this, so prompts of similar length share one compiled prefill.
PROMPT_BUCKET = 16


def nucleus(logits: jax.Array, top_p) -> jax.Array:
  """logits [b, vocab] with every token outside the top_p nucleus set to -inf (top_p: scalar or [b, 1])."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p.
  kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """logits [b, vocab] -> token ids [b]. Greedy when temperature == 0, else temperature + nucleus."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    logits = nucleus(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def last_logits(apply_fn: Callable, params, ids, positions, segments, cache, adapter_ids):
  """(logits [b, vocab] of each row's last token, new cache): one prefill or decode step."""
  last = jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)
  # Per-row adapters (jlora.stack_adapters params) only; a plain apply_fn never sees the kwarg.
  rows = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
  logits, cache = apply_fn(
    {"params": params}, ids, positions, segments, cache=cache, logits_at=last, **rows
  )
  return logits[:, -1], cache


@functools.lru_cache(maxsize=16)
def _decode_fns(apply_fn: Callable, temperature: float, top_p: float):
  """Jitted (prefill, step), cached so repeated generate calls (e.g. eval during training) reuse them."""

  forward = functools.partial(last_logits, apply_fn)

  @jax.jit
  def prefill(params, ids, positions, segments, cache, key, adapter_ids):
    logits, cache = forward(params, ids, positions, segments, cache, adapter_ids)
    return sample_token(logits, key, temperature, top_p), cache

  @jax.jit
  def step(params, token, position, cache, key, adapter_ids):
    logits, cache = forward(
      params, token[:, None], position[:, None], jnp.ones_like(token)[:, None], cache, adapter_ids
    )
    return sample_token(logits, key, temperature, top_p), cache

  return prefill, step


def generate_ids(
  model: CausalLM,
  params,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  eos_ids: Sequence[int] = (),
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  apply_fn: Callable | None = None,
  adapter_ids=None,
  place: Callable[[np.ndarray], jax.Array] | None = None,
) -> list[list[int]]:
  """Generate from token-id prompts; returns the new ids per prompt, cut after the first eos.

  adapter_ids: with params from jlora.stack_adapters, the adapter of each row (-1: the base).
  place: puts a host [prompts, ...] array on the devices, e.g. split by rows over a mesh's data
  axes (`train.distributed.put_array`), so each device decodes only its own prompts.
  """
  place = place or (lambda x: x)
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
  cache = model.init_cache(batch, prompt_len + max_new_tokens)

  prefill, step = _decode_fns(apply_fn, float(temperature), float(top_p))
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  if adapter_ids is not None:
    adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
  token, cache = prefill(
    params, place(ids), place(positions), place(segments), cache, keys[0], adapter_ids
  )
  position = jnp.asarray(positions[:, -1] + 1)
  eos = np.asarray(list(eos_ids), np.int32)
  out = [to_host(token)]
  done = np.isin(out[-1], eos)
  for i in range(1, max_new_tokens):
    if done.all():
      break
    token, cache = step(params, token, position, cache, keys[i], adapter_ids)
    position = position + 1
    out.append(to_host(token))
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
  from train.data import render_chat  # folds the system turn where the template has none (Gemma 2)

  return tokenizer.encode(render_chat(tokenizer, messages, True), add_special_tokens=False)


def generate(
  model: CausalLM,
  params,
  tokenizer,
  prompts: Sequence[str],
  max_new_tokens: int = 128,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  apply_fn: Callable | None = None,
  system: str | None = None,
  adapters: Sequence[str | None] | None = None,
) -> list[str]:
  """Chat-format each prompt as a user turn (after an optional system message); return the replies.

  adapters: with params from jlora.stack_adapters, the adapter name of each prompt ('base' or
  None: no adapter); the whole batch runs as one program (apply_fn defaults to jlora.wrap).
  """
  adapter_ids = None
  if adapters is not None:
    import jlora  # only needed for per-row adapters

    if len(adapters) != len(prompts):
      raise ValueError(
        f"adapters has {len(adapters)} names for {len(prompts)} prompts; give one per prompt."
      )
    adapter_ids = jlora.adapter_ids(params, adapters)
    apply_fn = apply_fn or jlora.wrap(model.apply)
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
    adapter_ids=adapter_ids,
  )
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


def _parser() -> argparse.ArgumentParser:
  from jlora.models import DEFAULT_MODEL

  parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  add("--model", default=DEFAULT_MODEL, help="HF dir, .gguf file, hub id or embedded name")
  add(
    "--nnx",
    help="package.module:factory building an NNX model from --model (as train.sft's "
    "config.model.nnx): generate with it instead of jlora's own family",
  )
  add(
    "--adapter",
    action="append",
    help="PEFT adapter dir (adapter_config.json + adapter_model.safetensors); or NAME=DIR, "
    "repeated, for several adapters on one base (see --use)",
  )
  add(
    "--use",
    help="comma-separated adapter names ('base': no adapter); every prompt runs under each, "
    "all in one batch (default: every named adapter)",
  )
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
  args.named = named_adapters(args.adapter or [])
  if args.merged and args.named:
    raise UserError("--merged: it merges one adapter; give a single --adapter DIR.")
  if args.use and not args.named:
    raise UserError(f"--use: {args.use!r} needs adapters given as --adapter NAME=DIR.")
  for name in args.use.split(",") if args.use else []:
    if name != "base" and name not in args.named:
      raise bad("--use", args.use, f"comma-separated names from {list(args.named)} or 'base'")
  for directory in args.named.values() or args.adapter or []:
    _check_adapter_dir(directory)


def _check_adapter_dir(directory: str) -> None:
  adapter = Path(directory).expanduser()
  if not adapter.is_dir():
    state = "is a file, not a directory" if adapter.exists() else "does not exist"
    raise UserError(
      f"--adapter: {directory!r} {state}; expected a PEFT adapter directory "
      "(adapter_config.json + adapter_model.safetensors)."
    )
  if not os.access(adapter, os.R_OK | os.X_OK):
    raise UserError(f"--adapter: {directory!r} is not readable (permission denied).")


def named_adapters(values: Sequence[str]) -> dict[str, str]:
  """--adapter NAME=DIR values as {name: dir}; one plain DIR is the single-adapter form ({})."""
  if len(values) == 1 and "=" not in values[0]:
    return {}
  named = {}
  for value in values:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
      raise UserError(
        f"--adapter: {value!r} is not valid; expected NAME=DIR when several adapters are given."
      )
    if name in named or name == "base":
      why = "is reserved for the model without adapters" if name == "base" else "is given twice"
      raise UserError(f"--adapter: {value!r} is not valid; the name {name!r} {why}.")
    named[name] = directory
  return named


def main(argv: Sequence[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  with exit_on_user_error(verbose_requested(argv)):
    args = _parser().parse_args(argv)
    check_args(args)
    run(args)


def run(args: argparse.Namespace) -> None:
  import jlora
  from jlora.models import from_pretrained

  if args.nnx:  # an NNX model built by the user's factory, the same seam as train.sft's
    from train import nnx_model

    model, params, tokenizer = nnx_model.load(
      args.nnx, args.model, f"--nnx {args.nnx!r}", f"--model {args.model!r}"
    )
  else:
    # from_pretrained boxes params with their axis names, so jlora knows the layer axis unaided.
    with naming(f"--model {args.model!r}", MODEL_ERRORS):
      model, params, tokenizer = from_pretrained(args.model)
  # The cache is sized by max_new_tokens: a huge value exhausts memory (an NNX model without a
  # family declares no context length).
  context = getattr(model.config, "max_position_embeddings", math.inf)
  if args.max_new_tokens > context:
    raise UserError(
      f"--max_new_tokens: {args.max_new_tokens} is not valid; expected at most the model's "
      f"context length, {context}."
    )
  apply_fn, prompts, names = None, args.prompt, None
  if args.named:
    with naming("--adapter", MODEL_ERRORS):
      params = jlora.stack_adapters(
        args.named, params, model_config=peft_names(model), layout=weight_layout(model)
      )
    uses = args.use.split(",") if args.use else list(args.named)
    prompts = [prompt for prompt in args.prompt for _ in uses]
    names = [name for _ in args.prompt for name in uses]
  elif args.adapter:
    with naming(f"--adapter {args.adapter[0]!r}", MODEL_ERRORS):
      params = jlora.load_adapter(
        args.adapter[0], params, model_config=peft_names(model), layout=weight_layout(model)
      )
    if args.merged:
      params = jlora.merge(params)
    else:
      apply_fn = jlora.wrap(model.apply)

  replies = generate(
    model,
    params,
    tokenizer,
    prompts,
    args.max_new_tokens,
    args.temperature,
    args.top_p,
    args.seed,
    apply_fn,
    args.system,
    adapters=names,
  )
  for row, (prompt, reply) in enumerate(zip(prompts, replies)):
    if names is not None:
      print(f"### [{names[row]}] {prompt}")
    elif len(prompts) > 1:
      print(f"### {prompt}")
    print(reply)


if __name__ == "__main__":
  main()

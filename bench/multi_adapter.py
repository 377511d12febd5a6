"""Generation with several adapters on one base: one mixed batch against separate batches, and
against PEFT's mixed batch (adapter_names=), on the same model and machine (fp32, CPU or GPU).

    python -m bench.multi_adapter [--new-tokens 32] [--repeats 3] [--out bench/results/multi_adapter.json]
    python -m bench.multi_adapter --smoke      # a few tokens, to check that it runs

Model: the embedded SmolLM2-135M-Instruct (PEFT loads the HF dir that jlora's GGUF
conversion caches, so both start from the same weights). Four LoRA adapters on q,k,v,o
(ranks 8, 16, 8, 4; random non-zero B so each changes the output), written as PEFT dirs by
the jlora worker and read back by both sides. Eight chat prompts; row i uses adapter i // 2.

  jlora mixed:    jlora.stack_adapters + generate_ids(adapter_ids=...): 8 rows, one program.
  jlora separate: 4 batches of 2 rows, each with its own adapter's params.
  PEFT mixed:     PeftModel with the 4 adapters loaded, model.generate(adapter_names=[...]);
                  PEFT runs this as a Python loop over the sub-batch of each adapter.

Greedy decoding of exactly --new-tokens tokens per row (no stop token). Time: median over
--repeats timed runs after one untimed warm-up run (jlora's first run compiles).
tokens/s = rows * new tokens / time. Each framework runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from bench import common

RANKS = (8, 16, 8, 4)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PROMPTS = [
  "What is the capital of France?",
  "Name three colours.",
  "Write a haiku about rain.",
  "What is 12 times 7?",
  "Give a synonym for happy.",
  "Translate 'good morning' to Spanish.",
  "What does a CPU do?",
  "List two prime numbers.",
]
ROWS_PER_ADAPTER = len(PROMPTS) // len(RANKS)


def _timed(fn, repeats: int) -> list[float]:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    tick = time.perf_counter()
    fn()
    times.append(time.perf_counter() - tick)
  return times


def worker_jlora(adapter_root: str, new_tokens: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jlora
  from jlora.models import from_pretrained
  from train.generate import chat_prompt_ids, generate_ids

  model, params, tokenizer = from_pretrained(common.MODEL)
  layout = jlora.trace_layout(model, jnp.zeros((1, 1), jnp.int32))
  rng = np.random.default_rng(0)
  adapters = {}
  for i, rank in enumerate(RANKS):
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
    adapted = jlora.apply(params, cfg, jax.random.key(i), layout=layout)
    adapted = jax.tree.map(
      lambda n: (
        n.replace(b=jnp.asarray(0.02 * rng.standard_normal(n.b.shape), n.b.dtype))
        if jlora.is_lora(n)
        else n
      ),
      adapted,
      is_leaf=jlora.is_lora,
    )
    adapters[f"ad{i}"] = adapted
    jlora.save_adapter(os.path.join(adapter_root, f"ad{i}"), adapted, cfg)
  stacked = jlora.stack_adapters(adapters, params)
  prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
  ids = [i // ROWS_PER_ADAPTER for i in range(len(PROMPTS))]
  run = jlora.wrap(model.apply)
  out = {}
  mixed = lambda: generate_ids(model, stacked, prompts, new_tokens, apply_fn=run, adapter_ids=ids)
  out["mixed"] = _timed(mixed, repeats)
  out["mixed_tokens"] = mixed()

  def separate():
    rows = []
    for i, adapted in enumerate(adapters.values()):
      chunk = prompts[i * ROWS_PER_ADAPTER : (i + 1) * ROWS_PER_ADAPTER]
      rows += generate_ids(model, adapted, chunk, new_tokens, apply_fn=run)
    return rows

  out["separate"] = _timed(separate, repeats)
  out["separate_tokens"] = separate()
  return out


def worker_peft(adapter_root: str, new_tokens: int, repeats: int) -> dict:
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  from jlora.models.loading import load_tokenizer, resolve_checkpoint
  from train.generate import chat_prompt_ids

  torch.set_num_threads(os.cpu_count())
  directory = resolve_checkpoint(common.MODEL)
  tokenizer = load_tokenizer(directory)
  base = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
  names = [f"ad{i}" for i in range(len(RANKS))]
  model = PeftModel.from_pretrained(base, os.path.join(adapter_root, names[0]), names[0])
  for name in names[1:]:
    model.load_adapter(os.path.join(adapter_root, name), adapter_name=name)
  model.eval()
  prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
  width = max(len(p) for p in prompts)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  row_names = [names[i // ROWS_PER_ADAPTER] for i in range(len(PROMPTS))]

  def mixed():
    with torch.no_grad():
      out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        adapter_names=row_names,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
      )
    return out[:, width:].tolist()

  return {"mixed": _timed(mixed, repeats), "mixed_tokens": mixed()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="4 tokens, 1 repeat; writes no result")
  parser.add_argument("--out", default="bench/results/multi_adapter.json")
  parser.add_argument("--worker", choices=["jlora", "peft"], help=argparse.SUPPRESS)
  parser.add_argument("--adapters", help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.smoke:
    args.new_tokens, args.repeats = 4, 1
  if args.new_tokens < 1 or args.repeats < 1:
    parser.error("--new-tokens and --repeats must be >= 1")

  if args.worker:
    worker = worker_jlora if args.worker == "jlora" else worker_peft
    result = worker(args.adapters, args.new_tokens, args.repeats)
    common.write_worker_result(args.worker_out, result)
    return

  machine = common.machine()
  print(common.machine_line(machine))
  results = {}
  with tempfile.TemporaryDirectory() as root:
    for framework in ("jlora", "peft"):
      path = os.path.join(root, f"{framework}.json")
      flags = ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
      rc, output = common.run_child(
        ["-m", "bench.multi_adapter", "--worker", framework, "--adapters", root, *flags]
        + ["--worker-out", path]
      )
      if rc != 0:
        sys.exit(f"{framework} worker failed:\n{output[-3000:]}")
      with open(path) as f:
        results[framework] = json.load(f)

  tokens = len(PROMPTS) * args.new_tokens
  rows = []
  for label, times in (
    ("jlora mixed (1 batch of 8)", results["jlora"]["mixed"]),
    ("jlora separate (4 batches of 2)", results["jlora"]["separate"]),
    ("PEFT mixed (adapter_names=)", results["peft"]["mixed"]),
  ):
    rows.append([label, f"{common.median(times):.3f}", f"{tokens / common.median(times):.1f}"])
  print(common.markdown_table(["run", "median s", "tokens/s"], rows))
  same = results["jlora"]["mixed_tokens"] == results["jlora"]["separate_tokens"]
  agree = sum(
    a == b for a, b in zip(results["jlora"]["mixed_tokens"], results["peft"]["mixed_tokens"])
  )
  print(f"jlora mixed == separate tokens: {same}; rows equal to PEFT's: {agree}/{len(PROMPTS)}")
  if not args.smoke:
    common.write_json(
      args.out,
      {"machine": machine, "new_tokens": args.new_tokens, "repeats": args.repeats, **results},
    )


if __name__ == "__main__":
  main()

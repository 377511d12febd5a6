"""Serving: `train.serve` under 1, 4 and 16 concurrent streaming clients, spread over 4 adapters
and over 1 adapter, against `train.generate` run one request at a time.

    python -m bench.serve [--requests-per-client 4] [--max-tokens 32] [--out bench/results/serve.json]
    python -m bench.serve --smoke      # a tiny random model, to check that it runs

Model: the embedded SmolLM2-135M-Instruct (fp32). Four LoRA adapters (rank 16 on q,k,v,o;
random non-zero B), written as PEFT dirs and loaded by the server at start-up. The server runs
in this process (uvicorn in a thread, 127.0.0.1, a free port, --max-num-seqs 16, its adapter
stack sized for those adapters: --max-lora-rank 16 --lora-targets q_proj,k_proj,v_proj,o_proj); the clients
are asyncio httpx streams on loopback, each sending --requests-per-client chat requests one
after another (greedy, max_tokens --max-tokens; client i uses adapter i % 4, or adapter 0). No
two requests of a sitting ask the same question ("Question {n}: " before one of 4 prompts), so
the server's prefix cache reuses only the chat template's shared system prompt.

  tokens/s:  completion tokens of all requests / wall time of the run
  TTFT:      request sent -> first streamed token, p50 / p99 over requests
  per token: (last token - first token) / (tokens - 1) per request, p50 / p99
  sequential: train.generate.generate_ids, one prompt at a time, the adapter alone on the base,
              before the server starts and after it stops; the faster of the two

The server compiles its decode steps and its prefill of the questions' lengths (every batch size,
after every prefix length it may find cached) at start-up; untimed warm-up requests (4 on each
adapter, then 16 clients at full length) come before the timed rows.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

import numpy as np

from bench import common

PROMPTS = [
  "Write a short story about a lighthouse keeper.",
  "Explain how a bicycle works.",
  "Describe your ideal weekend in detail.",
  "List some facts about the ocean.",
]
# Every request of a sitting (warm-up, server rows, sequential runs) asks a question no earlier
# request asked: "Question {n}: " comes first, so the server's prefix cache finds only what real
# chat traffic shares, the template's system prompt, and never a whole repeated question.
QUESTIONS = itertools.count()


def question_text(n: int) -> str:
  return f"Question {n}: {PROMPTS[n % len(PROMPTS)]}"


def question() -> str:
  """The sitting's next question."""
  return question_text(next(QUESTIONS))


def question_lengths(tok, count: int = 2000) -> list[int]:
  """The prompt lengths (chat template applied) of a sitting's first `count` questions."""
  from train.generate import chat_prompt_ids

  return sorted({len(chat_prompt_ids(tok, question_text(n))) for n in range(count)})


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
N_ADAPTERS = 4


def make_adapters(root, params, rank: int) -> dict[str, str]:
  import jax
  import jax.numpy as jnp

  import jlora

  cfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
  dirs = {}
  for i in range(N_ADAPTERS):
    rng = np.random.default_rng(i)
    adapter = jax.tree.map(
      lambda n: (
        n.replace(b=jnp.asarray(0.01 * rng.standard_normal(n.b.shape), n.b.dtype))
        if jlora.is_lora(n)
        else n
      ),
      jlora.apply(params, cfg, jax.random.key(i)),
      is_leaf=jlora.is_lora,
    )
    dirs[f"ad{i}"] = str(root / f"ad{i}")
    jlora.save_adapter(dirs[f"ad{i}"], adapter, cfg)
  return dirs


def start_server(argv: list[str], prompt_lengths: list[int]):
  """(url, stop): train.serve on a free loopback port, in a thread of this process, its prefill
  compiled for these prompt lengths."""
  from train import serve

  args = serve.parser().parse_args(argv)
  serve.check_args(args)
  _, server = serve.build(args, prompt_lengths)
  return serve.serve_in_thread(server)


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
  body = {
    "model": model,
    "messages": [{"role": "user", "content": prompt}],
    "max_tokens": max_tokens,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
  }
  sent, first, last, tokens = time.perf_counter(), None, None, 0
  async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
    async for line in response.aiter_lines():
      if not line.startswith("data: {"):
        continue
      event = json.loads(line[6:])
      if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
      elif event["choices"] and event["choices"][0]["delta"].get("content"):
        last = time.perf_counter()
        first = first or last
  return {"tokens": tokens, "ttft": (first or last or sent) - sent, "first": first, "last": last}


async def run_load(url, models, clients: int, per_client: int, max_tokens: int) -> dict:
  import httpx

  async with httpx.AsyncClient(timeout=600) as client:

    async def worker(i: int):
      return [
        await one_request(client, url, models[i % len(models)], question(), max_tokens)
        for _ in range(per_client)
      ]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
    wall = time.perf_counter() - start
  tokens = sum(r["tokens"] for r in results)
  ttft = [r["ttft"] for r in results]
  per_token = [
    (r["last"] - r["first"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1 and r["first"]
  ]
  pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else None  # noqa: E731
  return {
    "clients": clients,
    "requests": len(results),
    "tokens": tokens,
    "wall_s": wall,
    "tokens_per_s": tokens / wall,
    "ttft_ms_p50": pct(ttft, 50),
    "ttft_ms_p99": pct(ttft, 99),
    "per_token_ms_p50": pct(per_token, 50),
    "per_token_ms_p99": pct(per_token, 99),
  }


def sequential(model_path: str, dirs: dict, requests: int, max_tokens: int) -> dict:
  """train.generate one request at a time (the adapter alone on the base), after a warm-up."""
  import jlora
  from jlora.models import from_pretrained
  from train.generate import chat_prompt_ids, generate_ids

  model, params, tok = from_pretrained(model_path)
  wrapped = jlora.wrap(model.apply)
  adapted = [jlora.load_adapter(d, params, model_config=model.config) for d in dirs.values()]
  run = lambda i: generate_ids(  # noqa: E731
    model,
    adapted[i % len(adapted)],
    [chat_prompt_ids(tok, question())],
    max_tokens,
    eos_ids=[tok.eos_token_id],
    apply_fn=wrapped,
  )[0]
  for i in range(len(adapted)):  # compile each prompt bucket x adapter tree once
    run(i)
  start, tokens = time.perf_counter(), 0
  for i in range(requests):
    tokens += len(run(i))
  wall = time.perf_counter() - start
  return {"requests": requests, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--requests-per-client", type=int, default=4)
  parser.add_argument("--max-tokens", type=int, default=32)
  parser.add_argument("--clients", default="1,4,16")
  parser.add_argument("--out", default="bench/results/serve.json")
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  import tempfile
  from pathlib import Path

  from jlora.models import from_pretrained

  machine = common.machine()
  root = Path(tempfile.mkdtemp(prefix="bench_serve_"))
  model_path = common.MODEL
  if args.smoke:
    from tests.tiny import make_checkpoint

    model_path = str(make_checkpoint(root / "model"))
    args.clients, args.max_tokens, args.requests_per_client = "1,4", 8, 1
  _, params, tok = from_pretrained(model_path)
  dirs = make_adapters(root, params, rank=16)
  del params
  lengths = question_lengths(tok)
  # The adapter stack is sized for the adapters served: their rank and their layers.
  argv = ["--model", model_path, "--max-num-seqs", "16", "--max-model-len", "256"]
  argv += ["--max-lora-rank", "16", "--lora-targets", ",".join(TARGETS)]
  argv += [f"--adapter={name}={path}" for name, path in dirs.items()]
  # The sequential baseline runs before the server starts and after it stops; the faster of the
  # two is the baseline (it moved by up to 1.5x between idle sittings when measured once).
  before = sequential(model_path, dirs, 2 * N_ADAPTERS, args.max_tokens)
  print(json.dumps({"sequential before the server": before}), flush=True)
  url, stop = start_server(argv, lengths)
  rows = []
  try:
    for name in dirs:  # warm-up: every adapter, a few questions
      asyncio.run(run_load(url, [name], 1, len(PROMPTS), 2))
    # and 16 clients at full length: the cache moves between the widths a timed run uses
    asyncio.run(run_load(url, list(dirs), 16, 1, args.max_tokens))
    for spread, models in (("4 adapters", list(dirs)), ("1 adapter", [next(iter(dirs))])):
      for clients in [int(c) for c in args.clients.split(",")]:
        row = asyncio.run(run_load(url, models, clients, args.requests_per_client, args.max_tokens))
        rows.append({"spread": spread, **row})
        print(json.dumps(rows[-1]), flush=True)
  finally:
    stop()
  after = sequential(model_path, dirs, 2 * N_ADAPTERS, args.max_tokens)
  print(json.dumps({"sequential after the server": after}), flush=True)
  seq = {**max(before, after, key=lambda s: s["tokens_per_s"]), "sittings": [before, after]}
  machine["loadavg_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
  result = {"machine": machine, "max_tokens": args.max_tokens, "rows": rows, "sequential": seq}
  common.write_json(args.out, result)
  print(common.machine_line(machine))
  print(table(result))


def table(result: dict) -> str:
  seq = result["sequential"]["tokens_per_s"]
  lines = [
    "| adapters | clients | requests | tokens/s | × sequential | TTFT p50 / p99 (ms) "
    "| per token p50 / p99 (ms) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['spread']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
      f"{r['tokens_per_s'] / seq:.2f} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | "
      f"{r['per_token_ms_p50']:.0f} / {r['per_token_ms_p99']:.0f} |"
    )
  lines.append(
    f"| sequential train.generate | 1 | {result['sequential']['requests']} | {seq:.1f} | 1.00 | | |"
  )
  return "\n".join(lines)


if __name__ == "__main__":
  main()

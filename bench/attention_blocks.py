"""One layer's causal attention, forward + backward: jlora's blockwise at several block sizes vs torch.

    python -m bench.attention_blocks [--seqs 2048,8192] [--blocks 128x128,128x256,256x256,256x384,512x512]
                                     [--repeats 5] [--out bench/results/attention_blocks.json]

The shape is SmolLM2-135M's (9 query heads, 3 KV heads, head dim 64), batch 1, fp32, one packed
segment. jlora: `jax.grad` of sum(blockwise_attention(q, k, v) * d_out) under `jax.jit`. torch:
`scaled_dot_product_attention(is_causal=True, enable_gqa=True)` then `backward(d_out)`, with as
many threads as cores. Calls are interleaved (one call of every configuration per repeat), so that
drift in the machine's speed hits every configuration alike; each cell is the fastest repeat.
This is what chose `jlora.models.blockwise.DEFAULT_BLOCK_Q` / `DEFAULT_BLOCK_K`.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench import common

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def attention_flops(seq: int) -> float:
  """Matmul FLOPs of causal attention forward (2 matmuls) + flash backward (5), half the square."""
  return 2 * seq * seq / 2 * HEADS * HEAD_DIM * 7


def inputs(seq: int) -> tuple[np.ndarray, ...]:
  rng = np.random.default_rng(seq)
  shapes = [(1, seq, HEADS, HEAD_DIM), (1, seq, KV_HEADS, HEAD_DIM), (1, seq, KV_HEADS, HEAD_DIM)]
  return tuple(rng.standard_normal(s, dtype=np.float32) for s in shapes + [shapes[0]])


def jlora_call(seq: int, block_q: int, block_k: int):
  import jax
  import jax.numpy as jnp

  from jlora.models.blockwise import blockwise_attention

  q, k, v, d_out = (jnp.asarray(x) for x in inputs(seq))
  segments = jnp.ones((1, seq), jnp.int32)

  def loss(q, k, v):
    out = blockwise_attention(q, k, v, segments, segments, block_q=block_q, block_k=block_k)
    return jnp.sum(out * d_out)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return lambda: jax.block_until_ready(grads(q, k, v))


def torch_call(seq: int):
  import torch

  torch.set_num_threads(os.cpu_count())
  q, k, v, d_out = (torch.from_numpy(x).transpose(1, 2) for x in inputs(seq))
  q, k, v = (x.contiguous().requires_grad_() for x in (q, k, v))
  d_out = d_out.contiguous()
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def call():
    q.grad = k.grad = v.grad = None
    sdpa(q, k, v, is_causal=True, enable_gqa=True).backward(d_out)

  return call


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seqs", default="2048,8192")
  parser.add_argument("--blocks", default="128x128,128x256,256x256,256x384,512x512")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="bench/results/attention_blocks.json")
  args = parser.parse_args()
  seqs = [int(s) for s in args.seqs.split(",")]
  blocks = [tuple(int(n) for n in b.split("x")) for b in args.blocks.split(",")]
  start, machine = time.time(), common.machine()
  results = []
  for seq in seqs:
    calls = {"torch sdpa": torch_call(seq)}
    calls.update({f"jlora {bq}x{bk}": jlora_call(seq, bq, bk) for bq, bk in blocks})
    for call in calls.values():
      call()  # compile / warm up
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
      for name, call in calls.items():
        tick = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - tick)
    for name, ts in times.items():
      best = min(ts)
      row = {"seq": seq, "config": name, "best_s": best, "times": ts}
      row["gflops"] = attention_flops(seq) / best / 1e9
      results.append(row)
      print(f"{seq:>6} {name:<16} {best:.3f} s  {row['gflops']:.0f} GFLOP/s", flush=True)
  common.write_json(
    args.out,
    {
      "machine": machine,
      "repeats": args.repeats,
      "wall_s": time.time() - start,
      "results": results,
    },
  )


if __name__ == "__main__":
  main()

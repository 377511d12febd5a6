"""Attention on a GPU: every implementation against naive, forward and gradients, then timings.

    python -m bench.gpu_attention [--out bench/results/gpu_attention.json]

Checks `implementation="cudnn"` (which serves one segment + padding through
`jax.nn.dot_product_attention`, packed rows through cuDNN's packed layout, and falls back to
blockwise beyond that) against `naive_attention` in bf16, for: one segment then padding, 4 packed
segments, more segments than the packed path takes (one per 64 slots), and a sliding window.
Then times one forward + backward of each implementation on bench.gpu's shape (2 x 2048, 32 heads,
8 KV heads, 64-dim head, 4 packed segments per row), median of 10 after a warm-up.
Refuses to run unless jax.default_backend() == 'gpu'.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.attention import attention

CASES = {
  "one segment + padding": ([400], None),
  "4 packed segments": ([100, 200, 150, 62], None),
  "too many segments (fallback)": ([4] * 100, None),
  "sliding window 64": ([300, 212], 64),
}


def segments(batch: int, seq: int, lengths: list[int]) -> jax.Array:
  out = np.zeros((batch, seq), np.int32)
  for row in out:
    start = 0
    for segment, n in enumerate(lengths, start=1):
      row[start : start + n] = segment
      start += n
  return jnp.asarray(out)


def qkv(batch, seq, heads, kv_heads, dim):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, seq, heads, dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), jnp.bfloat16)
  return q, k, v


def forward_and_grads(q, k, v, seg, implementation, window):
  weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

  def forward(q, k, v):
    return attention(q, k, v, seg, seg, implementation=implementation, sliding_window=window)

  def loss(q, k, v):
    return jnp.sum(forward(q, k, v).astype(jnp.float32) * weights)

  return jax.jit(forward)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def largest_difference(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def check() -> dict:
  q, k, v = qkv(2, 512, 8, 2, 64)
  results = {}
  for name, (lengths, window) in CASES.items():
    seg = segments(2, 512, lengths)
    out, grads = forward_and_grads(q, k, v, seg, "cudnn", window)
    want, want_grads = forward_and_grads(q, k, v, seg, "naive", window)
    results[name] = {
      "forward": largest_difference(out, want),
      "grads_qkv": [largest_difference(a, b) for a, b in zip(grads, want_grads)],
      "output_scale": float(jnp.max(jnp.abs(want.astype(jnp.float32)))),
    }
    print(name, results[name], flush=True)
  return results


def timings() -> dict:
  q, k, v = qkv(2, 2048, 32, 8, 64)
  seg = segments(2, 2048, [700, 500, 600, 248])
  results = {}
  for implementation in ("cudnn", "blockwise", "naive"):

    def loss(q, k, v, implementation=implementation):
      return jnp.sum(attention(q, k, v, seg, seg, implementation=implementation))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(10):
      tick = time.perf_counter()
      jax.block_until_ready(step(q, k, v))
      times.append(time.perf_counter() - tick)
    results[implementation] = float(np.median(times))
    print(
      f"{implementation}: {results[implementation] * 1e3:.2f} ms forward + backward", flush=True
    )
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench/results/gpu_attention.json")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit(
      f"bench.gpu_attention needs a GPU; jax.default_backend() is {jax.default_backend()!r}"
    )
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  result.update(check=check(), seconds=timings())
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

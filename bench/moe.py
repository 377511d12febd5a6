"""One LoRA step on a Qwen3-MoE-shaped model: jlora (blocked, dense and ragged expert matmuls) against PEFT +
transformers, side by side, fp32 on CPU by default.

    python -m bench.moe [--steps 10] [--warmup 2] [--out bench/results/moe.json]
    python -m bench.moe --device gpu [--dtype bfloat16]   # torch on cuda, jax on its GPU backend

Model: a random transformers Qwen3-MoE checkpoint scaled to this machine (SHAPE below: 4 layers,
d=256, 16 experts, top-4, expert width 256), written once and loaded by every worker. Batch: 4 x 128
random tokens, next-token cross-entropy on every position. Adapters: rank 8, alpha 16, every linear
layer and the experts (jlora: targets="all-linear", which includes the experts; PEFT: target_modules
"all-linear" plus target_parameters mlp.experts.gate_up_proj / down_proj), B = 0 at init. AdamW(lr
1e-4) on the adapters only. Each (framework, path) runs in its own process: step time is the median
of --steps timed steps after --warmup (jlora's first call compiles), peak RSS is ru_maxrss (and on
GPU the peak device memory: torch's max_memory_allocated, jax's peak_bytes_in_use). PEFT and jlora's
CPU default run twice (first and last) and each keeps its faster run. --dtype sets
both frameworks' weights and compute (the adapters too); --device cpu keeps jax off any GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench import common

SHAPE = dict(
  vocab_size=2048,
  hidden_size=256,
  intermediate_size=512,
  moe_intermediate_size=256,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=64,
  num_experts=16,
  num_experts_per_tok=4,
  norm_topk_prob=True,
  max_position_embeddings=512,
)
ROWS, SEQ, RANK = 4, 128, 8
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def write_checkpoint(directory: str) -> None:
  import torch
  import transformers

  torch.manual_seed(0)
  model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**SHAPE)).float()
  model.save_pretrained(directory, safe_serialization=True)


def batch():
  import numpy as np

  return np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (ROWS, SEQ))


def worker_jlora(directory: str, matmul: str, steps: int, warmup: int, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models import from_pretrained

  model, params, _ = from_pretrained(
    directory, expert_matmul=matmul, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype)
  )
  ids = jnp.asarray(batch())
  cfg = jlora.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets="all-linear")
  params = jlora.apply(params, cfg, jax.random.key(0), layout=jlora.trace_layout(model, ids))
  trainable, frozen = jlora.split(params)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  opt_state = tx.init(trainable)
  apply = jlora.wrap(model.apply)

  def loss_fn(t):
    logits = apply({"params": jlora.combine(t, frozen)}, ids[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @jax.jit
  def step(t, s):
    loss, grads = jax.value_and_grad(loss_fn)(t)
    updates, s = tx.update(grads, s, t)
    return optax.apply_updates(t, updates), s, loss

  state = [trainable, opt_state]

  def one_step():
    state[0], state[1], loss = step(*state)
    return loss.block_until_ready()

  result = timed(one_step, steps, warmup)
  device = jax.devices()[0]
  if device.platform != "cpu":
    result["peak_device_mib"] = device.memory_stats()["peak_bytes_in_use"] / 2**20
  return {**result, "platform": device.platform, "device_kind": device.device_kind}


def timed(one_step, steps: int, warmup: int) -> dict:
  """Median wall time of `steps` calls of `one_step` (which returns the loss, computed) after
  `warmup` untimed ones; the last loss and the process's peak RSS."""
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    loss = one_step()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return {
    "step_s": common.median(times),
    "loss": float(loss),
    "peak_rss_mib": common.peak_rss_mib(),
  }


def worker_peft(directory: str, steps: int, warmup: int, device: str, dtype: str) -> dict:
  import peft
  import torch
  import transformers

  device = "cuda" if device == "gpu" else "cpu"
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
  model = model.to(device)
  config = peft.LoraConfig(
    r=RANK,
    lora_alpha=2 * RANK,
    target_modules="all-linear",
    target_parameters=EXPERT_PARAMETERS,
  )
  model = peft.get_peft_model(model, config).train()
  optimizer = torch.optim.AdamW(
    [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0
  )
  ids = torch.from_numpy(batch().astype("int64")).to(device)

  def one_step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()  # waits for the step (cuda runs asynchronously)

  result = timed(one_step, steps, warmup)
  if device == "cuda":
    result["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
  return {**result, "platform": device}


def faster(first: dict, second: dict) -> dict:
  """Of two runs of one row, the one with the shorter step (a failed run loses); both times kept."""
  runs = [r for r in (first, second) if "step_s" in r]
  if not runs:
    return first
  best = min(runs, key=lambda r: r["step_s"])
  return {**best, "step_s_runs": [r["step_s"] for r in runs]}


NAMES = {
  "peft": "PEFT + transformers",
  "jlora-blocked": "jlora, blocked expert matmul (CPU default)",
  "jlora-dense": "jlora, dense one-hot expert matmul",
  "jlora-ragged": "jlora, `jax.lax.ragged_dot`",
}


def table(result: dict) -> str:
  """The markdown table of a bench/results/moe.json (also used by bench.report)."""
  rows = result["rows"]
  peft_s = rows["peft"].get("step_s")
  on_device = any("peak_device_mib" in r for r in rows.values())
  out = []
  for name, r in rows.items():
    if "error" not in r:
      speed = f"{peft_s / r['step_s']:.2f}x" if peft_s else "-"
      memory = [f"{r.get('peak_device_mib', 0):.0f}"] if on_device else []
      out.append([NAMES[name], f"{r['step_s']:.4f}", f"{r['peak_rss_mib']:.0f}", *memory, speed])
  header = ["run", "step s", "peak RSS MiB", *(["peak device MiB"] if on_device else []), "vs PEFT"]
  return common.markdown_table(header, out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default="bench/results/moe.json")
  parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--worker", choices=["jlora", "peft"])
  parser.add_argument("--matmul", default="blocked")
  parser.add_argument("--dir")
  parser.add_argument("--worker-out")
  args = parser.parse_args(argv)
  if args.worker == "jlora":
    result = worker_jlora(args.dir, args.matmul, args.steps, args.warmup, args.dtype)
    return common.write_worker_result(args.worker_out, result)
  if args.worker == "peft":
    result = worker_peft(args.dir, args.steps, args.warmup, args.device, args.dtype)
    return common.write_worker_result(args.worker_out, result)

  machine = common.machine()
  rows = {}
  with tempfile.TemporaryDirectory() as directory:
    write_checkpoint(directory)
    timing = ["--dir", directory, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    timing += ["--device", args.device, "--dtype", args.dtype]
    # Each framework on the device asked for: jax on its default backend (the GPU where there is
    # one) unless --device cpu.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"} if args.device == "cpu" else None
    peft = ["--worker", "peft", *timing]
    jlora_worker = lambda matmul: ["--worker", "jlora", "--matmul", matmul, *timing]
    rows["peft"] = common.run_worker("bench.moe", peft)
    for matmul in ("blocked", "dense", "ragged"):
      rows[f"jlora-{matmul}"] = common.run_worker("bench.moe", jlora_worker(matmul), env=env)
    # PEFT and the CPU default run again, after the others, and each keeps its faster run: a burst
    # of load during one run moves neither side of the verdict.
    rows["peft"] = faster(rows["peft"], common.run_worker("bench.moe", peft))
    again = common.run_worker("bench.moe", jlora_worker("blocked"), env=env)
    rows["jlora-blocked"] = faster(rows["jlora-blocked"], again)
  for name, r in rows.items():
    if "error" in r:
      print(f"{name} failed:\n{r['error']}", file=sys.stderr)
  machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
  result = {"machine": machine, "shape": SHAPE, "steps": args.steps, "rows": rows}
  result.update(device=args.device, dtype=args.dtype, blocked="chunked expert loop", runs=2)
  result["warmup"] = args.warmup
  if args.device == "cpu":
    result["layers"] = "unrolled"  # MoeConfig.scan_unroll="auto" on CPU
  kinds = {r["device_kind"] for r in rows.values() if r.get("platform", "cpu") != "cpu"}
  if kinds:
    machine["device_kind"] = ", ".join(sorted(kinds))
  print(common.machine_line(machine))
  print(table(result))
  common.write_json(args.out, result)


if __name__ == "__main__":
  main()

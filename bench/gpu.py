"""Tokens/s and MFU of one GPU (bf16) on a Llama-3.2-1B-shaped model with random weights.

    python -m bench.gpu [--batch 2] [--seq 2048] [--steps 10] [--warmup 2] [--remat none]
                        [--no-peft] [--out bench/results/gpu.json]
    python -m bench.gpu --allow-cpu --layers 1 --seq 128 --batch 1 --steps 2 [--vocab 8192]  # CPU smoke test

Model: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256,
tied embeddings, rope theta 5e5; random weights (no checkpoint needed), bf16 compute and
storage, fp32 LoRA adapters (PEFT's autocast_adapter_dtype does the same).
Runs (each in its own process, sequentially, so GPU memory is not shared):
  jlora LoRA        r=16, alpha=32, all-linear, train/step.py's make_train_step, AdamW
  jlora QLoRA       the same on an nf4 (double quant, block 64) base
  PEFT + transformers  LoRA r=16 all-linear, torch bf16, attn_implementation="sdpa"
Data: random tokens, rows of --seq tokens packed with examples of random length
(positions restart per example; PEFT gets position_ids and attention_mask=None, which
transformers turns into its block-causal packed mask); loss on every token.

MFU basis (model FLOPs per trained token, no recomputation counted):
  linears       4N      (forward 2N + activation gradients 2N; the frozen base has no
                         weight gradients); N = non-embedding params (adapters ignored)
  LM head       4 d V   (tied: forward + activation gradient; every token is labelled)
  attention     3 x 2 n d_attn per token of an example of length n, per layer: causal
                QK^T and PV forward (2 x n/2 x d_attn multiply-adds each, on average), and
                twice that in the backward (dQ, dK, dS, dV). Counted from the actual packed
                example lengths, so padding and cross-example pairs earn nothing.
  MFU = model FLOPs per step / median step time / peak; peak = 989 TFLOP/s dense bf16
  on H100 / H200 (override with --peak-tflops for another GPU).
Refuses to run unless jax.default_backend() == 'gpu', except with --allow-cpu, which
prints no MFU and writes nothing unless --out is given. No number is ever made up: a
run that fails is reported as failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import common

SHAPE = dict(
  vocab_size=128256,
  hidden_size=2048,
  intermediate_size=8192,
  num_attention_heads=32,
  num_key_value_heads=8,
  tie_word_embeddings=True,
  rope_theta=500000.0,
)
RANK, ALPHA = 16, 32.0
H100_PEAK = 989e12


def shape(args) -> dict:
  return {**SHAPE, "vocab_size": args.vocab}


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  """Packed rows in train/data.py's convention: examples of random length, loss on all tokens."""
  import numpy as np

  rng = np.random.default_rng(seed)
  out = {
    k: np.zeros((batch, seq), np.int32)
    for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
  }
  lengths = []
  for r in range(batch):
    start, seg = 0, 1
    while start < seq:
      n = min(int(rng.integers(seq // 8, seq // 2 + 1)), seq - start)
      tokens = rng.integers(0, vocab, n + 1)
      sl = slice(start, start + n)
      out["input_ids"][r, sl], out["targets"][r, sl] = tokens[:-1], tokens[1:]
      out["loss_mask"][r, sl], out["segment_ids"][r, sl] = 1, seg
      out["positions"][r, sl] = np.arange(n)
      lengths.append(n)
      start, seg = start + n, seg + 1
  return out, lengths


def model_flops(layers: int, seq: int, lengths: list[int], batch: int, vocab: int) -> dict:
  d, f, V = SHAPE["hidden_size"], SHAPE["intermediate_size"], vocab
  hd = d // SHAPE["num_attention_heads"]
  d_attn, d_kv = SHAPE["num_attention_heads"] * hd, SHAPE["num_key_value_heads"] * hd
  N = layers * (d * d_attn + 2 * d * d_kv + d_attn * d + 3 * d * f)
  tokens = batch * seq
  linears = 4 * N * tokens
  head = 4 * d * V * tokens
  attention = layers * sum(
    3 * 2 * n * (n + 1) * d_attn for n in lengths
  )  # sum over tokens of 3 x 2 x i x d_attn
  return {
    "N_non_embedding": N,
    "tokens": tokens,
    "linears": linears,
    "head": head,
    "attention": attention,
    "total": linears + head + attention,
    "per_token": (linears + head + attention) / tokens,
  }


# --------------------------------------------------------------------------- workers


def worker_jlora(args, qlora: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax.linen import meta

  import jlora
  from jlora.models import LlamaConfig, LlamaForCausalLM
  from train import step as step_lib

  config = LlamaConfig(
    **shape(args),
    num_hidden_layers=args.layers,
    max_position_embeddings=max(args.seq, 2048),
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    remat_policy=args.remat,
    attention=args.attention,
  )
  model = LlamaForCausalLM(config)
  example = jnp.zeros((1, 8), jnp.int32)
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), example)["params"])
  layout = jlora.trace_layout(model, example)
  cfg = jlora.LoraConfig(
    rank=RANK, alpha=ALPHA, targets="all-linear", dtype=jnp.dtype(args.lora_dtype)
  )
  quant = jlora.QuantConfig(kind="nf4") if qlora else None
  trainable, frozen = jlora.prepare_for_training(
    params, cfg, jax.random.key(1), quant=quant, layout=layout
  )
  del params
  host, _ = make_batch(args.batch, args.seq, args.vocab)
  batch = jax.device_put(step_lib.gather_labels(host, step_lib.label_budget(host["loss_mask"])))
  tx = optax.adamw(common.LR, weight_decay=0.0)
  opt_state = tx.init(trainable)
  step_fn = jax.jit(step_lib.make_train_step(model, tx), donate_argnums=(0, 1))
  rng = jax.random.key(0)
  tick = time.perf_counter()
  compiled = step_fn.lower(trainable, opt_state, frozen, batch, 0, rng).compile()
  compile_s = time.perf_counter() - tick
  mem = compiled.memory_analysis()
  times, losses = [], []
  for i in range(args.warmup + args.steps):
    tick = time.perf_counter()
    trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, i, rng)
    losses.append(float(metrics["loss"]))
    if i >= args.warmup:
      times.append(time.perf_counter() - tick)
  stats = {}
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # not every backend reports memory stats
    pass
  return {
    "times": times,
    "losses": losses,
    "compile_s": compile_s,
    "device": str(jax.devices()[0].device_kind),
    "backend": jax.default_backend(),
    "adapter_params": int(jlora.adapter_count(trainable)),
    "xla_memory": {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
    },
    "peak_device_bytes": stats.get("peak_bytes_in_use"),
  }


def worker_peft(args) -> dict:
  try:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers import LlamaConfig as HFLlamaConfig
  except ImportError as e:
    return {"skipped": f"torch/transformers/peft not importable: {e}"}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu" and not args.allow_cpu:
    return {"skipped": "torch has no CUDA device"}
  torch.manual_seed(0)
  hf = HFLlamaConfig(
    **shape(args),
    num_hidden_layers=args.layers,
    max_position_embeddings=max(args.seq, 2048),
    attention_dropout=0.0,
  )
  with torch.device(device):
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16, attn_implementation="sdpa")
  model = get_peft_model(
    model,
    LoraConfig(
      r=RANK,
      lora_alpha=int(ALPHA),
      lora_dropout=0.0,
      bias="none",
      target_modules="all-linear",
      task_type="CAUSAL_LM",
    ),
  )
  if args.remat != "none":
    model.gradient_checkpointing_enable()
  model.train()
  host, _ = make_batch(args.batch, args.seq, args.vocab)
  as_t = lambda a: torch.from_numpy(a.astype("int64")).to(device)
  inputs = {
    "input_ids": as_t(host["input_ids"]),
    "position_ids": as_t(host["positions"]),
    "labels": as_t(host["targets"]),
    "shift_labels": as_t(host["targets"]),
  }  # every token labelled
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=common.LR, weight_decay=0.0)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times, losses = [], []
  for i in range(args.warmup + args.steps):
    sync()
    tick = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
    sync()
    if i >= args.warmup:
      times.append(time.perf_counter() - tick)
  return {
    "times": times,
    "losses": losses,
    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    "adapter_params": int(sum(p.numel() for p in params)),
    "lora_param_dtype": str(params[0].dtype),
    "peak_device_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
  }


# --------------------------------------------------------------------------- driver


def run_worker(name: str, argv: list[str]) -> dict:
  env = dict(os.environ)
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)  # the parent set it for itself only
  if name == "peft":
    env["JAX_PLATFORMS"] = "cpu"  # keep jax (if anything imports it) off the GPU torch uses
  return common.run_worker("bench.gpu", [*argv, "--worker", name], env=env)


def main(argv=None) -> None:
  raw = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=2, help="packed rows per step")
  parser.add_argument(
    "--vocab", type=int, default=SHAPE["vocab_size"], help="only for a faster CPU smoke test"
  )
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--remat", default="none", help="jlora remat_policy (PEFT: gradient checkpointing if not none)"
  )
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=None,
    help="peak dense bf16 TFLOP/s (default: 989 on H100/H200)",
  )
  parser.add_argument(
    "--attention", default="auto", help="jlora's config.model.attention (auto: cudnn on GPU)"
  )
  parser.add_argument(
    "--lora-dtype", default="float32", help="jlora's adapter dtype (PEFT keeps fp32 adapters)"
  )
  parser.add_argument("--no-peft", action="store_true")
  parser.add_argument("--no-qlora", action="store_true")
  parser.add_argument(
    "--allow-cpu", action="store_true", help="smoke test on CPU (needs --layers 1 --seq <= 256)"
  )
  parser.add_argument(
    "--out", default=None, help="JSON output (default bench/results/gpu.json on a GPU)"
  )
  parser.add_argument("--worker", choices=["jlora", "jlora-qlora", "peft"], help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args(raw)

  if args.worker:
    result = (
      worker_peft(args)
      if args.worker == "peft"
      else worker_jlora(args, qlora=args.worker == "jlora-qlora")
    )
    common.write_worker_result(args.worker_out, result)
    return

  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = (
    "false"  # this process only looks; the workers allocate
  )
  import jax

  backend = jax.default_backend()
  if backend != "gpu":
    if not args.allow_cpu:
      raise SystemExit(
        f"bench.gpu measures a GPU, but jax.default_backend() is {backend!r}. Run it on a machine "
        "with a CUDA jax (pip install 'jax[cuda12]'), or smoke-test the code path with "
        "--allow-cpu --layers 1 --seq 128 --batch 1 --steps 2."
      )
    if args.layers > 1 or args.seq > 256 or args.batch > 2:
      raise SystemExit(
        "--allow-cpu is a smoke test only: use --layers 1 --seq 128 (at most 256) --batch 1."
      )
  elif args.vocab != SHAPE["vocab_size"]:
    raise SystemExit(
      "--vocab is only for the CPU smoke test; the GPU benchmark uses Llama-3.2-1B's 128256."
    )
  device_kind = jax.devices()[0].device_kind
  peak = (
    args.peak_tflops * 1e12
    if args.peak_tflops
    else (
      H100_PEAK if backend == "gpu" and any(k in device_kind for k in ("H100", "H200")) else None
    )
  )
  machine = common.machine()
  machine["device_kind"] = device_kind
  print(common.machine_line(machine) + f"; device: {device_kind} ({backend})", flush=True)
  if backend == "gpu" and peak is None:
    print(f"  no known peak for {device_kind!r}: pass --peak-tflops to get MFU", flush=True)

  _, lengths = make_batch(args.batch, args.seq, args.vocab)
  flops = model_flops(args.layers, args.seq, lengths, args.batch, args.vocab)
  runs = ["jlora"] + ([] if args.no_qlora else ["jlora-qlora"]) + ([] if args.no_peft else ["peft"])
  worker_argv = [a for a in raw if a not in ("--no-peft", "--no-qlora")]
  results = {}
  for name in runs:  # one at a time
    tick = time.time()
    results[name] = run_worker(name, worker_argv)
    r = results[name]
    status = (
      r.get("error", "").splitlines()[-1:]
      if "error" in r
      else r.get("skipped") or f"median {common.median(r['times']):.3f} s/step"
    )
    print(f"  {name:12s} {status} ({time.time() - tick:.0f} s wall)", flush=True)

  rows = []
  peft_s = None
  if "times" in results.get("peft", {}):
    peft_s = common.median(results["peft"]["times"])
  for name in runs:
    r = results[name]
    if "times" not in r:
      rows.append(
        [name, "not run: " + (r.get("skipped") or "failed (see JSON)"), "", "", "", "", ""]
      )
      continue
    s = common.median(r["times"])
    r.update(
      median_step_s=s,
      tokens_per_s=flops["tokens"] / s,
      model_tflops_per_s=flops["total"] / s / 1e12,
      mfu=(flops["total"] / s / peak) if peak else None,
      ratio_vs_peft=(peft_s / s) if peft_s and name != "peft" else None,
    )
    peak_mem = r.get("peak_device_bytes")
    rows.append(
      [
        name,
        f"{s:.3f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['model_tflops_per_s']:.1f}",
        f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a",
        f"{r['ratio_vs_peft']:.2f}x"
        if r["ratio_vs_peft"]
        else ("1.00x" if name == "peft" else "n/a"),
        f"{peak_mem / 2**30:.1f}" if peak_mem else "n/a",
      ]
    )
  table = common.markdown_table(
    [
      "run",
      "median s/step",
      "tokens/s",
      "model TFLOP/s",
      "MFU",
      "vs PEFT (steps/s)",
      "peak device GiB",
    ],
    rows,
  )
  print()
  peak_text = f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known, MFU not computed"
  print(
    f"Llama-3.2-1B shape, {args.layers} layers, random weights, bf16, batch {args.batch} x {args.seq} packed, "
    f"LoRA r={RANK} all-linear; {flops['per_token'] / 1e9:.2f} GFLOP/token model FLOPs "
    f"(4N = {4 * flops['N_non_embedding'] / 1e9:.2f} G, head {flops['head'] / flops['tokens'] / 1e9:.2f} G, "
    f"attention {flops['attention'] / flops['tokens'] / 1e9:.3f} G); {peak_text}"
  )
  print(table)
  print(
    "PEFT QLoRA (bitsandbytes 4-bit) is not run by this script; the QLoRA ratio is against PEFT's bf16 LoRA."
  )
  out = args.out or (None if backend != "gpu" else "bench/results/gpu.json")
  if out:
    common.write_json(
      out,
      {
        "benchmark": "gpu",
        "machine": machine,
        "args": vars(args),
        "peak_flops": peak,
        "model_flops": flops,
        "table_markdown": table,
        "results": results,
        "method": __doc__,
      },
    )


if __name__ == "__main__":
  main()

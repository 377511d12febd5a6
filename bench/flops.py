"""XLA's own accounting of the training step on SmolLM2-135M: FLOPs, memory, compile time.

    python -m bench.flops [--out bench/results/flops.json]
    python -m bench.flops --families [--smoke]   (the other model families: bench/families.py)

Batch: the first 4 packed rows (4 x 128) of data/extract_train.jsonl, as in bench.vs_peft,
with the trainer's label gathering (the LM head runs only at the label-budget slots).

1. FLOPs: `jax.jit(f).lower(...).compile().cost_analysis()['flops']` for
     forward      train/step.py's loss_sum on the LoRA params (no gradient)
     LoRA step    train/step.py's make_train_step (grads of the adapters only, AdamW)
     full FT      the same loss, gradient w.r.t. every parameter, AdamW on all of them
   on the model loaded with scan_layers=False (30 unrolled layers): XLA's cost analysis
   counts a while/scan body once, so the default scanned model would under-count by ~30x.
   (The CE chunk loop and the accumulation loop inside the step are scans of length 1
   here, 4 x label-budget <= 1024 slots, so they are counted exactly.)
   Compared with the textbook 2N (forward) / 4N (LoRA) / 6N (full) FLOPs per token,
   N = non-embedding parameters, T = 4 x 128 tokens; and with an analytic count that
   adds the LM head (2 d V per label slot per pass) and the attention as jlora computes
   it (dense s x s scores, no causal skipping: 4 s d_attn per token per layer forward).
2. Memory: compiled.memory_analysis() argument / temp / output bytes of the real
   (scanned, 30-layer) step for LoRA, QLoRA (nf4, double quant) and full fine-tuning.
3. Compile time: wall time of jit(step).lower(...).compile() of the real step on the
   default scanned model, as train/sft.py builds it (no persistent compilation cache).
"""

from __future__ import annotations

import argparse
import math
import time

from bench import common

ROWS, SEQ = 4, 128
LORA_CONFIGS = {"qv-r8": (("q_proj", "v_proj"), 8), "all-r16": ("all-linear", 16)}


def memory_of(compiled) -> dict:
  m = compiled.memory_analysis()
  return {
    "argument_bytes": int(m.argument_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(getattr(m, "alias_size_in_bytes", 0)),
  }


def mib(n: float) -> str:
  return f"{n / 2**20:,.1f}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default=None)
  parser.add_argument(
    "--families", action="store_true", help="Gemma 2/3, Qwen3, Phi-3 shapes (bench/families.py)"
  )
  parser.add_argument("--smoke", action="store_true", help="with --families: tiny widths")
  args = parser.parse_args(argv)
  if args.families:
    from bench import families

    default = "bench/results/flops_families" + ("_smoke" if args.smoke else "") + ".json"
    families.main(args.out or default, smoke_run=args.smoke)
    return
  args.out = args.out or "bench/results/flops.json"

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jlora
  from jlora.models import from_pretrained
  from train import step as step_lib

  machine = common.machine()
  print(common.machine_line(machine), flush=True)
  tx = optax.adamw(common.LR, weight_decay=0.0)
  example = jnp.zeros((1, 8), jnp.int32)

  def adapted(model, params, lora, quant=False):
    layout = jlora.trace_layout(model, example)
    targets, rank = LORA_CONFIGS[lora]
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    quant_cfg = jlora.QuantConfig(kind="nf4") if quant else None
    return jlora.prepare_for_training(
      params, cfg, jax.random.key(0), quant=quant_cfg, layout=layout
    )

  def lora_step(model, trainable, frozen, batch):
    fn = jax.jit(step_lib.make_train_step(model, tx), donate_argnums=(0, 1))
    return fn.lower(trainable, tx.init(trainable), frozen, batch, 0, jax.random.key(0))

  def forward(model, trainable, frozen, batch):
    apply_fn = jlora.wrap(model.apply)
    fn = jax.jit(lambda t, f, b: step_lib.loss_sum(apply_fn, type(model), jlora.combine(t, f), b))
    return fn.lower(trainable, frozen, batch)

  def full_step(model, params, batch):
    def step(params, opt_state, batch):
      (total, n), grads = jax.value_and_grad(
        lambda p: step_lib.loss_sum(model.apply, type(model), p, batch), has_aux=True
      )(params)
      grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), grads)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, total / n

    fn = jax.jit(step, donate_argnums=(0, 1))
    return fn.lower(params, tx.init(params), batch)

  # ----------------------------------------------------------------- FLOPs (unrolled layers)
  model_u, params_u, tokenizer = from_pretrained(common.MODEL, scan_layers=False)
  c = model_u.config
  host = common.bench_batch(tokenizer, ROWS, SEQ)
  budget = step_lib.label_budget(host["loss_mask"])
  batch = jax.device_put(
    {k: np.asarray(v) for k, v in step_lib.gather_labels(host, budget).items()}
  )
  T = ROWS * SEQ
  slots = ROWS * budget
  labels = int(host["loss_mask"].sum())

  def count(tree, skip=("embed_tokens", "lm_head")):
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if not any(s in jax.tree_util.keystr(path) for s in skip):
        total += math.prod(leaf.shape)
    return total

  N = count(params_u)
  N_total = count(params_u, skip=())
  d_attn = c.num_attention_heads * c.head_dim
  L, d, V = c.num_hidden_layers, c.hidden_size, c.vocab_size
  head_fwd = 2 * d * V * slots  # per forward pass of the head over the label slots
  attn_fwd = (
    L * 4 * SEQ * d_attn * T
  )  # QK^T and PV over all s x s pairs (jlora computes them densely)

  results = {"flops": {}, "memory": {}, "compile_s": {}}
  print(
    f"N (non-embedding) = {N:,}; all params = {N_total:,}; T = {T} tokens; label slots = {slots} "
    f"({labels} labelled tokens, budget {budget}/row)",
    flush=True,
  )

  def timed_compile(lowered):
    tick = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - tick

  fl = results["flops"]
  for lora in LORA_CONFIGS:
    trainable, frozen = adapted(model_u, params_u, lora)
    comp, secs = timed_compile(forward(model_u, trainable, frozen, batch))
    fl[f"forward ({lora} LoRA params)"] = common.flops_of(comp)
    print(
      f"  forward {lora}: {fl[f'forward ({lora} LoRA params)']:.4g} flops (compile {secs:.1f} s)",
      flush=True,
    )
    comp, secs = timed_compile(lora_step(model_u, trainable, frozen, batch))
    fl[f"LoRA step ({lora})"] = common.flops_of(comp)
    print(
      f"  LoRA step {lora}: {fl[f'LoRA step ({lora})']:.4g} flops (compile {secs:.1f} s)",
      flush=True,
    )
    del trainable, frozen
  comp, secs = timed_compile(full_step(model_u, params_u, batch))
  fl["full FT step"] = common.flops_of(comp)
  print(f"  full FT step: {fl['full FT step']:.4g} flops (compile {secs:.1f} s)", flush=True)
  del model_u, params_u, comp

  analytic = {  # per step, no adapter terms, no elementwise ops
    "forward": 2 * N * T + head_fwd + attn_fwd,
    # LoRA: linear fwd + activation grads; head fwd, recomputed fwd (jax.checkpoint), activation grad;
    # attention scores fwd + 2x fwd in backward (dQ, dK, dS, dV: no weights involved).
    "LoRA step": 4 * N * T + 3 * head_fwd + 3 * attn_fwd,
    # full: also weight grads for the linears and the (tied) head.
    "full FT step": 6 * N * T + 4 * head_fwd + 3 * attn_fwd,
  }

  # ----------------------------------------------------------------- memory + compile time (scanned, real)
  model_s, params_s, _ = from_pretrained(common.MODEL)  # scan_layers=True: what train/sft.py runs
  mem, comp_s = results["memory"], results["compile_s"]
  for lora in LORA_CONFIGS:
    trainable, frozen = adapted(model_s, params_s, lora)
    tick = time.perf_counter()
    lowered = lora_step(model_s, trainable, frozen, batch)
    lower_s = time.perf_counter() - tick
    compiled, secs = timed_compile(lowered)
    comp_s[f"LoRA step ({lora})"] = {
      "lower_s": lower_s,
      "compile_s": secs,
      "total_s": lower_s + secs,
    }
    mem[f"LoRA ({lora})"] = memory_of(compiled)
    print(f"  scanned LoRA step {lora}: lower {lower_s:.1f} s + compile {secs:.1f} s", flush=True)
    del trainable, frozen, compiled
  for lora in LORA_CONFIGS:
    trainable, frozen = adapted(model_s, params_s, lora, quant=True)
    compiled, secs = timed_compile(lora_step(model_s, trainable, frozen, batch))
    mem[f"QLoRA nf4 ({lora})"] = memory_of(compiled)
    comp_s[f"QLoRA nf4 step ({lora})"] = {"compile_s": secs}
    print(f"  scanned QLoRA step {lora}: compile {secs:.1f} s", flush=True)
    del trainable, frozen, compiled
  compiled, secs = timed_compile(full_step(model_s, params_s, batch))
  mem["full FT"] = memory_of(compiled)
  comp_s["full FT step"] = {"compile_s": secs}

  # ----------------------------------------------------------------- tables
  fwd = fl["forward (qv-r8 LoRA params)"]
  rows = []
  for name, value in fl.items():
    kind = (
      "forward"
      if name.startswith("forward")
      else ("full FT step" if name.startswith("full") else "LoRA step")
    )
    base = (
      fl[f"forward ({name.split('(')[1].rstrip(')')} LoRA params)"] if kind == "LoRA step" else fwd
    )
    rows.append(
      [
        name,
        f"{value / 1e9:,.1f}",
        f"{value / base:.2f}x",
        f"{value / T / 1e6:,.1f}",
        f"{value / T / N:.2f} N",
        f"{analytic[kind] / 1e9:,.1f}",
        f"{value / analytic[kind]:.3f}",
      ]
    )
  flops_table = common.markdown_table(
    [
      "computation",
      "XLA GFLOP/step",
      "vs forward",
      "MFLOP/token",
      "FLOP/token in N",
      "analytic GFLOP",
      "XLA / analytic",
    ],
    rows,
  )
  textbook = (
    f"textbook per token: 2N = {2 * N / 1e6:,.0f} M, 4N = {4 * N / 1e6:,.0f} M, 6N = {6 * N / 1e6:,.0f} M "
    f"(N = {N / 1e6:.1f} M non-embedding params). Analytic = linears (2N/4N/6N per token) + LM head "
    f"{head_fwd / 1e9:.2f} GFLOP per pass over {slots} label slots (x1 fwd, x3 LoRA: fwd + remat fwd + "
    f"activation grad, x4 full) + dense attention {attn_fwd / 1e9:.2f} GFLOP fwd (x3 in a train step)."
  )
  mem_rows = [
    [
      name,
      mib(m["argument_bytes"]),
      mib(m["temp_bytes"]),
      mib(m["output_bytes"]),
      mib(m["alias_bytes"]),
    ]
    for name, m in mem.items()
  ]
  mem_table = common.markdown_table(
    [
      "step (scanned, 30 layers)",
      "arguments MiB",
      "temp MiB",
      "outputs MiB",
      "aliased (donated) MiB",
    ],
    mem_rows,
  )
  comp_rows = [
    [
      name,
      f"{v['lower_s']:.1f}" if "lower_s" in v else "not timed",
      f"{v['compile_s']:.1f}",
      f"{v.get('total_s', v['compile_s']):.1f}",
    ]
    for name, v in comp_s.items()
  ]
  comp_table = common.markdown_table(
    ["real step (scanned, 30 layers)", "lower s", "compile s", "total s"], comp_rows
  )

  lora_ratio = fl["LoRA step (qv-r8)"] / fwd
  default_compile = comp_s["LoRA step (all-r16)"]["total_s"]
  checks = {
    "lora_step_le_2.2x_forward (qv-r8)": lora_ratio <= 2.2,
    "compile_le_30s (all-r16, the trainer default)": default_compile <= 30.0,
    "compile_le_30s (qv-r8)": comp_s["LoRA step (qv-r8)"]["total_s"] <= 30.0,
  }
  print()
  print(f"FLOPs per training step, SmolLM2-135M unrolled (scan_layers=False), batch {ROWS}x{SEQ}:")
  print(flops_table)
  print(textbook)
  print()
  print("Compiled memory (memory_analysis), default scanned model, same batch:")
  print(mem_table)
  print()
  print(
    "Compile time of the real train step (jit(make_train_step).lower().compile(), no compilation cache):"
  )
  print(comp_table)
  print()
  for k, v in checks.items():
    print(f"  target {k}: {'met' if v else 'NOT met'}")

  results.update(
    {
      "benchmark": "flops",
      "machine": machine,
      "model": common.MODEL,
      "batch": [ROWS, SEQ],
      "label_slots": slots,
      "labelled_tokens": labels,
      "N_non_embedding": N,
      "N_all": N_total,
      "analytic_flops": analytic,
      "textbook": textbook,
      "checks": checks,
      "lora_step_over_forward_qv_r8": lora_ratio,
      "method": __doc__,
      "tables_markdown": {"flops": flops_table, "memory": mem_table, "compile": comp_table},
    }
  )
  common.write_json(args.out, results)


if __name__ == "__main__":
  main()

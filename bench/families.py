"""The registered model families in XLA's accounting, at real shapes with abstract weights.

    python -m bench.flops --families [--out bench/results/flops_families.json] [--smoke]

For each shape (Gemma-2-2B, Gemma-3-1B, Qwen3-0.6B, Phi-3-mini; random weights that are never
materialised: params, adapters and optimizer state are `jax.ShapeDtypeStruct`s from `eval_shape`,
so only the compiler runs), with LoRA r=16 on all linear layers and a batch of 4 x 128 tokens
labelled everywhere:

1. Compile time: wall time of `jit(make_train_step).lower(...)` plus `.compile()` of the scanned
   step at full depth, as train/sft.py builds it (Gemma scans groups of local/global layers). Target: 30 s.
2. FLOPs per token: XLA's cost analysis counts a scan body once, so the step is compiled at depth
   P and 2P (P = one local/global period; 1 for Qwen3/Phi-3) and extrapolated linearly to the full
   depth (local and global layers cost the same: attention is computed densely, the window masks).
   Compared with the analytic count of bench/flops.py: linears 2N (forward) / 4N (LoRA step) per
   token, N = non-embedding params, plus the LM head at every slot and dense attention.

--smoke shrinks every shape to width 64 and 2 periods, for a seconds-long check that it runs.
"""

from __future__ import annotations

import dataclasses
import math
import time

from bench import common

ROWS, SEQ = 4, 128
RANK = 16


def shapes():
  from jlora.models import GemmaConfig, LlamaConfig

  return {
    "gemma2-2b": GemmaConfig(
      vocab_size=256000,
      hidden_size=2304,
      intermediate_size=9216,
      num_hidden_layers=26,
      num_attention_heads=8,
      num_key_value_heads=4,
      head_dim=256,
      sliding_window=4096,
      model_type="gemma2",
    ),
    "gemma3-1b": GemmaConfig(
      vocab_size=262144,
      hidden_size=1152,
      intermediate_size=6912,
      num_hidden_layers=26,
      num_attention_heads=4,
      num_key_value_heads=1,
      head_dim=256,
      sliding_window=512,
      rope_theta=1_000_000.0,
      attn_logit_softcapping=None,
      final_logit_softcapping=None,
      qk_norm=True,
      model_type="gemma3_text",
    ),
    "qwen3-0.6b": LlamaConfig(
      vocab_size=151936,
      hidden_size=1024,
      intermediate_size=3072,
      num_hidden_layers=28,
      num_attention_heads=16,
      num_key_value_heads=8,
      head_dim=128,
      rope_theta=1_000_000.0,
      tie_word_embeddings=True,
      qk_norm=True,
      model_type="qwen3",
    ),
    "phi3-mini": LlamaConfig(
      vocab_size=32064,
      hidden_size=3072,
      intermediate_size=8192,
      num_hidden_layers=32,
      num_attention_heads=32,
      num_key_value_heads=32,
      fused_projections=True,
      model_type="phi3",
    ),
  }


def period(config) -> int:
  return len(config.plan[0]) if hasattr(config, "plan") else 1


def with_depth(config, layers: int):
  """The config at another depth, keeping the local/global pattern."""
  kwargs = {"num_hidden_layers": layers}
  if hasattr(config, "plan"):
    pattern = config.plan[0]
    kwargs["layer_types"] = tuple(pattern[i % len(pattern)] for i in range(layers))
  return dataclasses.replace(config, **kwargs)


def smoke(config):
  small = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16
  )
  small["num_key_value_heads"] = (
    4 if config.num_key_value_heads == config.num_attention_heads else 2
  )
  return with_depth(dataclasses.replace(config, **small), 2 * period(config))


def abstract_step(config, tx):
  """(lowered LoRA step, seconds its lowering took, lowered forward, N non-embedding params),
  all with abstract weights."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jlora
  from jlora.models import registry
  from train import step as step_lib

  model = registry.family_for_config(config).module_cls(config)
  example = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), example))["params"])
  layout = jlora.trace_layout(model, example)
  cfg = jlora.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets="all-linear")
  trainable, frozen = jax.eval_shape(
    lambda p: jlora.prepare_for_training(p, cfg, jax.random.key(0), layout=layout), params
  )
  ids = np.zeros((ROWS, SEQ), np.int32)
  host = {
    "input_ids": ids,
    "positions": np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1)),
    "segment_ids": np.ones_like(ids),
    "targets": ids,
    "loss_mask": np.ones_like(ids),
  }
  batch = step_lib.gather_labels(host, SEQ)
  opt_state = jax.eval_shape(tx.init, trainable)
  step = jax.jit(step_lib.make_train_step(model, tx), donate_argnums=(0, 1))
  tick = time.perf_counter()
  lowered_step = step.lower(trainable, opt_state, frozen, batch, 0, jax.random.key(0))
  lower_s = time.perf_counter() - tick
  apply_fn = jlora.wrap(model.apply)
  forward = jax.jit(
    lambda t, f, b: step_lib.loss_sum(apply_fn, type(model), jlora.combine(t, f), b)
  )
  lowered_forward = forward.lower(trainable, frozen, batch)
  n = sum(
    math.prod(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    if not any(s in jax.tree_util.keystr(path) for s in ("embed_tokens", "lm_head"))
  )
  return lowered_step, lower_s, lowered_forward, n


def measure(name: str, config, tx) -> dict:
  """Compile time at full depth, and FLOPs per token extrapolated from depths P and 2P."""
  lowered, lower_s, _, n_full = abstract_step(config, tx)
  tick = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - tick
  p = period(config)
  counts = {}
  for depth in (p, 2 * p):
    step, _, forward, _ = abstract_step(with_depth(config, depth), tx)
    counts[depth] = (common.flops_of(forward.compile()), common.flops_of(step.compile()))
  groups = config.num_hidden_layers / p
  fwd, lora = (counts[p][i] + (groups - 1) * (counts[2 * p][i] - counts[p][i]) for i in (0, 1))
  tokens = ROWS * SEQ
  c = config
  head = 2 * c.hidden_size * c.vocab_size * tokens  # every position is a label slot here
  attn = c.num_hidden_layers * 4 * SEQ * c.num_attention_heads * c.head_dim * tokens
  analytic = {"forward": 2 * n_full * tokens + head + attn}
  analytic["LoRA step"] = 4 * n_full * tokens + 3 * head + 3 * attn
  row = {
    "layers": c.num_hidden_layers,
    "period": p,
    "N_non_embedding": n_full,
    "lower_s": lower_s,
    "compile_s": compile_s,
    "total_compile_s": lower_s + compile_s,
    "forward_flops_per_token": fwd / tokens,
    "lora_step_flops_per_token": lora / tokens,
    "analytic_forward_per_token": analytic["forward"] / tokens,
    "analytic_lora_step_per_token": analytic["LoRA step"] / tokens,
  }
  print(
    f"  {name}: compile {lower_s + compile_s:.1f} s (lower {lower_s:.1f}); LoRA step "
    f"{row['lora_step_flops_per_token'] / 1e6:,.1f} MFLOP/token = "
    f"{lora / analytic['LoRA step']:.3f} x analytic; forward "
    f"{fwd / analytic['forward']:.3f} x analytic",
    flush=True,
  )
  return row


def main(out: str, smoke_run: bool = False) -> None:
  import optax

  machine = common.machine()
  print(common.machine_line(machine), flush=True)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  results = {}
  for name, config in shapes().items():
    results[name] = measure(name, smoke(config) if smoke_run else config, tx)
  rows = [
    [
      name,
      r["layers"],
      f"{r['total_compile_s']:.1f}",
      f"{r['lora_step_flops_per_token'] / 1e6:,.1f}",
      f"{r['lora_step_flops_per_token'] / r['analytic_lora_step_per_token']:.3f}",
      f"{r['forward_flops_per_token'] / r['analytic_forward_per_token']:.3f}",
    ]
    for name, r in results.items()
  ]
  table = common.markdown_table(
    [
      "shape (scanned)",
      "layers",
      "compile s",
      "LoRA step MFLOP/token",
      "step XLA / analytic",
      "forward XLA / analytic",
    ],
    rows,
  )
  print(table)
  checks = {f"compile_le_30s ({n})": r["total_compile_s"] <= 30.0 for n, r in results.items()}
  for k, v in checks.items():
    print(f"  target {k}: {'met' if v else 'NOT met'}")
  common.write_json(
    out,
    {
      "benchmark": "flops_families",
      "smoke": smoke_run,
      "machine": machine,
      "batch": [ROWS, SEQ],
      "lora": {"rank": RANK, "targets": "all-linear"},
      "results": results,
      "checks": checks,
      "method": __doc__,
      "tables_markdown": {"families": table},
    },
  )

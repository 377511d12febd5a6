"""Inits and LoRA+ on the embedded SmolLM2-135M and the bundled extraction task.

    python -m bench.inits [--steps 30] [--rows 1] [--seq 96]

For each of default, pissa, loftq (on nf4), QLoRA default (nf4, LoftQ's baseline), eva and
default + LoRA+ (ratio 16): the same seeds, batches and AdamW, `--steps` steps on packed rows of
data/extract_train.jsonl, then the loss on packed rows of data/extract_eval.jsonl (eval loss before
and after). Also LoftQ's reconstruction error ||W - (dequant(Q) + s*A@B)|| / ||W|| against plain
QLoRA's ||W - dequant(Q)|| / ||W||, per layer and module, on the same model. Writes
bench/results/inits.json and prints markdown tables.

The defaults are sized for an idle 2-core CPU (SmolLM2-135M trains at ~76 tokens/s there): one
packed row of 96 tokens per step (one example each: 85 of the 1,500 are cut), not the trainer's
4 x 256, so each variant sees only 30 examples and the differences between inits are small and
noisy; --rows 4 --seq 128 is ~5x slower. LoRA r=8 on q_proj and v_proj only (see MODULES).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen import meta

import jlora
from bench import common
from jlora.inits import reconstruction_error
from jlora.models import from_pretrained
from train import data as data_lib
from train import step as step_lib

# q_proj and v_proj (PEFT's default for Llama): PiSSA's and LoftQ's SVDs of every all-linear
# kernel take minutes on the 2-core CPU (a 576 x 1536 SVD is seconds there, in numpy too).
MODULES = {"self_attn": ("q_proj", "v_proj")}
LORA = jlora.LoraConfig(rank=8, alpha=16.0, targets=[m for ms in MODULES.values() for m in ms])
NF4 = jlora.QuantConfig(kind="nf4")
LR = 5e-4
LORAPLUS_RATIO = 16.0
VARIANTS = ("default", "pissa", "qlora", "loftq", "eva", "loraplus")


def packed(path: str, tokenizer, rows: int, seq: int) -> dict:
  arrays, _ = data_lib.prepare_spec(path, tokenizer, max_length=seq, pack=True, seed=0)
  return {k: v[:rows] for k, v in arrays.items()}


def device_batch(host: dict) -> dict:
  batch = step_lib.gather_labels(host, step_lib.label_budget(host["loss_mask"]))
  return jax.device_put({k: np.asarray(v) for k, v in batch.items()})


def adapted(variant: str, model, params, layout, eva_batches) -> dict:
  """The LoRA params of one variant (same key everywhere)."""
  key = jax.random.key(0)
  if variant in ("default", "loraplus"):
    return jlora.apply(params, LORA, key, layout=layout)
  if variant == "pissa":
    return jlora.apply(params, dataclasses.replace(LORA, init="pissa"), key, layout=layout)
  if variant == "qlora":
    return jlora.apply(jlora.quantize(params, NF4, layout=layout), LORA, key, layout=layout)
  if variant == "loftq":
    cfg = dataclasses.replace(LORA, init="loftq", loftq_iters=2)
    return jlora.loftq(params, cfg, NF4, key, layout=layout)
  run = lambda p, b: model.apply({"params": p}, b["input_ids"], b["positions"], b["segment_ids"])
  mask = lambda b: np.asarray(b["loss_mask"]) > 0  # the labelled tokens (PEFT's use_label_mask)
  cfg = dataclasses.replace(LORA, init="eva")
  return jlora.eva(params, cfg, key, run, eva_batches, token_mask=mask, layout=layout)


def train_and_eval(variant: str, model, lora_params, train: list, evaluation: dict, steps: int):
  trainable, frozen = jlora.split(lora_params)
  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  if variant == "loraplus":
    tx = jlora.optimizer(tx, loraplus_ratio=LORAPLUS_RATIO)
  step_fn = jax.jit(step_lib.make_train_step(model, tx), donate_argnums=(0, 1))
  apply_fn, model_cls = jlora.wrap(model.apply), type(model)

  @jax.jit
  def eval_loss(trainable, frozen):  # frozen an argument: closed over, XLA would fold the model
    total, count = step_lib.loss_sum(
      apply_fn, model_cls, jlora.combine(trainable, frozen), evaluation
    )
    return total / count

  before = float(eval_loss(trainable, frozen))
  opt_state, rng, losses = tx.init(trainable), jax.random.key(0), []
  tick = time.perf_counter()
  for i in range(steps):
    trainable, opt_state, metrics = step_fn(
      trainable, opt_state, frozen, train[i % len(train)], i, rng
    )
    losses.append(float(metrics["loss"]))
  return {
    "variant": variant,
    "eval_before": before,
    "eval_after": float(eval_loss(trainable, frozen)),
    "train_losses": losses,
    "train_s": time.perf_counter() - tick,
  }


def loftq_errors(loftq_params, params) -> list[dict]:
  """Per module and layer: QLoRA's and LoftQ's relative reconstruction errors."""
  plain = meta.unbox(params)
  rows = []
  for group, names in MODULES.items():
    for name in names:
      node = loftq_params["model"]["layers"][group][name]["kernel"]
      w = plain["model"]["layers"][group][name]["kernel"]
      for layer in range(w.shape[0]):
        one = jax.tree.map(lambda x, layer=layer: x[layer], node)
        rows.append(
          {
            "module": name,
            "layer": layer,
            "qlora": reconstruction_error(one.base, w[layer]),
            "loftq": reconstruction_error(one, w[layer]),
          }
        )
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--rows", type=int, default=1, help="packed rows per step")
  parser.add_argument("--seq", type=int, default=96)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out", default="bench/results/inits.json")
  args = parser.parse_args(argv)
  machine = common.machine()
  print(common.machine_line(machine))
  model, params, tokenizer = from_pretrained(common.MODEL)
  layout = jlora.trace_layout(model, jnp.zeros((1, 8), jnp.int32))
  train_host = packed(common.DATA, tokenizer, args.rows * args.steps, args.seq)
  n = len(train_host["input_ids"]) // args.rows
  train = [
    device_batch({k: v[i * args.rows : (i + 1) * args.rows] for k, v in train_host.items()})
    for i in range(n)
  ]
  evaluation = device_batch(packed("data/extract_eval.jsonl", tokenizer, 8, args.seq))
  eva_batches = [
    {k: v[i * args.rows : (i + 1) * args.rows] for k, v in train_host.items()} for i in range(2)
  ]
  results, errors = [], []
  for variant in args.variants.split(","):
    tick = time.perf_counter()
    lora_params = adapted(variant, model, params, layout, eva_batches)
    init_s = time.perf_counter() - tick
    r = {"variant": variant}
    if variant == "loftq":  # before training, which donates (deletes) the initial factors
      errors = loftq_errors(lora_params, params)
    if args.steps:  # --steps 0: the LoftQ reconstruction errors only
      r = train_and_eval(variant, model, lora_params, train, evaluation, args.steps)
      results.append(r)
    r["init_s"] = init_s
    if args.steps:
      print(
        f"{variant:9s} eval {r['eval_before']:.4f} -> {r['eval_after']:.4f}  (init {init_s:.1f} s, train {r['train_s']:.1f} s)",
        flush=True,
      )
    del lora_params
  print(
    common.markdown_table(
      ["variant", "eval loss before", f"eval loss after {args.steps} steps"],
      [[r["variant"], f"{r['eval_before']:.4f}", f"{r['eval_after']:.4f}"] for r in results],
    )
  )
  by_module = {}
  for e in errors:
    by_module.setdefault(e["module"], []).append(e)
  if errors:
    print(
      common.markdown_table(
        [
          "module",
          "QLoRA error (mean over layers)",
          "LoftQ error (mean)",
          "LoftQ / QLoRA (worst layer)",
        ],
        [
          [
            m,
            f"{np.mean([e['qlora'] for e in es]):.4f}",
            f"{np.mean([e['loftq'] for e in es]):.4f}",
            f"{max(e['loftq'] / e['qlora'] for e in es):.3f}",
          ]
          for m, es in by_module.items()
        ],
      )
    )
  common.write_json(
    args.out,
    {
      "machine": machine,
      "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
      "settings": {
        "steps": args.steps,
        "rows": args.rows,
        "seq": args.seq,
        "lr": LR,
        "lora": str(LORA),
        "targets": list(LORA.targets),
        "loraplus_ratio": LORAPLUS_RATIO,
        "loftq_iters": 2,
      },
      "results": results,
      "loftq_errors": errors,
    },
  )


if __name__ == "__main__":
  main()

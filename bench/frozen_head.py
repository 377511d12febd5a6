"""The trainer's loss with a frozen head: its gradient taken in the forward vs recomputed.

train.step runs the LM head at labelled positions in chunks of CE_CHUNK (1,024) positions. With
several chunks and a head that trains nothing, it takes the head's gradient in the forward
(`frozen_head_logps`); a head with trainable leaves (LoRA on lm_head, new token rows) keeps plain
autodiff with each chunk rematerialised (`chunked_logps`), so its backward recomputes every
chunk's logits. With a single chunk the trainer keeps plain autodiff (FROZEN_HEAD_MIN_CHUNKS),
which recomputes nothing there. This compiles the same training step (jlora's linen Llama at
SmolLM2-135M's shape, LoRA r16 on all-linear, tied frozen head, every position labelled, Adam)
both ways and times them in turn (A, B, A, B, ...): the first way forced at any number of chunks,
the second had by making the step see the head as trainable.

    python -m bench.frozen_head [--layers 2] [--batch 4] [--length 1024] [--steps 6]
    python -m bench.frozen_head --length 128 --out bench/results/frozen_head_one_chunk.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from bench import common
from jlora.models import LlamaConfig, LlamaForCausalLM
from train import step as step_lib

WAYS = ("gradient in the forward", "plain autodiff (recomputed with several chunks)")


def compiled_step(model, trainable, frozen, batch, tx):
  apply = jlora.wrap(model.apply)

  def loss(t):
    return jnp.divide(*step_lib.loss_sum(apply, LlamaForCausalLM, jlora.combine(t, frozen), batch))

  def step(trainable, opt_state):
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(trainable, updates), opt_state, value

  return jax.jit(step).lower(trainable, tx.init(trainable)).compile()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--out", default="bench/results/frozen_head.json")
  args = parser.parse_args(argv)
  machine = common.machine()
  config = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    max_position_embeddings=max(2048, args.length),
  )  # fmt: skip
  model = LlamaForCausalLM(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  lora = jlora.LoraConfig(rank=16, alpha=32, targets="all-linear")
  trainable, frozen = jlora.prepare_for_training(params, lora, jax.random.key(1))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length + 1))
  shape = (args.batch, args.length)
  batch = {
    "input_ids": tokens[:, :-1].astype(np.int32),
    "targets": tokens[:, 1:].astype(np.int32),
    "loss_mask": np.ones(shape, np.int32),
    "segment_ids": np.ones(shape, np.int32),
    "positions": np.broadcast_to(np.arange(args.length, dtype=np.int32), shape).copy(),
  }
  batch = step_lib.gather_labels(batch, step_lib.label_budget(batch["loss_mask"]))
  chunks = -(-args.batch * args.length // step_lib.CE_CHUNK)
  tx = optax.adam(1e-4)
  min_chunks, reads_trainable = step_lib.FROZEN_HEAD_MIN_CHUNKS, step_lib.head_reads_trainable
  compiled = {}
  try:
    step_lib.FROZEN_HEAD_MIN_CHUNKS = 1
    compiled[WAYS[0]] = compiled_step(model, trainable, frozen, batch, tx)
    step_lib.head_reads_trainable = lambda *args: True
    compiled[WAYS[1]] = compiled_step(model, trainable, frozen, batch, tx)
  finally:
    step_lib.FROZEN_HEAD_MIN_CHUNKS, step_lib.head_reads_trainable = min_chunks, reads_trainable
  times = {way: [] for way in WAYS}
  losses = {}
  for round_ in range(args.steps + 1):
    for way, step in compiled.items():
      start = time.perf_counter()
      _, _, value = step(trainable, tx.init(trainable))
      value.block_until_ready()
      if round_:
        times[way].append(time.perf_counter() - start)
      losses[way] = float(value)
  print(
    f"{args.layers} layers, d=576, vocab 49,152; {args.batch} x {args.length} tokens "
    f"({chunks} chunks of {step_lib.CE_CHUNK}); {os.cpu_count()} cores"
  )
  rows = []
  for way, step in compiled.items():
    temp = step.memory_analysis().temp_size_in_bytes / 2**20
    seconds = statistics.median(times[way])
    print(f"{way:48} {seconds:7.3f} s/step {temp:8.1f} MiB temporaries loss {losses[way]:.6f}")
    rows.append(dict(way=way, step_s=seconds, temp_mib=temp, loss=losses[way]))
  machine["loadavg_at_end"] = list(os.getloadavg())
  run = dict(vars(args), chunks=chunks)
  common.write_json(args.out, dict(machine=machine, run=run, rows=rows))


if __name__ == "__main__":
  main()

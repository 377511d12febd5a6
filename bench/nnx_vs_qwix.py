"""jlora vs qwix LoRA on the same NNX model: step time and compiled temporaries, side by side.

The model is examples/nnx_llama.py (stock nnx.Linear / nnx.Embed, HF module paths). Default
shape is SmolLM2-135M's (30 layers, d=576, 9 heads / 3 kv, MLP 1536, vocab 49152), batch 4 x 128,
fp32; `--small` runs a reduced shape for a busy machine. Each config builds both from the same
weights, compiles one training step (grads of the adapters + Adam), and times `--steps` steps
after a warm-up; the two frameworks alternate within one process.

    python -m bench.nnx_vs_qwix [--small] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import nnx_llama  # noqa: E402

import jlora  # noqa: E402

SMOLLM2 = nnx_llama.LlamaConfig(
  vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
)  # fmt: skip
SMALL = nnx_llama.LlamaConfig(
  vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip
ALL_LINEAR = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CONFIGS = (("q,v r8", r".*(q_proj|v_proj)", 8), ("all-linear r16", ALL_LINEAR, 16))


def _loss(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def jlora_step(model, pattern, rank, tx):
  graphdef, state = nnx.split(model)
  cfg = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=pattern)
  trainable, frozen = jlora.split(jlora.apply(state, cfg, jax.random.key(1)))
  run = jlora.wrap(graphdef)

  def step(trainable, opt_state, frozen, tokens):
    loss, grads = jax.value_and_grad(
      lambda t: _loss(run(jlora.combine(t, frozen), tokens), tokens)
    )(trainable)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step, (trainable, tx.init(trainable), frozen)


def qwix_step(model, pattern, rank, tx, tokens):
  import qwix

  provider = qwix.LoraProvider([qwix.LoraRule(module_path=pattern, rank=rank, alpha=2 * rank)])
  lora_model = qwix.apply_lora_to_model(model, provider, tokens)
  graphdef, adapters, rest = nnx.split(lora_model, nnx.LoRAParam, ...)

  def step(adapters, opt_state, rest, tokens):
    def loss_fn(adapters):
      return _loss(nnx.merge(graphdef, adapters, rest)(tokens), tokens)

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return step, (adapters, tx.init(adapters), rest)


def measure(step, args, tokens, steps: int) -> tuple[float, float]:
  """(median seconds per step, compiled temporaries in MiB)."""
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args, tokens).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  trainable, opt_state, frozen = args
  trainable, opt_state, loss = compiled(trainable, opt_state, frozen, tokens)
  loss.block_until_ready()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    trainable, opt_state, loss = compiled(trainable, opt_state, frozen, tokens)
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times), temp


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="a reduced shape for a busy machine")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  args = parser.parse_args(argv)
  cfg = SMALL if args.small else SMOLLM2
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length), 0, cfg.vocab_size)
  tx = optax.adam(1e-4)
  print(
    f"model: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, vocab {cfg.vocab_size}; "
    f"batch {args.batch} x {args.length}, fp32; {jax.devices()[0].device_kind}, "
    f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
  )
  print(f"{'config':16} {'jlora s/step':>12} {'qwix s/step':>12} {'speed ratio':>11} "
        f"{'jlora temp MiB':>14} {'qwix temp MiB':>13}")  # fmt: skip
  for name, pattern, rank in CONFIGS:
    model = nnx_llama.LlamaForCausalLM(cfg, nnx.Rngs(0))
    ours = measure(*jlora_step(model, pattern, rank, tx), tokens, args.steps)
    theirs = measure(*qwix_step(model, pattern, rank, tx, tokens), tokens, args.steps)
    print(
      f"{name:16} {ours[0]:12.3f} {theirs[0]:12.3f} {theirs[0] / ours[0]:10.2f}x "
      f"{ours[1]:14.1f} {theirs[1]:13.1f}"
    )


if __name__ == "__main__":
  main()

"""Fine-tune a small NNX transformer (stock nnx.Linear / nnx.Embed layers) with jlora, end to end.

Builds the NNX Llama of examples/nnx_llama.py (HF module names), adapts q/v/down with LoRA,
trains it to copy a token sequence shifted by one, merges, checks the merged model, and saves
a PEFT adapter (loadable by PEFT on the matching transformers LlamaForCausalLM; see
tests/test_nnx.py). Runs on CPU in well under a minute:

    python examples/nnx_finetune.py [output_dir]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import nnx_llama  # noqa: E402

import jlora  # noqa: E402


def main(out_dir: str) -> None:
  model = nnx_llama.LlamaForCausalLM(nnx_llama.LlamaConfig(), nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cfg = jlora.LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
  trainable, frozen = jlora.split(jlora.apply(state, cfg, jax.random.key(1)))
  run = jlora.wrap(graphdef)
  tx = optax.adam(3e-3)
  opt_state = tx.init(trainable)
  print(f"adapter params: {jlora.adapter_count(trainable):,}")

  def loss_fn(trainable, tokens):
    logits = run(jlora.combine(trainable, frozen), tokens[:, :-1])
    targets = tokens[:, 1:]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  @jax.jit
  def step(trainable, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, tokens)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(trainable, updates), opt_state, loss

  # The task: each sequence counts up by one from a random start (mod vocab).
  starts = jax.random.randint(jax.random.key(2), (8, 1), 0, 128)
  tokens = (starts + jnp.arange(16)) % 128
  for i in range(60):
    trainable, opt_state, loss = step(trainable, opt_state, tokens)
    if i % 20 == 0 or i == 59:
      print(f"step {i:2d} loss {float(loss):.4f}")

  params = jlora.combine(trainable, frozen)
  merged = jlora.merge(params)
  diff = jnp.max(jnp.abs(nnx.merge(graphdef, merged)(tokens) - run(params, tokens)))
  print(f"merged NNX model == LoRA forward (max abs diff): {float(diff):.2e}")
  path = jlora.save_adapter(Path(out_dir) / "adapter", params, cfg)
  print(f"PEFT adapter: {sorted(p.name for p in path.iterdir())}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())

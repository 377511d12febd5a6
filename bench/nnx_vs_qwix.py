"""jlora on NNX vs qwix LoRA on the same NNX model vs jlora on its linen Llama, side by side.

The NNX models are examples/nnx_llama.py (stock nnx.Linear / nnx.Embed, HF module paths) and
tunix's Llama3 (examples/tunix_llama.py: google-tunix's model file, custom einsum modules, naive
attention), each run by jlora and by qwix; the linen one is jlora.models.LlamaForCausalLM of the
same shape. Default shape is SmolLM2-135M's (30 layers,
d=576, 9 heads / 3 kv, MLP 1536, vocab 49152, tied), batch 4 x 128, fp32; `--layers N` keeps the
shape but N layers (for a run that fits a few minutes), `--small` a reduced shape for smoke runs.
Configs: q+v r8; all-linear r16; all-linear r16 on an nf4 base (jlora: jlora.quantize, block 64;
qwix: LoraRule(weight_qtype='nf4', tile_size=64), its QLoRA). Each compiles one training step
(grads of the adapters + Adam); a config's compiled steps are then timed in turn (A, B, C, A, B,
C, ...) for `--steps` rounds after one untimed round, in one process. Reported: median s/step,
the speed ratio to qwix on the same model, XLA's compiled temporaries.

Two losses, both the mean cross-entropy of every next token:
  * "full logits": log_softmax over the whole [batch, seq, vocab], as tunix's PeftTrainer computes
    its default loss. qwix is a LoRA library without a loss of its own, so its rows use this.
  * "jlora's": train.step's, the loss `train.sft` trains with (the model's final hidden states,
    the head at labelled positions, log-probs as logit - logsumexp).
jlora runs each model with its own loss, and also with the full-logits loss, which isolates
the LoRA forward: on the same loss the two libraries compile nearly the same program.

    python -m bench.nnx_vs_qwix [--layers N] [--steps N] [--small]
    python -m bench.nnx_vs_qwix --steps 0     # compiled memory only, no timing
"""

from __future__ import annotations

import argparse
import dataclasses
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
import nnx_llama  # noqa: E402  (tunix_llama, from there too, is imported where it is used)

import jlora  # noqa: E402
from bench import common  # noqa: E402

SMOLLM2 = nnx_llama.LlamaConfig(
  vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
)  # fmt: skip
SMALL = nnx_llama.LlamaConfig(
  vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip
ALL_LINEAR = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
NF4_BLOCK = 64
# (name, module regex, rank, nf4 base)
CONFIGS = (
  ("q+v r8", r".*(q_proj|v_proj)", 8, False),
  ("all-linear r16", ALL_LINEAR, 16, False),
  ("all-linear r16 nf4", ALL_LINEAR, 16, True),
)
# Each framework's row is compared with qwix on the same model: tunix's rows with qwix on tunix's
# model, the others with qwix on examples/nnx_llama.py.
QWIX_ON_SAME_MODEL = {
  "jlora NNX": "qwix NNX",
  "jlora NNX, full-logits loss": "qwix NNX",
  "qwix NNX": "qwix NNX",
  "jlora linen": "qwix NNX",
  "jlora tunix": "qwix tunix",
  "jlora tunix, full-logits loss": "qwix tunix",
  "qwix tunix": "qwix tunix",
}
FRAMEWORKS = tuple(QWIX_ON_SAME_MODEL)


def _loss(logits, tokens):
  """The full-logits loss (see the module's docstring)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def labelled(tokens) -> dict:
  """train.step's batch for whole rows: every next token a label, as in `_loss` (the last
  position of a row has none)."""
  rows, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
  return {
    "input_ids": tokens,
    "positions": positions,
    "segment_ids": jnp.ones_like(tokens),
    "label_pos": positions,
    "label_targets": jnp.roll(tokens, -1, axis=1),
    "label_mask": (positions < length - 1).astype(jnp.int32),
  }


def jlora_loss_step(model, tx):
  """The training step on jlora's loss (train.step.loss_sum) for a CausalLM (a linen family or
  an NnxCausalLM): the gradient in the trainable half only, then Adam."""
  from train import step as step_lib

  apply = jlora.wrap(model.apply)

  def loss(trainable, frozen, tokens):
    params = jlora.combine(trainable, frozen)
    return jnp.divide(*step_lib.loss_sum(apply, type(model), params, labelled(tokens)))

  return adam_step(loss, tx)


def lora_config(pattern, rank):
  return jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=pattern)


def nf4():
  return jlora.QuantConfig(kind="nf4", block_size=NF4_BLOCK, double_quant=True)


def adam_step(loss, tx):
  """step(trainable, opt_state, frozen, tokens) for loss(trainable, frozen, tokens): the loss's
  gradient in the trainable half only, then `tx`."""

  def step(trainable, opt_state, frozen, tokens):
    value, grads = jax.value_and_grad(loss)(trainable, frozen, tokens)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(trainable, updates), opt_state, value

  return step


def training_step(logits_fn, tx):
  """adam_step on the full-logits loss of logits = logits_fn(trainable, frozen, tokens)."""
  return adam_step(lambda t, f, x: _loss(logits_fn(t, f, x), x), tx)


# How each NNX model is called on a batch of tokens, and where its logits are in the output.
NNX_LLAMA_CALL = (lambda tokens: (tokens,), lambda out: out)


def tunix_call():
  import tunix_llama

  return tunix_llama.causal_inputs, lambda out: out[0]  # tunix returns (logits, cache)


def jlora_nnx(graphdef, state, call, pattern, rank, quant, tx, tokens):
  """jlora's LoRA (QLoRA with `quant`) on an NNX model's state, its layout traced; the
  full-logits loss."""
  inputs, logits_of = call
  layout = jlora.trace_layout(nnx.merge(graphdef, state), *inputs(tokens))
  trainable, frozen = jlora.prepare_for_training(
    state, lora_config(pattern, rank), jax.random.key(1), quant=nf4() if quant else None,
    layout=layout,
  )  # fmt: skip
  run = jlora.wrap(graphdef)
  step = training_step(lambda t, f, x: logits_of(run(jlora.combine(t, f), *inputs(x))), tx)
  return step, (trainable, tx.init(trainable), frozen)


def jlora_nnx_own_loss(model, pattern, rank, quant, tx, tokens):
  """jlora on an NNX model that declares hidden_states / head (as the trainer sees it:
  NnxCausalLM), on jlora's loss."""
  from jlora.models import nnx_causal

  del tokens
  graphdef, state = nnx.split(model)
  causal = nnx_causal.NnxCausalLM(
    graphdef, layout=nnx_causal.traced_layout(graphdef, state),
    split_head=nnx_causal.splits_head(model),
  )  # fmt: skip
  trainable, frozen = jlora.prepare_for_training(
    state, lora_config(pattern, rank), jax.random.key(1), quant=nf4() if quant else None,
    layout=causal.layout,
  )  # fmt: skip
  return jlora_loss_step(causal, tx), (trainable, tx.init(trainable), frozen)


def qwix_nnx(model, call, pattern, rank, quant, tx, tokens):
  """qwix's LoRA (its QLoRA with `quant`) on an NNX model: LoRAParams trained, the rest frozen."""
  import qwix

  inputs, logits_of = call
  qlora = {"weight_qtype": "nf4", "tile_size": NF4_BLOCK} if quant else {}
  rule = qwix.LoraRule(module_path=pattern, rank=rank, alpha=2 * rank, **qlora)
  provider = qwix.LoraProvider([rule])
  lora_model = qwix.apply_lora_to_model(model, provider, *inputs(tokens), rngs=nnx.Rngs(1))
  graphdef, adapters, rest = nnx.split(lora_model, nnx.LoRAParam, ...)
  step = training_step(lambda a, r, x: logits_of(nnx.merge(graphdef, a, r)(*inputs(x))), tx)
  return step, (adapters, tx.init(adapters), rest)


def jlora_nnx_step(cfg, *args):
  return jlora_nnx_own_loss(nnx_llama.LlamaForCausalLM(cfg, nnx.Rngs(0)), *args)


def jlora_nnx_full_logits_step(cfg, *args):
  graphdef, state = nnx.split(nnx_llama.LlamaForCausalLM(cfg, nnx.Rngs(0)))
  return jlora_nnx(graphdef, state, NNX_LLAMA_CALL, *args)


def qwix_step(cfg, *args):
  return qwix_nnx(nnx_llama.LlamaForCausalLM(cfg, nnx.Rngs(0)), NNX_LLAMA_CALL, *args)


def jlora_linen_step(cfg, pattern, rank, quant, tx, tokens):
  from jlora.models import LlamaConfig, LlamaForCausalLM

  fields = {f: getattr(cfg, f) for f in ("vocab_size", "hidden_size", "intermediate_size")}
  model = LlamaForCausalLM(
    LlamaConfig(
      **fields,
      num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads,
      num_key_value_heads=cfg.num_key_value_heads,
      tie_word_embeddings=cfg.tie_word_embeddings,
      max_position_embeddings=max(2048, tokens.shape[1]),
    )
  )
  params = model.init(jax.random.key(0), tokens)["params"]
  trainable, frozen = jlora.prepare_for_training(
    params, lora_config(pattern, rank), jax.random.key(1), quant=nf4() if quant else None
  )
  return jlora_loss_step(model, tx), (trainable, tx.init(trainable), frozen)


def tunix_model(cfg):
  """(graphdef, state) of tunix's Llama3 (examples/tunix_llama.py) with cfg's shape."""
  import tunix_llama

  return tunix_llama.make(
    num_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
    hidden_dim=cfg.intermediate_size, num_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
    num_kv_heads=cfg.num_key_value_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.rms_norm_eps,
    weight_tying=cfg.tie_word_embeddings,
  )  # fmt: skip


def jlora_tunix_step(cfg, *args):
  import tunix_llama

  return jlora_nnx_own_loss(tunix_llama.ForTrainer(nnx.merge(*tunix_model(cfg))), *args)


def jlora_tunix_full_logits_step(cfg, *args):
  return jlora_nnx(*tunix_model(cfg), tunix_call(), *args)


def qwix_tunix_step(cfg, *args):
  return qwix_nnx(nnx.merge(*tunix_model(cfg)), tunix_call(), *args)


BUILDERS = {
  "jlora NNX": jlora_nnx_step,
  "jlora NNX, full-logits loss": jlora_nnx_full_logits_step,
  "qwix NNX": qwix_step,
  "jlora linen": jlora_linen_step,
  "jlora tunix": jlora_tunix_step,
  "jlora tunix, full-logits loss": jlora_tunix_full_logits_step,
  "qwix tunix": qwix_tunix_step,
}


def compile_step(step, args, tokens):
  """(compiled step, compiled temporaries MiB, arguments MiB)."""
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args, tokens).compile()
  memory = compiled.memory_analysis()
  return compiled, memory.temp_size_in_bytes / 2**20, memory.argument_size_in_bytes / 2**20


def interleaved_times(runs: dict, tokens, steps: int) -> dict[str, float]:
  """Median seconds per step of each compiled step, timed in turn (A, B, C, A, B, C, ...) after
  one untimed step each, so that a change in the machine's load hits every framework alike."""
  state = {name: list(args) for name, (_, args) in runs.items()}
  times = {name: [] for name in runs}
  for round_ in range(steps + 1):
    for name, (compiled, _) in runs.items():
      trainable, opt_state, frozen = state[name]
      start = time.perf_counter()
      trainable, opt_state, loss = compiled(trainable, opt_state, frozen, tokens)
      loss.block_until_ready()
      if round_:
        times[name].append(time.perf_counter() - start)
      state[name] = [trainable, opt_state, frozen]
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="a reduced shape, for smoke runs")
  parser.add_argument("--layers", type=int, default=None, help="layers (default: the shape's)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps; 0: memory only")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
  parser.add_argument("--out", default="bench/results/nnx_vs_qwix.json")
  args = parser.parse_args(argv)
  machine = common.machine()
  cfg = SMALL if args.small else SMOLLM2
  if args.layers:
    cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length), 0, cfg.vocab_size)
  tx = optax.adam(1e-4)
  print(
    f"model: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, vocab {cfg.vocab_size}; "
    f"batch {args.batch} x {args.length}, fp32; {jax.devices()[0].device_kind}, "
    f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"
  )
  print(f"{'config':20} {'framework':30} {'s/step':>8} {'qwix/this':>9} {'temp MiB':>9} "
        f"{'args MiB':>9}")  # fmt: skip
  wanted = args.configs.split(",")
  results = []
  for name, pattern, rank, quant in (c for c in CONFIGS if c[0] in wanted):
    rows, runs = {}, {}
    for framework in FRAMEWORKS:
      step, step_args = BUILDERS[framework](cfg, pattern, rank, quant, tx, tokens)
      compiled, temp, arguments = compile_step(step, step_args, tokens)
      runs[framework] = (compiled, step_args)
      rows[framework] = [None, temp, arguments]
    if args.steps:
      for framework, seconds in interleaved_times(runs, tokens, args.steps).items():
        rows[framework][0] = seconds
    del runs
    for framework, (seconds, temp, arguments) in rows.items():
      qwix_time = rows[QWIX_ON_SAME_MODEL[framework]][0]
      timed = f"{seconds:8.3f} {qwix_time / seconds:8.2f}x" if seconds else f"{'-':>8} {'-':>9}"
      print(f"{name:20} {framework:30} {timed} {temp:9.1f} {arguments:9.1f}")
      results.append(dict(config=name, framework=framework, step_s=seconds, temp_mib=temp))
  print(f"load average {os.getloadavg()[0]:.1f} at the end")
  machine["loadavg_at_end"] = list(os.getloadavg())
  shape = dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size)
  run = dict(steps=args.steps, batch=args.batch, length=args.length, **shape)
  common.write_json(args.out, dict(machine=machine, run=run, rows=results))


if __name__ == "__main__":
  main()

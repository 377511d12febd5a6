"""A tiny NNX transformer-like model for the NNX tests: every way NNX code meets a weight.

Stock layers (nnx.Embed with a tied `attend` head, nnx.LinearGeneral, nnx.Einsum,
nnx.Linear), a custom module that calls jnp.einsum on its own param `w` (as tunix's and
bonsai's attention projections do), one that holds two params and einsums both (as tunix's
Gemma MLP does with gate_proj and up_proj), one that calls lax.dot_general (as MaxText's
DenseGeneral does), and a layer stack built with nnx.vmap and run with nnx.scan. Every
weight carries logical axis names, with the stack's axis named 'layers'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora

VOCAB, D, HEADS, LAYERS = 32, 16, 2, 2
TARGETS = ("q", "o", "up", "down", "gate", "embed", "mlp/gate_proj", "mlp/up_proj")


def _init(names):
  return nnx.with_partitioning(nnx.initializers.normal(0.2), names)


class EinsumProj(nnx.Module):
  """tunix-style: a param `w` contracted by jnp.einsum with the module's own equation."""

  def __init__(self, equation, shape, names, rngs):
    self.equation = equation
    self.w = nnx.Param(_init(names)(rngs.params(), shape))

  def __call__(self, x):
    return jnp.einsum(self.equation, x, self.w[...])


class GatedMlp(nnx.Module):
  """Gemma-style: two params in one module, each contracted by its own jnp.einsum."""

  def __init__(self, din, dhidden, rngs):
    self.gate_proj = nnx.Param(_init(("embed", "mlp"))(rngs.params(), (din, dhidden)))
    self.up_proj = nnx.Param(_init(("embed", "mlp"))(rngs.params(), (din, dhidden)))

  def __call__(self, x):
    gate = jnp.einsum("btd,df->btf", x, self.gate_proj[...])
    return jax.nn.gelu(gate) * jnp.einsum("btd,df->btf", x, self.up_proj[...])


class DotGeneralProj(nnx.Module):
  """MaxText-style: lax.dot_general on the param."""

  def __init__(self, din, dout, names, rngs):
    self.kernel = nnx.Param(_init(names)(rngs.params(), (din, dout)))

  def __call__(self, x):
    return jax.lax.dot_general(x, self.kernel[...], (((x.ndim - 1,), (0,)), ((), ())))


class Block(nnx.Module):
  def __init__(self, rngs, dim):
    D = dim
    head = D // HEADS
    self.q = nnx.LinearGeneral(
      D, (HEADS, head), kernel_init=_init(("embed", "heads", "kv")), rngs=rngs
    )
    self.o = nnx.Einsum(
      "btnh,nhd->btd",
      (HEADS, head, D),
      (D,),
      kernel_init=_init(("heads", "kv", "embed")),
      rngs=rngs,
    )
    self.up = nnx.Linear(D, 2 * D, kernel_init=_init(("embed", "mlp")), rngs=rngs)
    self.down = EinsumProj("btf,fd->btd", (2 * D, D), ("mlp", "embed"), rngs)
    self.gate = DotGeneralProj(D, D, ("embed", "mlp"), rngs)
    self.mlp = GatedMlp(D, 2 * D, rngs)

  def __call__(self, x):
    x = x + self.o(jnp.tanh(self.q(x)))
    hidden = jax.nn.silu(self.up(x)) + jnp.tanh(self.mlp(x))
    return x + self.down(hidden) * jnp.tanh(self.gate(x)).mean(-1, keepdims=True)


class TinyNnx(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, vocab: int = VOCAB, dim: int = D):
    self.embed = nnx.Embed(vocab, dim, embedding_init=_init(("vocab", "embed")), rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(rngs):
      return Block(rngs, dim)

    self.layers = stack(rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, layer):
      return layer(x)

    return self.embed.attend(run(x, self.layers))


def make(seed: int = 0, vocab: int = VOCAB, dim: int = D) -> TinyNnx:
  with nnx.use_eager_sharding(False):
    return TinyNnx(nnx.Rngs(seed), vocab, dim)


def tokens(batch: int = 2, length: int = 5, seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def randomized(params, seed=3):
  """Non-zero A and B everywhere, so the adapters change the output (numpy's generator: eager
  jax.random would compile a sampler per new shape)."""
  rng = np.random.default_rng(seed)
  normal = lambda like: jnp.asarray(0.3 * rng.standard_normal(like.shape), like.dtype)

  def visit(x):
    if not jlora.is_lora(x):
      return x
    return x.replace(a=normal(x.a), b=normal(x.b))

  return jax.tree.map(visit, params, is_leaf=jlora.is_lora)


# Which next tokens of tunix_for_trainer's [2, 7] rows are labels (train.step's loss_mask).
TRAINER_LABELS = np.array([[1, 1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 1]], np.int32)


def tunix_for_trainer(graphdef, state, tokens, mesh=None):
  """tunix's Llama3 behind examples/tunix_llama.ForTrainer as train.sft sees it (NnxCausalLM, its
  head split off), randomized all-linear r3 adapters, and a labelled batch of `tokens` [2, 7]:
  (model, trainable, frozen, batch). With a mesh, the state is placed by the wrapper's
  sharding_rules and the adapters follow it, as the trainer places them."""
  import tunix_llama

  from jlora import sharding as shard_lib
  from jlora.models import nnx_causal
  from train import step as step_lib

  wrapped = tunix_llama.ForTrainer(nnx.merge(graphdef, state))
  graphdef, state = nnx.split(wrapped)
  layout = nnx_causal.traced_layout(graphdef, state)
  model = nnx_causal.NnxCausalLM(
    graphdef, layout=layout, split_head=nnx_causal.splits_head(wrapped)
  )
  cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets="all-linear")
  trainable, frozen = jlora.split(
    randomized(jlora.apply(state, cfg, jax.random.key(1), layout=layout))
  )
  if mesh is not None:
    specs = shard_lib.logical_specs(state, tunix_llama.ForTrainer.sharding_rules)
    placed = jax.device_put(state, shard_lib.named(mesh, specs))
    placed_trainable, frozen = jlora.prepare_for_training(
      placed, cfg, jax.random.key(1), layout=layout
    )
    trainable = jax.tree.map(
      lambda t, p: jax.device_put(t, p.sharding), trainable, placed_trainable
    )
  tokens = np.asarray(tokens, np.int32)
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy()
  batch = {
    "input_ids": tokens,
    "positions": positions,
    "segment_ids": np.ones_like(tokens),
    "targets": np.roll(tokens, -1, axis=1),
    "loss_mask": TRAINER_LABELS,
  }
  return (
    model,
    trainable,
    frozen,
    step_lib.gather_labels(batch, step_lib.label_budget(TRAINER_LABELS)),
  )


def llama_with_a_wrong_split(path):
  """A bad factory for config.model.nnx: examples/nnx_llama.py read from `path`, with a
  hidden_states that doubles the hidden states, so head(hidden_states(x)) is not the call."""
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
  import nnx_llama

  class WrongSplit(nnx_llama.LlamaForCausalLM):
    def __call__(self, *args):
      return self.head(nnx_llama.LlamaForCausalLM.hidden_states(self, *args))

    def hidden_states(self, *args):
      return 2.0 * super().hidden_states(*args)

  model = nnx_llama.from_pretrained(path)
  model.__class__ = WrongSplit
  return model

"""NNX models: jlora's nodes in an nnx.State, the low-rank forward, training, errors.

References are independent of jlora's forward: the unmodified NNX model run on weights
materialised in numpy (W + scale * A @ B, DoRA's m * V / ||V||), XLA's cost analysis.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora.config import IN
from jlora.models.nnx_causal import peft_names, weight_layout
from jlora.quant import quantized_nodes
from tests import gguf_reference, nnx_tiny
from tests.tiny import (
  TINY,
  TINY_VOCAB_SIZE,
  llama_cpp_permute,
  random_hf_state,
  run_on_fake_devices,
  save_numpy_checkpoint,
  tiny_tokenizer,
)
from tests.tiny import sft_config as tiny_sft_config
from train import step as step_lib


@pytest.fixture(scope="module")
def tiny():
  model = nnx_tiny.make()
  tokens = nnx_tiny.tokens()
  graphdef, state = nnx.split(model)
  layout = jlora.trace_layout(model, tokens)
  return model, graphdef, state, layout, tokens


def _delta(node) -> np.ndarray:
  """scale * A @ B in numpy, per stacked layer (roles here are in... then out...)."""
  a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
  n_lead = a.ndim - 1 - node.roles.count(IN)
  if n_lead:
    return node.scale * np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
  return node.scale * np.tensordot(a, b, axes=1)


def _materialised(params, dora=False):
  """Each node replaced by a plain weight, computed in numpy."""

  def visit(x):
    if not jlora.is_lora(x):
      return x
    base = np.asarray(jlora.dequantize(x.base) if jlora.is_node(x.base) else x.base, np.float64)
    v = base + _delta(x)
    if dora:
      n_lead = v.ndim - len(x.roles)
      in_axes = tuple(n_lead + i for i, r in enumerate(x.roles) if r == IN)
      norm = np.sqrt(np.sum(v**2, axis=in_axes, keepdims=True))
      v = v / norm * np.expand_dims(np.asarray(x.magnitude, np.float64), in_axes)
    return jnp.asarray(v, jnp.float32)

  return jax.tree.map(visit, params, is_leaf=jlora.is_node)


def _formed(params):
  """Each node replaced by dequant(base) + scale * A @ B in jnp (differentiable in A and B)."""

  def visit(x):
    if not jlora.is_lora(x):
      return x
    product = lambda a, b: jnp.tensordot(a, b, axes=1)
    for _ in range(x.a.ndim - 1 - x.roles.count(IN)):  # stacked layers
      product = jax.vmap(product)
    return jlora.dequantize(x.base) + x.scale * product(x.a, x.b)

  return jax.tree.map(visit, params, is_leaf=jlora.is_node)


def _run_unmodified(graphdef, plain_state, tokens):
  return nnx.merge(graphdef, plain_state)(tokens)


def test_init_output_equals_the_base_exactly(tiny):
  model, graphdef, state, layout, tokens = tiny
  cfg = jlora.LoraConfig(rank=2, targets=nnx_tiny.TARGETS)
  lora = jlora.apply(state, cfg, jax.random.key(1), layout=layout)
  # Every target (stock layers, the custom einsum `w`, the dot_general kernel) holds a node.
  adapted = {
    p for p, _ in jax.tree_util.tree_flatten_with_path(lora, is_leaf=jlora.is_lora)[0] if True
  }
  assert len(jax.tree.leaves(lora, is_leaf=jlora.is_lora)) > 0 and adapted
  nodes = [x for x in jax.tree.leaves(lora, is_leaf=jlora.is_lora) if jlora.is_lora(x)]
  assert len(nodes) == len(nnx_tiny.TARGETS)
  np.testing.assert_array_equal(jlora.wrap(graphdef)(lora, tokens), model(tokens))


def test_low_rank_forward_equals_the_unmodified_model_on_materialised_weights(tiny):
  model, graphdef, state, layout, tokens = tiny
  cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=nnx_tiny.TARGETS)
  lora = nnx_tiny.randomized(jlora.apply(state, cfg, jax.random.key(1), layout=layout))
  out = jax.jit(jlora.wrap(graphdef))(lora, tokens)
  expected = _run_unmodified(graphdef, _materialised(lora), tokens)
  assert float(jnp.max(jnp.abs(expected - model(tokens)))) > 0.1  # the adapters matter
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  # The user's model instance is untouched, and nothing stays patched after the call.
  assert jnp.einsum is jax.numpy.einsum and nnx.Linear.__call__.__name__ == "__call__"
  assert not hasattr(nnx.Linear.__call__, "__wrapped__")


TUNIX_CONFIG = dict(
  num_layers=2, vocab_size=96, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
  num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5, weight_tying=True, seed=9,
)  # fmt: skip
SHARDED_SCRIPT = (
  f"TUNIX_CONFIG = {TUNIX_CONFIG!r}\n"
  + r"""
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import jlora
from jlora import sharding as shard_lib
from tests import nnx_tiny

# test_unmerge's step (the same model, tokens and adapters) on a data=2, fsdp=2, tensor=2 mesh.
model = nnx_tiny.make()
tokens = nnx_tiny.tokens()
layout = jlora.trace_layout(model, tokens)
graphdef, state = nnx.split(model)
cfg = jlora.LoraConfig(rank=2, targets=nnx_tiny.TARGETS)
rules = (("layers", None), ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
         ("heads", "tensor"), ("kv", None))
mesh = shard_lib.make_mesh(data=2, fsdp=2, tensor=2)
placed = jax.device_put(state, shard_lib.named(mesh, shard_lib.logical_specs(state, rules)))
t8, f8 = jlora.prepare_for_training(placed, cfg, jax.random.key(1), layout=layout)
t, _ = jlora.split(nnx_tiny.randomized(jlora.apply(state, cfg, jax.random.key(1), layout=layout)))
t8 = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), t, t8)
x8 = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
loss = lambda t: jnp.mean(jlora.wrap(graphdef)(jlora.combine(t, f8), x8) ** 2)
loss8, g8 = jax.jit(jax.value_and_grad(loss))(t8)
up = t8["layers"]["up"]["kernel"].get_value()

# tunix's Llama 3 (test_tunix_llama3_*'s model and adapters), placed as the trainer places it:
# each param by its own mesh-axis metadata (fsdp, tp) read through the rules the model declares
# (ForTrainer.sharding_rules: tp is the trainer mesh's tensor axis), on fsdp=4 x tensor=2.
import sys
sys.path.insert(0, "examples")
import tunix_llama
graphdef_t, state_t = tunix_llama.make(**TUNIX_CONFIG)
args_t = tunix_llama.causal_inputs(jax.random.randint(jax.random.key(3), (2, 7), 0, 96))
layout_t = jlora.trace_layout(nnx.merge(graphdef_t, state_t), *args_t)
cfg_t = jlora.LoraConfig(rank=3, alpha=6.0, targets="all-linear")
t, _ = jlora.split(nnx_tiny.randomized(jlora.apply(state_t, cfg_t, jax.random.key(1), layout=layout_t)))
mesh_t = shard_lib.make_mesh(data=1, fsdp=4, tensor=2)
specs_t = shard_lib.logical_specs(state_t, tunix_llama.ForTrainer.sharding_rules)
placed_t = jax.device_put(state_t, shard_lib.named(mesh_t, specs_t))
t8t, f8t = jlora.prepare_for_training(placed_t, cfg_t, jax.random.key(1), layout=layout_t)
t8t = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), t, t8t)
loss_t = lambda t: jnp.mean(jlora.wrap(graphdef_t)(jlora.combine(t, f8t), *args_t)[0] ** 2)
with jax.set_mesh(mesh_t):
  g8t = jax.jit(jax.grad(loss_t))(t8t)
q = t8t["layers"][0]["attn"]["q_proj"]["w"].get_value()
q_base = f8t["layers"][0]["attn"]["q_proj"]["w"].get_value().base
# The same model as train.sft sees it (ForTrainer, head split off) on the same mesh: the trainer's
# loss in chunks of 5 labelled positions, so the head's gradient is taken in the forward, sharded.
from train import step as step_lib
step_lib.CE_CHUNK = 5
model_w, tw, fw, batch_w = nnx_tiny.tunix_for_trainer(graphdef_t, state_t, args_t[0], mesh_t)
loss_w = lambda t: jnp.divide(*step_lib.loss_sum(model_w.apply, type(model_w), jlora.combine(t, fw), batch_w))
with jax.set_mesh(mesh_t):
  gw = jax.jit(jax.grad(loss_w))(tw)
print(json.dumps({
  "loss": float(loss8), "grads": [np.asarray(g).tolist() for g in jax.tree.leaves(g8)],
  "trainer_grads": [np.asarray(g).tolist() for g in jax.tree.leaves(gw)],
  "up_a": str(up.a.sharding.spec), "up_b": str(up.b.sharding.spec),
  "up_base": str(f8["layers"]["up"]["kernel"].get_value().base.sharding.spec),
  "devices": len(up.a.sharding.device_set),
  "tunix_q": [str(q_base.sharding.spec), str(q.a.sharding.spec), str(q.b.sharding.spec)],
  "tunix_grads": [np.asarray(g).tolist() for g in jax.tree.leaves(g8t)],
}))
"""
)


def test_unmerge_recovers_the_base_and_grads_reach_only_the_adapters_on_1_and_8_devices(
  tiny, tunix_llama
):
  _, graphdef, state, layout, tokens = tiny
  cfg = jlora.LoraConfig(rank=2, targets=nnx_tiny.TARGETS)
  lora = nnx_tiny.randomized(jlora.apply(state, cfg, jax.random.key(1), layout=layout))
  trainable, frozen = jlora.split(lora)
  merged = jlora.merge(lora)
  back = jlora.unmerge(merged, trainable)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
    np.testing.assert_allclose(got, want, atol=1e-5)

  def loss(t):
    return jnp.mean(jlora.wrap(graphdef)(jlora.combine(t, frozen), tokens) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
  nodes = [x for x in jax.tree.leaves(grads, is_leaf=jlora.is_lora) if jlora.is_lora(x)]
  assert len(nodes) == len(nnx_tiny.TARGETS)
  for node in nodes:
    assert (
      node.base is None and float(jnp.abs(node.a).sum()) > 0 and float(jnp.abs(node.b).sum()) > 0
    )
  assert len(jax.tree.leaves(grads)) == 2 * len(nodes)  # A and B only: no base, no bias

  # The same step on 8 fake devices (a subprocess): adapters shard like the base weight they
  # adapt (from its NNX metadata): A on the input axes, B on the output axes, the rank never.
  sharded = run_on_fake_devices(SHARDED_SCRIPT, 8)
  assert sharded["up_base"] == "P(None, 'fsdp', 'tensor')"
  assert sharded["up_a"] == "P(None, 'fsdp', None)"
  assert sharded["up_b"] == "P(None, None, 'tensor')"
  assert sharded["devices"] == 8
  np.testing.assert_allclose(sharded["loss"], value, rtol=1e-5)
  # fp32 sums split over 8 devices: the error scales with the largest gradient (measured: about
  # 4e-6 of it in every leaf, a small leaf included).
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  for got, want in zip(sharded["grads"], jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-4, atol=2e-5 * scale)

  # tunix's Llama 3 (test_tunix_llama3_*'s adapters): gradients reach every A and B and no other
  # leaf; placed by tunix's own mesh-axis metadata through the rules its trainer wrapper declares
  # (tp -> tensor) on fsdp=4 x tensor=2, the adapters follow the base
  # (q_proj [embed, heads, head_dim]: A on the embed axis, B on the heads) and the gradients equal
  # the 1-device ones. fp32 through softmax and RMSNorm: measured 2.4e-4 of the largest gradient
  # (5.8e-6 when the state is float64), so the tolerance is 1e-3 of it.
  state_t, layout_t, run_t, _ = tunix_llama
  cfg_t = jlora.LoraConfig(rank=3, alpha=6.0, targets="all-linear")
  lora_t = nnx_tiny.randomized(jlora.apply(state_t, cfg_t, jax.random.key(1), layout=layout_t))
  trainable_t, frozen_t = jlora.split(lora_t)
  loss_t = lambda t: jnp.mean(run_t(jlora.combine(t, frozen_t)) ** 2)
  grads_t = jax.jit(jax.grad(loss_t))(trainable_t)
  assert len(jax.tree.leaves(grads_t)) == 2 * 14  # A and B of the 14 projections, nothing else
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads_t))
  assert sharded["tunix_q"] == [
    "P('fsdp', 'tensor', None)", "P('fsdp', None)", "P(None, 'tensor', None)"
  ]  # fmt: skip
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_t))
  for got, want in zip(sharded["tunix_grads"], jax.tree.leaves(grads_t), strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-3 * scale)

  # The trainer's loss on that mesh (its frozen head's gradient taken in the forward, in chunks of
  # 5) against optax's cross-entropy on the full logits of tunix's own __call__, on 1 device.
  import tunix_llama

  graphdef_t, state_t = tunix_llama.make(**TUNIX_CONFIG)
  tokens_t = jax.random.randint(jax.random.key(3), (2, 7), 0, 96)
  model_w, trainable_w, frozen_w, batch_w = nnx_tiny.tunix_for_trainer(
    graphdef_t, state_t, tokens_t
  )
  mask = nnx_tiny.TRAINER_LABELS

  def full_logits_loss(t):
    logits = model_w.apply({"params": jlora.combine(t, frozen_w)}, tokens_t)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(tokens_t, -1, 1))
    return jnp.sum(xent * mask) / mask.sum()

  want_w = jax.tree.leaves(jax.jit(jax.grad(full_logits_loss))(trainable_w))
  scale = max(float(np.abs(g).max()) for g in want_w)
  for got, want in zip(sharded["trainer_grads"], want_w, strict=True):
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-3 * scale)


def test_optimizer_state_is_twice_the_adapter_floats_and_a_step_trains(tiny):
  _, graphdef, state, layout, tokens = tiny
  lora = jlora.apply(
    state, jlora.LoraConfig(rank=2, targets=nnx_tiny.TARGETS), jax.random.key(1), layout=layout
  )
  tx = jlora.optimizer(optax.adam(1e-2))
  opt_state = tx.init(lora)
  floats = sum(x.size for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
  assert floats == 2 * jlora.adapter_count(lora)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(jlora.wrap(graphdef)(p, tokens) ** 2))(
      params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, first = step(lora, opt_state)
  for _ in range(3):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < float(first)
  frozen_before, frozen_after = jlora.split(lora)[1], jlora.split(params)[1]
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
    np.testing.assert_array_equal(a, b)

  # nnx.Optimizer over the adapted model's Params, with jlora.optimizer as its transform: the
  # same four steps give the same adapters, the base untouched, state for A/B only.
  model = nnx.merge(graphdef, lora)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  floats = [x for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.dtype == jnp.float32]
  assert sum(x.size for x in floats) == 2 * jlora.adapter_count(lora)

  @nnx.jit
  def nnx_step(model, opt):
    loss = lambda m: jnp.mean(jlora.wrap(graphdef)(nnx.state(m), tokens) ** 2)
    opt.update(model, nnx.grad(loss)(model))

  for _ in range(4):
    nnx_step(model, opt)
  trained = nnx.state(model)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jlora.split(trained)[1])):
    np.testing.assert_array_equal(a, b)


def test_lora_step_costs_at_most_2_2x_the_forward_in_xla_flops():
  # The shape of test_lora's linen check (d=128, vocab 256, 8 x 64 tokens, all-linear r=8):
  # only compiled, never run.
  model = nnx_tiny.make(vocab=256, dim=128)
  tokens = jnp.zeros((8, 64), jnp.int32)
  graphdef, state = nnx.split(model)
  cfg = jlora.LoraConfig(rank=8, alpha=16, targets="all-linear")
  lora = jlora.apply(state, cfg, jax.random.key(1), layout=jlora.trace_layout(model, tokens))
  trainable, frozen = jlora.split(lora)
  run = jlora.wrap(graphdef)
  loss = lambda logits: jnp.mean(jax.nn.logsumexp(logits, axis=-1))
  flops = lambda f, x: jax.jit(f).lower(x).compile().cost_analysis()["flops"]
  forward = flops(lambda p: loss(run(p, tokens)), lora)
  step = flops(jax.grad(lambda t: loss(run(jlora.combine(t, frozen), tokens))), trainable)
  assert step <= 2.2 * forward, step / forward


def test_qlora_nf4_double_quant_on_nnx(tiny):
  _, graphdef, state, layout, tokens = tiny
  targets = ("q", "o", "up", "down", "gate", "gate_proj", "up_proj")
  q = jlora.quantize(state, jlora.QuantConfig(block_size=8, targets=targets), layout=layout)
  assert len(quantized_nodes(q)) == len(targets) and jlora.bytes_per_weight(q) < 4
  lora = nnx_tiny.randomized(
    jlora.apply(q, jlora.LoraConfig(rank=2, targets=targets), jax.random.key(1), layout=layout)
  )
  out = jax.jit(jlora.wrap(graphdef))(lora, tokens)
  np.testing.assert_allclose(out, _run_unmodified(graphdef, _materialised(lora), tokens), atol=1e-5)
  # The gradients of A and B (the backward dequantizes again) equal autodiff through the
  # unmodified model on W = dequant(codes) + scale * A @ B, formed in jnp.
  trainable, frozen = jlora.split(lora)
  weights = jax.random.normal(jax.random.key(5), out.shape)
  low_rank = lambda t: jlora.wrap(graphdef)(jlora.combine(t, frozen), tokens)
  formed = lambda t: _run_unmodified(graphdef, _formed(jlora.combine(t, frozen)), tokens)
  got, want = (
    jax.jit(jax.grad(lambda t: jnp.sum(f(t) * weights)))(trainable) for f in (low_rank, formed)
  )
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    # fp32: the two sums run in different orders, so the error scales with the leaf's largest entry.
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


def test_dora_on_nnx(tiny):
  _, graphdef, state, layout, tokens = tiny
  cfg = jlora.LoraConfig(
    rank=2, targets=("q", "o", "up", "down", "gate", "mlp/up_proj"), use_dora=True
  )
  lora = jlora.apply(state, cfg, jax.random.key(1), layout=layout)
  np.testing.assert_allclose(
    jlora.wrap(graphdef)(lora, tokens), nnx.merge(graphdef, state)(tokens), atol=1e-5
  )
  lora = nnx_tiny.randomized(lora)
  lora = jax.tree.map(
    lambda x: x.replace(magnitude=x.magnitude * 1.3) if jlora.is_lora(x) else x,
    lora,
    is_leaf=jlora.is_lora,
  )
  out = jax.jit(jlora.wrap(graphdef))(lora, tokens)
  np.testing.assert_allclose(
    out, _run_unmodified(graphdef, _materialised(lora, dora=True), tokens), atol=2e-5
  )


def test_mixed_adapter_batch_on_nnx(tiny):
  _, graphdef, state, layout, tokens = tiny
  cfg = jlora.LoraConfig(rank=2, targets=nnx_tiny.TARGETS)
  first = nnx_tiny.randomized(jlora.apply(state, cfg, jax.random.key(1), layout=layout), seed=4)
  second = nnx_tiny.randomized(
    jlora.apply(
      state, jlora.LoraConfig(rank=3, targets=("up", "down")), jax.random.key(2), layout=layout
    ),
    seed=5,
  )
  stacked = jlora.stack_adapters({"first": first, "second": second}, state)
  rows = jnp.concatenate([tokens, tokens[:1]])
  ids = jlora.adapter_ids(stacked, ["first", "second", "base"])
  out = jax.jit(jlora.wrap(graphdef))(stacked, rows, adapter_ids=ids)
  np.testing.assert_allclose(
    out[0], _run_unmodified(graphdef, _materialised(first), tokens)[0], atol=1e-5, rtol=1e-5
  )
  np.testing.assert_allclose(
    out[1], _run_unmodified(graphdef, _materialised(second), tokens)[1], atol=1e-5, rtol=1e-5
  )
  np.testing.assert_allclose(out[2], nnx.merge(graphdef, state)(tokens)[0], atol=1e-5, rtol=1e-5)


class _Einsum(nnx.Module):
  """A custom projection calling jnp.einsum on its own param `w` (tunix's pattern)."""

  def __init__(self, d: int):
    self.w = nnx.Param(jax.random.normal(jax.random.key(1), (d, d)))

  def __call__(self, x):
    return jnp.einsum("td,de->te", x, self.w[...])


class _TwoProjections(nnx.Module):
  """x through a stock nnx.Linear and through a custom einsum module."""

  def __init__(self, d: int):
    self.linear = nnx.Linear(d, d, use_bias=False, rngs=nnx.Rngs(0))
    self.proj = _Einsum(d)

  def __call__(self, x):
    return self.linear(x), self.proj(x)


def test_adapter_dropout_on_nnx_drops_the_adapters_input_only():
  """With A = B = I and scale 1 the adapter path adds its dropped input, so the naive definition
  checks directly: out - x W is x with each element either 0 or x / (1 - p), about p of them 0
  (the base sees x whole); each adapted call draws its own mask; one key gives one mask; without
  a key there is no dropout."""
  d, p = 8, 0.5
  graphdef, state = nnx.split(_TwoProjections(d))
  cfg = jlora.LoraConfig(rank=d, alpha=d, targets=["linear", "proj"], dropout=p)
  identity = lambda n: n.replace(a=jnp.eye(d), b=jnp.eye(d)) if jlora.is_lora(n) else n
  lora = jax.tree.map(identity, jlora.apply(state, cfg, jax.random.key(2)), is_leaf=jlora.is_lora)
  run = jax.jit(jlora.wrap(graphdef))
  x = np.asarray(jax.random.normal(jax.random.key(3), (64, d)), np.float64) + 3.0  # never 0
  bases = [
    np.asarray(v, np.float64)
    for v in (state["linear"]["kernel"].get_value(), state["proj"]["w"].get_value())
  ]

  def adapter_inputs(**kwargs):
    outs = run(lora, jnp.asarray(x, jnp.float32), **kwargs)
    return [np.asarray(o, np.float64) - x @ w for o, w in zip(outs, bases)]

  for got in adapter_inputs():
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
  key = jax.random.key(4)
  masks = []
  for got, again in zip(adapter_inputs(dropout_key=key), adapter_inputs(dropout_key=key)):
    np.testing.assert_array_equal(got, again)
    kept = np.isclose(got, x / (1 - p), rtol=1e-4, atol=1e-4)
    assert (kept | np.isclose(got, 0, atol=1e-4)).all()
    assert 0.35 < 1 - kept.mean() < 0.65
    masks.append(kept)
  assert (masks[0] != masks[1]).any()


def test_a_target_that_matches_nothing_lists_the_nnx_paths(tiny):
  _, _, state, layout, _ = tiny
  with pytest.raises(ValueError, match=r"matched no weight(.|\n)*layers/down(.|\n)*layers/q"):
    jlora.apply(state, jlora.LoraConfig(targets=("q_proj",)), jax.random.key(0), layout=layout)


def test_an_unsupported_nnx_layer_is_named():
  conv = nnx.Conv(3, 4, kernel_size=(3,), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(conv)
  lora = jlora.apply(
    state,
    jlora.LoraConfig(rank=2, targets=".*"),
    jax.random.key(0),
    layout={"": ("in", "in", "out")},
  )
  with pytest.raises(ValueError, match=r"can't adapt the 'kernel' of an nnx.Conv"):
    jlora.wrap(graphdef)(lora, jnp.ones((1, 5, 3)))


@pytest.fixture(scope="module")
def tunix_llama():
  """tunix's Llama3 (examples/tunix_llama.py: google-tunix's model file as shipped) at a tiny
  size, tied embeddings (read by index and by `jnp.dot(x, E.T)`)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
  import tunix_llama

  if tunix_llama.model_module() is None:
    pytest.skip("google-tunix is not installed (pip install --no-deps google-tunix==0.1.7)")
  graphdef, state = tunix_llama.make(**TUNIX_CONFIG)
  args = tunix_llama.causal_inputs(jax.random.randint(jax.random.key(3), (2, 7), 0, 96))
  layout = jlora.trace_layout(nnx.merge(graphdef, state), *args)
  run = lambda params: jlora.wrap(graphdef)(params, *args)[0]  # tunix returns (logits, cache)
  plain = lambda params: nnx.merge(graphdef, params)(*args)[0]
  return state, layout, run, plain


def _adapted_modules(params) -> set[str]:
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=jlora.is_lora)[0]
  return {jlora.config.path_str(kp).rpartition("/")[0] for kp, x in flat if jlora.is_lora(x)}


def test_tunix_llama3_low_rank_forward_merge_and_grads(tunix_llama):
  state, layout, run, plain = tunix_llama
  cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets="all-linear")
  lora = jlora.apply(state, cfg, jax.random.key(1), layout=layout)
  # all-linear: the seven projections of each layer (the Einsum `w`s and the nnx.Linear kernels);
  # not the embedding table, which the trace saw read by token ids, whatever its param's name.
  projections = ("q_proj", "k_proj", "v_proj", "o_proj")
  want = {f"layers/{i}/attn/{m}" for i in range(2) for m in projections} | {
    f"layers/{i}/mlp/{m}" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")
  }
  assert _adapted_modules(lora) == want
  base = jax.jit(plain)(state)
  np.testing.assert_array_equal(jax.jit(run)(lora), base)
  lora = nnx_tiny.randomized(lora)
  expected = plain(_materialised(lora))
  assert float(jnp.max(jnp.abs(expected - base))) > 0.1  # the adapters matter
  np.testing.assert_allclose(jax.jit(run)(lora), expected, atol=1e-5, rtol=1e-5)

  back = jlora.unmerge(jlora.merge(lora), jlora.split(lora)[0])
  for got, original in zip(jax.tree.leaves(back), jax.tree.leaves(lora), strict=True):
    np.testing.assert_allclose(got, original, atol=1e-5)
  # Gradients: test_unmerge_..._on_1_and_8_devices, with tunix's own sharding.


def test_tunix_llama3_qlora_nf4_with_dora(tunix_llama):
  state, layout, run, plain = tunix_llama
  q = jlora.quantize(state, jlora.QuantConfig(block_size=8), layout=layout)  # all-linear
  assert len(quantized_nodes(q)) == 14  # 7 per layer; the embedding table stays in fp32
  cfg = jlora.LoraConfig(rank=2, targets="all-linear", use_dora=True)
  lora = nnx_tiny.randomized(jlora.apply(q, cfg, jax.random.key(1), layout=layout))
  np.testing.assert_allclose(
    jax.jit(run)(lora), plain(_materialised(lora, dora=True)), atol=2e-5, rtol=1e-5
  )


@pytest.fixture(scope="module")
def tunix_checkpoint(tmp_path_factory, tunix_llama):
  """(an HF Llama checkpoint dir, untied head, and tunix's Llama3 read from it by train.sft's
  `config.model.nnx` loader: NnxCausalLM, its state)."""
  from jlora.models import LlamaConfig
  from train import nnx_model

  hf_like = LlamaConfig(
    vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    max_position_embeddings=512, rope_theta=1e6,  # tunix's Llama3 always applies 1e6
  )  # fmt: skip
  directory = tmp_path_factory.mktemp("tunix") / "model"
  checkpoint = save_numpy_checkpoint(directory, hf_like, random_hf_state(hf_like, seed=5))
  model, state, _ = nnx_model.load(
    "examples.tunix_llama:from_pretrained", checkpoint, "config.model.nnx", "config.model.path"
  )
  return checkpoint, model, state


def test_tunix_llama3_from_an_hf_checkpoint_through_the_trainers_nnx_seam(
  tmp_path, tunix_checkpoint, monkeypatch
):
  """train.sft's `config.model.nnx` loader on examples/tunix_llama.py:from_pretrained: tunix's
  model reads an HF Llama checkpoint (untied head) and gives jlora's linen Llama's logits (which equal
  transformers', test_llama) on a packed row; the trainer's adapt stage traces the layout of its
  three-axis einsum weights (an nf4 base, then LoRA on all-linear) and the adapted model starts
  at the base model's logits."""
  from train import sft

  checkpoint, model, state = tunix_checkpoint
  linen, params, _ = jlora.models.from_pretrained(checkpoint)
  ids = (np.arange(12, dtype=np.int32)[None] % 50) + 3
  segments = np.array([[1] * 7 + [2] * 5], np.int32)
  positions = np.array([list(range(7)) + list(range(5))], np.int32)
  want = linen.apply({"params": params}, ids, positions, segments)
  np.testing.assert_allclose(
    model.apply({"params": state}, ids, positions, segments), want, atol=1e-5
  )

  # The model declares its call's two halves, so the trainer's loss runs the head at labelled
  # positions only, in chunks (3 positions here) with its gradient taken in the forward: loss and
  # adapter gradients equal optax's cross-entropy on the full logits of tunix's own __call__.
  assert model.split_head
  monkeypatch.setattr(step_lib, "CE_CHUNK", 3)
  adapted = nnx_tiny.randomized(jlora.apply(state, jlora.LoraConfig(rank=2), jax.random.key(3),
                                            layout=model.layout))  # fmt: skip
  tr, fr = jlora.split(adapted)
  targets = np.roll(ids, -1, axis=1)
  mask = np.array([[1, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0]], np.int32)
  batch = {"input_ids": ids, "positions": positions, "segment_ids": segments,
           "targets": targets, "loss_mask": mask}  # fmt: skip
  batch = step_lib.gather_labels(batch, step_lib.label_budget(mask))

  def full_logits_loss(t):
    logits = model.apply({"params": jlora.combine(t, fr)}, ids, positions, segments)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(xent * mask) / mask.sum()

  trainer_loss = lambda t: jnp.divide(
    *step_lib.loss_sum(model.apply, type(model), jlora.combine(t, fr), batch)
  )
  got, want = (jax.jit(jax.value_and_grad(f))(tr) for f in (trainer_loss, full_logits_loss))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    assert np.abs(w).max() > 0
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4)

  config = tiny_sft_config(checkpoint, tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "o")
  config.quant.kind, config.quant.block_size = "nf4", 16
  trainable, frozen = sft.adapt(config, state, layout=weight_layout(model))
  assert len(quantized_nodes(frozen)) == 14 and _adapted_modules(trainable) == {
    f"llama/layers/{i}/{m}" for i in range(2) for m in (
      "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
      "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
  }  # fmt: skip
  base = model.apply({"params": jlora.quantize(state, jlora.QuantConfig(block_size=16), layout=model.layout)},
                     ids, positions, segments)  # fmt: skip
  adapted = model.apply({"params": jlora.combine(trainable, frozen)}, ids, positions, segments)
  np.testing.assert_array_equal(adapted, base)

  # The trainer's PEFT adapter: each einsum weight is the torch Linear over its flattened axes,
  # as HF lays q_proj out ([heads * head_dim, embed]): s * lora_B @ lora_A equals the numpy
  # delta s * A @ B [embed, heads, head_dim] reshaped to HF's layout; it loads back exactly.
  from safetensors.numpy import load_file

  tuned = nnx_tiny.randomized(jlora.combine(trainable, frozen))
  cfg = jlora.LoraConfig(rank=4, alpha=8.0)
  jlora.save_adapter(tmp_path / "adapter", tuned, cfg, model_config=peft_names(model))
  files = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  q = tuned["llama"]["layers"][1]["attn"]["q_proj"]["w"].get_value()
  key = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"  # tunix_llama.HF_NAMES
  peft_delta = q.scale * files[key.format("B")] @ files[key.format("A")]
  np.testing.assert_allclose(peft_delta, _delta(q).reshape(32, -1).T, rtol=1e-5, atol=1e-6)
  back = jlora.load_adapter(
    tmp_path / "adapter", jlora.combine(trainable, frozen), layout=model.layout,
    model_config=peft_names(model),
  )  # fmt: skip
  for got, want in zip(
    jax.tree.leaves(jlora.split(back)[0]), jax.tree.leaves(jlora.split(tuned)[0])
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.ref
def test_tunix_llama3_adapter_loads_in_peft_on_transformers_llama(tmp_path, tunix_checkpoint):
  """tunix's Llama3 read from an HF checkpoint (untied head) gives transformers' logits; its LoRA
  adapter, written under HF's names by tunix_llama.HF_NAMES, loads in PEFT on transformers'
  LlamaForCausalLM and gives jlora's low-rank logits on tunix's model."""
  import peft
  import torch
  import transformers

  checkpoint, model, state = tunix_checkpoint
  hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
  ids = np.random.RandomState(1).randint(0, TINY_VOCAB_SIZE, (2, 9)).astype(np.int32)
  positions, segments = np.broadcast_to(np.arange(9), ids.shape), np.ones_like(ids)
  with torch.no_grad():
    base = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(
    model.apply({"params": state}, ids, positions, segments), base, atol=1e-5
  )

  cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets="all-linear")
  lora = nnx_tiny.randomized(jlora.apply(state, cfg, jax.random.key(0), layout=model.layout))
  ours = jlora.wrap(model.apply)({"params": lora}, ids, positions, segments)
  jlora.save_adapter(tmp_path / "adapter", lora, cfg, model_config=peft_names(model))
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(torch.tensor(ids))
  assert np.abs(theirs.logits.numpy() - base).max() > 0.1
  np.testing.assert_allclose(ours, theirs.logits.numpy(), atol=1e-5)


@pytest.mark.ref
def test_nnx_llama_matches_transformers_and_its_adapter_loads_in_peft(tmp_path):
  """An NNX Llama mirroring transformers' (examples/nnx_llama.py): logits equal HF's; a LoRA
  adapter saved from its nnx.State loads in PEFT and gives jlora's low-rank logits; GGUF files
  exported from the nnx.State (the family declared by an HF config dict) hold PEFT's merged
  weights and PEFT's factors in llama.cpp's layout."""
  import peft
  import torch
  import transformers

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
  import nnx_llama

  hf_cfg = transformers.LlamaConfig(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-6,
  )
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  tokens = np.random.RandomState(0).randint(0, TINY_VOCAB_SIZE, (2, 7))
  with torch.no_grad():
    base_logits = hf(torch.tensor(tokens)).logits.numpy()
  model = nnx_llama.from_hf(hf)
  np.testing.assert_allclose(model(jnp.asarray(tokens)), base_logits, atol=1e-5)

  graphdef, state = nnx.split(model)
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
  lora = nnx_tiny.randomized(jlora.apply(state, cfg, jax.random.key(0)))
  ours = jlora.wrap(graphdef)(lora, jnp.asarray(tokens))
  with pytest.warns(UserWarning, match="vLLM"):
    jlora.save_adapter(tmp_path / "adapter", lora, cfg)
  with torch.no_grad():
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    theirs = peft_model(torch.tensor(tokens))
  assert np.abs(theirs.logits.numpy() - base_logits).max() > 0.1
  np.testing.assert_allclose(ours, theirs.logits.numpy(), atol=1e-5)
  loaded = jlora.load_adapter(tmp_path / "adapter", state)
  np.testing.assert_allclose(jlora.wrap(graphdef)(loaded, jnp.asarray(tokens)), ours, atol=1e-6)

  # GGUF: the merged model against PEFT's merge, renamed/permuted by the tests' own llama.cpp map.
  jlora.export_gguf(tmp_path / "m.gguf", lora, hf_cfg.to_dict(), tiny_tokenizer(), "f32")
  jlora.save_adapter_gguf(tmp_path / "a.gguf", lora, cfg, hf_cfg.to_dict())
  hf_tensors = {k: v.float().numpy() for k, v in peft_model.state_dict().items()}
  with torch.no_grad():
    merged = {k: v.float().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
  expected = gguf_reference.llama_cpp_layout(merged, hf_cfg, permute=True)
  written = gguf_reference.read_tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
  assert sorted(written) == sorted(expected)
  for name, (_, value) in written.items():
    np.testing.assert_allclose(value, expected[name], atol=1e-6, err_msg=name)
  factors = gguf_reference.read_tensors(gguf.GGUFReader(tmp_path / "a.gguf"))
  assert len(factors) == 2 * 3 * hf_cfg.num_hidden_layers
  for key, value in hf_tensors.items():
    if ".lora_" not in key:
      continue
    module = key.split("base_model.model.", 1)[1].split(".lora_")[0]
    side = "a" if ".lora_A." in key else "b"
    if side == "b" and module.endswith("q_proj"):
      value = llama_cpp_permute(value, hf_cfg.num_attention_heads)
    name = gguf_reference.gguf_name(f"{module}.weight")
    np.testing.assert_allclose(factors[f"{name}.lora_{side}"][1], value, atol=1e-6, err_msg=key)


def test_each_weight_of_a_two_weight_module_is_its_own_target(tiny):
  """The Gemma-style GatedMlp holds gate_proj and up_proj: each is addressed as module/param (the
  forward, gradient, QLoRA and DoRA equalities above include both); the module alone names none."""
  _, _, state, layout, _ = tiny
  assert layout["layers/mlp/gate_proj"] == layout["layers/mlp/up_proj"] == ("in", "out")
  with pytest.raises(ValueError, match="matched no weight(.|\n)*layers/mlp/gate_proj\n"):
    jlora.apply(state, jlora.LoraConfig(rank=2, targets=["mlp"]), jax.random.key(0))
  lora = jlora.apply(state, jlora.LoraConfig(rank=2, targets=["gate_proj"]), jax.random.key(0))
  mlp = lora["layers"]["mlp"]
  assert jlora.is_lora(mlp["gate_proj"].get_value()) and not jlora.is_node(
    mlp["up_proj"].get_value()
  )


def test_added_tokens_grow_an_nnx_models_tables_and_their_rows_train():
  """config.tokens.add on NNX: the tokenizer gains the tokens, the embedding and the untied head
  gain mean rows (numpy), old logits stay exactly, a new token's logit is the mean of the old
  ones (the head is linear), and the new rows train as token rows on the low-rank forward."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  import nnx_llama

  from jlora.models.nnx_causal import NnxCausalLM, family_config

  llama = nnx_llama.LlamaForCausalLM(nnx_llama.LlamaConfig(vocab_size=TINY_VOCAB_SIZE), nnx.Rngs(0))
  graphdef, state = nnx.split(llama)
  model, tokenizer = NnxCausalLM(graphdef, family_config(llama)), tiny_tokenizer()
  ids = jnp.asarray([[5, 9, 17, 3]])
  before = np.asarray(jax.jit(model.apply)({"params": state}, ids))
  model, grown, tables = jlora.tokens.add_tokens(model, state, tokenizer, ["<a>", "<b>"])
  new = tokenizer.convert_tokens_to_ids(["<a>", "<b>"])
  assert model.config.vocab_size == TINY_VOCAB_SIZE + 2 == max(new) + 1
  assert sorted(tables) == ["lm_head", "model/embed_tokens"]
  for path, transpose in (
    (("model", "embed_tokens", "embedding"), False),
    (("lm_head", "kernel"), True),
  ):
    old_rows, rows = (
      np.asarray(functools.reduce(lambda t, k: t[k], path, tree).get_value(), np.float64)
      for tree in (state, grown)
    )
    old_rows, rows = (old_rows.T, rows.T) if transpose else (old_rows, rows)
    np.testing.assert_allclose(rows[new], np.stack([old_rows.mean(0)] * 2), atol=1e-6)
  after = np.asarray(jax.jit(model.apply)({"params": grown}, ids))
  np.testing.assert_array_equal(after[..., :TINY_VOCAB_SIZE], before)
  np.testing.assert_allclose(after[..., new[0]], before.mean(-1), atol=1e-5)

  cfg = jlora.LoraConfig(rank=2, targets=["q_proj"], trainable_token_indices=tables)
  trainable, frozen = jlora.split(jlora.apply(grown, cfg, jax.random.key(1)))
  with_new = jnp.asarray([[5, new[0], 9, 3]])  # <a> is read (embedding row), <b> predicted (head)
  loss = lambda t: (
    -jnp.mean(model.apply({"params": jlora.combine(t, frozen)}, with_new)[..., new[1]])
  )
  grads = jax.jit(jax.grad(loss))(trainable)
  rows = [x for x in jax.tree.leaves(grads) if x.shape[0] == 2]  # the 2 added rows per table
  assert rows and all(float(jnp.abs(r).sum()) > 0 for r in rows)


PAIRS = [
  {"prompt": f"Name {1 + i % 3} colours, #{i}.", "chosen": "red, green", "rejected": "a cat"}
  for i in range(8)
]


def test_train_dpo_takes_an_nnx_model(tmp_path):
  """config.model.nnx in train.dpo: examples/nnx_llama.py read from a tiny checkpoint goes through
  the same stages (data, reference, step, eval, outputs). Before training B = 0, so the policy
  is the reference: every reward is 0 and the sigmoid pair loss is log 2; two steps raise the
  chosen answers' reward margin, and the PEFT adapter it writes loads onto the NNX state."""
  from configs.dpo import get_config
  from train import dpo

  llama = jlora.models.LlamaConfig(
    vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
  )  # fmt: skip
  model_dir = save_numpy_checkpoint(tmp_path / "model", llama, random_hf_state(llama))
  for name, rows in (("train", PAIRS), ("eval", PAIRS[:4])):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = get_config()
  values = {**TINY, "steps": 2, "eval_every": 2, "save_every": 2, "samples": 0}
  values.update({"data.max_length": 48, "model.path": str(model_dir), "output_dir": str(tmp_path)})
  values.update({"model.nnx": "examples.nnx_llama:from_pretrained", "optim.lr": 5e-2})
  values.update({"dpo.nll_weight": 0.0, "eval.metrics": ""})  # eval_loss: the pair loss alone
  values.update(
    {"data.train": str(tmp_path / "train.jsonl"), "data.eval": str(tmp_path / "eval.jsonl")}
  )
  for key, value in values.items():
    *parents, leaf = key.split(".")
    functools.reduce(lambda node, k: node[k], parents, config)[leaf] = value
  summary = dpo.run(config, progress=False)
  before, after = summary["before"], summary["after"]
  assert before["reward_margin"] == pytest.approx(0, abs=1e-5)
  assert before["reward_chosen"] == pytest.approx(0, abs=1e-5)
  assert before["eval_loss"] == pytest.approx(np.log(2), abs=1e-5)
  assert after["reward_margin"] > 0.01 and after["eval_loss"] < np.log(2)
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  import nnx_llama

  graphdef, state = nnx.split(nnx_llama.from_pretrained(model_dir))
  tuned = jlora.load_adapter(tmp_path, state)
  assert jlora.adapter_count(tuned) > 0

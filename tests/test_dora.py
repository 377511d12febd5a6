"""Trainable fields declared once, and DoRA.

References: a numpy DoRA weight m * V / ||V|| (V = W + s*A@B, norm over the kernel's input
axes) run through the unmodified model; hand-built subclasses of LoraWeight. The PEFT
comparisons are in test_peft.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import PartitionSpec as P

import jlora
from jlora import sharding
from jlora.optim import ADAPTER, adapter_labels
from tests.test_lora import MODELS, base_of, randomize

# --------------------------------------------------------------------------- trainable fields


@struct.dataclass
class ShiftedLora(jlora.LoraWeight):
  """A made-up variant with one more trainable child: a per-output shift [*lead, out]."""

  shift: object = None
  trainable_fields = ("a", "b", "shift")

  def field_axes(self, kernel_axes, rank):
    return {**super().field_axes(kernel_axes, rank), "shift": [kernel_axes[-1]]}


def test_a_new_trainable_field_is_split_combined_labelled_sharded_counted_and_optimised():
  base = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 4)), jnp.float32)
  node = ShiftedLora(
    base=base,
    a=jnp.ones((2, 6, 3)),
    b=jnp.ones((2, 3, 4)),
    scale=1.0,
    roles=("in", "out"),
    shift=jnp.zeros((2, 4)),
  )
  params = {"layer": {"kernel": node}, "norm": jnp.ones(4)}

  trainable, frozen = jlora.split(params)
  assert trainable["layer"]["kernel"].shift is not None and frozen["layer"]["kernel"].shift is None
  assert trainable["layer"]["kernel"].base is None and trainable["norm"] is None
  chex.assert_trees_all_equal(jlora.combine(trainable, frozen), params)

  labels = adapter_labels(params)["layer"]["kernel"]
  assert (labels.a, labels.b, labels.shift) == (ADAPTER,) * 3 and labels.base == "frozen"

  specs = sharding.param_specs(
    params, {"layer": {"kernel": P("layers", "fsdp", "tensor")}, "norm": P()}
  )
  kernel_specs = specs["layer"]["kernel"]
  assert kernel_specs.shift == P("layers", "tensor")
  assert (kernel_specs.a, kernel_specs.b) == (
    P("layers", "fsdp", None),
    P("layers", None, "tensor"),
  )

  assert jlora.adapter_count(params) == 2 * 6 * 3 + 2 * 3 * 4 + 2 * 4

  tx = jlora.optimizer(optax.sgd(1.0))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["layer"]["kernel"].shift, -np.ones((2, 4)))
  np.testing.assert_array_equal(new["layer"]["kernel"].base, base)
  np.testing.assert_array_equal(new["norm"], np.ones(4))


# --------------------------------------------------------------------------- DoRA


def dora(name, rank=4, alpha=8.0, seed=0, **kw):
  model, x, base, layout = base_of(name)
  exclude = ("embed",) if name == "scanned" else None  # DoRA refuses embeddings
  cfg = jlora.LoraConfig(
    rank=rank, alpha=alpha, targets=MODELS[name][2], use_dora=True, exclude=exclude, **kw
  )
  return model, x, base, jlora.apply(base, cfg, jax.random.key(seed + 1), layout=layout)


def _perturb_magnitudes(params, seed):
  rng = np.random.default_rng(seed)

  def fill(n):
    if not isinstance(n, jlora.DoraWeight):
      return n
    noise = 1.0 + 0.2 * rng.standard_normal(n.magnitude.shape)
    return n.replace(magnitude=jnp.asarray(np.asarray(n.magnitude) * noise, jnp.float32))

  return jax.tree.map(fill, params, is_leaf=jlora.is_lora)


def _numpy_dora_weight(n) -> np.ndarray:
  """m * V / ||V||, V = W + s*A@B, in float64; the test models keep in-axes before out-axes."""
  a, b = np.asarray(n.a, np.float64), np.asarray(n.b, np.float64)
  n_lead = n.ndim - len(n.roles)
  n_in = n.roles.count("in")
  lead = a.shape[:n_lead]
  v = np.asarray(n.base, np.float64) + n.scale * (
    a.reshape(*lead, -1, a.shape[-1]) @ b.reshape(*lead, b.shape[n_lead], -1)
  ).reshape(n.shape)
  in_axes = tuple(range(n_lead, n_lead + n_in))
  norm = np.sqrt(np.sum(v**2, axis=in_axes, keepdims=True))
  m = np.expand_dims(np.asarray(n.magnitude, np.float64), in_axes)
  return m * v / norm


@pytest.mark.parametrize("name", list(MODELS))
def test_dora_forward_equals_materialised_formula(name):
  model, x, base, params = dora(name, use_rslora=name == "mlp")
  params = _perturb_magnitudes(randomize(params, 3), 4)
  wrapped = np.asarray(jlora.wrap(model.apply)({"params": params}, x))
  materialised = jax.tree.map(
    lambda n: jnp.asarray(_numpy_dora_weight(n), jnp.float32) if jlora.is_lora(n) else n,
    params,
    is_leaf=jlora.is_lora,
  )
  reference = np.asarray(model.apply({"params": materialised}, x))
  scale = max(1.0, float(np.abs(reference).max()))
  np.testing.assert_allclose(wrapped, reference, atol=1e-5 * scale, rtol=1e-5)
  assert not np.allclose(wrapped, model.apply({"params": base}, x), atol=1e-3)
  # merge == the factored forward
  merged = np.asarray(model.apply({"params": jlora.merge(params)}, x))
  np.testing.assert_allclose(merged, wrapped, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_dora_init_equals_base(name):
  model, x, base, params = dora(name)
  out = np.asarray(jlora.wrap(model.apply)({"params": params}, x))
  expected = np.asarray(model.apply({"params": base}, x))
  if name == "scanned":
    # m = ||W|| is summed outside the scan and the forward's norm inside it: XLA may order the
    # two float32 sums differently, so m / norm is 1 to within an ulp there.
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-6)
  else:
    np.testing.assert_array_equal(out, expected)


def test_dora_unmerge_recovers_the_base():
  _, _, base, params = dora("transformer")
  params = _perturb_magnitudes(randomize(params, 5), 6)
  norms = jlora.weight_norms(params)
  trainable, _ = jlora.split(params)
  restored = jlora.unmerge(jlora.merge(params), trainable, norms)
  as_base = jax.tree.map(
    lambda n: n.base if jlora.is_lora(n) else n, restored, is_leaf=jlora.is_lora
  )
  chex.assert_trees_all_close(as_base, base, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="needs its weight norms"):
    jlora.unmerge(jlora.merge(params), trainable)


def test_dora_norm_is_a_constant_of_the_backward():
  """Gradients of A, B and m equal those of m * V / c with c = ||V|| frozen as a number."""
  model, x, _, params = dora("mlp")
  params = _perturb_magnitudes(randomize(params, 1), 2)
  run = jlora.wrap(model.apply)
  loss = lambda p: jnp.sum(run({"params": p}, x) * jnp.arange(8.0))
  node = params["down"]["kernel"]
  grads = jax.grad(loss)(params)["down"]["kernel"]
  v = np.asarray(node.base, np.float64) + node.scale * np.asarray(node.a) @ np.asarray(node.b)
  frozen_norm = jnp.asarray(np.linalg.norm(v, axis=0), jnp.float32)

  def by_hand(a, b, m):
    w = (node.base + node.scale * a @ b) * (m / frozen_norm)[None, :]
    return loss({**params, "down": {**params["down"], "kernel": w}})

  expected = jax.grad(by_hand, argnums=(0, 1, 2))(node.a, node.b, node.magnitude)
  for got, want in zip((grads.a, grads.b, grads.magnitude), expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_qlora_dora_step_trains():
  model, x, base, layout = base_of("transformer")
  quantized = jlora.quantize(base, jlora.QuantConfig(block_size=16), layout=layout)
  cfg = jlora.LoraConfig(rank=4, targets=("query", "value", "mlp_up_0"), use_dora=True)
  params = jlora.apply(quantized, cfg, jax.random.key(0), layout=layout)
  node = params["attn_0"]["query"]["kernel"]
  # m starts at ||dequant(W4)||, so the adapted model starts at the quantized base exactly.
  np.testing.assert_allclose(
    node.magnitude,
    np.linalg.norm(np.asarray(node.base.dequantize()), axis=0),
    rtol=1e-6,
  )
  trainable, frozen = jlora.split(params)
  run = jlora.wrap(model.apply)
  target = jax.random.randint(jax.random.key(5), x.shape, 0, 64)
  tx = optax.adam(3e-2)

  def loss(t):
    logits = run({"params": jlora.combine(t, frozen)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

  @jax.jit
  def step(t, state):
    value, grads = jax.value_and_grad(loss)(t)
    updates, state = tx.update(grads, state, t)
    return optax.apply_updates(t, updates), state, value

  state, first = tx.init(trainable), None
  new = trainable
  for _ in range(10):
    new, state, value = step(new, state)
    first = first if first is not None else float(value)
  assert float(value) < 0.8 * first
  moved = new["attn_0"]["query"]["kernel"].magnitude
  assert not np.allclose(moved, trainable["attn_0"]["query"]["kernel"].magnitude)


def test_dora_on_an_embedding_is_refused():
  _, _, base, layout = base_of("scanned")
  with pytest.raises(ValueError, match=r"use_dora=True selects the embedding 'embed'"):
    jlora.apply(base, jlora.LoraConfig(targets=("embed",), use_dora=True), jax.random.key(0))


@pytest.mark.parametrize("quantized", [False, True])
def test_dora_backward_keeps_no_weight_sized_residual(quantized, capsys):
  """Only activations, the rank-sized factors and the [out] norm are saved for the backward."""
  import flax.linen as nn
  from jax.ad_checkpoint import print_saved_residuals

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(48, use_bias=False, name="dense")(x)

  model, x = Layer(), jnp.ones((4, 64))
  base = model.init(jax.random.key(0), x)["params"]
  if quantized:
    base = jlora.quantize(base, jlora.QuantConfig(block_size=16))
  cfg = jlora.LoraConfig(rank=4, targets=["dense"], use_dora=True)
  trainable, frozen = jlora.split(jlora.apply(base, cfg, jax.random.key(1)))
  run = jlora.wrap(model.apply)
  print_saved_residuals(lambda t: jnp.sum(run({"params": jlora.combine(t, frozen)}, x)), trainable)
  saved = capsys.readouterr().out
  assert "[48]" in saved and "weight_norm" in saved  # the norm itself is kept: 48 floats
  assert "[64,48]" not in saved, saved

"""NF4 / int4 quantized frozen base: exactness, error bounds, storage cost, stacking,
sharding, errors, jit, and QLoRA (quantized base + LoRA adapters).

References are independent of jlora.quant's decoder where it matters: weights built
directly from the published code tables times block scales, numpy per-block bounds,
and the float model run on explicitly dequantized weights.
"""

import functools
import math
import textwrap

import chex
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings

import jlora
from jlora import quant
from jlora.quant import QuantConfig, QuantizedWeight
from tests.tiny import run_on_fake_devices

# The code indices each kind actually produces (int4 never emits index 0 = -8/7).
PRODUCED = {"nf4": np.arange(16), "int4": np.arange(1, 16)}
# Indices of code values +-1 (they decode to exactly the block absmax).
UNIT = {"nf4": (0, 15), "int4": (1, 15)}


def table(kind):
  return quant.code_table(kind).astype(np.float64)


def half_max_gap(kind):
  values = np.sort(table(kind)[PRODUCED[kind]])
  return float(np.max(np.diff(values)) / 2)


def test_nf4_table_is_bitsandbytes():
  assert quant.NF4_TABLE.dtype == np.float32 and quant.NF4_TABLE.shape == (16,)
  assert quant.NF4_TABLE[0] == -1.0 and quant.NF4_TABLE[7] == 0.0 and quant.NF4_TABLE[15] == 1.0
  np.testing.assert_array_equal(
    quant.NF4_TABLE[[1, 8, 14]],
    np.float32([-0.6961928009986877, 0.07958029955625534, 0.7229568362236023]),
  )
  assert np.all(np.diff(quant.NF4_TABLE) > 0)
  np.testing.assert_array_equal(quant.INT4_TABLE * 7, np.arange(-8, 8))


# --------------------------------------------------------------------------- exactness


def _from_codes(kind, rng, lead, n_blocks, block, n_out):
  """w = table[idx] * scale, each block holding a +-1 code so its absmax is exactly `scale`."""
  idx = rng.choice(PRODUCED[kind], size=(*lead, n_blocks, block, n_out))
  unit_pos = rng.randint(0, block, size=(*lead, n_blocks, n_out))
  unit_val = rng.choice(UNIT[kind], size=(*lead, n_blocks, n_out))
  np.put_along_axis(idx, unit_pos[..., None, :], unit_val[..., None, :], axis=-2)
  scale = (2.0 ** rng.uniform(-3, 3, size=(*lead, n_blocks, 1, n_out))).astype(np.float32)
  w = quant.code_table(kind)[idx] * scale
  return w.reshape(*lead, n_blocks * block, n_out).astype(np.float32), idx.reshape(
    *lead, n_blocks * block, n_out
  )


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  lead_block=st.sampled_from([((), 2, 3, 5), ((3,), 64, 2, 7)]), seed=st.integers(0, 2**31 - 1)
)
@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_every_code_value_round_trips_exactly(kind, lead_block, seed):
  # A few fixed shapes (each new shape costs a compile); hypothesis varies the values.
  lead, block, n_blocks, n_out = lead_block
  w, idx = _from_codes(kind, np.random.RandomState(seed), lead, n_blocks, block, n_out)
  q = quant.quantize_array(w, kind=kind, block_size=block, double_quant=False, n_lead=len(lead))
  np.testing.assert_array_equal(np.asarray(q.code_indices()), idx)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), w)
  # With double quantization the scales move slightly, but re-quantizing the decoded
  # weights reproduces the same 4-bit codes.
  dq = quant.quantize_array(w, kind=kind, block_size=block, double_quant=True, n_lead=len(lead))
  np.testing.assert_array_equal(np.asarray(dq.code_indices()), idx)
  again = quant.quantize_array(
    dq.dequantize(), kind=kind, block_size=block, double_quant=True, n_lead=len(lead)
  )
  np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(dq.codes))


def test_packing_layout_low_nibble_is_even_row():
  w = np.zeros((4, 1), np.float32)
  w[:, 0] = [1.0, -1.0, 0.0, 1.0]  # nf4 indices 15, 0, 7, 15
  q = quant.quantize_array(w, kind="nf4", block_size=4, double_quant=False)
  np.testing.assert_array_equal(np.asarray(q.codes)[:, 0], [15 | (0 << 4), 7 | (15 << 4)])


# --------------------------------------------------------------------------- error bounds


def _blocks(x, block):
  """[*lead, I, O] -> [*lead, I // block, block, O]."""
  return x.reshape(*x.shape[:-2], x.shape[-2] // block, block, x.shape[-1])


@pytest.mark.parametrize("kind", ["nf4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_normal_weights_error_within_half_gap_per_block(kind, double_quant):
  block = 64
  w = np.random.RandomState(0).randn(2, 512, 96).astype(np.float32) * 0.02
  q = quant.quantize_array(w, kind=kind, block_size=block, double_quant=double_quant, n_lead=1)
  err = _blocks(np.abs(np.asarray(q.dequantize(), np.float64) - w), block).max(axis=-2)
  absmax = _blocks(np.abs(w.astype(np.float64)), block).max(axis=-2)  # true per-block absmax
  bound = half_max_gap(kind) * absmax
  if double_quant:
    used = np.asarray(q.block_absmax(), np.float64)
    # Double quantization: one int8 step of the 256-block's scale, at most scale / 254 ...
    scale = np.repeat(np.asarray(q.absmax_scale, np.float64), 256, axis=-1)[:, : absmax[0].size]
    dq_err = np.abs(used - absmax).reshape(2, -1)
    assert np.all(dq_err <= scale / 254 * (1 + 1e-5) + 1e-9)
    # ... and a weight decodes as code * used absmax, |code| <= 1.
    bound = bound + np.abs(used - absmax)
  assert np.all(err <= bound * (1 + 1e-5) + 1e-9), float(np.max(err - bound))


def test_nf4_beats_int4_on_normal_weights():
  w = np.random.RandomState(1).randn(1024, 256).astype(np.float32)
  mae = {
    k: float(np.mean(np.abs(np.asarray(quant.quantize_array(w, kind=k).dequantize()) - w)))
    for k in ("nf4", "int4")
  }
  assert mae["nf4"] < mae["int4"], mae


# --------------------------------------------------------------------------- storage


def realistic_tree(seed=0):
  rng = np.random.RandomState(seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02)
  return {
    "embed_tokens": {"embedding": normal(1024, 576)},
    "layer": {
      "q_proj": {"kernel": normal(576, 576)},
      "k_proj": {"kernel": normal(576, 192)},
      "gate_proj": {"kernel": normal(576, 1536)},
      "down_proj": {"kernel": normal(1536, 576), "bias": normal(576)},
      "big": {"kernel": normal(1024, 4096)},
    },
    "norm": {"scale": jnp.ones(576)},
    "lm_head": {"kernel": normal(576, 1024)},
  }


def test_bytes_per_weight_over_actual_leaves():
  params = realistic_tree()
  dq = quant.quantize(params, QuantConfig(double_quant=True))
  plain = quant.quantize(params, QuantConfig(double_quant=False))
  for tree in (dq, plain):
    assert isinstance(tree["layer"]["q_proj"]["kernel"], QuantizedWeight)
    assert not isinstance(tree["lm_head"]["kernel"], QuantizedWeight)
    assert not isinstance(tree["embed_tokens"]["embedding"], QuantizedWeight)
    assert isinstance(tree["layer"]["down_proj"]["bias"], jax.Array)
  dq_bpw, plain_bpw = quant.bytes_per_weight(dq), quant.bytes_per_weight(plain)
  # Counted by hand over the leaves: sizes times itemsizes.
  nodes = quant.quantized_nodes(dq)
  by_hand = sum(x.size * x.dtype.itemsize for n in nodes for x in jax.tree.leaves(n)) / sum(
    n.size for n in nodes
  )
  assert dq_bpw == pytest.approx(by_hand)
  assert 0.5156 <= dq_bpw <= 0.52, dq_bpw  # QLoRA: 4.127 bits = 0.5159 bytes
  assert plain_bpw == pytest.approx(0.5625), plain_bpw
  big = dq["layer"]["big"]["kernel"]
  assert big.nbytes / big.size == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + 4 / (1024 * 4096))
  # The embedding is quantized only when named.
  named = quant.quantize(params, QuantConfig(targets=["embed_tokens", "q_proj"]))
  assert isinstance(named["embed_tokens"]["embedding"], QuantizedWeight)
  assert not isinstance(named["layer"]["k_proj"]["kernel"], QuantizedWeight)
  np.testing.assert_allclose(
    quant.dequantize(named)["embed_tokens"]["embedding"],
    params["embed_tokens"]["embedding"],
    atol=0.02 * 5 * 0.16,
  )


def test_dequantize_tree_and_dtype():
  params = {"a": {"kernel": jnp.ones((64, 8), jnp.bfloat16)}, "b": {"kernel": jnp.ones((64, 8))}}
  q = quant.quantize(params, QuantConfig(dtype=jnp.float16, targets=["a"]))
  assert q["a"]["kernel"].dtype == jnp.float16 and q["a"]["kernel"].shape == (64, 8)
  out = quant.dequantize(q)
  assert out["a"]["kernel"].dtype == jnp.float16
  np.testing.assert_array_equal(out["a"]["kernel"], np.ones((64, 8)))
  assert quant.quantize(params, QuantConfig())["a"]["kernel"].dequantize().dtype == jnp.bfloat16


# --------------------------------------------------------------------------- stacked layers


@pytest.mark.parametrize("double_quant", [False, True])
def test_stacked_kernels_quantize_per_layer(double_quant):
  w = jnp.asarray(np.random.RandomState(2).randn(4, 128, 40).astype(np.float32))
  params = {"layers": {"ff": {"kernel": w}}}
  q = quant.quantize(
    params, QuantConfig(double_quant=double_quant), layout={"layers/ff": ("in", "out")}
  )
  node = q["layers"]["ff"]["kernel"]
  assert node.shape == (4, 128, 40) and node.n_lead == 1 and node.kernel_shape == (128, 40)
  stacked = np.asarray(node.dequantize())
  per_layer = [quant.quantize_array(w[i], double_quant=double_quant) for i in range(4)]
  np.testing.assert_array_equal(stacked, np.stack([np.asarray(p.dequantize()) for p in per_layer]))
  for i in range(4):
    layer = jax.tree.map(lambda x: x[i], node)
    assert layer.shape == (128, 40)
    np.testing.assert_array_equal(np.asarray(layer.dequantize()), stacked[i])
    chex.assert_trees_all_equal(layer, per_layer[i])


def test_multi_axis_kernel_roles():
  # A DenseGeneral-like [in, heads, head_dim] and an output projection [heads, head_dim, out].
  rng = np.random.RandomState(3)
  for roles, shape in (
    (("in", "out", "out"), (64, 4, 8)),
    (("in", "in", "out"), (4, 16, 24)),
    (("out", "in"), (24, 64)),
    (("batch", "in", "out"), (3, 64, 5)),
  ):
    w = rng.randn(*shape).astype(np.float32)
    q = quant.quantize_array(w, roles=roles, double_quant=False)
    assert q.shape == shape
    # Reference: move the in-axes first, quantize the [I, O] matrix, move back.
    in_axes = [i for i, r in enumerate(roles) if r == "in"]
    other = [i for i, r in enumerate(roles) if r != "in"]
    m = np.transpose(w, in_axes + other).reshape(math.prod(shape[i] for i in in_axes), -1)
    ref = np.asarray(quant.quantize_array(m, double_quant=False).dequantize())
    ref = np.transpose(
      ref.reshape([shape[i] for i in in_axes + other]), np.argsort(in_axes + other)
    )
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.DenseGeneral((4, 16), name="up")(x)
    return x + nn.DenseGeneral(32, axis=(-2, -1), name="down")(nn.relu(h)), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = blocks(name="layers")(x, None)
    return nn.Dense(8, name="head")(x)


def test_quantized_base_runs_inside_nn_scan():
  model = Stack()
  x = jnp.asarray(np.random.RandomState(4).randn(2, 5, 32).astype(np.float32))
  rng = np.random.RandomState(6)
  params = jax.tree.map(
    lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
    jax.eval_shape(model.init, jax.random.key(0), x)["params"],
  )
  layout = jlora.trace_layout(model, x)
  q = quant.quantize(params, QuantConfig(targets=".*", block_size=32), layout=layout)
  assert q["layers"]["up"]["kernel"].shape == (3, 32, 4, 16)
  assert q["layers"]["down"]["kernel"].roles == ("in", "in", "out")
  out = jax.jit(jlora.wrap(model.apply))({"params": q}, x)
  ref = jax.jit(model.apply)({"params": quant.dequantize(q)}, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- sharding


SHARDED_SCRIPT = textwrap.dedent("""
  import json
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jlora import quant
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
  named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree,
                                    is_leaf=lambda x: isinstance(x, P))
  w = jnp.asarray(np.random.RandomState(0).randn(4, 256, 64).astype(np.float32))
  result = {}
  for dq in (False, True):
    q = quant.quantize_array(w, n_lead=1, double_quant=dq)
    ref = np.asarray(q.dequantize())
    specs = q.partition_spec(P(None, "fsdp", "tensor"), mesh=mesh)
    qs = jax.device_put(q, named(specs))
    out = jax.jit(lambda q: q.dequantize())(qs)
    stacked = jax.device_put(q, named(q.partition_spec(P("fsdp", None, "tensor"))))
    result[str(dq)] = {
      "codes": str(qs.codes.sharding.spec), "absmax": str(qs.absmax.sharding.spec),
      "codes_shards": len(qs.codes.addressable_shards), "shard_shape": list(qs.codes.addressable_shards[0].data.shape),
      "equal": bool(np.array_equal(np.asarray(out), ref)),
      "stacked_equal": bool(np.array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(stacked)), ref)),
      "stacked_codes": str(stacked.codes.sharding.spec), "no_mesh": str(q.partition_spec(P(None, "fsdp", "tensor")).codes),
    }
  # SmolLM2-like I = 576: 288 code rows split 2 ways, but its 9 absmax blocks can't be.
  q = quant.quantize_array(jnp.ones((576, 64)), double_quant=False)
  specs = q.partition_spec(P("fsdp", "tensor"), mesh=mesh)
  result["odd_blocks"] = [str(specs.codes), str(specs.absmax)]
  jax.device_put(q, named(specs))
  with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
    result["ambient_mesh"] = str(q.partition_spec(P("fsdp", "tensor")).codes)
  print(json.dumps(result))
""")


def test_sharded_device_put_and_dequantize_on_a_2x4_mesh():
  result = run_on_fake_devices(SHARDED_SCRIPT, 8, timeout=120)
  plain, dq = result["False"], result["True"]
  assert plain["codes"] == "P(None, 'fsdp', 'tensor')"
  assert plain["absmax"] == "P(None, 'fsdp', 'tensor')"
  assert plain["shard_shape"] == [4, 64, 16]  # codes [4, 128, 64] split 2 x 4
  assert dq["codes"] == "P(None, 'fsdp', 'tensor')"
  assert dq["absmax"] == "P(None, None)"  # double-quant scales are replicated
  assert plain["stacked_codes"] == "P('fsdp', None, 'tensor')"
  # Without a mesh the in-axis sharding is dropped (divisibility unknown).
  assert plain["no_mesh"] == "P(None, None, 'tensor')"
  assert result["odd_blocks"] == ["P('fsdp', 'tensor')", "P(None, 'tensor')"]
  assert result["ambient_mesh"] == "P('fsdp', 'tensor')"
  for r in (plain, dq):
    assert r["equal"] and r["stacked_equal"] and r["codes_shards"] == 8


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(kind="fp4"), "QuantConfig.kind='fp4' is unknown: valid kinds are 'nf4', 'int4'"),
    (dict(block_size=0), "QuantConfig.block_size=0 is invalid: it must be a positive integer"),
    (dict(block_size=-64), "QuantConfig.block_size=-64 is invalid"),
    (dict(block_size=64.0), "QuantConfig.block_size=64.0 is invalid"),
    (dict(double_quant="yes"), "QuantConfig.double_quant='yes' is invalid"),
    (
      dict(scale_dtype="int8"),
      "QuantConfig.scale_dtype='int8' is invalid: it must be a floating dtype",
    ),
    (dict(dtype="nope"), "QuantConfig.dtype='nope' is not a dtype"),
    (dict(targets="("), "QuantConfig.targets='(' is not a valid regular expression"),
  ],
)
def test_config_errors(kwargs, message):
  with pytest.raises(ValueError) as e:
    QuantConfig(**kwargs)
  assert message in str(e.value)


def test_non_divisible_input_dim_names_path_size_and_valid_block_sizes():
  params = {"mlp": {"up": {"kernel": jnp.ones((96, 8))}}}
  with pytest.raises(ValueError) as e:
    quant.quantize(params, QuantConfig(block_size=64))
  msg = str(e.value)
  assert "mlp/up/kernel" in msg and "input size 96" in msg and "block_size=64" in msg
  assert "[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]" in msg
  assert quant.quantize(params, QuantConfig(block_size=32))["mlp"]["up"]["kernel"].shape == (96, 8)


def test_odd_input_dim_is_an_error():
  with pytest.raises(ValueError, match=r"mlp/up/kernel has an odd input size 33"):
    quant.quantize({"mlp": {"up": {"kernel": jnp.ones((33, 8))}}}, QuantConfig(block_size=1))
  with pytest.raises(ValueError, match="odd"):
    quant.quantize_array(jnp.ones((33, 8)), block_size=1)


def test_quantizing_twice_is_an_error():
  params = {"up": {"kernel": jnp.ones((64, 8))}}
  q = quant.quantize(params, QuantConfig())
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize(q, QuantConfig())
  with pytest.raises(ValueError, match="matched no weight"):
    quant.quantize({"x": {"kernel": jnp.ones((64, 8))}}, QuantConfig(targets=["nothing"]))


def test_undecidable_3d_kernel_asks_for_a_layout():
  with pytest.raises(ValueError, match="trace_layout"):
    quant.quantize({"up": {"kernel": jnp.ones((2, 64, 8))}}, QuantConfig())


# --------------------------------------------------------------------------- jit


@pytest.mark.parametrize("double_quant", [False, True])
def test_jit_round_trip_tree_map_and_donation(double_quant):
  w = jnp.asarray(np.random.RandomState(5).randn(128, 24).astype(np.float32))
  q = quant.quantize_array(w, double_quant=double_quant)
  out = jax.jit(lambda q: q)(q)
  assert isinstance(out, QuantizedWeight)
  chex.assert_trees_all_equal(out, q)
  np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(q), q.dequantize())
  mapped = jax.tree.map(lambda x: x, q)
  assert mapped.kernel_shape == q.kernel_shape and mapped.kind == q.kind
  ref = np.asarray(q.dequantize())
  donated = jax.jit(lambda q: q, donate_argnums=0)(jax.tree.map(jnp.copy, q))
  np.testing.assert_array_equal(np.asarray(donated.dequantize()), ref)
  # Quantizing inside jit works too.
  inside = jax.jit(lambda w: quant.quantize_array(w, double_quant=double_quant))(w)
  chex.assert_trees_all_equal(inside, q)


# --------------------------------------------------------------------------- QLoRA


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="norm")(x)
    x = nn.relu(nn.Dense(self.hidden, name="up")(x))
    x = nn.relu(nn.Dense(self.hidden, name="mid")(x))
    return nn.Dense(8, name="down")(x)


@functools.cache
def _qlora(seed=0, rank=4, randomize=True):
  """(model, x, float base, quantized base, QLoRA params); cached, the trees are immutable."""
  model = MLP()
  x = jnp.asarray(np.random.RandomState(seed).randn(4, 3, 64).astype(np.float32))
  base = jax.jit(model.init)(jax.random.key(seed), x)["params"]
  q = quant.quantize(base, QuantConfig())
  cfg = jlora.LoraConfig(rank=rank, alpha=8.0, targets="all-linear")
  params = jax.jit(lambda q, key: jlora.apply(q, cfg, key))(q, jax.random.key(seed + 1))
  if randomize:
    rng = np.random.RandomState(seed + 2)  # numpy: no per-shape compiles
    params = jax.tree.map(
      lambda n: (
        n.replace(b=jnp.asarray(0.3 * rng.standard_normal(n.b.shape), n.b.dtype))
        if jlora.is_lora(n)
        else n
      ),
      params,
      is_leaf=jlora.is_lora,
    )
  return model, x, base, q, params


def test_qlora_forward_equals_dequantized_float_model():
  model, x, base, q, params = _qlora()
  assert isinstance(params["up"]["kernel"].base, QuantizedWeight)
  out = jax.jit(jlora.wrap(model.apply))({"params": params}, x)
  float_params = quant.dequantize(params)  # same adapters, plain float base
  assert isinstance(float_params["up"]["kernel"].base, jax.Array)
  ref = jax.jit(jlora.wrap(model.apply))({"params": float_params}, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # And against the materialised merge run through the unmodified model.
  merged = jax.jit(model.apply)({"params": jlora.merge(float_params)}, x)
  np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)
  # The adapters matter: the output differs from the quantized base alone.
  assert not np.allclose(out, jax.jit(jlora.wrap(model.apply))({"params": q}, x), atol=1e-3)


def test_qlora_gradients_reach_only_adapters_and_training_lowers_loss():
  model, x, base, q, params = _qlora(randomize=False)
  target = jnp.asarray(np.random.RandomState(7).randn(4, 3, 8).astype(np.float32))
  trainable, frozen = jlora.split(params)
  run = jlora.wrap(model.apply)

  def loss(trainable):
    return jnp.mean((run({"params": jlora.combine(trainable, frozen)}, x) - target) ** 2)

  tx = optax.adam(3e-2)
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state):
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, value, grads

  grads = step(trainable, state)[3]
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert leaves and all(path[-1].name in ("a", "b") for path, _ in leaves)
  assert all(jnp.issubdtype(g.dtype, jnp.floating) for _, g in leaves)
  assert any(np.any(g) for _, g in leaves)

  values = []
  for _ in range(15):
    trainable, state, value, _ = step(trainable, state)
    values.append(float(value))
  assert values[-1] < 0.7 * values[0], values
  # The quantized base never moved.
  chex.assert_trees_all_equal(jlora.split(jlora.combine(trainable, frozen))[1], frozen)


def test_qlora_merge_and_unmerge():
  model, x, base, q, params = _qlora()
  merged = jlora.merge(params)
  node = params["up"]["kernel"]
  expected = node.base.dequantize() + node.scale * node.a @ node.b
  np.testing.assert_allclose(merged["up"]["kernel"], expected, rtol=1e-6, atol=1e-6)
  # Merge goes into dequant(W4), not into the original float weight.
  assert not np.allclose(
    merged["up"]["kernel"], base["up"]["kernel"] + node.scale * node.a @ node.b, atol=1e-4
  )
  trainable, _ = jlora.split(params)
  back = jlora.unmerge(merged, trainable)
  for name in ("up", "mid", "down"):
    n = back[name]["kernel"]
    np.testing.assert_array_equal(n.a, params[name]["kernel"].a)
    np.testing.assert_array_equal(n.b, params[name]["kernel"].b)
    np.testing.assert_allclose(n.base, params[name]["kernel"].base.dequantize(), atol=2e-6)


class Wide(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i, width in enumerate((2048, 1024, 2048, 1024, 2048)):
      x = nn.relu(nn.Dense(width, use_bias=False, name=f"fc{i}")(x))
    return x


def test_compiled_train_step_has_no_full_precision_base_input():
  model = Wide()
  x = jnp.zeros((2, 1024), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])
  base = jax.tree.map(
    lambda s: jnp.asarray(np.random.RandomState(0).randn(*s.shape).astype(np.float32) * 0.02),
    shapes,
  )
  n_weights = sum(v.size for v in jax.tree.leaves(base))
  assert 9e6 < n_weights < 12e6
  params = jlora.apply(
    quant.quantize(base, QuantConfig()),
    jlora.LoraConfig(rank=8, targets="all-linear"),
    jax.random.key(1),
  )
  del base
  trainable, frozen = jlora.split(params)
  tx = optax.adam(1e-3)
  opt_state = tx.init(trainable)
  run = jlora.wrap(model.apply)

  def train_step(trainable, frozen, opt_state, batch):
    loss = lambda t: jnp.mean(run({"params": jlora.combine(t, frozen)}, batch) ** 2)
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  compiled = jax.jit(train_step).lower(trainable, frozen, opt_state, x).compile()
  stats = compiled.memory_analysis()
  nbytes = lambda tree: sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(tree))
  base_bytes = stats.argument_size_in_bytes - nbytes(trainable) - nbytes(opt_state) - nbytes(x)
  assert base_bytes == nbytes(frozen)
  assert base_bytes / n_weights <= 0.6, base_bytes / n_weights
  assert quant.bytes_per_weight(frozen) <= 0.52


def test_qlora_on_scanned_boxed_llama():
  """Our Llama (boxed params, nn.scan over layers): quantize, then LoRA on every linear layer."""
  from jlora.models.llama import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  model = LlamaForCausalLM(config)
  ids = jnp.asarray(np.random.RandomState(8).randint(0, 128, (2, 8)))
  # Random values in the boxed structure without running init (eval_shape: no compile).
  rng = np.random.RandomState(0)
  boxed = jax.tree.map(
    lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
    jax.eval_shape(model.init, jax.random.key(0), ids)["params"],
  )
  assert type(boxed["model"]["layers"]["mlp"]["down_proj"]["kernel"]).__name__.endswith(
    "Partitioned"
  )
  q = quant.quantize(boxed, QuantConfig())  # the scan axis is read from the boxed metadata
  node = q["model"]["layers"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(node, QuantizedWeight) and node.shape == (2, 128, 64) and node.n_lead == 1
  assert not isinstance(q["lm_head"]["kernel"], QuantizedWeight)
  layout = jlora.trace_layout(model, ids)
  cfg = jlora.LoraConfig(rank=4, targets="all-linear")
  params = jax.jit(lambda q, key: jlora.apply(q, cfg, key, layout=layout))(q, jax.random.key(1))
  rng = np.random.RandomState(9)
  params = jax.tree.map(
    lambda n: (
      n.replace(b=jnp.asarray(0.3 * rng.standard_normal(n.b.shape), n.b.dtype))
      if jlora.is_lora(n)
      else n
    ),
    params,
    is_leaf=jlora.is_lora,
  )
  out = jax.jit(jlora.wrap(model.apply))({"params": params}, ids)
  ref = jax.jit(lambda p, ids: model.apply({"params": jlora.merge(quant.dequantize(p))}, ids))(
    params, ids
  )
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

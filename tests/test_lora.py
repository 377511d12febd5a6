"""Core LoRA behaviour on stock linen models written here: an MLP, a tiny transformer
with DenseGeneral attention, and a scanned stack with Einsum and Embed.

References are independent of jlora's forward: the materialised W + scale*A@B run
through the unmodified model, hand-computed scales, and numpy matmuls.
"""

import functools
import math
import warnings

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

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class MLP(nn.Module):
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="norm")(x)
    x = nn.relu(nn.Dense(self.hidden, name="up")(x))
    return nn.Dense(8, name="down")(x)


class Attention(nn.Module):
  heads: int = 4
  head_dim: int = 8

  @nn.compact
  def __call__(self, x):
    proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=name)(x)
    q, k, v = proj("query"), proj("key"), proj("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(out)


class TinyTransformer(nn.Module):
  vocab: int = 64
  dim: int = 32
  layers: int = 2

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.dim, name="embed")(ids)
    for i in range(self.layers):
      x = x + Attention(name=f"attn_{i}")(nn.RMSNorm(name=f"ln1_{i}")(x))
      h = nn.RMSNorm(name=f"ln2_{i}")(x)
      x = x + nn.Dense(self.dim, name=f"mlp_down_{i}")(
        nn.gelu(nn.Dense(4 * self.dim, name=f"mlp_up_{i}")(h))
      )
    return nn.Dense(self.vocab, name="lm_head")(nn.RMSNorm(name="final_norm")(x))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Einsum((16, 24), "btd,df->btf", name="ff_in")(x)
    return x + nn.Dense(16, name="ff_out")(nn.relu(h)), None


class ScannedStack(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(40, 16, name="embed")
    x = embed(ids)
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = blocks(name="layers")(x, None)
    return embed.attend(x)


def init(model, x, seed=0):
  return model.init(jax.random.key(seed), x)["params"]


def randomize(params, seed, b_only=False):
  """Non-zero adapters, so that merged and unmerged paths actually differ from the base."""
  rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compiles in tests

  def fill(n):
    if not jlora.is_lora(n):
      return n
    b = jnp.asarray(0.1 * rng.standard_normal(n.b.shape), n.b.dtype)
    a = n.a if b_only else jnp.asarray(0.1 * rng.standard_normal(n.a.shape), n.a.dtype)
    return n.replace(a=a, b=b)

  return jax.tree.map(fill, params, is_leaf=jlora.is_lora)


MODELS = {
  "mlp": (
    MLP(),
    lambda: jnp.asarray(np.random.RandomState(0).randn(3, 5, 12), jnp.float32),
    ["up", "down"],
  ),
  "transformer": (
    TinyTransformer(),
    lambda: jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 6))),
    "all-linear",
  ),
  "scanned": (
    ScannedStack(),
    lambda: jnp.asarray(np.random.RandomState(2).randint(0, 40, (2, 7))),
    ".*",
  ),
}


@functools.cache
def base_of(name):
  """(model, x, base params, layout): built once per model, since only the adapters vary."""
  model, make_x, _ = MODELS[name]
  x = make_x()
  return model, x, init(model, x), jlora.trace_layout(model, x)


def adapted(name, rank=4, alpha=8.0, seed=0, **kw):
  model, x, base, layout = base_of(name)
  cfg = jlora.LoraConfig(rank=rank, alpha=alpha, targets=MODELS[name][2], **kw)
  return model, x, base, jlora.apply(base, cfg, jax.random.key(seed + 1), layout=layout)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", list(MODELS))
def test_init_output_equals_base_exactly(name):
  model, x, base, params = adapted(name)
  if name == "scanned":
    # Embedding adapters start with A = 0 (PEFT's convention), B random: still a no-op.
    emb = params["embed"]["embedding"]
    assert not np.any(emb.a) and np.any(emb.b)
  np.testing.assert_array_equal(
    jlora.wrap(model.apply)({"params": params}, x), model.apply({"params": base}, x)
  )


@pytest.mark.parametrize("name", list(MODELS))
@SETTINGS
@given(
  rank=st.sampled_from([1, 5]),
  alpha=st.floats(0.5, 32.0),
  seed=st.integers(0, 2**16),
  rslora=st.booleans(),
)
def test_wrapped_equals_materialised_merge(name, rank, alpha, seed, rslora):
  model, x, base, params = adapted(name, rank, alpha, seed, use_rslora=rslora)
  params = randomize(params, seed)
  wrapped = jlora.wrap(model.apply)({"params": params}, x)

  # Reference: W + scale*A@B materialised by hand (numpy), through the unmodified model.
  def materialise(n):
    if not jlora.is_lora(n):
      return n
    a, b = np.asarray(n.a, np.float64), np.asarray(n.b, np.float64)
    n_lead = n.ndim - len(n.roles)
    lead = a.shape[:n_lead]
    a2 = a.reshape(*lead, -1, a.shape[-1])
    b2 = b.reshape(*lead, b.shape[n_lead], -1)
    in_axes = [i for i, r in enumerate(n.roles) if r == "in"]
    out_axes = [i for i, r in enumerate(n.roles) if r == "out"]
    assert in_axes + out_axes == sorted(in_axes + out_axes), (
      "test models keep in-axes before out-axes"
    )
    delta = (a2 @ b2).reshape(n.shape)
    expected_scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    assert n.scale == pytest.approx(expected_scale)
    return jnp.asarray(np.asarray(n.base, np.float64) + expected_scale * delta, jnp.float32)

  reference = model.apply({"params": jax.tree.map(materialise, params, is_leaf=jlora.is_lora)}, x)
  np.testing.assert_allclose(
    wrapped, reference, atol=1e-5 * max(1.0, float(np.abs(reference).max())), rtol=1e-5
  )
  np.testing.assert_allclose(
    model.apply({"params": jlora.merge(params)}, x),
    reference,
    atol=1e-5 * max(1.0, float(np.abs(reference).max())),
    rtol=1e-5,
  )
  assert not np.allclose(wrapped, model.apply({"params": base}, x), atol=1e-3)


@pytest.mark.parametrize("name", list(MODELS))
@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_merge_unmerge_split_combine_round_trip(name, seed):
  _, _, base, params = adapted(name, seed=seed)
  params = randomize(params, seed)
  trainable, frozen = jlora.split(params)
  chex.assert_trees_all_equal(jlora.combine(trainable, frozen), params)
  # Same structure, complementary leaves: where one half has a value the other has None.
  slot = lambda x: x is None or jlora.is_lora(x) or isinstance(x, jax.Array)
  assert jax.tree.structure(trainable, is_leaf=slot) == jax.tree.structure(frozen, is_leaf=slot)
  for t, f in zip(jax.tree.leaves(trainable, is_leaf=slot), jax.tree.leaves(frozen, is_leaf=slot)):
    if jlora.is_lora(t):
      assert t.base is None and f.a is None and f.b is None and f.base is not None
    else:
      assert t is None and f is not None
  restored = jlora.unmerge(jlora.merge(params), trainable)
  chex.assert_trees_all_close(
    jlora.merge(
      jax.tree.map(lambda n: n.base if jlora.is_lora(n) else n, restored, is_leaf=jlora.is_lora)
    ),
    base,
    atol=1e-5,
    rtol=1e-5,
  )
  chex.assert_trees_all_equal(jlora.split(restored)[0], trainable)


def test_unmerge_refuses_trainable_trees_that_do_not_fit():
  _, x, _, params = adapted("mlp")
  merged = jlora.merge(randomize(params, 0))
  # Another model's adapters: paths the merged params don't have.
  _, _, _, scanned = adapted("transformer")
  with pytest.raises(ValueError, match=r"is in the (merged|trainable) tree but not in the"):
    jlora.unmerge(merged, jlora.split(scanned)[0])
  # Same targets, other shapes (a model of another width).
  wide = MLP(hidden=48)
  wide_params = jlora.apply(
    init(wide, x), jlora.LoraConfig(rank=4, targets=["up", "down"]), jax.random.key(0)
  )
  with pytest.raises(
    ValueError, match=r"adapter at 'down/kernel'.*\(32, 8\)|'up/kernel'.*\(12, 32\)"
  ):
    jlora.unmerge(merged, jlora.split(wide_params)[0])
  # Params that were never merged.
  with pytest.raises(ValueError, match=r"still a LoraWeight; pass jlora.merge"):
    jlora.unmerge(params, jlora.split(params)[0])


def test_unmerge_trusts_values_and_targets():
  """Documented: adapters that fit but are not the merged ones give a base off by the difference."""
  _, _, base, params = adapted("mlp")
  params = randomize(params, 0)
  merged = jlora.merge(params)
  other = randomize(params, 1)
  restored = jlora.unmerge(merged, jlora.split(other)[0])
  expected = base["up"]["kernel"] + params["up"]["kernel"].delta() - other["up"]["kernel"].delta()
  np.testing.assert_allclose(restored["up"]["kernel"].base, expected, atol=1e-5)
  # Adapters on fewer targets fit the structure too: 'down' comes back merged, as a plain array.
  fewer = jlora.apply(base, jlora.LoraConfig(rank=4, targets=["up"]), jax.random.key(0))
  restored = jlora.unmerge(merged, jlora.split(fewer)[0])
  np.testing.assert_array_equal(restored["down"]["kernel"], merged["down"]["kernel"])


def test_rank_and_alpha_patterns_set_hand_computed_scales():
  model, x, base, params = adapted(
    "mlp", rank=8, alpha=16, rank_pattern={"down": 2}, alpha_pattern={"up": 4.0}
  )
  up, down = params["up"]["kernel"], params["down"]["kernel"]
  assert (up.a.shape[-1], up.scale) == (8, 4.0 / 8)
  assert (down.a.shape[-1], down.scale) == (2, 16.0 / 2)
  _, _, _, rs = adapted("mlp", rank=8, alpha=16, use_rslora=True, rank_pattern={"down": 2})
  assert rs["up"]["kernel"].scale == pytest.approx(16 / math.sqrt(8))
  assert rs["down"]["kernel"].scale == pytest.approx(16 / math.sqrt(2))
  # And the forward uses exactly that scale: y - y_base == scale * (h @ A @ B) on the last layer.
  params = randomize(params, 3)
  only_down = dict(params, up={**params["up"], "kernel": params["up"]["kernel"].base})
  y = jlora.wrap(model.apply)({"params": only_down}, x) - model.apply({"params": base}, x)
  intermediate = jax.nn.relu(
    nn.Dense(32).apply({"params": base["up"]}, nn.LayerNorm().apply({"params": base["norm"]}, x))
  )
  down = params["down"]["kernel"]
  expected = 8.0 * np.asarray(intermediate) @ np.asarray(down.a) @ np.asarray(down.b)
  np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-4)


def test_adapter_dtype_independent_of_base():
  _, x, base, params = adapted("mlp", dtype=jnp.bfloat16)
  node = params["up"]["kernel"]
  assert node.a.dtype == node.b.dtype == jnp.bfloat16 and node.base.dtype == jnp.float32
  model = MODELS["mlp"][0]
  assert jlora.wrap(model.apply)({"params": randomize(params, 0)}, x).dtype == jnp.float32


def test_dropout_only_on_lora_branch():
  model, x, base, params = adapted("mlp", dropout=0.5)
  run = jlora.wrap(model.apply)
  # At init B = 0, so even with dropout active the output is exactly the base's: the base path has none.
  np.testing.assert_array_equal(
    run({"params": params}, x, rngs={"dropout": jax.random.key(0)}),
    model.apply({"params": base}, x),
  )
  params = randomize(params, 1)
  plain = run({"params": params}, x)
  dropped = run({"params": params}, x, rngs={"dropout": jax.random.key(0)})
  again = run({"params": params}, x, rngs={"dropout": jax.random.key(0)})
  other = run({"params": params}, x, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(plain, dropped)
  np.testing.assert_array_equal(dropped, again)
  assert not np.allclose(dropped, other)


def test_gaussian_and_default_inits_follow_peft():
  _, _, _, params = adapted("transformer", rank=8, init="gaussian")
  a = np.asarray(params["mlp_up_0"]["kernel"].a)
  assert abs(a.std() - 1 / 8) < 0.02 and not np.any(params["mlp_up_0"]["kernel"].b)
  _, _, _, params = adapted("transformer", rank=8)
  a = np.asarray(params["mlp_up_0"]["kernel"].a)  # fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
  assert (
    a.max() <= 1 / math.sqrt(32)
    and a.min() >= -1 / math.sqrt(32)
    and a.std() > 0.6 / math.sqrt(3 * 32)
  )


@pytest.mark.parametrize("name", ["mlp", "scanned"])
def test_pissa_keeps_model_and_moves_principal_directions(name):
  model, make_x, _ = MODELS[name]
  x = make_x()
  base = init(model, x)
  targets = ["up"] if name == "mlp" else ["ff_out"]
  cfg = jlora.LoraConfig(rank=2, alpha=4, targets=targets, init="pissa")
  params = jlora.apply(base, cfg, jax.random.key(0), layout=jlora.trace_layout(model, x))
  np.testing.assert_allclose(
    jlora.wrap(model.apply)({"params": params}, x), model.apply({"params": base}, x), atol=1e-5
  )
  node = jax.tree.leaves(params, is_leaf=jlora.is_lora)
  node = next(n for n in node if jlora.is_lora(n))
  w = np.asarray(
    jlora.merge(params)["up"]["kernel"]
    if name == "mlp"
    else jlora.merge(params)["layers"]["ff_out"]["kernel"]
  )
  w = w.reshape(-1, *w.shape[-2:])
  delta = np.asarray(node.delta()).reshape(w.shape)
  for layer in range(w.shape[0]):
    u, s, vt = np.linalg.svd(w[layer])
    np.testing.assert_allclose(delta[layer], (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)


# --------------------------------------------------------------------------- training


def test_gradients_only_for_adapters_and_optimizer_state_size():
  model, x, base, params = adapted("transformer", rank=4)
  trainable, frozen = jlora.split(params)
  run = jlora.wrap(model.apply)

  def loss(trainable, frozen):
    return jnp.mean(run({"params": jlora.combine(trainable, frozen)}, x) ** 2)

  grads = jax.grad(loss)(trainable, frozen)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert leaves and all(path[-1].name in ("a", "b") for path, _ in leaves)
  assert any(np.any(g) for _, g in leaves)

  tx = jlora.optimizer(optax.adamw(1e-2))
  state = tx.init(params)
  floats = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
  assert floats == 2 * jlora.adapter_count(params)
  assert sum(x.size for x in jax.tree.leaves(state)) == floats + 1  # adam's step counter

  # One step through the single-tree optimizer moves only A and B.
  full_grads = jax.grad(lambda p: jnp.mean(run({"params": p}, x) ** 2))(params)
  updates, _ = tx.update(full_grads, state, params)
  new = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(jlora.split(new)[1], jlora.split(params)[1])
  assert not np.allclose(new["mlp_up_0"]["kernel"].b, params["mlp_up_0"]["kernel"].b)


def test_training_lowers_loss():
  model, x, base, params = adapted("transformer", rank=4)
  target = jax.random.randint(jax.random.key(5), x.shape, 0, 64)
  trainable, frozen = jlora.split(params)
  run = jlora.wrap(model.apply)
  tx = optax.adam(3e-2)
  state = tx.init(trainable)

  def loss(trainable):
    logits = run({"params": jlora.combine(trainable, frozen)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

  @jax.jit
  def step(trainable, state):
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, value

  first = None
  for _ in range(20):
    trainable, state, value = step(trainable, state)
    first = first if first is not None else float(value)
  assert float(value) < 0.5 * first


def _flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_lora_step_flops_from_xla_cost_analysis(capsys):
  model = TinyTransformer(vocab=256, dim=128, layers=2)
  x = jnp.zeros((8, 64), jnp.int32)
  base = init(model, x)
  params = jlora.apply(
    base,
    jlora.LoraConfig(rank=8, alpha=16, targets="all-linear"),
    jax.random.key(0),
    layout=jlora.trace_layout(model, x),
  )
  trainable, frozen = jlora.split(params)
  run = jlora.wrap(model.apply)
  loss = lambda logits: jnp.mean(jax.nn.logsumexp(logits, axis=-1))
  forward = _flops(lambda p: loss(run({"params": p}, x)), params)
  lora_step = _flops(
    jax.grad(lambda t, f: loss(run({"params": jlora.combine(t, f)}, x))), trainable, frozen
  )
  full_step = _flops(jax.grad(lambda p: loss(model.apply({"params": p}, x))), base)
  with capsys.disabled():
    print(
      f"\n[flops] LoRA step / forward = {lora_step / forward:.2f}; full fine-tuning step / forward = "
      f"{full_step / forward:.2f}"
    )
  assert lora_step <= 2.2 * forward
  assert 2.6 <= full_step / forward <= 3.4


# --------------------------------------------------------------------------- fallbacks and errors


class RawMatmul(nn.Module):
  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 4))
    return x @ jnp.asarray(kernel)


def test_other_consumers_get_the_merged_weight_with_a_warning():
  model = RawMatmul()
  x = jnp.ones((2, 3))
  base = init(model, x)
  params = randomize(
    jlora.apply(base, jlora.LoraConfig(rank=2, alpha=2, targets=".*"), jax.random.key(0)), 0
  )
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = jlora.wrap(model.apply)({"params": params}, x)
  np.testing.assert_allclose(out, model.apply({"params": jlora.merge(params)}, x), atol=1e-5)
  assert any("used as a plain array" in str(w.message) for w in caught)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(rank=0), r"LoraConfig.rank=0 is invalid: the rank must be a positive integer"),
    (dict(rank=2.5), r"LoraConfig.rank=2.5 is invalid"),
    (dict(alpha=0), r"LoraConfig.alpha=0 is invalid: alpha must be a positive number"),
    (dict(alpha=-1.0), r"LoraConfig.alpha=-1.0 is invalid"),
    (dict(dropout=1.0), r"LoraConfig.dropout=1.0 is invalid: it must be a float in \[0, 1\)"),
    (dict(dropout=-0.1), r"LoraConfig.dropout=-0.1 is invalid"),
    (
      dict(init="olora"),
      r"LoraConfig.init='olora' is unknown: valid values are 'default', 'gaussian', 'pissa', 'loftq', 'eva'",
    ),
    (dict(targets=[]), r"LoraConfig.targets=\[\] is invalid"),
    (dict(targets="q_proj("), r"not a valid regular expression"),
    (dict(rank_pattern={"up": -2}), r"LoraConfig.rank_pattern\['up'\]=-2 is invalid"),
    (dict(alpha_pattern={"up": 0}), r"LoraConfig.alpha_pattern\['up'\]=0 is invalid"),
  ],
)
def test_config_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jlora.LoraConfig(**kwargs)


def test_targets_matching_nothing_lists_candidates():
  base = init(MLP(), jnp.ones((1, 12)))
  with pytest.raises(ValueError, match=r"matched no weight.*\n  down\n  up"):
    jlora.apply(base, jlora.LoraConfig(targets=["q_proj"]), jax.random.key(0))


def test_rank_larger_than_weight_is_an_error():
  base = init(MLP(), jnp.ones((1, 12)))
  with pytest.raises(ValueError, match=r"rank 13 for 'up' exceeds the weight's smaller side 12"):
    jlora.apply(base, jlora.LoraConfig(rank=13, targets=["up"]), jax.random.key(0))


def test_never_adapts_biases_or_norms():
  base = init(MLP(), jnp.ones((1, 12)))
  params = jlora.apply(base, jlora.LoraConfig(targets=".*"), jax.random.key(0))
  nodes = [
    jax.tree_util.keystr(p)
    for p, n in jax.tree_util.tree_leaves_with_path(params, is_leaf=jlora.is_lora)
    if jlora.is_lora(n)
  ]
  assert nodes == ["['down']['kernel']", "['up']['kernel']"]
  with pytest.raises(ValueError, match="matched no weight"):
    jlora.apply(base, jlora.LoraConfig(targets="norm|.*bias"), jax.random.key(0))


def test_undecidable_kernel_says_how_to_supply_the_layout():
  model, make_x, _ = MODELS["transformer"]
  base = init(model, make_x())
  with pytest.raises(
    ValueError, match=r"attn_0/query.*shape \(32, 4, 8\).*layout=jlora.trace_layout"
  ):
    jlora.apply(base, jlora.LoraConfig(targets=["query"]), jax.random.key(0))


def test_boxed_scan_metadata_decides_the_layout():
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(
        _Proj,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=2,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(name="layers")(x, None)[0]

  model = Stack()
  x = jnp.ones((2, 8))
  boxed = model.init(jax.random.key(0), x)["params"]
  params = jlora.apply(boxed, jlora.LoraConfig(rank=2, targets=["proj"]), jax.random.key(1))
  node = params["layers"]["proj"]["kernel"]
  assert (node.a.shape, node.b.shape) == ((2, 8, 2), (2, 2, 8))
  np.testing.assert_array_equal(
    jlora.wrap(model.apply)({"params": params}, x), model.apply({"params": nn.meta.unbox(boxed)}, x)
  )


class _Proj(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    return nn.Dense(8, kernel_init=kernel_init, name="proj")(x), None


def test_apply_twice_is_an_error():
  base = init(MLP(), jnp.ones((1, 12)))
  params = jlora.apply(base, jlora.LoraConfig(targets=["up"]), jax.random.key(0))
  with pytest.raises(ValueError, match="already hold LoRA adapters"):
    jlora.apply(params, jlora.LoraConfig(targets=["up"]), jax.random.key(0))

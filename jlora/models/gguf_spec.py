"""Writing a model as llama.cpp's GGUF: the Q/K row permutation (both ways) and the metadata.

The registry (`registry.GGUFMapping`) says, per GGUF architecture, which tensor is which, whether
llama.cpp permutes Q/K and which offset it folds into norm weights; the loader reads with it and the
exporter writes with it. This module adds what only writing needs: the `{arch}.*` hyperparameter keys
of each architecture (`HPARAMS_WRITERS`; a family adds its writer here to become exportable).

The Q/K permutation: HF's rotate_half rope pairs dimension i of a head with i + head_dim/2;
llama.cpp's "normal" rope (the llama architecture) pairs 2i with 2i+1. Its converter therefore
interleaves the two halves of every head's rows; `permute_rope_rows` does that and
`unpermute_rope_rows` undoes it (K uses the number of KV heads). Architectures that llama.cpp runs
with NEOX rope (qwen2) keep HF's order.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from jlora.models import registry
from jlora.models.gemma import LOCAL


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF row order -> llama.cpp's: within each head, rows (i, i + d/2) become (2i, 2i + 1)."""
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of `permute_rope_rows`: llama.cpp's row order -> HF's."""
  return (
    w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def decoder_hparams(writer: gguf.GGUFWriter, config: Any, feed_forward: int) -> None:
  """The `{arch}.*` keys llama.cpp reads for every Llama-style decoder."""
  c = config
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_feed_forward_length(feed_forward)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_rope_dimension_count(c.head_dim)
  writer.add_rope_freq_base(c.rope_theta)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_vocab_size(c.vocab_size)
  scaling = dict(c.rope_scaling or {})
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "linear":
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(scaling["factor"])
  elif rope_type == "yarn":  # as llama.cpp's converter writes it
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling["factor"])
    writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    for key, add in (
      ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
      ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
      ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
    ):
      if scaling.get(key) is not None:
        add(scaling[key])
  # llama3 scaling is not a key: llama.cpp reads it as the per-frequency tensor rope_freqs.weight.


def expert_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
  """The experts' keys. llama.cpp's llama and qwen3moe always renormalise the top-k routing
  weights, so a model that doesn't (Qwen3-MoE with norm_topk_prob=False) is refused rather than
  written wrong."""
  if not config.norm_topk_prob:
    raise ValueError(
      "norm_topk_prob: False can't be exported as GGUF: llama.cpp renormalises the top-k routing "
      "weights of every MoE layer, so the file would compute another model; use export_merged."
    )
  writer.add_expert_count(config.num_experts)
  writer.add_expert_used_count(config.num_experts_per_tok)


def llama_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
  """Llama, Mistral, Qwen2 and Mixtral (llama.cpp's llama with experts: the experts' width is
  feed_forward_length)."""
  if getattr(config, "num_experts", None):
    decoder_hparams(writer, config, config.moe_intermediate_size)
    expert_hparams(writer, config)
  else:
    decoder_hparams(writer, config, config.intermediate_size)


def moe_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
  """Qwen3-MoE: llama's keys, the experts' and their own width."""
  decoder_hparams(writer, config, config.intermediate_size)
  expert_hparams(writer, config)
  writer.add_expert_feed_forward_length(config.moe_intermediate_size)


# What llama.cpp's gpt-oss fixes in code rather than reads: a jlora config that differs is refused.
GPT_OSS_FIXED = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0, "attention_bias": True}


def gpt_oss_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
  """gpt-oss: the experts (their width in both ff keys, as llama.cpp's converter writes them), the
  sliding window, and which layers use it (an array of flags, which llama.cpp reads in place of
  its default pattern). YaRN's keys are written as the converter does; llama.cpp rounds YaRN's
  correction range outward, transformers' `truncate: False` (gpt-oss's own setting) doesn't."""
  for key, value in GPT_OSS_FIXED.items():
    if getattr(config, key) != value:
      raise ValueError(
        f"{key}: {getattr(config, key)!r} can't be exported as GGUF: llama.cpp's gpt-oss fixes it "
        f"at {value!r}, so the file would compute another model; use export_merged."
      )
  decoder_hparams(writer, config, config.moe_intermediate_size)
  expert_hparams(writer, config)  # gpt-oss's top-k softmax always sums to one
  writer.add_expert_feed_forward_length(config.moe_intermediate_size)
  writer.add_sliding_window(config.sliding_window or config.max_position_embeddings)
  writer.add_sliding_window_pattern([t == LOCAL for t in config.layer_types])


# GGUF architectures whose metadata this module writes -> the writer. Tensor names, the Q/K
# permutation and norm offsets come from the architecture's `registry.GGUFMapping`.
HPARAMS_WRITERS: dict[str, Callable[[gguf.GGUFWriter, Any], None]] = {
  "llama": llama_hparams,
  "qwen2": llama_hparams,
  "qwen3moe": moe_hparams,
  "gpt-oss": gpt_oss_hparams,
}


@dataclasses.dataclass(frozen=True)
class GgufWriting:
  """How to write one model_type as a GGUF: its architecture, mapping and metadata writer."""

  arch: str  # general.architecture, e.g. 'llama'
  mapping: registry.GGUFMapping
  hparams: Callable[[gguf.GGUFWriter, Any], None]

  def tensor_name(self, hf_name: str) -> str:
    """llama.cpp's name for an HF tensor: model.layers.3.self_attn.q_proj.weight ->
    blk.3.attn_q.weight (the inverse of the loader's `gguf_to_hf_name`)."""
    module, kind = hf_name.rsplit(".", 1)
    if kind not in ("weight", "bias"):  # a bare parameter (gpt-oss's self_attn.sinks)
      module, kind = hf_name, "weight"
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if layer:
      stem = {v: k for k, v in self.mapping.layer.items()}.get(layer.group(2))
      name = stem and f"blk.{layer.group(1)}.{stem}"
    else:
      name = {v: k for k, v in self.mapping.globals.items()}.get(module)
    if name is None:
      raise ValueError(f"The tensor {hf_name!r} has no name in llama.cpp's {self.arch!r} layout.")
    return f"{name}.{kind}"


def exportable_model_types() -> list[str]:
  types = set(registry.GGUF_ARCH_ALIASES)
  types |= {
    v.model_type
    for a, (_, m) in registry.GGUF_ARCHITECTURES.items()
    if a in HPARAMS_WRITERS
    for v in m.variants()
  }
  return sorted(types)


def gguf_writing(model_type: str) -> GgufWriting:
  """The GGUF layout an exporter writes for an HF model_type; an error names the supported ones."""
  try:
    arch, mapping = registry.gguf_for_model_type(model_type)
  except ValueError:
    arch, mapping = None, None
  if arch not in HPARAMS_WRITERS:
    raise ValueError(
      f"model_type: {model_type!r} has no GGUF export; supported: {exportable_model_types()}."
    )
  return GgufWriting(arch, mapping, HPARAMS_WRITERS[arch])

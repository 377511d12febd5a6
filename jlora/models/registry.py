"""The model families jlora can load, train and export, keyed by HF `model_type` and GGUF arch.

One `Family` entry holds everything the rest of jlora needs to know about a family:
its config class (`protocol.ModelConfig`), its linen module (`protocol.CausalLM`), its HF
tensor-name mapping (`names.HFNames` for a config), its default logical-axis rules, and its GGUF
tensor mapping. Loading, the trainer, generation, PEFT IO and the exports look families up here
only. Adding a family is one module plus one entry in `FAMILIES` (see the README, "Models").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jlora.errors import UserError
from jlora.models.gemma import GLOBAL, LOCAL, GemmaConfig, GemmaForCausalLM
from jlora.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from jlora.models.llama import DEFAULT_RULES, LlamaConfig, LlamaForCausalLM
from jlora.models.moe import MoeConfig, MoeForCausalLM
from jlora.models.names import HFNames

# llama.cpp tensor name (after "blk.N.") -> HF module path inside "model.layers.N.", per layout.
GGUF_LLAMA_LAYER = {
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
GGUF_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GGUF_GEMMA_LAYER = {
  **{k: v for k, v in GGUF_LLAMA_LAYER.items() if k != "ffn_norm"},
  "post_attention_norm": "post_attention_layernorm",
  "ffn_norm": "pre_feedforward_layernorm",
  "post_ffw_norm": "post_feedforward_layernorm",
}
# Qwen3-MoE's layers: attention as Llama's, the router as ffn_gate_inp; the experts are in
# GGUF_MOE_EXPERTS.
GGUF_MOE_LAYER = {
  **{k: v for k, v in GGUF_LLAMA_LAYER.items() if k in ("ffn_norm",) or not k.startswith("ffn_")},
  "ffn_gate_inp": "mlp.gate",
}
# A fused HF expert parameter (inside "model.layers.N.") -> the GGUF tensors llama.cpp keeps it as:
# equal slices of each expert's output axis, in order (gate_up_proj [E, 2I, d] is gate then up).
GGUF_MOE_EXPERTS = {
  "mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
  "mlp.experts.down_proj": ("ffn_down_exps",),
}
GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# gpt-oss as llama.cpp's gpt-oss: biased attention with sinks (an HF parameter without `.weight`),
# a biased router, and the experts (with biases, `gate_up_proj_bias` -> the stems' `.bias`).
GGUF_GPT_OSS_LAYER = {
  **{k: v for k, v in GGUF_LLAMA_LAYER.items() if not k.startswith("ffn_")},
  "post_attention_norm": "post_attention_layernorm",
  "attn_sinks": "self_attn.sinks",
  "ffn_gate_inp": "mlp.router",
}


@dataclasses.dataclass(frozen=True)
class GGUFMapping:
  """How a llama.cpp GGUF of one architecture maps onto HF names.

  layer / globals: GGUF tensor stem -> HF module (see GGUF_LLAMA_LAYER). permute_qk: llama.cpp
  interleaved Q/K rows for its rope layout (Llama). norm_offset: llama.cpp stores Gemma's norm
  weights as `1 + w`, so the loader subtracts it (and an exporter adds it). experts: fused HF
  expert parameters and the GGUF tensors they split into (GGUF_MOE_EXPERTS); their biases
  (`<param>_bias`) split into the same stems' `.bias`. interleaved: the split parts alternate along
  the output axis (gpt-oss's gate, up, gate, ...) rather than follow each other. extra_config: the
  family's GGUF metadata read into HF config fields, given `field(key, default)` and the arch.
  with_experts: the mapping of the same architecture's files that hold experts (llama.cpp writes
  Mixtral as `llama` with `llama.expert_count`). swa: llama.cpp runs the config's sliding window.
  untied_output: llama.cpp requires output.weight (a tied head is written as a copy).
  """

  model_type: str
  layer: Mapping[str, str]
  globals: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(GGUF_GLOBAL))
  permute_qk: bool = False
  norm_offset: float = 0.0
  experts: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  interleaved: bool = False
  extra_config: Callable[[Callable, str], dict] | None = None
  with_experts: GGUFMapping | None = None
  swa: bool = False
  untied_output: bool = False

  def variants(self) -> tuple[GGUFMapping, ...]:
    return (self,) if self.with_experts is None else (self, self.with_experts)


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  config_cls: type
  module_cls: type
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
  gguf: Mapping[str, GGUFMapping] = dataclasses.field(default_factory=dict)

  def hf_names(self, config) -> HFNames:
    return HFNames.for_config(config)


def _gemma_gguf_config(field: Callable, arch: str) -> dict:
  """Gemma fields llama.cpp stores (soft-caps, window) or fixes in code (score scale = head_dim)."""
  extra = {
    "sliding_window": int(field(f"{arch}.attention.sliding_window", 4096)),
    "query_pre_attn_scalar": int(field(f"{arch}.attention.key_length")),
  }
  if arch == "gemma2":
    extra["attn_logit_softcapping"] = float(field("gemma2.attn_logit_softcapping", 50.0))
    extra["final_logit_softcapping"] = float(field("gemma2.final_logit_softcapping", 30.0))
  else:
    extra["rope_local_base_freq"] = 10000.0  # llama.cpp hard-codes Gemma 3's local rope base
  return extra


def _moe_gguf_config(field: Callable, arch: str) -> dict:
  """The expert fields llama.cpp stores; it always renormalises the top-k weights."""
  return {
    "num_experts": int(field(f"{arch}.expert_count")),
    "num_experts_per_tok": int(field(f"{arch}.expert_used_count")),
    "moe_intermediate_size": int(field(f"{arch}.expert_feed_forward_length")),
    "norm_topk_prob": True,
  }


def _mixtral_gguf_config(field: Callable, arch: str) -> dict:
  """Mixtral in a `llama` file: the expert counts; the experts' width is feed_forward_length."""
  return {
    "num_local_experts": int(field(f"{arch}.expert_count")),
    "num_experts_per_tok": int(field(f"{arch}.expert_used_count")),
  }


def _gpt_oss_gguf_config(field: Callable, arch: str) -> dict:
  """gpt-oss: the experts, the sliding window and which layers use it (llama.cpp's default
  pattern is sliding, full, sliding, ...); swiglu's constants are llama.cpp's fixed ones."""
  n_layers = int(field(f"{arch}.block_count"))
  pattern = field(f"{arch}.attention.sliding_window_pattern", 2)
  if not isinstance(pattern, list):  # every n-th layer full, the others sliding (0: all sliding)
    pattern = [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]
  extra = {
    "num_local_experts": int(field(f"{arch}.expert_count")),
    "num_experts_per_tok": int(field(f"{arch}.expert_used_count")),
    "intermediate_size": int(field(f"{arch}.expert_feed_forward_length")),
    "sliding_window": int(field(f"{arch}.attention.sliding_window")),
    "layer_types": [LOCAL if s else GLOBAL for s in pattern],
    "attention_bias": True,
  }
  if field(f"{arch}.rope.scaling.type", "none") == "none":  # else gpt-oss's default is YaRN
    extra["rope_parameters"] = {"rope_type": "default"}
  return extra


FAMILIES: tuple[Family, ...] = (
  Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "phi3"),
    config_cls=LlamaConfig,
    module_cls=LlamaForCausalLM,
    gguf={
      "llama": GGUFMapping(
        "llama",
        GGUF_LLAMA_LAYER,
        permute_qk=True,
        with_experts=GGUFMapping(
          "mixtral",
          GGUF_MOE_LAYER,
          permute_qk=True,
          experts=GGUF_MOE_EXPERTS,
          extra_config=_mixtral_gguf_config,
        ),
      ),
      "qwen2": GGUFMapping("qwen2", GGUF_LLAMA_LAYER),
      "qwen3": GGUFMapping("qwen3", {**GGUF_LLAMA_LAYER, **GGUF_QK_NORM}),
    },
  ),
  Family(
    name="moe",
    model_types=("mixtral", "qwen3_moe"),
    config_cls=MoeConfig,
    module_cls=MoeForCausalLM,
    gguf={
      "qwen3moe": GGUFMapping(
        "qwen3_moe",
        {**GGUF_MOE_LAYER, **GGUF_QK_NORM},
        experts=GGUF_MOE_EXPERTS,
        extra_config=_moe_gguf_config,
      ),
    },
  ),
  Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    config_cls=GptOssConfig,
    module_cls=GptOssForCausalLM,
    gguf={
      "gpt-oss": GGUFMapping(
        "gpt_oss",
        GGUF_GPT_OSS_LAYER,
        experts=GGUF_MOE_EXPERTS,
        interleaved=True,
        extra_config=_gpt_oss_gguf_config,
        swa=True,
        untied_output=True,
      ),
    },
  ),
  Family(
    name="gemma",
    model_types=("gemma2", "gemma3_text"),
    config_cls=GemmaConfig,
    module_cls=GemmaForCausalLM,
    gguf={
      "gemma2": GGUFMapping(
        "gemma2", GGUF_GEMMA_LAYER, norm_offset=1.0, extra_config=_gemma_gguf_config
      ),
      "gemma3": GGUFMapping(
        "gemma3_text",
        {**GGUF_GEMMA_LAYER, **GGUF_QK_NORM},
        norm_offset=1.0,
        extra_config=_gemma_gguf_config,
      ),
    },
  ),
)

MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
GGUF_ARCHITECTURES: dict[str, tuple[Family, GGUFMapping]] = {
  arch: (f, m) for f in FAMILIES for arch, m in f.gguf.items()
}


def family_for_model_type(model_type: str | None) -> Family:
  if model_type not in MODEL_TYPES:
    raise UserError(f"Unsupported model_type {model_type!r}; jlora supports {list(MODEL_TYPES)}.")
  return MODEL_TYPES[model_type]


def family_for_config(config) -> Family:
  """The family of a jlora model config, an HF config dict or a transformers PretrainedConfig."""
  # The exact class first: MoeConfig extends LlamaConfig, GptOssConfig MoeConfig.
  for match in (lambda f: type(config) is f.config_cls, lambda f: isinstance(config, f.config_cls)):
    for family in FAMILIES:
      if match(family):
        return family
  model_type = config.get("model_type") if isinstance(config, Mapping) else None
  model_type = model_type or getattr(config, "model_type", None)
  return family_for_model_type(model_type)


def config_from_hf(hf_config: Any, **overrides):
  """The jlora config of an HF config (dict or PretrainedConfig), through its family."""
  d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
  family = family_for_model_type(d.get("model_type"))
  return family.config_cls.from_hf(d, **overrides)


def model_from_hf(hf_config: Any, **overrides):
  """The linen module (a `protocol.CausalLM`) for an HF config; overrides set config fields."""
  config = config_from_hf(hf_config, **overrides)
  return family_for_config(config).module_cls(config)


def hf_names(config) -> HFNames:
  """The HF name mapping for a jlora config or HF config dict (an HFNames is its own mapping);
  None gives the default layout."""
  if config is None:
    return HFNames()
  if isinstance(config, HFNames):
    return config
  if isinstance(config, Mapping) or not hasattr(config, "layer_stacks"):
    config = config_from_hf(config)
  return family_for_config(config).hf_names(config)


def gguf_architecture(arch: str, experts: bool = False) -> tuple[Family, GGUFMapping]:
  """The family and mapping of a GGUF architecture; experts: the file has experts (`{arch}.
  expert_count`), which selects the architecture's `with_experts` mapping where it has one (Mixtral
  in a llama file, whose family is then the MoE one)."""
  if arch not in GGUF_ARCHITECTURES:
    raise UserError(
      f"Unsupported GGUF architecture {arch!r}; supported: {sorted(GGUF_ARCHITECTURES)}."
    )
  family, mapping = GGUF_ARCHITECTURES[arch]
  if experts and mapping.with_experts is not None:
    return family_for_model_type(mapping.with_experts.model_type), mapping.with_experts
  return family, mapping


# HF model_types that llama.cpp writes under another family member's GGUF architecture.
GGUF_ARCH_ALIASES = {"mistral": "llama"}


def gguf_for_model_type(model_type: str) -> tuple[str, GGUFMapping]:
  """(GGUF architecture, its mapping) for an HF model_type: what a GGUF exporter writes."""
  for arch, (_, mapping) in GGUF_ARCHITECTURES.items():
    if arch == GGUF_ARCH_ALIASES.get(model_type):
      return arch, mapping
    for variant in mapping.variants():
      if variant.model_type == model_type:
        return arch, variant
  supported = sorted(
    {v.model_type for _, m in GGUF_ARCHITECTURES.values() for v in m.variants()}
    | set(GGUF_ARCH_ALIASES)
  )
  raise ValueError(
    f"model_type {model_type!r} has no GGUF architecture in jlora; expected one of {supported}."
  )

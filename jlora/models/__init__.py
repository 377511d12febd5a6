"""Model families behind one registry, and checkpoint loading.

`registry.FAMILIES` lists what is supported (HF model_type and GGUF architecture -> config class,
linen module, HF name mapping, logical-axis rules, GGUF tensor mapping); `protocol.CausalLM` is
what every family's module provides.
"""

from jlora.models.gemma import GemmaConfig, GemmaForCausalLM
from jlora.models.llama import DEFAULT_RULES, LlamaConfig, LlamaForCausalLM, init_cache
from jlora.models.loading import DEFAULT_MODEL, from_pretrained
from jlora.models.names import HFNames
from jlora.models.protocol import CausalLM, ModelConfig
from jlora.models.registry import FAMILIES, Family, family_for_config, model_from_hf

__all__ = [
  "DEFAULT_MODEL",
  "DEFAULT_RULES",
  "FAMILIES",
  "CausalLM",
  "Family",
  "GemmaConfig",
  "GemmaForCausalLM",
  "HFNames",
  "LlamaConfig",
  "LlamaForCausalLM",
  "ModelConfig",
  "family_for_config",
  "from_pretrained",
  "init_cache",
  "model_from_hf",
]

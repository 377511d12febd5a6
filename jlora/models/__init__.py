"""Llama-family models and checkpoint loading."""

from jlora.models.llama import DEFAULT_RULES, LlamaConfig, LlamaForCausalLM, init_cache
from jlora.models.loading import DEFAULT_MODEL, from_pretrained

__all__ = [
  "DEFAULT_MODEL",
  "DEFAULT_RULES",
  "LlamaConfig",
  "LlamaForCausalLM",
  "from_pretrained",
  "init_cache",
]

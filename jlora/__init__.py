"""jlora: LoRA and QLoRA for JAX/Flax as pure parameter-tree transforms."""

from jlora.config import LoraConfig
from jlora.lora import LoraWeight, adapter_count, apply, combine, is_lora, merge, split, unmerge
from jlora.ops import trace_layout, wrap
from jlora.optim import optimizer

__all__ = [
  "LoraConfig", "LoraWeight", "adapter_count", "apply", "combine", "is_lora", "merge", "optimizer",
  "split", "trace_layout", "unmerge", "wrap",
]

"""jlora: LoRA and QLoRA for JAX/Flax as pure parameter-tree transforms."""

from jlora import tokens
from jlora.config import LoraConfig, is_node
from jlora.inits import eva, loftq
from jlora.intercept import trace_layout, wrap
from jlora.lora import (
  DoraWeight,
  LoraWeight,
  adapter_count,
  apply,
  combine,
  is_lora,
  merge,
  split,
  unmerge,
  weight_norms,
)
from jlora.models.export import export_gguf, export_merged, save_adapter_gguf
from jlora.multi import StackedLoraWeight, adapter_ids, stack_adapters
from jlora.optim import optimizer
from jlora.peft import load_adapter, save_adapter
from jlora.prepare import prepare_for_training
from jlora.quant import QuantConfig, QuantizedWeight, bytes_per_weight, dequantize, quantize
from jlora.tokens import TokenRows

__all__ = [
  "DoraWeight",
  "LoraConfig",
  "LoraWeight",
  "QuantConfig",
  "QuantizedWeight",
  "StackedLoraWeight",
  "TokenRows",
  "adapter_count",
  "adapter_ids",
  "apply",
  "bytes_per_weight",
  "combine",
  "dequantize",
  "eva",
  "export_gguf",
  "export_merged",
  "is_lora",
  "is_node",
  "load_adapter",
  "loftq",
  "merge",
  "optimizer",
  "prepare_for_training",
  "quantize",
  "save_adapter",
  "save_adapter_gguf",
  "split",
  "stack_adapters",
  "tokens",
  "trace_layout",
  "unmerge",
  "weight_norms",
  "wrap",
]

"""jlora: LoRA and QLoRA for JAX/Flax as pure parameter-tree transforms."""

from jlora.config import LoraConfig
from jlora.lora import LoraWeight, adapter_count, apply, combine, is_lora, merge, split, unmerge
from jlora.ops import trace_layout, wrap
from jlora.optim import optimizer
from jlora.peft import export_merged, load_adapter, save_adapter
from jlora.prepare import prepare_for_training
from jlora.quant import QuantConfig, QuantizedWeight, bytes_per_weight, dequantize, quantize

__all__ = [
  "LoraConfig",
  "LoraWeight",
  "QuantConfig",
  "QuantizedWeight",
  "adapter_count",
  "apply",
  "bytes_per_weight",
  "combine",
  "dequantize",
  "export_merged",
  "is_lora",
  "load_adapter",
  "merge",
  "optimizer",
  "prepare_for_training",
  "quantize",
  "save_adapter",
  "split",
  "trace_layout",
  "unmerge",
  "wrap",
]

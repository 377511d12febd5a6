"""QLoRA on the default model and task: an NF4, double-quantized base (0.516 bytes per weight).

python -m train.sft --config configs/qlora.py
"""

from configs import llama


def get_config():
  config = llama.get_config()
  config.quant.kind = "nf4"
  config.output_dir = "runs/qlora-sft"
  return config

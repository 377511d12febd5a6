"""Tiny, offline stand-ins for real checkpoints, shared by every test module.

* Tokenizers (byte-level BPE, ChatML template): `make_tokenizer` is trained on the bundled data
  (short token sequences for SFT runs); `tiny_tokenizer` has a fixed, known vocabulary (256 bytes +
  3 merges + specials), which a GGUF file can list.
* Checkpoints: `make_checkpoint` (a random model of any registered family, written by jlora's
  export), `save_torch_checkpoint` (a random transformers model, for reference tests),
  `random_hf_state` + `save_numpy_checkpoint` (HF tensors without torch), `save_gguf`.
* A small SFT config, as a ConfigDict or as command-line flags.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from jlora.models.llama import LlamaConfig

CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
REPO = Path(__file__).resolve().parents[1]


def _byte_level(model):
  """A byte-level BPE `tokenizers.Tokenizer` around `model`, so decode(encode(t)) == t."""
  from tokenizers import Tokenizer, decoders, pre_tokenizers

  tok = Tokenizer(model)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def make_tokenizer(vocab_size: int = 384):
  from tokenizers import models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = _byte_level(models.BPE())
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
  hf.chat_template = CHAT_TEMPLATE
  return hf


def make_checkpoint(
  directory: Path,
  *,
  tied: bool = True,
  layers: int = 2,
  hidden: int = 32,
  seed: int = 0,
  config=None,
) -> Path:
  """A random model saved as config.json + model.safetensors + tokenizer files.

  Without `config`: a Llama (GQA 2:1) of the given size. With `config` (any registered family's
  config; its vocab_size is replaced by the tokenizer's): that model.
  """
  import dataclasses

  import jlora
  from jlora.models import registry

  tokenizer = make_tokenizer()
  if config is None:
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
  config = dataclasses.replace(config, vocab_size=len(tokenizer))
  model = registry.family_for_config(config).module_cls(config)
  params = meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
  jlora.export_merged(directory, params, config, tokenizer)
  return Path(directory)


def write_rows(path: Path, n: int, start: int = 0) -> Path:
  """The first n rows of the bundled extraction dataset (a real task, tiny size)."""
  lines = (REPO / "data" / "extract_train.jsonl").read_text().splitlines()[start : start + n]
  Path(path).write_text("\n".join(lines) + "\n")
  return Path(path)


def sft_files(root: Path) -> dict:
  """A tiny model dir, 48 training rows and 8 eval rows under `root`: the inputs of an SFT run."""
  root = Path(root)
  return {
    "model": make_checkpoint(root / "model"),
    "train": write_rows(root / "train.jsonl", 48),
    "eval": write_rows(root / "eval.jsonl", 8, start=1000),
    "root": root,
  }


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


def cli_args(
  model_dir, train_file, eval_file, output_dir, config="llama.py", **overrides
) -> list[str]:
  """The same tiny config as command-line flags for `python -m train.sft` (or, with
  config="dpo.py", `python -m train.dpo`)."""
  flat = {**TINY, **_paths(model_dir, train_file, eval_file, output_dir), **overrides}
  return ["--config", str(REPO / "configs" / config)] + [
    f"--config.{k}={v}" for k, v in flat.items()
  ]


def read_json(path: Path):
  return json.loads(Path(path).read_text())


# --- HF / GGUF checkpoints with a known vocabulary ---------------------------------------------


def tiny_vocab() -> list[str]:
  """Byte-level BPE vocab: the 256 byte symbols, the merge results, then the special tokens."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  return list(bytes_to_unicode().values()) + ["".join(m.split()) for m in MERGES] + SPECIAL_TOKENS


TINY_VOCAB_SIZE = 256 + len(MERGES) + len(SPECIAL_TOKENS)


def tiny_tokenizer():
  from tokenizers import models
  from transformers import PreTrainedTokenizerFast

  vocab = {t: i for i, t in enumerate(tiny_vocab())}
  tok = _byte_level(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in MERGES]))
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<|im_start|>",
    eos_token="<|im_end|>",
    additional_special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
  )


def save_torch_checkpoint(
  directory: Path, model_type: str = "llama", seed: int = 0, **config_kwargs
) -> Path:
  """A randomly initialised transformers model saved as safetensors (plus a tiny tokenizer).

  Every weight is redrawn (norm scales around 1, biases nonzero) so the comparison exercises them all.
  """
  import torch
  import transformers

  classes = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
  }
  config_cls, model_cls = classes[model_type]
  defaults = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
  )
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{**defaults, **config_kwargs})).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.1)
  model.save_pretrained(str(directory), safe_serialization=True)
  tiny_tokenizer().save_pretrained(str(directory))
  return Path(directory)


def random_hf_state(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named float32 weights in torch layout ([out, in]) without needing torch."""
  rng = np.random.default_rng(seed)
  c = config
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

  def w(*shape):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

  def norm():
    return (1.0 + 0.1 * rng.standard_normal(c.hidden_size)).astype(np.float32)

  state = {"model.embed_tokens.weight": w(c.vocab_size, c.hidden_size), "model.norm.weight": norm()}
  if not c.tie_word_embeddings:
    state["lm_head.weight"] = w(c.vocab_size, c.hidden_size)
  shapes = {
    "self_attn.q_proj": (q, c.hidden_size),
    "self_attn.k_proj": (kv, c.hidden_size),
    "self_attn.v_proj": (kv, c.hidden_size),
    "self_attn.o_proj": (c.hidden_size, q),
    "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
    "mlp.up_proj": (c.intermediate_size, c.hidden_size),
    "mlp.down_proj": (c.hidden_size, c.intermediate_size),
  }
  for i in range(c.num_hidden_layers):
    prefix = f"model.layers.{i}."
    state[prefix + "input_layernorm.weight"] = norm()
    state[prefix + "post_attention_layernorm.weight"] = norm()
    for name, shape in shapes.items():
      state[f"{prefix}{name}.weight"] = w(*shape)
  return state


def save_numpy_checkpoint(
  directory: Path, config: LlamaConfig, state: dict[str, np.ndarray]
) -> Path:
  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  save_file(state, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
  tiny_tokenizer().save_pretrained(str(directory))
  return directory


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """The Q/K row permutation llama.cpp's convert_hf_to_gguf.py applies for its rope layout."""
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def save_gguf(path: Path, config, state: dict[str, np.ndarray], arch: str = "llama") -> Path:
  """Write `state` (HF names/layout) as a llama.cpp-style F32 GGUF with a tiny gpt2 tokenizer.

  `config` is the jlora config the state belongs to. Tensor names come from the gguf package's own
  HF -> GGUF map (llama.cpp's), not from jlora; like llama.cpp's converter, this permutes Llama's
  Q/K rows and stores Gemma's norm weights as 1 + w.
  """
  import gguf

  c = config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name("tiny")
  writer.add_block_count(c.num_hidden_layers)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_rope_freq_base(c.rope_theta)
  writer.add_rope_dimension_count(c.head_dim)
  if arch.startswith("gemma"):
    writer.add_sliding_window(c.sliding_window)
  if arch == "gemma2":
    writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
    writer.add_final_logit_softcapping(c.final_logit_softcapping)
  if c.rope_scaling:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(c.rope_scaling["factor"])

  vocab = tiny_vocab()
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(vocab)
  control = set(SPECIAL_TOKENS)
  writer.add_token_types([3 if t in control else 1 for t in vocab])
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(vocab.index("<|im_start|>"))
  writer.add_eos_token_id(vocab.index("<|im_end|>"))
  writer.add_chat_template(CHAT_TEMPLATE)

  arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
  names = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
  for name, w in state.items():
    module, kind = name.rsplit(".", 1)
    if arch == "llama" and module.endswith("self_attn.q_proj"):
      w = llama_cpp_permute(w, c.num_attention_heads)
    elif arch == "llama" and module.endswith("self_attn.k_proj"):
      w = llama_cpp_permute(w, c.num_key_value_heads)
    if arch.startswith("gemma") and name.endswith("norm.weight"):
      w = w + 1.0
    writer.add_tensor(f"{names.get_name(module)}.{kind}", np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return Path(path)


def kill_at_checkpoint(args: list[str], env: dict, out: Path, step: int, timeout: float = 300):
  """Starts the training command `args`, SIGKILLs it as soon as checkpoint `step` exists in
  `out`, and checks that it had not finished (no adapter written)."""
  proc = subprocess.Popen(
    args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  deadline = time.time() + timeout
  while not (out / "checkpoints" / str(step)).is_dir():
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline, f"no checkpoint at step {step} in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"


def run_on_fake_devices(script: str, devices: int, timeout: float = 300) -> dict:
  """Runs `script` (python source) in a fresh CPU process with `devices` fake devices, from the
  repo root, and returns the JSON object its last stdout line holds."""
  import os
  import sys

  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
  }
  proc = subprocess.run(
    [sys.executable, "-c", script],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])

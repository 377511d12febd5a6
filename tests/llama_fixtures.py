"""Tiny Llama checkpoints on disk for tests: HF safetensors dirs, GGUF files, a tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jlora.models.llama import LlamaConfig

CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def tiny_vocab() -> list[str]:
  """Byte-level BPE vocab: the 256 byte symbols, the merge results, then the special tokens."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  return list(bytes_to_unicode().values()) + ["".join(m.split()) for m in MERGES] + SPECIAL_TOKENS


TINY_VOCAB_SIZE = 256 + len(MERGES) + len(SPECIAL_TOKENS)


def tiny_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {t: i for i, t in enumerate(tiny_vocab())}
  bpe = models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in MERGES])
  tok = Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
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


_GGUF_NAMES = {
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}


def save_gguf(
  path: Path, config: LlamaConfig, state: dict[str, np.ndarray], arch: str = "llama"
) -> Path:
  """Write `state` (HF names/layout) as a llama.cpp-style F32 GGUF with a tiny gpt2 tokenizer."""
  import gguf

  c = config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_rope_freq_base(c.rope_theta)
  writer.add_rope_dimension_count(c.head_dim)

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

  for name, w in state.items():
    if name.startswith("model.layers."):
      _, _, layer, rest = name.split(".", 3)
      module, kind = rest.rsplit(".", 1)
      if module == "self_attn.q_proj" and arch == "llama":
        w = llama_cpp_permute(w, c.num_attention_heads)
      elif module == "self_attn.k_proj" and arch == "llama":
        w = llama_cpp_permute(w, c.num_key_value_heads)
      gguf_name = f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"
    else:
      gguf_name = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
      }[name]
    writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return Path(path)

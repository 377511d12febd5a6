"""GGUF export against an independent reader: transformers' own GGUF loader (PyTorch, fp32).

Tolerances. f32: the file holds the merged weights exactly, so transformers' logits must match
jlora's merged model within fp32 arithmetic (1e-4, PEFT's own tolerance). f16, bf16, q8_0, q4_0:
the file holds the merged weights rounded by the format; test_gguf_export checks every stored
weight against the bound its format allows (f16 |w| 2^-11, bf16 |w| 2^-8, q8_0 absmax/254 per
32-block, q4_0 absmax/8). The logits are then compared with jlora's forward on exactly those
rounded weights (gguf's reference quantizer applied to jlora.merge's weights, then run), again
within 1e-4: a wrong layout, permutation, type or metadata would move them far more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc

import gguf
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jlora  # noqa: E402
from tests.test_gguf_export import (  # noqa: E402
  CONFIG,
  IDS,
  adapted,  # noqa: F401  (fixture)
  adapted_model,
  logits,
  reference_logits,
)
from tests.tiny import CHAT_TEMPLATE, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.ref


def transformers_gguf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
    str(path.parent), gguf_file=path.name, dtype=torch.float32
  ).eval()


def torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(IDS), dtype=torch.long)).logits.float().numpy()


CASES = {
  "llama": {},
  "qwen2": {"model_type": "qwen2", "attention_bias": True, "tie_word_embeddings": True},
  "mistral": {"model_type": "mistral", "sliding_window": 32},  # longer than IDS: no effect
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_f32_matches_jlora_in_transformers_gguf_loader(case, tmp_path):
  config = dataclasses.replace(CONFIG, **CASES[case])
  lora_cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
  model, params, _ = adapted_model(tmp_path / "base", config, lora_cfg)
  with (
    pytest.warns(UserWarning, match="sliding_window")
    if case == "mistral"
    else contextlib.nullcontext()
  ):
    path = jlora.export_gguf(tmp_path / "m.gguf", params, model.config, tiny_tokenizer(), "f32")
  theirs = torch_logits(transformers_gguf(path))
  ours = logits(model, params)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
  base = jax_base_logits(model, params)
  assert not np.allclose(base, ours, atol=1e-3)  # the adapters changed the model


def jax_base_logits(model, params):
  base = jax.tree.map(lambda n: n.base if jlora.is_lora(n) else n, params, is_leaf=jlora.is_lora)
  return logits(model, base)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_rounded_types_match_the_rounded_model(dtype, adapted, tmp_path):  # noqa: F811
  model, params, _ = adapted
  tokenizer = tiny_tokenizer()
  path = jlora.export_gguf(tmp_path / "m.gguf", params, model.config, tokenizer, dtype)
  types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
  expected = reference_logits(tmp_path, model.config, params, types)
  np.testing.assert_allclose(torch_logits(transformers_gguf(path)), expected, atol=1e-4, rtol=1e-4)

  # The tokenizer transformers builds from the file's keys is the one we exported.
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  for text in ["the theme", " hello\nthere  ", "<|im_start|>user\nhi<|im_end|>", "ünïcode ✓ 123"]:
    assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(
      text, add_special_tokens=False
    ), text
  assert theirs.chat_template == CHAT_TEMPLATE
  messages = [{"role": "user", "content": "the"}]
  assert theirs.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=False
  ) == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
def test_adapted_smollm2_exports_a_file_both_readers_load(tmp_path):
  import jax.numpy as jnp

  from jlora.models import export, from_pretrained
  from jlora.models.loading import embedded_gguf_path

  try:
    source = gguf.GGUFReader(str(embedded_gguf_path("smollm2-135m-instruct")))
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model, base, tokenizer = from_pretrained("smollm2-135m-instruct", cache_dir=tmp_path / "cache")
  messages = [
    {"role": "system", "content": "Extract the city as JSON."},
    {"role": "user", "content": "Lena Fischer has lived in Porto since 2018."},
    {"role": "assistant", "content": '{"city": "Porto"}'},
  ]
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  ids = jnp.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]])

  # Adapted weights off the file's 4-bit grid, as a fine-tune leaves them: random non-zero B.
  lora_cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj", "down_proj"))
  params = jlora.apply(base, lora_cfg, jax.random.key(0), layout=jlora.trace_layout(model, ids))
  keys = iter(jax.random.split(jax.random.key(1), 128))
  params = jax.tree.map(
    lambda n: (
      n.replace(b=0.02 * jax.random.normal(next(keys), n.b.shape)) if jlora.is_lora(n) else n
    ),
    params,
    is_leaf=jlora.is_lora,
  )

  pre = export.source_tokenizer_pre("smollm2-135m-instruct")
  path = jlora.export_gguf(
    tmp_path / "smollm2-ft.gguf", params, model.config, tokenizer, "f16", tokenizer_pre=pre
  )
  reader = gguf.GGUFReader(str(path))
  for key in (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
  ):
    assert reader.fields[key].contents() == source.fields[key].contents(), key
  assert {t.name for t in reader.tensors} == {t.name for t in source.tensors}

  # The reference: jlora's fine-tuned model with its weight matrices rounded to f16 (vectors stay
  # f32 in the file), run in fp32. Rounding commutes with the Q/K row permutation.
  rounded = jax.tree_util.tree_map_with_path(
    lambda p, x: x.astype(jnp.float16).astype(jnp.float32) if p[-1].key != "scale" else x,
    jlora.merge(params),
  )
  expected = np.asarray(jlora.wrap(model.apply)({"params": rounded}, ids))
  # Keep the host under ~3 GiB: one 135M-param model at a time from here on.
  del rounded, base, params
  gc.collect()

  hf_model = transformers_gguf(path)
  with torch.no_grad():
    theirs = hf_model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
  del hf_model
  gc.collect()
  np.testing.assert_allclose(theirs, expected, atol=1e-3, rtol=1e-3)  # as in test_llama's SmolLM2
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == text

  ours_model, ours, ours_tokenizer = from_pretrained(path, cache_dir=tmp_path / "cache")
  np.testing.assert_allclose(
    np.asarray(ours_model.apply({"params": ours}, ids)), expected, atol=1e-3, rtol=1e-3
  )
  assert ours_tokenizer.apply_chat_template(messages, tokenize=False) == text


def sentencepiece_style_tokenizer():
  """A Llama-2-style tokenizer: BPE with byte fallback, '▁' for spaces, merges in vocab order."""
  from tokenizers import Tokenizer, decoders, models, normalizers

  chars = ["▁", "t", "h", "e", "m", "a", "o", "r", "n"]
  merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("o", "r"), ("m", "e")]
  vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars
  vocab += ["".join(m) for m in merges]
  bpe = models.BPE(
    vocab={t: i for i, t in enumerate(vocab)},
    merges=merges,
    unk_token="<unk>",
    byte_fallback=True,
    fuse_unk=True,
  )
  tok = Tokenizer(bpe)
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence(
    [
      decoders.Replace("▁", " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(" ", 1, 0),
    ]
  )
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
  )


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
  from flax.linen import meta

  from jlora.models import LlamaForCausalLM

  tokenizer = sentencepiece_style_tokenizer()
  config = dataclasses.replace(CONFIG, vocab_size=len(tokenizer) + 2)  # two [PAD] ids at the end
  model = LlamaForCausalLM(config)
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), IDS)["params"])
  path = jlora.export_gguf(tmp_path / "spm.gguf", params, config, tokenizer, "f16")
  reader = gguf.GGUFReader(str(path))
  assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
  types = reader.fields["tokenizer.ggml.token_type"].contents()
  assert types[:3] == [3, 3, 3] and types[3] == 6 and types[259] == 1  # control, byte, normal
  assert types[-1] == 5 and reader.fields["tokenizer.ggml.scores"].contents()[260] == -260.0
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  # (Runs of spaces are left out: transformers rebuilds this model with its Metaspace
  # pre-tokenizer, which splits "  a" differently from the Prepend normalizer used here.)
  for text in ["the theme", "a mother", "ünï ✓ or the", "other\nthe"]:
    assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(
      text, add_special_tokens=False
    ), text


def test_qwen3_moe_with_adapted_experts_matches_in_transformers_gguf_loader(tmp_path):
  """A Qwen3-MoE with LoRA on attention and on the experts, merged and written as llama.cpp's
  qwen3moe (gate_up_proj split into ffn_gate_exps + ffn_up_exps): transformers' GGUF loader reads
  it to jlora's logits; jlora's own GGUF loader joins the slices back."""
  from jlora.models import from_pretrained
  from tests import tiny
  from tests.test_gguf_export import randomize_b

  # transformers' GGUF loader does not read expert_feed_forward_length (llama.cpp does): it keeps
  # Qwen3MoeConfig's default expert width, 768, so the model here has that width.
  shape = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768, norm_topk_prob=True)
  directory = tiny.save_torch_checkpoint(tmp_path / "hf", "qwen3_moe", head_dim=16, **shape)
  model, params, tokenizer = from_pretrained(directory)
  cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
  params = jlora.apply(params, cfg, jax.random.key(0), layout=jlora.trace_layout(model, IDS))
  params = randomize_b(params)
  path = jlora.export_gguf(tmp_path / "moe.gguf", params, model.config, tokenizer, "f32")
  names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
  assert {
    "blk.0.ffn_gate_exps.weight",
    "blk.0.ffn_up_exps.weight",
    "blk.1.ffn_gate_inp.weight",
  } <= names
  ours = logits(model, params)
  theirs = torch_logits(transformers_gguf(path))
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
  assert not np.allclose(jax_base_logits(model, params), ours, atol=1e-3)
  reloaded, reloaded_params, _ = from_pretrained(path)
  np.testing.assert_allclose(logits(reloaded, reloaded_params), ours, atol=1e-4, rtol=1e-4)

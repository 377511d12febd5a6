"""The model registry without torch: HF names per family, bf16 training steps, bad input, and
`train.sft` end to end on a random Gemma 2 and a random Qwen3."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.errors import UserError
from jlora.models import GemmaConfig, LlamaConfig, LlamaForCausalLM, from_pretrained, registry
from jlora.models.names import HFNames
from tests import tiny
from train import step as step_lib

SHAPE = dict(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
)
SLIDING, FULL = "sliding_attention", "full_attention"
CONFIGS = {
  "qwen3": LlamaConfig(**SHAPE, num_hidden_layers=2, qk_norm=True, model_type="qwen3"),
  "phi3": LlamaConfig(**SHAPE, num_hidden_layers=2, fused_projections=True, model_type="phi3"),
  "gemma2": GemmaConfig(**SHAPE, num_hidden_layers=3, sliding_window=4, model_type="gemma2"),
  "gemma3": GemmaConfig(
    **SHAPE,
    num_hidden_layers=4,
    layer_types=(SLIDING, FULL, SLIDING, SLIDING),
    sliding_window=4,
    qk_norm=True,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    model_type="gemma3_text",
  ),
}


def test_gemma_groups_map_to_hf_layers():
  """Gemma 3 with 8 layers, period 3: two stacked groups plus a remainder of two local layers."""
  config = GemmaConfig(**SHAPE, num_hidden_layers=8, layer_types=(SLIDING, SLIDING, FULL) * 2 + (SLIDING, SLIDING), model_type="gemma3_text")  # fmt: skip
  assert config.plan == ((SLIDING, SLIDING, FULL), 2, (SLIDING, SLIDING))
  names = registry.hf_names(config)
  assert names.module_names("model/layers/layers_2/self_attn/q_proj", 1, 2) == [
    "model.layers.2.self_attn.q_proj",
    "model.layers.5.self_attn.q_proj",
  ]
  assert names.tensor_names("model/tail/layers_1/mlp/up_proj/kernel", (1, 32, 48)) == (
    ["model.layers.7.mlp.up_proj.weight"],
    True,
    True,
  )
  assert names.tensor_names("model/norm/scale", (32,)) == (["model.norm.weight"], False, False)
  # Without a config: Llama's layout, scanned or unrolled.
  assert HFNames().module_names("model/layers/mlp/up_proj", 1, 2)[1] == "model.layers.1.mlp.up_proj"
  assert HFNames().module_names("model/layers_3/mlp/up_proj", 0) == ["model.layers.3.mlp.up_proj"]


def test_gguf_mapping_is_found_both_ways():
  """An exporter finds the architecture a loader reads back (Mistral is written as llama)."""
  for arch, (_, mapping) in registry.GGUF_ARCHITECTURES.items():
    assert registry.gguf_for_model_type(mapping.model_type) == (arch, mapping)
  assert registry.gguf_for_model_type("mistral")[0] == "llama"
  llama = registry.gguf_architecture("llama")[1]
  assert registry.gguf_for_model_type("mixtral") == ("llama", llama.with_experts)  # as llama.cpp
  with pytest.raises(ValueError, match=r"'phi3' has no GGUF architecture"):
    registry.gguf_for_model_type("phi3")


def _params(model, dtype):
  shapes = jax.eval_shape(
    lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  )["params"]
  rng = np.random.default_rng(0)
  norm_center = 0.0 if isinstance(model.config, GemmaConfig) else 1.0  # Gemma scales by 1 + w

  def draw(path, leaf):
    center = norm_center if path[-1].key == "scale" else 0.0
    return jnp.asarray(center + 0.2 * rng.standard_normal(leaf.shape), dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# Phi-3 differs from Qwen3's module only in fused projections, which do not change dtypes.
@pytest.mark.parametrize("case", ["qwen3", "gemma2", "gemma3"])
def test_bf16_training_step_is_finite_and_close_to_fp32(case):
  """Norms, softmax and soft-caps run in fp32 inside a bf16 model, so a bf16 step stays finite and
  its loss stays near the fp32 loss of the same weights."""
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    config = dataclasses.replace(CONFIGS[case], dtype=dtype, param_dtype=dtype)
    model = registry.family_for_config(config).module_cls(config)
    params = _params(model, dtype)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
    layout = jlora.trace_layout(model, jnp.asarray(ids))
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear", dtype=jnp.float32)
    trainable, frozen = jlora.split(jlora.apply(params, cfg, jax.random.key(1), layout=layout))
    batch = {
      "input_ids": ids,
      "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
      "segment_ids": np.ones((2, 16), np.int32),
      "targets": np.roll(ids, -1, axis=1),
      "loss_mask": np.ones((2, 16), np.int32),
    }
    batch = step_lib.gather_labels(batch, 16)
    tx = optax.adamw(1e-3)
    step = jax.jit(step_lib.make_train_step(model, tx))
    _, _, metrics = step(trainable, tx.init(trainable), frozen, batch, 0, jax.random.key(2))
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["grad_norm"])), case
    assert float(metrics["grad_norm"]) > 0
    losses[dtype] = float(metrics["loss"])
  assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=0.05)


def test_final_logit_softcap_applies_in_the_chunked_loss_head():
  """The trainer's chunked CE calls `logits` via method=: the cap must be there."""
  config = CONFIGS["gemma2"]
  model = registry.family_for_config(config).module_cls(config)
  params = _params(model, jnp.float32)
  hidden = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 32)), jnp.float32)
  capped = model.apply({"params": params}, hidden, method=type(model).logits)
  raw = model.apply({"params": params}, hidden, method=LlamaForCausalLM.logits)
  np.testing.assert_allclose(capped, 30.0 * np.tanh(np.asarray(raw) / 30.0), rtol=1e-6)


# --- bad input -------------------------------------------------------------------------------------


def test_unregistered_model_type_names_the_supported_ones():
  with pytest.raises(UserError, match=r"model_type 'gpt_neox'.*'gemma2', 'gemma3_text'"):
    registry.model_from_hf({"model_type": "gpt_neox", "hidden_size": 8})
  with pytest.raises(ValueError, match=r"model_type 'llama'.*supports \['gemma2', 'gemma3_text'\]"):
    GemmaConfig.from_hf({"model_type": "llama"})


def test_mxfp4_gpt_oss_is_refused_in_one_line():
  hf = {
    "model_type": "gpt_oss",
    **SHAPE,
    "num_hidden_layers": 2,
    "num_local_experts": 4,
    "quantization_config": {"quant_method": "mxfp4"},
  }
  with pytest.raises(UserError, match=r"quant_method: 'mxfp4' checkpoints are not loaded.*Mxfp4"):
    registry.config_from_hf(hf)
  del hf["quantization_config"]
  assert registry.config_from_hf(hf).layer_types == (SLIDING, FULL)  # transformers' default


def test_missing_config_field_is_named(tmp_path):
  directory = tiny.make_checkpoint(tmp_path, config=CONFIGS["gemma2"])
  config = json.loads((directory / "config.json").read_text())
  del config["intermediate_size"]
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=r"'gemma2' lacks required fields \['intermediate_size'\]"):
    from_pretrained(directory)


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  directory = tiny.make_checkpoint(tmp_path, config=CONFIGS["gemma3"])
  state = load_file(str(directory / "model.safetensors"))
  # (local, global, local) once, then a remainder of one local layer: layer 3 is model/tail/layers_0.
  del state["model.layers.3.post_feedforward_layernorm.weight"]
  save_file(state, str(directory / "model.safetensors"))
  with pytest.raises(
    UserError, match=r"'model.layers.3.post_feedforward_layernorm.weight'.*model/tail/layers_0"
  ):
    from_pretrained(directory)


# --- train.sft end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_trains_gemma2(tmp_path):
  """The trainer end to end on the family furthest from Llama (soft-caps, alternating windows,
  scaled embeddings). Qwen3's and Gemma 3's training step is tested above in bf16 and fp32."""
  from safetensors.numpy import load_file

  from train import sft

  model_dir = tiny.make_checkpoint(tmp_path / "model", config=CONFIGS["gemma2"])
  train = tiny.write_rows(tmp_path / "train.jsonl", 32)
  evals = tiny.write_rows(tmp_path / "eval.jsonl", 4, start=1000)
  out = tmp_path / "run"
  config = tiny.sft_config(model_dir, train, evals, out, steps=4, eval_every=4, save_every=4)
  summary = sft.run(config, progress=False)
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  assert load_file(str(out / "adapter_model.safetensors"))

  model, base, _ = from_pretrained(model_dir)
  adapted = jlora.load_adapter(out, base, model_config=model.config)
  assert jlora.adapter_count(adapted) > 0


# --- chat templates --------------------------------------------------------------------------------

# The templates of google/gemma-2-2b-it (no system role: it raises) and google/gemma-3-1b-it (the
# system message opens the first user turn), text parts only.
GEMMA2_TEMPLATE = (
  "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
  "{{ raise_exception('System role not supported') }}{% endif %}"
  "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
  "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
  "{% else %}{% set role = message['role'] %}{% endif %}"
  "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
  "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3_TEMPLATE = (
  "{{ bos_token }}\n"
  "{%- if messages[0]['role'] == 'system' -%}\n"
  "    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
  "    {%- set loop_messages = messages[1:] -%}\n"
  "{%- else -%}\n"
  '    {%- set first_user_prefix = "" -%}\n'
  "    {%- set loop_messages = messages -%}\n"
  "{%- endif -%}\n"
  "{%- for message in loop_messages -%}\n"
  "    {%- if (message['role'] == 'assistant') -%}\n"
  '        {%- set role = "model" -%}\n'
  "    {%- else -%}\n"
  "        {%- set role = message['role'] -%}\n"
  "    {%- endif -%}\n"
  "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
  "    {%- if message['content'] is string -%}\n"
  "        {{ message['content'] | trim }}\n"
  "    {%- elif message['content'] is iterable -%}\n"
  "        {%- for item in message['content'] -%}\n"
  "            {%- if item['type'] == 'text' -%}\n"
  "                {{ item['text'] | trim }}\n"
  "            {%- endif -%}\n"
  "        {%- endfor -%}\n"
  "    {%- endif -%}\n"
  "    {{ '<end_of_turn>\n' }}\n"
  "{%- endfor -%}\n"
  "{%- if add_generation_prompt -%}\n"
  "    {{'<start_of_turn>model\n'}}\n"
  "{%- endif -%}\n"
)


@pytest.mark.parametrize("template", [GEMMA2_TEMPLATE, GEMMA3_TEMPLATE], ids=["gemma2", "gemma3"])
def test_gemma_templates_keep_the_system_message_and_the_answer_mask(template, tmp_path):
  from tokenizers import models, pre_tokenizers, trainers
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  from train import data as data_lib
  from train.generate import chat_prompt_ids

  tok = tiny._byte_level(models.BPE())
  specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
  trainer = trainers.BpeTrainer(
    vocab_size=320,
    special_tokens=specials,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(["Answer in French. What is the capital? Paris, la capitale."], trainer)
  PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
    chat_template=template,
  ).save_pretrained(str(tmp_path))
  tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))  # the template from the files

  row = {
    "messages": [
      {"role": "system", "content": "Answer in French."},
      {"role": "user", "content": "What is the capital?"},
      {"role": "assistant", "content": "Paris, la capitale."},
    ]
  }
  ids, completion = data_lib.encode_row(tokenizer, row, "messages")
  text = tokenizer.decode(ids)
  assert text.startswith(
    "<bos><start_of_turn>user\nAnswer in French.\n\nWhat is the capital?<end_of_turn>\n"
  )
  assert tokenizer.decode(ids[completion]) == "Paris, la capitale.<end_of_turn>"
  prompt = tokenizer.decode(chat_prompt_ids(tokenizer, "What is the capital?", "Answer in French."))
  assert prompt.endswith(
    "Answer in French.\n\nWhat is the capital?<end_of_turn>\n<start_of_turn>model\n"
  )

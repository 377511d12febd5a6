"""Trainable token rows (PEFT's trainable_token_indices): PEFT adapters load in jlora and jlora's
in PEFT with equal logits (tied and untied heads), only the chosen rows train, and a merged export
loads in transformers with the same logits. The reference is PEFT's TrainableTokensLayer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.models

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.ref

ROWS = [3, 5, 200]
IDS = np.array([[1, 3, 9, 5, 33, 200, 100, 3], [200, 7, 5, 40, 3, 90, 12, 0]])


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def torch_base(request, tmp_path_factory):
  from tests.tiny import save_torch_checkpoint

  directory = tmp_path_factory.mktemp("base")
  return save_torch_checkpoint(
    directory, tie_word_embeddings=request.param, hidden_size=32, intermediate_size=48
  ), request.param


def _hf(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(
    str(directory), dtype=torch.float32
  ).eval()


def _torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.numpy()


def _logits(model, params) -> np.ndarray:
  forward = jax.jit(lambda p: jlora.wrap(model.apply)({"params": p}, jnp.asarray(IDS)))
  return np.asarray(forward(params))


def _token_spec(tied: bool):
  return ROWS if tied else {"embed_tokens": ROWS, "lm_head": ROWS}


def test_peft_token_rows_load_in_jlora_and_back(torch_base, tmp_path):
  base_dir, tied = torch_base
  torch.manual_seed(0)
  cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=_token_spec(tied))
  reference = peft.get_peft_model(_hf(base_dir), cfg).eval()
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if "trainable_tokens_delta" in name or "lora_B" in name:
        p.normal_(0.0, 0.3)
  reference.save_pretrained(str(tmp_path / "peft"))
  expected = _torch_logits(reference)
  assert not np.allclose(expected, _torch_logits(_hf(base_dir)), atol=1e-3)

  model, params, _ = jlora.models.from_pretrained(base_dir)
  loaded, lora_cfg = jlora.load_adapter(tmp_path / "peft", params, return_config=True)
  np.testing.assert_allclose(_logits(model, loaded), expected, atol=1e-4, rtol=1e-4)

  jlora.save_adapter(tmp_path / "ours", loaded, lora_cfg, model_config=model.config)
  again = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(_torch_logits(again), expected, atol=1e-4, rtol=1e-4)

  # A merged export carries the rows: transformers alone gives the same logits.
  jlora.export_merged(tmp_path / "merged", loaded, model.config)
  np.testing.assert_allclose(_torch_logits(_hf(tmp_path / "merged")), expected, atol=1e-4)


@pytest.mark.parametrize("torch_base", [False], indirect=True, ids=["untied"])
def test_only_the_chosen_rows_train(torch_base):
  base_dir, tied = torch_base
  model, params, _ = jlora.models.from_pretrained(base_dir)
  cfg = jlora.LoraConfig(rank=4, targets=["q_proj"], trainable_token_indices=_token_spec(tied))
  params = jlora.apply(params, cfg, jax.random.key(0))
  trainable, frozen = jlora.split(params)
  apply = jlora.wrap(model.apply)

  def loss_fn(t):
    logits = apply({"params": jlora.combine(t, frozen)}, jnp.asarray(IDS))[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, IDS[:, 1:]).mean()

  grads = jax.jit(jax.grad(loss_fn))(trainable)
  tx = optax.sgd(1.0)
  trained = optax.apply_updates(trainable, tx.update(grads, tx.init(trainable))[0])
  before = jlora.merge(params)
  after = jlora.merge(jlora.combine(trained, frozen))
  tables = [("model", "embed_tokens", "embedding", 0)]
  if not tied:
    tables.append(("lm_head", None, "kernel", 1))
  for first, second, leaf, vocab_axis in tables:
    pick = lambda t: np.asarray(t[first][second][leaf] if second else t[first][leaf])
    changed = np.abs(pick(after) - pick(before)).max(axis=1 - vocab_axis) > 0
    # Every chosen row moves (each of them is looked up or predicted), no other does.
    assert sorted(np.flatnonzero(changed)) == ROWS, (leaf, np.flatnonzero(changed))


def _rows(path, n: int, start: int = 0):
  """Bundled rows as prompt/completion (the chat template below wraps answers in the new tokens)."""
  import json

  from tests.tiny import REPO

  lines = (REPO / "data" / "extract_train.jsonl").read_text().splitlines()[start : start + n]
  rows = []
  for line in lines:
    _, user, assistant = json.loads(line)["messages"]
    rows.append({"prompt": user["content"], "completion": assistant["content"]})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


# ChatML with every answer wrapped in the new tokens: only the template puts them in the data.
TOOL_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
  "{% if m['role'] == 'assistant' %}<tool>{{ m['content'] }}</tool>{% else %}{{ m['content'] }}"
  "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
  "{% endif %}"
)


def _gguf_table(reader, name: str) -> np.ndarray:
  (tensor,) = [t for t in reader.tensors if t.name == name]
  return np.asarray(tensor.data)


def test_sft_adds_trains_and_exports_new_tokens(tmp_path, capsys):
  """config.tokens.add + chat_template: the template puts the tokens in the training data, their
  rows train; the PEFT adapter (+ saved tokenizer), the merged checkpoint and the GGUF (vocab,
  token types, rows, template, tokenizer rebuilt by jlora's GGUF reader) all carry them."""
  import gguf
  from safetensors.numpy import load_file

  from jlora.models.gguf_tokenizer import gguf_tokenizer
  from tests import tiny
  from train import sft

  model_dir = tiny.make_checkpoint(tmp_path / "model", tied=False)
  out = tmp_path / "run"
  new = ["<tool>", "</tool>"]
  (tmp_path / "tool.jinja").write_text(TOOL_TEMPLATE)
  config = tiny.sft_config(
    model_dir,
    _rows(tmp_path / "train.jsonl", 24),
    _rows(tmp_path / "eval.jsonl", 4, start=1000),
    out,
    **{"tokens.add": new, "tokens.chat_template": str(tmp_path / "tool.jinja")},
    **{"steps": 2, "save_every": 1, "eval_every": 2, "export_merged": True, "export_gguf": "f32"},
    **{"eval_examples": 2, "samples": 0, "eval.metrics": "", "data.max_length": 64},
  )
  sft.run(config, progress=False)
  assert (
    "no adapter.gguf: params: lm_head/kernel has trainable token rows" in capsys.readouterr().out
  )
  assert not (out / "adapter.gguf").exists()
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert tok.chat_template == TOOL_TEMPLATE
  ids = tok.convert_tokens_to_ids(new)
  assert ids == [len(tok) - 2, len(tok) - 1]
  written = tiny.read_json(out / "adapter_config.json")["trainable_token_indices"]
  assert written == {"embed_tokens": ids, "lm_head": ids}
  adapter = load_file(out / "adapter_model.safetensors")

  # PEFT: the base resized to the saved tokenizer, then the adapter, equals the merged export.
  base = _hf(model_dir)
  base.resize_token_embeddings(len(tok))
  reference = peft.PeftModel.from_pretrained(base, str(out)).eval()
  sample = "a <tool>{'x': 1}</tool> b"
  text = tok(sample, return_tensors="pt")["input_ids"]
  assert set(ids) <= set(text[0].tolist())
  with torch.no_grad():
    expected = reference(text).logits.numpy()
    merged = _hf(out / "merged")(text).logits.numpy()
  np.testing.assert_allclose(merged, expected, atol=1e-4, rtol=1e-4)
  assert transformers.AutoTokenizer.from_pretrained(str(out / "merged")).chat_template == (
    TOOL_TEMPLATE
  )
  # The new rows trained away from their start (the mean row): the template put them in the data.
  weights = load_file(out / "merged" / "model.safetensors")
  emb = weights["model.embed_tokens.weight"]
  mean = emb[: ids[0]].mean(axis=0)
  assert np.abs(emb[ids] - mean).max() > 1e-3

  # GGUF: the grown vocabulary with the tokens as CONTROL at their ids, the merged rows, the
  # template, and a tokenizer rebuilt from the file that encodes them as HF's does.
  path = out / "model-f32.gguf"
  reader = gguf.GGUFReader(str(path))
  field = reader.fields["tokenizer.ggml.tokens"]
  vocab = [bytes(field.parts[i]).decode() for i in field.data]
  assert len(vocab) == len(tok) and [vocab[i] for i in ids] == new
  types = reader.fields["tokenizer.ggml.token_type"]
  assert [int(types.parts[types.data[i]][0]) for i in ids] == [gguf.TokenType.CONTROL] * 2
  np.testing.assert_array_equal(_gguf_table(reader, "token_embd.weight"), emb)
  np.testing.assert_array_equal(_gguf_table(reader, "output.weight"), weights["lm_head.weight"])
  rebuilt = gguf_tokenizer(path)
  assert rebuilt(sample)["input_ids"] == text[0].tolist()
  assert rebuilt.chat_template == TOOL_TEMPLATE

  # Resume keeps the rows: drop the last checkpoint, rerun, same adapter.
  import shutil

  shutil.rmtree(out / "checkpoints" / "2")
  capsys.readouterr()
  sft.run(config, progress=False)
  assert "resuming from step 1" in capsys.readouterr().out
  again = load_file(out / "adapter_model.safetensors")
  for key, value in adapter.items():
    np.testing.assert_allclose(again[key], value, atol=1e-6, err_msg=key)

"""Training fidelity: the trainer's step against PEFT + PyTorch run the way transformers' Trainer
(and so TRL's SFTTrainer) runs it, step by step; and QLoRA against the same run on its
dequantized base.

The PyTorch side (bench/fidelity.py's run_torch) is the reference: HF's own loss with
`num_items_in_batch`, clip_grad_norm_, torch.optim.AdamW, and HF's LambdaLR schedule.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

import jlora
from jlora.models import LlamaConfig, LlamaForCausalLM
from jlora.quant import quantized_nodes
from train import step as step_lib

SEQ = 192
LORA = jlora.LoraConfig(rank=8, alpha=16, targets="all-linear")


def varied_rows(n: int, seed: int = 0) -> list[dict]:
  """Prompt/completion rows from the bundled task with completions cut at random lengths, so
  the labelled tokens per microbatch differ a lot (that is what tells the normalisations apart)."""
  from tests.tiny import REPO

  rng = np.random.default_rng(seed)
  lines = (REPO / "data" / "extract_train.jsonl").read_text().splitlines()[:n]
  rows = []
  for line in lines:
    _, user, assistant = json.loads(line)["messages"]
    answer = assistant["content"]
    cut = int(rng.integers(3, len(answer) + 1))
    rows.append({"prompt": user["content"], "completion": answer[:cut]})
  return rows


@pytest.mark.ref
def test_twenty_steps_match_peft_and_torch_step_by_step(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  from bench import fidelity
  from jlora.models.loading import load_tokenizer
  from tests.tiny import save_torch_checkpoint
  from train import data as data_lib

  model_dir = save_torch_checkpoint(
    tmp_path / "base", num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=SEQ
  )
  rows_file = tmp_path / "rows.jsonl"
  rows_file.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(80)))
  arrays, stats = data_lib.prepare_spec(
    str(rows_file), load_tokenizer(model_dir), max_length=SEQ, pack=False, seed=0
  )
  assert stats["truncated"] == 0 and stats["packed_rows"] == 80  # unpacked: one example a row
  s = fidelity.Settings(
    steps=20,
    rows=4,
    seq=SEQ,
    accum=2,
    rank=8,
    alpha=16.0,
    lr=1e-2,
    warmup_steps=3,
    weight_decay=0.1,
    clip_norm=1.0,
  )
  batches = fidelity.train_batches(arrays, s)
  counts = [[int(mb["loss_mask"].sum()) for mb in fidelity.microbatches(b, 2)] for b in batches]
  assert max(max(c) / min(c) for c in counts) > 2  # microbatches of very different weight
  assert any((b["segment_ids"] == 0).any() for b in batches)  # and padding

  j = fidelity.run_jlora(model_dir, arrays, batches, s, tmp_path)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: more threads only spin (30 s of CPU on 2 cores)
  try:
    t = fidelity.run_torch(model_dir, tmp_path / "initial", batches, s)
  finally:
    torch.set_num_threads(threads)
  result = fidelity.compare(j, t, s)
  steps = result["rows"]

  assert [r["jlora_tokens"] for r in steps] == [r["tokens"] for r in steps]
  clipped = [r["clipped"] for r in steps]
  assert any(clipped) and not all(clipped), "the clip norm must bind on some steps only"
  assert steps[0]["lr_torch"] == steps[0]["lr_jlora"] == 0.0  # HF's warmup starts at lr 0
  for r in steps:
    assert r["loss_rel"] <= fidelity.TARGETS["loss_rel"], r
    assert r["grad_norm_rel"] <= fidelity.TARGETS["grad_norm_rel"], r
    # HF computes the lr in float64, optax in float32: equal to float32 rounding.
    assert r["lr_rel"] <= fidelity.TARGETS["lr_rel"], r
  assert result["worst"]["adapter_abs"] <= fidelity.TARGETS["adapter_abs"]
  initial = fidelity.read_adapter(tmp_path / "initial")
  moved = max(float(np.max(np.abs(t["adapter"][k] - initial[k]))) for k in initial)
  assert moved > 100 * fidelity.TARGETS["adapter_abs"]  # so the adapter comparison means something


@pytest.mark.ref
@pytest.mark.parametrize("warmup, steps, min_lr_ratio", [(0, 10, 0.1), (3, 10, 0.1), (4, 7, 0.0)])
def test_schedule_is_hfs_lambda_lr_step_for_step(warmup, steps, min_lr_ratio):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, schedule = step_lib.make_optimizer(
    2e-3, steps, warmup, weight_decay=0.0, clip_norm=1.0, min_lr_ratio=min_lr_ratio
  )
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
  hf = transformers.get_cosine_with_min_lr_schedule_with_warmup(
    opt, warmup, steps, min_lr_rate=min_lr_ratio
  )
  for k in range(steps):
    want = hf.get_last_lr()[0]  # the lr update k uses
    np.testing.assert_allclose(float(schedule(k)), want, rtol=1e-6, atol=0)
    opt.step()
    hf.step()
  assert float(schedule(0)) == (0.0 if warmup else pytest.approx(2e-3))


# --------------------------------------------------------------------------- QLoRA


def _tiny_llama():
  config = LlamaConfig(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
  )
  model = LlamaForCausalLM(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = meta.unbox(model.init(jax.random.key(3), ids)["params"])
  return model, params, jlora.trace_layout(model, ids)


def _batches(vocab: int, steps: int, rows: int = 4, seq: int = 40, seed: int = 0) -> list[dict]:
  """Right-padded rows of random length counting up from a random token (a pattern LoRA can
  learn), loss on a random suffix of each (the completion)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    b = {k: np.zeros((rows, seq), np.int32) for k in ("input_ids", "targets", "loss_mask")}
    b["segment_ids"] = np.zeros((rows, seq), np.int32)
    b["positions"] = np.zeros((rows, seq), np.int32)
    for r in range(rows):
      n = int(rng.integers(6, seq + 1))
      tokens = (rng.integers(0, vocab) + np.arange(n + 1)) % vocab
      b["input_ids"][r, :n], b["targets"][r, :n] = tokens[:-1], tokens[1:]
      b["loss_mask"][r, int(rng.integers(1, n)) : n] = 1
      b["segment_ids"][r, :n], b["positions"][r, :n] = 1, np.arange(n)
    out.append(step_lib.gather_labels(b, seq))
  return out


def _train(model, trainable, frozen, batches, tx):
  step = jax.jit(step_lib.make_train_step(model, tx, accum_steps=2))
  opt_state, losses, norms = tx.init(trainable), [], []
  for i, batch in enumerate(batches):
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, i, jax.random.key(0))
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  return trainable, np.array(losses), np.array(norms)


def test_qlora_run_equals_the_run_on_its_dequantized_base():
  """nf4 with double quantization; int4 shares every step of the path but the code table."""
  model, base, layout = _tiny_llama()
  qcfg = jlora.QuantConfig(kind="nf4", block_size=64, double_quant=True)
  quantized = jlora.quantize(base, qcfg, layout=layout)
  params = jlora.apply(quantized, LORA, jax.random.key(1), layout=layout)
  # The same adapters on plain arrays holding exactly the 4-bit weights.
  dequantized = jlora.dequantize(params)
  assert quantized_nodes(params) and not quantized_nodes(dequantized)
  steps = 8
  tx, _ = step_lib.make_optimizer(5e-2, steps, 2, weight_decay=0.1, clip_norm=1.0)
  batches = _batches(model.config.vocab_size, 2) * (steps // 2)  # two batches, seen 4 times
  q_adapters, q_losses, q_norms = _train(model, *jlora.split(params), batches, tx)
  d_adapters, d_losses, d_norms = _train(model, *jlora.split(dequantized), batches, tx)

  np.testing.assert_allclose(q_losses, d_losses, rtol=0, atol=1e-5)
  np.testing.assert_allclose(q_norms, d_norms, rtol=1e-4)
  assert q_losses[-2] < q_losses[0] - 0.05  # it trained (the same batch, 6 steps later)
  for q, d in zip(jax.tree.leaves(q_adapters), jax.tree.leaves(d_adapters)):
    np.testing.assert_allclose(q, d, atol=1e-5)
  # The 4-bit base is not the original one, so this is not an fp32 run in disguise.
  original = [
    n.base
    for n in jax.tree.leaves(
      jlora.apply(base, LORA, jax.random.key(1), layout=layout), is_leaf=jlora.is_lora
    )
    if jlora.is_lora(n)
  ]
  rounded = [
    n.base for n in jax.tree.leaves(dequantized, is_leaf=jlora.is_lora) if jlora.is_lora(n)
  ]
  assert min(float(jnp.max(jnp.abs(o - r))) for o, r in zip(original, rounded)) > 1e-3

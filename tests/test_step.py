"""The training step against naive references: full logits + masked mean, one big batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.linen import meta

import jlora
from jlora.models import LlamaConfig, LlamaForCausalLM
from train import step as step_lib

VOCAB, ROWS, SEQ = 96, 4, 24


def make_setup(head: str):
  """A tiny Llama with LoRA on every linear layer and a batch. head: "frozen" (tied, not
  adapted); "tokens" (tied, two vocabulary rows train); "lora" (untied, LoRA on lm_head too)."""
  config = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=head != "lora",
  )
  model = LlamaForCausalLM(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  base = meta.unbox(model.init(jax.random.key(0), ids)["params"])
  targets = "all-linear" if head != "lora" else r".*(proj|lm_head)"
  tokens = {"embed_tokens": [3, 5]} if head == "tokens" else None
  params = jlora.apply(
    base,
    jlora.LoraConfig(rank=4, alpha=8, targets=targets, trainable_token_indices=tokens),
    jax.random.key(1),
    layout=jlora.trace_layout(model, ids),
  )
  # Non-zero B (and changed token rows) so the adapters matter.
  params = jax.tree.map(
    lambda n: (
      n.replace(b=0.1 * jnp.ones_like(n.b))
      if jlora.is_lora(n)
      else n.replace(rows=n.rows + 0.5)
      if isinstance(n, jlora.TokenRows)
      else n
    ),
    params,
    is_leaf=lambda n: jlora.is_lora(n) or isinstance(n, jlora.TokenRows),
  )
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (ROWS, SEQ + 1)).astype(np.int32)
  mask = (rng.random((ROWS, SEQ)) < 0.4).astype(np.int32)
  batch = {
    "input_ids": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "loss_mask": mask,
    "segment_ids": np.ones((ROWS, SEQ), np.int32),
    "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy(),
  }
  return model, params, step_lib.gather_labels(batch, step_lib.label_budget(mask))


@pytest.fixture(scope="module")
def setup():
  return make_setup("frozen")


def naive_loss(model, params, batch):
  logits = jlora.wrap(model.apply)(
    {"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"]
  ).astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(xent * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


@pytest.mark.parametrize("head", ["frozen", "tokens", "lora"])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_head_only_at_labels_equals_full_logits_loss(head, chunk, monkeypatch):
  """The loss and its adapter gradient against full logits + optax's cross-entropy, for a frozen
  head (its gradient taken in the forward) and heads that train (plain autodiff)."""
  model, params, batch = make_setup(head)
  monkeypatch.setattr(
    step_lib, "CE_CHUNK", chunk
  )  # 7: several chunks with padding; 1024: one chunk
  apply = jlora.wrap(model.apply)
  trainable, frozen = jlora.split(params)
  hidden = jnp.zeros((3, 32))
  head_of = lambda p, x: apply({"params": p}, x[None], method=LlamaForCausalLM.logits)
  assert step_lib.head_reads_trainable(head_of, params, hidden) == (head != "frozen")
  total, count = step_lib.loss_sum(apply, LlamaForCausalLM, params, batch)
  assert int(count) == batch["loss_mask"].sum()
  np.testing.assert_allclose(total / count, naive_loss(model, params, batch), rtol=1e-6)
  # And its gradient w.r.t. the adapters, under jit as the trainer takes it.
  loss = lambda t: jnp.divide(
    *step_lib.loss_sum(apply, LlamaForCausalLM, jlora.combine(t, frozen), batch)
  )
  chunked = jax.jit(jax.grad(loss))(trainable)
  reference = jax.grad(lambda t: naive_loss(model, jlora.combine(t, frozen), batch))(trainable)
  assert jax.tree.structure(chunked) == jax.tree.structure(reference)
  for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(reference)):
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)


def test_gradient_accumulation_matches_one_big_batch(setup):
  model, params, batch = setup
  trainable, frozen = jlora.split(params)
  tx = optax.sgd(1.0)
  results = []
  for accum in (1, 2, 4):
    step = jax.jit(step_lib.make_train_step(model, tx, accum_steps=accum))
    new, _, metrics = step(trainable, tx.init(trainable), frozen, batch, 0, jax.random.key(0))
    results.append((new, float(metrics["loss"])))
  reference = float(naive_loss(model, params, batch))
  for new, loss in results:
    assert loss == pytest.approx(reference, rel=1e-6)
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(results[0][0])):
      np.testing.assert_allclose(got, want, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(results[0][0])[0], jax.tree.leaves(trainable)[0])


def test_non_finite_step_leaves_the_state_untouched(setup):
  model, params, batch = setup
  trainable, frozen = jlora.split(params)
  tx = optax.adam(1e-3)
  state = tx.init(trainable)
  poisoned = jax.tree.map(lambda x: x * jnp.nan, frozen)
  new, new_state, metrics = jax.jit(step_lib.make_train_step(model, tx))(
    trainable, state, poisoned, batch, 0, jax.random.key(0)
  )
  assert not bool(metrics["finite"])
  for got, want in zip(jax.tree.leaves((new, new_state)), jax.tree.leaves((trainable, state))):
    np.testing.assert_array_equal(got, want)


def test_label_budget_and_gather():
  mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.int32)
  assert step_lib.label_budget(mask, multiple=4) == 4
  batch = {"loss_mask": mask, "targets": np.array([[5, 6, 7, 8], [1, 2, 3, 4]], np.int32)}
  out = step_lib.gather_labels(batch, 4)
  np.testing.assert_array_equal(out["label_pos"], [[1, 2, 0, 0], [0, 1, 2, 3]])
  np.testing.assert_array_equal(out["label_targets"], [[6, 7, 0, 0], [1, 2, 3, 4]])
  np.testing.assert_array_equal(out["label_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
  with pytest.raises(ValueError, match="more than the label budget 2"):
    step_lib.gather_labels(batch, 2)

"""LoRA A factors of layers that read one input (q/k/v, gate/up) run as one wider matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora import intercept
from jlora.models import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)


def _adapted():
  model = LlamaForCausalLM(CONFIG)
  ids = jax.random.randint(jax.random.key(0), (2, 11), 0, CONFIG.vocab_size)
  params = model.init(jax.random.key(1), ids)["params"]
  # Different ranks per sibling, so the split of the fused product is exercised.
  lora = jlora.LoraConfig(
    rank=3, targets="all-linear", rank_pattern={"k_proj": 2, "v_proj": 5, "up_proj": 4}
  )
  params = jlora.apply(params, lora, jax.random.key(2))
  rng = np.random.default_rng(0)
  # B = 0 at init would hide every error in the low-rank path.
  params = jax.tree.map(
    lambda n: (
      n.replace(b=jnp.asarray(rng.standard_normal(n.b.shape), n.b.dtype)) if jlora.is_lora(n) else n
    ),
    params,
    is_leaf=jlora.is_lora,
  )
  return model, ids, params


def test_fused_forward_and_gradients_match_per_layer_and_merged(monkeypatch):
  model, ids, params = _adapted()
  trainable, frozen = jlora.split(params)
  apply = jlora.wrap(model.apply)

  def loss(trainable):
    return jnp.sum(apply({"params": jlora.combine(trainable, frozen)}, ids) ** 2)

  fused_jaxpr = str(jax.make_jaxpr(loss)(trainable))
  fused_loss, fused_grads = jax.jit(jax.value_and_grad(loss))(trainable)
  merged = model.apply({"params": jlora.merge(params)}, ids)
  np.testing.assert_allclose(fused_loss, jnp.sum(merged**2), rtol=1e-5)

  monkeypatch.setattr(intercept, "SHARED_INPUT_GROUPS", ())
  jax.clear_caches()  # the scanned layer's trace is cached by function identity
  plain_jaxpr = str(jax.make_jaxpr(loss)(trainable))
  plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss))(trainable)
  np.testing.assert_allclose(fused_loss, plain_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Per layer, q/k/v's three input-side products become one, and gate/up's two become one.
  assert plain_jaxpr.count("dot_general") - fused_jaxpr.count("dot_general") == 3

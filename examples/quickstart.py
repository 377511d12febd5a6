"""The README's snippet, run on a small stock linen transformer block (no edits to the model)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


class Block(nn.Module):
  """Self-attention + MLP written with stock nn.Dense layers, nothing jlora-specific."""

  dim: int = 64
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.heads, -1)
    q, k, v = (split(nn.Dense(self.dim, name=n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]), axis=-1)
    x = x + nn.Dense(self.dim, name="o_proj")(
      jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, -1)
    )
    return x + nn.Dense(self.dim, name="down_proj")(
      nn.gelu(nn.Dense(4 * self.dim, name="up_proj")(x))
    )


model = Block()
x = jax.random.normal(jax.random.key(0), (2, 16, 64))
target = jax.random.normal(jax.random.key(1), (2, 16, 64))
base_params = model.init(jax.random.key(2), x)["params"]
key = jax.random.key(3)

cfg = jlora.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
params = jlora.apply(base_params, cfg, key)  # pure: adapted kernels become LoRA nodes
out = jlora.wrap(model.apply)({"params": params}, x)  # any flax.linen model, unmodified
trainable, frozen = jlora.split(params)  # same tree structure, complementary leaves
params = jlora.combine(trainable, frozen)
print("q_proj:", jax.tree.map(jnp.shape, params["q_proj"]["kernel"]))
print(
  "at init, LoRA output == base output:",
  bool(jnp.array_equal(out, model.apply({"params": base_params}, x))),
)
print(
  f"adapter params: {jlora.adapter_count(params):,} of {sum(p.size for p in jax.tree.leaves(base_params)):,}"
)

tx = jlora.optimizer(optax.adamw(1e-2), params)  # updates adapter leaves only, no state for frozen
state = tx.init(trainable)  # works on the whole tree or on the trainable half
print(
  "optimizer state floats:",
  sum(s.size for s in jax.tree.leaves(state) if s.dtype == jnp.float32),
  "= 2 x adapter params",
)


@jax.jit
def step(trainable, frozen, state):
  def loss(trainable):
    y = jlora.wrap(model.apply)({"params": jlora.combine(trainable, frozen)}, x)
    return jnp.mean((y - target) ** 2)

  value, grads = jax.value_and_grad(loss)(trainable)  # gradients exist for A and B only
  updates, state = tx.update(grads, state, trainable)
  return optax.apply_updates(trainable, updates), state, value


for i in range(50):
  trainable, state, value = step(trainable, frozen, state)
  if i % 10 == 0 or i == 49:
    print(f"step {i:2d} loss {value:.4f}")

params = jlora.combine(trainable, frozen)
merged = jlora.merge(params)  # tree map: W + scale * A @ B, plain arrays
print(
  "merged forward == LoRA forward (max abs diff):",
  float(
    jnp.abs(
      model.apply({"params": merged}, x) - jlora.wrap(model.apply)({"params": params}, x)
    ).max()
  ),
)
params = jlora.unmerge(merged, trainable)  # back to nodes, W recovered
print(
  "unmerge recovers W (max abs diff):",
  float(jnp.abs(params["q_proj"]["kernel"].base - base_params["q_proj"]["kernel"]).max()),
)

"""LoRA+ against PEFT's create_loraplus_optimizer (torch), LoftQ against the paper's alternation
computed independently in numpy, EVA against a numpy SVD of the same activations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.models

torch = pytest.importorskip("torch")

IDS = np.array(
  [[1, 5, 9, 17, 33, 65, 100, 3, 2, 7, 8, 11], [7, 7, 8, 40, 41, 90, 12, 0, 55, 6, 4, 2]]
)


@pytest.mark.ref
def test_loraplus_ten_steps_equal_peft(tmp_path):
  import peft
  import transformers
  from peft.optimizers import create_loraplus_optimizer

  from tests.tiny import save_torch_checkpoint

  base_dir = save_torch_checkpoint(
    tmp_path / "base", tie_word_embeddings=False, hidden_size=32, intermediate_size=48
  )
  torch.manual_seed(3)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
  reference = peft.get_peft_model(hf, cfg)
  with torch.no_grad():  # non-zero B, so A's first steps are not all alike
    for name, p in reference.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.05)
  reference.save_pretrained(str(tmp_path / "adapter"))
  lr, ratio, decay = 2e-3, 16.0, 0.1
  opt = create_loraplus_optimizer(
    reference, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=decay
  )
  ids = torch.tensor(IDS)
  torch_losses = []
  for _ in range(10):
    loss = reference(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch_losses.append(loss.item())

  model, params, _ = jlora.models.from_pretrained(base_dir)
  params = jlora.load_adapter(tmp_path / "adapter", params)
  trainable, frozen = jlora.split(params)
  tx = jlora.optimizer(optax.adamw(lr, eps=1e-8, weight_decay=decay), loraplus_ratio=ratio)
  apply = jlora.wrap(model.apply)

  def loss_fn(t):
    logits = apply({"params": jlora.combine(t, frozen)}, jnp.asarray(IDS))[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, IDS[:, 1:]).mean()

  @jax.jit
  def step(t, state):
    loss, grads = jax.value_and_grad(loss_fn)(t)
    updates, state = tx.update(grads, state, t)
    return optax.apply_updates(t, updates), state, loss

  state = tx.init(trainable)
  ours = []
  for _ in range(10):
    trainable, state, loss = step(trainable, state)
    ours.append(float(loss))
  np.testing.assert_allclose(ours, torch_losses, atol=1e-5, rtol=1e-5)
  node = trainable["model"]["layers"]["mlp"]["down_proj"]["kernel"]
  torch_b = reference.base_model.model.model.layers[1].mlp.down_proj.lora_B.default.weight
  torch_a = reference.base_model.model.model.layers[1].mlp.down_proj.lora_A.default.weight
  np.testing.assert_allclose(np.asarray(node.b[1]), torch_b.detach().numpy().T, atol=1e-5)
  np.testing.assert_allclose(np.asarray(node.a[1]), torch_a.detach().numpy().T, atol=1e-5)

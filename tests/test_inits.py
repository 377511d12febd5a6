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


# --------------------------------------------------------------------------- LoftQ

# Two references: the paper's alternation written here in numpy (an argmin NF4 quantizer), and
# PEFT's own loftq_init with bitsandbytes' nf4 (PEFT >= 0.20 has no NF4 of its own). That function
# hard-codes its compute device to CUDA or XPU; bitsandbytes >= 0.50 quantizes on the CPU too, so
# the test runs PEFT's source with that one line set to "cpu" (peft_loftq_init).


def _np_nf4(w: np.ndarray, block: int = 64) -> np.ndarray:
  """bitsandbytes-style nf4 round trip of a [in, out] kernel: blocks of `block` inputs."""
  from jlora.quant import NF4_TABLE

  blocks = w.reshape(w.shape[0] // block, block, w.shape[1])
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  idx = np.abs(blocks[..., None] / absmax[..., None] - NF4_TABLE).argmin(axis=-1)
  return (NF4_TABLE[idx] * absmax).reshape(w.shape)


def _np_loftq_error(w: np.ndarray, rank: int, iters: int) -> float:
  residual = w
  for i in range(iters):
    dq = _np_nf4(residual)
    u, s, vt = np.linalg.svd(w - dq, full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vt[:rank]
    if i + 1 < iters:
      residual = w - low
  return float(np.linalg.norm(w - dq - low) / np.linalg.norm(w))


@pytest.fixture(scope="module")
def tiny_llama():
  from flax.linen import meta

  from jlora.models import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  model = LlamaForCausalLM(config)
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  # Heavier-tailed weights than the init's normal, so quantization loses something LoRA can fit.
  rng = np.random.default_rng(0)
  boxed = jax.tree.map(
    lambda x: x * jnp.asarray(1 + 3 * rng.random(x.shape[-1]), x.dtype) if x.ndim >= 2 else x,
    boxed,
  )
  return model, boxed, meta.unbox(boxed)


TARGETS = ["q_proj", "down_proj"]


QCFG = jlora.QuantConfig(kind="nf4", double_quant=False, targets=TARGETS)


@pytest.fixture(scope="module")
def loftq_params(tiny_llama):
  from jlora.inits import loftq

  cfg = jlora.LoraConfig(rank=8, alpha=16, targets=TARGETS, init="loftq", loftq_iters=3)
  return loftq(tiny_llama[1], cfg, QCFG, jax.random.key(0))


def test_loftq_error_matches_the_numpy_reference_and_beats_qlora(tiny_llama, loftq_params):
  from jlora.inits import reconstruction_error

  model, boxed, plain = tiny_llama
  qcfg, params = QCFG, loftq_params
  qlora = jlora.apply(
    jlora.quantize(boxed, qcfg),
    jlora.LoraConfig(rank=8, alpha=16, targets=TARGETS),
    jax.random.key(0),
  )
  for name in ("q_proj", "down_proj"):
    group = "self_attn" if name == "q_proj" else "mlp"
    node = params["model"]["layers"][group][name]["kernel"]
    w = np.asarray(plain["model"]["layers"][group][name]["kernel"])
    for layer in range(2):
      ours = reconstruction_error(jax.tree.map(lambda x: x[layer], node), w[layer])
      assert ours == pytest.approx(_np_loftq_error(w[layer], 8, 3), abs=1e-3)
      assert ours < float(np.linalg.norm(w[layer] - _np_nf4(w[layer])) / np.linalg.norm(w[layer]))
  # The adapted model starts closer to the full-precision model than plain QLoRA's.
  ids = jnp.asarray(IDS % 128)
  forward = jax.jit(lambda p: jlora.wrap(model.apply)({"params": p}, ids))
  full = forward(plain)
  gap = lambda p: float(jnp.linalg.norm(forward(p) - full))
  assert gap(params) < 0.85 * gap(qlora)


def peft_loftq_init():
  """PEFT's peft.utils.loftq_utils.loftq_init, its compute device set to the CPU (the one line
  changed; PEFT's code and bitsandbytes' nf4 do the rest)."""
  import inspect
  import textwrap

  from peft.utils import loftq_utils

  source = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
  device_line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
  assert device_line in source, "PEFT's loftq_init changed; update peft_loftq_init"
  namespace = dict(vars(loftq_utils))
  exec(source.replace(device_line, 'compute_device = "cpu"'), namespace)
  return namespace["loftq_init"]


@pytest.mark.ref
def test_loftq_equals_peft_loftq_init(tiny_llama, loftq_params):
  """Same weights, nf4 (blocks of 64, no double quant), rank 8, 3 iterations: the same 4-bit base,
  the same s*A@B, and init errors ||W - (dequant(Q) + s*A@B)|| / ||W|| within 1e-3 (measured:
  1e-8). PEFT's factors carry no scale (its layer uses them with lora_alpha / r as set)."""
  from jlora.inits import reconstruction_error

  pytest.importorskip("bitsandbytes", minversion="0.50")
  loftq_init = peft_loftq_init()
  plain = tiny_llama[2]
  for group, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
    node = jax.tree.map(lambda x: x[0], loftq_params["model"]["layers"][group][name]["kernel"])
    w = np.asarray(plain["model"]["layers"][group][name]["kernel"][0])
    weight = torch.tensor(w.T.copy())  # torch layout [out, in]: bnb's blocks run along inputs
    base, lora_a, lora_b = loftq_init(weight, num_bits=4, reduced_rank=8, num_iter=3)
    theirs = float(torch.linalg.norm(weight - base - lora_b @ lora_a) / torch.linalg.norm(weight))
    assert reconstruction_error(node, w) == pytest.approx(theirs, abs=1e-3)
    np.testing.assert_allclose(np.asarray(node.base.dequantize()).T, base.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(node.delta()).T, (lora_b @ lora_a).numpy(), atol=1e-5)


# --------------------------------------------------------------------------- EVA


@pytest.mark.ref
def test_eva_components_equal_a_numpy_svd_of_the_torch_models_inputs(tmp_path):
  import transformers

  from jlora.inits import eva, principal_directions
  from tests.tiny import save_torch_checkpoint

  base_dir = save_torch_checkpoint(tmp_path / "base", hidden_size=32, intermediate_size=48)
  batches = [IDS[:, :10], IDS[:, 2:]]
  mask = lambda b: np.arange(b.shape[1])[None, :] >= np.array([[1], [3]])  # skip some prefix
  # The reference: the layers' inputs as transformers' own model computes them (forward hooks).
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
  seen = {}
  for i, layer in enumerate(hf.model.layers):
    for name, module in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
      module.register_forward_hook(
        lambda m, args, out, key=(name, i): seen.setdefault(key, []).append(
          args[0].detach().numpy()
        )
      )
  with torch.no_grad():
    for b in batches:
      hf(torch.tensor(b))
  rows = {
    k: np.concatenate([x.reshape(-1, x.shape[-1])[mask(b).reshape(-1)] for x, b in zip(v, batches)])
    for k, v in seen.items()
  }

  model, params, _ = jlora.models.from_pretrained(base_dir)
  run = lambda p, b: model.apply({"params": p}, jnp.asarray(b))
  cfg = jlora.LoraConfig(rank=4, targets=["q_proj", "down_proj"], init="eva", eva_rho=1.0)
  adapted = eva(params, cfg, jax.random.key(0), run, batches, token_mask=mask)
  for name, group in (("q_proj", "self_attn"), ("down_proj", "mlp")):
    node = adapted["model"]["layers"][group][name]["kernel"]
    assert node.a.shape[-1] == 4 and not np.any(np.asarray(node.b))
    for layer in range(2):
      expected, _ = principal_directions(rows[name, layer], 4)
      a = np.asarray(node.a[layer]).T  # [r, in]
      signs = np.sign(np.sum(a * expected, axis=1, keepdims=True))
      np.testing.assert_allclose(a * signs, expected, atol=2e-4)

  # rho > 1: the budget of 4 ranks per layer goes to the largest explained-variance ratios.
  cfg2 = jlora.LoraConfig(rank=4, targets=["q_proj", "down_proj"], init="eva", eva_rho=2.0)
  adapted = eva(params, cfg2, jax.random.key(0), run, batches, token_mask=mask)
  offered = {k: principal_directions(x, 8)[1] for k, x in rows.items()}
  threshold = np.sort(np.concatenate(list(offered.values())))[::-1][4 * len(offered) - 1]
  for name, group in (("q_proj", "self_attn"), ("down_proj", "mlp")):
    a = np.asarray(adapted["model"]["layers"][group][name]["kernel"].a)
    for layer in range(2):
      assert np.count_nonzero(np.abs(a[layer]).sum(axis=0)) == np.sum(
        offered[name, layer] >= threshold
      )

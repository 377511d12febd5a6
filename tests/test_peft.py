"""PEFT interop: jlora adapters load in PEFT/transformers with equal logits, PEFT adapters load in
jlora with equal logits, merged exports load in transformers, and bad adapters are refused.

The references are the PyTorch stack itself (transformers' Llama, PEFT's LoRA layers), fp32,
compared within PEFT's own tolerance (1e-4).
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jlora  # noqa: E402
import jlora.models  # noqa: E402,F401
from jlora import peft as jpeft  # noqa: E402
from jlora.models import export as jexport  # noqa: E402

pytestmark = pytest.mark.ref

ATOL = RTOL = 1e-4
VOCAB = 128
IDS = np.array(
  [[1, 5, 9, 17, 33, 65, 100, 127, 3, 2], [7, 7, 8, 40, 41, 90, 12, 0, 55, 6]], np.int32
)
ALLOWED_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
LINEAR_OR_EMBEDDING = {
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
  "lm_head",
  "embed_tokens",
}


def _tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1")


def _save_base(directory, tied: bool):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=tied,
  )
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  model.save_pretrained(str(directory), safe_serialization=True)
  _tokenizer().save_pretrained(str(directory))
  return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return _save_base(tmp_path_factory.mktemp("base"), tied=False)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
  return _save_base(tmp_path_factory.mktemp("tied"), tied=True)


@pytest.fixture(scope="module")
def jbase(base_dir):
  model, params, tokenizer = jlora.models.from_pretrained(base_dir)
  layout = jlora.trace_layout(model, jnp.asarray(IDS))
  return model, params, tokenizer, layout


def _torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _hf(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(
    str(directory), dtype=torch.float32
  ).eval()


_FORWARDS = {}


def _jlora_logits(model, params) -> np.ndarray:
  if model not in _FORWARDS:
    _FORWARDS[model] = jax.jit(lambda p, ids: jlora.wrap(model.apply)({"params": p}, ids))
  return np.asarray(_FORWARDS[model](params, jnp.asarray(IDS)))


def _apply(params, cfg, layout=None):
  return jlora.apply(params, cfg, jax.random.key(0), layout=layout)


def _randomize_b(params, seed=1):
  """Non-zero B (and A, for embeddings), so the adapter changes the outputs."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if not jlora.is_lora(x):
      return x
    a = np.asarray(x.a)
    a = a if np.abs(a).max() > 0 else 0.1 * rng.standard_normal(a.shape, np.float32)
    return x.replace(
      a=jnp.asarray(a), b=jnp.asarray(0.1 * rng.standard_normal(x.b.shape, np.float32))
    )

  return jax.tree.map(fill, params, is_leaf=jlora.is_lora)


def _check_vllm_compatible(adapter_dir):
  cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] is None and cfg["use_dora"] is False
  assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False
  targets = cfg["target_modules"]
  assert (
    isinstance(targets, list) and {t.rpartition(".")[2] for t in targets} <= LINEAR_OR_EMBEDDING
  )
  from safetensors.numpy import load_file

  tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
  assert tensors and all(
    k.startswith("base_model.model.") and k.endswith(ALLOWED_SUFFIXES) for k in tensors
  )
  assert all(v.size > 0 for v in tensors.values())
  return cfg, tensors


# --------------------------------------------------------------------------- jlora -> PEFT

SAVE_CASES = {
  "plain": dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj")),
  # Patterns, plus embeddings and the head. The path-anchored jlora key can't be written as is.
  "patterns": dict(
    rank=8,
    alpha=16.0,
    targets=("embed_tokens", "q_proj", "v_proj", "down_proj", "lm_head"),
    rank_pattern={"v_proj": 4},
    alpha_pattern={"v_proj": 32.0, "model/layers/mlp/down_proj": 4.0},
  ),
  "all_linear_rslora_patterns": dict(
    rank=16,
    alpha=8.0,
    targets="all-linear",
    use_rslora=True,
    rank_pattern={"mlp/.*": 8},
    alpha_pattern={"o_proj": 2.0},
  ),
}


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_jlora_adapter_loads_in_peft(case, base_dir, jbase, tmp_path):
  model, params, _, layout = jbase
  cfg = jlora.LoraConfig(**SAVE_CASES[case])
  lora = _apply(params, cfg, layout)
  lora = _randomize_b(lora)
  ours = _jlora_logits(model, lora)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the rank-4 vLLM warning is tested separately
    jpeft.save_adapter(tmp_path, lora, cfg, base_model_name_or_path=str(base_dir))
  written, _ = _check_vllm_compatible(tmp_path)

  reference = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path)).eval()
  np.testing.assert_allclose(_torch_logits(reference), ours, atol=ATOL, rtol=RTOL)
  assert not np.allclose(
    ours, _torch_logits(_hf(base_dir)), atol=1e-3
  )  # the adapter is not a no-op
  # PEFT's own scales equal ours, module by module.
  peft_scales = {
    name.removeprefix("base_model.model."): module.scaling["default"]
    for name, module in reference.named_modules()
    if isinstance(getattr(module, "scaling", None), dict)
  }
  ours_scales = {e.hf_name: e.scale for e in jpeft.hf_modules(lora)}
  assert peft_scales.keys() == ours_scales.keys()
  for name, scale in ours_scales.items():
    assert peft_scales[name] == pytest.approx(scale, rel=1e-9), name
  # And the adapter round-trips through jlora.
  again = jpeft.load_adapter(tmp_path, params, layout=layout)
  np.testing.assert_allclose(_jlora_logits(model, again), ours, atol=1e-6, rtol=1e-6)
  if case == "patterns":
    # jlora's path-anchored key can't be written as is; it becomes a per-module-type key.
    assert written["rank_pattern"] == {"v_proj": 4}
    assert written["alpha_pattern"] == {"v_proj": 32.0, "down_proj": 4.0}
  if case == "all_linear_rslora_patterns":
    assert written["target_modules"] == [
      "down_proj",
      "gate_proj",
      "k_proj",
      "o_proj",
      "q_proj",
      "up_proj",
      "v_proj",
    ]
    assert written["use_rslora"] is True


# --------------------------------------------------------------------------- PEFT -> jlora

LOAD_CASES = {
  "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
  "rslora_patterns": dict(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "v_proj", "up_proj"],
    use_rslora=True,
    rank_pattern={"v_proj": 4},
    alpha_pattern={"up_proj": 4, r"model\.layers\.1\.self_attn\.q_proj": 64},
  ),
  "regex_targets": dict(r=4, lora_alpha=8, target_modules=r".*\.(k_proj|down_proj)"),
  "layers_to_transform": dict(
    r=8, lora_alpha=8, target_modules=["o_proj", "gate_proj"], layers_to_transform=[1]
  ),
  "embedding": dict(r=8, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_peft_adapter_loads_in_jlora(case, base_dir, jbase, tmp_path):
  model, params, _, layout = jbase
  torch.manual_seed(1)
  config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **LOAD_CASES[case])
  reference = peft.get_peft_model(_hf(base_dir), config).eval()
  expected = _torch_logits(reference)
  reference.save_pretrained(str(tmp_path))

  loaded, lora_cfg = jpeft.load_adapter(tmp_path, params, return_config=True)
  np.testing.assert_allclose(_jlora_logits(model, loaded), expected, atol=ATOL, rtol=RTOL)
  assert not np.allclose(expected, _torch_logits(_hf(base_dir)), atol=1e-3)
  # The same with an explicit layout.
  with_layout = jpeft.load_adapter(tmp_path, params, layout=layout)
  np.testing.assert_allclose(_jlora_logits(model, with_layout), expected, atol=ATOL, rtol=RTOL)
  if case == "rslora_patterns":
    assert lora_cfg.use_rslora and lora_cfg.rank_for("model/layers/self_attn/v_proj") == 4


# --------------------------------------------------------------------------- DoRA both ways


def _randomize_magnitudes(params, seed=2):
  rng = np.random.default_rng(seed)

  def fill(x):
    if not isinstance(x, jlora.DoraWeight):
      return x
    noise = 1.0 + 0.2 * rng.standard_normal(x.magnitude.shape).astype(np.float32)
    return x.replace(magnitude=x.magnitude * noise)

  return jax.tree.map(fill, params, is_leaf=jlora.is_lora)


def test_jlora_dora_adapter_loads_in_peft(base_dir, jbase, tmp_path):
  model, params, _, layout = jbase
  cfg = jlora.LoraConfig(
    rank=8,
    alpha=16.0,
    targets=("q_proj", "v_proj", "down_proj"),
    use_rslora=True,
    use_dora=True,
    rank_pattern={"v_proj": 4},
  )
  lora = _randomize_magnitudes(_randomize_b(_apply(params, cfg, layout)))
  ours = _jlora_logits(model, lora)
  with pytest.warns(UserWarning, match="vLLM does not serve DoRA"):
    jpeft.save_adapter(tmp_path, lora, cfg, base_model_name_or_path=str(base_dir))
  written = json.loads((tmp_path / "adapter_config.json").read_text())
  assert written["use_dora"] is True and written["rank_pattern"] == {"v_proj": 4}

  reference = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path)).eval()
  np.testing.assert_allclose(_torch_logits(reference), ours, atol=ATOL, rtol=RTOL)
  assert not np.allclose(ours, _torch_logits(_hf(base_dir)), atol=1e-3)
  again = jpeft.load_adapter(tmp_path, params, layout=layout)
  np.testing.assert_allclose(_jlora_logits(model, again), ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
  "case",
  [
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
         rank_pattern={"v_proj": 4}, alpha_pattern={"up_proj": 4}),
    dict(r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj"], layers_to_transform=[1]),
  ],
  ids=["rslora_patterns", "layers_to_transform"],
)  # fmt: skip
def test_peft_dora_adapter_loads_in_jlora(case, base_dir, jbase, tmp_path):
  model, params, _, layout = jbase
  torch.manual_seed(1)
  config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, use_dora=True, **case)
  reference = peft.get_peft_model(_hf(base_dir), config).eval()
  with torch.no_grad():  # magnitudes away from ||W + s*B@A||, so they matter
    for name, p in reference.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1.0 + 0.2 * torch.randn_like(p))
  expected = _torch_logits(reference)
  reference.save_pretrained(str(tmp_path))

  loaded, lora_cfg = jpeft.load_adapter(tmp_path, params, layout=layout, return_config=True)
  assert lora_cfg.use_dora
  assert any(
    isinstance(n, jlora.DoraWeight) for n in jax.tree.leaves(loaded, is_leaf=jlora.is_lora)
  )
  np.testing.assert_allclose(_jlora_logits(model, loaded), expected, atol=ATOL, rtol=RTOL)
  assert not np.allclose(expected, _torch_logits(_hf(base_dir)), atol=1e-3)


# --------------------------------------------------------------------------- merged export


@pytest.mark.parametrize("tied", [False, True])
def test_export_merged_loads_in_transformers(tied, base_dir, tied_dir, jbase, tmp_path):
  directory = tied_dir if tied else base_dir
  if tied:
    model, params, tokenizer = jlora.models.from_pretrained(directory)
    layout = jlora.trace_layout(model, jnp.asarray(IDS))
  else:
    model, params, tokenizer, layout = jbase
  cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=("embed_tokens", "q_proj", "down_proj"))
  lora = _randomize_b(_apply(params, cfg, layout))
  ours = _jlora_logits(model, lora)

  jexport.export_merged(tmp_path, lora, model.config, tokenizer)
  merged = _hf(tmp_path)
  theirs = _torch_logits(merged)
  np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=RTOL)
  assert not np.allclose(theirs, _torch_logits(_hf(directory)), atol=1e-3)
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).convert_tokens_to_ids("t5") == 5
  assert not list(tmp_path.glob("*.tmp"))
  if tied:  # bf16 export: stored and loaded as bf16
    jexport.export_merged(tmp_path / "bf16", lora, model.config, dtype="bfloat16")
    cfg_json = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg_json["torch_dtype"] == "bfloat16"
    half = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).eval()
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert np.abs(_torch_logits(half.float()) - ours).max() < 0.1


def test_tied_embedding_adapter_is_refused_for_peft(tied_dir, tmp_path):
  model, params, _ = jlora.models.from_pretrained(tied_dir)
  cfg = jlora.LoraConfig(rank=8, alpha=8.0, targets=("embed_tokens",))
  lora = jlora.apply(params, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="tied"):
    jpeft.save_adapter(tmp_path, lora, cfg)
  # And the other way: a PEFT embedding adapter for a tied model.
  config = peft.LoraConfig(
    r=8, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False
  )
  peft.get_peft_model(_hf(tied_dir), config).save_pretrained(str(tmp_path / "peft"))
  with pytest.raises(ValueError, match="tied to it"):
    jpeft.load_adapter(tmp_path / "peft", params)


# --------------------------------------------------------------------------- vLLM constraints


def test_vllm_rank_warning(jbase, tmp_path):
  _, params, _, layout = jbase
  for rank, should_warn in ((4, True), (8, False)):
    cfg = jlora.LoraConfig(rank=rank, alpha=8.0)
    lora = _apply(params, cfg, layout)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      jpeft.save_adapter(tmp_path / str(rank), lora, cfg)
    messages = [str(w.message) for w in caught if "vLLM" in str(w.message)]
    assert bool(messages) == should_warn, messages
    if should_warn:
      assert "[4]" in messages[0]
    _check_vllm_compatible(tmp_path / str(rank))


def test_pattern_translation_is_checked_against_peft_semantics():
  entries = [
    jpeft.HFModule(f"m/{m}", f"model.layers.{i}.self_attn.{m}", "kernel", None, i, r, s)
    for i in range(2)
    for m, r, s in (("q_proj", 8, 2.0), ("v_proj", 4, 4.0))
  ]
  # Layer 1's v_proj gets its own alpha: only a per-module key expresses it.
  entries[3] = dataclasses.replace(entries[3], scale=1.0)
  cfg = jlora.LoraConfig(rank=8, alpha=16.0, rank_pattern={"v_proj": 4})
  rank_pattern, alpha_pattern = jpeft._patterns(entries, cfg, use_rslora=False)
  trial = {"r": 8, "lora_alpha": 16.0, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
  for e in entries:
    assert jpeft.peft_scale(trial, e.hf_name) == pytest.approx(e.scale)
  from peft.utils.other import get_pattern_key

  assert (
    get_pattern_key(alpha_pattern.keys(), "model.layers.1.self_attn.v_proj")
    == r"model\.layers\.1\.self_attn\.v_proj"
  )


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def good_adapter(base_dir, tmp_path):
  torch.manual_seed(2)
  config = peft.LoraConfig(
    task_type="CAUSAL_LM", r=8, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False
  )
  peft.get_peft_model(_hf(base_dir), config).save_pretrained(str(tmp_path / "adapter"))
  return tmp_path / "adapter"


def _edit_config(directory, **changes):
  path = directory / "adapter_config.json"
  cfg = json.loads(path.read_text())
  cfg.update(changes)
  path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(use_dora=True), "use_dora=true in adapter_config.json, but the module lacks"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias='all'"),
    (dict(peft_type="IA3"), "only LORA"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(init_lora_weights="pissa"), "changes the base weights"),
  ],
)
def test_unsupported_configs_are_refused(changes, message, good_adapter, jbase):
  _edit_config(good_adapter, **changes)
  with pytest.raises(ValueError, match=message):
    jpeft.load_adapter(good_adapter, jbase[1])


def test_bin_only_adapter_is_refused(good_adapter, jbase):
  (good_adapter / "adapter_model.safetensors").rename(good_adapter / "adapter_model.bin")
  with pytest.raises(ValueError, match=r"only pickled weights \(adapter_model.bin\)"):
    jpeft.load_adapter(good_adapter, jbase[1])


def test_unmatched_key_is_refused(good_adapter, jbase):
  from safetensors.numpy import load_file, save_file

  path = good_adapter / "adapter_model.safetensors"
  tensors = load_file(str(path))
  tensors["base_model.model.model.layers.0.self_attn.rotary_proj.lora_A.weight"] = np.ones(
    (8, 64), np.float32
  )
  tensors["base_model.model.model.layers.0.self_attn.rotary_proj.lora_B.weight"] = np.ones(
    (64, 8), np.float32
  )
  save_file(tensors, str(path))
  with pytest.raises(
    ValueError,
    match=r"map onto no weight in base_params: \['model.layers.0.self_attn.rotary_proj'\]",
  ):
    jpeft.load_adapter(good_adapter, jbase[1])


def test_magnitude_tensor_without_use_dora_is_refused(good_adapter, jbase):
  from safetensors.numpy import load_file, save_file

  path = good_adapter / "adapter_model.safetensors"
  tensors = load_file(str(path))
  tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(
    (64,), np.float32
  )
  save_file(tensors, str(path))
  with pytest.raises(
    ValueError, match="use_dora=false in adapter_config.json, but the module holds"
  ):
    jpeft.load_adapter(good_adapter, jbase[1])


# --------------------------------------------------------------------------- sharded save

SHARDED_SCRIPT = textwrap.dedent("""
  import sys, numpy as np, jax, jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from safetensors.numpy import load_file
  import jlora
  from jlora import peft as jpeft

  assert jax.device_count() == 4, jax.devices()
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 64, 8)).astype(np.float32)   # [L, in, r]
  b = rng.normal(size=(2, 8, 32)).astype(np.float32)   # [L, r, out]
  base = jnp.zeros((2, 64, 32))
  node = jlora.LoraWeight(base=base, a=jax.device_put(a, NamedSharding(mesh, P(None, ("x", "y"), None))),
                          b=jax.device_put(b, NamedSharding(mesh, P(None, "x", "y"))), scale=2.0,
                          roles=("in", "out"))
  assert len(node.a.addressable_shards) == 4 and node.a.addressable_shards[0].data.shape == (2, 16, 8)
  params = {"model": {"layers": {"self_attn": {"q_proj": {"kernel": node}}}}}
  jpeft.save_adapter(sys.argv[1], params, jlora.LoraConfig(rank=8, alpha=16.0))
  t = load_file(sys.argv[1] + "/adapter_model.safetensors")
  assert len(t) == 4
  for i in range(2):
    A = t[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"]
    B = t[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"]
    assert A.shape == (8, 64) and B.shape == (32, 8) and A.size and B.size
    np.testing.assert_array_equal(A, a[i].T)
    np.testing.assert_array_equal(B, b[i].T)
  print("OK")
""")


def test_sharded_save_writes_full_tensors(tmp_path):
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
  }
  result = subprocess.run(
    [sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

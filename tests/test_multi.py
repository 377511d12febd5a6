"""Several adapters on one base: a batch whose rows use different adapters (or none) equals
each adapter run alone on its rows; generation of a mixed batch equals separate runs; the
mixed forward costs what a single adapter's does; bad inputs are refused by name.

References: each adapter's own params run through jlora.wrap (itself tested against the
materialised W + s*A@B in test_lora.py), and the unmodified model for base rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models import LlamaConfig, LlamaForCausalLM
from tests.test_lora import MLP, TinyTransformer, base_of, init, randomize

# Three adapters of different ranks and scales; the third adapts fewer weights.
ADAPTERS = {
  "transformer": [
    dict(rank=1, alpha=2.0, targets="all-linear"),
    dict(rank=3, alpha=5.0, targets="all-linear", use_rslora=True),
    dict(rank=5, alpha=4.0, targets=("query", "value")),
  ],
  "scanned": [
    dict(rank=1, alpha=2.0, targets=".*"),
    dict(rank=3, alpha=5.0, targets=".*"),
    dict(rank=5, alpha=4.0, targets=("ff_in",)),
  ],
}
IDS = [2, -1, 0, 1, 0, 2]


def _adapters(name, base, layout):
  return {
    f"ad{i}": randomize(
      jlora.apply(base, jlora.LoraConfig(**kw), jax.random.key(i), layout=layout), i
    )
    for i, kw in enumerate(ADAPTERS[name])
  }


def _rows(name):
  vocab = 64 if name == "transformer" else 40
  return jnp.asarray(np.random.RandomState(7).randint(0, vocab, (len(IDS), 5)))


@pytest.mark.parametrize(
  "name,quantized", [("transformer", False), ("scanned", False), ("transformer", True)]
)
def test_mixed_batch_equals_each_adapter_on_its_rows(name, quantized):
  model, _, base, layout = base_of(name)
  if quantized:
    base = jlora.quantize(base, jlora.QuantConfig(block_size=16), layout=layout)
  adapters = _adapters(name, base, layout)
  stacked = jlora.stack_adapters(adapters, base)
  run = jax.jit(jlora.wrap(model.apply))
  plain = jlora.dequantize(base) if quantized else base
  # 5 tokens a row: each row gathers its factors; 1 token a row (a decode step), 3 adapters
  # under 6 rows: every row meets every adapter and keeps its own.
  for x in (_rows(name), _rows(name)[:, :1]):
    mixed = np.asarray(run({"params": stacked}, x, adapter_ids=jnp.asarray(IDS)))
    expected = {-1: np.asarray(model.apply({"params": plain}, x))}
    for i, params in enumerate(adapters.values()):
      expected[i] = np.asarray(run({"params": params}, x))
    for row, adapter in enumerate(IDS):
      np.testing.assert_allclose(mixed[row], expected[adapter][row], atol=1e-5, rtol=1e-5)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)  # the adapters differ
  # Names map onto ids in the dict's order.
  names = ["ad2", "base", "ad0", "ad1", "ad0", "ad2"]
  np.testing.assert_array_equal(jlora.adapter_ids(stacked, names), IDS)


def test_mixed_forward_costs_at_most_a_single_adapter_forward():
  model = TinyTransformer(vocab=256, dim=128, layers=2)
  x = jnp.zeros((8, 64), jnp.int32)
  base = init(model, x)
  layout = jlora.trace_layout(model, x)
  cfgs = [dict(rank=8, alpha=16.0), dict(rank=4, alpha=8.0), dict(rank=8, alpha=4.0)]
  adapters = {
    f"ad{i}": jlora.apply(
      base, jlora.LoraConfig(targets="all-linear", **kw), jax.random.key(i), layout=layout
    )
    for i, kw in enumerate(cfgs)
  }
  stacked = jlora.stack_adapters(adapters, base)
  run = jlora.wrap(model.apply)
  ids = jnp.asarray([0, 1, 2, -1, 0, 1, 2, 0])
  cost = lambda fn, *a: float(jax.jit(fn).lower(*a).compile().cost_analysis()["flops"])
  single = cost(lambda p: run({"params": p}, x), adapters["ad0"])
  mixed = cost(lambda p, i: run({"params": p}, x, adapter_ids=i), stacked, ids)
  assert mixed <= 1.05 * single, (mixed, single)


def test_adapters_for_another_base_are_refused_by_name():
  model, x, base, layout = base_of("mlp")
  other = init(MLP(hidden=16), x)
  good = jlora.apply(base, jlora.LoraConfig(targets=["up"]), jax.random.key(0))
  bad = jlora.apply(other, jlora.LoraConfig(targets=["up"]), jax.random.key(0))
  with pytest.raises(
    ValueError,
    match=r"adapter 'narrow' was made for another base: its up/kernel has shape \(12, 16\), "
    r"but base_params has \(12, 32\)",
  ):
    jlora.stack_adapters({"wide": good, "narrow": bad}, base)
  with pytest.raises(ValueError, match="adapter name 'base' is not valid"):
    jlora.stack_adapters({"base": good}, base)


def test_adapter_ids_out_of_range_and_unknown_names_are_refused():
  model, x, base, layout = base_of("mlp")
  stacked = jlora.stack_adapters(
    {"one": jlora.apply(base, jlora.LoraConfig(targets=["up"]), jax.random.key(0))}, base
  )
  run = jlora.wrap(model.apply)
  with pytest.raises(ValueError, match=r"adapter_ids: 1 is out of range; valid ids are -1 .* to 0"):
    run({"params": stacked}, x, adapter_ids=jnp.asarray([0, 1, -1]))
  with pytest.raises(ValueError, match="adapter_ids: -2 is out of range"):
    run({"params": stacked}, x, adapter_ids=[0, -2, 0])
  with pytest.raises(
    ValueError,
    match=r"adapter name 'two' is not stacked in these params; valid names are \['one'\]",
  ):
    jlora.adapter_ids(stacked, ["one", "two"])
  with pytest.raises(ValueError, match="DoRA adapter"):
    dora = jlora.apply(base, jlora.LoraConfig(targets=["up"], use_dora=True), jax.random.key(0))
    jlora.stack_adapters({"d": dora}, base)


def test_adapters_with_token_rows_are_refused_not_dropped():
  _, _, base, layout = base_of("transformer")
  cfg = jlora.LoraConfig(targets=["query"], trainable_token_indices=[1, 2])
  adapter = jlora.apply(base, cfg, jax.random.key(0), layout=layout)
  with pytest.raises(ValueError, match=r"adapter 't' trains token rows at .*embed.*stacked"):
    jlora.stack_adapters({"t": adapter}, base, layout=layout)


# --------------------------------------------------------------------------- generation

TINY = dict(
  vocab_size=101,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  rms_norm_eps=1e-5,
)


def test_greedy_generation_of_a_mixed_batch_equals_separate_runs():
  from tests.test_llama import random_params
  from train.generate import generate_ids

  model = LlamaForCausalLM(LlamaConfig(**TINY))
  params = random_params(model)
  layout = jlora.trace_layout(model, jnp.zeros((1, 4), jnp.int32))
  targets = [("q_proj", "v_proj"), "all-linear", ("down_proj",)]
  adapters = {
    f"ad{i}": randomize(
      jlora.apply(
        params, jlora.LoraConfig(rank=2 + i, targets=t), jax.random.key(i), layout=layout
      ),
      10 + i,
    )
    for i, t in enumerate(targets)
  }
  stacked = jlora.stack_adapters(adapters, params)
  prompts = [[5, 17, 42, 8], [60, 2, 33], [9, 9, 1, 4, 70], [11, 3]]
  ids = [1, -1, 0, 2]
  run = jlora.wrap(model.apply)
  mixed = generate_ids(model, stacked, prompts, 8, apply_fn=run, adapter_ids=ids)
  separate = {-1: generate_ids(model, params, prompts, 8)}
  for i, adapted in enumerate(adapters.values()):
    separate[i] = generate_ids(model, adapted, prompts, 8, apply_fn=run)
  for row, adapter in enumerate(ids):
    assert mixed[row] == separate[adapter][row], row
  assert len({tuple(separate[i][0]) for i in separate}) > 1  # the adapters change the output


def test_generate_cli_with_named_adapters(tmp_path, capsys):
  from tests.tiny import TINY_VOCAB_SIZE, random_hf_state, save_numpy_checkpoint
  from train.generate import main

  config = LlamaConfig(**{**TINY, "vocab_size": TINY_VOCAB_SIZE})
  directory = save_numpy_checkpoint(tmp_path / "base", config, random_hf_state(config))
  model, params, _ = jlora.models.from_pretrained(directory)
  layout = jlora.trace_layout(model, jnp.zeros((1, 4), jnp.int32))
  dirs = {}
  for i, rank in enumerate((2, 4)):
    cfg = jlora.LoraConfig(rank=rank, targets=("q_proj", "v_proj"))
    adapted = randomize(jlora.apply(params, cfg, jax.random.key(i), layout=layout), 20 + i)
    with pytest.warns(UserWarning, match="vLLM"):
      dirs[f"ad{i}"] = jlora.save_adapter(tmp_path / f"ad{i}", adapted, cfg)
  common = ["--model", str(directory), "--prompt", "the", "--max_new_tokens", "4"]
  separate = {}
  for name, d in dirs.items():
    main([*common, "--adapter", str(d)])
    separate[name] = capsys.readouterr().out.strip()
  main(
    [
      *common,
      "--adapter",
      f"ad0={dirs['ad0']}",
      "--adapter",
      f"ad1={dirs['ad1']}",
      "--use",
      "ad1,base,ad0",
    ]
  )
  out = capsys.readouterr().out
  main(common)
  base = capsys.readouterr().out.strip()
  replies = {
    line.split("]")[0][5:]: reply
    for line, reply in zip(out.splitlines()[::2], out.splitlines()[1::2])
  }
  assert replies == {"ad1": separate["ad1"], "base": base, "ad0": separate["ad0"]}

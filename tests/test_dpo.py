"""Preference tuning (train.dpo) against independent references.

- sigmoid and ipo: TRL's own DPOTrainer (PEFT model, adapters disabled for the reference), run
  10 steps on the same tiny Llama, adapter init, pairs and hyper-parameters.
- orpo and simpo (with label smoothing and CPO's NLL term): TRL's ORPOTrainer and CPOTrainer
  (trl.experimental), 10 steps on our tokens (their own tokenize_row splits pairs the older way).
- the reference log-probs against transformers' base model (no adapters) and against the
  dequantized base for QLoRA; the compiled step's argument bytes against the SFT step's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file

import jlora
from jlora.lora import is_lora
from jlora.models import from_pretrained
from jlora.models.llama import DEFAULT_RULES
from jlora.sharding import make_mesh
from tests import tiny
from train import data as data_lib
from train import dpo, pairs
from train import step as step_lib
from train.errors import UserError

STEPS, PAIRS_PER_STEP, LR, MAX_LEN = 10, 2, 1e-2, 64
REF_LEN = 96  # the longest pair of preference_rows(20) fits untruncated
LORA = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
SETTINGS = dict(beta=0.1, label_smoothing=0.0, gamma=0.5, nll_weight=0.0, precompute_ref=False)
# loss -> (settings overrides, which reference)
CASES = {
  "sigmoid": ({}, "trl"),
  "ipo": ({}, "trl"),
  "orpo": ({}, "trl-experimental"),
  # with label smoothing (sigmoid's code path, checked here once) and CPO's NLL (cpo_alpha)
  "simpo": (
    {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.2, "nll_weight": 0.5},
    "trl-experimental",
  ),
}


def preference_rows(n: int) -> list[dict]:
  """Conversational pairs with answers of varied lengths (length normalisation shows)."""
  words = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
  rows = []
  for i in range(n):
    chosen = " ".join(words[(i + k) % 8] for k in range(1 + i % 3))
    rejected = " ".join(words[(i + 3 * k + 5) % 8] for k in range(1 + (i + 1) % 4))
    rows.append(
      {
        "prompt": [{"role": "user", "content": f"Name {1 + i % 3} colours, #{i}."}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
      }
    )
  return rows


def settings_for(name: str) -> dict:
  overrides, _ = CASES[name]
  return {**SETTINGS, "loss": name, **overrides}


# --------------------------------------------------------------------------- jlora side


def run_jlora(model_dir: Path, adapter_dir: Path, arrays: dict, settings: dict, work: Path):
  model, base, _ = from_pretrained(model_dir)
  trainable, frozen = jlora.split(jlora.load_adapter(adapter_dir, base))
  tx, _ = step_lib.make_optimizer(LR, STEPS, 1, 0.0, 1.0)
  opt_state = tx.init(trainable)
  step = jax.jit(step_lib.make_train_step(model, tx, objective=dpo.make_objective(settings)))
  budget = step_lib.label_budget(arrays["loss_mask"])
  out = {k: [] for k in ("loss", "grad_norm", "reward_chosen", "reward_rejected")}
  for i in range(STEPS):
    ids = np.arange(i * PAIRS_PER_STEP, (i + 1) * PAIRS_PER_STEP)
    batch = step_lib.gather_labels(data_lib.take_rows(arrays, ids), budget)
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, i, jax.random.key(0))
    for k in out:
      out[k].append(float(metrics[k]))
  jlora.save_adapter(work, jlora.combine(trainable, frozen), LORA)
  out["adapter"] = load_file(work / "adapter_model.safetensors")
  return out


# --------------------------------------------------------------------------- references


def trainer_args(work: Path) -> dict:
  """HF Trainer arguments every TRL trainer here shares: sequential batches, the schedule and
  AdamW make_optimizer mirrors, fp32 on the CPU."""
  return dict(
    output_dir=str(work),
    per_device_train_batch_size=PAIRS_PER_STEP,
    max_steps=STEPS,
    learning_rate=LR,
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs={"min_lr_rate": 0.1},
    warmup_steps=1,
    weight_decay=0.0,
    max_grad_norm=1.0,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    bf16=False,  # TRL's configs default to bf16 autocast; both sides run fp32
    train_sampling_strategy="sequential",
    save_strategy="no",
    disable_tqdm=True,
  )


def peft_model(model_dir: Path, adapter_dir: Path):
  import torch
  import transformers
  from peft import PeftModel

  base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
  return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)


def trl_results(trainer, model) -> dict:
  from peft import get_peft_model_state_dict

  logs = [h for h in trainer.state.log_history if "loss" in h]
  return {
    "loss": [h["loss"] for h in logs],
    "grad_norm": [h["grad_norm"] for h in logs],
    "reward_chosen": [h["rewards/chosen"] for h in logs],
    "reward_rejected": [h["rewards/rejected"] for h in logs],
    "adapter": {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()},
  }


def run_trl(model_dir: Path, adapter_dir: Path, rows: list[dict], settings: dict, work: Path):
  """TRL's DPOTrainer on the rows as given: it tokenises them itself."""
  import transformers
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer

  model = peft_model(model_dir, adapter_dir)
  args = DPOConfig(
    **trainer_args(work), max_length=None, beta=settings["beta"], loss_type=[settings["loss"]]
  )
  trainer = DPOTrainer(
    model=model,
    args=args,
    train_dataset=Dataset.from_list(rows),
    processing_class=transformers.AutoTokenizer.from_pretrained(str(model_dir)),
  )
  tokens = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
  trainer.train()
  return {**trl_results(trainer, model), "tokens": tokens}


def tokenized_like_trl(arrays: dict, p: int) -> dict:
  """Pair p of our arrays as TRL's ORPO / CPO tokenize_row returns a row: the prompt, and per
  side the whole sequence with labels -100 on the prompt. (Their own tokenize_row splits prompt
  and answer the older way and adds BOS / EOS tokens where missing; DPOTrainer's split, checked
  above to equal ours, is TRL's current one.)"""
  answers = arrays.get("answer_tokens", arrays["loss_mask"].sum(-1))
  row = {}
  for side, name in ((0, "chosen"), (1, "rejected")):
    n = int((arrays["segment_ids"][p, side] > 0).sum())
    ids = [*map(int, arrays["input_ids"][p, side, :n]), int(arrays["targets"][p, side, n - 1])]
    prompt_len = len(ids) - int(answers[p, side])
    row[f"{name}_input_ids"] = ids
    row[f"{name}_attention_mask"] = [1] * len(ids)
    row[f"{name}_labels"] = [-100] * prompt_len + ids[prompt_len:]
    row["prompt_input_ids"] = ids[:prompt_len]
    row["prompt_attention_mask"] = [1] * prompt_len
  return row


def run_trl_experimental(
  model_dir: Path, adapter_dir: Path, arrays: dict, settings: dict, work: Path
):
  """On our tokens, TRL's ORPOTrainer, or its CPOTrainer with loss_type="simpo" and cpo_alpha =
  our nll_weight."""
  import transformers
  from datasets import Dataset
  from trl.experimental.cpo import CPOConfig, CPOTrainer
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

  if settings["loss"] == "orpo":
    assert settings["nll_weight"] == 0 and settings["label_smoothing"] == 0  # no such options
    trainer_cls, args = ORPOTrainer, ORPOConfig(**trainer_args(work), beta=settings["beta"])
  else:
    trainer_cls, args = (
      CPOTrainer,
      CPOConfig(
        **trainer_args(work),
        loss_type="simpo",
        beta=settings["beta"],
        simpo_gamma=settings["gamma"],
        label_smoothing=settings["label_smoothing"],
        cpo_alpha=settings["nll_weight"],
      ),
    )
  args.remove_unused_columns = False

  class OnOurTokens(trainer_cls):
    def tokenize_row(self, feature, model=None):
      return tokenized_like_trl(arrays, feature["index"])

  model = peft_model(model_dir, adapter_dir)
  n = len(arrays["input_ids"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # pads are masked anyway
  trainer = OnOurTokens(
    model=model,
    args=args,
    train_dataset=Dataset.from_list(
      [{"prompt": "p", "chosen": "c", "rejected": "r", "index": i} for i in range(n)]
    ),
    processing_class=tokenizer,
  )
  trainer.train()
  return trl_results(trainer, model)


# --------------------------------------------------------------------------- the comparison


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, tmp_path_factory):
  """One case run by jlora and by its reference, on a tiny model and one adapter init."""
  pytest.importorskip("trl")
  name = request.param
  _, reference = CASES[name]
  root = tmp_path_factory.mktemp(f"dpo-{name}")
  model_dir = tiny.save_torch_checkpoint(
    root / "base", num_key_value_heads=2, max_position_embeddings=REF_LEN + 1
  )
  model, base, tokenizer = from_pretrained(model_dir)
  params = jlora.apply(base, LORA, jax.random.key(1))
  if reference != "trl":
    # Nonzero B: the policy starts away from the base. (TRL's DPOTrainer would take a nonzero
    # starting adapter as the reference itself: it copies it as the "ref" adapter.)
    params = jax.tree.map(
      lambda x: (
        x.replace(b=0.05 * jax.random.normal(jax.random.key(2), x.b.shape)) if is_lora(x) else x
      ),
      params,
      is_leaf=is_lora,
    )
  jlora.save_adapter(root / "init", params, LORA)
  rows = preference_rows(STEPS * PAIRS_PER_STEP)
  arrays, stats = pairs.tokenize_pairs(rows, tokenizer, max_length=REF_LEN)
  assert stats["pairs"] == len(rows) and stats["truncated"] == 0
  settings = settings_for(name)
  if name == "orpo":
    arrays = dpo.with_prompt_scored(arrays)
  mine = run_jlora(model_dir, root / "init", arrays, settings, root / "jlora")
  if reference == "trl":
    theirs = run_trl(model_dir, root / "init", rows, settings, root / "trl")
  else:
    theirs = run_trl_experimental(model_dir, root / "init", arrays, settings, root / "trl")
  return name, mine, theirs, arrays


@pytest.mark.ref
@pytest.mark.slow
def test_ten_steps_match_the_reference(runs):
  _, mine, theirs, arrays = runs
  if "tokens" in theirs:  # TRL tokenised the rows itself: the same tokens, the same answer split
    for p, (prompt, chosen, rejected) in enumerate(theirs["tokens"]):
      for side, answer in ((0, chosen), (1, rejected)):
        n = len(prompt) + len(answer) - 1
        got = arrays["input_ids"][p, side, :n].tolist() + [arrays["targets"][p, side, n - 1]]
        assert got == prompt + answer
        assert arrays["loss_mask"][p, side].sum() == len(answer)
  for key in ("loss", "grad_norm", "reward_chosen", "reward_rejected"):
    np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert mine["loss"][-1] < mine["loss"][0]
  assert mine["adapter"].keys() == theirs["adapter"].keys()
  for key, value in theirs["adapter"].items():
    np.testing.assert_allclose(mine["adapter"][key], value, rtol=0, atol=1e-4, err_msg=key)


# --------------------------------------------------------------------------- the reference model


@pytest.mark.ref
def test_reference_logps_are_the_base_models(tmp_path):
  """compute_reference on adapted (even DoRA) params equals transformers' base model alone; on a
  QLoRA base it equals the same quantized base, dequantized, with no adapters."""
  import torch
  import transformers

  model_dir = tiny.save_torch_checkpoint(tmp_path / "base", max_position_embeddings=MAX_LEN + 1)
  model, base, tokenizer = from_pretrained(model_dir)
  arrays, _ = pairs.tokenize_pairs(preference_rows(6), tokenizer, max_length=MAX_LEN)
  budget = step_lib.label_budget(arrays["loss_mask"])
  mesh = make_mesh(1, 1, 1)
  adapted = jlora.apply(
    base, jlora.LoraConfig(rank=4, targets="all-linear", use_dora=True), jax.random.key(0)
  )
  adapted = jax.tree.map(
    lambda x: x.replace(b=x.b + 0.1) if is_lora(x) else x, adapted, is_leaf=is_lora
  )
  _, frozen = jlora.split(adapted)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):  # as the trainer runs it
    got = dpo.compute_reference(model, frozen, arrays, mesh, 4, budget)

  hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
  expected = np.zeros((6, 2), np.float32)
  for p in range(6):
    for side in range(2):
      n = int((arrays["segment_ids"][p, side] > 0).sum())
      ids = list(arrays["input_ids"][p, side, :n]) + [int(arrays["targets"][p, side, n - 1])]
      with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
      token = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
      expected[p, side] = float((token * torch.tensor(arrays["loss_mask"][p, side, :n])).sum())
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

  quant = jlora.QuantConfig(kind="nf4", block_size=16)
  trainable, frozen = jlora.prepare_for_training(base, LORA, jax.random.key(0), quant=quant)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    got = dpo.compute_reference(model, frozen, arrays, mesh, 4, budget)
  dequantized = jax.tree.map(
    lambda x: jlora.quant.dequantized(x) if jlora.quant.is_quantized(x) else x,
    dpo.reference_params(frozen),
    is_leaf=jlora.quant.is_quantized,
  )
  assert not any(is_lora(x) for x in jax.tree.leaves(dequantized, is_leaf=is_lora))
  plain = jax.jit(lambda p, b: dpo.sequence_logps(model.apply, type(model), p, b)[0])
  batch = step_lib.gather_labels(arrays, budget)
  np.testing.assert_allclose(got, plain(dequantized, batch), rtol=1e-5, atol=1e-4)
  assert not np.allclose(got, expected, atol=1e-2)  # the quantized base is another model


def test_dpo_step_holds_no_second_copy_of_the_base(tmp_path):
  """The compiled DPO step's arguments are the SFT step's (same adapters, base, optimizer) plus
  only the pair batch: the reference reuses the frozen base."""
  model_dir = tiny.make_checkpoint(tmp_path / "base")
  model, base, tokenizer = from_pretrained(model_dir)
  trainable, frozen = jlora.split(jlora.apply(base, LORA, jax.random.key(0)))
  tx, _ = step_lib.make_optimizer(LR, STEPS, 1, 0.0, 1.0)
  opt_state = tx.init(trainable)
  arrays, _ = pairs.tokenize_pairs(preference_rows(2), tokenizer, max_length=MAX_LEN)
  budget = step_lib.label_budget(arrays["loss_mask"])
  pair_batch = step_lib.gather_labels(arrays, budget)
  sft_batch = step_lib.gather_labels({k: v.reshape(4, MAX_LEN) for k, v in arrays.items()}, budget)

  def argument_bytes(objective, batch):
    step = step_lib.make_train_step(model, tx, objective=objective)
    lowered = jax.jit(step).lower(trainable, opt_state, frozen, batch, 0, jax.random.key(0))
    return lowered.compile().memory_analysis().argument_size_in_bytes - step_lib.tree_bytes(batch)

  settings = {**SETTINGS, "loss": "sigmoid"}
  assert argument_bytes(dpo.make_objective(settings), pair_batch) == argument_bytes(
    step_lib.SFT, sft_batch
  )


# --------------------------------------------------------------------------- data


def test_pairs_keep_the_prompt_end_and_count_what_they_drop():
  tok = tiny.tiny_tokenizer()
  long_prompt = "word " * 8  # 59 prompt tokens + 13 answer tokens > MAX_LEN + 1
  rows = [
    {"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"},  # plain strings
    {"prompt": long_prompt, "chosen": "yes yes yes", "rejected": "no"},  # truncated, keeps the end
    {"prompt": "x" * 300, "chosen": "a", "rejected": "b"},  # prompt alone too long: skipped
    {"prompt": "Same?", "chosen": "same", "rejected": "same"},  # identical: skipped
    {  # implicit prompt: the shared history
      "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}],
    },
  ]
  arrays, stats = pairs.tokenize_pairs(rows, tok, max_length=MAX_LEN)
  assert stats == dict(
    rows=5,
    pairs=3,
    truncated=1,
    skipped_prompt_too_long=1,
    skipped_identical=1,
    tokens=stats["tokens"],
  )
  assert arrays["input_ids"].shape == (3, 2, MAX_LEN)
  answer = lambda p, s: tok.decode(arrays["targets"][p, s][arrays["loss_mask"][p, s] == 1])
  assert answer(0, 0) == "hi<|im_end|>\n" and answer(0, 1) == "bye<|im_end|>\n"
  assert answer(1, 0) == "yes yes yes<|im_end|>\n"  # the answer survives truncation whole
  kept = tok.decode(arrays["input_ids"][1, 0][arrays["segment_ids"][1, 0] > 0])
  # input_ids end one token before the sequence does (its last token is only a target)
  assert kept.endswith("word <|im_end|>\n<|im_start|>assistant\nyes yes yes<|im_end|>")
  assert not kept.startswith("<|im_start|>user")  # the prompt's start was cut
  assert answer(2, 0) == "Hello<|im_end|>\n" and answer(2, 1) == "Go<|im_end|>\n"


@pytest.mark.parametrize(
  "row, expected",
  [
    ({"prompt": "p", "rejected": "r"}, "row 1 is missing field 'chosen'"),
    ({"prompt": "p", "chosen": "c"}, "row 1 is missing field 'rejected'"),
    ({"chosen": "c", "rejected": "r"}, "row 1 is missing field 'prompt'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "a string 'prompt' needs string"),
  ],
)
def test_bad_rows_are_one_line_errors(row, expected):
  with pytest.raises(UserError, match=expected):
    pairs.tokenize_pairs([row], tiny.tiny_tokenizer(), max_length=MAX_LEN, source="data.jsonl")


@pytest.mark.parametrize(
  "field, value, expected",
  [
    ("beta", 0, "config.dpo.beta: 0.0 is not valid; expected a number > 0"),
    ("beta", -0.5, "config.dpo.beta: -0.5 is not valid"),
    ("loss", "kto", "config.dpo.loss: 'kto' is not valid; expected one of 'sigmoid'"),
    ("label_smoothing", 0.7, "config.dpo.label_smoothing: 0.7 is not valid"),
    ("pack", True, "config.data.pack: True is not valid for preference pairs"),
  ],
)
def test_bad_config_values_are_one_line_errors(field, value, expected):
  from configs.dpo import get_config

  config = get_config()
  (config.data if field == "pack" else config.dpo)[field] = value
  with pytest.raises(UserError) as error:
    dpo.check(config)
  assert expected in str(error.value) and "\n" not in str(error.value)


def test_shipped_config_validates():
  from configs.dpo import get_config
  from train import config as config_lib

  config = get_config()
  config_lib.check_config(config)
  dpo.check(config)
  assert config.data.train == "data/prefs_train.jsonl" and config.dpo.loss == "sigmoid"


def test_unknown_loss_on_the_command_line_exits_2_with_one_line():
  result = subprocess.run(
    [sys.executable, "-m", "train.dpo", "--config.dpo.loss=kto"],
    cwd=tiny.REPO,
    env={**os.environ, "PYTHONPATH": str(tiny.REPO)},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: config.dpo.loss: 'kto' is not valid"), lines


def _files(root: Path) -> dict:
  rows = preference_rows(24)
  (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
  (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
  if not (root / "model").exists():
    tiny.make_checkpoint(root / "model")
  return {"model": root / "model", "train": root / "train.jsonl", "eval": root / "eval.jsonl"}


RUN = {
  **tiny.TINY,
  "data.max_length": MAX_LEN,
  "dpo.precompute_ref": True,
  "eval.metrics": "exact_match",
}


def _tiny_config(root: Path, out: Path):
  from configs.dpo import get_config

  f = _files(root)
  config = get_config()
  values = {**RUN, "model.path": str(f["model"]), "data.train": str(f["train"])}
  values.update({"data.eval": str(f["eval"]), "output_dir": str(out)})
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_identical_pairs_warn_and_are_counted(tmp_path, capsys):
  config = _tiny_config(tmp_path, tmp_path / "out")
  rows = preference_rows(3) + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
  path = tmp_path / "identical.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  _, arrays, stats = dpo.tokenize(
    str(path), tiny.tiny_tokenizer(), config, "config.data.train", "train"
  )
  assert stats["skipped_identical"] == 1 and len(arrays["input_ids"]) == 3
  assert "1 pairs have identical chosen and rejected answers" in capsys.readouterr().out

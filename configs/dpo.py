"""Default preference-tuning config: DPO with LoRA on the embedded SmolLM2-135M-Instruct.

python -m train.dpo --config configs/dpo.py

Starts from the base model (the reference is that same base, adapters off) and trains on the
bundled extraction preference pairs (data/prefs_*.jsonl from data/make_dataset.py): `chosen` is
the correct JSON, `rejected` a plausible wrong one. Sized to finish in a few minutes on a 2-core
CPU. Every field of configs/llama.py applies (QLoRA: --config.quant.kind=nf4); config.dpo holds
the preference settings:
  loss             sigmoid (DPO) | ipo | orpo | simpo
  beta             the KL / temperature weight (TRL's default 0.1 for every loss)
  label_smoothing  cDPO's assumed label noise, sigmoid and simpo only (0: plain DPO)
  gamma            SimPO's target margin (TRL CPOTrainer's simpo_gamma default 0.5)
  nll_weight       weight of the chosen answers' NLL added to the loss (TRL rpo_alpha / cpo_alpha;
                   1.0 here, 0 is plain DPO)
  precompute_ref   compute the reference log-probs once before training (saved with the run)
"""

import ml_collections

from configs import llama


def get_config() -> ml_collections.ConfigDict:
  config = llama.get_config()
  config.output_dir = "runs/smollm2-dpo"
  config.steps = 20
  config.data.train = "data/prefs_train.jsonl"
  config.data.eval = "data/prefs_eval.jsonl"
  config.data.max_length = 112  # the longest bundled pair side is 106 tokens
  config.data.pack = False  # pairs are padded, never packed
  config.data.batch_size = 2  # pairs per optimizer step
  config.data.eval_batch_size = 16
  # Rematerialise each decoder layer (keep only its input; the backward recomputes the rest), as
  # TRL's DPOConfig does by default (gradient_checkpointing=True): a pair step scores four rows
  # (two of them twice, with the reference), and their activations are most of its memory.
  config.model.remat_policy = "full"
  config.lora.rank = 8
  config.lora.alpha = 16.0
  config.optim.lr = 5e-4
  config.eval_every = 20
  config.save_every = 10
  config.optim.warmup_steps = 2
  config.eval_examples = 16
  config.max_new_tokens = 40

  config.dpo = ml_collections.ConfigDict()
  config.dpo.loss = "sigmoid"
  config.dpo.beta = 0.1
  config.dpo.label_smoothing = 0.0
  config.dpo.gamma = 0.5
  # RPO: keep the chosen answers likely. Plain DPO from the base lowers them too and its greedy
  # answers get worse (exact match 0% -> 0%); with this term 0% -> 25% (README's default run).
  config.dpo.nll_weight = 1.0
  config.dpo.precompute_ref = False
  return config

"""llama.cpp itself runs the exports: 16 greedy tokens from the merged GGUF, and from the base GGUF
with the adapter GGUF (`--lora`), equal jlora's greedy tokens from the adapted model.

Needs llama-cpp-python (llama.cpp's Python binding, built from source here:
`CMAKE_BUILD_PARALLEL_LEVEL=1 pip install llama-cpp-python`); skipped when it is not installed.
f32 files, so the only differences are llama.cpp's and XLA's fp32 arithmetic.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jlora
from tests.test_gguf_export import CONFIG, adapted_model
from tests.tiny import tiny_tokenizer
from train.generate import generate_ids

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
PROMPT = [259, 72, 101, 108, 108, 111, 32, 256, 257, 44]  # token ids, bos first
STEPS = 16


def llama_cpp_greedy(model_path, lora_path=None) -> list[int]:
  kwargs = {"lora_path": str(lora_path)} if lora_path else {}
  llm = llama_cpp.Llama(
    model_path=str(model_path), n_ctx=64, n_threads=2, seed=0, verbose=False, **kwargs
  )
  out = []
  for token in llm.generate(PROMPT, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
    out.append(int(token))
    if len(out) == STEPS:
      break
  return out


def test_llama_cpp_generates_jloras_tokens(tmp_path):
  lora_cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
  model, params, _ = adapted_model(tmp_path / "base", CONFIG, lora_cfg)
  tokenizer = tiny_tokenizer()
  [ours] = generate_ids(model, params, [PROMPT], STEPS, apply_fn=jlora.wrap(model.apply))
  base = jax.tree.map(lambda n: n.base if jlora.is_lora(n) else n, params, is_leaf=jlora.is_lora)
  [base_tokens] = generate_ids(model, base, [PROMPT], STEPS)
  assert ours != base_tokens  # the adapters change what is generated

  merged = jlora.export_gguf(tmp_path / "merged.gguf", params, model.config, tokenizer, "f32")
  assert llama_cpp_greedy(merged) == ours

  base_file = jlora.export_gguf(tmp_path / "base.gguf", base, model.config, tokenizer, "f32")
  adapter = jlora.save_adapter_gguf(tmp_path / "adapter.gguf", params, lora_cfg, model.config)
  assert llama_cpp_greedy(base_file) == base_tokens
  assert llama_cpp_greedy(base_file, adapter) == ours
  np.testing.assert_equal(len(ours), STEPS)

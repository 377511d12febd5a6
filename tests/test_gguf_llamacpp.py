"""llama.cpp's own command-line tools run jlora's GGUF exports: `llama-perplexity` on a text gives
jlora's perplexity on the same tokens within 0.02%, and `llama-completion`'s 32 greedy tokens are
jlora's, for the merged file and for the base file with the adapter file (`--lora`). On a tiny
random model, a tiny Qwen3-MoE, Mixtral and gpt-oss with LoRA on their experts (merged only:
llama.cpp adapters hold no experts), and (slow) on the embedded SmolLM2-135M with an adapter on every linear layer.

Needs llama.cpp's tools, built from its source (`llama-tokenize`, `llama-perplexity`,
`llama-completion`, see the README): `$LLAMA_CPP_BIN/<tool>` or on PATH; skipped without them.
f32 files, an f32 KV cache and no flash attention (FP32 below), so the only differences are
llama.cpp's and XLA's fp32 arithmetic.
The token ids both sides score and continue come from `llama-tokenize` on the same file.
"""

from __future__ import annotations

import json
import re
import subprocess

import jax
import numpy as np
import pytest

import jlora
from tests.gguf_reference import llama_cpp_tool
from tests.test_gguf_export import CONFIG, adapted_model
from tests.tiny import tiny_tokenizer
from train import step as step_lib
from train.generate import generate_ids

TOOLS = ("llama-tokenize", "llama-perplexity", "llama-completion")
pytestmark = [
  pytest.mark.llamacpp,
  pytest.mark.skipif(
    not all(map(llama_cpp_tool, TOOLS)),
    reason=f"needs llama.cpp's {', '.join(TOOLS)} (set LLAMA_CPP_BIN to llama.cpp's build/bin)",
  ),
]
STEPS = 32
PPL_TOLERANCE = 2e-4  # 0.02%
TEXT = (
  "The river rises in the hills above the old mill town, where the stone bridge has stood for "
  "three hundred years. In spring the water runs high and brown with snowmelt; by late summer "
  "children wade across it to the meadow on the far side, where cattle graze until October. "
  "Each year the town holds a fair on the bank: bakers sell bread and honey, a band plays on a "
  "cart, and the mayor gives a speech that nobody remembers by the evening. "
)
# fp32 all the way: an f32 KV cache, and no flash attention, whose CPU kernel rounds K and V to
# f16 whatever the cache type (on the SmolLM2 case: -0.023% perplexity with it, 0.0004% without).
FP32 = ["-ctk", "f32", "-ctv", "f32", "-fa", "off", "-t", "2", "--no-warmup"]


def llama_tokenize(model_file, text: str, bos: bool = True) -> list[int]:
  """llama.cpp's tokens for `text`, with the BOS its vocabulary adds (as its other tools do)."""
  no_bos = [] if bos else ["--no-bos"]
  out = subprocess.run(
    [
      llama_cpp_tool("llama-tokenize"),
      "-m",
      str(model_file),
      "-p",
      text,
      "--ids",
      "--log-disable",
      *no_bos,
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


def run_tool(args: list[str], complete) -> subprocess.CompletedProcess:
  """Runs a llama.cpp tool until `complete(result)`: its logger writes from a thread that can
  drop the last lines at exit (one run in ten on a loaded machine, most runs on an idle one:
  llama-completion's tokens on a tiny model), so a short output is run again."""
  for _ in range(40):
    done = subprocess.run(args, capture_output=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:].decode(errors="replace")
    if complete(done):
      return done
  raise AssertionError(f"{args[0]} never wrote its whole output: {done.stderr[-3000:]!r}")


def llama_perplexity(model_file, text_file, n_ctx: int, lora=None) -> float:
  lora_args = ["--lora", str(lora)] if lora else []
  args = ["-m", str(model_file), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx)]
  final = re.compile(rb"Final estimate: PPL = ([0-9.]+)")
  done = run_tool(
    [llama_cpp_tool("llama-perplexity"), *args, *lora_args, *FP32],
    lambda done: final.search(done.stderr),
  )
  return float(final.search(done.stderr).group(1))


def llama_completion(model_file, prompt: str, lora=None) -> bytes:
  """The bytes of llama.cpp's STEPS greedy tokens after `prompt` (special tokens spelled out)."""
  lora_args = ["--lora", str(lora)] if lora else []
  args = ["-m", str(model_file), "-p", prompt, "-n", str(STEPS), "--temp", "0", "--top-k", "1"]
  flags = ["-no-cnv", "--no-display-prompt", "--special", "--simple-io", "-c", "128", "--seed", "0"]
  # After the tokens it writes " [end of text]\n" if it stopped at an end token, then "\n\n".
  done = run_tool(
    [llama_cpp_tool("llama-completion"), *args, *flags, *lora_args, *FP32],
    lambda done: done.stdout.endswith(b"\n\n"),
  )
  return done.stdout.removesuffix(b"\n\n").removesuffix(b" [end of text]\n")


def token_bytes(tokenizer, ids: list[int]) -> bytes:
  """The bytes a byte-level BPE tokenizer's ids stand for, special tokens spelled out: what
  llama.cpp prints, valid UTF-8 or not (a random model's tokens often split characters)."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
  special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
  pieces = tokenizer.convert_ids_to_tokens(ids)
  return b"".join(
    piece.encode() if i in special else bytes(byte_of[c] for c in piece)
    for i, piece in zip(ids, pieces)
  )


def jlora_perplexity(model, params, tokens: list[int], n_ctx: int, bos: int | None) -> float:
  """llama-perplexity's protocol with jlora's training loss (train.step.loss_sum): the tokens cut
  into whole chunks of n_ctx, each chunk's first token replaced by BOS when the vocabulary adds
  one, and only the predictions of the second half of each chunk scored."""
  chunks = np.asarray(tokens[: len(tokens) // n_ctx * n_ctx], np.int32).reshape(-1, n_ctx)
  inputs = chunks.copy()
  if bos is not None:
    inputs[:, 0] = bos
  mask = np.zeros_like(chunks)
  mask[:, n_ctx // 2 : n_ctx - 1] = 1  # position p predicts token p + 1
  batch = {
    "input_ids": inputs,
    "positions": np.broadcast_to(np.arange(n_ctx, dtype=np.int32), chunks.shape),
    "segment_ids": np.ones_like(chunks),
    "targets": np.concatenate([chunks[:, 1:], chunks[:, :1]], axis=1),
    "loss_mask": mask,
  }
  batch = step_lib.gather_labels(batch, step_lib.label_budget(mask))
  apply_fn = jlora.wrap(model.apply)
  total, count = jax.jit(lambda p, b: step_lib.loss_sum(apply_fn, type(model), p, b))(params, batch)
  return float(np.exp(float(total) / float(count)))


def check_against_llama_cpp(tmp_path, model, params, base, files, tokenizer, prompt, n_ctx):
  """files: (merged, base, adapter) GGUF paths. Both ways of running the adapter in llama.cpp
  give jlora's perplexity and greedy tokens. Returns the numbers, for the report."""
  merged, base_file, adapter = files
  text_file = tmp_path / "text.txt"
  text_file.write_text(TEXT * 4)
  tokens = llama_tokenize(merged, text_file.read_text())
  # Whether llama.cpp adds BOS (the file's add_bos_token, or its default for the vocabulary type).
  bos = tokens[0] if len(tokens) > len(llama_tokenize(merged, TEXT * 4, bos=False)) else None
  assert len(tokens) >= 2 * n_ctx, "the text must fill two chunks"
  ours = jlora_perplexity(model, params, tokens, n_ctx, bos)
  assert ours != pytest.approx(jlora_perplexity(model, base, tokens, n_ctx, bos), rel=1e-3)

  prompt_ids = llama_tokenize(merged, prompt)
  [greedy] = generate_ids(
    model, params, [prompt_ids], STEPS, eos_ids=[tokenizer.eos_token_id],
    apply_fn=jlora.wrap(model.apply),
  )  # fmt: skip
  expected = token_bytes(tokenizer, greedy)
  results = {"jlora_ppl": ours, "greedy_tokens": len(greedy)}
  for name, lora in (("merged", None), ("base+lora", adapter)):
    model_file = merged if lora is None else base_file
    theirs = llama_perplexity(model_file, text_file, n_ctx, lora)
    assert theirs == pytest.approx(ours, rel=PPL_TOLERANCE), name
    assert llama_completion(model_file, prompt, lora) == expected, name
    results[f"{name}_ppl"] = theirs
  return results


def test_llama_cpp_runs_a_tiny_export_as_jlora_does(tmp_path):
  lora_cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
  model, params, _ = adapted_model(tmp_path / "base", CONFIG, lora_cfg)
  tokenizer = tiny_tokenizer()
  base = jax.tree.map(lambda n: n.base if jlora.is_lora(n) else n, params, is_leaf=jlora.is_lora)
  files = (
    jlora.export_gguf(tmp_path / "merged.gguf", params, model.config, tokenizer, "f32"),
    jlora.export_gguf(tmp_path / "base.gguf", base, model.config, tokenizer, "f32"),
    jlora.save_adapter_gguf(tmp_path / "adapter.gguf", params, lora_cfg, model.config),
  )
  results = check_against_llama_cpp(
    tmp_path, model, params, base, files, tokenizer, "Once upon a time", n_ctx=32
  )
  assert results["greedy_tokens"] == STEPS, results  # no early end: all 32 tokens compared
  print(results)


@pytest.mark.slow
def test_llama_cpp_runs_an_adapted_smollm2_as_jlora_does(tmp_path):
  from jlora.models import export, from_pretrained
  from jlora.models.loading import embedded_gguf_path
  from tests.test_gguf_export import randomize_b

  try:
    embedded_gguf_path("smollm2-135m-instruct")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model, base, tokenizer = from_pretrained("smollm2-135m-instruct")
  lora_cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets="all-linear")
  ids = np.asarray([[1, 2, 3, 4]])
  params = jlora.apply(base, lora_cfg, jax.random.key(0), layout=jlora.trace_layout(model, ids))
  params = randomize_b(params, seed=3)
  pre = export.source_tokenizer_pre("smollm2-135m-instruct")
  files = (
    jlora.export_gguf(
      tmp_path / "merged.gguf", params, model.config, tokenizer, "f32", tokenizer_pre=pre
    ),
    jlora.export_gguf(
      tmp_path / "base.gguf", base, model.config, tokenizer, "f32", tokenizer_pre=pre
    ),
    jlora.save_adapter_gguf(tmp_path / "adapter.gguf", params, lora_cfg, model.config),
  )
  prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
  results = check_against_llama_cpp(tmp_path, model, params, base, files, tokenizer, prompt, 128)
  print(results)


# Tiny random transformers checkpoints of the MoE families llama.cpp runs, 4 experts, top-2.
MOE_CASES = {
  "qwen3_moe": dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=16
  ),
  "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
  # Sliding layers (window 8 < the 32-token chunks), sinks, biases, YaRN (llama.cpp rounds its
  # correction range outward, which is transformers' truncate=True).
  "gpt_oss": dict(
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=32,
    head_dim=16,
    sliding_window=8,
    rope_parameters={
      "rope_type": "yarn",
      "rope_theta": 150000.0,
      "factor": 4.0,
      "original_max_position_embeddings": 16,
      "beta_fast": 32.0,
      "beta_slow": 1.0,
      "truncate": True,
    },
  ),
}


@pytest.mark.parametrize("model_type", list(MOE_CASES))
def test_llama_cpp_runs_a_moe_export_as_jlora_does(model_type, tmp_path):
  """A tiny Qwen3-MoE / Mixtral / gpt-oss (transformers' layout) with LoRA on attention and on the
  experts, merged and written as llama.cpp's qwen3moe / llama / gpt-oss: llama.cpp's perplexity
  and greedy tokens are jlora's."""
  from jlora.models import from_pretrained
  from tests import tiny
  from tests.test_gguf_export import IDS, randomize_b

  directory = tiny.save_torch_checkpoint(tmp_path / "hf", model_type, **MOE_CASES[model_type])
  model, params, tokenizer = from_pretrained(directory)
  cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
  params = randomize_b(
    jlora.apply(params, cfg, jax.random.key(0), layout=jlora.trace_layout(model, IDS))
  )
  adapted = jax.tree_util.tree_flatten_with_path(params, is_leaf=jlora.is_lora)[0]
  assert any(jlora.is_lora(n) and "experts" in jax.tree_util.keystr(p) for p, n in adapted)
  base = jax.tree.map(lambda n: n.base if jlora.is_lora(n) else n, params, is_leaf=jlora.is_lora)
  merged = jlora.export_gguf(tmp_path / "merged.gguf", params, model.config, tokenizer, "f32")
  text_file = tmp_path / "text.txt"
  text_file.write_text(TEXT * 4)
  tokens = llama_tokenize(merged, text_file.read_text())
  bos = tokens[0] if len(tokens) > len(llama_tokenize(merged, TEXT * 4, bos=False)) else None
  ours = jlora_perplexity(model, params, tokens, 32, bos)
  assert ours != pytest.approx(jlora_perplexity(model, base, tokens, 32, bos), rel=1e-3)
  theirs = llama_perplexity(merged, text_file, 32)
  assert theirs == pytest.approx(ours, rel=PPL_TOLERANCE)
  prompt = "Once upon a time"
  [greedy] = generate_ids(
    model, params, [llama_tokenize(merged, prompt)], STEPS, eos_ids=[tokenizer.eos_token_id],
    apply_fn=jlora.wrap(model.apply),
  )  # fmt: skip
  assert llama_completion(merged, prompt) == token_bytes(tokenizer, greedy)
  print({"jlora_ppl": ours, "llama_cpp_ppl": theirs, "greedy_tokens": len(greedy)})

"""Writes BENCHMARKS.md from the result files in bench/results/ (no measuring here).

    python -m bench.report

Every number in BENCHMARKS.md is copied from a JSON written by one of the bench
commands (or by the default training run), so rerunning those and then this script
reproduces the file.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench import common
from jlora.models.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q

RESULTS = Path("bench/results")


def load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


def ratio(results: list[dict], config: str, framework: str = "jlora") -> float:
  """framework's steps/s over PEFT's, for one config of the same invocation."""
  speed = {r["framework"]: r["steps_per_s"] for r in results if r["config"] == config}
  return speed[framework] / speed["peft"]


def step0_gap(results: list[dict]) -> float:
  """Largest |jlora - PEFT| first-step loss over the configs (same weights, same batch, B = 0)."""
  first = {(r["config"], r["framework"]): r["losses"][0] for r in results}
  return max(abs(first[(c, "jlora")] - first[(c, "peft")]) for c, f in first if f == "peft")


def vs_peft_section(v: dict, f: dict) -> str:
  qv8 = ratio(v["results"], "qv-r8")
  slots, positions = f["label_slots"], f["batch"][0] * f["batch"][1]
  extra = (f["flops"]["LoRA step (all-r16)"] - f["flops"]["LoRA step (qv-r8)"]) / 1e9
  if qv8 >= 1.3:
    verdict = f"- **Target: jlora steps/s ≥ 1.3 × PEFT's for q,v r=8. Met ({qv8:.2f}×).**\n"
  else:
    verdict = f"""- **Target: jlora steps/s ≥ 1.3 × PEFT's for q,v r=8. Not met ({qv8:.2f}×).**
  - Both frameworks do about 4N FLOPs per token (no weight gradients for the frozen base).
  - Both run near this CPU's matmul throughput, so neither is far from the compute floor.
  - jlora runs the LM head and softmax only at the {slots} label slots of the {positions} positions
    (see section 2). XLA:CPU runs the rank-r adapter matmuls less efficiently than torch's oneDNN kernels,
    and that eats the saving.
  - XLA counts only {extra:+.0f} GFLOP per step for all-linear r=16 over q,v r=8; jlora applies the A
    factors of q/k/v, and of gate/up, which read the same input, as one wider matmul (one pass over the
    activations instead of three or two, forward and backward).
"""
  all16 = ratio(v["results"], "all-r16")
  all_linear = (
    f"- **Target: the all-linear r=16 step ≥ 0.9 × PEFT's (same sitting). "
    f"{'Met' if all16 >= 0.9 else 'Not met'} ({all16:.2f}×).**\n"
  )
  return f"""## 1. The same LoRA training step: jlora vs PEFT + transformers (CPU, fp32)

`python -m bench.vs_peft --warmup {v["warmup"]}` ({v["wall_s"] / 60:.0f} min). {common.machine_line(v["machine"])}, no GPU.

{v["table_markdown"].strip()}

{verdict}{all_linear}- **QLoRA rows.** bitsandbytes has no CPU 4-bit training path, so they compare jlora's NF4 base against
  PEFT's fp32 LoRA. On CPU, dequantizing inside the step costs time. What QLoRA buys is memory, not CPU
  speed: see the argument bytes in section 2.
- **Sanity.** Both frameworks start from the same weights and the same batch; their fp32 LoRA step-0 losses
  differ by at most {step0_gap(v["results"]):.1e}.
"""


def flops_section(f: dict) -> str:
  t = f["tables_markdown"]
  return f"""## 2. XLA cost analysis of one training step (SmolLM2-135M, batch 4 × 128)

`python -m bench.flops`. {common.machine_line(f["machine"])}, no GPU. FLOPs are counted on the model unrolled
(`scan_layers=False`) so that XLA counts every layer; memory and compile time are for the real scanned
30-layer step.

{t["flops"].strip()}

{t["memory"].strip()}

{t["compile"].strip()}

- **LoRA step ≤ 2.2 × forward: met.** A LoRA step is about 2× the forward: the forward plus activation
  gradients, with no weight gradients for the base. Full fine-tuning is about 3×.
- **Compile time ≤ 30 s: met.** `nn.scan` keeps compile time independent of depth; the step compiles in
  seconds.
- **QLoRA memory.** The base enters the step as 4-bit codes: compare the argument bytes of LoRA and QLoRA.
  The dequantize-and-matmul is rematerialised in the backward, so no full-precision copy of a layer is
  kept between the forward and the backward.
"""


def quant_section(q: dict) -> str:
  rows = "\n".join(
    f"| {r['layer']} | {r['kind']} | {'yes' if r['double_quant'] else 'no'} | {r['bytes_per_weight']:.4f} | "
    f"{r['forward_rel_error']:.4f} | {r['max_abs_weight_error']:.4f} | {r['mean_abs_weight_error']:.5f} |"
    for r in q["rows"]
  )
  return f"""## 3. 4-bit base: bytes per weight and error on real weights

`python -m bench.quant_table`. Source: {q["source"]}; blocks of {q["block_size"]}, double quantization in
blocks of {q["double_quant_block"]}; input {q["input"]}. These numbers don't depend on the machine.

| weights | kind | double quant | bytes / weight | forward rel. error | max abs weight error | mean abs weight error |
|---|---|---|---|---|---|---|
{rows}
"""


def gpu_steps(r: dict) -> dict[str, float]:
  return {
    name: statistics.median(run["times"]) for name, run in r["results"].items() if "times" in run
  }


def gpu_attention_lines(a: dict | None) -> str:
  if a is None:
    return "- `python -m bench.gpu_attention` (cuDNN against naive attention on the GPU) has not run yet.\n"
  checks = "; ".join(
    f"{name}: {c['forward']:.3f} forward, {max(c['grads_qkv']):.3f} in gradients"
    for name, c in a["check"].items()
  )
  scale = max(c["output_scale"] for c in a["check"].values())
  t = {k: v * 1e3 for k, v in a["seconds"].items()}
  return f"""- **cuDNN against naive attention** (`python -m bench.gpu_attention`, {a["device"]}, bf16, forward and
  the three input gradients), largest differences at an output scale of {scale:.1f}: {checks}. One bf16
  step (ulp) between 2 and 4 is 2^-6 = 0.016: the forward differs by one rounding step.
- **Attention alone** on this shape (2 x 2048, 32 heads, 8 KV heads, 64-dim, 4 segments per row), one
  forward + backward: cuDNN {t["cudnn"]:.1f} ms, blockwise {t["blockwise"]:.1f} ms, naive {t["naive"]:.1f} ms.
"""


def gpu_section(g: dict, before: dict, bf16: dict, attention: dict | None) -> str:
  now, then, half = gpu_steps(g), gpu_steps(before), gpu_steps(bf16)
  return f"""## 4. GPU: tokens/s and MFU (Llama-3.2-1B shape, bf16)

`python -m bench.gpu` measures LoRA r=16 all-linear and QLoRA nf4 on a Llama-3.2-1B-shaped model with
random weights, with 2048-token packed sequences. It reports MFU against 989 TFLOP/s, and runs the same
training through PEFT + transformers (bf16, sdpa) for the ratio. {g["args"]["steps"]} timed steps after
{g["args"]["warmup"]} warm-up steps, median.

{common.machine_line(g["machine"])}; {g["machine"]["device_kind"]} (lent through this workplace's
device tool); the package versions are those installed there.

{g["table_markdown"]}

- **Before packed cuDNN attention** (`bench/results/gpu_before_packed_cudnn.json`, same command and
  machine kind, earlier that day): jlora {then["jlora"]:.3f} s/step ({then["peft"] / then["jlora"]:.2f}x PEFT),
  QLoRA {then["jlora-qlora"]:.3f} s ({then["peft"] / then["jlora-qlora"]:.2f}x), PEFT {then["peft"]:.3f} s. Every
  row is packed (several examples), and cuDNN's public entry point (`jax.nn.dot_product_attention`)
  takes no segment ids, so every step fell back to the pure-JAX blockwise attention. Packed rows now
  go to cuDNN's packed (THD) layout through JAX's cuDNN module, each segment's offset and length
  computed from the segment ids; rows with more than one segment per 64 slots still fall back.
{gpu_attention_lines(attention)}- **Adapters in bf16** (`--lora-dtype bfloat16 --no-peft --no-qlora`, `bench/results/gpu_bf16_adapters.json`):
  {half["jlora"]:.3f} s/step against {now["jlora"]:.3f} s with fp32 adapters. PEFT keeps fp32 adapters too.
- PEFT's QLoRA (bitsandbytes) is not run; the QLoRA ratio is against PEFT's bf16 LoRA.
- CPU backends never take the cuDNN paths. CI tests the offsets' computation against a plain walk over
  the row (`tests/test_attention.py`) and the fallback.
"""


def default_run_section(d: dict) -> str:
  before, after = d["before"], d["after"]
  return f"""## 5. The default fine-tuning run

`{d["command"]}` at commit {d["commit"]}. Machine: {d["machine"]}.

SmolLM2-135M-Instruct (fp32), LoRA r=16 on all linear layers, 30 steps of 4 packed rows × 256 tokens, on
the bundled extraction task. The GGUF had already been converted and cached by an earlier run.

| | value |
|---|---|
| wall time of the whole command (`time`) | {d["wall_s_time_command"]:.1f} s |
| of which the 30 training steps (progress bar) | {d["training_progress_bar_s"]} s |
| training throughput (non-padding tokens per second, steps 2-30) | {d["train_tokens_per_s"]:.0f} tokens/s |
| eval loss, before → after | {before["eval_loss"]:.4f} → {after["eval_loss"]:.4f} |
| exact match on 48 held-out eval rows, before → after | {before["exact_match"]:.1%} → {after["exact_match"]:.1%} |

The rest of the wall time is evaluation: the eval loss on the eval split, and greedy generation of 48
answers, before and after training.
"""


def long_context_section(lc: dict, rerun: dict | None = None) -> str:
  """`rerun`: an optional later run of some cells with more timed steps (bench/results/
  long_context_2048_steps3.json); its medians decide the targets of the lengths it covers."""
  by = {(r["framework"], r["seq"]): r for r in lc["results"]}
  rerun_by = {(r["framework"], r["seq"]): r for r in (rerun or {}).get("results", [])}

  def speed(seq: int, runs: dict = by):
    peft, jlora = runs.get(("peft", seq), {}), runs.get(("jlora", seq), {})
    if "median_step_s" in peft and "median_step_s" in jlora:
      return peft["median_step_s"] / jlora["median_step_s"]
    return None

  per_token = {
    seq: r["ms_per_token"] for (f, seq), r in by.items() if f == "jlora" and "ms_per_token" in r
  }
  longest = lc["longest_trained"]

  def target(text: str, value, ok, seq: int | None = None) -> str:
    if seq is not None and speed(seq, rerun_by) is not None:
      table, value = value, speed(seq, rerun_by)
      steps = rerun["steps_timed"]
      verdict = "met" if ok(value) else "not met"
      return (
        f"- **{text}: {verdict} ({value:.2f}, medians of {steps} steps in the re-run below;"
        f" the table's single steps: {table:.2f}).**"
      )
    if value is None:
      return f"- **{text}: not measured.**"
    return f"- **{text}: {'met' if ok(value) else 'not met'} ({value:.2f}).**"

  ratio_growth = (
    per_token[8192] / per_token[512] if 8192 in per_token and 512 in per_token else None
  )
  lines = [
    target("jlora / PEFT speed ≥ 0.8× at 2,048 tokens", speed(2048), lambda x: x >= 0.8, 2048),
    target("jlora / PEFT speed ≥ 0.7× at 8,192 tokens", speed(8192), lambda x: x >= 0.7, 8192),
    target("ms/token at 8,192 ≤ 2× ms/token at 512 (ratio)", ratio_growth, lambda x: x <= 2.0),
    f"- **jlora trains at 16,384 tokens: {'met' if (longest.get('jlora') or 0) >= 16384 else 'not met'}.**"
    f" Longest row trained: jlora {longest.get('jlora')}, jlora naive {longest.get('jlora-naive')}, "
    f"PEFT {longest.get('peft')} tokens (memory limit {lc['memory_limit_gib']:.0f} GiB).",
  ]
  # Conditions of the sitting that the numbers alone don't show, recorded in the JSON by whoever ran it.
  lines += [f"- {note}" for note in lc.get("notes", [])]
  return f"""## Long rows: one LoRA step on one row of 512 to 16,384 tokens (CPU, fp32)

`python -m bench.long_context` ({lc["wall_s"] / 60:.0f} min). {common.machine_line(lc["machine"])}, no GPU.
SmolLM2-135M, LoRA r=8 on q,v, batch 1, cross-entropy on every position, AdamW; median of
{lc["steps_timed"]} timed step(s) after {lc["warmup"]} warm-up. jlora uses the default model config (attention
`auto` = blockwise on CPU, remat `auto`); "naive" is the `[seq, seq]` reference attention; PEFT is
transformers with sdpa and no gradient checkpointing. Temp = XLA's compiled temporaries; RSS includes
loading the model. "cannot run" cells were not started: the compiled memory, or PEFT's RSS extrapolated
from the previous length, exceeds the limit.

{lc["table_markdown"].strip()}

{chr(10).join(lines)}
{rerun_section(rerun)}"""


def rerun_section(rerun: dict | None) -> str:
  if not rerun:
    return ""
  rows = [
    [
      f"{r['seq']:,}",
      r["framework"],
      ", ".join(f"{t:.2f}" for t in r["times"]),
      f"{r['median_step_s']:.2f}",
    ]
    for r in rerun["results"]
    if "times" in r
  ]
  return f"""
Re-run with {rerun["steps_timed"]} timed steps, right after the sitting on the same idle machine:
`python -m bench.long_context --seqs 2048 --steps 3 --frameworks peft,jlora --out bench/results/long_context_2048_steps3.json`.

{common.markdown_table(["tokens", "framework", "timed steps, s", "median s/step"], rows)}
"""


def attention_blocks_section(ab: dict) -> str:
  seqs = sorted({r["seq"] for r in ab["results"]})
  configs = list(dict.fromkeys(r["config"] for r in ab["results"]))
  best = {(r["seq"], r["config"]): r for r in ab["results"]}
  rows = []
  for config in configs:
    row = [config]
    for seq in seqs:
      r, torch = best[(seq, config)], best[(seq, "torch sdpa")]
      row.append(
        f"{r['best_s']:.3f} s, {r['gflops']:.0f} GFLOP/s, {torch['best_s'] / r['best_s']:.2f}×"
      )
    rows.append(row)
  header = ["attention"] + [f"{seq:,} tokens (s, GFLOP/s, speed vs torch)" for seq in seqs]
  return f"""### Attention alone: blockwise block sizes vs torch's fused kernel

`python -m bench.attention_blocks` ({ab["wall_s"] / 60:.0f} min). {common.machine_line(ab["machine"])}, no GPU.
One layer's causal attention at SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64), batch 1,
fp32, forward + backward; fastest of {ab["repeats"]} interleaved repeats. GFLOP/s counts the 7 matmuls
of a flash forward + backward over half the square. "jlora BQxBK" is `blockwise_attention` with query
blocks of BQ and key blocks of BK tokens; the default is {DEFAULT_BLOCK_Q} x {DEFAULT_BLOCK_K}.

{common.markdown_table(header, rows)}
"""


def fidelity_section(path: Path) -> str:
  title = "## 6. Training fidelity: jlora and PEFT + PyTorch, step by step (SmolLM2-135M, fp32)\n"
  if not path.exists():
    return (
      title
      + "\n`python -m bench.fidelity` has not been run in a benchmark sitting yet, so there are no "
      "numbers here. `tests/test_fidelity.py` runs the same comparison on a tiny random Llama in the suite.\n"
    )
  r = json.loads(path.read_text())
  s, w, t = r["settings"], r["worst"], r["targets"]
  verdict = lambda key: "met" if r["met"][key] else "**not met**"
  clipped = sum(row["clipped"] for row in r["rows"])
  return f"""{title}
`{r["command"]}` ({r["wall_s"] / 60:.0f} min). {common.machine_line(r["machine"])}, no GPU.

Both sides start from the same weights and the same initial adapter: jlora writes it with `save_adapter`,
and PEFT loads it. Both see the same {s["steps"]} batches of {s["rows"]} unpacked rows × {s["seq"]} tokens
from `{r["data"]["file"]}`, with the loss on the completion only, in the same order. The run uses gradient
accumulation {s["accum"]}, LoRA r={s["rank"]} (alpha {s["alpha"]:g}, {s["targets"]}), lr {s["lr"]:g},
{s["warmup_steps"]} warmup steps, then a cosine to {s["min_lr_ratio"]:g} × lr, weight decay
{s["weight_decay"]:g} and clip norm {s["clip_norm"]:g} (it bound on {clipped} of the {s["steps"]} steps).
jlora runs `train/step.py`. PyTorch runs a loop written the way transformers' `Trainer` runs a step:
HF's loss over `num_items_in_batch`, one `clip_grad_norm_`, `torch.optim.AdamW`, and HF's warmup +
cosine `LambdaLR`. The task's completions have similar lengths, so the two microbatches of a step carry
about the same number of labelled tokens: this run checks the numerics at model scale. The normalisation
across microbatches of very different weight is checked by `tests/test_fidelity.py` on a tiny model.

{r["table_markdown"].strip()}

![loss curves of jlora and PEFT + PyTorch]({r["plot"]})

| | worst over the run | target | |
|---|---|---|---|
| loss, relative | {w["loss_rel"]:.1e} | {t["loss_rel"]:g} | {verdict("loss_rel")} |
| grad norm, relative | {w["grad_norm_rel"]:.1e} | {t["grad_norm_rel"]:g} | {verdict("grad_norm_rel")} |
| lr, relative (float32 vs float64) | {w["lr_rel"]:.1e} | {t["lr_rel"]:g} | {verdict("lr_rel")} |
| final adapter, absolute ({r["adapter_tensors"]} tensors, largest value {r["adapter_max_abs_value"]:.3f}) | {w["adapter_abs"]:.1e} | {t["adapter_abs"]:g} | {verdict("adapter_abs")} |
"""


def sitting_words(machine: dict) -> str:
  """The load of a sitting, in words: idle (load average at most 2 at both ends) or shared."""
  start = machine["loadavg_at_start"][0]
  end = machine.get("loadavg_at_end", [start])[0]
  if max(start, end) <= 2.0:
    return f"The machine was otherwise idle (load average {start} at the start, {end} at the end)."
  return (
    f"This sitting shared the 2 cores with other jobs (load average {start} at the start, {end} at "
    "the end), so absolute numbers are low and rows that ran at different times are not comparable."
  )


def serve_section(r: dict) -> str:
  from bench.serve import table

  rows = {(row["spread"], row["clients"]): row["tokens_per_s"] for row in r["rows"]}
  mixed, single = rows.get(("4 adapters", 16)), rows.get(("1 adapter", 16))
  seq = r["sequential"]["tokens_per_s"]
  sittings = " and ".join(f"{s['tokens_per_s']:.1f}" for s in r["sequential"].get("sittings", []))
  one = next(row["per_token_ms_p50"] for row in r["rows"] if row["clients"] == 1)
  targets = ""
  if mixed and single:
    targets = (
      f"\nTargets: 16 clients over 4 adapters reach {mixed / single:.2f}x the tokens/s of 16 clients "
      f"on one adapter (target >= 0.9x) and {mixed / seq:.1f}x the sequential tokens/s (target >= 4x).\n"
    )
  return f"""## 7. Serving: continuous batching of mixed-adapter requests (SmolLM2-135M, fp32, CPU)

`python -m bench.serve` ({common.machine_line(r["machine"])}; load avg at the end
{r["machine"].get("loadavg_at_end", ["?"])[0]}). `train.serve` with `--max-num-seqs 16
--max-model-len 256` in the same process as its clients (asyncio httpx streams on loopback), four
rank-16 q,k,v,o adapters, greedy chat requests of at most {r["max_tokens"]} tokens; each client
sends its requests one after another. Sequential: `train.generate` one request at a time, the
adapter alone on the base, measured before the server starts and after it stops ({sittings} tokens/s);
the faster is the baseline.

{table(r)}
{targets}
{sitting_words(r["machine"])} The mixed-adapter ratio compares rows of the same sitting. A decode
step computes the slots up to the highest live one, rounded up to a power of two (requests take the
lowest free slots), so one client's steps are one row: with one client a token took
{one:.0f} ms (p50), against {1000 / seq:.0f} ms per token, prefill included, for `train.generate`
one request at a time. (Before, every step computed all 16 slots: 92 ms a token with one client.) Requests that wait for slots are prefilled together, a batch per padded length (powers of two;
one call over 8 prompts costs about a third less CPU per prompt than 8 calls), and each row's keys
and values are written into the running cache in place. The server keeps the keys and values of
each prompt's first multiples of 16 tokens per adapter (its prefix cache, `--prefix-cache-mib`, as
vLLM's automatic prefix caching): a prompt that starts like an earlier one on the same adapter
prefills only the rest. No two requests of a sitting ask the same question (each starts "Question
{{n}}: "), so what the cache finds is what real chat traffic shares: the first 16 tokens of the
template's 24-token system prompt; a request then prefills its other 24-29 tokens (padded to 24 or
32), where `train.generate` prefills all of its 40-45 (padded to 48). A second idle sitting of this
bench right after the one above read 4.60x (146.7 tokens/s against a baseline of 31.9, which moved
from 38.8) and 1.16x mixed/single: the baseline is the noisy part. (An earlier version of this
bench resent 4 questions that the warm-up had already sent, so the cache served 32 of their
36-39 tokens: 4.6x in two sittings, which flattered the server.) The adapter stack holds the layers the
adapters adapt (`--lora-targets q_proj,k_proj,v_proj,o_proj`, as `--max-lora-rank 16` sizes their
rank): a 16-row decode step over an all-linear stack took a fifth more CPU time. A decode step
keeps the KV caches in the layer scan's carry and writes each layer's new column in place; scanned
over as inputs and outputs, XLA copied them whole at every layer, which was most of a 16-slot CPU
step. Of a 16-row step's CPU time (profiled with jax.profiler, SmolLM2-135M, width 96) about 29%
is the MLP matmuls, 21% copying each layer's weights out of the scanned stack (a 1-row step, and
so `train.generate`, copies them too), 17% the KV cache and attention, 12% the tied lm_head and
12% q/k/v/o with their adapters.
"""


def nnx_section(r: dict) -> str:
  run, rows = r["run"], r["rows"]
  from bench.nnx_vs_qwix import QWIX_ON_SAME_MODEL

  qwix = {(row["config"], row["framework"]): row["step_s"] for row in rows}
  qwix_time = lambda row: qwix[row["config"], QWIX_ON_SAME_MODEL[row["framework"]]]
  table = common.markdown_table(
    ["config", "framework", "s/step", "qwix / this", "temporaries MiB"],
    [
      [
        row["config"],
        row["framework"],
        f"{row['step_s']:.3f}" if row["step_s"] else "-",
        f"{qwix_time(row) / row['step_s']:.2f}x" if row["step_s"] else "-",
        f"{row['temp_mib']:.1f}",
      ]
      for row in rows
    ],
  )
  compiles = len({row["config"] for row in rows}) * len(QWIX_ON_SAME_MODEL)
  return f"""## NNX: jlora vs qwix's LoRA on the same NNX Llama, and jlora's linen Llama (CPU, fp32)

`python -m bench.nnx_vs_qwix --layers {run["layers"]} --steps {run["steps"]}`
({common.machine_line(r["machine"])}): SmolLM2-135M's shape (d={run["hidden"]}, vocab
{run["vocab"]:,}) cut to {run["layers"]} layers so that all {compiles} compiles fit in minutes, batch
{run["batch"]} x {run["length"]}; the {len(QWIX_ON_SAME_MODEL)} steps of a config timed in turn
(A, B, C, A, B, C, ...), median of {run["steps"]} rounds after one untimed round; temporaries from
XLA's memory analysis of the compiled step. {sitting_words(r["machine"])}

{table}

{nnx_verdict(rows)}

Targets: jlora on NNX >= 1.0x qwix's speed on every config, with fewer temporaries, and within 5% of
jlora on linen. "qwix / this" compares each row with qwix on the same model. The "NNX" rows run
examples/nnx_llama.py (which calls jlora's attention function as the linen Llama does: blockwise on
CPU); the "tunix" rows run tunix's Llama3 as google-tunix ships it (examples/tunix_llama.py: custom
einsum projections on `[embed, heads, head_dim]` weights, naive attention), a model neither library
wrote.

**Two losses.** Every row is the mean cross-entropy of every next token. qwix is a LoRA library
with no loss of its own, so its rows compute it as tunix's PeftTrainer does by default: a
log-softmax over the whole [batch, seq, vocab] logits ("full-logits loss"). The plain "jlora" rows
use jlora's loss, the one `train.sft` trains with (`train.step.loss_sum`): the model's final hidden
states, the head at labelled positions only, each log-prob as logit - logsumexp, so no
[batch, seq, vocab] log-softmax exists (with more than 1,024 labelled positions the head also runs
in chunks, its gradient taken in the forward). The NNX models declare the two halves of their call
(`hidden_states`, `head`) for it. Their fewer temporaries and most of their speed come from that
loss, not from the LoRA forward: the "full-logits loss" rows run jlora's LoRA on qwix's loss, and
there, without quantization, the two libraries compile nearly the same program (the same saved
activations: x, x A per adapter, the layer outputs), with equal temporaries. With an nf4 base jlora
keeps only the 4-bit codes between forward and backward and dequantizes again in the backward,
after the output's gradient exists (`jlora.lowrank.dequantized_in_backward`); qwix's QLoRA keeps
every layer's dequantized weight alive through the loss, hence its extra temporaries on either
loss. The linen model sits under one `nn.scan`; the NNX one is an unrolled Python loop of layers.
"""


def nnx_verdict(rows: list[dict]) -> str:
  """The NNX targets, met or not, in words, from the measured rows (jlora on its own loss)."""
  by = {(row["config"], row["framework"]): row for row in rows}
  configs = list(dict.fromkeys(row["config"] for row in rows))
  if not all(by[c, "jlora NNX"]["step_s"] for c in configs):
    return "Speed not measured in this sitting."
  words = []
  for model, qwix in (("jlora NNX", "qwix NNX"), ("jlora tunix", "qwix tunix")):
    ratios = [by[c, qwix]["step_s"] / by[c, model]["step_s"] for c in configs]
    fewer = all(by[c, model]["temp_mib"] < by[c, qwix]["temp_mib"] for c in configs)
    words.append(
      f"{model}: {min(ratios):.2f}x to {max(ratios):.2f}x qwix's speed on the same model, "
      f"{'fewer' if fewer else 'not fewer'} temporaries on every config"
    )
  to_linen = [by[c, "jlora NNX"]["step_s"] / by[c, "jlora linen"]["step_s"] for c in configs]
  words.append(f"jlora NNX's step time is {min(to_linen):.2f}x to {max(to_linen):.2f}x linen's")
  return "In this sitting: " + "; ".join(words) + "."


def frozen_head_section(several: dict, one: dict | None) -> str:
  def table(r):
    return common.markdown_table(
      ["frozen head's gradient", "s/step", "temporaries MiB", "loss"],
      [[row["way"], f"{row['step_s']:.3f}", f"{row['temp_mib']:.1f}", f"{row['loss']:.6f}"]
       for row in r["rows"]],
    )  # fmt: skip

  def ratios(r):
    fast, slow = r["rows"]
    return f"{slow['step_s'] / fast['step_s']:.2f}x", f"{fast['temp_mib'] / slow['temp_mib']:.2f}x"

  def command(r):
    run = r["run"]
    return (
      f"`python -m bench.frozen_head --layers {run['layers']} --batch {run['batch']} "
      f"--length {run['length']} --steps {run['steps']}`"
    )

  run = several["run"]
  speed, memory = ratios(several)
  text = f"""## The trainer's loss with a frozen head: gradient in the forward vs recomputed (CPU, fp32)

{command(several)}
({common.machine_line(several["machine"])}): jlora's linen Llama at SmolLM2-135M's shape cut to
{run["layers"]} layers, LoRA r16 on all-linear, tied frozen head, {run["batch"]} x {run["length"]}
tokens all labelled ({run["chunks"]} chunks of 1,024 for the head), Adam; the two compiled steps timed
in turn, median of {run["steps"]} rounds after one untimed round. {sitting_words(several["machine"])}

{table(several)}

`train.step` takes a frozen head's gradient in the forward when its loss has several chunks: each
chunk's `(onehot - softmax)` is pulled back through the head at once and only the `[positions, d]`
result is kept. The other row is the step a head with trainable leaves takes (plain autodiff, each
chunk rematerialised, so the backward recomputes every chunk's logits). Here the first is
{speed} as fast with {memory} the temporaries; the losses are the same number.
"""
  if one is None:
    return text
  forward, autodiff = one["rows"]
  return (
    text
    + f"""
With one chunk there is nothing to recompute, and plain autodiff keeps the logits of that one chunk.
{command(one)}: the same model on {one["run"]["batch"]} x {one["run"]["length"]} tokens (one chunk),
the first way forced. {sitting_words(one["machine"])}

{table(one)}

There plain autodiff is {forward["step_s"] / autodiff["step_s"]:.2f}x as fast as the gradient in the
forward, with {autodiff["temp_mib"] / forward["temp_mib"]:.2f}x its temporaries, so the trainer takes
the gradient in the forward from two chunks on (`train.step.FROZEN_HEAD_MIN_CHUNKS`).
"""
  )


def moe_verdict(r: dict) -> str:
  """Whether the CPU default met the >= 1.0x PEFT target, in words, from the measured rows."""
  rows = r["rows"]
  default = rows.get("jlora-blocked", {})
  if "step_s" not in default or "step_s" not in rows["peft"]:
    return "not measured in this sitting"
  ratio = rows["peft"]["step_s"] / default["step_s"]
  met = "met" if ratio >= 1.0 else "not met"
  return f"{ratio:.2f}x PEFT's speed: the >= 1.0x target is {met}"


def moe_runs(r: dict) -> str:
  """How many runs each compared row had, and the load at the end, when the sitting recorded them."""
  end = r["machine"].get("loadavg_at_end")
  runs = "; PEFT and the blocked path ran twice each (first and last), each keeping its faster run"
  return (runs if r.get("runs") == 2 else "") + (
    f", load average at the end {end[0]}" if end else ""
  )


def moe_blocks(r: dict) -> str:
  """How this sitting's blocked loop cut each expert's rows (it changed between sittings)."""
  if r.get("blocked") == "chunked expert loop":
    return (
      "Each expert's rows are padded to a granule (16 rows here) and cut into chunks of 64, 32 "
      "and 16 rows, so the padding is under 16 rows per expert (about 6% of the rows here) while "
      "most rows go through 64-row matmuls."
    )
  if r.get("blocked"):
    return (
      "This sitting predates the chunked loop: each expert's rows were padded to whole 64-row "
      "blocks, about 25% of the expert FLOPs here."
    )
  return "This sitting predates the fused per-expert loop: it ran one loop per weight over blocks."


def moe_section(r: dict) -> str:
  from bench.moe import table

  shape = r["shape"]
  return f"""## 8. MoE: one LoRA step on a Qwen3-MoE-shaped model (CPU, fp32)

`python -m bench.moe --steps {r.get("steps", 3)} --warmup {r.get("warmup", 1)}` ({
    common.machine_line(r["machine"])
  }).
Random Qwen3-MoE checkpoint: {shape["num_hidden_layers"]} layers, d={shape["hidden_size"]},
{shape["num_experts"]} experts, top-{shape["num_experts_per_tok"]}, expert width
{shape["moe_intermediate_size"]}, vocab {
    shape["vocab_size"]:,}; batch 4 x 128 tokens; LoRA r=8, alpha
16 on every linear layer and on the experts (PEFT: `target_modules="all-linear"` + `target_parameters`
for `mlp.experts.gate_up_proj` / `down_proj`). One process per row, all rows in one sitting.

{table(r)}

Load average at the start: {r["machine"]["loadavg_at_start"][0]}{moe_runs(r)}. transformers 5 runs
the experts through torch's `_grouped_mm` (on CPU one matmul per expert that got tokens), and PEFT's
`target_parameters` adds each expert's W + BA to the weight per forward, so its backward also makes
each expert's full weight gradient. jlora keeps the adapters factored. XLA:CPU has no grouped-matmul
kernel: the dense one-hot path multiplies every routed token by every expert's weights (E / k = {
    shape["num_experts"] // shape["num_experts_per_tok"]
  } times the FLOPs), and XLA:CPU lowers `ragged_dot` densely too. The blocked path loops over the
experts (each one's weights read once) and over each expert's rows, running gate_up, the activation
and down in one loop body; it is `expert_matmul="auto"`'s choice on CPU ({moe_verdict(r)}). {
    moe_blocks(r)
  } {
    "The layer scan runs unrolled on CPU (`scan_unroll='auto'`, the MoE families' default; the "
    "weights stay stacked), so each layer reads its experts at a static offset. "
    if r.get("layers") == "unrolled"
    else ""
  }jlora's peak RSS is higher (XLA's buffers and the compile).
{moe_gpu_section()}
"""


def moe_gpu_section() -> str:
  """bench/results/moe_gpu.json (`python -m bench.moe --device gpu`), when there is one."""
  if not (RESULTS / "moe_gpu.json").exists():
    return (
      "On GPU/TPU auto takes `ragged_dot`, a grouped kernel there; no accelerator was measured."
    )
  from bench.moe import table

  r = load("moe_gpu.json")
  return f"""
On a GPU, `python -m bench.moe --device gpu --steps {r["steps"]} --warmup 2` ({r["dtype"]}; torch on
cuda, jax on its GPU backend; {common.machine_line(r["machine"])}; one
{r["machine"].get("device_kind", "GPU")}). auto takes `ragged_dot` there; at this small shape every jlora path is launch-bound and
the dense one-hot einsum (E / k times the FLOPs, in a few large kernels) is the fastest.

{table(r)}
"""


# Each init and what it is measured against: the same run without it.
INIT_BASELINES = {"pissa": "default", "eva": "default", "loraplus": "default", "loftq": "qlora"}


def inits_verdict(after: dict[str, float], tie: float = 0.002) -> str:
  """One sentence per init: does it end with a lower eval loss than its baseline?"""
  lines = []
  for variant, baseline in INIT_BASELINES.items():
    if variant not in after or baseline not in after:
      continue
    diff = after[variant] - after[baseline]
    if abs(diff) < tie:
      word = f"ends level with {baseline} ({diff:+.4f}): no help on this task"
    elif diff < 0:
      word = f"ends {-diff:.4f} below {baseline}: it helps here"
    else:
      word = f"ends {diff:.4f} above {baseline}: it does not help on this task"
    lines.append(f"- {variant} {word}.")
  return "\n".join(lines)


def inits_section(d: dict) -> str:
  s, m = d["settings"], d["machine"]
  names = {
    "default": "default (Kaiming A, B = 0)",
    "pissa": "pissa",
    "qlora": "QLoRA default (nf4 base)",
    "loftq": f"loftq (nf4 base, {s['loftq_iters']} iterations)",
    "eva": "eva (rho 2, 2 batches)",
    "loraplus": f"default + LoRA+ (ratio {s['loraplus_ratio']:g})",
  }
  by_module: dict[str, list] = {}
  for e in d["loftq_errors"]:
    by_module.setdefault(e["module"], []).append(e)
  errors = "\n".join(
    f"| {name} | {sum(e['qlora'] for e in es) / len(es):.4f} | "
    f"{sum(e['loftq'] for e in es) / len(es):.4f} | "
    f"{min(e['loftq'] / e['qlora'] for e in es):.3f} .. {max(e['loftq'] / e['qlora'] for e in es):.3f} |"
    for name, es in by_module.items()
  )
  if d["results"]:
    verdict = inits_verdict({r["variant"]: r["eval_after"] for r in d["results"]})
    rows = "\n".join(
      f"| {names.get(r['variant'], r['variant'])} | {r['eval_before']:.4f} | {r['eval_after']:.4f} | "
      f"{r['eval_after'] - r['eval_before']:+.4f} |"
      for r in d["results"]
    )
    losses = f"""Eval loss after {s["steps"]} steps of {s["rows"]} x {s["seq"]} tokens, r=8, alpha 16 on {"/".join(s.get("targets", ["all-linear"]))}, AdamW
lr {s["lr"]:g}, the same key, batches and eval rows for every variant:

| init | eval loss before | eval loss after | change |
|---|---|---|---|
{rows}

{verdict}
"""
  else:
    losses = (
      "The eval-loss comparison (`python -m bench.inits`, 30 steps per variant) has not been run "
      "yet: on the shared 2-core CPU of this sitting it did not finish in the time available.\n"
    )
  variants = ",".join(r["variant"] for r in d["results"]) or "loftq"
  return f"""## Inits and LoRA+ on the bundled task

`python -m bench.inits --steps {s["steps"]} --rows {s["rows"]} --seq {s["seq"]} --variants {variants}`
on the embedded SmolLM2-135M (its GGUF's Q4_1 weights, dequantized). {common.machine_line(m)}; load
average at the end {d["loadavg_at_end"][0]} (eval losses don't depend on the load).

{losses}
LoftQ ({s["loftq_iters"]} iterations, rank 8) against plain QLoRA: the reconstruction error
||W - (dequant(Q) + s·A@B)|| / ||W|| against ||W - dequant(Q)|| / ||W|| (nf4, double quantization, blocks
of 64), mean over the 30 layers, and the range of the per-layer ratio (every layer in the JSON):

| module | QLoRA error | LoftQ error | LoftQ / QLoRA per layer |
|---|---|---|---|
{errors}
"""


def dpo_section(r: dict) -> str:
  """bench/dpo.py: one DPO step, jlora vs TRL's DPOTrainer + PEFT."""
  m, j, t = r["machine"], r["results"]["jlora"], r["results"]["trl"]
  step = lambda x: statistics.median(x["times"])
  speed = f"{step(t) / step(j):.2f}x TRL's speed"
  if max(m["loadavg_at_start"][0], m["loadavg_at_end"][0]) > 2:
    speed = "speed not measured (shared CPU; an idle sitting without rematerialisation read 1.39x)"
  return f"""## DPO step: jlora (train.dpo) vs TRL DPOTrainer + PEFT (CPU, fp32)

`python -m bench.dpo --steps {len(j["times"])} --warmup {len(j["warmup_times"])}`: SmolLM2-135M-Instruct, LoRA r=8 all-linear,
{r["pairs"]} pairs of data/prefs_train.jsonl per step, sigmoid loss, the reference = the base with
adapters off on both sides, activation checkpointing on both sides (configs/dpo.py's
`remat_policy="full"`; TRL's default `gradient_checkpointing=True`). Each side in its own process,
one after the other, in one sitting on {m["nproc"]} x {m["cpu"]} (load average
{m["loadavg_at_start"][0]} at the start, {m["loadavg_at_end"][0]} at the end; above 2 means other
jobs shared the CPU and the step times are not valid, only the memory); few timed steps. Peak RSS
is the whole process's (model loading and XLA compilation included). jlora's compiled step
holds {j.get("step_temp_mib", float("nan")):,.0f} MiB of temporaries (XLA's memory analysis;
796 MiB without rematerialisation, when jlora's peak RSS was 1.22x TRL's).

| | median step (s) | steps timed | peak RSS (MiB) |
|---|---|---|---|
| TRL DPOTrainer + PEFT | {step(t):.2f} | {len(t["times"])} | {t["peak_rss_mib"]:,.0f} |
| jlora train.dpo objective | {step(j):.2f} | {len(j["times"])} | {j["peak_rss_mib"]:,.0f} |

jlora: {speed}, {j["peak_rss_mib"] / t["peak_rss_mib"]:.2f}x its peak RSS.
"""


def main() -> None:
  sections = [
    "# Benchmarks\n\nWritten by `python -m bench.report` from the JSON files in `bench/results/`. Each section "
    "names the command that produced its numbers and the machine it ran on. Section 1 and the long-rows "
    "section (with its attention-only table) ran in one sitting, one after the other, on an otherwise idle "
    "machine; the other sections come from earlier sittings, each on the machine its header names.\n",
    vs_peft_section(load("vs_peft.json"), load("flops.json")),
    flops_section(load("flops.json")),
    quant_section(load("quant_table.json")),
    gpu_section(
      load("gpu.json"),
      load("gpu_before_packed_cudnn.json"),
      load("gpu_bf16_adapters.json"),
      load("gpu_attention.json") if (RESULTS / "gpu_attention.json").exists() else None,
    ),
    default_run_section(load("default_run.json")),
    fidelity_section(RESULTS / "fidelity.json"),
  ]
  if (RESULTS / "serve.json").exists():
    sections.append(serve_section(load("serve.json")))
  if (RESULTS / "nnx_vs_qwix.json").exists():
    sections.append(nnx_section(load("nnx_vs_qwix.json")))
  if (RESULTS / "frozen_head.json").exists():
    one = RESULTS / "frozen_head_one_chunk.json"
    sections.append(
      frozen_head_section(load("frozen_head.json"), load(one.name) if one.exists() else None)
    )
  if (RESULTS / "moe.json").exists():
    sections.append(moe_section(load("moe.json")))
  if (RESULTS / "long_context.json").exists():
    rerun = RESULTS / "long_context_2048_steps3.json"
    long_rows = long_context_section(
      load("long_context.json"), load(rerun.name) if rerun.exists() else None
    )
    if (RESULTS / "attention_blocks.json").exists():
      long_rows += "\n" + attention_blocks_section(load("attention_blocks.json"))
    sections.insert(3, long_rows)
  if (RESULTS / "inits.json").exists():
    sections.append(inits_section(load("inits.json")))
  if (RESULTS / "dpo.json").exists():
    sections.append(dpo_section(load("dpo.json")))
  Path("BENCHMARKS.md").write_text("\n".join(sections))
  print("wrote BENCHMARKS.md")


if __name__ == "__main__":
  main()

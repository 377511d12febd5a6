"""Inits that need more than the weights: LoftQ (the quantization) and EVA (data).

  loftq(params, cfg, qcfg, key)              = quantize + apply, the quantized bases and A, B
                                               chosen so dequant(Q) + s*A@B is close to W
  eva(params, cfg, key, run, batches)        = apply with A from the inputs' principal directions

LoftQ (Li et al. 2023, PEFT's init_lora_weights="loftq"): starting from R = W, repeat
`loftq_iters` times: Q = quant(R); (A, B) = the rank-r truncated SVD of W - dequant(Q);
R = W - s*A@B. The last Q is the base. One iteration is "quantize W, then fit its error".

EVA (Paischer et al. 2024, PEFT's init_lora_weights="eva"): each adapted layer's inputs over a
few batches (the chosen tokens only), centred; A's r columns are their top right-singular
vectors (PCA components), B = 0. With eva_rho > 1 the ranks are redistributed: every layer
offers its first round(rho * r) components' explained-variance ratios, the largest
sum(r) of all of them win, and a layer's rank is how many of its own won (PEFT's rule).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import meta

from jlora import config as config_lib
from jlora.config import IN, LoraConfig
from jlora.lora import apply, is_lora, kernel_matrix, top_factors
from jlora.quant import QuantConfig, is_quantized, quantize, quantize_array

# --------------------------------------------------------------------------- LoftQ


def loftq(params, cfg: LoraConfig, qcfg: QuantConfig, key: jax.Array, *, layout=None):
  """`apply(quantize(params, qcfg), cfg)`, except that each adapted quantized kernel starts at
  LoftQ: its base is quant(W - s*A@B) and (A, B) fit what that quantization loses.

  `params` are the full-precision weights. Adapted kernels that `qcfg` does not quantize keep
  the default init (as PEFT's LoftQ leaves non-quantized layers).
  """
  if cfg.init != "loftq":
    raise ValueError(f"loftq: the LoraConfig has init={cfg.init!r}; use init='loftq'.")
  full = _weights_by_path(params)
  adapted = apply(
    quantize(params, qcfg, layout=layout),
    dataclasses.replace(cfg, init="default"),
    key,
    layout=layout,
  )

  def visit(key_path, node):
    if is_lora(node) and is_quantized(node.base):
      return loftq_node(node, full[config_lib.path_str(key_path)], cfg.loftq_iters)
    return node

  return jax.tree_util.tree_map_with_path(visit, adapted, is_leaf=is_lora)


def _weights_by_path(params) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(meta.unbox(params), is_leaf=config_lib.is_opaque)[0]
  return {config_lib.path_str(p): leaf for p, leaf in leaves}


def loftq_node(node, weight, iters: int):
  """The node with LoftQ's base (quantized like node.base) and factors, for full weight W."""
  q = node.base
  requant = lambda x: quantize_array(
    x,
    kind=q.kind,
    block_size=q.block_size,
    double_quant=q.absmax_scale is not None,
    roles=q.roles,
    n_lead=q.n_lead,
    scale_dtype=q.absmax.dtype if q.absmax_scale is None else jnp.float32,
    dtype=q.dtype_name,
  )
  w = jnp.asarray(weight, jnp.float32)
  rank = node.a.shape[-1]
  residual = w
  for i in range(iters):
    base = requant(residual)
    error = w - base.dequantize().astype(jnp.float32)
    a, b = top_factors(*kernel_matrix(error, q.n_lead, q.roles), rank, node.scale, node.a.dtype)
    node = node.replace(base=base, a=a, b=b)
    if i + 1 < iters:
      residual = w - node.delta()
  return node


def reconstruction_error(node, weight) -> float:
  """||W - (dequant(base) + s*A@B)|| / ||W||, over the whole (stacked) kernel."""
  w = jnp.asarray(weight, jnp.float32)
  approx = node.merged().astype(jnp.float32) if is_lora(node) else node.dequantize()
  return float(jnp.linalg.norm(w - approx) / jnp.linalg.norm(w))


# --------------------------------------------------------------------------- EVA


def input_recorder(run: Callable, paths: set[str]) -> Callable:
  """run2(params, batch) -> {module path: [input of each call]}: `run` jitted with the inputs of
  the Dense/DenseGeneral/Einsum layers at `paths` sent to the host. A scanned stack's layer k
  is the k-th call (ordered callbacks keep the order)."""
  sink: dict[str, list[np.ndarray]] = {}

  def keep(path, x):
    sink.setdefault(path, []).append(np.asarray(x, np.float32))

  def recorder(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    if path in paths and context.method_name == "__call__" and args:
      jax.debug.callback(functools.partial(keep, path), args[0], ordered=True)
    return next_fun(*args, **kwargs)

  def traced(params, batch):
    with nn.intercept_methods(recorder):
      return run(params, batch)

  compiled = jax.jit(traced)

  def recorded(params, batch):
    sink.clear()
    jax.block_until_ready(compiled(params, batch))
    jax.effects_barrier()
    return dict(sink)

  return recorded


def principal_directions(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(top-k PCA components [k, in], the explained-variance ratio of each) of rows x [n, in]."""
  centred = x - x.mean(axis=0, keepdims=True)
  _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
  var = s**2
  return vt[:k].astype(np.float32), (var / var.sum())[:k]


def eva_ranks(ratios: dict[Any, np.ndarray], budget: int) -> dict[Any, int]:
  """PEFT's redistribution: the `budget` largest explained-variance ratios over all layers win;
  a layer's rank is how many of its own won (stable order among ties)."""
  entries = [(-float(v), i, key) for i, (key, values) in enumerate(ratios.items()) for v in values]
  winners = [key for _, _, key in sorted(entries, key=lambda e: (e[0], e[1]))[:budget]]
  return {key: winners.count(key) for key in ratios}


def eva(
  params,
  cfg: LoraConfig,
  key: jax.Array,
  run: Callable,
  batches: Iterable,
  *,
  token_mask: Callable | None = None,
  layout=None,
):
  """`apply(params, cfg)` with EVA's A (and ranks, when cfg.eva_rho > 1) from the data.

  run(params, batch) runs the model on one batch (e.g. `lambda p, b: model.apply({'params':
  p}, b['input_ids'])`); token_mask(batch) says which tokens count ([batch, seq] bools, e.g.
  the attention mask and the labelled positions, as PEFT's use_label_mask); default all.
  Kernels must be 2-D per layer ([in, out]; a scanned stack's layers are separate layers).
  Layers that get rank 0 stay unadapted, as PEFT removes them.
  """
  if cfg.init != "eva":
    raise ValueError(f"eva: the LoraConfig has init={cfg.init!r}; use init='eva'.")
  plain = meta.unbox(params)
  targets = config_lib.select(
    plain, cfg.targets, cfg.exclude, field="LoraConfig.targets", layout=layout
  )
  inputs = _layer_inputs(run, plain, batches, set(targets), token_mask)
  components, ratios, budget = {}, {}, 0
  for path in targets:
    for layer, x in enumerate(inputs.get(path, [])):
      rank = cfg.rank_for(path)
      components[path, layer], ratios[path, layer] = principal_directions(
        x, min(round(rank * cfg.eva_rho), *x.shape)
      )
      budget += rank
  ranks = eva_ranks(ratios, budget)
  by_path = {p: {k[1]: r for k, r in ranks.items() if k[0] == p} for p in targets}
  kept = [p for p in targets if max(by_path[p].values(), default=0) > 0]
  patterns = {p: max(by_path[p].values()) for p in kept}
  adapted = apply(
    params,
    dataclasses.replace(
      cfg,
      init="default",
      targets=tuple(kept),
      exclude=None,
      rank_pattern={re.escape(p): r for p, r in patterns.items()},
      alpha_pattern={re.escape(p): cfg.scale_for(p) * r for p, r in patterns.items()},
      use_rslora=False,
    ),
    key,
    layout=layout,
  )
  target_paths = config_lib.target_paths(adapted)

  def visit(key_path, node):
    path = target_paths.get(config_lib.path_str(key_path))
    if not is_lora(node) or path not in by_path:
      return node
    return _with_components(node, path, by_path[path], components)

  return jax.tree_util.tree_map_with_path(visit, adapted, is_leaf=is_lora)


def _layer_inputs(run, params, batches, paths, token_mask) -> dict[str, list[np.ndarray]]:
  """{path: [rows of layer k's inputs, [tokens, in], over all batches]}."""
  per_layer: dict[str, list[list[np.ndarray]]] = {}
  record = input_recorder(run, paths)
  for batch in batches:
    mask = None if token_mask is None else np.asarray(token_mask(batch), bool)
    for path, calls in record(params, batch).items():
      slots = per_layer.setdefault(path, [[] for _ in calls])
      for layer, x in enumerate(calls):
        rows = x.reshape(-1, x.shape[-1])
        slots[layer].append(rows if mask is None else rows[mask.reshape(-1)])
  return {p: [np.concatenate(chunks) for chunks in layers] for p, layers in per_layer.items()}


def _with_components(node, path: str, ranks: dict[int, int], components) -> Any:
  """The node with A's columns = each layer's components (zero-padded to the node's rank), B = 0."""
  if tuple(node.roles) != (IN, "out"):
    raise ValueError(f"eva: {path!r} has kernel roles {node.roles}; EVA needs [in, out] kernels.")
  a = np.zeros(node.a.shape, np.float32)
  stacked = node.a.ndim == 3
  for layer, rank in ranks.items():
    cols = components[path, layer][:rank].T
    if stacked:
      a[layer, :, :rank] = cols
    else:
      a[:, :rank] = cols
  return node.replace(a=jnp.asarray(a, node.a.dtype), b=jnp.zeros_like(node.b))

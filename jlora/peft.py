"""Adapters in Hugging Face PEFT's on-disk format (merged checkpoints: jlora.models.export).

  save_adapter(dir, params, lora_cfg, model_config=...)  -> adapter_config.json + adapter_model.safetensors
  load_adapter(dir, base_params, model_config=...)       -> params with nodes read from a PEFT adapter

Names. jlora's param trees mirror HF module names with '/' for '.', so the HF module
of a flax module path is a rename; the model family's `names.HFNames` (from the registry)
says which HF layer each entry of a scanned stack is:

  model/layers/self_attn/q_proj   (Llama, scanned, leading axis L) -> model.layers.{i}.self_attn.q_proj
  model/layers/layers_1/self_attn/q_proj  (Gemma 2, stacked groups) -> model.layers.{2g+1}.self_attn.q_proj
  model/layers_3/self_attn/q_proj (unrolled)                        -> model.layers.3.self_attn.q_proj
  model/embed_tokens, lm_head                                       -> model.embed_tokens, lm_head

Layout. A flax kernel is [in, out] and a = [in, r], b = [r, out]; torch's Linear is
[out, in], so PEFT's lora_A.weight = a.T [r, in] and lora_B.weight = b.T [out, r].
Embeddings: lora_embedding_A = a.T [r, V], lora_embedding_B = b.T [D, r]. Keys carry the
prefix 'base_model.model.' (PeftModel -> LoraModel -> the HF model).

Scale. PEFT does not store the scale: it recomputes lora_alpha / r (or / sqrt(r) with
use_rslora) per module, looking r and alpha up in rank_pattern / alpha_pattern with
`re.match(rf"(.*\\.)?({key})$", module_name)`, first matching key wins. save_adapter
derives each module's (r, alpha) from the node itself (r from the shapes, alpha from
the node's scale) and writes patterns that make PEFT reproduce exactly those scales;
it checks this by replaying PEFT's lookup before writing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import boxes
from jlora import config as config_lib
from jlora.boxes import EMBEDDING, KERNEL
from jlora.config import BATCH, IN, OUT, LoraConfig
from jlora.errors import UserError, read_json
from jlora.io import host_array, write_json, write_safetensors
from jlora.lora import DoraWeight, LoraWeight, factor_axes, is_lora, is_stacked, weight_norm
from jlora.models import registry
from jlora.models.names import HFNames, is_expert_param, to_torch
from jlora.tokens import TokenRows, is_token_rows, token_node

# PEFT's tensor of trainable token rows ([n, d] values, despite the name), after the module name.
TOKEN_TENSOR = "token_adapter.trainable_tokens_delta"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# vLLM's --max-lora-rank must be one of these; an adapter of another rank is padded or refused.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# transformers' expert modules register these parameters in this order, and PEFT wraps the adapted
# ones in that order: the first is innermost (its keys carry one `.base_layer` per later one).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# PEFT inits that change the base weights: such an adapter is only valid on the modified base.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")
# PEFT's tensor name of each trainable child of a node, by weight kind (torch layout: transposed).
PEFT_TENSOR_NAMES = {
  KERNEL: {"a": "lora_A.weight", "b": "lora_B.weight", "magnitude": "lora_magnitude_vector"},
  EMBEDDING: {"a": "lora_embedding_A", "b": "lora_embedding_B"},
}


# --------------------------------------------------------------------------- names


def _short_name(hf_name: str) -> str:
  return hf_name.rpartition(".")[2]


def peft_pattern_key(pattern_keys, module_name: str) -> str | None:
  """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): first key that matches."""
  for key in pattern_keys:
    if re.match(rf"(.*\.)?({key})$", module_name):
      return key
  return None


def peft_rank_alpha(peft_cfg: Mapping[str, Any], module_name: str) -> tuple[int, float]:
  rank_pattern = peft_cfg.get("rank_pattern") or {}
  alpha_pattern = peft_cfg.get("alpha_pattern") or {}
  r_key = peft_pattern_key(rank_pattern, module_name)
  a_key = peft_pattern_key(alpha_pattern, module_name)
  r = rank_pattern[r_key] if r_key is not None else peft_cfg.get("r", 8)
  alpha = alpha_pattern[a_key] if a_key is not None else peft_cfg.get("lora_alpha", 8)
  return int(r), float(alpha)


def peft_scale(peft_cfg: Mapping[str, Any], module_name: str) -> float:
  r, alpha = peft_rank_alpha(peft_cfg, module_name)
  return alpha / math.sqrt(r) if peft_cfg.get("use_rslora", False) else alpha / r


def peft_targets(peft_cfg: Mapping[str, Any], module_name: str, leaf_name: str = KERNEL) -> bool:
  """PEFT's check_target_module_exists, for the options jlora accepts."""
  exclude = peft_cfg.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, module_name):
        return False
    elif module_name in exclude or any(module_name.endswith("." + k) for k in exclude):
      return False
  parameters = peft_cfg.get("target_parameters") or []
  if any(module_name == t or module_name.endswith("." + t) for t in parameters):
    return True
  targets = peft_cfg.get("target_modules")
  if targets is None:
    return False
  if isinstance(targets, str):
    if targets == "all-linear":
      return leaf_name == KERNEL and _short_name(module_name) not in config_lib.OUTPUT_HEAD_NAMES
    return re.fullmatch(targets, module_name) is not None
  found = module_name in targets or any(module_name.endswith("." + t) for t in targets)
  layers = peft_cfg.get("layers_to_transform")
  if found and layers is not None and layers != []:
    layers = [layers] if isinstance(layers, int) else list(layers)
    pattern = peft_cfg.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    match = None
    if not patterns:
      match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    for p in patterns:
      match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module_name)
      if match:
        break
    found = match is not None and int(match.group("idx")) in layers
  return found


# --------------------------------------------------------------------------- save


def _adapted_modules(params) -> dict[str, LoraWeight]:
  found = {}

  def visit(key_path, leaf):
    if is_lora(leaf):
      found[config_lib.path_str(key_path)] = leaf

  jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_lora)
  return found


def _clean(x: float) -> float | int:
  """alpha recomputed from a float scale: snap to a short decimal so the JSON stays readable."""
  value = float(f"{x:.12g}")
  return int(value) if value.is_integer() else value


@dataclasses.dataclass(frozen=True)
class HFModule:
  """One HF module of an adapted weight (a scanned stack gives one per layer)."""

  path: str  # the flax path of the weight, e.g. model/layers/self_attn/q_proj/kernel
  hf_name: str  # e.g. model.layers.0.self_attn.q_proj
  kind: str  # KERNEL or EMBEDDING
  node: LoraWeight
  layer: int | None  # the index into the node's stacked axis, None when unstacked
  rank: int
  scale: float
  expert: bool = False  # a fused MoE expert parameter: PEFT's target_parameters


def is_linear(roles) -> bool:
  """Weights PEFT writes as a torch Linear: input and output axes only. A weight with several
  (an einsum's [embed, heads, head_dim]) is the Linear over its flattened input and output axes,
  which is how HF lays it out (q_proj [heads * head_dim, embed]), so lora_A is A [*in, r]
  flattened to [in, r] and transposed, lora_B likewise."""
  return set(roles) == {IN, OUT}


def torch_factor(field: str, value: np.ndarray) -> np.ndarray:
  """One layer's factor in torch's Linear layout: a [*in, r] -> [r, in], b [r, *out] -> [out, r],
  magnitude [*out] -> [out]."""
  if field == "a":
    return value.reshape(-1, value.shape[-1]).T
  if field == "b":
    return value.reshape(value.shape[0], -1).T
  return value.reshape(-1)


def hf_modules(params, names: HFNames | None = None) -> list[HFModule]:
  """The HF modules of every adapter in `params`, in path order (names: the family's mapping)."""
  names = names or HFNames()
  modules = []
  targets = config_lib.target_paths(params)
  for full, node in sorted(_adapted_modules(params).items()):
    path, leaf_name = targets[full], full.rpartition("/")[2]
    if is_stacked(node):
      raise ValueError(
        f"{full} holds stacked adapters {list(node.names)}; a PEFT adapter holds one. Save each "
        "adapter's own params (before jlora.stack_adapters)."
      )
    expert = is_expert_param(path) and tuple(node.roles) == (BATCH, IN, OUT)
    if not (is_linear(node.roles) or expert):
      raise ValueError(
        f"{full}: kernel roles {node.roles} have no torch Linear/Embedding equivalent; PEFT "
        "adapters need weights whose axes are inputs and outputs, or MoE experts [E, in, out]."
      )
    n_lead = node.b.ndim - 1 - sum(role != IN for role in node.roles)  # b: lead + r + out/batch
    n_layers = node.a.shape[0] if n_lead else 0
    for layer, hf_name in enumerate(names.module_names(path, n_lead, n_layers)):
      modules.append(
        HFModule(
          path=full,
          hf_name=hf_name,
          kind=boxes.weight_kind(leaf_name),
          node=node,
          layer=layer if n_lead else None,
          rank=int(node.a.shape[-1]),
          scale=float(node.scale),
          expert=expert,
        )
      )
  if not modules:
    raise ValueError(
      "save_adapter: the params hold no LoraWeight nodes (apply jlora.apply or load_adapter first)."
    )
  return modules


def _patterns(entries, cfg: LoraConfig, use_rslora: bool) -> tuple[dict, dict]:
  """rank_pattern / alpha_pattern (PEFT key syntax) that reproduce every module's rank and scale."""
  want = {}
  for e in entries:
    r = e.rank
    alpha = e.scale * (math.sqrt(r) if use_rslora else r)
    if math.isclose(alpha, cfg.alpha, rel_tol=1e-6):
      alpha = cfg.alpha
    want[e.hf_name] = (r, alpha)
  base = {"r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": use_rslora}

  def reproduces(rank_pattern, alpha_pattern) -> bool:
    trial = {**base, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    for name, (r, alpha) in want.items():
      got_r, got_alpha = peft_rank_alpha(trial, name)
      if got_r != r or not math.isclose(got_alpha, alpha, rel_tol=1e-6):
        return False
    return True

  # 1. The user's own patterns, with '/' (jlora's path separator) written as '\.'.
  rank_pattern = {k.replace("/", r"\."): v for k, v in dict(cfg.rank_pattern).items()}
  alpha_pattern = {k.replace("/", r"\."): v for k, v in dict(cfg.alpha_pattern).items()}
  if reproduces(rank_pattern, alpha_pattern):
    return rank_pattern, alpha_pattern

  # 2. Per module type (the last name, e.g. v_proj) where all its modules agree, else per module.
  by_short: dict[str, set] = {}
  for name, value in want.items():
    by_short.setdefault(_short_name(name), set()).add(value)
  rank_pattern, alpha_pattern = {}, {}
  for name, (r, alpha) in sorted(want.items()):
    short = _short_name(name)
    key = short if len(by_short[short]) == 1 else re.escape(name)
    if r != cfg.rank:
      rank_pattern[key] = r
    if alpha != cfg.alpha:
      alpha_pattern[key] = _clean(alpha)
  # Full names go first: PEFT takes the first matching key.
  order = lambda d: dict(sorted(d.items(), key=lambda kv: ("\\" not in kv[0], kv[0])))
  rank_pattern, alpha_pattern = order(rank_pattern), order(alpha_pattern)
  if not reproduces(
    rank_pattern, alpha_pattern
  ):  # pragma: no cover - the construction above is exact
    raise AssertionError(
      "internal error: rank/alpha patterns do not reproduce the adapter's scales"
    )
  return rank_pattern, alpha_pattern


def _target_parameters(entries) -> list[str] | None:
  """PEFT's target_parameters for the expert adapters (e.g. mlp.experts.gate_up_proj)."""
  names = sorted(
    {".".join(e.hf_name.split(".")[-3:]) for e in entries if e.expert}, key=_wrap_order
  )
  return names or None


def _wrap_order(name: str) -> tuple[int, str]:
  short = _short_name(name)
  return (EXPERT_PARAMS.index(short) if short in EXPERT_PARAMS else len(EXPERT_PARAMS), short)


def _expert_key(e: HFModule, entries) -> str:
  """PEFT's key prefix for one expert parameter: the experts module, with one `.base_layer` per
  ParamWrapper that PEFT wrapped around it later (in the module's parameter order)."""
  module = e.hf_name.rpartition(".")[0]
  later = [p for p in _target_parameters(entries) if _wrap_order(p) > _wrap_order(e.hf_name)]
  return module + ".base_layer" * len(later)


def _target_modules(params, entries) -> list[str]:
  """Module names (e.g. q_proj) when they select exactly the adapted modules, else full HF names."""
  entries = [e for e in entries if not e.expert]
  if not entries:
    return []
  targets = config_lib.target_paths(params)
  adapted = {targets[e.path] for e in entries}
  shorts = sorted({_short_name(e.hf_name) for e in entries})
  candidates = {p for p in config_lib.candidate_leaves(params) if p.rpartition("/")[2] in shorts}
  if candidates == adapted:
    return shorts
  return sorted({e.hf_name for e in entries})


def peft_config_from_lora(
  cfg: LoraConfig, params, base_model_name_or_path: str | None = None, *, model_config=None
) -> dict:
  """The adapter_config.json content for the adapters in `params` (trained with `cfg`).

  model_config: the jlora model config (or HF config dict) naming the HF layer of each scanned
  stack entry; None is Llama's layout (a `layers` stack holds HF layers 0..n-1)."""
  entries = hf_modules(params, registry.hf_names(model_config))
  rank_pattern, alpha_pattern = _patterns(entries, cfg, bool(cfg.use_rslora))
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "r": cfg.rank,
    "lora_alpha": cfg.alpha,
    "lora_dropout": cfg.dropout,
    "use_rslora": bool(cfg.use_rslora),
    "target_modules": _target_modules(params, entries),
    "target_parameters": _target_parameters(entries),
    "rank_pattern": rank_pattern,
    "alpha_pattern": alpha_pattern,
    "bias": "none",
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "modules_to_save": None,
    "use_dora": _uses_dora(entries),
    "inference_mode": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "trainable_token_indices": _token_indices_entry(_token_nodes(params, model_config)),
  }


def _token_nodes(params, model_config=None) -> dict[str, tuple[str, TokenRows]]:
  """{HF module name: (flax path, TokenRows)} of the params' trainable token rows."""
  names = registry.hf_names(model_config)
  found = {}

  def visit(key_path, leaf):
    if is_token_rows(leaf):
      path = config_lib.path_str(key_path)
      found[names.module_names(path.rpartition("/")[0], 0, 0)[0]] = (path, leaf)

  jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_token_rows)
  return found


def _token_indices_entry(token_nodes) -> list[int] | dict[str, list[int]] | None:
  """PEFT's trainable_token_indices: a list for the input embedding alone, else a dict."""
  if not token_nodes:
    return None
  by_short = {_short_name(hf): list(node.indices) for hf, (_, node) in token_nodes.items()}
  if list(by_short) == ["embed_tokens"]:
    return by_short["embed_tokens"]
  return by_short


def _token_tensors(token_nodes) -> dict[str, np.ndarray]:
  return {
    f"{KEY_PREFIX}{hf}.{TOKEN_TENSOR}": host_array(node.rows, f"{path} (rows)")
    for hf, (path, node) in token_nodes.items()
  }


def _uses_dora(entries: list[HFModule]) -> bool:
  kinds = {isinstance(e.node, DoraWeight) for e in entries}
  if len(kinds) > 1:
    dora = sorted({e.path for e in entries if isinstance(e.node, DoraWeight)})
    raise ValueError(
      f"save_adapter: only some weights use DoRA ({dora}); a PEFT adapter has one use_dora for "
      "all modules. Adapt every target with DoRA, or none."
    )
  return kinds == {True}


def _check_tied_embedding(params, entries: list[HFModule]) -> None:
  paths = set(config_lib.candidate_leaves(params))
  for e in entries:
    if e.kind == EMBEDDING and _short_name(e.hf_name) == "embed_tokens" and "lm_head" not in paths:
      raise ValueError(
        f"{e.path} is adapted and the output head is tied to it. jlora applies the embedding "
        "adapter to the tied head too, but PEFT (and vLLM) apply it to the input lookup only, so "
        "the adapter would load with different outputs. Exclude embed_tokens, or use export_merged."
      )


def _peft_tensors(entries: list[HFModule]) -> dict[str, np.ndarray]:
  """Every trainable child of every module under its PEFT name, in torch layout (transposed)."""
  tensors, gathered = {}, {}
  for e in entries:
    names = PEFT_TENSOR_NAMES[e.kind]
    for field in e.node.trainable_fields:
      if field not in names:
        raise ValueError(
          f"{e.path}: PEFT has no tensor for its trainable field {field!r} on a {e.kind}."
        )
      if (e.path, field) not in gathered:
        gathered[e.path, field] = host_array(getattr(e.node, field), f"{e.path} ({field})")
      value = gathered[e.path, field]
      value = value[e.layer] if e.layer is not None else value
      if e.expert:
        tensors[f"{KEY_PREFIX}{_expert_key(e, entries)}.{names[field]}"] = _peft_expert(
          field, value
        )
      else:
        tensors[f"{KEY_PREFIX}{e.hf_name}.{names[field]}"] = torch_factor(field, value)
  return tensors


def _peft_expert(field: str, value: np.ndarray) -> np.ndarray:
  """An expert factor in PEFT's ParamWrapper layout: lora_A [E*r, in] (row e*r + j) from a
  [E, in, r]; lora_B [out, r*E] (column j*E + e) from b [E, r, out]."""
  if field == "a":
    return value.transpose(0, 2, 1).reshape(-1, value.shape[1])
  if field == "b":
    return value.transpose(2, 1, 0).reshape(value.shape[2], -1)
  raise ValueError(f"PEFT's target_parameters adapters have no {field!r} (DoRA is not supported).")


def _warn_for_vllm(entries: list[HFModule], dora: bool) -> None:
  bad = sorted({e.rank for e in entries} - set(VLLM_RANKS))
  if bad:
    warnings.warn(
      f"save_adapter: rank(s) {bad} are not in vLLM's supported list {list(VLLM_RANKS)}; vLLM "
      "needs --max-lora-rank set to one of those (at least the adapter's rank) to serve it.",
      stacklevel=3,
    )
  if dora:
    warnings.warn(
      "save_adapter: this is a DoRA adapter (use_dora=true). PEFT and transformers load it, but "
      "vLLM does not serve DoRA adapters; to serve it with vLLM, export a merged model instead "
      "(export_merged).",
      stacklevel=3,
    )


def save_adapter(
  directory,
  params,
  lora_cfg: LoraConfig,
  base_model_name_or_path: str | None = None,
  *,
  model_config=None,
) -> Path:
  """Writes the adapters in `params` as a PEFT LoRA adapter (loadable by PEFT, transformers and vLLM).

  model_config: the model's config (`model.config`), which names the HF layer of every scanned
  stack entry through the registry; it may be omitted for Llama-family models. An NNX model whose
  module paths are not HF's passes its name map instead (`jlora.models.names.HFNames(renames=...)`).

  Every trainable child is written (a/b unscaled, PEFT recomputes the scale from
  r/lora_alpha and the patterns; DoRA's magnitude as lora_magnitude_vector). Scanned
  stacks are unstacked into per-layer modules. Sharded arrays are gathered; arrays
  spread over several processes are refused.
  """
  if lora_cfg.init == "pissa":
    raise ValueError(
      "save_adapter: a PiSSA adapter (init='pissa') is relative to a residual base that jlora "
      "modified, so PEFT would apply it to the wrong weights. Use export_merged instead."
    )
  params = boxes.unbox_tree(params)
  entries = hf_modules(params, registry.hf_names(model_config))
  _check_tied_embedding(params, entries)
  peft_cfg = peft_config_from_lora(
    lora_cfg, params, base_model_name_or_path, model_config=model_config
  )
  tensors = {**_peft_tensors(entries), **_token_tensors(_token_nodes(params, model_config))}
  _warn_for_vllm(entries, peft_cfg["use_dora"])
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_safetensors(directory / ADAPTER_WEIGHTS, tensors)
  write_json(directory / ADAPTER_CONFIG, peft_cfg)
  return directory


# --------------------------------------------------------------------------- load


def read_peft_config(directory) -> dict:
  """adapter_config.json, after refusing what jlora can't represent faithfully."""
  directory = Path(directory)
  config_file = directory / ADAPTER_CONFIG
  if not config_file.is_file():
    raise FileNotFoundError(
      f"{directory} has no {ADAPTER_CONFIG}; a PEFT adapter dir holds {ADAPTER_CONFIG} "
      f"and {ADAPTER_WEIGHTS}."
    )
  cfg = read_json(config_file)
  if not isinstance(cfg, dict):
    raise UserError(f"{config_file} holds a JSON {type(cfg).__name__}; expected an object.")
  check_peft_config(cfg)
  return cfg


def check_peft_config(cfg: Mapping[str, Any]) -> None:
  problems = []
  if cfg.get("peft_type", "LORA") != "LORA":
    problems.append(f"peft_type={cfg.get('peft_type')!r} (only LORA adapters are supported)")
  if cfg.get("modules_to_save"):
    problems.append(
      f"modules_to_save={cfg['modules_to_save']!r} (fully trained module copies are not LoRA)"
    )
  if cfg.get("bias", "none") != "none":
    problems.append(f"bias={cfg['bias']!r} (trained biases are not supported; only bias='none')")
  if cfg.get("fan_in_fan_out"):
    problems.append("fan_in_fan_out=true (Conv1D-style GPT-2 weights are not supported)")
  init = cfg.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().split("_")[0] in _BASE_MODIFYING_INITS:
    problems.append(
      f"init_lora_weights={init!r} (this init changes the base weights; convert the adapter to a "
      "plain LoRA with PEFT's path_initial_model_for_weight_conversion first)"
    )
  for field in ("lora_bias", "use_qalora"):
    if cfg.get(field):
      problems.append(f"{field}=true")
  for field in (
    "layer_replication",
    "alora_invocation_tokens",
  ):
    if cfg.get(field):
      problems.append(f"{field}={cfg[field]!r}")
  if problems:
    raise ValueError(
      "This PEFT adapter uses features jlora does not support: " + "; ".join(problems) + "."
    )


def _base_modules(
  base_params, layout, hf_names: HFNames | None = None
) -> dict[str, tuple[str, str, int | None, Any]]:
  """HF module name -> (flax weight path, leaf name, layer index or None, per-layer roles) for
  every adaptable weight."""
  hf_names = hf_names or HFNames()
  out = {}
  full_paths = {target: full for full, target in config_lib.target_paths(base_params).items()}
  for path, (leaf_name, leaf) in config_lib.candidate_leaves(base_params).items():
    names = boxes.axis_names(leaf)
    shape = tuple(boxes.unboxed(leaf).shape)
    try:
      n_lead, roles = config_lib.kernel_roles(path, leaf_name, shape, layout, names)
    except ValueError:
      # A 3-D weight in a 'layers' stack: PEFT files name each layer's 2-D weight, so the stacked
      # axis is the layer index in the file's keys; shapes are checked against the file below.
      if len(shape) == 3 and hf_names.stack_of(path) is not None:
        n_lead, roles = 1, (IN, OUT)
      else:
        continue
    expert = tuple(roles) == (BATCH, IN, OUT) and is_expert_param(path)
    if not (is_linear(roles) or expert) or n_lead > 1:
      continue
    for layer, hf in enumerate(hf_names.module_names(path, n_lead, shape[0] if n_lead else 0)):
      out[hf] = (full_paths[path], leaf_name, layer if n_lead else None, tuple(roles))
  return out


def _read_adapter_tensors(directory: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  weights = directory / ADAPTER_WEIGHTS
  if not weights.is_file():
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(
      p.name for p in directory.glob("*.pt")
    )
    if pickles:
      raise ValueError(
        f"{directory} holds only pickled weights ({', '.join(pickles)}); jlora never loads pickles "
        f"(they can run code). Convert the adapter to {ADAPTER_WEIGHTS} (e.g. load it in PEFT and "
        "save_pretrained(..., safe_serialization=True))."
      )
    raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS}.")
  try:
    return load_file(str(weights))
  except Exception as e:  # safetensors reports a bad header or short data as its own error types
    raise UserError(
      f"{weights} is not a readable safetensors file ({weights.stat().st_size:,} bytes; "
      f"{type(e).__name__}: {e}); it may be truncated or corrupted: save the adapter again."
    ) from e


@dataclasses.dataclass
class PeftModule:
  """The tensors of one HF module in a PEFT file, by jlora field name, in jlora layout."""

  kind: str  # KERNEL or EMBEDDING
  fields: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _field_of(name: str) -> tuple[str, str, str] | None:
  """(module, kind, field) of a PEFT tensor name (prefix removed), None if it is no adapter field."""
  for kind, names in PEFT_TENSOR_NAMES.items():
    for field, suffix in names.items():
      if name.endswith("." + suffix):
        return name[: -len(suffix) - 1], kind, field
  return None


def _module_tensors(
  tensors: Mapping[str, np.ndarray],
) -> tuple[dict[str, PeftModule], dict[str, np.ndarray]]:
  """({hf module name: PeftModule}, {hf module name: saved base weight}).

  PEFT saves the whole base weight of an adapted embedding next to its factors
  (save_embedding_layers, for resized vocabularies): those come back separately.
  """
  modules: dict[str, PeftModule] = {}
  base_copies: dict[str, np.ndarray] = {}
  unknown = []
  for key, value in tensors.items():
    name = key.removeprefix(KEY_PREFIX)
    if name.endswith("." + TOKEN_TENSOR):  # read by _token_rows
      continue
    if name.endswith(".base_layer.weight"):
      base_copies[name.removesuffix(".base_layer.weight")] = value
      continue
    found = _field_of(name)
    if found is None:
      unknown.append(key)
      continue
    module, kind, field = found
    entry = modules.setdefault(module, PeftModule(kind))
    if entry.kind != kind:  # e.g. lora_embedding_A next to lora_magnitude_vector
      raise ValueError(
        f"{module}: the adapter holds a DoRA magnitude for an embedding; jlora supports DoRA on "
        "linear layers only."
      )
    value = np.asarray(value)  # torch layout -> flax layout (a DoRA magnitude is 1-D)
    entry.fields[field] = to_torch(value) if value.ndim > 1 else value
  if unknown:
    raise ValueError(
      f"The adapter holds tensors that are not LoRA A/B factors or DoRA magnitudes (e.g. biases "
      f"or saved modules): {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
    )
  return modules, base_copies


def _leaf_at(params, full: str):
  node = params
  for part in full.split("/"):
    node = node[part]
  return boxes.unboxed(node)


def _check_base_copies(base_copies, index, base_params) -> None:
  """A saved base weight is accepted only if it is the base we load onto (no resized vocabulary)."""
  for hf, saved in sorted(base_copies.items()):
    if hf not in index:
      raise ValueError(
        f"The adapter saves a base weight for {hf}, which maps onto no weight in base_params."
      )
    full, leaf_name, layer, _ = index[hf]
    base = np.asarray(_leaf_at(base_params, full), np.float32)
    base = base[layer] if layer is not None else base
    saved = np.asarray(saved, np.float32)
    saved = saved.T if boxes.weight_kind(leaf_name) == KERNEL else saved
    if saved.shape != base.shape or not np.allclose(saved, base, rtol=1e-3, atol=1e-5):
      raise ValueError(
        f"The adapter replaces the base weight of {hf} (saved {saved.shape}, base {base.shape}), e.g. after "
        "resizing the vocabulary. jlora loads LoRA factors only; load that weight into the base params first."
      )


@dataclasses.dataclass
class LayerFactors:
  """One HF module's trainable fields in flax layout (a [in, r], b [r, out], magnitude [out])."""

  hf_name: str
  fields: dict[str, np.ndarray]
  scale: float


def _expert_tensors(peft_cfg, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """PEFT's target_parameters tensors renamed to their parameter (`...experts.gate_up_proj.lora_A
  .weight`) and laid out per expert in torch's layout (lora_A [E, r, in], lora_B [E, out, r]);
  other tensors unchanged. The nesting of `.base_layer`s says which parameter a key is (_expert_key)."""
  parameters = sorted(peft_cfg.get("target_parameters") or [], key=_wrap_order)
  if not parameters:
    return tensors
  out = {}
  for key, value in tensors.items():
    module, _, field = key.removeprefix(KEY_PREFIX).partition(".lora_")
    depth = 0
    while module.endswith(".base_layer"):
      module, depth = module.removesuffix(".base_layer"), depth + 1
    wrapped = [p for p in parameters if f"{module}.{_short_name(p)}".endswith(p)]
    if not field or not wrapped or depth >= len(wrapped):
      out[key] = value
      continue
    name = f"{KEY_PREFIX}{module}.{_short_name(wrapped[len(wrapped) - 1 - depth])}.lora_{field}"
    r, _ = peft_rank_alpha(peft_cfg, name.removeprefix(KEY_PREFIX).partition(".lora_")[0])
    value = np.asarray(value)
    if field.startswith("A"):  # [E*r, in], row e*r + j
      out[name] = value.reshape(-1, r, value.shape[-1])
    else:  # [out, r*E], column j*E + e
      out[name] = value.reshape(value.shape[0], r, -1).transpose(2, 0, 1)
  return out


def _read(directory: Path):
  """read: (PEFT config, {hf name: PeftModule}, {hf name: saved base weight}, {hf name: token rows})."""
  peft_cfg = read_peft_config(directory)
  tensors = _expert_tensors(peft_cfg, _read_adapter_tensors(directory))
  modules, base_copies = _module_tensors(tensors)
  suffix = "." + TOKEN_TENSOR
  token_rows = {
    k.removeprefix(KEY_PREFIX).removesuffix(suffix): np.asarray(v)
    for k, v in tensors.items()
    if k.endswith(suffix)
  }
  return peft_cfg, modules, base_copies, token_rows


def _token_nodes_from_peft(peft_cfg, token_rows, index) -> dict[str, dict]:
  """{flax weight path: TokenRows fields} for PEFT's trainable_token_indices and its tensors."""
  spec = peft_cfg.get("trainable_token_indices")
  if spec is None and not token_rows:
    return {}
  by_short = spec if isinstance(spec, dict) else {"embed_tokens": spec}
  out = {}
  for hf, rows in sorted(token_rows.items()):
    indices = by_short.get(_short_name(hf))
    if hf not in index or indices is None:
      raise ValueError(
        f"The adapter holds trainable token rows for {hf}, which trainable_token_indices="
        f"{spec!r} does not name or base_params does not have."
      )
    full, _, layer, _ = index[hf]
    if rows.shape[0] != len(indices) or layer is not None:
      raise ValueError(
        f"{hf}: trainable token rows {rows.shape} do not match trainable_token_indices "
        f"{list(indices)}."
      )
    out[full] = {"rows": rows, "indices": tuple(int(i) for i in indices)}
  missing = sorted(set(by_short) - {_short_name(hf) for hf in token_rows})
  if missing:
    raise ValueError(
      f"trainable_token_indices names {missing}, but the adapter has no rows for it."
    )
  return out


def _validate(peft_cfg, modules: Mapping[str, PeftModule], index) -> None:
  """validate: every module maps onto a weight of the right kind, is targeted, and is complete."""
  unmatched = sorted(m for m in modules if m not in index)
  if unmatched:
    raise ValueError(
      f"Adapter modules that map onto no weight in base_params: {unmatched}. (Module names like "
      f"{sorted(index)[:4]} are available.) Is it an adapter for another architecture?"
    )
  untargeted = sorted(m for m in modules if not peft_targets(peft_cfg, m, modules[m].kind))
  if untargeted:
    raise ValueError(
      f"The adapter holds weights for modules its target_modules do not select (PEFT would "
      f"ignore them): {untargeted}"
    )
  heads = {hf for hf in index if _short_name(hf) == "lm_head"}
  dora = bool(peft_cfg.get("use_dora"))
  for hf, module in modules.items():
    if module.kind == EMBEDDING and _short_name(hf) == "embed_tokens" and not heads:
      raise ValueError(
        f"The adapter adapts {hf}, and this model's output head is tied to it. PEFT applies the "
        "embedding adapter to the input lookup only, but jlora would apply it to the tied head "
        "too, so the outputs would differ. Load it onto an untied model, or merge it with PEFT first."
      )
    if "a" not in module.fields or "b" not in module.fields:
      raise ValueError(f"The adapter has only one of lora_A/lora_B for {hf}.")
    if dora and module.kind == EMBEDDING:
      raise ValueError(
        f"{hf}: use_dora=true on an embedding; jlora supports DoRA on linear layers only."
      )
    if dora != ("magnitude" in module.fields):
      raise ValueError(
        f"{hf}: use_dora={str(dora).lower()} in adapter_config.json, but the module "
        f"{'lacks' if dora else 'holds'} a lora_magnitude_vector."
      )
    leaf_name = index[hf][1]
    if (module.kind == EMBEDDING) != (leaf_name == EMBEDDING):
      raise ValueError(
        f"{hf}: the adapter treats it as "
        f"{'an embedding' if module.kind == EMBEDDING else 'a linear layer'}, but base_params has "
        f"a {leaf_name!r} there."
      )
    a, b = module.fields["a"], module.fields["b"]
    r, _ = peft_rank_alpha(peft_cfg, hf)
    if a.shape[-1] != r or b.shape[-2] != r:
      raise ValueError(
        f"{hf}: lora_A {a.T.shape} / lora_B {b.T.shape} have rank {a.shape[-1]}, but "
        f"adapter_config.json gives r={r} for this module."
      )


def _group(peft_cfg, modules: Mapping[str, PeftModule], index) -> dict[str, dict]:
  """{flax weight path: {layer or None: LayerFactors}}."""
  grouped: dict[str, dict] = {}
  for hf, module in modules.items():
    full, _, layer, _ = index[hf]
    grouped.setdefault(full, {})[layer] = LayerFactors(hf, module.fields, peft_scale(peft_cfg, hf))
  return grouped


def _restack(per_layer: dict) -> dict:
  """restack: one rank and one scale for the layers of a scanned stack, each layer kept exact.

  Layers with a smaller rank are zero-padded (the padding stays zero under training: its
  gradients are zero), and a layer's own scale is folded into its B (s*A@B is unchanged, so
  DoRA's W + s*A@B and its norm are too).
  """
  if None in per_layer:
    return per_layer
  rank = max(f.fields["a"].shape[-1] for f in per_layer.values())
  scales = [f.scale for f in per_layer.values()]
  common = max(set(scales), key=scales.count)
  fixed = {}
  for layer, f in per_layer.items():
    pad = rank - f.fields["a"].shape[-1]
    batch = ((0, 0),) * (f.fields["a"].ndim - 2)  # MoE experts: a [E, in, r], b [E, r, out]
    a = np.pad(f.fields["a"], (*batch, (0, 0), (0, pad)))
    b = np.pad(f.fields["b"], (*batch, (0, pad), (0, 0))) * np.asarray(
      f.scale / common, f.fields["b"].dtype
    )
    fixed[layer] = LayerFactors(f.hf_name, {**f.fields, "a": a, "b": b}, common)
  return fixed


def _node_layout(full: str, fields: dict, kernel_shape: tuple, roles: tuple) -> dict:
  """One layer's factors from the file ([in, r], [r, out], [out]; experts [E, ...]) in the node's
  layout for a kernel of `kernel_shape` whose axes have `roles` (flattened axes unflattened)."""
  r = fields["a"].shape[-1]
  a_shape, b_shape = factor_axes(kernel_shape, roles, r)
  sizes = lambda role: [n for n, kind in zip(kernel_shape, roles) if kind == role]
  batch, n_in, n_out = sizes(BATCH), math.prod(sizes(IN)), math.prod(sizes(OUT))
  in_file = {"a": (*batch, n_in, r), "b": (*batch, r, n_out), "magnitude": (*batch, n_out)}
  want = {"a": a_shape, "b": b_shape, "magnitude": [*batch, *sizes(OUT)]}
  if any(tuple(fields[k].shape) != in_file[k] for k in fields):
    implied = (*fields["a"].shape[:-1], *fields["b"].shape[-1:])
    raise ValueError(
      f"{full}: the adapter's factors imply a weight of shape {implied}, but base_params has "
      f"{tuple(kernel_shape)} per layer."
    )
  return {k: v.reshape(want[k]) for k, v in fields.items()}


def _build_node(full: str, value, per_layer: dict, dtype, dropout: float, roles) -> LoraWeight:
  """build: the node for one weight (per-layer `roles`); layers a stack's adapter skips get zero
  factors (DoRA: m = ||W||)."""
  first = next(iter(per_layer.values()))
  kernel_shape = tuple(value.shape)[value.ndim - len(roles) :]
  shaped = {k: _node_layout(full, f.fields, kernel_shape, roles) for k, f in per_layer.items()}
  if None in per_layer:
    fields = shaped[None]
  else:
    fields = {}
    for name, like in shaped[next(iter(shaped))].items():
      stacked = np.zeros((value.shape[0], *like.shape), like.dtype)
      for layer, layer_fields in shaped.items():
        stacked[layer] = layer_fields[name]
      fields[name] = stacked
  node = LoraWeight(
    base=value,
    a=jnp.asarray(fields["a"], dtype),
    b=jnp.asarray(fields["b"], dtype),
    scale=float(first.scale),
    roles=tuple(roles),
    dropout=dropout,
  )
  if "magnitude" not in fields:
    return node
  magnitude = fields["magnitude"]
  if None not in per_layer and len(per_layer) < value.shape[0]:
    skipped = [i for i in range(value.shape[0]) if i not in per_layer]
    magnitude[skipped] = np.asarray(weight_norm(node))[skipped]  # B = 0 there: m = ||W||
  return DoraWeight(
    **{f.name: getattr(node, f.name) for f in dataclasses.fields(node)},
    magnitude=jnp.asarray(magnitude, dtype),
  )


def load_adapter(
  directory,
  base_params,
  *,
  layout: config_lib.Layout | None = None,
  dtype=jnp.float32,
  return_config: bool = False,
  model_config=None,
):
  """Reads a PEFT LoRA (or DoRA) adapter onto `base_params`: adapted weights become nodes.

  The scale of every module follows PEFT (lora_alpha/r or /sqrt(r), rank_pattern and
  alpha_pattern by PEFT's matching on HF module names). Layers of a scanned stack are
  restacked: layers the adapter skips (layers_to_transform) get zero factors, layers of
  smaller rank are zero-padded to the stack's largest, and a layer whose scale differs
  from the stack's has the ratio folded into its B (each layer's W_eff stays exact).
  With return_config=True, returns (params, LoraConfig) with the adapted module paths
  spelled out exactly. model_config: as for `save_adapter`.
  """
  peft_cfg, modules, base_copies, token_rows = _read(Path(directory))
  index = _base_modules(base_params, layout, registry.hf_names(model_config))
  tokens = _token_nodes_from_peft(peft_cfg, token_rows, index)
  _check_base_copies(base_copies, index, base_params)
  _validate(peft_cfg, modules, index)
  nodes = {
    full: _restack(per_layer) for full, per_layer in _group(peft_cfg, modules, index).items()
  }
  roles = {full: layer_roles for full, _, _, layer_roles in index.values()}
  for e in sorted(m for m in index if m not in modules and peft_targets(peft_cfg, m, index[m][1])):
    warnings.warn(
      f"load_adapter: {e} is selected by target_modules but the adapter has no weights for it; "
      "it stays unadapted (as PEFT's zero-initialised B would leave it).",
      stacklevel=2,
    )
  dropout = float(peft_cfg.get("lora_dropout", 0.0) or 0.0)

  def build(key_path, leaf):
    full = config_lib.path_str(key_path)
    value = boxes.unboxed(leaf)
    if full in tokens:
      node = token_node(
        full.rpartition("/")[0], full.rpartition("/")[2], value, tokens[full]["indices"]
      )
      return boxes.reboxed(
        leaf, node.replace(rows=jnp.asarray(tokens[full]["rows"], node.rows.dtype))
      )
    new = (
      _build_node(full, value, nodes[full], dtype, dropout, roles[full]) if full in nodes else value
    )
    return boxes.reboxed(leaf, new)

  params = jax.tree_util.tree_map_with_path(build, base_params, is_leaf=config_lib.is_opaque)
  if not return_config:
    return params
  return params, lora_config_from_peft(peft_cfg, params, dtype)


def lora_config_from_peft(peft_cfg: Mapping[str, Any], params, dtype=jnp.float32) -> LoraConfig:
  """The LoraConfig of a PEFT adapter loaded into `params`: its module paths spelled out, and
  rank/alpha patterns that give every node its rank and scale (the one PEFT -> jlora translation)."""
  rank, alpha, rslora = (
    int(peft_cfg.get("r", 8)),
    float(peft_cfg.get("lora_alpha", 8)),
    bool(peft_cfg.get("use_rslora")),
  )
  rank_pattern, alpha_pattern = {}, {}
  targets = config_lib.target_paths(params)
  adapted = {targets[full]: node for full, node in _adapted_modules(params).items()}
  for path, node in sorted(adapted.items()):
    r = int(node.a.shape[-1])
    a = node.scale * (math.sqrt(r) if rslora else r)
    if r != rank:
      rank_pattern[re.escape(path)] = r
    if not math.isclose(a, alpha, rel_tol=1e-9):
      alpha_pattern[re.escape(path)] = _clean(a)
  return LoraConfig(
    rank=rank,
    alpha=alpha,
    targets=tuple(sorted(adapted)),
    dropout=float(peft_cfg.get("lora_dropout", 0.0) or 0.0),
    use_rslora=rslora,
    use_dora=bool(peft_cfg.get("use_dora")),
    rank_pattern=rank_pattern,
    alpha_pattern=alpha_pattern,
    dtype=dtype,
    trainable_token_indices=_token_indices_by_path(params),
  )


def _token_indices_by_path(params) -> dict[str, list[int]] | None:
  found = {
    config_lib.path_str(p).rpartition("/")[0]: list(leaf.indices)
    for p, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_token_rows)[0]
    if is_token_rows(leaf)
  }
  return found or None

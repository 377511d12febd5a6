"""An NNX model from the user's factory: the one loader behind train.sft's `config.model.nnx` and
the `--nnx` flag of train.generate and train.serve.

    spec = "package.module:factory"   # factory(path) -> nnx.Module, or (nnx.Module, tokenizer)

The model is seen through `jlora.models.nnx_causal.NnxCausalLM` (its contract: `model(input_ids,
positions, segment_ids) -> logits`), so every later stage runs it as it runs a linen family.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from jlora import sharding as shard_lib
from jlora.models.llama import DEFAULT_RULES
from jlora.models.loading import load_tokenizer, resolve_checkpoint
from jlora.models.nnx_causal import (
  NnxCausalLM,
  check_split_head,
  declared_names,
  family_config,
  splits_head,
  traced_layout,
)
from train import distributed
from train.errors import UserError, naming
from train.generate import MODEL_ERRORS

# What importing and calling a user's factory may raise, on top of reading a model path.
FACTORY_ERRORS = (*MODEL_ERRORS, ImportError, AttributeError)


def load(spec, path, what: str, path_what: str, mesh=None):
  """(NnxCausalLM, its nnx.State, tokenizer): factory(path) for spec = "package.module:factory".
  Without a tokenizer from the factory it is read from `path`. With a mesh, the state is placed
  on it by its sharding metadata, read through the rules the model declares as `sharding_rules`
  ((metadata name, mesh axis or None), ...), else jlora's Llama rules (logical names: embed, mlp,
  q_heads, ...; the mesh's axes are data, fsdp, tensor, expert). `what` / `path_what` name the setting
  and the path in errors (train.sft's config fields, the CLIs' flags)."""
  with naming(what, FACTORY_ERRORS):
    made = import_factory(spec)(path)
  model, tokenizer = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
  if not isinstance(model, nnx.Module):
    raise UserError(
      f"{what}: the factory returned {type(model).__name__}; expected an nnx.Module or "
      "(nnx.Module, tokenizer)."
    )
  if tokenizer is None:
    with naming(f"{path_what} (the tokenizer of {spec!r})", MODEL_ERRORS):
      tokenizer = load_tokenizer(Path(distributed.main_first(lambda: resolve_checkpoint(path))))
  family = family_config(model)
  with naming(f"{what} (the model's hf_names)", (TypeError,)):
    hf_names = declared_names(model)
  graphdef, state = nnx.split(model)
  with naming(
    f"{what} (the model called as model(input_ids, positions, segment_ids))", FACTORY_ERRORS
  ):
    layout = traced_layout(graphdef, state)
  split_head = splits_head(model)
  if split_head:
    with naming(f"{what} (the model's hidden_states and head)", FACTORY_ERRORS):
      check_split_head(graphdef, state)
  if mesh is not None:
    rules = getattr(model, "sharding_rules", None) or DEFAULT_RULES
    with naming(f"{what} (placed by the model's sharding metadata)", (TypeError, ValueError)):
      specs = shard_lib.logical_specs(state, rules)
      state = jax.device_put(state, shard_lib.named(mesh, specs))
  return NnxCausalLM(graphdef, family, layout, hf_names, split_head), state, tokenizer


def import_factory(spec) -> Callable:
  module_name, _, name = str(spec).partition(":")
  if not module_name or not name:
    raise ValueError("expected 'package.module:factory' (a function of the model path).")
  factory = getattr(importlib.import_module(module_name), name)
  if not callable(factory):
    raise TypeError(
      f"{name} in {module_name} is not a function (its type is {type(factory).__name__})."
    )
  return factory

"""An NNX causal LM seen through `protocol.CausalLM`, so the trainer, its evaluator and generation
run it as they run a family's linen module.

The NNX model (any `nnx.Module`, unmodified) needs one method:

    model(input_ids, positions, segment_ids) -> logits [batch, seq, vocab]

where a query attends to keys of its own segment only (segment 0 is padding; packed rows hold
several segments). `NnxCausalLM.apply` runs it through `jlora.wrap(graphdef)`, so params that
hold LoRA / quantized nodes take the low-rank path. What the protocol adds on top:

  * `return_hidden` / `logits`: a model that also defines the two halves of its call,

        model.hidden_states(input_ids, positions, segment_ids) -> [batch, seq, d]
        model.head(hidden) -> logits

    (`splits_head`) hands the trainer its final hidden states, and the trainer runs the head
    only at labelled positions, with its gradient taken in the forward (train/step.py), as for
    a linen family. Otherwise the "hidden states" are the logits and `logits` is the identity
    (the trainer then holds [rows, labels, vocab] logits, not [rows, labels, d]).
  * `init_cache` / `cache=`: the model has no KV cache, so the cache is the token buffer and
    each decode step re-runs the whole buffer (quadratic in length; meant for eval samples and
    small models). The buffer takes the KV cache's layout (`jlora.models.llama.init_cache`): "k"
    holds each column's (token id, position) as [batch, max_len, 1, 2], beside the cache's
    segment_ids and index, so code that moves a KV cache's rows and columns (train.serve's
    engine) moves the buffer the same way.

`config` is the model's family config when the model declares one (`model.config` is an HF
config dict, a transformers config, or has `to_hf_dict()`, with a registered `model_type`):
PEFT names, merged and GGUF exports then go through the registry as for linen. Otherwise it is
None and only the PEFT adapter is written, its HF module names taken from the module paths, or
from the name map the model declares as `model.hf_names` (a `jlora.models.names.HFNames` with
`renames`: examples/tunix_llama.py maps tunix's `llama.layers.{i}.attn.q_proj` to HF's
`model.layers.{i}.self_attn.q_proj`, so PEFT loads the adapter on transformers' Llama).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora import nnx_forward
from jlora.models import registry
from jlora.models.names import HFNames

# The token buffer's "k" column [batch, max_len, 1, 2]: (token id, position) per column.
TOKENS_SHAPE = (1, 2)


def family_config(model: nnx.Module):
  """The registered family config `model.config` declares, or None."""
  declared = getattr(model, "config", None)
  if hasattr(declared, "to_hf_dict"):
    declared = declared.to_hf_dict()
  if isinstance(declared, Mapping) or hasattr(declared, "to_dict"):
    hf = dict(declared) if isinstance(declared, Mapping) else declared.to_dict()
    if hf.get("model_type") in registry.MODEL_TYPES:
      return registry.config_from_hf(hf)
  return None


def splits_head(model: nnx.Module) -> bool:
  """Whether the model defines `hidden_states` and `head` (see the module's docstring)."""
  return all(callable(getattr(model, name, None)) for name in ("hidden_states", "head"))


def check_split_head(graphdef: nnx.GraphDef, state) -> None:
  """ValueError unless head(hidden_states(x)) gives the model's own logits on an example row
  (within 1% of their largest magnitude, so a bf16 model passes and a missing final norm does
  not): the trainer's loss runs the two halves, generation the whole call."""
  ids, positions, segments = example_row()
  whole = nnx_forward.wrap(graphdef)(state, ids, positions, segments)
  hidden = nnx_forward.wrap(graphdef, "hidden_states")(state, ids, positions, segments)
  split = nnx_forward.wrap(graphdef, "head")(state, hidden)
  if getattr(split, "shape", None) != whole.shape:
    raise ValueError(
      f"head(hidden_states(...)) gives shape {getattr(split, 'shape', type(split).__name__)}, "
      f"the model's call {whole.shape}; they must be the two halves of the call."
    )
  error = float(jnp.max(jnp.abs(split.astype(jnp.float32) - whole.astype(jnp.float32))))
  scale = float(jnp.max(jnp.abs(whole.astype(jnp.float32))))
  if not error <= 0.01 * scale:
    raise ValueError(
      f"head(hidden_states(...)) differs from the model's call by up to {error:.3g} (its logits "
      f"reach {scale:.3g}); they must be the two halves of the call (a final norm left out?)."
    )


def declared_names(model: nnx.Module) -> HFNames | None:
  """The HF name map `model.hf_names` declares, or None."""
  names = getattr(model, "hf_names", None)
  if names is not None and not isinstance(names, HFNames):
    raise TypeError(
      f"{type(model).__name__}.hf_names is a {type(names).__name__}; expected a "
      "jlora.models.names.HFNames (e.g. HFNames(renames=((regex, replacement), ...)))."
    )
  return names


class NnxCausalLM:
  """`protocol.CausalLM` for an NNX model: `apply({"params": state}, ...)` as linen's apply."""

  def __init__(
    self, graphdef: nnx.GraphDef, config=None, layout=None, hf_names=None, split_head=False
  ):
    self.graphdef, self.config = graphdef, config
    self.layout = layout  # roles of the weights (`traced_layout`): see `weight_layout`
    self.hf_names = hf_names  # the model's own name map (`declared_names`): see `peft_names`
    self.split_head = split_head  # the model defines hidden_states and head (`splits_head`)
    self._run = nnx_forward.wrap(graphdef)
    self._hidden = nnx_forward.wrap(graphdef, "hidden_states") if split_head else None
    self._head = nnx_forward.wrap(graphdef, "head") if split_head else None

  def clone(self, *, config):
    """The same model with another family config (e.g. a grown vocab_size: the NNX layers read
    their table sizes from the state, so the graph needs no change)."""
    return NnxCausalLM(self.graphdef, config, self.layout, self.hf_names, self.split_head)

  def apply(self, variables, *args, method=None, rngs=None, adapter_ids=None, **kwargs):
    dropout = (rngs or {}).get("dropout")
    options = dict(dropout_key=dropout, adapter_ids=adapter_ids)
    if method is not None:
      # The protocol's one method: `logits`, the head alone.
      if getattr(method, "__name__", None) != "logits":
        raise NotImplementedError(f"NnxCausalLM.apply runs `logits` only, not {method!r}.")
      if not self.split_head:
        return args[0]  # the "hidden states" are already the logits
      return self._head(variables["params"], *args, **options, **kwargs)
    run = functools.partial(self._run, **options)
    if kwargs.pop("return_hidden", False) and self.split_head:
      run = functools.partial(self._hidden, **options)
    return self._forward(run, variables["params"], *args, **kwargs)

  # jlora.wrap(model.apply) returns it as it is: it already takes nodes and `adapter_ids`.
  apply.runs_jlora_nodes = True

  def logits(self, hidden):
    """The head alone. Run it as `apply(variables, hidden, method=NnxCausalLM.logits)`, which
    passes the params: the model's `head`, or the identity when the model does not split."""
    raise NotImplementedError("call apply(variables, hidden, method=NnxCausalLM.logits)")

  def _forward(
    self,
    run,
    state,
    input_ids,
    positions=None,
    segment_ids=None,
    *,
    logits_at=None,
    cache: dict | None = None,
  ):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids)
    inputs = (input_ids, positions.astype(jnp.int32), segment_ids.astype(jnp.int32))
    if cache is None:
      return _picked(run(state, *inputs), logits_at)
    index = cache["index"]
    tokens = jnp.stack([input_ids.astype(jnp.int32), inputs[1]], -1)[:, :, None, :]
    k = jax.lax.dynamic_update_slice_in_dim(cache["k"], tokens, index, 1)
    segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], inputs[2], index, 1)
    logits = run(state, k[:, :, 0, 0], k[:, :, 0, 1], segments)
    new = jax.lax.dynamic_slice_in_dim(logits, index, input_ids.shape[1], axis=1)
    return _picked(new, logits_at), {"k": k, "segment_ids": segments, "index": index + new.shape[1]}

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
    """The token buffer the model re-reads at each step (padding: segment 0)."""
    del dtype
    return {
      "k": jnp.zeros((batch, max_len, *TOKENS_SHAPE), jnp.int32),
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
    }


def example_row(length: int = 8):
  """(input_ids, positions, segment_ids) of one row of `length` tokens: a few distinct ids, so
  the logits of positions differ."""
  ids = (jnp.arange(length, dtype=jnp.int32) % 5 + 1)[None]
  positions = jnp.arange(length, dtype=jnp.int32)[None]
  return ids, positions, jnp.ones_like(ids)


def traced_layout(graphdef: nnx.GraphDef, state):
  """jlora.trace_layout of the model's call on an example row: NNX params need not carry roles
  (tunix's einsum weights have three axes and mesh-axis names), so the trainer, generation and
  the server pass this `layout=` to jlora's tree functions."""
  return nnx_forward.trace_layout(graphdef, state, *example_row())


def weight_layout(model):
  """The `layout=` for jlora.apply / quantize / stack_adapters / load_adapter on `model`'s params:
  traced at load for an NNX model, None for a linen family (its params carry axis metadata)."""
  return model.layout if isinstance(model, NnxCausalLM) else None


def peft_names(model):
  """The `model_config=` for jlora.save_adapter / load_adapter / stack_adapters on `model`'s
  params: the name map an NNX model declares, else the model's family config (or None)."""
  declared = model.hf_names if isinstance(model, NnxCausalLM) else None
  return declared if declared is not None else model.config


def _picked(logits, logits_at):
  if logits_at is None:
    return logits
  return jnp.take_along_axis(logits, logits_at[..., None], axis=1)

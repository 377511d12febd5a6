"""Flax param paths <-> Hugging Face tensor and module names: one mapping, for every family.

jlora's modules are named as in the HF checkpoints, with '/' for '.', so most of a name is a rename:

  model/embed_tokens/embedding                -> model.embed_tokens.weight
  model/layers_3/self_attn/q_proj/kernel      -> model.layers.3.self_attn.q_proj.weight (unrolled)

Decoder layers that run under `nn.scan` are stored stacked on a leading axis, and which HF layer each
entry of a stack is depends on the family: Llama scans all layers in one stack, Gemma scans groups of
(local, ..., global) layers, so its stack `model/layers/layers_1` holds HF layers 1, 3, 5, ... A
family's config lists its stacks (`config.layer_stacks()`), and `HFNames` does the rest. Without a
config, a stack under a `layers` module holds HF layers 0..n-1 in order (Llama's layout).

Leaves: a flax kernel is [in, out] and torch's Linear weight is [out, in], so kernels transpose;
embeddings, norm scales and biases do not.
"""

from __future__ import annotations

import dataclasses
import re

# flax leaf name -> HF tensor suffix
LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
HF_LAYERS = "model.layers"


@dataclasses.dataclass(frozen=True)
class HFNames:
  """stacks: (flax module path of a scanned stack, HF layer index of each entry on its axis)."""

  stacks: tuple[tuple[str, tuple[int, ...]], ...] = ()

  @classmethod
  def for_config(cls, config) -> HFNames:
    """The mapping for a jlora model config (any object with `layer_stacks()`), or the default."""
    stacks = getattr(config, "layer_stacks", None)
    return cls(tuple(stacks())) if stacks is not None else cls()

  def stack_of(self, module_path: str) -> tuple[str, tuple[int, ...] | None] | None:
    """(stack prefix, HF layer indices or None for "0..n-1") if the module sits in a stack."""
    for prefix, indices in self.stacks:
      if module_path == prefix or module_path.startswith(prefix + "/"):
        return prefix, indices
    if not self.stacks:
      parts = module_path.split("/")
      if "layers" in parts[:-1]:
        return "/".join(parts[: parts.index("layers") + 1]), None
    return None

  def module_names(self, module_path: str, n_lead: int, n_layers: int = 0) -> list[str]:
    """HF module names of the flax module at `module_path`: one, or one per entry of its stack."""
    stack = self.stack_of(module_path) if n_lead else None
    if n_lead == 0:
      return [".".join(re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in module_path.split("/"))]
    if n_lead == 1 and stack is not None:
      prefix, indices = stack
      indices = range(n_layers) if indices is None else indices
      if len(indices) != n_layers:
        raise ValueError(
          f"{module_path}: a stack of {n_layers} layers, but the model config maps "
          f"{len(indices)} HF layers onto it."
        )
      rest = module_path[len(prefix) + 1 :].replace("/", ".")
      return [f"{HF_LAYERS}.{i}.{rest}" for i in indices]
    raise ValueError(
      f"{module_path!r} has {n_lead} stacked axes; only a scanned layer stack (one leading axis) "
      "maps onto HF per-layer modules (model.layers.{i}...)."
    )

  def tensor_names(self, param_path: str, shape: tuple[int, ...]) -> tuple[list[str], bool, bool]:
    """(HF tensor names of one flax param, whether to transpose, whether it is a stack).

    A stack gives one name per entry of its leading axis."""
    module_path, _, leaf = param_path.rpartition("/")
    if leaf not in LEAF_NAMES:
      raise ValueError(
        f"{param_path}: the leaf {leaf!r} has no HF tensor name; expected one of {list(LEAF_NAMES)}."
      )
    stacked = self.stack_of(module_path) is not None
    names = self.module_names(module_path, int(stacked), shape[0] if stacked else 0)
    return [f"{n}.{LEAF_NAMES[leaf]}" for n in names], leaf == "kernel", stacked

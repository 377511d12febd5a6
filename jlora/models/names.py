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
embeddings, norm scales and biases do not. MoE experts are one HF parameter per weight with an
expert axis first (`mlp.experts.gate_up_proj` [E, out, in], no `.weight`), which is the flax module
`mlp/experts/gate_up_proj` with a kernel [E, in, out]: the last two axes swap (`to_torch`), except
in families whose transformers model keeps them [E, in, out] too (gpt-oss: `experts_in_out`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# flax leaf name -> HF tensor suffix
# (NNX modules written to mirror HF, like examples/nnx_llama.py's RMSNorm, call it `weight`.)
LEAF_NAMES = {
  "kernel": "weight",
  "embedding": "weight",
  "scale": "weight",
  "weight": "weight",
  "bias": "bias",
  "sinks": "sinks",  # gpt-oss: self_attn.sinks, one logit per head
}
HF_LAYERS = "model.layers"
# A module directly under a module of this name is an HF parameter of its own (fused experts).
EXPERTS = "experts"


def to_torch(x):
  """A flax kernel in torch's layout: the last two axes swapped (a transpose for a 2-D kernel)."""
  return np.swapaxes(x, -1, -2)


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return (*shape[:-2], shape[-1], shape[-2])


def is_expert_param(module_path: str) -> bool:
  return module_path.rpartition("/")[0].rpartition("/")[2] == EXPERTS


@dataclasses.dataclass(frozen=True)
class HFNames:
  """stacks: (flax module path of a scanned stack, HF layer index of each entry on its axis)."""

  stacks: tuple[tuple[str, tuple[int, ...]], ...] = ()
  # Checkpoints on disk keep each expert's weights apart (as transformers saves them):
  # (HF module renames, {fused parameter: per-expert tensors concatenated along torch's dim 0}).
  # E.g. Mixtral: ((".mlp.", ".block_sparse_moe."),), {"gate_up_proj": ("w1", "w3"), ...}.
  expert_files: tuple[tuple[tuple[str, str], ...], tuple[tuple[str, tuple[str, ...]], ...]] = (
    (),
    (),
  )
  # transformers keeps this family's fused experts [E, in, out] (gpt-oss), not [E, out, in]
  experts_in_out: bool = False
  # (regex, replacement) pairs, applied in order to every HF module name derived from a path: the
  # name map of a model whose modules are not named as HF's (tunix's `llama.layers.3.attn.q_proj`
  # is HF's `model.layers.3.self_attn.q_proj`).
  renames: tuple[tuple[str, str], ...] = ()

  @classmethod
  def for_config(cls, config) -> HFNames:
    """The mapping for a jlora model config (any object with `layer_stacks()`), or the default."""
    stacks = getattr(config, "layer_stacks", None)
    experts = getattr(config, "expert_files", None)
    return cls(
      tuple(stacks()) if stacks is not None else (),
      experts() if experts is not None else ((), ()),
      bool(getattr(config, "hf_experts_in_out", False)),
    )

  def on_disk(self, hf_name: str) -> str:
    """The name transformers saves a tensor under (Mixtral: block_sparse_moe for the mlp)."""
    for old, new in self.expert_files[0]:
      hf_name = hf_name.replace(old, new)
    return hf_name

  def expert_parts(self, hf_name: str, num_experts: int) -> list[list[str]] | None:
    """The on-disk tensors of a fused expert parameter: per expert, the parts to concatenate."""
    parts = self.expert_files[1]
    module, _, param = self.on_disk(hf_name).rpartition(".")
    if not module.endswith("." + EXPERTS) or param not in dict(parts):
      return None
    return [[f"{module}.{e}.{p}.weight" for p in dict(parts)[param]] for e in range(num_experts)]

  def stack_of(self, module_path: str) -> tuple[str, tuple[int, ...] | None] | None:
    """(stack prefix, HF layer indices or None for "0..n-1") if the module sits in a stack.
    A numbered entry under the prefix (NNX's list of layers, model/layers/3/...) is one layer."""
    found = None
    for prefix, indices in self.stacks:
      if module_path == prefix or module_path.startswith(prefix + "/"):
        found = prefix, indices
        break
    if found is None and not self.stacks:
      parts = module_path.split("/")
      if "layers" in parts[:-1]:
        found = "/".join(parts[: parts.index("layers") + 1]), None
    if found is not None and module_path[len(found[0]) + 1 :].partition("/")[0].isdigit():
      return None
    return found

  def module_names(self, module_path: str, n_lead: int, n_layers: int = 0) -> list[str]:
    """HF module names of the flax module at `module_path`: one, or one per entry of its stack."""
    return [self.renamed(name) for name in self._path_names(module_path, n_lead, n_layers)]

  def renamed(self, hf_name: str) -> str:
    for pattern, replacement in self.renames:
      hf_name = re.sub(pattern, replacement, hf_name)
    return hf_name

  def _path_names(self, module_path: str, n_lead: int, n_layers: int) -> list[str]:
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
    suffix = "" if is_expert_param(module_path) else f".{LEAF_NAMES[leaf]}"
    if is_expert_param(module_path) and leaf == "bias":
      suffix = "_bias"  # gpt-oss: experts.gate_up_proj_bias
    transpose = leaf == "kernel" and not (is_expert_param(module_path) and self.experts_in_out)
    return [f"{n}{suffix}" for n in names], transpose, stacked

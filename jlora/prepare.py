"""One call from a base model's params to the (trainable, frozen) pair a train step takes.

layout -> quantize (QLoRA, optional) -> apply LoRA -> place on the mesh -> split. The trainer and
the benchmarks call this, so what they train is built the same way.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding

from jlora import boxes
from jlora import sharding as shard_lib
from jlora.config import Layout, LoraConfig
from jlora.inits import eva, loftq
from jlora.lora import apply, split
from jlora.quant import QuantConfig, quantize


def prepare_for_training(
  params,
  lora: LoraConfig,
  key: jax.Array,
  *,
  quant: QuantConfig | None = None,
  layout: Layout | None = None,
  eva_data: tuple | None = None,
):
  """(trainable, frozen) for `params`: quantized by `quant` if given, then adapted by `lora`.

  If `params` are placed with NamedShardings (e.g. loaded with `from_pretrained(..., mesh=...)`),
  every new array follows the weight it replaces: codes and scales like the quantized kernel,
  A on the kernel's input axes and B on its output axes (`jlora.sharding.param_specs`).
  Otherwise the arrays stay where JAX puts them.

  init='loftq' quantizes with `quant` as LoftQ does (jlora.loftq); init='eva' needs
  eva_data=(run, batches, token_mask), as jlora.eva takes them (run sees the quantized base).
  """
  base_specs, mesh = _named_specs(params)
  if lora.init == "loftq":
    if quant is None:
      raise ValueError(
        "LoraConfig.init='loftq' fits the adapters to a quantized base; pass quant=QuantConfig(...)"
        " (trainer: config.quant.kind nf4 or int4)."
      )
    params = loftq(params, lora, quant, key, layout=layout)
  else:
    if quant is not None:
      params = quantize(params, quant, layout=layout)
    if lora.init == "eva":
      if eva_data is None:
        raise ValueError("LoraConfig.init='eva' needs eva_data=(run, batches, token_mask).")
      run, batches, token_mask = eva_data
      params = eva(params, lora, key, run, batches, token_mask=token_mask, layout=layout)
    else:
      params = apply(params, lora, key, layout=layout)
  if mesh is not None:
    params = jax.device_put(
      params, shard_lib.named(mesh, shard_lib.param_specs(params, base_specs))
    )
  return split(params)


def _named_specs(params):
  """(PartitionSpecs like the unboxed params, mesh) when every param has a NamedSharding, else
  (None, None). Params may be boxed with Flax axis metadata (as `from_pretrained` returns them)."""
  plain = boxes.unbox_tree(params)
  shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(plain)]
  if not shardings or not all(isinstance(s, NamedSharding) for s in shardings):
    return None, None
  # Specs by the plain tree: apply/quantize return plain trees, boxed input or not.
  return jax.tree.map(lambda x: x.sharding.spec, plain), shardings[0].mesh

"""tunix's Llama 3 (google-tunix, an NNX model jlora did not write), built at any size.

`pip install --no-deps google-tunix==0.1.7 jaxtyping`: tunix's own pins would downgrade
transformers and bring its trainer stack (grain, metrax, tensorflow-datasets), and its package
`__init__` imports all of that. The model file needs none of it, so `model_module()` registers the
packages on the way to `tunix/models/llama3/model.py` as bare packages and imports only that file,
which then imports the three small tunix modules it uses (mappings, compat, env_utils) as shipped.

    graphdef, state = make(num_layers=2, vocab_size=96, embed_dim=32, ...)  # tunix's ModelConfig
    inputs = causal_inputs(tokens)
    layout = jlora.trace_layout(nnx.merge(graphdef, state), *inputs)
    state = jlora.apply(state, jlora.LoraConfig(targets="all-linear"), key, layout=layout)
    logits, _ = jlora.wrap(graphdef)(state, *inputs)

Its attention projections are custom `Einsum` modules holding `w`, its MLP is `nnx.Linear`, its
embedding a custom `Embedder` read by index (and tied to the head by `jnp.dot(x, E.T)`), and its
params carry mesh-axis sharding names, not roles: jlora takes the layout from a trace.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODEL = "tunix.models.llama3.model"
PACKAGES = ("tunix", "tunix.generate", "tunix.utils", "tunix.models", "tunix.models.llama3")


def model_module():
  """tunix/models/llama3/model.py as a module; None when google-tunix isn't installed."""
  import flax

  if MODEL in sys.modules:
    return sys.modules[MODEL]
  spec = importlib.util.find_spec("tunix")
  if spec is None:
    return None
  root = spec.submodule_search_locations[0]
  for name in PACKAGES:
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(root, *name.split(".")[1:])]
    sys.modules.setdefault(name, package)
  before = flax.config.flax_always_shard_variable
  try:
    return importlib.import_module(MODEL)
  finally:
    flax.config.update("flax_always_shard_variable", before)  # tunix turns it off at import


def causal_inputs(tokens):
  """tunix's (input_tokens, positions, cache, attention_mask) for a batch of whole sequences."""
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
  return tokens, positions, None, mask


def make(seed: int = 0, noise: float = 0.05, **config):
  """(graphdef, state) of a tunix Llama3 with ModelConfig(**config), every weight given
  Gaussian noise (tunix initialises the MLP kernels to zeros, which would hide them)."""
  tunix = model_module()
  if tunix is None:
    raise ModuleNotFoundError("google-tunix: pip install --no-deps google-tunix==0.1.7 jaxtyping")
  with nnx.use_eager_sharding(False):  # as tunix builds it without a mesh
    graphdef, state = nnx.split(tunix.Llama3(tunix.ModelConfig(**config), rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  noisy = lambda x: x + jnp.asarray(noise * rng.standard_normal(x.shape), x.dtype)
  return graphdef, jax.tree.map(noisy, state)

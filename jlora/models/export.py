"""Merged models out of jlora: the mirror of jlora.models.loading.

  export_merged(dir, params, config, tokenizer)       -> HF checkpoint (config.json, model.safetensors)
  export_gguf(path, params, config, tokenizer, "f16") -> one llama.cpp GGUF file
  save_adapter_gguf(path, params, lora_cfg, config)   -> a llama.cpp LoRA adapter GGUF (--lora)

Every export walks the same per-tensor plan (`hf_tensors`): each HF tensor of the model, with a
function that computes its merged value when called. A scanned layer stack is sliced one layer at a
time and its adapter merged into that slice only (into dequant(W4) for a QLoRA base), so an export
holds one layer's tensors on the host on top of the params, never a merged copy of the model.

GGUF files are written the way llama.cpp's convert_hf_to_gguf.py writes them: tensor names from the
gguf package's HF -> GGUF table, Q/K rows permuted for the llama architecture (gguf_spec), fused
MoE experts split into llama.cpp's per-projection expert tensors, vectors, biases and routers in
F32, and the header, metadata and tensor index written before the
tensor data, which is then streamed tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import gguf
import jax
import numpy as np

from jlora import boxes
from jlora import config as config_lib
from jlora.boxes import KERNEL
from jlora.config import LoraConfig
from jlora.io import atomic_write, check_new_file, host_array, write_json, write_safetensors
from jlora.lora import LoraWeight, is_adapter, is_lora
from jlora.models import gguf_spec, gguf_vocab, loading, registry
from jlora.models.llama import rope_inv_freq
from jlora.models.names import LEAF_NAMES, to_torch, torch_shape
from jlora.quant import dequantized, is_quantized
from jlora.tokens import is_token_rows


def _is_node(x) -> bool:
  return is_adapter(x) or is_quantized(x)


# --------------------------------------------------------------------------- the per-tensor plan


@dataclasses.dataclass(frozen=True)
class HfTensor:
  """One tensor of the merged model, by its HF name, computed only when `read()` is called."""

  name: str  # e.g. model.layers.3.self_attn.q_proj.weight
  leaf_name: str  # the flax leaf: kernel | embedding | scale | bias
  shape: tuple[int, ...]  # HF (torch) layout: [out, in] for kernels
  layer: int | None  # the layer index of a scanned stack, else None
  read: Callable[[], np.ndarray]  # the merged value, HF layout, the params' dtype


def _read_merged(leaf, layer: int | None, transpose: bool, label: str) -> np.ndarray:
  if layer is not None:  # one layer of the stack; nodes stay valid per layer (see jlora.lora)
    leaf = jax.tree.map(lambda x: x[layer], leaf)
  value = leaf.merged() if is_adapter(leaf) else dequantized(leaf)
  value = host_array(value, label)
  return to_torch(value) if transpose else value


def hf_tensors(params, model_config) -> list[HfTensor]:
  """The merged model's tensors by HF name (the family's `names.HFNames`), in the params' order,
  nothing computed yet."""
  hf_names = registry.hf_names(model_config)
  out = []
  leaves = jax.tree_util.tree_flatten_with_path(boxes.unbox_tree(params), is_leaf=_is_node)[0]
  for key_path, leaf in leaves:
    full = config_lib.path_str(key_path)
    leaf_name = full.rpartition("/")[2]
    if leaf_name not in LEAF_NAMES:
      raise ValueError(f"params: don't know the HF name of the param {full!r}.")
    names, transpose, stacked = hf_names.tensor_names(full, tuple(leaf.shape))
    shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
    hf_shape = torch_shape(shape) if transpose else shape
    for i, name in enumerate(names):
      layer = i if stacked else None
      read = functools.partial(_read_merged, leaf, layer, transpose, full)
      out.append(HfTensor(name, leaf_name, hf_shape, layer, read))
  return out


def _check_head(names: set[str], tied: bool, caller: str) -> None:
  has_head = "lm_head.weight" in names
  if tied and has_head:
    raise ValueError(
      f"{caller}: the config ties the output head to the embeddings, but params have lm_head."
    )
  if not tied and not has_head:
    raise ValueError(
      f"{caller}: params have no lm_head, so the embeddings must be tied; the config says "
      "tie_word_embeddings=false."
    )


# --------------------------------------------------------------------------- HF checkpoint


def _hf_config_dict(model_config) -> dict:
  if isinstance(model_config, Mapping):
    return dict(model_config)
  if hasattr(model_config, "to_hf_dict"):
    return model_config.to_hf_dict()
  if hasattr(model_config, "to_dict"):
    return model_config.to_dict()
  raise TypeError(
    f"model_config must be a jlora model config, an HF config dict or a PretrainedConfig; got "
    f"{type(model_config).__name__}."
  )


def export_merged(
  directory, params, model_config, tokenizer=None, *, dtype: str = "float32"
) -> Path:
  """Merges the adapters and writes an HF checkpoint: config.json, model.safetensors, tokenizer files.

  Quantized bases merge into their dequantized weights (the weights the adapter was
  trained against). dtype: 'float32' or 'bfloat16' for the stored tensors.
  """
  import ml_dtypes

  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
  if np_dtype is None:
    raise ValueError(f"export_merged: dtype={dtype!r}; use 'float32' or 'bfloat16'.")
  hf_config = _hf_config_dict(model_config)
  plan = hf_tensors(params, model_config)
  _check_head(
    {t.name for t in plan}, bool(hf_config.get("tie_word_embeddings", False)), "export_merged"
  )
  tensors = {t.name: t.read().astype(np_dtype) for t in plan}
  hf_config["torch_dtype"] = dtype
  hf_config["dtype"] = dtype

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_safetensors(directory / "model.safetensors", tensors)
  write_json(directory / "config.json", hf_config)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))
  return directory


# --------------------------------------------------------------------------- GGUF

Q = gguf.GGMLQuantizationType
# Types the gguf package quantizes in numpy (its k-quants and i-quants have no numpy quantizer).
GGUF_TYPES: dict[str, gguf.GGMLQuantizationType] = {
  "f32": Q.F32,
  "f16": Q.F16,
  "bf16": Q.BF16,
  "q8_0": Q.Q8_0,
  "q5_1": Q.Q5_1,
  "q5_0": Q.Q5_0,
  "q4_1": Q.Q4_1,
  "q4_0": Q.Q4_0,
}
_FILE_TYPES = {
  "f32": gguf.LlamaFileType.ALL_F32,
  "f16": gguf.LlamaFileType.MOSTLY_F16,
  "bf16": gguf.LlamaFileType.MOSTLY_BF16,
  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
  "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
  "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
  "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
ADAPTER_TYPES = ("f32", "f16", "bf16")
# 4- and 5-bit files keep the output head at 8 bits, as llama.cpp's quantizer keeps it at 6 or 8.
_LOW_BIT = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


@dataclasses.dataclass(frozen=True)
class GgufTensor:
  name: str  # llama.cpp's name, e.g. blk.3.attn_q.weight
  shape: tuple[int, ...]  # numpy order (ggml's ne reversed): [out, in] for a weight
  qtype: gguf.GGMLQuantizationType
  read: Callable[[], np.ndarray]  # float values in `shape`

  @property
  def nbytes(self) -> int:
    if self.qtype in (Q.F32, Q.F16):
      return math.prod(self.shape) * (4 if self.qtype == Q.F32 else 2)
    return math.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype))

  def encode(self) -> np.ndarray:
    value = np.ascontiguousarray(self.read(), dtype=np.float32)
    if value.shape != self.shape:
      raise AssertionError(f"internal error: {self.name} is {value.shape}, planned {self.shape}")
    return gguf.quants.quantize(value, self.qtype)


def check_gguf_type(dtype: str, field: str = "dtype", supported=tuple(GGUF_TYPES)) -> None:
  """Refuses a GGUF type the exporter can't write, naming the ones it can."""
  if dtype not in supported:
    raise ValueError(f"{field}: {dtype!r} is not supported; supported: {', '.join(supported)}.")


def source_tokenizer_pre(model_path) -> str | None:
  """`tokenizer.ggml.pre` of the GGUF a model was loaded from (a .gguf path or an embedded model's
  name), so that an export keeps llama.cpp's pre-tokenizer; None for other sources."""
  name = str(model_path)
  if name in loading.EMBEDDED_MODELS:
    path = loading.embedded_gguf_path(name)
  else:
    path = Path(name).expanduser()
  if path.suffix != ".gguf" or not path.is_file():
    return None
  field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
  return field.contents() if field is not None else None


def _tensor_type(name: str, shape: tuple[int, ...], wanted, head: bool):
  """F32 for vectors, biases and MoE routers (llama.cpp's converter keeps them F32); the wanted
  type for matrices, F16 where rows don't split into its blocks (the converter falls back the same
  way), Q8_0 for the head of a 4/5-bit file."""
  if len(shape) < 2 or not name.endswith(".weight") or ".ffn_gate_inp." in name:
    return Q.F32
  if head and wanted in _LOW_BIT:
    wanted = Q.Q8_0
  block = gguf.GGML_QUANT_SIZES[wanted][0]
  return wanted if shape[-1] % block == 0 else Q.F16


def _model_config(config):
  """The jlora config of the model: a model.config passes through, HF configs are translated."""
  if hasattr(config, "layer_stacks"):
    return config
  if isinstance(config, Mapping) or hasattr(config, "to_dict"):
    return registry.config_from_hf(config)
  raise TypeError(
    f"config: got {type(config).__name__}; expected the model's config (model.config) or an HF "
    "config dict."
  )


def _gguf_value(spec: gguf_spec.GgufWriting, config, t: HfTensor) -> Callable[[], np.ndarray]:
  """t.read, with llama.cpp's layout changes: Q/K rows permuted, norm offsets folded."""
  module = t.name.rsplit(".", 2)[-2]
  read = t.read
  if spec.mapping.permute_qk and module in ("q_proj", "k_proj"):
    heads = config.num_attention_heads if module == "q_proj" else config.num_key_value_heads
    return lambda: gguf_spec.permute_rope_rows(read(), heads)
  if spec.mapping.norm_offset and t.leaf_name == "scale":
    return lambda: read().astype(np.float32) + spec.mapping.norm_offset
  return read


def _rope_freqs(config) -> np.ndarray | None:
  """llama.cpp's rope_freqs.weight for llama3 rope scaling: per frequency, the factor it divides
  the unscaled frequency by (1 for high frequencies, `factor` for low ones, smooth in between)."""
  scaling = dict(config.rope_scaling or {})
  if scaling.get("rope_type", scaling.get("type")) != "llama3":
    return None
  unscaled = rope_inv_freq(config.head_dim, config.rope_theta, None)
  scaled = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
  return np.asarray(unscaled / scaled, np.float32)


def gguf_plan(params, config, dtype: str) -> list[GgufTensor]:
  """The GGUF tensors of the merged model, in llama.cpp's order (embeddings, blocks, head)."""
  spec = gguf_spec.gguf_writing(config.model_type)
  plan = hf_tensors(params, config)
  _check_head({t.name for t in plan}, bool(config.tie_word_embeddings), "export_gguf")
  head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
  in_out = registry.hf_names(config).experts_in_out
  out, layer_of = [], {}
  for t in plan:
    tensors = _expert_tensors(spec, t, dtype, in_out)
    if tensors is None:
      name = spec.tensor_name(t.name)
      qtype = _tensor_type(name, t.shape, GGUF_TYPES[dtype], head=t.name == head)
      tensors = [GgufTensor(name, t.shape, qtype, _gguf_value(spec, config, t))]
      if t.name == head and config.tie_word_embeddings and spec.mapping.untied_output:
        tensors.append(dataclasses.replace(tensors[0], name="output.weight"))
    out += tensors
    layer_of.update((o.name, t.layer) for o in tensors)
  rank = {"token_embd.weight": -2, "output_norm.weight": 1e9, "output.weight": 1e9 + 1}
  out.sort(key=lambda o: rank.get(o.name, layer_of[o.name] if layer_of[o.name] is not None else -1))
  freqs = _rope_freqs(config)
  if freqs is not None:
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    out.append(GgufTensor(name, freqs.shape, Q.F32, lambda: freqs))
  return out


def _expert_tensors(spec: gguf_spec.GgufWriting, t: HfTensor, dtype: str, in_out: bool):
  """A fused expert parameter as llama.cpp's expert tensors (the mapping's `experts`): gate_up_proj
  [E, 2I, d] -> ffn_gate_exps + ffn_up_exps [E, I, d], halves of the output axis, or its alternate
  rows where the mapping is interleaved (gpt-oss); its bias `gate_up_proj_bias` [E, 2I] splits the
  same way into their `.bias`. Experts kept [E, in, out] (gpt-oss) are transposed first. None for
  other tensors."""
  layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(_bias)?", t.name)
  stems = layer and spec.mapping.experts.get(layer.group(2))
  if not stems:
    return None
  kind = "bias" if layer.group(3) else "weight"
  read, shape = t.read, t.shape
  if kind == "weight" and in_out:
    read, shape = (lambda: to_torch(t.read())), torch_shape(shape)
  n = len(stems)
  part = shape[1] // n
  part_shape = (shape[0], part, *shape[2:])
  qtype = _tensor_type(f".{kind}", part_shape, GGUF_TYPES[dtype], head=False)

  def piece(i: int) -> Callable[[], np.ndarray]:
    if spec.mapping.interleaved:
      return lambda: read()[:, i::n]
    return lambda: read()[:, i * part : (i + 1) * part]

  return [
    GgufTensor(f"blk.{layer.group(1)}.{stem}.{kind}", part_shape, qtype, piece(i))
    for i, stem in enumerate(stems)
  ]


def write_gguf(path: Path, arch: str, add_metadata, tensors: list[GgufTensor]) -> None:
  """Header, metadata and tensor index first, then the tensor data one tensor at a time, into a
  temp file that replaces `path` only when complete."""

  def write(tmp: str) -> None:
    writer = gguf.GGUFWriter(tmp, arch)
    try:
      add_metadata(writer)
      for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
      writer.write_header_to_file()
      writer.write_kv_data_to_file()
      writer.write_ti_data_to_file()
      for t in tensors:
        writer.write_tensor_data(t.encode())
    finally:
      writer.close()

  atomic_write(path, write)


def export_gguf(
  path,
  params,
  config,
  tokenizer,
  dtype: str = "f16",
  *,
  overwrite: bool = False,
  name: str | None = None,
  tokenizer_pre: str | None = None,
) -> Path:
  """Merges the adapters and writes the model as one GGUF file that llama.cpp, Ollama and LM Studio
  run (`llama-cli -m path`).

  dtype: the type of the weight matrices (see GGUF_TYPES); norms and biases stay F32, matrices
  whose rows don't divide into the type's blocks are F16, and 4/5-bit files keep the output head
  at Q8_0. QLoRA bases merge into dequant(W4), as export_merged does. tokenizer_pre: llama.cpp's
  pre-tokenizer name, when the tokenizer's own can't be recognised (see gguf_vocab). Trainable
  token rows merge into token_embd (and an untied output); the tokenizer must hold their tokens
  (for new tokens: the one jlora.tokens.add_tokens grew). An existing
  `path` is replaced only with overwrite=True; a failed export leaves nothing under `path`.
  """
  check_gguf_type(dtype)
  config = _model_config(config)
  spec = gguf_spec.gguf_writing(config.model_type)
  path = check_new_file(path, overwrite)
  if (
    getattr(config, "sliding_window", None)
    and config.sliding_window < config.max_position_embeddings
    and not spec.mapping.swa
  ):
    warnings.warn(
      f"config.sliding_window={config.sliding_window}: llama.cpp's {spec.arch!r} architecture "
      "attends to the whole context, so outputs match jlora's only up to that many tokens.",
      stacklevel=2,
    )
  _check_trained_tokens(params, tokenizer)
  tensors = gguf_plan(params, config, dtype)

  def add_metadata(writer: gguf.GGUFWriter) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or f"{config.model_type} (jlora merged)")
    spec.hparams(writer, config)
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_vocab.add_tokenizer(writer, tokenizer, config.vocab_size, pre=tokenizer_pre)

  write_gguf(path, spec.arch, add_metadata, tensors)
  return path


def _check_trained_tokens(params, tokenizer) -> None:
  """Trained token rows need their tokens in the tokenizer written beside them: a vocabulary
  grown for new tokens would otherwise be written as unused [PAD] entries."""
  trained = jax.tree.leaves(boxes.unbox_tree(params), is_leaf=is_token_rows)
  ids = sorted({i for node in trained if is_token_rows(node) for i in node.indices})
  missing = [i for i in ids if i >= len(tokenizer)]
  if missing:
    raise ValueError(
      f"tokenizer: it has {len(tokenizer)} tokens, but params train token rows {missing}; pass "
      "the tokenizer the new tokens were added to (e.g. by jlora.tokens.add_tokens)."
    )


# --------------------------------------------------------------------------- LoRA adapter GGUF


def _adapter_alpha(nodes: list[tuple[str, LoraWeight]], lora_cfg: LoraConfig | None) -> float:
  """The one alpha the file states. llama.cpp scales every tensor pair by alpha / rank (rank from
  the tensor), with no rsLoRA or per-module alpha; a module whose scale differs gets the ratio
  folded into its lora_b (see save_adapter_gguf)."""
  if lora_cfg is not None and not lora_cfg.use_rslora:
    return float(lora_cfg.alpha)
  products = [node.scale * node.a.shape[-1] for _, node in nodes]
  return float(max(set(products), key=products.count))


def _adapter_nodes(params) -> list[tuple[str, LoraWeight]]:
  nodes = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(
    boxes.unbox_tree(params), is_leaf=is_adapter
  )[0]:
    full = config_lib.path_str(key_path)
    if is_token_rows(leaf):  # llama.cpp applies adapters to a base GGUF with its own vocabulary
      raise ValueError(
        f"params: {full} has trainable token rows, which a llama.cpp adapter can't hold; "
        "use export_gguf to merge them (and the new tokens) into the model."
      )
    if not is_lora(leaf):
      continue
    if full.rpartition("/")[2] != KERNEL or len(leaf.roles) != 2:
      raise ValueError(
        f"params: {full} is adapted, and llama.cpp adapters hold 2-D linear weights only; "
        "exclude it from the adapter, or use export_gguf to merge it."
      )
    nodes.append((full, leaf))
  if not nodes:
    raise ValueError(
      "params: there are no LoraWeight nodes (apply jlora.apply or load_adapter first)."
    )
  return nodes


def _lora_factor(x, layer, label: str, fold: float, permute_heads: int | None) -> np.ndarray:
  """One layer of a (flax-layout) factor, transposed to torch's layout, times `fold`, with its
  rows in llama.cpp's rope order when `permute_heads` is set."""
  value = host_array(x if layer is None else x[layer], label).T.astype(np.float32)
  value = value * np.float32(fold) if fold != 1.0 else value
  return value if permute_heads is None else gguf_spec.permute_rope_rows(value, permute_heads)


def adapter_plan(params, config, lora_cfg: LoraConfig | None, dtype: str):
  """(alpha, tensors): each adapted weight's `.lora_a` ([r, in]) and `.lora_b` ([out, r]) in the
  layout llama.cpp multiplies as  W x + alpha / r * lora_b (lora_a x)."""
  spec = gguf_spec.gguf_writing(config.model_type)
  nodes = _adapter_nodes(params)
  alpha = _adapter_alpha(nodes, lora_cfg)
  out = []
  for full, node in nodes:
    path = full.rpartition("/")[0]
    module = path.rpartition("/")[2]
    if module == "lm_head" and config.tie_word_embeddings:
      raise ValueError(f"params: {full} is adapted, but the head is tied to the embeddings.")
    stacked = node.a.ndim == 3
    n_layers = node.a.shape[0] if stacked else 0
    names = registry.hf_names(config).module_names(path, int(stacked), n_layers)
    rank = node.a.shape[-1]
    fold = node.scale * rank / alpha  # 1 unless rsLoRA or a per-module alpha
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    permute = spec.mapping.permute_qk and module in heads
    for i, hf in enumerate(names):
      base = spec.tensor_name(f"{hf}.weight")
      layer = i if stacked else None
      read_a = functools.partial(_lora_factor, node.a, layer, full + " (a)", 1.0, None)
      read_b = functools.partial(
        _lora_factor, node.b, layer, full + " (b)", fold, heads[module] if permute else None
      )
      qtype = GGUF_TYPES[dtype]
      out.append(GgufTensor(f"{base}.lora_a", (rank, node.a.shape[-2]), qtype, read_a))
      out.append(GgufTensor(f"{base}.lora_b", (node.b.shape[-1], rank), qtype, read_b))
  return alpha, out


def save_adapter_gguf(
  path,
  params,
  lora_cfg: LoraConfig | None,
  config,
  dtype: str = "f32",
  *,
  overwrite: bool = False,
  name: str | None = None,
) -> Path:
  """Writes the adapters in `params` as a llama.cpp LoRA adapter GGUF, for
  `llama-cli -m base.gguf --lora path` and Ollama's `ADAPTER path`.

  config: the base model's config (architecture, head counts for the Q/K layout). Each module's
  scale is reproduced exactly under llama.cpp's alpha / rank rule (rsLoRA and rank/alpha patterns
  are folded into lora_b). dtype: f32, f16 or bf16. Only linear weights are written: an adapted
  embedding or tied head, or trainable token rows, are refused (merge those with export_gguf).
  """
  check_gguf_type(dtype, supported=ADAPTER_TYPES)
  config = _model_config(config)
  spec = gguf_spec.gguf_writing(config.model_type)
  if lora_cfg is not None and lora_cfg.init == "pissa":
    raise ValueError(
      "lora_cfg.init: 'pissa' adapters are relative to a residual base that jlora modified, so "
      "llama.cpp would apply it to the wrong weights; use export_gguf to merge instead."
    )
  path = check_new_file(path, overwrite)
  alpha, tensors = adapter_plan(params, config, lora_cfg, dtype)
  if any(is_quantized(node.base) for _, node in _adapter_nodes(params)):
    warnings.warn(
      "save_adapter_gguf: these adapters were trained on a 4-bit base; llama.cpp applies them to "
      "whatever base GGUF it is given. export_gguf merges into the exact 4-bit weights instead.",
      stacklevel=2,
    )

  def add_metadata(writer: gguf.GGUFWriter) -> None:
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name or f"{config.model_type} LoRA adapter (jlora)")

  write_gguf(path, spec.arch, add_metadata, tensors)
  return path

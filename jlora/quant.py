"""A 4-bit frozen base: NF4 / int4 block quantization with optional double quantization.

`quantize(params, QuantConfig(...))` replaces each selected kernel with a
`QuantizedWeight`, a pytree node whose children are plain arrays, so jit, scan,
sharding, optax and orbax all see ordinary arrays. `dequantize(params)` turns every
node back into a plain array. LoRA nodes (`jlora.LoraWeight`) accept a
QuantizedWeight as their base and call `base.dequantize()` next to the matmul.

Storage layout (one layer; stacked/scanned kernels add leading axes `*lead` to
every child, and nothing about them is recorded in static fields)
-----------------------------------------------------------------------------
The per-layer kernel, of shape `kernel_shape` with axis roles `roles` ("in",
"out", "batch"), is viewed as a matrix [I, O]: its "in" axes are moved first (in
kernel order), then I = product of the "in" axes and O = product of all the others
(in kernel order). Quantization blocks are `block_size` consecutive weights along I
within one column o, so block j of column o holds rows [j*B, (j+1)*B).

  codes         uint8 [*lead, I // 2, O]   two 4-bit code indices per byte; byte
                                           [i, o] holds row 2i in its low nibble and
                                           row 2i+1 in its high nibble.
  Without double quantization:
  absmax        scale_dtype [*lead, I // B, O]    per-block absmax.
  absmax_scale  None
  absmax_mean   None
  With double quantization (QLoRA): the fp32 absmax values of one layer, flattened
  (row-major over [I // B, O]) and zero-padded to a multiple of 256 after their mean
  is subtracted, are quantized symmetrically to int8 in blocks of 256 consecutive
  values:
  absmax        int8    [*lead, P]          P = ceil(I*O/B / 256) * 256
  absmax_scale  float32 [*lead, P // 256]   absmax of each 256-block (of absmax - mean)
  absmax_mean   float32 [*lead]             the per-layer mean of the absmax values
  absmax_recovered = absmax_mean + absmax / 127 * absmax_scale

A weight decodes as  table[code] * absmax(block).  The tables:
  nf4:  the 16 NormalFloat-4 values of bitsandbytes (QLoRA), index 0..15, in [-1, 1];
        each weight gets the nearest value of w / absmax (midpoint thresholds).
  int4: index k decodes to (k - 8) / 7; quantizing rounds w / absmax * 7 to the
        nearest integer in [-7, 7] (stored as k = q + 8 in 1..15), i.e. symmetric
        int4 with the asymmetric -8 code never produced.
Blocks are quantized with their exact absmax (as bitsandbytes does); double
quantization then only perturbs the scale each block decodes with.

Bytes per weight: 0.5 (codes) + 4/B without double quant (0.5625 at B=64);
0.5 + 1/B + 4/(256 B) + (the mean and the padding to 256) with it: about 0.5159 at
B=64, QLoRA's 4.127 bits. `scale_dtype` applies only without double quant.

Sharding (`QuantizedWeight.partition_spec(kernel_spec, mesh=None)`): `codes` and
the non-double-quant `absmax` shard like the kernel's leading (stacked) axes and
like its non-"in" axes (merged into the O axis, several mesh axes combined). The
kernel's "in"-axis sharding is carried to the I//2 axis of `codes` and to the I//B
axis of `absmax` only when the mesh is known (passed, or set with jax.set_mesh) and
that size divides by the mesh axes' size (e.g. SmolLM2's I=576 has 9 blocks of 64:
fsdp=2 shards the codes but not the absmax); otherwise that axis is replicated.
The double-quant arrays (absmax int8 codes, their scales, the mean) are tiny
(about 1/32 of the codes' bytes): they keep the lead-axis sharding, so per-layer
slices stay local, and are replicated along their other axis.

Static (non-pytree) fields are per layer only: kernel_shape, roles, kind,
block_size, dtype_name (the dequantized dtype). Leading dims come from the children
(n_lead = codes.ndim - 2), so `jax.tree.map(lambda x: x[i], node)` and nn.scan's
slicing give a valid one-layer node.

No padding: an odd I, or I not divisible by block_size, is an error that names the
module path, its input size and the block sizes that would work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from jlora import boxes
from jlora import config as config_lib
from jlora.config import IN, Targets

KINDS = ("nf4", "int4")
DQ_BLOCK = 256  # double-quant block: consecutive absmax values sharing one fp32 scale

# bitsandbytes' NF4 table (bitsandbytes/functional.py, get_4bit_type("nf4")).
NF4_TABLE = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  dtype=np.float32,
)
INT4_TABLE = (np.arange(16, dtype=np.float32) - 8.0) / 7.0


def code_table(kind: str) -> np.ndarray:
  """The 16 values (index 0..15) that a 4-bit code of `kind` decodes to, in units of the block absmax."""
  _check_kind(kind, "kind")
  return NF4_TABLE if kind == "nf4" else INT4_TABLE


def _check_kind(kind, field: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"{field}={kind!r} is unknown: valid kinds are {', '.join(map(repr, KINDS))}.")


def _check_block_size(block_size, field: str) -> None:
  if (
    isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0
  ):
    raise ValueError(
      f"{field}={block_size!r} is invalid: it must be a positive integer "
      "(e.g. 32, 64, 128; QLoRA uses 64)."
    )


def _check_dtype(value, field: str, *, floating: bool = True) -> None:
  try:
    dt = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(
      f"{field}={value!r} is not a dtype (use e.g. jnp.float32 or 'bfloat16')."
    ) from e
  if floating and not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(
      f"{field}={value!r} is invalid: it must be a floating dtype (e.g. float32, bfloat16)."
    )


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Which kernels to quantize, and how.

  kind: 'nf4' (QLoRA's NormalFloat4) or 'int4' (symmetric absmax int4).
  block_size: consecutive weights along the input axis that share one absmax.
  double_quant: quantize the absmax values to int8 in blocks of 256 (QLoRA).
  targets / exclude: as in LoraConfig; 'all-linear' skips embeddings and the output head.
  scale_dtype: dtype of the absmax values when double_quant is off.
  dtype: dtype of dequantized weights; None keeps each original weight's dtype.
  """

  kind: str = "nf4"
  block_size: int = 64
  double_quant: bool = True
  targets: Targets = "all-linear"
  exclude: Targets | None = None
  scale_dtype: Any = jnp.float32
  dtype: Any = None

  def __post_init__(self):
    _check_kind(self.kind, "QuantConfig.kind")
    _check_block_size(self.block_size, "QuantConfig.block_size")
    if not isinstance(self.double_quant, bool):
      raise ValueError(
        f"QuantConfig.double_quant={self.double_quant!r} is invalid: it must be True or False."
      )
    config_lib.check_targets("QuantConfig.targets", self.targets)
    if self.exclude is not None:
      config_lib.check_targets("QuantConfig.exclude", self.exclude)
    _check_dtype(self.scale_dtype, "QuantConfig.scale_dtype")
    if self.dtype is not None:
      _check_dtype(self.dtype, "QuantConfig.dtype")


@struct.dataclass
class QuantizedWeight:
  """A 4-bit block-quantized kernel; see the module docstring for the layout."""

  codes: jax.Array
  absmax: jax.Array
  absmax_scale: Any
  absmax_mean: Any
  kernel_shape: tuple[int, ...] = struct.field(pytree_node=False)
  roles: tuple[str, ...] = struct.field(pytree_node=False)
  kind: str = struct.field(pytree_node=False)
  block_size: int = struct.field(pytree_node=False)
  dtype_name: str = struct.field(pytree_node=False)

  is_jlora_node = True

  # ------------------------------------------------------------------ shape facts

  @property
  def n_lead(self) -> int:
    return self.codes.ndim - 2

  @property
  def double_quant(self) -> bool:
    return self.absmax_scale is not None

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.codes.shape[: self.n_lead], *self.kernel_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

  def _matrix_dims(self) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    in_axes = tuple(i for i, r in enumerate(self.roles) if r == IN)
    other = tuple(i for i, r in enumerate(self.roles) if r != IN)
    n_in = math.prod(self.kernel_shape[i] for i in in_axes)
    n_out = math.prod(self.kernel_shape[i] for i in other)
    return n_in, n_out, in_axes, other

  # ------------------------------------------------------------------ decoding

  def block_absmax(self) -> jax.Array:
    """The absmax each block decodes with, fp32 [*lead, I // block_size, O]."""
    n_in, n_out, _, _ = self._matrix_dims()
    lead = self.codes.shape[: self.n_lead]
    n_blocks = n_in // self.block_size
    if not self.double_quant:
      return self.absmax.astype(jnp.float32)
    q = self.absmax.astype(jnp.float32).reshape(*lead, -1, DQ_BLOCK)
    flat = (q * (self.absmax_scale.astype(jnp.float32)[..., None] / 127.0)).reshape(*lead, -1)
    flat = flat[..., : n_blocks * n_out] + self.absmax_mean.astype(jnp.float32)[..., None]
    return flat.reshape(*lead, n_blocks, n_out)

  def code_indices(self) -> jax.Array:
    """The 4-bit code indices, uint8 [*lead, I, O]."""
    lead = self.codes.shape[: self.n_lead]
    low = self.codes & jnp.uint8(0x0F)
    high = self.codes >> jnp.uint8(4)
    half, n_out = self.codes.shape[-2:]
    return jnp.stack([low, high], axis=-2).reshape(*lead, 2 * half, n_out)

  def dequantize(self) -> jax.Array:
    """The weight, [*lead, *kernel_shape] in `dtype`. Pure jnp; works stacked or per layer.

    One jitted function (cached per structure and shape, inlined when traced inside jit).
    """
    return _dequantize_jit(self)

  def _dequantize(self) -> jax.Array:
    n_in, n_out, in_axes, other = self._matrix_dims()
    lead = self.codes.shape[: self.n_lead]
    values = _decode(self.code_indices(), self.kind)  # [*lead, I, O] fp32
    bs = self.block_size
    values = values.reshape(*lead, n_in // bs, bs, n_out) * self.block_absmax()[..., :, None, :]
    moved = values.reshape(*lead, *(self.kernel_shape[i] for i in in_axes + other))
    perm = in_axes + other
    inverse = tuple(int(i) for i in np.argsort(perm))
    n = len(lead)
    w = jnp.transpose(moved, (*range(n), *(n + i for i in inverse)))
    return w.astype(self.dtype)

  def __jax_array__(self):
    return self.dequantize()

  def __getitem__(self, index):
    return config_lib.whole_weight(self, index)

  # ------------------------------------------------------------------ sharding

  def partition_spec(self, kernel_spec, mesh=None) -> QuantizedWeight:
    """PartitionSpecs for the children, derived from the full kernel's spec (see the module docstring)."""
    spec = tuple(kernel_spec) if kernel_spec is not None else ()
    spec = spec + (None,) * (self.ndim - len(spec))
    if len(spec) != self.ndim:
      raise ValueError(
        f"partition_spec: kernel spec {kernel_spec} has more entries than the weight has axes "
        f"({self.shape})."
      )
    n = self.n_lead
    lead, per_layer = spec[:n], spec[n:]
    _, _, in_axes, other = self._matrix_dims()
    in_spec = _merge_axis_specs(per_layer[i] for i in in_axes)
    out_spec = _merge_axis_specs(per_layer[i] for i in other)
    half_spec = block_spec = None
    if mesh is None:
      current = jax.sharding.get_abstract_mesh()  # set by jax.set_mesh / jax.sharding.set_mesh
      mesh = current if current is not None and not current.empty else None
    if in_spec is not None and mesh is not None:
      names = (in_spec,) if isinstance(in_spec, str) else in_spec
      ways = math.prod(dict(mesh.shape)[a] for a in names)
      n_in = self.codes.shape[-2] * 2
      half_spec = in_spec if (n_in // 2) % ways == 0 else None
      block_spec = in_spec if (n_in // self.block_size) % ways == 0 else None
    codes = PartitionSpec(*lead, half_spec, out_spec)
    if not self.double_quant:
      return self.replace(codes=codes, absmax=PartitionSpec(*lead, block_spec, out_spec))
    return self.replace(
      codes=codes,
      absmax=PartitionSpec(*lead, None),
      absmax_scale=PartitionSpec(*lead, None),
      absmax_mean=PartitionSpec(*lead),
    )


_dequantize_jit = jax.jit(lambda q: q._dequantize())


def _decode(idx: jax.Array, kind: str) -> jax.Array:
  """Code indices -> table values, elementwise (no gather, so it follows any sharding of idx)."""
  # A select chain over the 16 table constants: exact table values (an arithmetic decode
  # of int4 could round differently from the table), fused into one elementwise loop.
  values = jnp.zeros(idx.shape, jnp.float32)
  for k, v in enumerate(code_table(kind)):
    if v != 0.0:
      values = jnp.where(idx == k, jnp.float32(v), values)
  return values


def _merge_axis_specs(entries) -> Any:
  names: list[str] = []
  for e in entries:
    if e is None:
      continue
    names.extend((e,) if isinstance(e, str) else tuple(e))
  if not names:
    return None
  return names[0] if len(names) == 1 else tuple(names)


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedWeight)


def dequantized(weight):
  """The weight as a plain array: quantized nodes are decoded, anything else passes through."""
  return weight.dequantize() if is_quantized(weight) else weight


# --------------------------------------------------------------------------- one array


def _nearest_code(x: jax.Array, kind: str) -> jax.Array:
  """Index of the nearest code value to x (x in [-1, 1]), uint8."""
  if kind == "int4":
    return (jnp.clip(jnp.round(x * 7.0), -7, 7) + 8).astype(jnp.uint8)
  # Index = number of midpoints below x: 15 fused compares, no [.., 15] intermediate.
  mids = (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2.0
  idx = jnp.zeros(x.shape, jnp.uint8)
  for m in mids:
    idx = idx + (x > m).astype(jnp.uint8)
  return idx


def _double_quantize(absmax: jax.Array, n_lead: int):
  """absmax fp32 [*lead, nb, O] -> (int8 [*lead, P], fp32 [*lead, P//256], fp32 [*lead])."""
  lead = absmax.shape[:n_lead]
  flat = absmax.reshape(*lead, -1)
  mean = jnp.mean(flat, axis=-1)
  centred = flat - mean[..., None]
  pad = (-flat.shape[-1]) % DQ_BLOCK
  centred = jnp.pad(centred, [(0, 0)] * n_lead + [(0, pad)])
  blocks = centred.reshape(*lead, -1, DQ_BLOCK)
  scale = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(blocks / safe[..., None] * 127.0), -127, 127).astype(jnp.int8)
  return q.reshape(*lead, -1), scale.astype(jnp.float32), mean.astype(jnp.float32)


def quantize_array(
  w,
  *,
  kind: str = "nf4",
  block_size: int = 64,
  double_quant: bool = True,
  roles: Sequence[str] = ("in", "out"),
  n_lead: int = 0,
  scale_dtype=jnp.float32,
  dtype=None,
) -> QuantizedWeight:
  """Quantizes one kernel `w` of shape [*lead, *per_layer] (per_layer axes have `roles`)."""
  _check_kind(kind, "kind")
  _check_block_size(block_size, "block_size")
  roles = tuple(roles)
  w = jnp.asarray(w)
  if (
    isinstance(n_lead, bool)
    or not isinstance(n_lead, int)
    or n_lead < 0
    or n_lead + len(roles) != w.ndim
  ):
    raise ValueError(
      f"quantize_array: shape {w.shape} does not have n_lead={n_lead!r} leading axes plus one "
      f"axis per role {roles}."
    )
  if IN not in roles:
    raise ValueError(f"quantize_array: roles {roles} have no 'in' axis to quantize along.")
  dtype_name = jnp.dtype(dtype if dtype is not None else w.dtype).name
  kernel_shape = tuple(int(d) for d in w.shape[n_lead:])
  in_axes = tuple(i for i, r in enumerate(roles) if r == IN)
  n_in = math.prod(kernel_shape[i] for i in in_axes)
  if n_in % 2:
    raise ValueError(
      f"quantize_array: the input size {n_in} is odd; two codes are packed per byte along it."
    )
  if n_in % block_size:
    raise ValueError(
      f"quantize_array: the input size {n_in} is not divisible by block_size={block_size}; "
      f"valid block sizes: {_valid_block_sizes(n_in)}."
    )
  codes, absmax, scale, mean = _quantize_core(
    w, kind, int(block_size), bool(double_quant), roles, n_lead, jnp.dtype(scale_dtype)
  )
  return QuantizedWeight(
    codes=codes,
    absmax=absmax,
    absmax_scale=scale,
    absmax_mean=mean,
    kernel_shape=kernel_shape,
    roles=roles,
    kind=kind,
    block_size=int(block_size),
    dtype_name=dtype_name,
  )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _quantize_core(w, kind, block_size, double_quant, roles, n_lead, scale_dtype):
  lead = w.shape[:n_lead]
  kernel_shape = w.shape[n_lead:]
  in_axes = tuple(i for i, r in enumerate(roles) if r == IN)
  other = tuple(i for i, r in enumerate(roles) if r != IN)
  n_in = math.prod(kernel_shape[i] for i in in_axes)
  n_out = math.prod(kernel_shape[i] for i in other)
  perm = (*range(n_lead), *(n_lead + i for i in in_axes + other))
  matrix = (
    jnp.transpose(w, perm).astype(jnp.float32).reshape(*lead, n_in // block_size, block_size, n_out)
  )
  absmax = jnp.max(jnp.abs(matrix), axis=-2)  # [*lead, nb, O]
  safe = jnp.where(absmax > 0, absmax, 1.0)
  idx = _nearest_code(matrix / safe[..., None, :], kind).reshape(*lead, n_in // 2, 2, n_out)
  codes = idx[..., 0, :] | (idx[..., 1, :] << jnp.uint8(4))
  if double_quant:
    q, scale, mean = _double_quantize(absmax, n_lead)
    return codes, q, scale, mean
  return codes, absmax.astype(scale_dtype), None, None


def _valid_block_sizes(n_in: int) -> list[int]:
  return [b for b in range(1, min(n_in, 1024) + 1) if n_in % b == 0]


# --------------------------------------------------------------------------- trees


def quantize(params, qcfg: QuantConfig, *, layout: config_lib.Layout | None = None):
  """Replaces each kernel selected by `qcfg.targets` with a QuantizedWeight. Pure.

  `params` may be boxed with Flax axis metadata (the result is unboxed, as jlora.apply's
  is). Kernels with more than two axes need their roles: from `layout`
  (`jlora.trace_layout`) or from axis metadata naming the scan axis 'layers'.
  Embeddings and the output head are kept unless `targets` names them.
  """
  if not isinstance(qcfg, QuantConfig):
    raise TypeError(f"quantize: expected a QuantConfig, got {type(qcfg).__name__}.")
  _check_not_quantized(params)
  chosen = set(
    config_lib.select(
      params, qcfg.targets, qcfg.exclude, field="QuantConfig.targets", layout=layout
    )
  )

  def visit(path, name, value, n_lead, roles):
    if config_lib.is_node(value):
      raise ValueError(
        f"quantize: {path!r} already holds a {type(value).__name__}; quantize before jlora.apply."
      )
    _check_quantizable(path, name, tuple(value.shape)[n_lead:], roles, qcfg.block_size)
    todo[path] = (value, n_lead, roles)
    return value

  todo: dict[str, tuple[Any, int, tuple[str, ...]]] = {}
  unboxed = config_lib.map_selected(params, chosen, visit, layout)
  nodes = _quantized_nodes(todo, qcfg)
  targets = config_lib.target_paths(unboxed)
  return jax.tree_util.tree_map_with_path(
    lambda kp, v: _replaced(v, nodes.get(targets.get(config_lib.path_str(kp)))),
    unboxed,
    is_leaf=config_lib.is_opaque,
  )


def _replaced(leaf, node):
  return leaf if node is None else boxes.reboxed(leaf, node)


def _check_not_quantized(params) -> None:
  for leaf in jax.tree.leaves(params, is_leaf=config_lib.is_node):
    if is_quantized(leaf) or is_quantized(getattr(leaf, "base", None)):
      raise ValueError(
        "quantize: the params are already quantized (they hold QuantizedWeight nodes). "
        "Call jlora.quant.dequantize(params) first to re-quantize with other settings."
      )


def _check_quantizable(path: str, name: str, per_layer, roles, block_size: int) -> None:
  """Raises unless the kernel's input size packs into pairs of 4-bit codes and whole blocks."""
  n_in = math.prod(d for d, r in zip(per_layer, roles) if r == IN)
  if n_in % 2:
    raise ValueError(
      f"quantize: {path}/{name} has an odd input size {n_in} (shape {per_layer}, roles {roles}); 4-bit codes "
      f"are packed in pairs along it. Exclude it (QuantConfig.exclude=[{path.rpartition('/')[2]!r}])."
    )
  if n_in % block_size:
    raise ValueError(
      f"quantize: {path}/{name} has input size {n_in} (shape {per_layer}, roles {roles}), which is not "
      f"divisible by QuantConfig.block_size={block_size}. Valid block sizes for it: "
      f"{_valid_block_sizes(n_in)}; or exclude it "
      f"(QuantConfig.exclude=[{path.rpartition('/')[2]!r}])."
    )


def _quantized_nodes(todo: dict, qcfg: QuantConfig) -> dict[str, QuantizedWeight]:
  """{path: QuantizedWeight} for each (value, n_lead, roles) in `todo`."""
  # One compiled program for all selected kernels (one compile instead of one per shape).
  keys = sorted(todo)
  outputs = _quantize_many(
    tuple(todo[k][0] for k in keys),
    tuple((todo[k][2], todo[k][1]) for k in keys),
    qcfg.kind,
    qcfg.block_size,
    qcfg.double_quant,
    jnp.dtype(qcfg.scale_dtype),
  )
  nodes = {}
  for k, (codes, absmax, scale, mean) in zip(keys, outputs):
    value, n_lead, roles = todo[k]
    nodes[k] = QuantizedWeight(
      codes=codes,
      absmax=absmax,
      absmax_scale=scale,
      absmax_mean=mean,
      kernel_shape=tuple(int(d) for d in value.shape[n_lead:]),
      roles=roles,
      kind=qcfg.kind,
      block_size=qcfg.block_size,
      dtype_name=jnp.dtype(qcfg.dtype if qcfg.dtype is not None else value.dtype).name,
    )
  return nodes


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_many(values, layouts, kind, block_size, double_quant, scale_dtype):
  return tuple(
    _quantize_core(v, kind, block_size, double_quant, roles, n_lead, scale_dtype)
    for v, (roles, n_lead) in zip(values, layouts)
  )


def _dequantize_leaf(x):
  base = getattr(x, "base", None)
  if config_lib.is_node(x) and is_quantized(base):
    return x.replace(base=base.dequantize())
  return dequantized(x)


def dequantize(params):
  """Every QuantizedWeight (also a LoRA node's quantized base) becomes a plain array."""
  return jax.tree.map(_dequantize_leaf, params, is_leaf=config_lib.is_node)


def quantized_nodes(params) -> list[QuantizedWeight]:
  out = []
  for leaf in jax.tree.leaves(params, is_leaf=config_lib.is_node):
    if is_quantized(leaf):
      out.append(leaf)
    elif is_quantized(getattr(leaf, "base", None)):
      out.append(leaf.base)
  return out


def bytes_per_weight(params) -> float:
  """Bytes stored by all QuantizedWeight nodes (their actual leaves) per quantized weight."""
  nodes = quantized_nodes(params)
  if not nodes:
    raise ValueError("bytes_per_weight: the params hold no QuantizedWeight nodes.")
  return sum(n.nbytes for n in nodes) / sum(n.size for n in nodes)

"""The trainer's config: sections that are library dataclasses, all checked before the model loads.

`config.lora` holds exactly the fields of `jlora.LoraConfig` and `config.quant` those of
`jlora.QuantConfig` (built by `dataclass_section`), so every library field, patterns included, is
settable as `--config.lora.<field>=...`; `library_config` turns a section back into the dataclass.
`config.model` holds `path` (and `nnx`, an NNX model's factory) plus every field of every model family's config class (dtype,
remat_policy, rope_theta, Gemma's layer_types, ...; None: the checkpoint's value), checked against
the family of the checkpoint. Every message names the field as the user typed it: `config.lora.rank`, not
`LoraConfig.rank`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

import jlora
from jlora.models import registry
from jlora.models.export import check_gguf_type
from jlora.models.registry import FAMILIES
from jlora.sharding import BATCH_AXES, MESH_AXES
from train import data as data_lib
from train.errors import UserError, closest_first
from train.evaluate import check_metrics

# config.quant.kind = "none" trains on the full-precision base (plain LoRA).
NO_QUANT = "none"
LIBRARY_SECTIONS = {"lora": jlora.LoraConfig, "quant": jlora.QuantConfig}
# Positive integers, by their config path.
POSITIVE_INTS = (
  "steps",
  "data.batch_size",
  "data.grad_accum",
  "data.max_length",
  "data.eval_batch_size",
  "save_every",
  "eval_every",
  "log_every",
  "max_new_tokens",
)
NON_NEGATIVE_INTS = ("eval_examples", "samples", "optim.warmup_steps")
# Adam steps move each weight by about lr; at 1 or more LoRA training only diverges.
MAX_LR = 1.0
# The data specs whose contents a run records (data_lib.content_fingerprint), under this key.
DATA_FIELDS = ("train", "eval")
DATA_CONTENT = "data_content"
# What a checkpoint must agree with to be resumed.
FINGERPRINT_FIELDS = ("model", "data", "lora", "quant", "optim", "tokens", "seed", "steps")
# A task's own section (train.dpo's `dpo`), when the config has one.
OPTIONAL_FINGERPRINT_FIELDS = ("dpo",)
# config.model fields the trainer reads itself; every other one is a field of the model config class.
# nnx: "package.module:factory" for an NNX model (see train.nnx_model); None: off.
TRAINER_MODEL_FIELDS = ("path", "nnx")
# Model config fields set by the checkpoint's architecture only, never by the user.
FIXED_MODEL_FIELDS = ("model_type",)
# Fields whose valid values depend on the checkpoint's shape: checked once the checkpoint is read.
CHECKPOINT_SHAPED_FIELDS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "head_dim",
  "layer_types",
)
_SIMPLE_TYPES = (bool, int, float, str)


# --------------------------------------------------------------------------- dataclass sections


def dataclass_section(cls, **overrides) -> ml_collections.ConfigDict:
  """One entry per field of dataclass `cls`: the library's default, or `overrides[field]`.

  Fields that take several types (targets: 'all-linear', a regex or a list; patterns: dicts;
  optional values) are typed `object`, so the command line accepts any Python literal there;
  dtypes are stored by name ('float32'), so they print and compare as text.
  """
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise TypeError(f"{cls.__name__} has no field(s) {unknown}.")
  section = ml_collections.ConfigDict()
  for field in dataclasses.fields(cls):
    value = overrides[field.name] if field.name in overrides else _default(field)
    if field.name.endswith("dtype") and value is not None:
      value = jnp.dtype(value).name
    if hints[field.name] in _SIMPLE_TYPES and isinstance(value, _SIMPLE_TYPES):
      section[field.name] = value
    else:
      section[field.name] = ml_collections.FieldReference(value, field_type=object)
  return section


def _default(field: dataclasses.Field):
  if field.default is not dataclasses.MISSING:
    return field.default
  return field.default_factory()


def parse_targets(value):
  """Module names ('q_proj' or 'q_proj,v_proj') become a list; 'all-linear', a regex or a list
  is kept. As on the command line before: a bare name is a name, not a regex."""
  if isinstance(value, str) and value != "all-linear":
    if re.fullmatch(r"[\w./-]+(\s*,\s*[\w./-]+)*", value.strip()):
      return [t.strip() for t in value.split(",")]
  return value


def library_config(config, name: str):
  """`jlora.LoraConfig(**config.lora)` (or QuantConfig for 'quant'), with errors in config terms."""
  cls = LIBRARY_SECTIONS[name]
  values = config[name].to_dict()
  fields = {f.name for f in dataclasses.fields(cls)}
  for key in sorted(set(values) - fields):
    raise UserError(
      f"config.{name}.{key} is not a field of jlora.{cls.__name__}; valid fields: "
      f"{', '.join(sorted(fields))}."
    )
  for key in ("targets", "exclude"):
    values[key] = parse_targets(values.get(key))
    if values[key] == "":
      values[key] = None
  with user_words(section=f"config.{name}"):
    return cls(**values)


def quant_config(config) -> jlora.QuantConfig | None:
  kinds = (NO_QUANT, *jlora.quant.KINDS)
  if config.quant.kind not in kinds:
    raise UserError(
      f"config.quant.kind: {config.quant.kind!r} is not valid; expected one of "
      f"{', '.join(map(repr, kinds))}."
    )
  return None if config.quant.kind == NO_QUANT else library_config(config, "quant")


LIBRARY_NAMES = {"LoraConfig": "config.lora", "QuantConfig": "config.quant"}


@contextlib.contextmanager
def user_words(names: dict[str, str] | None = None, section: str | None = None):
  """Re-raises a library ValueError/TypeError as a UserError in config terms: `LoraConfig.rank`
  becomes `config.lora.rank`; a message naming no config field is prefixed with `section`."""
  names = LIBRARY_NAMES if names is None else names
  try:
    yield
  except (ValueError, TypeError) as error:
    message = str(error)
    for library, config in names.items():
      message = message.replace(f"{library}.", f"{config}.").replace(f"{library} ", f"{config} ")
    if section and "config." not in message:
      message = f"{section}: {message}"
    raise UserError(message) from error


# --------------------------------------------------------------------------- model section


def family_fields() -> dict[str, list[str]]:
  """Every settable model config field -> the families whose config class has it."""
  out: dict[str, list[str]] = {}
  for family in FAMILIES:
    for field in dataclasses.fields(family.config_cls):
      if field.name not in FIXED_MODEL_FIELDS:
        out.setdefault(field.name, []).append(family.name)
  return out


def model_section(**values) -> ml_collections.ConfigDict:
  """config.model: the trainer's own fields (`path`) plus every field of every family's model
  config class, so each is settable as --config.model.FIELD=VALUE. A field left at None takes the
  checkpoint's value; `values` sets fields (with their types) as the config file shows them."""
  section = ml_collections.ConfigDict()
  for name, value in values.items():
    section[name] = value
  if "nnx" not in section:
    section["nnx"] = ml_collections.FieldReference(None, field_type=object)
  for name in sorted(family_fields()):
    if name not in section:
      section[name] = ml_collections.FieldReference(None, field_type=object)
  return section


def model_overrides(config, hf_config: dict | None = None) -> dict[str, Any]:
  """The config.model fields set (not None), but the trainer's own, as model config overrides
  (dtypes as jnp dtypes). With the checkpoint's `hf_config`, checked against its family's config
  class on the real shape; without, against every family on the default shape (fields that depend
  on the shape aside)."""
  values = {
    k: v
    for k, v in config.model.to_dict().items()
    if k not in TRAINER_MODEL_FIELDS and v is not None
  }
  out = {}
  for key, value in values.items():
    out[key] = _dtype(f"config.model.{key}", value) if key.endswith("dtype") else value
  if hf_config is not None:
    family = registry.family_for_config(hf_config)
    _check_model_fields(out, family)
    with user_words(section="config.model"):
      registry.config_from_hf(hf_config, **out)
    return out
  shapeless = {k: v for k, v in out.items() if k not in CHECKPOINT_SHAPED_FIELDS}
  for family in FAMILIES:
    names = {f.name for f in dataclasses.fields(family.config_cls)}
    if set(shapeless) <= names:
      with user_words(section="config.model"):  # the model's own checks, on its default shape
        family.config_cls(**shapeless)
  return out


def _check_model_fields(values: dict, family) -> None:
  valid = {f.name for f in dataclasses.fields(family.config_cls)} - set(FIXED_MODEL_FIELDS)
  for key in values:
    if key not in valid:
      others = [f for f in family_fields().get(key, []) if f != family.name]
      where = f" (a field of the {', '.join(others)} family)" if others else ""
      raise UserError(
        f"config.model.{key}{where} is not a field of {family.config_cls.__name__}, the config of "
        f"this checkpoint's {family.name} family; valid: "
        f"{', '.join([*TRAINER_MODEL_FIELDS, *closest_first(key, valid)])}."
      )


def _dtype(field: str, value):
  try:
    return jnp.dtype(value)
  except TypeError:
    raise UserError(
      f"{field}: {value!r} is not a dtype; expected e.g. 'float32' or 'bfloat16'."
    ) from None


# --------------------------------------------------------------------------- checks


def get(config, path: str):
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def check_config(config) -> None:
  """Every check that needs no model: numbers, library sections, model overrides, the mesh."""
  for path in POSITIVE_INTS + NON_NEGATIVE_INTS:
    value, least = get(config, path), 1 if path in POSITIVE_INTS else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      what = "a positive integer" if least else "an integer >= 0"
      raise UserError(f"config.{path}: {value!r} is not valid; expected {what}.")
  if config.data.max_length < 2:
    raise UserError(
      f"config.data.max_length: {config.data.max_length} is not valid; expected >= 2."
    )
  if config.data.batch_size % config.data.grad_accum:
    raise UserError(
      f"config.data.batch_size: {config.data.batch_size} is not divisible by "
      f"config.data.grad_accum={config.data.grad_accum}; make it a multiple."
    )
  if config.export_gguf:  # checked now, not after training
    try:
      check_gguf_type(config.export_gguf, "config.export_gguf")
    except ValueError as e:
      raise UserError(str(e)) from None
  check_optim(config.optim)
  check_tokens(config)
  library_config(config, "lora")
  quant_config(config)
  model_overrides(config)
  check_metrics(config.eval.metrics)
  mesh_sizes(config)


def check_optim(optim) -> None:
  lr = optim.lr
  if not isinstance(lr, (int, float)) or not (0 < lr < MAX_LR) or not math.isfinite(lr):
    raise UserError(
      f"config.optim.lr: {lr!r} is not valid; expected a number in (0, {MAX_LR:g}) "
      "(LoRA typically uses 1e-5 to 1e-3)."
    )
  for name in ("weight_decay", "clip_norm", "loraplus_ratio"):
    value = optim.get(name, 0.0)
    if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
      raise UserError(f"config.optim.{name}: {value!r} is not valid; expected a number >= 0.")


def check_tokens(config) -> None:
  new = config.get("tokens", {}).get("add") or []
  if not isinstance(new, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in new):
    raise UserError(
      f"config.tokens.add: {new!r} is not valid; expected a list of token strings, e.g. "
      "\"['<tool>', '</tool>']\"."
    )
  if len(set(new)) != len(new):
    raise UserError(f"config.tokens.add: {new!r} lists a token twice.")
  chat_template_text(config)


def chat_template_text(config) -> str:
  """config.tokens.chat_template's template: the text itself, or the named jinja file's ("" for
  none)."""
  value = config.get("tokens", {}).get("chat_template") or ""
  if not isinstance(value, str):
    raise UserError(
      f"config.tokens.chat_template: {value!r} is not valid; expected a jinja file's path or "
      "the template text."
    )
  if not value or "{{" in value or "{%" in value:
    return value
  path = Path(value).expanduser()
  if not path.is_file():
    raise UserError(
      f"config.tokens.chat_template: {value!r} is no file; expected a jinja template file's "
      "path, or the template text itself (with {{ ... }} or {% ... %})."
    )
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"config.tokens.chat_template: {value!r} can't be read: {e}") from None


def mesh_sizes(config, devices: int | None = None) -> dict[str, int]:
  """{data, fsdp, tensor, expert} sizes that use every device, or an error naming config.mesh.*."""
  devices = jax.device_count() if devices is None else devices
  sizes = {axis: config.mesh.get(axis, 1) for axis in MESH_AXES}  # configs older than an axis: 1
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise UserError(
        f"config.mesh.{axis}: {size!r} is not valid; expected a positive integer, or -1 for the "
        "remaining devices."
      )
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise UserError(
      f"config.mesh: {', '.join('config.mesh.' + a for a in free)} are all -1; at most one axis "
      "may take the remaining devices."
    )
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if devices % fixed:
      raise UserError(
        f"config.mesh.{free[0]}: -1 can't take the rest of the {devices} devices, because the "
        f"other config.mesh axes multiply to {fixed}, which does not divide {devices}."
      )
    sizes[free[0]] = devices // fixed
  used = math.prod(sizes.values())
  if jax.process_count() > 1:  # the devices of every process count
    devices_word = f"devices of {jax.process_count()} processes"
  else:
    devices_word = "devices"
  if used != devices:
    shown = " x ".join(f"config.mesh.{a}={config.mesh.get(a, 1)}" for a in MESH_AXES)
    problem = (
      f"needs {used} devices, but only {devices} exist"
      if used > devices
      else f"uses {used} of the {devices} {devices_word}, leaving {devices - used} idle "
      f"(devices {used}..{devices - 1} would hold no shard and do no work)"
    )
    raise UserError(
      f"{shown} {problem}; make the product {devices}, or set one axis to -1 to take the rest."
    )
  rows = config.data.batch_size // config.data.grad_accum
  shards = math.prod(sizes[axis] for axis in BATCH_AXES)
  split = " x ".join(f"config.mesh.{axis}" for axis in BATCH_AXES)
  if rows % shards:
    raise UserError(
      f"config.data.batch_size: {config.data.batch_size} / config.data.grad_accum="
      f"{config.data.grad_accum} = {rows} rows per microbatch do not split over {split} = "
      f"{shards} shards; make it a multiple of {shards}."
    )
  if config.data.eval_batch_size % shards:
    raise UserError(
      f"config.data.eval_batch_size: {config.data.eval_batch_size} rows do not split over "
      f"{split} = {shards} shards ({devices} {devices_word}); make it a multiple of {shards}."
    )
  return sizes


# --------------------------------------------------------------------------- fingerprint


def fingerprint(config) -> dict:
  """The settings a checkpoint must share to be resumed, as plain JSON values."""
  out = {}
  for key in FINGERPRINT_FIELDS + tuple(k for k in OPTIONAL_FINGERPRINT_FIELDS if k in config):
    value = config.get(key)
    out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  # Model fields left at None take the checkpoint's value: not a setting of this run.
  out["model"] = {k: v for k, v in out["model"].items() if v is not None}
  # What the data files hold, not only their names: new rows under the same name are another run.
  out[DATA_CONTENT] = {
    name: data_lib.content_fingerprint(config.data[name])
    for name in DATA_FIELDS
    if name in config.data
  }
  return _jsonable(out)


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, _SIMPLE_TYPES):
    return value
  return str(value)


def fingerprint_differences(saved: dict, current: dict, prefix: str = "config") -> list[str]:
  """'config.lora.rank: 4 -> 8' for each field whose value differs (or exists on one side only)."""
  out = []
  for key in sorted(set(saved) | set(current)):
    if prefix == "config" and key == DATA_CONTENT and key not in saved:
      continue  # a run recorded before data fingerprints existed
    path = f"{prefix}.{key}" if key != DATA_CONTENT else "the data in config.data"
    old, new = saved.get(key, "<unset>"), current.get(key, "<unset>")
    if prefix == "config" and isinstance(old, dict) and isinstance(new, dict):  # a section
      out += fingerprint_differences(old, new, path)
    elif old != new:
      out.append(f"{path}: {old!r} -> {new!r}")
  return out

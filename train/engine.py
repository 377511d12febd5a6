"""Continuous batching for `train.serve`: fixed sequence slots, one compiled decode step for all.

Requests join and leave between decode steps. Each slot (a row of the batch) carries its own
adapter id, RoPE position and KV-cache row, so one compiled step serves every request whatever
adapter it names. The requests waiting when slots free up are prefilled together, a batch per
padded length (`buckets`, so new prompt lengths don't recompile) of a power-of-two size
(`batch_buckets`): one call over several prompts costs a third less CPU per prompt than one
call each (SmolLM2-135M, 48 tokens, 8 prompts), and the decode steps wait for one call, not several.
A prompt whose first multiples of PREFIX_BLOCK tokens were prefilled before on the same adapter
(`PrefixCache`) starts from their keys/values: the call computes only the rest, after them.

The KV cache (the model's own `init_cache`) has one write column, `index`, shared by every row:
that keeps its shapes static. So a slot's tokens sit in the columns just before it,
[index - len, index), and segment ids mark each row's own columns (0 elsewhere: never attended,
so rows never see stale or foreign entries). A joining request's prefilled keys/values are
copied into its row ending at `index`. The cache is only as wide as the longest live row needs,
rounded up to one of a few widths (`cache_widths`), since every step attends over every column:
when `index` reaches the end, or the live rows fit a narrower width, every row's columns are
moved together into a cache of the width they need (each row ends at `index`, so one shift
keeps them all contiguous). Each width compiles its own decode step, once.

A decode step computes only the rows up to the highest live slot, rounded up to a power of two
(`row_buckets`; requests take the lowest free slots): with one client a step is one row, not
`max_num_seqs`. Those rows are sliced out of the cache and written back in place. Each (rows,
width) pair compiles its own step, all at start-up (`warm_up`). With a mesh every step computes
every row, so the rows keep splitting evenly over its batch axes.

Adapters live in one stack of `max_loras` entries of rank `max_lora_rank` (jlora.stack_adapters
over zero adapters; smaller ranks are zero-padded, which is exact, and each adapter's scale is
folded into its B), so loading one writes arrays of the same shapes and never recompiles. An
entry is reused only when no request still runs on it: in-flight requests finish on the adapter
they started with.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.models.nnx_causal import peft_names, weight_layout
from jlora.multi import BASE, is_stacked
from train.generate import last_logits, nucleus

log = logging.getLogger(__name__)

# Cache widths are multiples of this (then doublings); a re-layout leaves at least HEADROOM free
# columns, so the live rows move at most once every HEADROOM steps.
CACHE_BUCKET = 32
HEADROOM = 16
# A prefill call holds at most this many padded tokens (or one prompt): a burst of long prompts
# is prefilled in a few calls, so the running requests' next tokens are not held up by all of it.
PREFILL_TOKENS = 1024
# When several requests just finished (within RECENT_S), as many new ones are likely on their way
# (clients sending their next request): arrivals are gathered up to GATHER_S (from the oldest
# waiting one) so that one prefill serves them all, rather than one call per arrival, each
# stalling the running rows and leaving a decode step of fewer rows.
GATHER_S = 0.03
RECENT_S = 1.0
# Prompts are padded to multiples of PROMPT_STEP tokens (then doublings), and the keys/values of
# their first multiples of PREFIX_BLOCK tokens are kept per adapter (`PrefixCache`), so a prompt
# that starts like an earlier one (a chat template's system prompt, a repeated question) prefills
# only the rest. (Blocks of 8 would reuse a little more, but each cached length compiles its own
# prefill programs.)
PROMPT_STEP = 8
PREFIX_BLOCK = 16


class AdapterError(ValueError):
  """An adapter that can't be loaded or unloaded; `status` is the HTTP status to answer with."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class Request:
  """One generation. `emit` receives ("token", id) per new token, then ("done", finish_reason)
  ("stop": an eos token, "length": max_tokens) or ("error", http_status, message); it is called
  from the engine thread. Set `cancelled` to free the slot early (client gone, stop string seen)."""

  prompt: Sequence[int]
  adapter: str
  max_tokens: int
  emit: Callable[[tuple], None]
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  arrived: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _Running:
  request: Request
  adapter_id: int
  produced: int = 0
  token: int = 0  # the last sampled token, fed to the next step


class AdapterTable:
  """Adapter names -> stack entries, and how many running requests use each entry."""

  def __init__(self, capacity: int):
    self.ids: dict[str, int] = {}
    self.paths: dict[str, str] = {}
    self.users = [0] * capacity

  def free_entry(self) -> int | None:
    """An entry no name maps to and no request runs on (so writing it changes nothing running)."""
    taken = set(self.ids.values())
    return next((i for i, n in enumerate(self.users) if n == 0 and i not in taken), None)

  def acquire(self, name: str) -> int:
    if name == BASE:
      return -1
    entry = self.ids[name]  # KeyError: not loaded (any more)
    self.users[entry] += 1
    return entry

  def release(self, entry: int) -> None:
    if entry >= 0:
      self.users[entry] -= 1


def length_buckets(max_len: int, step: int, multiples: int) -> list[int]:
  """Padded lengths: `multiples` multiples of `step`, then doubling; the last is max_len."""
  buckets = [min(step, max_len)]
  while buckets[-1] < max_len:
    last = buckets[-1]
    buckets.append(min(last + step if last < multiples * step else 2 * last, max_len))
  return buckets


def prompt_buckets(max_len: int) -> list[int]:
  """Prefill lengths (of the tokens after a cached prefix): PROMPT_STEP multiples up to 128,
  then doubling."""
  return length_buckets(max_len, PROMPT_STEP, 16)


class PrefixCache:
  """Keys/values of prompt prefixes, per adapter entry, for `Engine.prefill` to start from.

  A prompt's first k * PREFIX_BLOCK tokens (at least one token left after them) map to a batch-1
  cache tree whose k/v hold exactly those columns (other leaves as they were). The least recently
  used are dropped beyond `capacity` bytes; an adapter entry's are dropped when another adapter is
  written into it (its keys/values depend on the adapter).
  """

  def __init__(self, capacity: int):
    self.capacity, self.size = capacity, 0
    self.entries: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (tree, bytes)

  @staticmethod
  def lengths(prompt_len: int) -> range:
    """Prefix lengths kept for a prompt: the multiples of PREFIX_BLOCK below its length."""
    return range(PREFIX_BLOCK, prompt_len, PREFIX_BLOCK)

  def longest(self, adapter_id: int, prompt: Sequence[int], limit: int):
    """(tree, length) of the longest cached prefix of `prompt` up to `limit` tokens (None, 0)."""
    for length in reversed(self.lengths(min(len(prompt), limit + 1))):
      key = (adapter_id, tuple(prompt[:length]))
      if key in self.entries:
        self.entries.move_to_end(key)
        return self.entries[key][0], length
    return None, 0

  def add(self, adapter_id: int, prompt: Sequence[int], row_cache, start: int, have: int) -> None:
    """Keeps the prefixes longer than `have` of a prompt whose k/v sit in `row_cache` (batch 1)
    from column `start`."""
    lengths = [n for n in self.lengths(len(prompt)) if n > have]
    if self.capacity <= 0 or not lengths:
      return
    whole = _columns(row_cache, start, lengths[-1])
    for length in lengths:
      key = (adapter_id, tuple(prompt[:length]))
      if key in self.entries:
        continue
      tree = _columns(whole, 0, length)
      size = sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim >= 4)
      self.entries[key], self.size = (tree, size), self.size + size
    while self.size > self.capacity and self.entries:
      self.size -= self.entries.popitem(last=False)[1][1]

  def drop(self, adapter_id: int) -> None:
    for key in [key for key in self.entries if key[0] == adapter_id]:
      self.size -= self.entries.pop(key)[1]


def _columns(cache, start: int, length: int):
  """Columns [start, start + length) of a cache tree's k/v; its other leaves (segment ids, index:
  unused by a prefix) become scalars, so every prefix of a length has the same shapes (one
  compiled prefill)."""

  def cut(x):
    if x.ndim < 4:
      return jnp.zeros((), x.dtype)
    return jax.lax.dynamic_slice_in_dim(x, start, length, axis=_column_axes(x)[1])

  return jax.tree.map(cut, cache)


def batch_buckets(max_num_seqs: int, length: int) -> list[int]:
  """Prefill batch sizes for prompts padded to `length`: powers of two up to the slots, within
  PREFILL_TOKENS (always 1)."""
  limit = min(max_num_seqs, max(PREFILL_TOKENS // length, 1))
  return [1 << i for i in range(limit.bit_length())]


def prefill_batches(shapes: Sequence[tuple[int, int]], max_num_seqs: int) -> list[list[int]]:
  """Indices of prompts of these (cached prefix, padded rest) lengths grouped into prefill calls:
  one shape per call, each shape's prompts split into batches of `batch_buckets` sizes, largest
  first (no padding rows)."""
  groups: dict[tuple[int, int], list[int]] = {}
  for i, shape in enumerate(shapes):
    groups.setdefault(shape, []).append(i)
  batches = []
  for shape, group in groups.items():
    sizes = batch_buckets(max_num_seqs, sum(shape))
    while group:
      size = max(s for s in sizes if s <= len(group))
      batches.append(group[:size])
      group = group[size:]
  return batches


def cache_widths(max_len: int) -> list[int]:
  """KV cache widths the decode step compiles for, all at start-up (8 for a 2048 context)."""
  return length_buckets(max_len, CACHE_BUCKET, 4)


def row_buckets(max_num_seqs: int) -> list[int]:
  """Row counts the decode step compiles for: powers of two below the slots, then the slots."""
  return [1 << i for i in range((max_num_seqs - 1).bit_length())] + [max_num_seqs]


def empty_stack(base_params, max_loras: int, max_lora_rank: int, targets="all-linear", layout=None):
  """params whose `targets` (LoraConfig.targets) hold `max_loras` zero adapters of rank
  max_lora_rank, scale 1. Every step computes every target's adapters, so fewer targets cost
  less (all-linear vs q,k,v,o: a SmolLM2-135M 16-row decode step takes a fifth more CPU time)."""
  cfg = jlora.LoraConfig(rank=max_lora_rank, alpha=float(max_lora_rank), targets=targets)
  template = jlora.apply(base_params, cfg, jax.random.key(0), layout=layout)
  zero = jax.tree.map(
    lambda n: n.replace(a=jnp.zeros_like(n.a), b=jnp.zeros_like(n.b)) if jlora.is_lora(n) else n,
    template,
    is_leaf=jlora.is_lora,
  )
  return jlora.stack_adapters({f"entry{i}": zero for i in range(max_loras)}, base_params)


def _stacked_nodes(params) -> dict[str, jlora.LoraWeight]:
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_stacked)[0]
  return {jax.tree_util.keystr(kp): leaf for kp, leaf in leaves if is_stacked(leaf)}


def check_fits(name: str, single, stack, targets="all-linear") -> None:
  """Refuses an adapter (stack_adapters params of one) that the server's stack can't hold."""
  ours = _stacked_nodes(stack)
  for path, node in _stacked_nodes(single).items():
    if path not in ours:
      held = targets if isinstance(targets, str) else ",".join(targets)
      raise AdapterError(
        f"adapter {name!r} adapts {path}, which the server's adapter stack does not hold "
        f"(--lora-targets {held}): train.serve serves adapters on linear layers only (not on "
        "the embeddings or lm_head); restart with --lora-targets naming this layer, or merge "
        "this adapter into the base (jlora.export_merged) and serve that instead."
      )
    rank, limit = node.a.shape[-1], ours[path].a.shape[-1]
    if rank > limit:
      raise AdapterError(
        f"adapter {name!r} has rank {rank} at {path}, over --max-lora-rank {limit}; restart "
        f"the server with --max-lora-rank {rank} or more."
      )


def _entry_factors(stack_node, one) -> tuple[np.ndarray, np.ndarray]:
  """One adapter's (a, b) for a stack entry, on the host: rank zero-padded, scale folded into b."""
  lead = stack_node.n_lead
  shape_a = stack_node.a.shape[:lead] + stack_node.a.shape[lead + 1 :]
  shape_b = stack_node.b.shape[:lead] + stack_node.b.shape[lead + 1 :]
  if one is None:
    return np.zeros(shape_a, stack_node.a.dtype), np.zeros(shape_b, stack_node.b.dtype)
  a = np.take(np.asarray(one.a), 0, axis=lead)
  b = np.take(np.asarray(one.b), 0, axis=lead)
  b = b * np.asarray(one.scales[0], b.dtype)  # what StackedLoraWeight.rows multiplies by
  rank_axis_of_b = lead + stack_node.roles.count(jlora.config.BATCH)
  pad_a, pad_b = [(0, 0)] * a.ndim, [(0, 0)] * b.ndim
  pad_a[-1] = pad_b[rank_axis_of_b] = (0, shape_a[-1] - a.shape[-1])
  return np.pad(a, pad_a).astype(stack_node.a.dtype), np.pad(b, pad_b).astype(stack_node.b.dtype)


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _set_entry(stacked: jax.Array, value, entry, lead: int) -> jax.Array:
  return stacked.at[(slice(None),) * lead + (entry,)].set(value)


def write_entry(stack, single, entry: int):
  """stack with entry `entry` holding the one adapter of `single` (zeros where it adapts nothing).

  The stack's factor arrays are updated in place (donated): `stack` must not be used afterwards.
  """
  ones = _stacked_nodes(single)

  def put(key_path, node):
    if not is_stacked(node):
      return node
    a, b = _entry_factors(node, ones.get(jax.tree_util.keystr(key_path)))
    entry_id = np.int32(entry)
    return node.replace(
      a=_set_entry(node.a, a, entry_id, node.n_lead), b=_set_entry(node.b, b, entry_id, node.n_lead)
    )

  return jax.tree_util.tree_map_with_path(put, stack, is_leaf=is_stacked)


def sample_rows(logits, seeds, steps, temperature, top_p) -> jax.Array:
  """Per-row sampling: greedy where temperature == 0, else temperature + nucleus with the row's
  own key (its seed folded with its step, so a request's draws don't depend on its neighbours)."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw():
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    cut = top_p[:, None] < 1.0
    scaled = jax.lax.cond(
      jnp.any(cut), lambda: jnp.where(cut, nucleus(scaled, top_p[:, None]), scaled), lambda: scaled
    )
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

  sampled = jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
  return jnp.where(temperature > 0, sampled, greedy)


def _column_axes(leaf) -> tuple[int, int]:
  """(batch axis, column axis) of a k/v buffer [..., batch, max_len, kv_heads, head_dim]."""
  return leaf.ndim - 4, leaf.ndim - 3


def _row_axis(x) -> int:
  """The batch (slot) axis of a cache leaf: k/v buffers and segment ids [batch, width]."""
  return _column_axes(x)[0] if x.ndim >= 4 else 0


def _row_slice(x, start: int, rows: int):
  """Rows [start, start + rows) of a cache leaf; the index (a scalar) as it is."""
  if x.ndim == 0:
    return x
  return jax.lax.slice_in_dim(x, start, start + rows, axis=_row_axis(x))


def _row_update(full, part):
  """`full` with its first rows replaced by `part`'s (the index: `part`'s, the step's new one)."""
  if full.ndim == 0:
    return part
  return jax.lax.dynamic_update_slice_in_dim(full, part.astype(full.dtype), 0, _row_axis(full))


def _one_row(x, i: int):
  """Row i of a cache leaf as a batch-1 leaf (k/v buffers, segment ids); the index as it is."""
  return _row_slice(x, i, 1)


def _width(cache) -> int:
  """Columns of a cache tree's k/v."""
  leaf = next(x for x in jax.tree.leaves(cache) if x.ndim >= 4)
  return leaf.shape[_column_axes(leaf)[1]]


def _after_prefix(cache, prefixes):
  """An empty cache (batch b) with row i's first columns holding prefixes[i]'s k/v (batch 1, P
  columns), marked as its segment and followed by the write index."""
  cached = _width(prefixes[0])

  def put(big, *ones):
    if big.ndim < 4:
      return big
    rows = jnp.concatenate(ones, axis=_column_axes(big)[0]).astype(big.dtype)
    return jax.lax.dynamic_update_slice_in_dim(big, rows, 0, _column_axes(big)[1])

  cache = jax.tree.map(put, cache, *prefixes)
  width = cache["segment_ids"].shape[1]
  segments = jnp.broadcast_to(jnp.arange(width) < cached, cache["segment_ids"].shape)
  return {
    **cache,
    "segment_ids": segments.astype(jnp.int32),
    "index": jnp.asarray(cached, jnp.int32),
  }


def _prefix_next_to_prompt(cache, cached: int, pads):
  """A prefilled cache [prefix (`cached` columns)][pad_i][tokens_i] per row made
  [pad_i][prefix][tokens_i]: each row's prompt ends at the last column, contiguous (what
  `Engine.prefill` inserts)."""

  def move(x):
    if x.ndim < 4:
      return x
    batch_axis, column_axis = _column_axes(x)
    columns = jnp.arange(x.shape[column_axis])[None]
    pad = pads[:, None]
    source = jnp.maximum(jnp.where(columns < pad + cached, columns - pad, columns), 0)
    shape = [1] * x.ndim
    shape[batch_axis], shape[column_axis] = source.shape
    return jnp.take_along_axis(x, source.reshape(shape), axis=column_axis)

  return jax.tree.map(move, cache)


@functools.partial(jax.jit, donate_argnums=0)
def _insert(cache, small, row, start):
  """cache with `small`'s (batch 1) k/v written into row `row`, columns from `start` (in place:
  `cache` is donated)."""

  def put(big, one):
    if big.ndim < 4:  # segment_ids and index: the engine sets them
      return big
    batch_axis, column_axis = _column_axes(big)
    at = [0] * big.ndim
    at[batch_axis], at[column_axis] = row, start
    return jax.lax.dynamic_update_slice(big, one.astype(big.dtype), at)

  return jax.tree.map(put, cache, small)


@functools.partial(jax.jit, static_argnums=2)
def _relayout(cache, shift, width: int):
  """cache `width` columns wide, every row's k/v columns moved by `shift` (segment ids and index
  are rewritten by the engine)."""

  def move(x):
    if x.ndim < 4:
      return x
    axis = _column_axes(x)[1]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, max(width - x.shape[axis], 0))
    moved = jnp.roll(jnp.pad(x, pad), shift, axis=axis)
    return jax.lax.slice_in_dim(moved, 0, width, axis=axis)

  return jax.tree.map(move, cache)


class Engine:
  """The slot scheduler; `start()` runs it in a background thread (`submit` from any thread)."""

  def __init__(
    self,
    model,
    base_params,
    *,
    max_num_seqs: int = 8,
    max_loras: int = 4,
    max_lora_rank: int = 16,
    max_model_len: int = 2048,
    eos_ids: Sequence[int] = (),
    model_config=None,
    mesh=None,
    lora_targets="all-linear",
    prefix_cache_mib: float = 256,
  ):
    """lora_targets: the layers adapters may adapt (LoraConfig.targets; `empty_stack`).
    prefix_cache_mib: memory for prompt prefixes' keys/values (`PrefixCache`; 0: none).
    mesh: with base params placed on it (from_pretrained(..., mesh=mesh)): the slots' KV cache
    rows split over its batch axes (when they divide max_num_seqs) and the adapter stack
    replicated, as train.evaluate splits generation prompts."""
    self.model, self.base_params, self.mesh = model, base_params, mesh
    self.model_config = model_config or peft_names(model)
    self.slots: list[_Running | None] = [None] * max_num_seqs
    self.max_model_len = max_model_len
    self.buckets = prompt_buckets(max_model_len)
    self.widths = cache_widths(max_model_len)
    self.eos = set(eos_ids)
    self.adapters = AdapterTable(max_loras)
    self.prefixes = PrefixCache(int(prefix_cache_mib * 2**20))
    self.lora_targets = lora_targets
    self.layout = weight_layout(model)  # roles of an NNX model's weights (None: linen)
    stack = empty_stack(base_params, max_loras, max_lora_rank, lora_targets, self.layout)
    self.params = self._placed(stack)
    self.cache = self._new_cache(self.widths[0])
    self.index = 0  # the shared write column (host copy of cache["index"])
    self.lens = np.zeros(max_num_seqs, np.int64)  # tokens in the cache per row
    self.waiting: deque[Request] = deque()
    self.finished: deque[float] = deque()  # when requests finished, the last RECENT_S s
    self.cancelled = 0  # requests freed before they finished (client gone, stop string)
    self.inbox: queue.Queue = queue.Queue()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    apply_fn = jlora.wrap(model.apply)
    self.prefill_fn = jax.jit(functools.partial(self._prefill, model, apply_fn))
    self.rows = [max_num_seqs] if mesh is not None else row_buckets(max_num_seqs)
    self.step_fn = jax.jit(
      functools.partial(self._step, apply_fn), static_argnums=0, donate_argnums=(5,)
    )

  # ---------------------------------------------------------------- compiled pieces

  @staticmethod
  def _prefill(model, apply_fn, params, prefixes, ids, positions, segments, adapter_ids, sampling):
    """(first tokens [batch], each row's k/v cache as its own batch-1 cache, its prompt ending at
    the last column): one insert program per width then serves every batch size.

    prefixes: a batch-1 cache per row holding the keys/values of the row's first P tokens (the
    same P for every row; [] for none), which `ids` (left-padded) continue: they take columns
    [0, P), the rest [P, P + len), and each row's prefix then moves next to its tokens."""
    cached = _width(prefixes[0]) if prefixes else 0
    cache = model.init_cache(ids.shape[0], cached + ids.shape[1])
    if prefixes:
      cache = _after_prefix(cache, prefixes)
    logits, cache = last_logits(apply_fn, params, ids, positions, segments, cache, adapter_ids)
    if prefixes:
      pads = ids.shape[1] - jnp.sum(segments > 0, axis=1)
      cache = _prefix_next_to_prompt(cache, cached, pads)
    rows = [jax.tree.map(lambda x: _one_row(x, i), cache) for i in range(ids.shape[0])]
    return sample_rows(logits, *sampling), rows

  @staticmethod
  def _step(apply_fn, rows, params, tokens, positions, live, cache, adapter_ids, sampling):
    """One token for the first `rows` slots (the other rows are idle): those rows of the cache
    are sliced out, stepped and written back; the full cache is donated, so in place."""
    part = jax.tree.map(lambda x: _row_slice(x, 0, rows), cache)
    logits, part = last_logits(
      apply_fn, params, tokens[:, None], positions[:, None], live[:, None], part, adapter_ids
    )
    cache = jax.tree.map(_row_update, cache, part)
    return sample_rows(logits, *sampling), cache

  # ---------------------------------------------------------------- the public side

  def start(self) -> Engine:
    self._thread = threading.Thread(target=self._loop, name="jlora-engine", daemon=True)
    self._thread.start()
    return self

  def close(self) -> None:
    self._stop.set()
    self.inbox.put(None)
    if self._thread is not None:
      self._thread.join(timeout=30)

  def warm_up(self, prompt_lengths: Sequence[int] = ()) -> Engine:
    """Compiles the decode step for every cache width and row count (`row_buckets`; all slots
    idle) and the move between every two widths before the first request,
    and the prefill of every batch size for prompts of `prompt_lengths` tokens (with their
    inserts into every cache width); call before `start`. Other prompt lengths compile their
    prefill on first use, once per batch size."""
    for width in self.widths:
      for other in self.widths:
        if other != width:
          _relayout(self._new_cache(width), np.int32(0), other)
      for rows in self.rows:
        ids = np.zeros((rows,), np.int32)
        cache = self._new_cache(width)
        self.step_fn(
          rows, self.params, ids, ids, ids, cache, ids - 1, _sampling([None] * rows, ids)
        )
    # Each prompt whole and after every prefix it may find cached: a shared system prompt, or
    # the whole prompt sent before.
    prefix_lengths = lambda n: (0, *PrefixCache.lengths(n)) if self.prefixes.capacity > 0 else (0,)
    shapes = {self.prefill_shape(n, c) for n in prompt_lengths for c in prefix_lengths(n)}
    for cached, rest in sorted(shapes):
      prefix = _columns(self.model.init_cache(1, cached), 0, cached) if cached else None
      for size in batch_buckets(len(self.slots), cached + rest):
        dummy = Request([0] * (cached + rest), BASE, 1, lambda _: None)
        _, smalls = self._prefill_call([dummy] * size, [-1] * size, [prefix] * size, cached)
      for width in (w for w in self.widths if w > cached + rest):
        _insert(self._new_cache(width), smalls[0], np.int32(0), np.int32(0))
    return self

  def bucket_of(self, prompt_len: int) -> int:
    """The padded length a prompt of `prompt_len` tokens is prefilled at."""
    return next(b for b in self.buckets if b >= prompt_len)

  def prefill_shape(self, prompt_len: int, cached: int) -> tuple[int, int]:
    """(cached prefix, padded rest) a prompt is prefilled as; without the prefix when the two
    would not fit the context."""
    rest = self.bucket_of(prompt_len - cached)
    return (
      (cached, rest) if cached + rest <= self.max_model_len else (0, self.bucket_of(prompt_len))
    )

  def _placed(self, tree, cache: bool = False):
    """tree on the mesh (without one, as it is). A KV cache (`cache`) always gets the same
    shardings, so its steps never recompile: k/v and segment ids split by rows over the batch
    axes (when they divide the slots), the index replicated. Params already on the mesh (the
    base) keep their sharding; the rest (the adapter stack) is replicated."""
    if self.mesh is None:
      return tree
    from jax.sharding import NamedSharding, PartitionSpec

    from jlora.sharding import BATCH_AXES

    shards = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
    rows = BATCH_AXES if len(self.slots) % shards == 0 else None

    def place(x):
      on_mesh = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh
      if not cache and on_mesh:
        return x
      spec = (
        PartitionSpec(*[None] * _row_axis(x), rows) if cache and x.ndim >= 2 else PartitionSpec()
      )
      return jax.device_put(x, NamedSharding(self.mesh, spec))

    return jax.tree.map(lambda x: place(x) if isinstance(x, jax.Array) else x, tree)

  def _new_cache(self, width: int):
    return self._placed(self.model.init_cache(len(self.slots), width), cache=True)

  def submit(self, request: Request) -> None:
    self.inbox.put(request)

  def loaded(self) -> dict[str, str]:
    """{adapter name: the path it was loaded from}."""
    return dict(self.adapters.paths)

  def load_adapter(self, name: str, path: str) -> None:
    """Reads and checks the adapter here (the caller's thread), then writes it between steps."""
    if not name or name == BASE:
      raise AdapterError(
        f"lora_name {name!r} is not valid; use a non-empty name other than 'base'."
      )
    if name in self.adapters.ids:
      raise AdapterError(f"The lora adapter {name!r} has already been loaded.")
    try:
      single = jlora.stack_adapters(
        {name: path}, self.base_params, model_config=self.model_config, layout=self.layout
      )
    except (ValueError, OSError) as e:  # OSError: a path that can't be read
      raise AdapterError(f"lora_path {path!r}: {e}") from e
    check_fits(name, single, self.params, self.lora_targets)
    self._call("load", name, path, single)

  def unload_adapter(self, name: str) -> None:
    self._call("unload", name)

  def _call(self, *command):
    done: Future = Future()
    self.inbox.put((done, *command))
    return done.result(timeout=600)

  # ---------------------------------------------------------------- the engine thread

  def _loop(self) -> None:
    while not self._stop.is_set():
      running = any(self.slots)
      wait = 0.0 if running else (self._gather_left() if self.waiting else 0.5)
      self._read_inbox(wait)
      try:
        if self._gather_left() == 0.0:
          self._admit()
        if any(self.slots):
          self.decode()
      except Exception:  # a bug: fail the running requests, keep serving the next ones
        log.error("engine step failed:\n%s", traceback.format_exc())
        for row, run in enumerate(self.slots):
          if run is not None:
            self._finish(row, ("error", 500, "internal error in the engine; see the server log"))

  def _gather_left(self) -> float:
    """Seconds to wait for more arrivals before admitting the waiting requests (`GATHER_S`): 0
    when there are as many as the requests finished lately (or the free slots), or the oldest has
    waited long enough."""
    now = time.monotonic()
    while self.finished and self.finished[0] < now - RECENT_S:
      self.finished.popleft()
    expected = min(sum(run is None for run in self.slots), len(self.finished))
    if not self.waiting or len(self.waiting) >= expected:
      return 0.0
    return max(self.waiting[0].arrived + GATHER_S - time.monotonic(), 0.0)

  def _read_inbox(self, wait: float) -> None:
    """Moves the inbox's requests to `waiting` and runs its commands, waiting up to `wait` s for
    the first item."""
    try:
      item = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
    except queue.Empty:
      return
    while item is not None:
      if isinstance(item, Request):
        self.waiting.append(item)
      else:
        self._command(*item)
      try:
        item = self.inbox.get_nowait()
      except queue.Empty:
        return

  def _command(self, done: Future, kind: str, name: str, *rest) -> None:
    try:
      if kind == "load":
        path, single = rest
        entry = self.adapters.free_entry()
        if entry is None:
          raise AdapterError(
            f"cannot load {name!r}: all --max-loras {len(self.adapters.users)} adapter entries "
            "are in use; unload one first (or restart with a larger --max-loras)."
          )
        self.prefixes.drop(entry)  # computed with the entry's previous adapter
        self.params = self._placed(write_entry(self.params, single, entry))
        self.adapters.ids[name], self.adapters.paths[name] = entry, path
      else:
        if name not in self.adapters.ids:
          raise AdapterError(f"The lora adapter {name!r} is not loaded.", status=404)
        del self.adapters.ids[name], self.adapters.paths[name]  # running requests keep the entry
      done.set_result(None)
    except Exception as e:
      done.set_exception(e)

  def _admit(self) -> None:
    """Moves waiting requests into the free slots, prefilled in batches (`prefill_batches`)."""
    free = [row for row, run in enumerate(self.slots) if run is None]
    joining: list[tuple[Request, int]] = []
    while self.waiting and len(joining) < len(free):
      request = self.waiting.popleft()
      if request.cancelled.is_set():
        continue
      try:
        joining.append((request, self.adapters.acquire(request.adapter)))
      except KeyError:
        _emit(request, ("error", 404, f"The model {request.adapter!r} was unloaded."))
    hits = [
      self.prefixes.longest(adapter_id, request.prompt, self.max_model_len)
      for request, adapter_id in joining
    ]
    shapes = [
      self.prefill_shape(len(request.prompt), cached)
      for (request, _), (_, cached) in zip(joining, hits)
    ]
    for batch in prefill_batches(shapes, len(self.slots)):
      cached = shapes[batch[0]][0]
      prefixes = [hits[i][0] for i in batch] if cached else []
      self.prefill([free[i] for i in batch], [joining[i] for i in batch], prefixes, cached)

  def _prefill_call(self, requests, adapter_ids, prefixes, cached: int):
    """(first tokens, per-row caches) of prompts after their first `cached` tokens (whose k/v
    are `prefixes`, one batch-1 cache each), left-padded to one bucket, in one call."""
    bucket = self.bucket_of(max(len(r.prompt) for r in requests) - cached)
    ids = np.zeros((len(requests), bucket), np.int32)
    for i, request in enumerate(requests):
      ids[i, bucket - len(request.prompt) + cached :] = request.prompt[cached:]
    lengths = np.asarray([len(r.prompt) - cached for r in requests])[:, None]
    segments = (np.arange(bucket)[None] >= bucket - lengths).astype(np.int32)
    positions = np.maximum(cached + np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    sampling = _sampling(requests, [0] * len(requests))
    adapter_ids = np.asarray(adapter_ids, np.int32)
    prefixes = list(prefixes) if cached else []
    return self.prefill_fn(self.params, prefixes, ids, positions, segments, adapter_ids, sampling)

  def prefill(self, rows, joining: Sequence[tuple[Request, int]], prefixes, cached: int) -> None:
    """Prefills the (request, adapter id) pairs of one shape together (after their first
    `cached` tokens, whose k/v are `prefixes`), copies each one's k/v into its row of `rows` and
    keeps its prefixes."""
    requests = [request for request, _ in joining]
    ids = [adapter_id for _, adapter_id in joining]
    tokens, smalls = self._prefill_call(requests, ids, prefixes, cached)
    width = cached + self.bucket_of(max(len(r.prompt) for r in requests) - cached)
    self._make_room(width)
    for row, small in zip(rows, smalls):
      moved = _insert(self.cache, small, np.int32(row), np.int32(self.index - width))
      self.cache = self._placed(moved, cache=True)
    for row, (request, adapter_id) in zip(rows, joining):
      self.lens[row] = len(request.prompt)
      self.slots[row] = _Running(request, adapter_id)
    self._write_segments()
    for small, (request, adapter_id) in zip(smalls, joining):
      start = width - len(request.prompt)
      self.prefixes.add(adapter_id, request.prompt, small, start, cached)
    for row, token in zip(rows, np.asarray(tokens).tolist()):
      self._accept(row, token)

  def decode(self) -> None:
    """One step for the slots up to the highest live one: feeds each running request its last
    token, samples the next."""
    for row, run in enumerate(self.slots):
      if run is not None and run.request.cancelled.is_set():
        self.cancelled += 1
        self._finish(row, None)
    if not any(self.slots):
      return
    self._make_room(0)
    highest = max(row for row, run in enumerate(self.slots) if run is not None)
    rows = next(n for n in self.rows if n > highest)
    slots = self.slots[:rows]
    live = np.asarray([run is not None for run in slots], np.int32)
    tokens = np.asarray([run.token if run else 0 for run in slots], np.int32)
    ids = np.asarray([run.adapter_id if run else -1 for run in slots], np.int32)
    runs = [run.request if run else None for run in slots]
    steps = [run.produced if run else 0 for run in slots]
    next_tokens, self.cache = self.step_fn(
      rows,
      self.params,
      tokens,
      self.lens[:rows].astype(np.int32),
      live,
      self.cache,
      ids,
      _sampling(runs, steps),
    )
    self.cache = self._placed(self.cache, cache=True)
    self.index += 1
    self.lens[:rows] += live
    for row, token in enumerate(np.asarray(next_tokens).tolist()):
      if self.slots[row] is not None:
        self._accept(row, token)

  def _accept(self, row: int, token: int) -> None:
    run = self.slots[row]
    run.token, run.produced = token, run.produced + 1
    _emit(run.request, ("token", token))
    if token in self.eos:
      self._finish(row, ("done", "stop"))
    elif run.produced >= run.request.max_tokens:
      self._finish(row, ("done", "length"))

  def _finish(self, row: int, event: tuple | None) -> None:
    run = self.slots[row]
    self.slots[row] = None
    self.lens[row] = 0
    self.finished.append(time.monotonic())
    self.adapters.release(run.adapter_id)
    if event is not None:
      _emit(run.request, event)

  @property
  def width(self) -> int:
    """Columns of the KV cache (the k buffer's; segment ids follow it)."""
    return _width(self.cache)

  def _make_room(self, behind: int) -> None:
    """Makes index >= `behind` (room for a prefilled bucket) with a free write column after it;
    the live rows move into a cache of the width they need when that fails or they fit a
    narrower one."""
    index = max(behind, int(self.lens.max()))
    need = min(index + 1 + HEADROOM, self.max_model_len)
    width = next(w for w in self.widths if w >= need)
    if behind <= self.index < self.width and width >= self.width:
      return
    moved = _relayout(self.cache, np.int32(index - self.index), width)
    self.cache = self._placed(moved, cache=True)
    self.index = index
    self._write_segments()

  def _write_segments(self) -> None:
    columns = np.arange(self.width)
    starts = (self.index - self.lens)[:, None]
    segments = (columns >= starts) & (columns < self.index) & (self.lens[:, None] > 0)
    fresh = {
      "segment_ids": jnp.asarray(segments, jnp.int32),
      "index": jnp.asarray(self.index, jnp.int32),
    }
    self.cache = {**self.cache, **self._placed(fresh, cache=True)}


def _emit(request: Request, event: tuple) -> None:
  """Hands `event` to the request's consumer; a consumer that is gone cancels its request."""
  try:
    request.emit(event)
  except Exception:  # e.g. the client's event loop closed
    request.cancelled.set()


def _sampling(requests: Sequence[Request | None], steps: Sequence[int]) -> tuple:
  """(seeds, steps, temperature, top_p) arrays for sample_rows; idle rows are greedy."""
  return (
    np.asarray([r.seed if r else 0 for r in requests], np.uint32),
    np.asarray(steps, np.int32),
    np.asarray([r.temperature if r else 0.0 for r in requests], np.float32),
    np.asarray([r.top_p if r else 1.0 for r in requests], np.float32),
  )

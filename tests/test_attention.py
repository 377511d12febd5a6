"""Blockwise attention against the naive reference (fp32): outputs and gradients w.r.t. q, k, v
(and the sinks, where a case has them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models.attention import attention, naive_attention, packed_segment_offsets, resolve
from jlora.models.blockwise import block_plan, blocking, blockwise_attention

TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(seed, b, s, t, heads, kv_heads, d=16):
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (
    draw(b, s, heads, d),
    draw(b, t, kv_heads, d),
    draw(b, t, kv_heads, d),
    draw(b, s, heads, d),
  )


def _segments(*rows):
  return jnp.asarray([sum(([seg] * n for seg, n in row), []) for row in rows], jnp.int32)


# name -> (heads, kv heads, segment rows, window, softcap, block_q, block_k[, sinks])
CASES = {
  # Several packed segments, trailing padding, a length (37) no block size divides; GQA 3:1.
  "packed_gqa3_plain": (6, 2, [[(1, 10), (2, 15), (3, 9), (0, 3)], [(1, 37)]], None, None, 8, 16),
  # GQA 4:1, window shorter than a block, soft-capping on.
  "gqa4_short_window_softcap": (8, 2, [[(1, 20), (2, 17)], [(5, 30), (0, 7)]], 5, 2.0, 16, 8),
  # Window longer than a block (several key blocks inside the window), softcap off.
  "long_window": (4, 1, [[(1, 37)], [(1, 12), (2, 25)]], 20, None, 8, 8),
  # Segment ids that are not sorted: needed blocks have holes, skipped by the in-loop cond.
  "unsorted_segments": (6, 3, [[(1, 8), (2, 8), (1, 8), (3, 8), (0, 5)]] * 2, None, 3.0, 8, 8),
  # A row that is padding only: zero output, zero (not NaN) gradients.
  "all_padding_row": (6, 2, [[(0, 37)], [(2, 30), (0, 7)]], 9, None, 8, 16),
  # gpt-oss's attention sinks (one logit per head in the softmax denominator), packed, windowed,
  # with a padding row; one sink large enough to take most of its rows' mass.
  "sinks": (6, 2, [[(1, 20), (2, 17)], [(0, 37)]], 7, None, 8, 16, [0.5, -1.0, 3.0, 0.0, 1.2, -2]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_matches_naive_forward_and_gradients(case):
  heads, kv_heads, rows, window, softcap, block_q, block_k, *sinks = CASES[case]
  segments = _segments(*rows)
  s = segments.shape[1]
  q, k, v, cotangent = _inputs(len(case), 2, s, s, heads, kv_heads)
  sinks = jnp.asarray(sinks[0], jnp.float32) if sinks else None
  opts = dict(sliding_window=window, softcap=softcap)

  def loss(fn):
    def value(q, k, v, sinks):
      return jnp.sum(fn(q, k, v, segments, segments, sinks=sinks, **opts) * cotangent)

    return value

  block = lambda *a, **kw: blockwise_attention(*a, block_q=block_q, block_k=block_k, **kw)
  want_out = naive_attention(q, k, v, segments, segments, sinks=sinks, **opts)
  got_out = jax.jit(lambda *a: block(*a[:3], segments, segments, sinks=a[3], **opts))(
    q, k, v, sinks
  )
  np.testing.assert_allclose(got_out, want_out, **TOL)
  args = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
  want = jax.grad(loss(naive_attention), argnums=args)(q, k, v, sinks)
  got = jax.jit(jax.grad(loss(block), argnums=args))(q, k, v, sinks)
  for name, g, w in zip(["q", "k", "v", "sinks"], got, want):
    assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_allclose(g, w, **TOL, err_msg=f"d{name}")
  padding = np.asarray(segments == 0)
  assert not np.asarray(got_out)[padding].any()  # padding queries attend to nothing


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_kv_cache_decode_matches_naive(new_tokens):
  # A 40-slot cache holding a left-padded prompt (slots 0-3 are padding) up to slot 21; the new
  # tokens sit at slots 22.. and the slots after them are still empty (segment 0).
  cache_len, index = 40, 22
  kv_segments = np.zeros((2, cache_len), np.int32)
  kv_segments[0, 4 : index + new_tokens] = 1
  kv_segments[1, 0 : index + new_tokens] = 1
  kv_segments = jnp.asarray(kv_segments)
  q_segments = kv_segments[:, index : index + new_tokens]
  q, k, v, cotangent = _inputs(7, 2, new_tokens, cache_len, 6, 2)
  sinks = jnp.asarray([0.3, -1.0, 2.0, 0.1, 0.0, 1.0], jnp.float32)
  for window, sink in ((None, None), (6, None), (6, sinks)):
    opts = dict(sliding_window=window, sinks=sink)

    def run(fn, offset):
      out = lambda q, k, v: fn(q, k, v, q_segments, kv_segments, q_offset=offset, **opts)
      grads = jax.grad(lambda *a: jnp.sum(out(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
      return out(q, k, v), grads

    block = lambda *a, **kw: blockwise_attention(*a, block_q=8, block_k=8, **kw)
    # The offset is traced, as in generation.
    got = jax.jit(lambda offset: run(block, offset))(jnp.int32(index))
    want = run(naive_attention, index)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, **TOL)


def test_window_may_vary_per_layer_under_scan():
  # Gemma-style alternating windows: the window is a scanned (traced) value, not a constant.
  segments = _segments([(1, 30)], [(1, 18), (2, 12)])
  q, k, v, _ = _inputs(3, 2, 30, 30, 4, 2)
  windows = jnp.array([3, 1 << 30], jnp.int32)  # local, then effectively global

  def layer(carry, window):
    out = blockwise_attention(
      q, k, v, segments, segments, sliding_window=window, block_q=8, block_k=8
    )
    return carry, out

  _, outs = jax.jit(lambda w: jax.lax.scan(layer, 0, w))(windows)
  for out, window in zip(outs, (3, None)):
    want = naive_attention(q, k, v, segments, segments, sliding_window=window)
    np.testing.assert_allclose(out, want, **TOL)


def test_block_plan_skips_blocks_above_diagonal_outside_window_and_across_segments():
  from jlora.models.blockwise import _Static

  static = _Static(block_q=4, block_k=4, groups=1, windowed=True, softcap=None, scale=1.0)
  window = jnp.int32(6)
  # Two segments of 8 tokens: query block 2 (tokens 8-11) needs key block 2 only; block 3 needs
  # blocks 2 and 3; segment 1's blocks never see segment 2's and vice versa.
  segments = _segments([(1, 8), (2, 8)])
  plan = np.asarray(block_plan(static, segments, segments, jnp.int32(0), window))
  expected = np.array(
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]],
    bool,
  )
  np.testing.assert_array_equal(plan, expected)
  # The window (6) drops key block 0 for query block 3 of a single segment: keys 0-3 are all
  # at least 12 - 3 = 9 > 6 slots before every query 12-15.
  one = _segments([(1, 16)])
  assert not np.asarray(block_plan(static, one, one, jnp.int32(0), window))[3, 0]


def test_blocking_balances_blocks_and_keeps_short_inputs_whole():
  assert blocking(1, 128) == (1, 1)
  assert blocking(128, 128) == (128, 1)
  assert blocking(300, 128) == (104, 3)
  length, count = blocking(1100, 512)
  assert count == 3 and length * count >= 1100 and length % 8 == 0


def test_packed_segment_offsets_in_cudnns_packed_convention():
  """Each row's segments as first slot and length, -1 beyond; rows cuDNN can't take are flagged.
  The reference is a plain Python walk over the row."""

  def walk(row, m):
    runs, start = [], None
    for i, seg in enumerate(list(row) + [0]):
      if start is not None and (seg != row[start]):
        runs.append((start, i - start))
        start = None
      if start is None and seg != 0 and i < len(row):
        start = i
    ids = [row[s] for s, _ in runs]
    ok = len(runs) <= m and len(set(ids)) == len(ids)
    offsets = [s for s, _ in runs][:m] + [-1] * (m + 1 - min(len(runs), m))
    lengths = [n for _, n in runs][:m] + [-1] * (m - min(len(runs), m))
    return ok, offsets[: m + 1], lengths

  rows = [
    [1, 1, 1, 2, 2, 3, 0, 0],  # packed, padded at the end
    [1, 1, 1, 1, 1, 1, 1, 1],  # one segment
    [0, 0, 0, 0, 0, 0, 0, 0],  # padding only
    [1, 2, 3, 4, 4, 4, 4, 0],  # more segments than m = 3
    [1, 1, 2, 2, 1, 1, 0, 0],  # segment 1 in two runs
  ]
  for row in rows:
    ok, offsets, lengths = packed_segment_offsets(jnp.asarray([row]), 3)
    want_ok, want_offsets, want_lengths = walk(row, 3)
    assert bool(ok) == want_ok, row
    if want_ok:
      assert offsets[0].tolist() == want_offsets and lengths[0].tolist() == want_lengths, row
  ok, _, _ = packed_segment_offsets(jnp.asarray(rows[:3]), 3)
  assert bool(ok)
  ok, _, _ = packed_segment_offsets(jnp.asarray(rows[:4]), 3)
  assert not bool(ok)


def test_dispatch_names_the_value_and_auto_is_blockwise_on_cpu():
  q, k, v, _ = _inputs(0, 1, 4, 4, 2, 1)
  assert resolve("auto", q, k, v) == "blockwise"
  assert resolve("cudnn", q, k, v) == "blockwise"  # not on GPU: falls back
  with pytest.raises(ValueError, match=r"config.model.attention: 'flash' is not valid"):
    attention(
      q, k, v, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32), implementation="flash"
    )


def _train_step_temp_bytes(seq: int) -> int:
  """XLA's temp bytes for the compiled LoRA train step on one row of `seq` tokens (no execution)."""
  import optax

  import jlora
  from jlora.models import LlamaConfig, LlamaForCausalLM
  from train import step as step_lib

  config = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  model = LlamaForCausalLM(config)

  def adapted():
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    lora = jlora.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
    return jlora.split(jlora.apply(params, lora, jax.random.key(1)))

  trainable, frozen = jax.eval_shape(adapted)
  tx = optax.adamw(1e-3)
  fields = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")
  fields += ("label_pos", "label_targets", "label_mask")  # loss on every position
  batch = {name: jax.ShapeDtypeStruct((1, seq), jnp.int32) for name in fields}
  step = jax.jit(step_lib.make_train_step(model, tx))
  args = (trainable, jax.eval_shape(tx.init, trainable), frozen, batch, 0, jax.random.key(0))
  return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_train_step_temp_memory_grows_linearly_with_the_row():
  # Default config (attention and remat "auto"): 8x the tokens may cost at most 10x the
  # temporaries; naive attention's [seq, seq] scores per layer would make it about 64x.
  short, long = _train_step_temp_bytes(1024), _train_step_temp_bytes(8192)
  assert long <= 10 * short, (short, long)

"""What the trainer, generation, PEFT IO and the exports rely on from a model: written once.

Every registered family's module satisfies `CausalLM`, and its config satisfies `ModelConfig`.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

Array = jax.Array


class ModelConfig(Protocol):
  """A frozen, hashable dataclass; HF `config.json` in and out; its scanned stacks named."""

  model_type: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  tie_word_embeddings: bool
  dtype: Any
  param_dtype: Any
  remat_policy: str
  attention: str

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> ModelConfig: ...

  def to_hf_dict(self) -> dict: ...

  def layer_stacks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Flax path of each scanned layer stack -> HF layer index of each entry (names.HFNames)."""
    ...


class CausalLM(Protocol):
  """A flax linen causal LM built from stock layers (so `jlora.wrap` adapts it unchanged).

  `model.apply({"params": p}, input_ids, positions, segment_ids, logits_at=..., return_hidden=...,
  cache=...)` returns logits [b, s, vocab] (or [b, k, vocab] at `logits_at`, or the final normed
  hidden states with `return_hidden=True`); with a cache it returns `(output, new_cache)`.
  `model.apply(..., hidden, method=type(model).logits)` is the head alone (soft-capped where the
  family caps logits), for the trainer's chunked cross-entropy.
  """

  config: ModelConfig

  def __call__(
    self,
    input_ids: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    *,
    logits_at: Array | None = None,
    return_hidden: bool = False,
    cache: dict | None = None,
  ) -> Any: ...

  def logits(self, hidden: Array) -> Array: ...

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
    """An empty KV cache pytree; its "index" is the next slot to write."""
    ...

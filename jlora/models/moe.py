"""Mixture-of-experts decoders on Llama's attention: Mixtral and Qwen3-MoE, in Flax linen.

Each decoder layer's MLP is a sparse MoE block as in transformers 5:

* a router `mlp/gate` (a bias-free Dense, hidden -> E logits), softmax in fp32, top-k experts per
  token; Mixtral always renormalises the k weights to sum to one, Qwen3-MoE when `norm_topk_prob`;
* the experts `mlp/experts/gate_up_proj` [E, hidden, 2 * moe_intermediate] and
  `mlp/experts/down_proj` [E, moe_intermediate, hidden], each a `jlora.experts.GroupedDense` (the
  checkpoint's fused 3-D parameters, transposed per expert to Flax's [in, out]): the gate is the
  first half of gate_up's output, SwiGLU, down, scaled by the routing weight and summed per token.

Routing is dropless (no capacity): every assignment is computed, by one grouped matmul over the
assignments sorted by expert (see jlora.experts). Qwen3-MoE is Llama with q/k norms (as Qwen3);
Mixtral is Mistral (optional sliding window). Qwen3-MoE's dense layers (`mlp_only_layers`,
`decoder_sparse_step` > 1) are refused: every layer of the scanned stack has the same block.

The router's load-balancing loss (Switch Transformer, as transformers' `load_balancing_loss_func`)
is `router_aux_loss`; each block sows its router logits under "intermediates" when asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.experts import IMPLEMENTATIONS as EXPERT_IMPLEMENTATIONS
from jlora.experts import GroupedDense, grouped_mlp, sort_by_expert
from jlora.models.llama import (
  ACTIVATIONS,
  LlamaConfig,
  LlamaDecoderLayer,
  LlamaForCausalLM,
  LlamaModel,
  hf_config_dict,
  linear,
  llama_fields,
)
from jlora.models.llama import (
  HF_ARCHITECTURES as LLAMA_ARCHITECTURES,
)

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen3_moe")  # gpt-oss: jlora.models.gpt_oss
HF_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
ROUTER_LOGITS = "router_logits"


@dataclasses.dataclass(frozen=True)
class MoeConfig(LlamaConfig):
  num_experts: int = 8
  num_experts_per_tok: int = 2
  moe_intermediate_size: int = 14336
  norm_topk_prob: bool = True  # renormalise the top-k weights (Mixtral always does)
  # The weight on router_aux_loss that train.sft adds to the loss; 0 (off) is the usual LoRA recipe
  # (HF configs' value is not read: it belongs to full fine-tuning).
  router_aux_loss_coef: float = 0.0
  expert_matmul: str = "auto"  # jlora.experts: auto | ragged | blocked | dense
  # See llama.scan_unroll_for. gpt-oss's trunk (Gemma's scan over layer groups) does not read it.
  scan_unroll: int | str = "auto"
  model_type: str = "mixtral"

  __hash__ = LlamaConfig.__hash__  # a dataclass would hash the fields, rope_scaling's dict included

  def __post_init__(self):
    super().__post_init__()
    if self.expert_matmul not in EXPERT_IMPLEMENTATIONS:
      raise ValueError(
        f"config.model.expert_matmul: {self.expert_matmul!r} is not valid; expected one of "
        f"{', '.join(EXPERT_IMPLEMENTATIONS)}."
      )
    if not self.router_aux_loss_coef >= 0.0:
      raise ValueError(
        f"config.model.router_aux_loss_coef: {self.router_aux_loss_coef!r} is not valid; expected "
        "0 (off) or a positive weight."
      )
    if not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ValueError(
        f"num_experts_per_tok: {self.num_experts_per_tok} is not valid; expected 1 to "
        f"num_experts={self.num_experts}."
      )

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> MoeConfig:
    d = hf_config_dict(hf_config, SUPPORTED_MODEL_TYPES, "jlora's MoE")
    if d["model_type"] == "qwen3_moe":
      if d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1:
        raise ValueError(
          f"mlp_only_layers: {d.get('mlp_only_layers')} / decoder_sparse_step: "
          f"{d.get('decoder_sparse_step')} (dense layers among the MoE ones) are not supported; "
          "expected [] and 1."
        )
      moe = dict(
        num_experts=d.get("num_experts") or d["num_local_experts"],
        moe_intermediate_size=d["moe_intermediate_size"],
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
      )
    else:
      moe = dict(
        num_experts=d["num_local_experts"],
        moe_intermediate_size=d["intermediate_size"],
        norm_topk_prob=True,
      )
    return cls(
      **{
        **llama_fields(d),
        **moe,
        "num_experts_per_tok": d.get("num_experts_per_tok", 2),
        **overrides,
      }
    )

  def hf_architecture(self) -> str:
    return HF_ARCHITECTURES[self.model_type]

  def expert_files(self):
    """How transformers saves the experts (see names.HFNames.expert_files)."""
    if self.model_type == "mixtral":
      parts = (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",)))
      return ((".mlp.", ".block_sparse_moe."),), parts
    return (), (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))

  def to_hf_dict(self) -> dict:
    d = super().to_hf_dict()
    d["num_experts_per_tok"] = self.num_experts_per_tok
    if self.model_type == "qwen3_moe":
      d.update(
        num_experts=self.num_experts,
        moe_intermediate_size=self.moe_intermediate_size,
        norm_topk_prob=self.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
      )
    else:
      d.update(num_local_experts=self.num_experts, intermediate_size=self.moe_intermediate_size)
    for key in ("partial_rotary_factor", "mlp_bias"):
      d.pop(key)
    return d


assert not set(HF_ARCHITECTURES) & set(LLAMA_ARCHITECTURES)


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """(weights, experts) [tokens, k]: softmax over experts in fp32, the top k, renormalised."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, chosen = jax.lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, chosen


def router_aux_loss(router_logits: jax.Array, k: int, mask: jax.Array | None = None) -> jax.Array:
  """Switch Transformer load-balancing loss over layers, as transformers computes it.

  router_logits [layers, tokens, E]; mask [tokens] (1 = real token). E * sum_e f_e * p_e, with f_e
  the share of top-k assignments that went to expert e and p_e its mean router probability.
  """
  num_experts = router_logits.shape[-1]
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  _, chosen = jax.lax.top_k(probs, k)
  counts = jax.nn.one_hot(chosen, num_experts).sum(axis=-2)  # [layers, tokens, E]
  mask = jnp.ones(router_logits.shape[1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  rows = router_logits.shape[0] * jnp.sum(mask)
  share = jnp.einsum("lte,t->e", counts, mask) / rows
  prob = jnp.einsum("lte,t->e", probs, mask) / rows
  return num_experts * jnp.sum(share * prob)


class MoeExperts(nn.Module):
  """The E experts of one layer, in the checkpoint's fused layout (gate_up_proj, down_proj).

  Class attributes let a family (gpt-oss) change what the experts compute: `bias` gives both
  weights a bias [E, out]; `activate` turns gate_up's output into down_proj's input."""

  config: MoeConfig
  bias = False

  def setup(self):
    c = self.config
    dense = lambda features, names, name: GroupedDense(
      features,
      c.num_experts,
      names,
      use_bias=self.bias,
      implementation=c.expert_matmul,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      name=name,
    )
    self.gate_up_proj = dense(
      2 * c.moe_intermediate_size, ("expert", "embed", "mlp"), "gate_up_proj"
    )
    self.down_proj = dense(c.hidden_size, ("expert", "mlp", "embed"), "down_proj")

  def __call__(self, x: jax.Array, weights: jax.Array, chosen: jax.Array) -> jax.Array:
    """x [tokens, d]; weights, chosen [tokens, k] -> [tokens, d]."""
    c = self.config
    groups = sort_by_expert(chosen, weights, c.num_experts, c.expert_matmul)
    h = grouped_mlp(groups.dispatch(x), self.gate_up_proj, self.down_proj, self.activate, groups)
    y = h * groups.weight[:, None].astype(h.dtype)
    return groups.combine(y.astype(x.dtype))

  def activate(self, gate_up: jax.Array) -> jax.Array:
    """SwiGLU (or the config's activation) on gate_up = [gate | up]."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return ACTIVATIONS[self.config.hidden_act](gate) * up


class SparseMoeBlock(nn.Module):
  config: MoeConfig

  def setup(self):
    c = self.config
    self.gate = linear(c, c.num_experts, ("embed", "expert"), False, "gate")
    self.experts = MoeExperts(c)

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    logits = self.gate(flat)
    self.sow("intermediates", ROUTER_LOGITS, logits)
    weights, chosen = route(logits, c.num_experts_per_tok, c.norm_topk_prob)
    return self.experts(flat, weights, chosen).reshape(b, s, d)


class MoeDecoderLayer(LlamaDecoderLayer):
  mlp_block = SparseMoeBlock


class MoeModel(LlamaModel):
  decoder_layer = MoeDecoderLayer


class MoeForCausalLM(LlamaForCausalLM):
  """Mixtral / Qwen3-MoE causal LM: Llama's call protocol and attention, MoE blocks."""

  config: MoeConfig
  trunk = MoeModel

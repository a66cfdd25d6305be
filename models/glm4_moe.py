"""GLM-4.5 mixture of experts (Hugging Face `model_type: glm4_moe`, GLM-4.5 / GLM-4.5-Air).

The idea: a pre-norm decoder whose feed-forward blocks are, after the first few, a
mixture of experts: each token goes through a few routed SwiGLU experts chosen by a
sigmoid router plus one always-on shared expert, so a 106B-parameter model
(GLM-4.5-Air) computes with about 12B per token. "GLM-4.5: Agentic, Reasoning, and
Coding (ARC) Foundation Models" (arXiv:2508.06471); model card
https://huggingface.co/zai-org/GLM-4.5-Air. The router follows DeepSeek-V3's
auxiliary-loss-free balancing (`noaux_tc`): see `select_experts` for the steps.

What else sets it apart from Llama:
- `first_k_dense_replace`: layers 0 .. k-1 keep a dense SwiGLU MLP of width
  `intermediate_size`; later layers are MoE with experts of width `moe_intermediate_size`;
- `n_shared_experts` shared experts (one SwiGLU of width n * moe_intermediate_size) see
  every token and their output is added to the routed experts' weighted sum;
- biases on q/k/v (`attention_bias`), none on the output projection;
- `use_qk_norm` (GLM-4.5, not Air): RMSNorm over each head's query and key before RoPE;
- partial rotary: RoPE turns only the first `partial_rotary_factor` of each head's
  dimensions, in the half-split layout (dimension i pairs with i + rot/2, HF's
  `rotate_half`, mlx's `traditional=False`), unlike dense GLM-4 (`glm.py`), which pairs
  adjacent dimensions; the rest of the head carries no position;
- checkpoints store `num_nextn_predict_layers` multi-token-prediction layers after the
  last decoder layer (layer 46 of GLM-4.5-Air, 92 of GLM-4.5); plain decoding does not
  use them, so `sanitize` drops them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .base import BaseConfig, ConfigError, PipelineMixin, rope_settings, swiglu
from .experts import ExpertGLU
from .gqa import GroupedHeads, PartialRopeAttention

GROUP_SCORE_TOP = 2  # a group is scored by the sum of its best 2 biased expert scores
NORM_EPS = 1e-20  # HF adds this to the weight sum before normalising (guards a zero sum)

# Original HF layout: one tensor per expert (weight, or scales/biases when quantized).
_EXPERT_KEY = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\."
    r"(weight|scales|biases)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class ModelArgs(BaseConfig, GroupedHeads):
    """Fields of a GLM-4.5 `config.json` (old top-level or transformers-5 `rope_parameters`)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int  # dense MLP width of the first_k_dense_replace layers
    moe_intermediate_size: int  # width of each routed (and per shared) expert
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: Optional[int] = 1  # HF default; GLM-4.5(-Air) use 1; 0/None = none
    n_group: int = 1  # HF default; GLM-4.5(-Air) route over one group (no group pruning)
    topk_group: int = 1  # groups kept per token; 1 of 1 keeps all
    first_k_dense_replace: int = 1  # HF default: layer 0 dense, the rest MoE
    norm_topk_prob: bool = True  # chosen weights renormalised to sum to 1 before scaling
    routed_scaling_factor: float = 1.0  # HF default; GLM-4.5 uses 2.5
    use_qk_norm: bool = False  # HF default; GLM-4.5 turns it on, Air leaves it off
    attention_bias: bool = False  # HF default; the released checkpoints set True
    head_dim: Optional[int] = None  # released configs give 128 (not hidden / heads)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # HF default; the released checkpoints use 1e6
    partial_rotary_factor: float = 0.5  # HF's default for GLM-4.5: rotate half the head
    rope_scaling: Optional[dict] = None  # only plain RoPE is implemented (released: null)
    rope_parameters: Optional[dict] = None  # transformers-5 form of rope_theta & co.
    max_position_embeddings: int = 131072
    num_nextn_predict_layers: int = 1  # MTP layers stored after the last decoder layer
    tie_word_embeddings: bool = False

    # transformers' Glm4MoeConfig maps these names onto its fields too.
    FIELD_ALIASES = {"num_local_experts": "n_routed_experts",
                     "num_mtp_layers": "num_nextn_predict_layers"}

    def __post_init__(self):
        """Read the RoPE settings as transformers does, then check the routing fields."""
        self.rope_theta, self.partial_rotary_factor, rope_type, _ = rope_settings(
            self.rope_theta, self.partial_rotary_factor, self.rope_scaling, self.rope_parameters)
        if rope_type != "default":
            raise ConfigError(f"glm4_moe: rope type {rope_type!r} is not implemented; "
                              "only plain RoPE (rope_scaling null) is")
        self._check_routing()

    def _check_routing(self):
        """Refuse expert groups that cannot partition the experts or pick top-k of them."""
        E, G = self.n_routed_experts, self.n_group
        if E % G:
            raise ConfigError(f"glm4_moe: n_routed_experts={E} does not split into n_group={G}")
        if not 1 <= self.topk_group <= G:
            raise ConfigError(f"glm4_moe: topk_group={self.topk_group} must be in 1..n_group={G}")
        if G > 1 and E // G < GROUP_SCORE_TOP:
            raise ConfigError(f"glm4_moe: {E // G} experts per group; group scoring needs "
                              f">= {GROUP_SCORE_TOP}")
        if self.topk_group * (E // G) < self.num_experts_per_tok:
            raise ConfigError(f"glm4_moe: {self.topk_group} kept groups of {E // G} experts "
                              f"cannot supply num_experts_per_tok={self.num_experts_per_tok}")


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., D] -> [..., D]."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def select_experts(logits: mx.array, correction_bias: mx.array, top_k: int, n_group: int,
                   topk_group: int, norm_topk_prob: bool, scaling: float):
    """GLM-4 grouped expert selection: router logits [..., E] -> (indices, weights) [..., k].

    Step by step (HF's Glm4MoeTopkRouter, DeepSeek-V3's `noaux_tc`):
    1. scores = sigmoid(logits): each expert's affinity in (0, 1), independent of the others.
    2. biased = scores + e_score_correction_bias. The bias is a load-balancing offset learned
       outside the loss; it decides WHICH experts are chosen, never how much they weigh.
    3. The E experts are split into `n_group` contiguous groups; a group's score is the sum
       of its top-2 biased scores.
    4. Only the best `topk_group` groups stay; the other groups' experts are masked to -inf
       so they cannot be picked.
    5. The `top_k` (= num_experts_per_tok) experts with the highest biased scores are picked.
    6. Their weights are the UNBIASED sigmoid scores of step 1, divided by their sum when
       `norm_topk_prob`, then multiplied by `routed_scaling_factor`.
    (The caller adds the shared experts' output on top of the weighted sum.)
    """
    scores = mx.sigmoid(logits.astype(mx.float32))  # [..., E], step 1
    biased = scores + correction_bias.astype(mx.float32)  # step 2
    if topk_group < n_group:
        lead, E = biased.shape[:-1], biased.shape[-1]
        grouped = biased.reshape(*lead, n_group, E // n_group)  # [..., G, E/G], step 3
        group_score = mx.topk(grouped, GROUP_SCORE_TOP, axis=-1).sum(axis=-1)  # [..., G]
        keep = mx.argpartition(-group_score, kth=topk_group - 1, axis=-1)[..., :topk_group]
        kept = mx.put_along_axis(mx.zeros(group_score.shape, mx.bool_), keep,
                                 mx.array(True), axis=-1)  # [..., G], step 4
        biased = mx.where(kept[..., None], grouped, -mx.inf).reshape(*lead, E)
    inds = mx.argpartition(-biased, kth=top_k - 1, axis=-1)[..., :top_k]  # [..., k], step 5
    weights = mx.take_along_axis(scores, inds, axis=-1)  # [..., k], step 6: unbiased
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + NORM_EPS)
    return inds, weights * scaling


class Router(nn.Module):
    """The MoE gate: a bias-free linear map to E logits plus the selection correction bias.

    Not an nn.Linear on purpose: like mlx-lm's, it has no `to_quantized`, so quantization
    leaves the router in full precision (the routing choice is sensitive to it).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))  # [E, D]
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))  # [E]

    def __call__(self, x: mx.array):
        """x [..., D] -> (expert indices, weights), each [..., k]."""
        a = self.args
        return route(x, self.weight, self.e_score_correction_bias, a.num_experts_per_tok,
                     a.n_group, a.topk_group, a.norm_topk_prob, a.routed_scaling_factor)


@mx.compile
def route(x: mx.array, weight: mx.array, correction_bias: mx.array, top_k: int, n_group: int,
          topk_group: int, norm_topk_prob: bool, scaling: float):
    """Router logits and expert selection as one compiled graph: at decode a layer's
    routing is a dozen tiny element-wise and selection kernels, and fused they cost a few
    launches (mlx retraces when the shapes or the integer settings change)."""
    # HF computes the router in float32 whatever the model's dtype.
    logits = x.astype(mx.float32) @ weight.astype(mx.float32).T  # [..., E]
    return select_experts(logits, correction_bias, top_k, n_group, topk_group,
                          norm_topk_prob, scaling)


class MoE(nn.Module):
    """Routed experts (stacked, `switch_mlp`) weighted by the router, plus shared experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        self.switch_mlp = ExpertGLU(args.hidden_size, args.moe_intermediate_size,
                                    args.n_routed_experts)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size,
                                      args.moe_intermediate_size * args.n_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        inds, weights = self.gate(x)  # [B, L, k] each
        y = self.switch_mlp(x, inds)  # [B, L, k, D]
        y = (y * weights[..., None]).sum(axis=-2).astype(x.dtype)  # [B, L, D]
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); mlp dense or MoE by index."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        # Half-split partial RoPE; GLM-4.5 (not Air) norms each head's q and k.
        self.self_attn = PartialRopeAttention(args, interleaved=False, qk_norm=args.use_qk_norm)
        if index < args.first_k_dense_replace:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        else:
            self.mlp = MoE(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GLM4MoeModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module, PipelineMixin):
    """GLM-4.5 MoE causal LM; the stage surface comes from PipelineMixin (models/base.py)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = GLM4MoeModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint tensors -> this module tree, for either layout, any subset of layers.

        mlx-community tensors already match and pass through. Original HF per-expert
        tensors `mlp.experts.{e}.{gate,up,down}_proj.{weight|scales|biases}` are stacked
        into `mlp.switch_mlp.*` [E, out, in], for whichever layers are present (a stage
        receives only its own). Rotary `inv_freq` buffers and the MTP layers (index >=
        num_hidden_layers) are dropped. The input dict is not modified.
        """
        n_layers = self.args.num_hidden_layers
        out, per_expert = {}, {}
        for name, value in weights.items():
            if "rotary_emb.inv_freq" in name:
                continue
            layer = _LAYER_KEY.match(name)
            if layer and int(layer.group(1)) >= n_layers:
                continue  # multi-token-prediction layer
            m = _EXPERT_KEY.match(name)
            if m:
                key = (int(m.group(1)), m.group(3), m.group(4))  # (layer, proj, kind)
                per_expert.setdefault(key, {})[int(m.group(2))] = value
            else:
                out[name] = value
        E = self.args.n_routed_experts
        for (layer, proj, kind), experts in sorted(per_expert.items()):
            missing = sorted(set(range(E)) - set(experts))
            if missing:
                raise ValueError(
                    f"layer {layer} {proj}.{kind}: experts {missing[:8]} of {E} missing; pass "
                    "all of a layer's expert tensors to one sanitize call")
            name = f"model.layers.{layer}.mlp.switch_mlp.{proj}.{kind}"
            out[name] = mx.stack([experts[e] for e in range(E)])  # [E, out, in]
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out


# Synthetic presets (dist_runtime/synthetic.py): config dicts in HF form.
_GLM45_COMMON = dict(
    model_type="glm4_moe", num_attention_heads=96, num_key_value_heads=8, head_dim=128,
    vocab_size=151552, n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
    norm_topk_prob=True, attention_bias=True, partial_rotary_factor=0.5, rope_theta=1000000.0,
    rope_scaling=None, rms_norm_eps=1e-5, max_position_embeddings=131072,
    num_nextn_predict_layers=1, tie_word_embeddings=False)

PRESETS = {
    # Grouped routing really prunes here (4 groups of 2, keep 2), unlike the released models.
    "tiny": dict(model_type="glm4_moe", hidden_size=64, num_hidden_layers=4,
                 intermediate_size=128, moe_intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                 first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                 use_qk_norm=False, attention_bias=True, partial_rotary_factor=0.5,
                 rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
                 max_position_embeddings=4096, num_nextn_predict_layers=1,
                 tie_word_embeddings=False),
    # GLM-4.5-Air's layout scaled down until a CPU rank computes a 1024-token prompt in
    # seconds (about 15 MFLOP a token): for pipeline benchmarks on loopback.
    "small": dict(_GLM45_COMMON, hidden_size=256, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=768, moe_intermediate_size=128, n_routed_experts=16,
                  num_experts_per_tok=4, first_k_dense_replace=1, routed_scaling_factor=1.0,
                  use_qk_norm=False, vocab_size=8192, max_position_embeddings=8192),
    # zai-org/GLM-4.5-Air config.json: 106B total, 12B active.
    "glm-4.5-air": dict(_GLM45_COMMON, hidden_size=4096, num_hidden_layers=46,
                        intermediate_size=10944, moe_intermediate_size=1408,
                        n_routed_experts=128, first_k_dense_replace=1,
                        routed_scaling_factor=1.0, use_qk_norm=False),
    # zai-org/GLM-4.5 config.json: 355B total, 32B active. Shapes recalled from the
    # config and cross-checked against slime's Megatron script for glm4.5-355B-A32B
    # (3 dense + 89 MoE layers, qk-layernorm, rotary base 1e6, scaling 2.5).
    "glm-4.5": dict(_GLM45_COMMON, hidden_size=5120, num_hidden_layers=92,
                    intermediate_size=12288, moe_intermediate_size=1536,
                    n_routed_experts=160, first_k_dense_replace=3,
                    routed_scaling_factor=2.5, use_qk_norm=True),
}

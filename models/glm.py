"""GLM-4 dense (Hugging Face `model_type: glm`, e.g. THUDM/glm-4-9b-chat-hf).

The idea: a pre-norm decoder (RMSNorm, grouped-query attention, SwiGLU MLP) from the
GLM-4 family, "ChatGLM: A Family of Large Language Models from GLM-130B to GLM-4 All
Tools" (arXiv:2406.12793); model card https://huggingface.co/THUDM/glm-4-9b-chat-hf.
What sets it apart from Llama:
- biases on q/k/v (`attention_bias`), none on the output projection;
- partial rotary embedding: RoPE turns only the first `partial_rotary_factor` of each
  head's dimensions, with adjacent pairs rotated together (the "interleaved" layout,
  mlx's `traditional=True`); the rest of the head carries no position;
- the MLP's gate and up projections are fused in one `gate_up_proj` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .base import BaseConfig, ConfigError, PipelineMixin, rope_settings, swiglu
from .gqa import GroupedHeads, PartialRopeAttention


@dataclass
class ModelArgs(BaseConfig, GroupedHeads):
    """Fields of a GLM `config.json`."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    head_dim: Optional[int] = None
    attention_bias: bool = True  # GLM-4 keeps q/k/v biases
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5  # GLM-4 rotates half of each head
    rope_scaling: Optional[dict] = None  # older spelling of rope_parameters
    rope_parameters: Optional[dict] = None  # transformers 5: rope_theta & co. live here
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False

    def __post_init__(self):
        """Take rope_theta and partial_rotary_factor from wherever transformers would."""
        self.rope_theta, self.partial_rotary_factor, kind, _ = rope_settings(
            self.rope_theta, self.partial_rotary_factor, self.rope_scaling, self.rope_parameters)
        if kind != "default":
            raise ConfigError(f"glm: rope type {kind!r} is not implemented; only plain RoPE "
                              f"(rope_type \"default\") is")


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused: gate_up_proj -> [gate | up]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        # GQA with q/k/v biases and partial RoPE over adjacent pairs (module docstring).
        self.self_attn = PartialRopeAttention(args, interleaved=True)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GLMModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module, PipelineMixin):
    """GLM causal LM; the stage surface comes from PipelineMixin (models/base.py)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = GLMModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def sanitize(self, weights: dict) -> dict:
        """Drop rotary caches HF may store and a duplicate head when tied."""
        out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out


# Synthetic presets (models/../dist_runtime/synthetic.py): config dicts in HF form.
PRESETS = {
    "tiny": dict(model_type="glm", hidden_size=64, num_hidden_layers=5, intermediate_size=160,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                 rms_norm_eps=1e-5, attention_bias=True, partial_rotary_factor=0.5,
                 rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False),
    # THUDM/glm-4-9b-chat-hf
    "glm-4-9b": dict(model_type="glm", hidden_size=4096, num_hidden_layers=40,
                     intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2,
                     head_dim=128, vocab_size=151552, rms_norm_eps=1.5625e-07,
                     attention_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0,
                     max_position_embeddings=131072, tie_word_embeddings=False),
}

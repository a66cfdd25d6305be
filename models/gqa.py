"""Grouped-query attention with partial RoPE, as the GLM family writes it, and the head
arithmetic that configs with grouped key/value heads share.

GLM-4 (dense, `glm.py`) and GLM-4.5 (MoE, `glm4_moe.py`) both project q/k/v with
optional biases and no output bias, and rotate only the first `partial_rotary_factor` of
each head's dimensions. They differ in two switches: which dimensions a rotation pairs
(adjacent ones in GLM-4, mlx's `traditional=True`; i with i + rot/2 in GLM-4.5, HF's
`rotate_half`), and GLM-4.5's optional RMSNorm over each head's query and key. One class
with those switches serves both, so a fix to one reaches the other.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .base import attention, merge_heads, split_heads


class GroupedHeads:
    """For configs with hidden_size, num_attention_heads, num_key_value_heads, an
    optional head_dim and num_hidden_layers (every layer attends the same way)."""

    @property
    def dim_per_head(self) -> int:
        """Head width: `head_dim` when given, else hidden_size / heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def kv_values_per_token(self) -> list:
        """Per layer, the numbers one cached position holds (keys and values)."""
        return [2 * self.num_key_value_heads * self.dim_per_head] * self.num_hidden_layers


class PartialRopeAttention(nn.Module):
    """GQA with optional q/k/v biases, optional per-head q/k RMSNorm, and RoPE over the
    leading `partial_rotary_factor` of each head (the rest carries no position).

    `interleaved`: a rotation pairs adjacent dimensions (GLM-4) rather than dimension i
    with i + rot/2 (GLM-4.5). `qk_norm`: RMSNorm each head's query and key before RoPE.
    The attribute names are the checkpoints' (`q_proj`, ..., `q_norm`, `k_norm`).
    """

    def __init__(self, args, interleaved: bool, qk_norm: bool = False):
        super().__init__()
        hd = args.dim_per_head
        self.n_heads, self.n_kv = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        # nn.RoPE with dims < head width rotates the leading dims and passes the rest.
        self.rope = nn.RoPE(int(hd * args.partial_rotary_factor), traditional=interleaved,
                            base=args.rope_theta)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        q = split_heads(self.q_proj(x), self.n_heads)  # [B, H, L, Dh]
        k = split_heads(self.k_proj(x), self.n_kv)  # [B, Hkv, L, Dh]
        v = split_heads(self.v_proj(x), self.n_kv)
        if self.qk_norm:  # per head, before RoPE (as HF)
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q, offset=cache.offset)
        k = self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        return self.o_proj(merge_heads(attention(q, k, v, self.scale, mask)))

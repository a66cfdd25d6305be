"""Lille 130M (Hugging Face `model_type: lille-130m`, e.g. Nikity/lille-130m-instruct).

The idea: a small Llama-style decoder trained from scratch as part of an open stack
(tokenizer, data, optimizer); model card https://huggingface.co/Nikity/lille-130m-instruct,
code https://github.com/Nikityyy/lille. Pre-norm blocks with grouped-query attention,
RoPE, RMSNorm and a SwiGLU MLP, the LM head tied to the token embedding. Its traits:
- Norms live inside the sub-blocks: `attention.norm` and `feed_forward.norm` are the
  pre-norms of the two residual branches (Llama's input/post-attention layernorms under
  other names), `transformer.norm` the final one; all RMSNorm with `layer_norm_eps`.
- Fused qkv projection: one `qkv_proj` matrix whose output is [q | k | v], with n_head
  query heads and n_kv_heads key/value heads, head width n_embd / n_head.
- RoPE over the whole head with base `rope_theta`, rotating adjacent pairs (mlx's
  `traditional=True`), as mlx-lm does; see ROPE_TRADITIONAL for the doubt.
- SwiGLU hidden width from n_embd alone (LilleConfig has no `intermediate_size`), see
  `ffn_width`: a classic MLP is 4 * n_embd wide with two matrices; SwiGLU has three
  (gate, up, down), so the width is scaled by 2/3 to keep the parameter count,
  int(2/3 * 4 * n_embd) = int(8 * n_embd / 3), then rounded up to a multiple of 256 so
  the matmul widths fill hardware tiles. For n_embd 640: int(1706.67) = 1706 -> 1792.
  The rounding rules in use disagree for some widths, so a checkpoint's own shapes
  decide (`config_from_shapes`, used by the loader) unless config.json states
  `intermediate_size`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import (BaseConfig, ConfigError, PipelineMixin, attention, merge_heads, split_heads, swiglu)

FFN_MULTIPLE = 256  # SwiGLU widths are rounded up to a multiple of this
FFN_GATE = re.compile(r"^transformer\.layers\.\d+\.feed_forward\.gate_proj\.weight$")
# mlx-lm rotates adjacent pairs. The author's GGUF export permutes q/k the way HF-Llama
# (half-rotating) weights are permuted for llama.cpp, which hints the original rotates
# halves instead; the original model.py is not public, so we follow mlx-lm, which is
# what mlx-community checkpoints are run with.
ROPE_TRADITIONAL = True


def ffn_width(n_embd: int) -> int:
    """SwiGLU hidden width: int(8 * n_embd / 3) rounded up to a multiple of FFN_MULTIPLE.

    This is the rule of the author's own export code (github.com/Nikityyy/lille,
    gguf/export_gguf.py). mlx-lm rounds to the *nearest* multiple instead; the two agree
    for the published n_embd 640 (1792) but not when int(8 * n_embd / 3) lies at most
    half a multiple above one, e.g. n_embd 128: 341 -> 512 here, 256 in mlx-lm.
    """
    base = int(8 * n_embd / 3)  # 2/3 of the 4 * n_embd a two-matrix MLP would use
    return FFN_MULTIPLE * ((base + FFN_MULTIPLE - 1) // FFN_MULTIPLE)


@dataclass
class ModelArgs(BaseConfig):
    """Fields of a Lille `config.json` (HF's LilleConfig, nanoGPT-style names)."""

    model_type: str
    n_embd: int
    n_layer: int
    n_head: int
    vocab_size: int
    n_kv_heads: Optional[int] = None  # None = one kv head per query head
    block_size: int = 512  # context length it was trained with; not enforced here
    layer_norm_eps: float = 1e-5  # eps of every RMSNorm
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True  # LilleConfig always sets True
    intermediate_size: Optional[int] = None  # SwiGLU width; None: ffn_width(n_embd)

    def __post_init__(self):
        """Fill n_kv_heads and reject shapes the architecture cannot have."""
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.n_embd % self.n_head or self.n_head % self.n_kv_heads:
            raise ConfigError(f"lille-130m: n_embd {self.n_embd}, n_head {self.n_head} and "
                              f"n_kv_heads {self.n_kv_heads} do not divide evenly")
        if not self.tie_word_embeddings:
            raise ConfigError("lille-130m always ties its LM head to the embedding; "
                              "tie_word_embeddings=false describes no known checkpoint")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def ffn_width(self) -> int:
        """SwiGLU hidden width: as stated, else by the author's rule (`ffn_width`)."""
        return self.intermediate_size or ffn_width(self.n_embd)

    def kv_values_per_token(self) -> list:
        """Per layer, the numbers one cached position holds (keys and values)."""
        return [2 * self.n_kv_heads * self.head_dim] * self.n_layer


class Attention(nn.Module):
    """Pre-normed GQA: norm, fused qkv projection, RoPE, attention, out_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hd = args.head_dim
        self.n_heads, self.n_kv = args.n_head, args.n_kv_heads
        self.scale = hd**-0.5
        self.norm = nn.RMSNorm(args.n_embd, eps=args.layer_norm_eps)
        self.qkv_proj = nn.Linear(args.n_embd, (self.n_heads + 2 * self.n_kv) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.n_embd, bias=False)
        self.rope = nn.RoPE(hd, traditional=ROPE_TRADITIONAL, base=args.rope_theta)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] (the residual stream, not yet normed) -> [B, L, D]."""
        qkv = split_heads(self.qkv_proj(self.norm(x)), self.n_heads + 2 * self.n_kv)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv], axis=1)  # [B, H, L, Dh]
        q = self.rope(q, offset=cache.offset)
        k = self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)  # [B, Hkv, S, Dh]
        return self.out_proj(merge_heads(attention(q, k, v, self.scale, mask)))


class FeedForward(nn.Module):
    """Pre-normed SwiGLU: down(silu(gate(norm x)) * up(norm x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        width = args.ffn_width
        self.norm = nn.RMSNorm(args.n_embd, eps=args.layer_norm_eps)
        self.gate_proj = nn.Linear(args.n_embd, width, bias=False)
        self.up_proj = nn.Linear(args.n_embd, width, bias=False)
        self.down_proj = nn.Linear(width, args.n_embd, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, L, D] (not yet normed) -> [B, L, D]."""
        h = self.norm(x)
        return self.down_proj(swiglu(self.gate_proj(h), self.up_proj(h)))  # via [B, L, F]


class Block(nn.Module):
    """x + attention(x), then + feed_forward(.); each branch norms its own input."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        h = x + self.attention(x, mask, cache)
        return h + self.feed_forward(h)


class LilleModel(nn.Module):
    """Token embedding, blocks and final norm (HF's `transformer.` prefix)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.n_embd)
        self.layers = [Block(args) for _ in range(args.n_layer)]
        self.norm = nn.RMSNorm(args.n_embd, eps=args.layer_norm_eps)


class Model(nn.Module, PipelineMixin):
    """Lille causal LM with the stage surface of models/base.py; the head is always tied."""

    LAYERS_PATH = "transformer.layers"
    EMBED_PATH = "transformer.tok_embeddings"
    NORM_PATH = "transformer.norm"
    LM_HEAD_PATH = None  # no head matrix of its own: it reads the embedding
    WIDTH_FIELD = "n_embd"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.transformer = LilleModel(args)

    def sanitize(self, weights: dict) -> dict:
        """Drop RoPE tables and the tied head copies the PyTorch checkpoints may carry."""
        rope_tables = ("rotary_emb", "cos_cached", "sin_cached", "inv_freq", "freqs_cis")
        # The HF wrapper names the tied head `transformer.lm_head`, the author's GGUF export
        # `transformer.output`; both are the embedding again.
        tied_heads = ("lm_head.weight", "transformer.lm_head.weight", "transformer.output.weight")
        return {k: v for k, v in weights.items()
                if k not in tied_heads and not any(t in k for t in rope_tables)}


def config_from_shapes(config: dict, names: list, shape_of: Callable) -> dict:
    """`config` with the MLP width its checkpoint was saved with, when config.json does not
    state one: two rounding rules are in use (`ffn_width`), and the shapes settle it.

    `names` are tensor names whose file is at hand, `shape_of(name)` their shape (the
    loader reads it from the safetensors header); dim 0 of gate_proj is the width, packed
    or not.
    """
    if config.get("intermediate_size") is not None:
        return config
    name = next((n for n in names if FFN_GATE.match(n)), None)
    shape = shape_of(name) if name else None
    return dict(config, intermediate_size=int(shape[0])) if shape else config


# Synthetic presets (dist_runtime/synthetic.py): config dicts in HF form.
PRESETS = {
    # n_embd 64 -> SwiGLU width 256 under both rounding rules (ours and mlx-lm's).
    "tiny": dict(model_type="lille-130m", n_embd=64, n_layer=4, n_head=4, n_kv_heads=2,
                 vocab_size=512, block_size=512, layer_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=True),
    # Nikity/lille-130m-instruct. Layers, width, heads, kv heads and context are from the
    # model card/README; vocab 32768 is the Hastings tokenizer's (README, LilleConfig
    # default). layer_norm_eps and rope_theta are train.py's and LilleConfig's defaults:
    # we have not seen the published config.json, so they are the least certain fields.
    "lille-130m": dict(model_type="lille-130m", n_embd=640, n_layer=24, n_head=10,
                       n_kv_heads=2, vocab_size=32768, block_size=512, layer_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=True),
}

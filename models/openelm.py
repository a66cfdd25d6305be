"""OpenELM (Hugging Face `model_type: openelm`, e.g. apple/OpenELM-270M).

The idea: "OpenELM: An Efficient Language Model Family with Open Training and Inference
Framework" (Mehta et al., arXiv:2404.14619); model card
https://huggingface.co/apple/OpenELM-270M. A pre-norm decoder (RMSNorm, grouped-query
attention, SwiGLU FFN, RoPE) whose layers are *not* all the same size. Layer-wise
scaling gives the first layers few attention heads and a narrow FFN and the last layers
many heads and a wide FFN, spending a fixed parameter budget where it helps most.

Layer-wise scaling, as the config describes it (the helpers below compute it):
- `qkv_multipliers = [a, b]` and `ffn_multipliers = [c, d]` are bounds. Layer i of N
  gets a multiplier linearly interpolated between them (numpy.linspace over N points,
  rounded to 2 decimals, as HF's configuration_openelm.py does). A single number means
  the same multiplier for every layer.
- Query width of layer i = make_divisible(model_dim * qkv_mult[i], head_dim *
  num_gqa_groups), so the number of query heads is that width / head_dim. Every head is
  `head_dim` wide; layers differ in how many heads they have, not in head width.
- Key/value heads of layer i = query heads / `num_gqa_groups`. Despite its name,
  `num_gqa_groups` is the number of query heads that share one kv head. So the kv head
  count grows with depth too, and the divisor above makes the division exact.
- FFN width of layer i = make_divisible(model_dim * ffn_mult[i], ffn_dim_divisor).
HF's `config.json` also stores the derived lists (`num_query_heads`, `num_kv_heads` and
`ffn_multipliers` expanded to one per layer). When they are there we use them as given,
because they describe the shapes the checkpoint was saved with.

Other traits:
- fused qkv projection: one `qkv_proj` matrix whose output is laid out per head as
  [query heads | key heads | value heads], each head_dim wide;
- `normalize_qk_projections`: an RMSNorm over head_dim on every query and key head
  before RoPE, which keeps the attention logits bounded;
- RoPE turns the whole head, pairing its two halves (mlx's `traditional=False`), with
  base `rope_freq_constant`;
- `share_input_output_layers`: the LM head reuses the token embedding matrix, so there
  is no `lm_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .base import (BaseConfig, ConfigError, PipelineMixin, attention, merge_heads, split_heads, swiglu)

MULTIPLIER_DECIMALS = 2  # HF rounds interpolated multipliers to 2 decimals; shapes depend on it
MAX_ROUND_DOWN = 0.9  # make_divisible never returns less than 90% of the value asked for


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None) -> int:
    """Round `value` to the nearest multiple of `divisor`, but never more than 10% below it.

    Why: matmul widths that are whole multiples of a large power of two (the FFN's
    `ffn_dim_divisor`, 256 in the published models) fill hardware tiles and SIMD lanes
    with no ragged remainder. For attention the divisor is head_dim * num_gqa_groups, so
    the width is a whole number of heads that splits evenly into kv groups. Rounding to
    the nearest multiple can lose up to half a divisor, which for a narrow layer is a
    large share of its capacity, so a result more than 10% below `value` is bumped up one
    multiple. The result is at least `min_value` (default: one divisor). The rule comes
    from MobileNet's channel rounding, which OpenELM's configuration code reuses.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < MAX_ROUND_DOWN * value:
        rounded += divisor
    return int(rounded)


def interpolate(lo: float, hi: float, n: int) -> list:
    """n evenly spaced values from lo to hi inclusive, computed as numpy.linspace does."""
    if n == 1:
        return [float(lo)]
    step = (hi - lo) / (n - 1)
    # linspace computes start + i * step and then pins the last point to `hi` exactly;
    # matching its floating point matters because the values are rounded afterwards.
    return [lo + i * step for i in range(n - 1)] + [float(hi)]


def layer_multipliers(spec: Union[float, list], n_layers: int, name: str) -> list:
    """One multiplier per layer from a config value: a number, [first, last] bounds, or a list."""
    if isinstance(spec, Number):
        return [float(spec)] * n_layers
    spec = list(spec)
    if len(spec) == 2:
        return [round(v, MULTIPLIER_DECIMALS) for v in interpolate(spec[0], spec[1], n_layers)]
    if len(spec) == n_layers:
        return [float(v) for v in spec]
    raise ConfigError(
        f"openelm {name} must be a number, [first, last] bounds or one value per layer "
        f"({n_layers}); got {len(spec)} values"
    )


def query_heads_per_layer(model_dim: int, head_dim: int, num_gqa_groups: int,
                          qkv_multipliers: list) -> list:
    """Query heads of each layer: make_divisible(model_dim * m, head_dim * groups) / head_dim."""
    divisor = head_dim * num_gqa_groups
    return [make_divisible(model_dim * m, divisor) // head_dim for m in qkv_multipliers]


def ffn_widths_per_layer(model_dim: int, ffn_dim_divisor: int, ffn_multipliers: list) -> list:
    """FFN hidden width of each layer: make_divisible(model_dim * m, ffn_dim_divisor)."""
    return [make_divisible(model_dim * m, ffn_dim_divisor) for m in ffn_multipliers]


@dataclass
class ModelArgs(BaseConfig):
    """Fields of an OpenELM `config.json`; the per-layer lists are derived in __post_init__.

    Defaults are those of HF's OpenELMConfig, which writes `config.json`. mlx-lm's
    defaults differ for normalize_qk_projections and share_input_output_layers (True
    there); every published config sets both explicitly.
    """

    model_type: str
    model_dim: int
    num_transformer_layers: int
    head_dim: int
    vocab_size: int
    qkv_multipliers: Union[float, list] = 1.0  # number, [first, last] bounds, or per layer
    ffn_multipliers: Union[float, list] = 4.0  # number, [first, last] bounds, or per layer
    num_gqa_groups: int = 1  # query heads per kv head (1 = multi-head attention)
    ffn_dim_divisor: int = 256  # FFN widths are multiples of this
    ffn_with_glu: bool = True  # SwiGLU FFN (all published models); False = plain SiLU MLP
    normalize_qk_projections: bool = False  # RMSNorm on query/key heads
    share_input_output_layers: bool = False  # LM head tied to the token embedding
    rope_freq_constant: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-6  # HF hard-codes 1e-6 in OpenELMRMSNorm
    num_query_heads: Optional[list] = None  # per layer; derived when absent
    num_kv_heads: Optional[list] = None  # per layer; derived when absent

    # HF's OpenELMConfig names the activation and the norm; only these are implemented.
    ASSUMED = {"activation_fn_name": ("swish", "silu"), "normalization_layer_name": ("rms_norm",),
               **BaseConfig.ASSUMED}
    # The context it was trained for, and how far HF precomputes its RoPE tables.
    INERT = frozenset({"max_context_length", "rope_max_length"})

    def __post_init__(self):
        """Derive the per-layer head counts and FFN widths (see the module docstring)."""
        n = self.num_transformer_layers
        if self.num_query_heads is None:
            qkv = layer_multipliers(self.qkv_multipliers, n, "qkv_multipliers")
            self.num_query_heads = query_heads_per_layer(self.model_dim, self.head_dim,
                                                         self.num_gqa_groups, qkv)
        if self.num_kv_heads is None:
            self.num_kv_heads = [h // self.num_gqa_groups for h in self.num_query_heads]
        # Plain attributes, not config fields: what each layer's FFN is built with.
        self.layer_ffn_multipliers = layer_multipliers(self.ffn_multipliers, n, "ffn_multipliers")
        self.ffn_widths = ffn_widths_per_layer(self.model_dim, self.ffn_dim_divisor,
                                               self.layer_ffn_multipliers)
        if len(self.num_query_heads) != n or len(self.num_kv_heads) != n:
            raise ConfigError(f"openelm num_query_heads/num_kv_heads need {n} entries, one per layer")
        for i, (hq, hkv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if hkv <= 0 or hq % hkv:
                raise ConfigError(f"openelm layer {i}: {hq} query heads cannot share {hkv} kv heads")

    def kv_values_per_token(self) -> list:
        """Per layer, the numbers one cached position holds (keys and values): the kv
        head count varies with depth."""
        return [2 * kv * self.head_dim for kv in self.num_kv_heads]


class Attention(nn.Module):
    """GQA with a fused qkv projection, optional q/k RMSNorm and RoPE; heads vary per layer."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hd = args.head_dim
        self.n_heads, self.n_kv = args.num_query_heads[layer], args.num_kv_heads[layer]
        self.scale = hd**-0.5
        self.qkv_proj = nn.Linear(args.model_dim, (self.n_heads + 2 * self.n_kv) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.model_dim, bias=False)
        if args.normalize_qk_projections:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = nn.RoPE(hd, traditional=False, base=args.rope_freq_constant)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        qkv = split_heads(self.qkv_proj(x), self.n_heads + 2 * self.n_kv)  # [B, Hq+2Hkv, L, Dh]
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)  # over Dh, per head and position
        q = self.rope(q, offset=cache.offset)
        k = self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)  # [B, Hkv, S, Dh]
        return self.out_proj(merge_heads(attention(q, k, v, self.scale, mask)))


class FeedForward(nn.Module):
    """SwiGLU with gate and up fused in `proj_1` ([gate | up]); `proj_2` projects back."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        width = args.ffn_widths[layer]
        self.glu = args.ffn_with_glu
        self.proj_1 = nn.Linear(args.model_dim, (2 if self.glu else 1) * width, bias=False)
        self.proj_2 = nn.Linear(width, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        h = self.proj_1(x)  # [B, L, 2F] with GLU, else [B, L, F]
        if self.glu:
            gate, up = mx.split(h, 2, axis=-1)
            return self.proj_2(swiglu(gate, up))
        return self.proj_2(nn.silu(h))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then + ffn(ffn_norm(.))."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn = Attention(args, layer)
        self.ffn = FeedForward(args, layer)
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class OpenELMModel(nn.Module):
    """Token embedding, decoder layers and final norm (HF's `transformer.` prefix)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)


class Model(nn.Module, PipelineMixin):
    """OpenELM causal LM with the stage surface of models/base.py."""

    LAYERS_PATH = "transformer.layers"
    EMBED_PATH = "transformer.token_embeddings"
    NORM_PATH = "transformer.norm"
    TIE_FIELD = "share_input_output_layers"
    WIDTH_FIELD = "model_dim"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.transformer = OpenELMModel(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def sanitize(self, weights: dict) -> dict:
        """Drop rotary tables HF may store and a duplicate head when tied."""
        # HF's rotary module is `pos_embedding` (inv_freq, _cached_cos, _cached_sin); they
        # are non-persistent buffers, but a re-saved checkpoint can still carry them.
        out = {k: v for k, v in weights.items()
               if ".pos_embedding." not in k and "rotary_emb" not in k}
        if self.args.share_input_output_layers:
            out.pop("lm_head.weight", None)
        return out


# Synthetic presets (dist_runtime/synthetic.py): config dicts in HF form.
PRESETS = {
    # Heads per layer [4, 6, 6, 8], kv heads [2, 3, 3, 4], FFN widths [64, 128, 192, 256].
    "tiny": dict(model_type="openelm", model_dim=128, num_transformer_layers=4, head_dim=16,
                 vocab_size=512, qkv_multipliers=[0.5, 1.0], ffn_multipliers=[0.5, 2.0],
                 num_gqa_groups=2, ffn_dim_divisor=32, ffn_with_glu=True,
                 normalize_qk_projections=True, share_input_output_layers=True,
                 rope_freq_constant=10000, rms_norm_eps=1e-6),
    # apple/OpenELM-270M: query heads 12..20, kv heads 3..5, FFN widths 768..5120.
    "openelm-270m": dict(model_type="openelm", model_dim=1280, num_transformer_layers=16,
                         head_dim=64, vocab_size=32000, qkv_multipliers=[0.5, 1.0],
                         ffn_multipliers=[0.5, 4.0], num_gqa_groups=4, ffn_dim_divisor=256,
                         ffn_with_glu=True, normalize_qk_projections=True,
                         share_input_output_layers=True, rope_freq_constant=10000,
                         rms_norm_eps=1e-6),
}

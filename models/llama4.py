"""Llama 4 text model (Hugging Face `model_type: llama4`, the text half of Scout/Maverick).

The idea (model card https://huggingface.co/meta-llama/Llama-4-Scout-17B-16E, Meta's blog
"The Llama 4 herd"): a pre-norm GQA decoder where
- MoE FFNs are interleaved with dense SwiGLU FFNs. A token goes to its top-k experts
  (k = 1 when released), whose *input* is scaled by the sigmoid of the router logit,
  plus a shared expert every token passes through;
- "iRoPE": most layers use RoPE with chunked local attention (a query sees only earlier
  keys of its own chunk); every few layers attend globally with no position encoding
  (NoPE), and there queries are scaled up slowly with position ("attention temperature
  tuning", arXiv:2501.19399) so attention does not flatten over long contexts.

Where each piece is written in `text_config` (HF's configuration_llama4.py is the spec):
- MoE vs dense: `moe_layers` (list of layer indices) when present, else every
  `interleave_moe_layer_step`-th layer, counting so the last of each step is MoE
  (step 1: all MoE, step 2: layers 1, 3, 5...). Dense FFNs are `intermediate_size_mlp`
  wide; routed and shared experts are `intermediate_size` wide.
- RoPE vs NoPE: `no_rope_layers`, a per-layer list where, despite the name, 1 means the
  layer *uses* RoPE; absent, it is derived as "every `no_rope_layer_interval`-th layer
  (default 4) is NoPE".
- chunked vs global attention: `layer_types` ("chunked_attention"/"full_attention") when
  present, else RoPE layers are chunked and NoPE layers global. Chunk: `attention_chunk_size`.
- temperature tuning (NoPE layers only, when `attn_temperature_tuning` is truthy): query
  at 0-based position p is multiplied by 1 + attn_scale * log(1 + floor((p+1)/floor_scale)).
- QK norm (`use_qk_norm`, RoPE layers only): a weightless RMS norm of each q/k head after
  RoPE ("L2Norm" in HF), eps = `rms_norm_eps` (mlx-lm hard-codes 1e-6).
- RoPE layout: HF multiplies adjacent pairs as complex numbers, i.e. the interleaved
  layout (mlx `traditional=True`). `rope_scaling` may be none or rope_type "llama3"
  (Scout); other types are refused with a ConfigError.

Every one of these decisions is made per GLOBAL layer index, because a pipeline stage
holds only some layers. Parameter names follow mlx-community checkpoints
(`language_model.model.layers.N...`); `sanitize` converts HF's fused expert tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .base import (BaseConfig, ConfigError, PipelineMixin, attention, attention_mask, causal_mask,
                   merge_heads, rope_settings, split_heads, swiglu)
from .cache import ChunkedKVCache, KVCache
from .experts import ExpertGLU
from .gqa import GroupedHeads

CHUNKED = "chunked_attention"  # HF's `layer_types` value for local layers
DROPPED_PREFIXES = ("vision_model.", "multi_modal_projector.")  # image tower: not text
EXPERTS = ".feed_forward.experts."


@dataclass
class TextConfig(BaseConfig, GroupedHeads):
    """Fields of Llama 4's `text_config`; defaults are HF's (configuration_llama4.py)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int  # width of routed and shared experts
    intermediate_size_mlp: int  # width of the dense FFN layers
    num_local_experts: int
    vocab_size: int
    model_type: str = "llama4_text"
    head_dim: Optional[int] = None
    num_experts_per_tok: int = 1  # the released models route each token to one expert
    interleave_moe_layer_step: int = 1
    moe_layers: Optional[list] = None  # overrides the step when given
    no_rope_layers: Optional[list] = None  # 1 = uses RoPE (HF's name is inverted)
    no_rope_layer_interval: int = 4
    layer_types: Optional[list] = None
    attention_chunk_size: Optional[int] = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True  # Scout's config.json writes 4: any truthy value
    floor_scale: int = 8192  # positions per temperature step
    attn_scale: float = 0.1  # strength of the temperature growth
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict] = None
    rope_parameters: Optional[dict] = None  # newer HF spelling of theta + scaling
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False  # no released checkpoint ties the embeddings

    INERT = frozenset({"for_llm_compressor", "cache_implementation"})  # Scout's config.json

    def __post_init__(self):
        """Check the per-layer lists cover every layer."""
        n = self.num_hidden_layers
        for name in ("no_rope_layers", "layer_types"):
            if getattr(self, name) and len(getattr(self, name)) < n:
                raise ConfigError(f"text_config.{name} has {len(getattr(self, name))} entries "
                                  f"for {n} layers; give one per layer")
        bad = [i for i in self.moe_layers or [] if not 0 <= i < n]
        if bad:
            raise ConfigError(f"text_config.moe_layers names layers {bad} outside 0..{n - 1}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                              f"num_local_experts={self.num_local_experts}")
        if any(self.is_chunked(i) for i in range(n)) and not self.attention_chunk_size:
            raise ConfigError("chunked attention layers need text_config.attention_chunk_size")
        rope_inv_freq(self.dim_per_head, *self.rope)  # refuse an unknown rope type now

    @property
    def rope(self) -> tuple:
        """(theta, scaling dict or None), from `rope_parameters` or the older fields,
        read as transformers reads them (models/base.py, rope_settings)."""
        theta, _, kind, p = rope_settings(self.rope_theta, None, self.rope_scaling,
                                          self.rope_parameters)
        return theta, (None if kind == "default" else p)

    def uses_rope(self, i: int) -> bool:
        """Whether global layer i applies RoPE (else it is a NoPE layer)."""
        if self.no_rope_layers:
            return bool(self.no_rope_layers[i])
        return (i + 1) % self.no_rope_layer_interval != 0

    def is_chunked(self, i: int) -> bool:
        """Whether global layer i attends only within its chunk (else: global causal)."""
        if self.layer_types:
            return self.layer_types[i] == CHUNKED
        return self.uses_rope(i)

    def is_moe(self, i: int) -> bool:
        """Whether global layer i's FFN is the mixture of experts (else dense SwiGLU)."""
        if self.moe_layers is not None:
            return i in self.moe_layers
        step = self.interleave_moe_layer_step
        return i % step == step - 1


@dataclass
class ModelArgs(BaseConfig):
    """Top of a Llama 4 `config.json`: the text model's fields nest under `text_config`."""

    model_type: str
    text_config: dict

    # The image side (vision tower, image token ids) does not touch text generation.
    INERT = frozenset({"vision_config", "boi_token_index", "eoi_token_index",
                       "image_token_index", "boi_token_id", "eoi_token_id", "image_token_id"})
    ASSUMED = {"tie_word_embeddings": (False,)}  # the text model's own flag is the one read

    @classmethod
    def config_warnings(cls, params: dict, where: str = "config.json") -> list:
        """The top level's warnings, then text_config's."""
        text = params.get("text_config")
        return super().config_warnings(params, where) + (
            TextConfig.config_warnings(text, f"{where} text_config")
            if isinstance(text, dict) else [])

    @classmethod
    def from_dict(cls, params: dict, where: str = "config.json") -> "ModelArgs":
        """The top level, then `text_config` as a TextConfig (errors name it)."""
        args = super().from_dict(params, where)
        args.text_config = TextConfig.from_dict(args.text_config, f"{where} text_config")
        return args

    def kv_values_per_token(self) -> list:
        """Per layer, the numbers one cached position holds (keys and values)."""
        return self.text_config.kv_values_per_token()


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> mx.array:
    """Inverse frequency of each rotated pair, [Dh/2]; rope_type none/default or llama3."""
    inv_freq = theta ** (-mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
    kind = "default" if not scaling else scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv_freq
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    raise ConfigError(f"rope_scaling type {kind!r} is not supported for Llama 4; "
                      f"supported: none, 'llama3'")


def llama3_inv_freq(inv_freq: mx.array, scaling: dict) -> mx.array:
    """Llama 3.1's long-context RoPE (HF `_compute_llama3_parameters`).

    Pairs whose wavelength exceeds original_ctx / low_freq_factor turn `factor` times
    slower, those shorter than original_ctx / high_freq_factor are kept, and the band in
    between blends the two linearly in original_ctx / wavelength.
    """
    try:
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
    except KeyError as e:
        raise ConfigError(f"rope_scaling of type llama3 lacks {e}; it needs factor, "
                          f"low_freq_factor, high_freq_factor, original_max_position_embeddings")
    wavelen = 2 * math.pi / inv_freq
    stretched = mx.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    if high == low:  # no blending band (Scout): HF's formula would divide 0 by 0 there
        return stretched
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return mx.where(in_band, blended, stretched)


def attention_temperature(offset, n: int, floor_scale: int, attn_scale: float) -> mx.array:
    """Query scale for positions offset..offset+n-1 on NoPE layers: [n, 1] for one
    sequence (an int offset), [B, 1, n, 1] for a micro-batch (offset [B], one per row)."""
    if isinstance(offset, mx.array):
        pos = (offset[:, None] + mx.arange(n)[None]).astype(mx.float32)  # [B, n]
    else:
        pos = mx.arange(offset, offset + n, dtype=mx.float32)
    steps = mx.floor((pos + 1) / floor_scale)  # grows by one every floor_scale tokens
    scale = (1 + attn_scale * mx.log1p(steps))[..., None]
    return scale[:, None] if isinstance(offset, mx.array) else scale


def chunked_mask(n_queries: int, offset: int, start: int, chunk: int) -> mx.array:
    """Boolean [Lq, Lk]: causal, and key in the same `chunk`-aligned block as the query.

    Queries sit at absolute positions offset.., keys at start..offset+n_queries-1.
    """
    q_block = mx.arange(offset, offset + n_queries)[:, None] // chunk
    k_block = mx.arange(start, offset + n_queries)[None] // chunk
    return causal_mask(n_queries, offset, start) & (q_block == k_block)


class Attention(nn.Module):
    """GQA; RoPE + QK norm on RoPE layers, temperature tuning on NoPE layers."""

    def __init__(self, args: TextConfig, layer: int):
        super().__init__()
        D, hd = args.hidden_size, args.dim_per_head
        self.n_heads, self.n_kv = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        self.eps = args.rms_norm_eps  # HF's L2Norm takes the config's rms eps
        self.use_rope = args.uses_rope(layer)
        self.use_qk_norm = args.use_qk_norm and self.use_rope
        self.tune_temperature = bool(args.attn_temperature_tuning) and not self.use_rope
        self.floor_scale, self.attn_scale = args.floor_scale, args.attn_scale
        bias = args.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, D, bias=bias)
        if self.use_rope:
            # mx.fast.rope takes periods (1 / inverse frequency); "_" keeps it out of params.
            self._rope_periods = 1.0 / rope_inv_freq(hd, *args.rope)

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        """RoPE on x [B, H, L, Dh] at `offset` with the (llama3-scaled) frequencies of this layer."""
        return mx.fast.rope(x, x.shape[-1], traditional=True, base=None, scale=1.0,
                            offset=offset, freqs=self._rope_periods)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        q = split_heads(self.q_proj(x), self.n_heads)  # [B, H, L, Dh]
        k = split_heads(self.k_proj(x), self.n_kv)  # [B, Hkv, L, Dh]
        v = split_heads(self.v_proj(x), self.n_kv)
        if self.use_rope:
            q, k = self._rope(q, cache.offset), self._rope(k, cache.offset)
        if self.use_qk_norm:
            q = mx.fast.rms_norm(q, None, self.eps)
            k = mx.fast.rms_norm(k, None, self.eps)
        if self.tune_temperature:
            t = attention_temperature(cache.offset, x.shape[1], self.floor_scale, self.attn_scale)
            q = (q * t).astype(q.dtype)  # [L, 1] broadcasts over heads and head dims
        k, v = cache.update_and_fetch(k, v)
        return self.o_proj(merge_heads(attention(q, k, v, self.scale, mask)))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense FFN and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., D] -> [..., D]."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class MoE(nn.Module):
    """Top-k routed experts, each fed x * sigmoid(its router logit), plus a shared expert."""

    def __init__(self, args: TextConfig):
        super().__init__()
        D, E = args.hidden_size, args.num_local_experts
        self.top_k = args.num_experts_per_tok
        self.router = nn.Linear(D, E, bias=False)
        self.experts = ExpertGLU(D, args.intermediate_size, E)
        self.shared_expert = MLP(D, args.intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        idx, xs = route_inputs(x, self.router(x), self.top_k)
        # Each (token, slot) pair is its own row with one expert: [B, L, k, 1] indices.
        routed = self.experts(xs, idx[..., None]).squeeze(-2).sum(axis=-2)  # [B, L, D]
        return routed + self.shared_expert(x)


@mx.compile
def route_inputs(x: mx.array, logits: mx.array, top_k: int) -> tuple:
    """(expert indices [B, L, k], each expert's input [B, L, k, D]) from the router's
    logits [B, L, E], as one compiled graph: at decode, a layer's selection is several
    tiny kernels, and fused they cost a few launches (mlx retraces if shapes change).
    HF scales the expert's *input* (not its output) by the sigmoid, computed in fp32."""
    idx = mx.stop_gradient(mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k])
    gate = mx.sigmoid(mx.take_along_axis(logits, idx, axis=-1).astype(mx.float32))
    return idx, x[..., None, :] * gate.astype(x.dtype)[..., None]


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(.)); ffn is MoE or dense."""

    def __init__(self, args: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.feed_forward = (MoE(args) if args.is_moe(layer)
                             else MLP(args.hidden_size, args.intermediate_size_mlp))
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    """Embedding, decoder layers and final norm (`language_model.model.`)."""

    def __init__(self, args: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class LanguageModel(nn.Module):
    """The text model and its LM head (`language_model.`)."""

    def __init__(self, args: TextConfig):
        super().__init__()
        self.model = TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


class Model(nn.Module, PipelineMixin):
    """Llama 4 causal LM (text only) with the stage surface of models/base.py."""

    LAYERS_PATH = "language_model.model.layers"
    EMBED_PATH = "language_model.model.embed_tokens"
    NORM_PATH = "language_model.model.norm"
    LM_HEAD_PATH = "language_model.lm_head"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.text = args.text_config
        self.language_model = LanguageModel(self.text)

    @property
    def hidden_width(self) -> int:
        """Width D of the hidden state (the text model's hidden_size)."""
        return self.text.hidden_size

    def tied_embeddings(self) -> bool:
        """Whether the LM head reads the embedding (text_config.tie_word_embeddings)."""
        return bool(self.text.tie_word_embeddings)

    def make_caches(self) -> list:
        """Per owned layer: a ChunkedKVCache on chunked layers, a full KVCache on global ones."""
        chunk = self.text.attention_chunk_size
        return [ChunkedKVCache(chunk) if self.text.is_chunked(i) else KVCache()
                for i, _ in self.owned_layers()]

    def reuse_floor(self, positions: int) -> int:
        """Chunked layers (on any stage) keep only the current chunk's keys: a prefix must
        end in the chunk that the caches' last position is in."""
        if not any(self.text.is_chunked(i) for i in range(self.text.num_hidden_layers)):
            return 0
        chunk = self.text.attention_chunk_size
        return (positions // chunk) * chunk

    def forward_layer(self, index: int, layer, h: mx.array, cache) -> mx.array:
        """One owned layer, with the mask its global index calls for: h [B, L, D]."""
        n = h.shape[1]
        if not self.text.is_chunked(index) or getattr(cache, "batched", False):
            return layer(h, attention_mask(n, cache), cache)  # a batch masks its own chunks
        chunk = self.text.attention_chunk_size
        first = (cache.offset // chunk) * chunk  # where the first query's chunk starts
        if cache.start >= first and cache.offset + n <= first + chunk:
            # Every kept key and every query in one chunk: plain causal attention, with no
            # mask to build (at decode, a handful of kernels on three layers of four).
            mask = attention_mask(n, cache)
        else:
            mask = chunked_mask(n, cache.offset, cache.start, chunk)
        h = layer(h, mask, cache)
        cache.trim()  # the next query's chunk never needs the keys before it
        return h

    def sanitize(self, weights: dict) -> dict:
        """Drop the image tower; split HF's fused experts into stacked [E, out, in] weights.

        HF stores `experts.gate_up_proj` [E, D, 2I] (gate first) and `experts.down_proj`
        [E, I, D], both input-major and without `.weight`; mlx-community names pass through.
        Only the tensors given are touched, so a stage may pass just its own layers.
        """
        out = {}
        for name, w in weights.items():
            if name.startswith(DROPPED_PREFIXES) or "rotary_emb." in name:
                continue
            if self.tied_embeddings() and name == f"{self.LM_HEAD_PATH}.weight":
                continue  # a copy of the embedding
            if name.endswith(EXPERTS + "gate_up_proj"):
                prefix = name[: -len("gate_up_proj")]
                gate, up = mx.split(w, 2, axis=-1)  # [E, D, I] each
                out[prefix + "gate_proj.weight"] = gate.swapaxes(1, 2)  # [E, I, D]
                out[prefix + "up_proj.weight"] = up.swapaxes(1, 2)
            elif name.endswith(EXPERTS + "down_proj"):
                out[name + ".weight"] = w.swapaxes(1, 2)  # [E, I, D] -> [E, D, I]
            else:
                out[name] = w
        return out


def _config(**text) -> dict:
    """A preset's config.json: the text model's fields under `text_config`."""
    return dict(model_type="llama4", text_config=dict(model_type="llama4_text", **text))


# What Scout and Maverick share (their HF config.json text_config).
_REAL_SHAPES = dict(
    hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
    head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_experts_per_tok=1,
    no_rope_layer_interval=4, attention_chunk_size=8192, attn_temperature_tuning=True,
    floor_scale=8192, attn_scale=0.1, attention_bias=False, vocab_size=202048,
    rms_norm_eps=1e-5, rope_theta=500000.0)

# Synthetic presets (dist_runtime/synthetic.py): config dicts in HF form.
PRESETS = {
    # Small enough for a 2-core CPU, yet it crosses a chunk (16) within a 48-token
    # prompt, the temperature steps every 8 tokens, and llama3 RoPE has a blending band.
    "tiny": _config(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, intermediate_size_mlp=192, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=4,
        attention_chunk_size=16, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8, attn_scale=0.1, attention_bias=False, vocab_size=512,
        rms_norm_eps=1e-6,  # mlx-lm's QK norm hard-codes 1e-6; equal here so both agree
        rope_theta=500000.0, max_position_embeddings=4096,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64)),
    # meta-llama/Llama-4-Scout-17B-16E text_config (from memory of its config.json;
    # attn_temperature_tuning is written there as 4, a truthy flag).
    "llama-4-scout": _config(
        **_REAL_SHAPES, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        max_position_embeddings=10485760,
        rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0,
                          high_freq_factor=1.0, original_max_position_embeddings=8192)),
    # meta-llama/Llama-4-Maverick-17B-128E: 128 experts on every other layer, no QK norm
    # (HF: "the 128E model does not use qk_norm"), no RoPE scaling. Doubtful from memory:
    # max_position_embeddings (1M) and whether config.json spells out moe_layers.
    "llama-4-maverick": _config(
        **_REAL_SHAPES, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
        max_position_embeddings=1048576, rope_scaling=None),
}

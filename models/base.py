"""Pieces every architecture shares: config parsing, the stage surface, masks, attention.

A model here is one stage of a pipeline, or the whole stack when it runs alone. Every
architecture offers the same surface (DESIGN.md, "Models"):

    embed(tokens) -> h            # [B, L] -> [B, L, D]; first stage only
    layers                        # list indexed by global layer number; None = not owned
    forward_layers(h, caches)     # runs the owned layers in order, each with its own mask
    head(h) -> logits             # final norm + LM head; the coordinator only
    make_caches()                 # one cache per owned layer, in order
    sanitize(weights)             # checkpoint names/layouts -> this module tree

This module knows nothing of ranks or transport: no `mx.distributed` under `models/`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn


class ConfigError(ValueError):
    """A `config.json` that cannot describe a model: missing or ill-typed fields."""


@dataclasses.dataclass
class BaseConfig:
    """Dataclass built from a Hugging Face `config.json` dict; unknown keys are ignored."""

    @classmethod
    def from_dict(cls, params: dict) -> "BaseConfig":
        """Build from a config dict, keeping only the fields this dataclass declares."""
        names = inspect.signature(cls).parameters
        missing = [n for n, p in names.items() if p.default is inspect.Parameter.empty and n not in params]
        if missing:
            raise ConfigError(
                f"config for model_type {params.get('model_type')!r} lacks required field(s) "
                f"{', '.join(missing)}; add them to config.json"
            )
        return cls(**{k: v for k, v in params.items() if k in names})


def causal_mask(n_queries: int, offset: int, start: int = 0) -> mx.array:
    """Boolean [Lq, Lk] mask: query at absolute position offset+i sees keys at <= that.

    Keys cover absolute positions start .. offset+n_queries-1 (start > 0 when a cache
    has dropped old keys).
    """
    q_pos = mx.arange(offset, offset + n_queries)[:, None]
    k_pos = mx.arange(start, offset + n_queries)[None]
    return q_pos >= k_pos


def attention_mask(n_queries: int, cache) -> Optional[Any]:
    """The mask for a plain causal layer: a micro-batch's row mask when the cache holds
    several sequences (models/batch_cache.py), None for one query, else mlx's fast
    'causal' (it aligns the queries with the last keys, right for a cache holding every
    earlier position)."""
    if getattr(cache, "batched", False):
        return cache.mask()
    if n_queries == 1:
        return None
    return "causal"


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """Scaled dot-product attention; q [B, Hq, L, Dh], k/v [B, Hkv, S, Dh] (GQA allowed)."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def split_heads(x: mx.array, n_heads: int) -> mx.array:
    """[B, L, H*Dh] -> [B, H, L, Dh]."""
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """[B, H, L, Dh] -> [B, L, H*Dh]."""
    B, H, L, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * Dh)


def _resolve(root: nn.Module, path: str):
    """(parent, leaf name) of a dotted attribute path under `root` (dicts or attributes)."""
    parent = root
    *parents, leaf = path.split(".")
    for p in parents:
        parent = parent[p] if isinstance(parent, dict) else getattr(parent, p)
    return parent, leaf


class PipelineMixin:
    """The stage surface, written once for every model laid out the usual way.

    A model class names where its parts live (dotted attribute paths) and inherits
    `layers`, `embed`, `forward_layers` (plain causal attention in every layer), `head`,
    `make_caches` and the pruning `pipeline()`; a model with more (Llama-4's chunked
    layers) overrides just that method. `pipeline()` drops whatever the stage does not
    own; dropped layers become None so the rest keep their global index and checkpoint
    names (`model.layers.17...`) still load.
    """

    LAYERS_PATH = "model.layers"
    EMBED_PATH = "model.embed_tokens"
    NORM_PATH = "model.norm"
    LM_HEAD_PATH: Optional[str] = "lm_head"  # None: the head always reads the embedding
    TIE_FIELD = "tie_word_embeddings"  # the config flag that ties the head to the embedding
    WIDTH_FIELD = "hidden_size"  # the config field giving the hidden state's width

    @property
    def hidden_width(self) -> int:
        """Width D of the hidden state that passes between layers (and between stages)."""
        return getattr(self.args, self.WIDTH_FIELD)

    def activation_dtype(self):
        """dtype of the hidden state: the float dtype most of this stage's parameters use
        (quantized weights count by their scales), which its layers compute in."""
        from collections import Counter

        from mlx.utils import tree_flatten

        kinds = Counter(p.dtype for _, p in tree_flatten(self.parameters())
                        if p.dtype in (mx.float32, mx.float16, mx.bfloat16))
        return kinds.most_common(1)[0][0]

    def _part(self, path: str):
        """The module at dotted `path` (LAYERS_PATH, EMBED_PATH, ...)."""
        parent, leaf = _resolve(self, path)
        return parent[leaf] if isinstance(parent, dict) else getattr(parent, leaf)

    @property
    def layers(self) -> list:
        """Decoder layers by global index; None where this stage does not own one."""
        return self._part(self.LAYERS_PATH)

    def tied_embeddings(self) -> bool:
        """Whether the LM head reuses the embedding matrix."""
        return self.LM_HEAD_PATH is None or bool(getattr(self.args, self.TIE_FIELD, False))

    def embed(self, tokens: mx.array) -> mx.array:
        """tokens [B, L] -> h [B, L, D]."""
        return self._part(self.EMBED_PATH)(tokens)

    def forward_layer(self, index: int, layer, h: mx.array, cache) -> mx.array:
        """One owned layer (global `index`) with the plain causal mask: h [B, L, D]."""
        return layer(h, attention_mask(h.shape[1], cache), cache)

    def forward_layers(self, h: mx.array, caches: list) -> mx.array:
        """Run the owned layers in order (a runtime may call forward_layer itself)."""
        for (i, layer), cache in zip(self.owned_layers(), caches):
            h = self.forward_layer(i, layer, h, cache)
        return h

    def head(self, h: mx.array) -> mx.array:
        """Final norm and LM head: h [B, L, D] -> logits [B, L, V]."""
        h = self._part(self.NORM_PATH)(h)
        if self.tied_embeddings():
            return self._part(self.EMBED_PATH).as_linear(h)
        return self._part(self.LM_HEAD_PATH)(h)

    def pipeline(self, start: int, end: int, has_embed: bool = True, has_head: bool = True):
        """Keep layers [start, end), the embedding if has_embed, the head if has_head."""
        layers = self.layers
        n = len(layers)
        if not 0 <= start <= end <= n:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {n} layers")
        for i in range(n):
            if not start <= i < end:
                layers[i] = None
        drop = []
        if not has_embed and not (has_head and self.tied_embeddings()):
            drop.append(self.EMBED_PATH)
        if not has_head:
            drop += [p for p in (self.NORM_PATH, self.LM_HEAD_PATH) if p]
        for path in drop:
            parent, leaf = _resolve(self, path)
            if leaf in parent:
                delattr(parent, leaf)
        self.layer_range = (start, end)
        return self

    def owned_layers(self) -> list:
        """[(global_index, layer)] for the layers this stage holds, in order."""
        return [(i, l) for i, l in enumerate(self.layers) if l is not None]

    def make_caches(self) -> list:
        """One plain KV cache per owned layer (models with other caches override)."""
        from .cache import KVCache

        return [KVCache() for _ in self.owned_layers()]

    def __call__(self, tokens: mx.array, caches: Optional[list] = None) -> mx.array:
        """Whole stack on one process: tokens [B, L] -> logits [B, L, V]."""
        if caches is None:
            caches = self.make_caches()
        return self.head(self.forward_layers(self.embed(tokens), caches))

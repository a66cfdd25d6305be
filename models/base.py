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
import json
import math
import typing
from typing import Any, ClassVar, Optional, Union

import mlx.core as mx
import mlx.nn as nn


class ConfigError(ValueError):
    """A `config.json` that cannot describe a model: missing or ill-typed fields."""


# Keys any Hugging Face config may carry that never change what a model computes when
# generating: bookkeeping, token ids (the tokenizer side reads them), training-only
# settings, old generation defaults, and the quantization the loader reads itself.
COMMON_INERT = frozenset({
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "name_or_path", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "use_cache", "initializer_range",
    "attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop",
    "attn_pdrop", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_return_dict", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "id2label", "label2id",
    "num_labels", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "pruned_heads", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss", "use_bfloat16",
    "quantization", "quantization_config",
})


def rope_settings(theta: float, partial: Optional[float], rope_scaling: Optional[dict],
                  rope_parameters: Optional[dict]) -> tuple:
    """(theta, partial rotary factor, rope type, the RoPE dict) as transformers reads them.

    Older configs write `rope_theta` and `partial_rotary_factor` at the top (and
    `rope_scaling` for a scaled RoPE); transformers 5 writes them inside
    `rope_parameters`. transformers takes `rope_scaling` when set, else
    `rope_parameters`; a value inside that dict wins over the top-level one.
    """
    p = rope_scaling or rope_parameters or {}
    name = "rope_scaling" if rope_scaling else "rope_parameters"
    theta = p.get("rope_theta", theta)
    partial = p.get("partial_rotary_factor", partial)
    kind = p.get("rope_type", p.get("type", "default"))
    if not (_fits(theta, float) and theta > 0):
        raise ConfigError(f"the RoPE base (rope_theta, in {name} or at the top) is "
                          f"{theta!r}; it must be a number above 0, e.g. 10000.0")
    if partial is not None and not (_fits(partial, float) and 0 < partial <= 1):
        raise ConfigError(f"partial_rotary_factor is {partial!r}; it must be a "
                          f"number in (0, 1], the share of each head that RoPE turns")
    return theta, partial, kind, p


_KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
          list: "a list", dict: "an object"}


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def _fits(value, hint) -> bool:
    """Whether a JSON value fits a field's annotation (int, float, Optional[list], ...)."""
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:  # configs write flags as numbers too (Llama-4 Scout: 4)
        return isinstance(value, (bool, int))
    if origin is not None:
        hint = origin
    if hint in (list, dict, str):
        return isinstance(value, hint)
    return True


def _wanted(hint) -> str:
    """'an integer', 'a number or null', ... for a field's annotation."""
    args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    kinds = [_KINDS.get(typing.get_origin(a) or a, getattr(a, "__name__", str(a)))
             for a in args if a is not type(None)]
    if type(None) in args:
        kinds.append("null")
    return " or ".join(kinds)


def _suggest(key: str, value, hint):
    """A corrected value when the intent is plain (a number written as a string)."""
    args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    if isinstance(value, str):
        for kind in (int, float):
            if kind in args:
                try:
                    fixed = kind(value)
                except ValueError:
                    continue
                if kind is float and not math.isfinite(fixed):
                    continue
                return fixed
        if bool in args and value.lower() in ("true", "false"):
            return value.lower() == "true"
    return None


@dataclasses.dataclass
class BaseConfig:
    """Dataclass built from a Hugging Face `config.json` dict; checks each value's type.

    What a subclass may declare, so that config.json is read as the reference reads it:
    - FIELD_ALIASES: other spellings the reference reads, key -> field
      (e.g. GLM-4.5's num_local_experts -> n_routed_experts);
    - ASSUMED: keys the model does not read because it implements one value only, key ->
      the values it implements (hidden_act: silu); another value gets a warning;
    - INERT: the model's own keys that do not change the computation (beside
      COMMON_INERT). Any other key it does not read gets a warning.
    """

    FIELD_ALIASES: ClassVar[dict] = {}
    ASSUMED: ClassVar[dict] = {"hidden_act": ("silu", "swish")}
    INERT: ClassVar[frozenset] = frozenset()

    @classmethod
    def config_warnings(cls, params: dict, where: str = "config.json") -> list:
        """Messages about keys of `params` that this model ignores though they may change
        what it computes (keys starting with '_' are the loader's own)."""
        names = set(inspect.signature(cls).parameters)
        out, unread = [], []
        for key, value in params.items():
            if key.startswith("_") or key in names or key in cls.FIELD_ALIASES or \
                    key in COMMON_INERT or key in cls.INERT:
                continue
            if key in cls.ASSUMED:
                if value is not None and value not in cls.ASSUMED[key]:
                    out.append(f"{where}: \"{key}\" is {value!r}, but this implementation "
                               f"always computes with {cls.ASSUMED[key][0]!r}; its output "
                               f"will differ from the reference implementation's")
                continue
            unread.append(key)
        if unread:
            out.append(f"{where}: model_type {params.get('model_type')!r} does not read "
                       f"{', '.join(map(repr, sorted(unread)))}; if they change what the "
                       f"model computes, its output will differ from the reference "
                       f"implementation's")
        return out

    @classmethod
    def from_dict(cls, params: dict, where: str = "config.json") -> "BaseConfig":
        """Build from a config dict, keeping only the fields this dataclass declares.

        A value of the wrong JSON type ("num_hidden_layers": "4") is a ConfigError that
        names the key, the value, what it must be and, where plain, the fix; `where`
        names the file (or the nested object) in that message.
        """
        names = inspect.signature(cls).parameters
        params = {**{f: params[a] for a, f in cls.FIELD_ALIASES.items()
                     if a in params and f not in params}, **params}
        missing = [n for n, p in names.items() if p.default is inspect.Parameter.empty and n not in params]
        if missing:
            raise ConfigError(
                f"{where} (model_type {params.get('model_type')!r}) lacks required field(s) "
                f"{', '.join(missing)}; add them"
            )
        hints = typing.get_type_hints(cls)
        for key in names:
            if key in params and key in hints and not _fits(params[key], hints[key]):
                value, hint = params[key], hints[key]
                shown = json.dumps(value) if not isinstance(value, str) else repr(value)
                fixed = _suggest(key, value, hint)
                fix = (f'write "{key}": {json.dumps(fixed)}' if fixed is not None else
                       "correct the value")
                raise ConfigError(f"{where}: \"{key}\" is {shown[:80]} ({_json_kind(value)}), "
                                  f"but it must be {_wanted(hint)}; {fix}")
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


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, fused into one kernel. A decode step is hundreds of tiny kernels
    (one token through every layer), so each launch saved shows in tokens per second."""
    return gate * mx.sigmoid(gate) * up


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

    def reuse_floor(self, positions: int) -> int:
        """The shortest prefix that a finished sequence's caches, holding `positions`
        positions, can still give a new sequence (prompt reuse): 0 where every layer of
        the model (owned by any stage) keeps every key."""
        return 0

    def make_caches(self) -> list:
        """One plain KV cache per owned layer (models with other caches override)."""
        from .cache import KVCache

        return [KVCache() for _ in self.owned_layers()]

    def __call__(self, tokens: mx.array, caches: Optional[list] = None) -> mx.array:
        """Whole stack on one process: tokens [B, L] -> logits [B, L, V]."""
        if caches is None:
            caches = self.make_caches()
        return self.head(self.forward_layers(self.embed(tokens), caches))

"""What every architecture must do, over every row of models.MODEL_TYPES.

Each test compares a tiny model holding seeded random weights with an independent
reference (tests/reference.py): its logits with mlx-lm's on the same weights, cached
decoding with one full forward, a chain of pipeline stages with the whole model. ARCHS
holds only what differs between architectures: the variants of the tiny preset worth
running (a tied or untied head, QK norm), how mlx-lm must be told the same model, the
prefill lengths that cross Llama-4's attention chunk, and the checkpoint tensors
sanitize must drop. A model type without a row runs with the defaults. What is one
architecture's own stays in tests/test_model_<type>.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest

from models import MODEL_TYPES, get_module
from tests.reference import (build_tiny, chain_vs_whole, mlxlm_logits, mlxlm_model,
                             our_weights, prompt_tokens, stepwise_logits)

TOL = 1e-4  # fp32 max abs difference allowed against every reference here
N_TOKENS = 48  # the prompt every test here runs


def as_is(cfg: dict, weights: dict) -> tuple:
    """mlx-lm reads our config and tensor names unchanged."""
    return cfg, weights


def openelm_for_mlxlm(cfg: dict, weights: dict) -> tuple:
    """mlx-lm reads the per-layer lists HF's config.json stores; the tiny preset gives
    the bounds they are derived from."""
    args = get_module("openelm").ModelArgs.from_dict(cfg)
    return dict(cfg, num_query_heads=args.num_query_heads, num_kv_heads=args.num_kv_heads,
                ffn_multipliers=args.layer_ffn_multipliers), weights


def llama4_text_for_mlxlm(cfg: dict, weights: dict) -> tuple:
    """mlx-lm's `llama4_text` is another, dense network; its `llama4` is this one, under
    the multimodal wrapper's config and tensor names."""
    return ({"model_type": "llama4", "text_config": cfg},
            {f"language_model.{k}": v for k, v in weights.items()})


@dataclass(frozen=True)
class Arch:
    """How the shared tests run one architecture."""

    # id -> overrides of the tiny preset, for every test (e.g. a tied and an untied head).
    variants: dict = field(default_factory=lambda: {"": {}})
    # More variants for the comparison with mlx-lm alone: settings that change what the
    # network computes but not how it is cached or cut into stages (QK norm).
    mlxlm_variants: dict = field(default_factory=dict)
    # (our config, our weights) -> what mlx-lm's model for the same network reads.
    for_mlxlm: Callable = as_is
    # Preset overrides for the mlx-lm comparison: what mlx-lm cannot express otherwise.
    mlxlm_overrides: dict = field(default_factory=dict)
    decode_prefill: int = N_TOKENS - 14  # cached decode: prefilled, then one at a time
    chain_cuts: tuple = ((2,),)  # stage chains to try: the layers where a stage starts
    # Each chain prefills this many prompt tokens, then decodes the rest one at a time.
    chain_prefills: tuple = (N_TOKENS - 2,)
    # Checkpoint tensors that are no parameters (rotary tables, an image tower, MTP
    # layers): sanitize drops them.
    buffers: tuple = ()
    # Other names under which a checkpoint may store the tied head again (the head's own
    # path, LM_HEAD_PATH, is added for every tied variant).
    head_copies: tuple = ()


# A 20-token prefill crosses the tiny chunk (16), and decoding crosses 32; a chain's
# prompt in one pass crosses both.
LLAMA4_CHUNKS = dict(decode_prefill=20, chain_prefills=(N_TOKENS, 20))

ARCHS = {
    "glm": Arch(
        variants={"untied": dict(tie_word_embeddings=False),
                  "tied": dict(tie_word_embeddings=True)},
        mlxlm_overrides=dict(partial_rotary_factor=1.0),  # mlx-lm's glm turns whole heads
        buffers=("model.layers.0.self_attn.rotary_emb.inv_freq",)),
    # Random correction biases are ~1 > 0, so mlx-lm's zero-masking of dropped groups
    # picks the same experts as HF's -inf masking (tested in test_model_glm4_moe.py).
    "glm4_moe": Arch(
        mlxlm_variants={"qk_norm": dict(use_qk_norm=True)},
        buffers=("model.layers.0.self_attn.rotary_emb.inv_freq",
                 "model.layers.4.eh_proj.weight")),  # the MTP layer after the 4 layers
    "openelm": Arch(
        variants={"tied": dict(share_input_output_layers=True),
                  "untied": dict(share_input_output_layers=False)},
        for_mlxlm=openelm_for_mlxlm,
        buffers=("transformer.layers.0.attn.pos_embedding.inv_freq",)),
    "lille-130m": Arch(
        buffers=("transformer.layers.0.attention.rotary_emb.cos_cached",),
        # the HF wrapper's name, the plain one, and the author's GGUF export's
        head_copies=("transformer.lm_head.weight", "lm_head.weight",
                     "transformer.output.weight")),
    "llama4": Arch(
        **LLAMA4_CHUNKS, chain_cuts=((3,), (2, 5)),
        buffers=("vision_model.patch_embedding.linear.weight",
                 "multi_modal_projector.linear_1.weight",
                 "language_model.model.layers.0.self_attn.rotary_emb.inv_freq")),
    # llama4's network and caches under other names (chunk crossings are llama4's to
    # test): one chain of three stages covers the names.
    "llama4_text": Arch(
        chain_cuts=((2, 5),), for_mlxlm=llama4_text_for_mlxlm,
        buffers=("model.layers.0.self_attn.rotary_emb.inv_freq",)),
}


def arch(model_type: str) -> Arch:
    """The row of `model_type`, or the defaults."""
    return ARCHS.get(model_type, Arch())


def case_id(model_type: str, variant: str, *rest) -> str:
    return "-".join([model_type] + [variant] * bool(variant) + list(rest))


def variant_overrides(model_type: str, variant: str) -> dict:
    a = arch(model_type)
    return {**a.variants, **a.mlxlm_variants}[variant]


CASES = [pytest.param(t, v, id=case_id(t, v)) for t in MODEL_TYPES for v in arch(t).variants]
MLXLM_CASES = [pytest.param(t, v, id=case_id(t, v)) for t in MODEL_TYPES
               for v in {**arch(t).variants, **arch(t).mlxlm_variants}]
CHAIN_CASES = [pytest.param(t, v, cuts, id=case_id(t, v, "cut" + ",".join(map(str, cuts))))
               for t in MODEL_TYPES for v in arch(t).variants for cuts in arch(t).chain_cuts]


def build(model_type: str, variant: str, **more):
    """(config, model): the tiny preset's variant, with seeded random weights."""
    return build_tiny(model_type, **variant_overrides(model_type, variant), **more)


def vocab(cfg: dict) -> int:
    return cfg.get("text_config", cfg)["vocab_size"]


@functools.cache
def whole(model_type: str, variant: str) -> tuple:
    """(config, model, prompt, its logits in one full forward): built once per variant,
    read by every test (none changes the model)."""
    cfg, model = build(model_type, variant)
    tokens = prompt_tokens(vocab(cfg), N_TOKENS)
    return cfg, model, tokens, np.array(model(mx.array(tokens)))


def stage_of(model_type: str, variant: str, start: int, end: int, has_embed: bool,
             has_head: bool):
    """Layers [start, end) of whole(model_type, variant), loaded as a stage loads its
    checkpoint: the whole model's tensors of the names it keeps, strictly."""
    cfg, model, _, _ = whole(model_type, variant)
    mod = get_module(model_type)
    part = mod.Model(mod.ModelArgs.from_dict(cfg)).pipeline(start, end, has_embed, has_head)
    weights = our_weights(model)
    part.load_weights([(k, weights[k]) for k in our_weights(part)], strict=True)
    return part


def test_every_row_names_a_model_type():
    assert set(ARCHS) <= set(MODEL_TYPES)


@pytest.mark.parametrize("model_type,variant", MLXLM_CASES)
def test_logits_match_mlx_lm(model_type, variant):
    a = arch(model_type)
    if a.mlxlm_overrides:
        cfg, model = build(model_type, variant, **a.mlxlm_overrides)
        tokens = prompt_tokens(vocab(cfg), N_TOKENS)
        ours = np.array(model(mx.array(tokens)))
    else:
        cfg, model, tokens, ours = whole(model_type, variant)
    ref = mlxlm_logits(mlxlm_model(*a.for_mlxlm(cfg, our_weights(model))), tokens)
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("model_type,variant", CASES)
def test_cached_decode_equals_full_forward(model_type, variant):
    first = arch(model_type).decode_prefill
    _, model, tokens, full = whole(model_type, variant)
    steps = stepwise_logits(model, tokens, first=first)
    assert np.abs(full[:, first - 1:] - steps).max() <= TOL


@pytest.mark.parametrize("model_type,variant,cuts", CHAIN_CASES)
def test_stage_chain_equals_whole_model(model_type, variant, cuts):
    _, model, tokens, full = whole(model_type, variant)
    n = len(model.layers)
    bounds = list(zip([0, *cuts], [*cuts, n]))
    stages = [stage_of(model_type, variant, a, b, a == 0, b == n) for a, b in bounds]
    tied = model.tied_embeddings()
    for stage, (a, b) in zip(stages, bounds):
        names = set(our_weights(stage))
        # A tied head needs the embedding matrix on the last stage.
        assert (f"{stage.EMBED_PATH}.weight" in names) == (a == 0 or (b == n and tied))
        for path in (stage.NORM_PATH, stage.LM_HEAD_PATH):
            wanted = b == n and (path == stage.NORM_PATH or not tied)
            assert wanted == any(k.startswith(f"{path}.") for k in names), (path, a, b)
    for first in arch(model_type).chain_prefills:
        assert chain_vs_whole(stages, full, tokens, first) <= TOL, first


@pytest.mark.parametrize("model_type,variant", CASES)
def test_middle_stage_keeps_only_its_layers(model_type, variant):
    mid = stage_of(model_type, variant, 1, 3, has_embed=False, has_head=False)
    prefix = f"{mid.LAYERS_PATH}."
    names = set(our_weights(mid))
    assert names and all(k.startswith(prefix) for k in names)
    assert {k[len(prefix):].split(".")[0] for k in names} == {"1", "2"}
    assert [i for i, _ in mid.owned_layers()] == [1, 2]
    assert len(mid.make_caches()) == 2


@pytest.mark.parametrize("model_type,variant", CASES)
def test_sanitize_drops_buffers_and_tied_head_copies(model_type, variant):
    a = arch(model_type)
    _, model, _, _ = whole(model_type, variant)
    weights = our_weights(model)
    emb = weights[f"{model.EMBED_PATH}.weight"]
    copies = list(a.head_copies)
    if model.tied_embeddings() and model.LM_HEAD_PATH:
        copies.append(f"{model.LM_HEAD_PATH}.weight")
    extra = dict({k: mx.zeros(8) for k in a.buffers}, **{k: emb for k in copies})
    assert not set(extra) & set(weights)
    assert set(model.sanitize(dict(weights, **extra))) == set(weights)

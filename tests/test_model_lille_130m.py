"""Lille 130M: hidden width rule, logits against mlx-lm, cached decode, stage chains."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from models import get_module
from models.base import ConfigError
from tests.reference import (build_tiny, chain_vs_whole, mlxlm_logits, mlxlm_model,
                             our_weights, prompt_tokens, stepwise_logits)

TOL = 1e-4  # fp32 max abs difference allowed against the reference
SEED = 3

mod = get_module("lille-130m")


def build(start=None, end=None, has_embed=True, has_head=True, **overrides):
    """Tiny Lille (optionally one pipeline stage of it) with seeded random weights."""
    return build_tiny("lille-130m", start, end, has_embed, has_head, seed=SEED, **overrides)


def test_ffn_width():
    assert mod.ffn_width(640) == 1792  # the published model: int(1706.67) -> 7 * 256
    assert mod.ffn_width(768) == 2048  # exactly 8 * 768 / 3
    assert mod.ffn_width(64) == 256  # the tiny preset
    assert mod.ffn_width(128) == 512  # rounded up (mlx-lm's nearest rounding gives 256)


def test_published_shape():
    args = mod.ModelArgs.from_dict(mod.PRESETS["lille-130m"])
    assert args.head_dim == 64
    n_params = sum(p.size for _, p in tree_flatten(mod.Model(args).parameters()))
    assert 120e6 < n_params < 140e6  # "130M" (the README says closer to 140M)


def test_untied_config_is_rejected():
    with pytest.raises(ConfigError):
        mod.ModelArgs.from_dict(dict(mod.PRESETS["tiny"], tie_word_embeddings=False))


def test_logits_match_mlx_lm():
    cfg, model = build()
    tokens = prompt_tokens(cfg["vocab_size"], 48)
    ours = np.array(model(mx.array(tokens)))
    ref = mlxlm_logits(mlxlm_model(cfg, our_weights(model)), tokens)
    assert np.abs(ours - ref).max() <= TOL


def test_cached_decode_equals_full_forward():
    cfg, model = build()
    tokens = prompt_tokens(cfg["vocab_size"], 44)
    full = np.array(model(mx.array(tokens)))
    steps = stepwise_logits(model, tokens, first=30)
    assert np.abs(full[:, 29:] - steps).max() <= TOL


def test_stage_chain_equals_whole_model():
    cfg, whole = build()
    _, a = build(0, 2, True, False)
    _, b = build(2, cfg["n_layer"], False, True)
    # The head is tied: the last stage keeps the embedding matrix to project with.
    assert "transformer.tok_embeddings.weight" in our_weights(b)
    assert "transformer.norm.weight" not in our_weights(a)
    assert chain_vs_whole(a, b, whole, cfg["vocab_size"]) <= TOL


def test_middle_stage_keeps_only_its_layers():
    _, mid = build(1, 3, has_embed=False, has_head=False)
    names = set(our_weights(mid))
    assert names and all(n.startswith(("transformer.layers.1.", "transformer.layers.2."))
                         for n in names)
    assert [i for i, _ in mid.owned_layers()] == [1, 2]
    assert len(mid.make_caches()) == 2


def test_sanitize_drops_rope_tables_and_tied_head():
    _, model = build()
    weights = our_weights(model)
    emb = weights["transformer.tok_embeddings.weight"]
    extra = {"transformer.layers.0.attention.rotary_emb.cos_cached": mx.zeros((4, 8)),
             "transformer.lm_head.weight": emb, "lm_head.weight": emb}
    assert set(model.sanitize(dict(weights, **extra))) == set(weights)

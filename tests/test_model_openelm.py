"""OpenELM: layer-wise scaling, logits against mlx-lm, cached decode, stage chains."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from models import get_module
from tests.reference import (build_tiny, chain_vs_whole, mlxlm_logits, mlxlm_model,
                             our_weights, prompt_tokens, stepwise_logits)

TOL = 1e-4  # fp32 max abs difference allowed against the reference
SEED = 3

mod = get_module("openelm")


def build(start=None, end=None, has_embed=True, has_head=True, **overrides):
    """Tiny OpenELM (optionally one pipeline stage of it) with seeded random weights."""
    return build_tiny("openelm", start, end, has_embed, has_head, seed=SEED, **overrides)


def mlxlm_config(cfg: dict) -> dict:
    """mlx-lm reads the per-layer lists HF's config.json stores; expand the bounds for it."""
    args = mod.ModelArgs.from_dict(cfg)
    return dict(cfg, num_query_heads=args.num_query_heads, num_kv_heads=args.num_kv_heads,
                ffn_multipliers=args.layer_ffn_multipliers)


def test_make_divisible():
    assert mod.make_divisible(640, 256) == 768  # nearest multiple, rounding up
    assert mod.make_divisible(1113.6, 256) == 1024  # nearest, rounding down by < 10%
    assert mod.make_divisible(857.6, 256) == 1024  # 768 would be > 10% below: bumped up
    assert mod.make_divisible(10, 256) == 256  # never below one divisor


def test_layerwise_scaling_of_openelm_270m():
    # The lists apple/OpenELM-270M's config.json stores, derived here from the bounds.
    args = mod.ModelArgs.from_dict(mod.PRESETS["openelm-270m"])
    assert args.num_query_heads == [12] * 5 + [16] * 7 + [20] * 4
    assert args.num_kv_heads == [3] * 5 + [4] * 7 + [5] * 4
    assert args.layer_ffn_multipliers == [round(v, 2) for v in np.linspace(0.5, 4.0, 16)]
    assert args.ffn_widths[0] == 768 and args.ffn_widths[-1] == 5120
    n_params = sum(p.size for _, p in tree_flatten(mod.Model(args).parameters()))
    assert 265e6 < n_params < 275e6  # "270M"


def test_stored_per_layer_lists_win():
    cfg = dict(mod.PRESETS["tiny"], num_query_heads=[2, 2, 4, 4], num_kv_heads=[1, 1, 2, 2],
               ffn_multipliers=[1.0, 1.0, 1.0, 1.0])
    args = mod.ModelArgs.from_dict(cfg)
    assert args.num_query_heads == [2, 2, 4, 4] and args.ffn_widths == [128] * 4


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_mlx_lm(tied):
    cfg, model = build(share_input_output_layers=tied)
    args = model.args
    # The point of the tiny preset: heads, kv heads and FFN widths change with depth.
    assert len(set(args.num_query_heads)) > 1
    assert len(set(args.num_kv_heads)) > 1
    assert len(set(args.ffn_widths)) > 1
    tokens = prompt_tokens(cfg["vocab_size"], 48)
    ours = np.array(model(mx.array(tokens)))
    ref = mlxlm_logits(mlxlm_model(mlxlm_config(cfg), our_weights(model)), tokens)
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("tied", [True, False])
def test_cached_decode_equals_full_forward(tied):
    cfg, model = build(share_input_output_layers=tied)
    tokens = prompt_tokens(cfg["vocab_size"], 44)
    full = np.array(model(mx.array(tokens)))
    steps = stepwise_logits(model, tokens, first=30)
    assert np.abs(full[:, 29:] - steps).max() <= TOL


@pytest.mark.parametrize("tied", [True, False])
def test_stage_chain_equals_whole_model(tied):
    cfg, whole = build(share_input_output_layers=tied)
    n = cfg["num_transformer_layers"]
    _, a = build(0, 2, True, False, share_input_output_layers=tied)
    _, b = build(2, n, False, True, share_input_output_layers=tied)
    names_b = set(our_weights(b))
    # A tied head needs the embedding matrix on the last stage.
    assert ("transformer.token_embeddings.weight" in names_b) == tied
    assert "transformer.norm.weight" not in our_weights(a)
    assert chain_vs_whole(a, b, whole, cfg["vocab_size"]) <= TOL


def test_middle_stage_keeps_only_its_layers():
    _, mid = build(1, 3, has_embed=False, has_head=False)
    names = set(our_weights(mid))
    assert names and all(n.startswith(("transformer.layers.1.", "transformer.layers.2."))
                         for n in names)
    assert [i for i, _ in mid.owned_layers()] == [1, 2]
    assert len(mid.make_caches()) == 2


def test_sanitize_drops_rotary_tables_and_tied_head():
    _, model = build()
    weights = our_weights(model)
    extra = {"transformer.layers.0.attn.pos_embedding.inv_freq": mx.zeros(8),
             "lm_head.weight": weights["transformer.token_embeddings.weight"]}
    assert set(model.sanitize(dict(weights, **extra))) == set(weights)

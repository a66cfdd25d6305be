"""OpenELM's own details: layer-wise scaling of heads and FFN widths.

Logits against mlx-lm, cached decode and stage chains: tests/test_models.py.
"""

import numpy as np
from mlx.utils import tree_flatten

from models import get_module

mod = get_module("openelm")


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


def test_tiny_preset_varies_heads_and_widths_with_depth():
    # The point of the tiny preset (the shared tests compare it with mlx-lm): heads, kv
    # heads and FFN widths change with depth.
    args = mod.ModelArgs.from_dict(mod.PRESETS["tiny"])
    assert len(set(args.num_query_heads)) > 1
    assert len(set(args.num_kv_heads)) > 1
    assert len(set(args.ffn_widths)) > 1

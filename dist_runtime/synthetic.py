"""Synthetic checkpoints: real or tiny shapes with seeded random weights, no download.

Each parameter's values depend only on (seed, parameter name), never on which other
parameters exist, so a rank that builds only its own layers gets exactly the numbers
the whole model would have. That is what makes a synthetic run on N ranks comparable
with one process, and lets a GLM-4.5-Air-shaped experiment start without 60 GB of files.
"""

from __future__ import annotations

import zlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

NORM_SPREAD = 0.1  # 1-D params (norm scales, biases) ~ 1 ± this; off 1 so a swap shows


def param_values(name: str, shape, seed: int, dtype=mx.float32) -> mx.array:
    """Deterministic values for one parameter, from its name and the seed."""
    key = mx.random.key((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if len(shape) == 1:
        if name.endswith("bias") and "correction" not in name:
            return (NORM_SPREAD * mx.random.normal(shape, key=key)).astype(dtype)
        return (1.0 + NORM_SPREAD * mx.random.normal(shape, key=key)).astype(dtype)
    fan_in = shape[-1]
    return (mx.random.normal(shape, key=key) * fan_in**-0.5).astype(dtype)


def randomize(model: nn.Module, seed: int, dtype=mx.float32) -> dict:
    """Give every (unquantized) parameter of `model` its seeded values; returns them."""
    weights = {name: param_values(name, p.shape, seed, dtype)
               for name, p in tree_flatten(model.parameters())}
    model.load_weights(list(weights.items()), strict=True)
    return weights

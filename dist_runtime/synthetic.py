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

from dist_runtime.checkpoint import build_model, layer_index

EOS_ID = 2  # synthetic tokenizers put their end-of-text token here
NORM_SPREAD = 0.1  # 1-D params (norm scales, biases) ~ 1 ± this; off 1 so a swap shows


def param_values(name: str, shape, seed: int, dtype=mx.float32) -> mx.array:
    """Deterministic values for one parameter, from its name and the seed."""
    key = mx.random.key((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if len(shape) == 1:
        if name.endswith("bias") and "correction" not in name:
            return (NORM_SPREAD * mx.random.normal(shape, key=key)).astype(dtype)
        return (1.0 + NORM_SPREAD * mx.random.normal(shape, key=key)).astype(dtype)
    # Drawn in the target dtype: a GLM-4.5-Air expert bank in float32 would be 3 GB.
    return mx.random.normal(shape, dtype=dtype, key=key, scale=shape[-1] ** -0.5)


def randomize(model: nn.Module, seed: int, dtype=mx.float32) -> dict:
    """Give every (unquantized) parameter of `model` its seeded values; returns them."""
    weights = {name: param_values(name, p.shape, seed, dtype)
               for name, p in tree_flatten(model.parameters())}
    model.load_weights(list(weights.items()), strict=True)
    return weights


# ---------------------------------------------------------------- presets and models

def preset_config(model_type: str, preset: str) -> dict:
    """The HF-form config dict of a named preset, e.g. ('glm4_moe', 'glm-4.5-air')."""
    from models import get_module

    presets = get_module(model_type).PRESETS
    if preset not in presets:
        raise ValueError(f"no synthetic preset {preset!r} for {model_type}; "
                         f"presets: {', '.join(presets)}")
    config = dict(presets[preset])
    config.setdefault("eos_token_id", EOS_ID)
    return config


def quantization_predicate(group_size: int):
    """Which modules a synthetic checkpoint packs: those whose input width splits in groups.

    Routers (tiny, precision-sensitive) stay in full precision, as mlx-lm's converter
    leaves any layer whose last dimension is not a multiple of the group size.
    """
    def pred(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        w = getattr(module, "weight", None)
        return w is not None and w.shape[-1] % group_size == 0
    return pred


def synthetic_model(config: dict, seed: int, layers: range = None, has_embed=True,
                    has_head=True, dtype=mx.float32, bits: int = None, group_size: int = 64):
    """A stage of a synthetic model: only its own parameters are made, layer by layer.

    Quantizing each layer right after making it keeps the peak near one layer in full
    precision plus the packed rest, so a 4-bit GLM-4.5-Air stage fits where its bf16
    weights would not.
    """
    model, args = build_model(config, layers, has_embed, has_head)
    fill_model(model, seed, dtype, bits, group_size)
    if bits:
        config = dict(config, quantization={"group_size": group_size, "bits": bits})
    return model, args, config


def fill_model(model: nn.Module, seed: int, dtype=mx.float32, bits: int = None,
               group_size: int = 64, layers_path: str = None):
    """Give a built model (ours, or mlx-lm's for the baseline) its seeded weights in place.

    Works on any module tree whose layer list (at `layers_path`, found by itself for our
    models) holds None for layers it does not own.
    """
    pred = quantization_predicate(group_size)
    prefix = layers_path or _layers_prefix(model)
    layer_list = model
    for part in prefix.split("."):
        layer_list = getattr(layer_list, part)
    for i, module in enumerate(layer_list):
        if module is None:
            continue
        _fill(module, f"{prefix}.{i}", seed, dtype)
        if bits:
            nn.quantize(module, group_size, bits, class_predicate=pred)
        mx.eval(module.parameters())
    rest = {n: p for n, p in tree_flatten(model.parameters()) if layer_index(n) is None}
    model.load_weights([(n, param_values(n, p.shape, seed, dtype)) for n, p in rest.items()],
                       strict=False)
    if bits:
        # Non-layer modules (embedding, head) only: layers are already packed.
        nn.quantize(model, group_size, bits,
                    class_predicate=lambda p, m: layer_index(p + ".") is None and pred(p, m))
    mx.eval(model.parameters())


def _layers_prefix(model) -> str:
    """Dotted path of the model's layer list (e.g. 'model.layers')."""
    target = model.layers
    for path in ("model.layers", "language_model.model.layers", "transformer.layers", "layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        except (AttributeError, KeyError):
            continue
        if obj is target:
            return path
    raise ValueError("cannot find the layer list's path in the model")


def _fill(module: nn.Module, prefix: str, seed: int, dtype):
    params = [(n, param_values(f"{prefix}.{n}", p.shape, seed, dtype))
              for n, p in tree_flatten(module.parameters())]
    module.load_weights(params, strict=True)

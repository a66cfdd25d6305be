"""GLM dense's own details: partial interleaved RoPE, and the rope_parameters form.

Logits against mlx-lm, cached decode, stage chains, sanitize: tests/test_models.py.
"""

import mlx.core as mx
import numpy as np

from dist_runtime.synthetic import randomize
from models import get_module
from tests.reference import build_tiny, mlxlm_logits, mlxlm_model, our_weights, prompt_tokens

TOL = 1e-4  # fp32 max abs difference allowed against the reference


def build(**overrides):
    return build_tiny("glm", **overrides)


def rope_interleaved_partial(x, offset, rot, base):
    """NumPy reference of GLM's partial interleaved RoPE on x [B, H, L, Dh]."""
    L = x.shape[2]
    pos = np.arange(offset, offset + L)[:, None]
    inv = base ** (-np.arange(0, rot, 2) / rot)
    ang = pos * inv[None]  # [L, rot/2]
    cos, sin = np.cos(ang), np.sin(ang)
    out = x.copy()
    a, b = x[..., 0:rot:2], x[..., 1:rot:2]
    out[..., 0:rot:2] = a * cos - b * sin
    out[..., 1:rot:2] = a * sin + b * cos
    return out


def test_partial_rotary_matches_numpy_reference():
    cfg, model = build(partial_rotary_factor=0.5)
    attn = model.layers[0].self_attn
    x = np.random.default_rng(0).standard_normal((1, 4, 7, 16)).astype(np.float32)
    ours = np.array(attn.rope(mx.array(x), offset=5))
    ref = rope_interleaved_partial(x, 5, 8, cfg["rope_theta"])
    assert np.abs(ours - ref).max() <= 1e-5


def nested_rope(cfg, **rope):
    """cfg as transformers 5 writes it: rope_theta and partial_rotary_factor only inside
    rope_parameters."""
    flat = {k: v for k, v in cfg.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return dict(flat, rope_parameters=dict(rope_type="default", **rope))


def test_rope_parameters_form_matches_mlx_lm_on_the_flat_form():
    mod = get_module("glm")
    flat = dict(mod.PRESETS["tiny"], rope_theta=25000.0, partial_rotary_factor=1.0)
    model = mod.Model(mod.ModelArgs.from_dict(
        nested_rope(flat, rope_theta=25000.0, partial_rotary_factor=1.0)))
    randomize(model, seed=3)
    tokens = prompt_tokens(flat["vocab_size"], 48)
    ref = mlxlm_logits(mlxlm_model(flat, our_weights(model)), tokens)
    assert np.abs(np.array(model(mx.array(tokens))) - ref).max() <= TOL


def test_rope_parameters_partial_rotary_matches_numpy_reference():
    mod = get_module("glm")
    cfg = nested_rope(mod.PRESETS["tiny"], rope_theta=25000.0, partial_rotary_factor=0.25)
    attn = mod.Model(mod.ModelArgs.from_dict(cfg)).layers[0].self_attn
    x = np.random.default_rng(0).standard_normal((1, 4, 7, 16)).astype(np.float32)
    ours = np.array(attn.rope(mx.array(x), offset=5))
    assert np.abs(ours - rope_interleaved_partial(x, 5, 4, 25000.0)).max() <= 1e-5

"""GLM-4.5 MoE's own details: HF's router and RoPE against NumPy, checkpoint layouts,
quantization, published sizes, config errors.

Logits against mlx-lm (with and without QK norm), cached decode, stage chains, the
middle stage, sanitize dropping buffers: tests/test_models.py.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from models import get_module
from tests.reference import build_tiny, mlxlm_logits, mlxlm_model, our_weights, prompt_tokens

TOL = 1e-4  # fp32 max abs difference allowed against the reference
GROUP_SIZE, BITS = 64, 4  # the quantization under test
PROJS = ("gate_proj", "up_proj", "down_proj")

mod = get_module("glm4_moe")


def build(**overrides):
    return build_tiny("glm4_moe", **overrides)


def logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array(tokens)))


def assert_exercises_moe(cfg):
    """The features the comparisons are meant to cover; fails if the preset drifts."""
    assert cfg["n_group"] > 1 and cfg["topk_group"] < cfg["n_group"]
    assert cfg["n_shared_experts"] >= 1
    assert 1 <= cfg["first_k_dense_replace"] < cfg["num_hidden_layers"]
    assert cfg["partial_rotary_factor"] < 1.0


def test_tiny_preset_exercises_grouped_routing():
    # What the shared comparison with mlx-lm (tests/test_models.py) runs on.
    assert_exercises_moe(mod.PRESETS["tiny"])


def hf_router(logits, bias, top_k, n_group, topk_group, norm, scaling):
    """NumPy transcription of HF's Glm4MoeTopkRouter selection; logits [N, E]."""
    scores = 1 / (1 + np.exp(-logits))
    choice = scores + bias
    N, E = choice.shape
    grouped = choice.reshape(N, n_group, E // n_group)
    group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)  # [N, G]
    keep = np.argsort(-group_scores, axis=-1)[:, :topk_group]
    mask = np.zeros((N, n_group), bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    choice = np.where(np.repeat(mask, E // n_group, axis=-1), choice, -np.inf)
    inds = np.argsort(-choice, axis=-1)[:, :top_k]
    w = np.take_along_axis(scores, inds, axis=-1)
    if norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return inds, w * scaling


@pytest.mark.parametrize("top_k", [1, 3])
def test_router_matches_hf_reference(top_k):
    # Negative biases push some kept-group scores below 0: HF masks dropped groups with
    # -inf (mlx-lm with 0, which would then pick a dropped expert). HF also normalises
    # when top_k == 1 (mlx-lm does not).
    rng = np.random.default_rng(1)
    E, G, keep = 16, 4, 2
    logits_ = rng.standard_normal((64, E)).astype(np.float32) * 2
    bias = (rng.standard_normal(E) * 0.2 - 0.8).astype(np.float32)
    inds, w = mod.select_experts(mx.array(logits_), mx.array(bias), top_k, G, keep, True, 2.5)
    ref_i, ref_w = hf_router(logits_, bias, top_k, G, keep, True, 2.5)
    biased = 1 / (1 + np.exp(-logits_)) + bias
    # The case is exercised: HF picks experts whose biased score is below a 0 mask.
    assert (np.take_along_axis(biased, ref_i, -1) < 0).any()
    order, ref_order = np.argsort(np.array(inds), -1), np.argsort(ref_i, -1)
    assert (np.take_along_axis(np.array(inds), order, -1)
            == np.take_along_axis(ref_i, ref_order, -1)).all()
    assert np.abs(np.take_along_axis(np.array(w), order, -1)
                  - np.take_along_axis(ref_w, ref_order, -1)).max() <= 1e-6


def rope_half_split_partial(x, offset, rot, base):
    """NumPy transcription of HF's partial rotate_half RoPE on x [B, H, L, Dh]."""
    L = x.shape[2]
    inv = base ** (-np.arange(0, rot, 2) / rot)
    ang = np.arange(offset, offset + L)[:, None] * inv[None]  # [L, rot/2]
    cos, sin = np.tile(np.cos(ang), 2), np.tile(np.sin(ang), 2)  # [L, rot]
    r = x[..., :rot]
    rotated = np.concatenate([-r[..., rot // 2:], r[..., : rot // 2]], axis=-1)
    return np.concatenate([r * cos + rotated * sin, x[..., rot:]], axis=-1)


def test_partial_rotary_matches_hf_reference():
    cfg, model = build()
    attn = model.layers[0].self_attn
    x = np.random.default_rng(0).standard_normal((1, 4, 7, 16)).astype(np.float32)
    ours = np.array(attn.rope(mx.array(x), offset=5))
    ref = rope_half_split_partial(x, 5, 8, cfg["rope_theta"])
    assert np.abs(ours - ref).max() <= 1e-5


def to_hf_layout(weights: dict, cfg: dict) -> dict:
    """Our stacked weights as an original HF checkpoint: per-expert tensors, MTP, inv_freq."""
    hf = {}
    for name, w in weights.items():
        if ".mlp.switch_mlp." in name:
            prefix, rest = name.split(".switch_mlp.")
            for e in range(w.shape[0]):
                hf[f"{prefix}.experts.{e}.{rest}"] = w[e]
        else:
            hf[name] = w
    mtp = f"model.layers.{cfg['num_hidden_layers']}"
    hf[f"{mtp}.eh_proj.weight"] = mx.zeros((cfg["hidden_size"], 2 * cfg["hidden_size"]))
    hf[f"{mtp}.mlp.experts.0.gate_proj.weight"] = mx.zeros((4, cfg["hidden_size"]))
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((4,))
    return hf


@pytest.mark.parametrize("experts", [8, 16])  # 16: "experts.10" sorts before "experts.2"
def test_hf_per_expert_layout_loads(experts):
    cfg, model = build(n_routed_experts=experts)
    weights = our_weights(model)
    hf = to_hf_layout(weights, cfg)
    assert not any(".switch_mlp." in k for k in hf)
    fresh = mod.Model(mod.ModelArgs.from_dict(cfg))
    sanitized = fresh.sanitize(hf)
    assert sorted(sanitized) == sorted(weights)
    fresh.load_weights(list(sanitized.items()), strict=True)
    tokens = prompt_tokens(cfg["vocab_size"], 20)
    assert np.array_equal(logits(fresh, tokens), logits(model, tokens))
    # The mlx-community layout passes through unchanged.
    assert sorted(fresh.sanitize(weights)) == sorted(weights)


def test_sanitize_takes_a_subset_of_layers():
    cfg, model = build()
    hf = to_hf_layout(our_weights(model), cfg)
    part = {k: v for k, v in hf.items() if k.startswith(("model.layers.2.", "model.layers.4."))}
    out = model.sanitize(part)
    assert out and all(k.startswith("model.layers.2.") for k in out)
    assert out["model.layers.2.mlp.switch_mlp.down_proj.weight"].shape[0] == cfg["n_routed_experts"]
    del part["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match="experts \\[5\\]"):
        model.sanitize(part)


def mlxlm_quantizes(path: str, module) -> bool:
    """What mlx_lm.utils.quantize_model quantizes: has to_quantized, input dim divides."""
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % GROUP_SIZE == 0


def test_quantized_logits_match_mlx_lm():
    from mlx_lm.utils import quantize_model

    cfg, model = build()
    assert_exercises_moe(cfg)
    fp_weights = our_weights(model)
    nn.quantize(model, GROUP_SIZE, BITS, class_predicate=mlxlm_quantizes)
    q_weights = our_weights(model)
    # mlx-lm's own quantizer, on its model holding the same fp32 weights, must produce
    # the same tensors: this checks the predicate (e.g. the router gate stays fp32).
    ref = mlxlm_model(cfg, fp_weights)
    ref, _ = quantize_model(ref, dict(cfg), GROUP_SIZE, BITS)
    assert sorted(our_weights(ref)) == sorted(q_weights)
    assert "model.layers.1.mlp.switch_mlp.down_proj.scales" in q_weights
    assert "model.layers.1.mlp.gate.scales" not in q_weights
    # Load our quantized tensors into mlx-lm's quantized model and compare.
    ref.load_weights(list(q_weights.items()), strict=True)
    tokens = prompt_tokens(cfg["vocab_size"], 48)
    assert np.abs(logits(model, tokens) - mlxlm_logits(ref, tokens)).max() <= TOL


# Published sizes (model cards of zai-org/GLM-4.5-Air and zai-org/GLM-4.5), in billions
# of parameters: total, and active per token. The cards round, and do not say whether
# "active" counts the embedding table (a token reads one row of it): we do not.
PUBLISHED = {"glm-4.5-air": (106, 12), "glm-4.5": (355, 32)}


@pytest.mark.parametrize("name,layers", [("glm-4.5-air", 46), ("glm-4.5", 92)])
def test_real_presets_have_the_published_sizes(name, layers):
    # The skeleton is lazy (mlx arrays are not evaluated): shapes only, no weights.
    cfg = mod.PRESETS[name]
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    assert len(model.layers) == layers  # the MTP layer, stored at index `layers`, dropped
    assert model.args.dim_per_head == 128
    params = tree_flatten(model.parameters())
    share = cfg["num_experts_per_tok"] / cfg["n_routed_experts"]
    total = sum(p.size for _, p in params) / 1e9
    active = sum(p.size * (share if ".switch_mlp." in n else 1)
                 for n, p in params if "embed_tokens" not in n) / 1e9
    want_total, want_active = PUBLISHED[name]
    assert abs(total - want_total) <= 0.02 * want_total, total
    assert want_active <= active <= 1.1 * want_active, active


def test_config_errors_are_explicit():
    with pytest.raises(mod.ConfigError, match="n_group"):
        mod.ModelArgs.from_dict(dict(mod.PRESETS["tiny"], n_group=3))
    with pytest.raises(mod.ConfigError, match="rope type"):
        mod.ModelArgs.from_dict(dict(mod.PRESETS["tiny"], rope_scaling={"type": "yarn"}))

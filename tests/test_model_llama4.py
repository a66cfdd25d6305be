"""Llama 4's own details: a NumPy reference of HF's semantics where mlx-lm differs, RoPE
scaling, the chunked cache, HF checkpoint layout, 4-bit quantization, tied heads, and
plain Llama4ForCausalLM (`llama4_text`) checkpoints.

Logits against mlx-lm, cached decode and stage chains across chunk boundaries, the
middle stage, sanitize dropping the image tower: tests/test_models.py, for `llama4` and
`llama4_text` both.
"""

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dist_runtime.synthetic import randomize
from models import ConfigError, get_module
from models import cache as cache_mod
from models.cache import ChunkedKVCache
from tests.reference import mlxlm_logits, mlxlm_model, our_weights, prompt_tokens, stepwise_logits

TOL = 1e-4  # fp32 max abs difference allowed against the reference
N_TOKENS = 48
PREFILL = 20  # crosses the tiny chunk (16) in prefill, and 32 during decode
mod = get_module("llama4")


def config(**text):
    cfg = copy.deepcopy(mod.PRESETS["tiny"])
    cfg["text_config"].update(text)
    return cfg


def build(cfg):
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    randomize(model, seed=3)
    return model


def test_tiny_preset_crosses_a_chunk():
    # What the shared tests (tests/test_models.py) run on: 48-token prompts cross the
    # attention chunk, and dense and MoE layers alternate.
    tc = mod.PRESETS["tiny"]["text_config"]
    assert tc["attention_chunk_size"] < N_TOKENS and tc["interleave_moe_layer_step"] == 2


# ---- NumPy reference of HF's modeling_llama4.py (batch 1), for what mlx-lm lacks ----

def np_rms(x, w, eps):
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w


def np_inv_freq(hd, theta, scaling):
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    if not scaling:
        return inv
    f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    ctx = scaling["original_max_position_embeddings"]
    wl = 2 * np.pi / inv
    scaled = np.where(wl > ctx / lo, inv / f, inv)
    with np.errstate(divide="ignore", invalid="ignore"):  # lo == hi: masked out below
        smooth = (ctx / wl - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
    medium = ~(wl < ctx / hi) & ~(wl > ctx / lo)
    return np.where(medium, blended, scaled)


def np_rope(x, pos, inv):  # x [L, H, Dh]: HF's complex product of adjacent pairs
    xc = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[:, None] * inv)[:, None]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = xc.real, xc.imag
    return out


def np_swiglu(x, W, p):
    g = x @ W[p + "gate_proj.weight"].T
    return (g / (1 + np.exp(-g)) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def np_moe(x, W, p, tc):
    logits = x @ W[p + "router.weight"].T  # [L, E]
    out = np_swiglu(x, W, p + "shared_expert.")
    for t in range(x.shape[0]):
        for e in np.argsort(-logits[t])[: tc["num_experts_per_tok"]]:
            xe = x[t] / (1 + np.exp(-logits[t, e]))  # input scaled by sigmoid(logit)
            ew = {f"{n}.weight": W[f"{p}experts.{n}.weight"][e] for n in
                  ("gate_proj", "up_proj", "down_proj")}
            out[t] += np_swiglu(xe[None], ew, "")[0]
    return out


def np_attention(x, W, p, tc, i, pos):
    L, H, Hkv, hd = x.shape[0], tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    q = (x @ W[p + "q_proj.weight"].T).reshape(L, H, hd)
    k = (x @ W[p + "k_proj.weight"].T).reshape(L, Hkv, hd)
    v = (x @ W[p + "v_proj.weight"].T).reshape(L, Hkv, hd)
    use_rope = tc["no_rope_layers"][i] if tc.get("no_rope_layers") else (i + 1) % 4 != 0
    if use_rope:
        inv = np_inv_freq(hd, tc["rope_theta"], tc["rope_scaling"])
        q, k = np_rope(q, pos, inv), np_rope(k, pos, inv)
        if tc["use_qk_norm"]:
            q, k = np_rms(q, None, tc["rms_norm_eps"]), np_rms(k, None, tc["rms_norm_eps"])
    elif tc["attn_temperature_tuning"]:
        q = q * (np.log1p(np.floor((pos + 1) / tc["floor_scale"])) * tc["attn_scale"] + 1)[:, None, None]
    chunked = tc["layer_types"][i] == "chunked_attention" if tc.get("layer_types") else use_rope
    mask = pos[:, None] >= pos[None]
    if chunked:
        C = tc["attention_chunk_size"]
        mask &= pos[:, None] // C == pos[None] // C
    k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) * hd**-0.5
    s = np.where(mask[None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", a, v).reshape(L, -1) @ W[p + "o_proj.weight"].T


def np_forward(tc, W, tokens):
    W = {k: np.array(v, dtype=np.float64) for k, v in W.items()}
    p, eps = "language_model.model.", tc["rms_norm_eps"]
    h = W[p + "embed_tokens.weight"][np.array(tokens[0])]  # [L, D]
    pos = np.arange(h.shape[0])
    for i in range(tc["num_hidden_layers"]):
        lp = f"{p}layers.{i}."
        h = h + np_attention(np_rms(h, W[lp + "input_layernorm.weight"], eps), W,
                             lp + "self_attn.", tc, i, pos)
        x = np_rms(h, W[lp + "post_attention_layernorm.weight"], eps)
        moe = i in tc["moe_layers"] if tc.get("moe_layers") is not None else i % 2 == 1
        h = h + (np_moe(x, W, lp + "feed_forward.", tc) if moe
                 else np_swiglu(x, W, lp + "feed_forward."))
    h = np_rms(h, W[p + "norm.weight"], eps)
    return (h @ W["language_model.lm_head.weight"].T)[None]


SCOUT_LIKE_ROPE = dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0,
                       high_freq_factor=1.0, original_max_position_embeddings=64)
HF_DETAILS = {  # each a config mlx-lm cannot express
    # eps this large makes QK norm's eps (HF: rms_norm_eps, mlx-lm: 1e-6) show in logits.
    "lists-top2-eps": dict(no_rope_layers=[1, 0, 1, 1, 1, 0], moe_layers=[0, 2, 3],
                           num_experts_per_tok=2, rms_norm_eps=1e-2),
    "layer-types-scout-rope": dict(
        layer_types=["chunked_attention", "full_attention", "full_attention",
                     "chunked_attention", "chunked_attention", "full_attention"],
        no_rope_layers=[1, 0, 1, 1, 1, 0], rms_norm_eps=1e-5, rope_scaling=SCOUT_LIKE_ROPE),
}


@pytest.mark.parametrize("name", sorted(HF_DETAILS))
def test_hf_details_match_numpy_reference(name):
    cfg = config(**HF_DETAILS[name])
    model = build(cfg)
    tokens = prompt_tokens(cfg["text_config"]["vocab_size"], N_TOKENS)
    full = np.array(model(mx.array(tokens)))
    ref = np_forward(cfg["text_config"], our_weights(model), tokens)
    assert np.abs(full - ref).max() <= TOL
    steps = stepwise_logits(model, tokens, first=PREFILL)
    assert np.abs(full[:, PREFILL - 1:] - steps).max() <= TOL


@pytest.mark.parametrize("scaling", [None, mod.PRESETS["tiny"]["text_config"]["rope_scaling"],
                                     mod.PRESETS["llama-4-scout"]["text_config"]["rope_scaling"]])
def test_rope_frequencies_match_hf_formula(scaling):
    ours = np.array(mod.rope_inv_freq(128, 500000.0, scaling))
    ref = np_inv_freq(128, 500000.0, scaling)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


class KeepAll(ChunkedKVCache):
    """A chunked cache that never trims: every key stays (start 0), the mask alone keeps
    each query within its chunk. Same logits, more memory: the reference to compare with."""

    def trim(self):
        pass


def test_decode_builds_a_chunk_mask_only_where_keys_leave_the_chunk(monkeypatch):
    # With the cache trimmed to the current chunk, one query sees every kept key, so a
    # decode step needs no mask (a handful of kernels saved on each chunked layer); a
    # cache that kept earlier chunks needs one. Same logits either way.
    built = []
    real = mod.chunked_mask
    monkeypatch.setattr(mod, "chunked_mask", lambda *a: built.append(a[:3]) or real(*a))
    cfg = config()
    model = build(cfg)
    toks = mx.array(prompt_tokens(cfg["text_config"]["vocab_size"], N_TOKENS))
    ours = model.make_caches()
    ref = [KeepAll(c.chunk_size) if isinstance(c, ChunkedKVCache) else c.__class__()
           for c in ours]
    model(toks[:, :PREFILL], ours), model(toks[:, :PREFILL], ref)
    for pos in range(PREFILL, N_TOKENS):  # crosses the chunk boundary at 32
        step = toks[:, pos:pos + 1]
        built.clear()
        a = model(step, ours)
        assert built == [], f"a mask was built at position {pos}: {built}"
        b = model(step, ref)
        assert np.abs(np.array(a) - np.array(b)).max() <= TOL
        assert len(built) == 5 and all(n == 1 and start == 0 for n, _, start in built), built


def test_chunked_cache_holds_only_the_current_chunk(monkeypatch):
    # Buffers grown by exactly what is appended, so a cache's bytes are the positions it
    # keeps: a cache that kept the previous chunk (or any key before the current chunk's
    # start) would compute the same logits with more memory.
    monkeypatch.setattr(cache_mod, "GROWTH_STEP", 1)
    cfg = config()
    chunk = cfg["text_config"]["attention_chunk_size"]
    model = build(cfg)
    toks = mx.array(prompt_tokens(cfg["text_config"]["vocab_size"], N_TOKENS))
    ours = model.make_caches()
    ref = [KeepAll(c.chunk_size) if isinstance(c, ChunkedKVCache) else c.__class__()
           for c in ours]
    assert sum(isinstance(c, ChunkedKVCache) for c in ours) == 5  # all but the 4th layer's
    sizes = [PREFILL] + [1] * 14 + [9] + [1] * (N_TOKENS - PREFILL - 23)  # 20, 34, 43, 48
    assert sum(sizes) == N_TOKENS
    pos, trimmed_to_empty = 0, 0
    for n in sizes:
        step = toks[:, pos:pos + n]
        a, b = model(step, ours), model(step, ref)
        assert np.abs(np.array(a) - np.array(b)).max() <= TOL
        pos += n
        first = (pos // chunk) * chunk  # the chunk the next query falls in starts here
        for c, r in zip(ours, ref):
            if not isinstance(c, ChunkedKVCache):
                continue
            assert r.offset == c.offset == pos and r.keys.shape[2] == pos
            per_position = r.nbytes // pos
            kept = pos - first
            assert c.nbytes == per_position * kept, (
                f"at {pos}: {c.nbytes} bytes, {per_position * kept} for positions {first}..")
            assert c.start == first and c.keys.shape[2] <= chunk
            np.testing.assert_array_equal(np.array(c.keys[:, :, :kept]),
                                          np.array(r.keys[:, :, first:pos]))
            np.testing.assert_array_equal(np.array(c.values[:, :, :kept]),
                                          np.array(r.values[:, :, first:pos]))
            trimmed_to_empty += kept == 0
    assert trimmed_to_empty  # a chunk's last position was met: nothing kept then


def to_hf_layout(weights: dict) -> dict:
    """Our stacked experts -> HF's fused, input-major tensors; plus an image tower."""
    out = {}
    for name, w in weights.items():
        if name.endswith("experts.gate_proj.weight"):
            prefix = name[: -len("gate_proj.weight")]
            up = weights[prefix + "up_proj.weight"]
            out[prefix + "gate_up_proj"] = mx.concatenate(
                [w.swapaxes(1, 2), up.swapaxes(1, 2)], axis=-1)  # [E, D, 2I]
        elif name.endswith("experts.down_proj.weight"):
            out[name[: -len(".weight")]] = w.swapaxes(1, 2)  # [E, I, D]
        elif not name.endswith("experts.up_proj.weight"):
            out[name] = w
    out["vision_model.patch_embedding.linear.weight"] = mx.zeros((8, 8))
    out["multi_modal_projector.linear_1.weight"] = mx.zeros((8, 8))
    return out


def test_hf_layout_loads_via_sanitize():
    cfg = config()
    model = build(cfg)
    hf = to_hf_layout(our_weights(model))
    assert any(k.endswith("experts.gate_up_proj") for k in hf)
    tokens = mx.array(prompt_tokens(cfg["text_config"]["vocab_size"], N_TOKENS))
    loaded = mod.Model(mod.ModelArgs.from_dict(cfg))
    loaded.load_weights(list(loaded.sanitize(hf).items()), strict=True)
    assert np.abs(np.array(model(tokens)) - np.array(loaded(tokens))).max() == 0
    # A last stage gets only its own layers' tensors and the head.
    stage = mod.Model(mod.ModelArgs.from_dict(cfg)).pipeline(3, 6, False, True)
    own = {k: v for k, v in hf.items() if k.startswith(("language_model.model.layers.3.",
           "language_model.model.layers.4.", "language_model.model.layers.5.",
           "language_model.model.norm", "language_model.lm_head"))}
    stage.load_weights(list(stage.sanitize(own).items()), strict=True)


GROUP, BITS = 64, 4


def test_quantized_matches_mlx_lm():
    from mlx_lm.utils import quantize_model

    cfg = config()
    model = build(cfg)
    ref = mlxlm_model(cfg, our_weights(model))
    quantize_model(ref, cfg, GROUP, BITS)
    # Same rule as mlx-lm: everything quantizable whose input width fills whole groups.
    nn.quantize(model, GROUP, BITS, class_predicate=lambda _, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % GROUP == 0)
    shapes = lambda m: {k: v.shape for k, v in tree_flatten(m.parameters())}  # noqa: E731
    assert shapes(model) == shapes(ref)  # mlx-community quantized checkpoints load as-is
    assert any(k.endswith("experts.gate_proj.scales") for k in shapes(model))
    tokens = prompt_tokens(cfg["text_config"]["vocab_size"], N_TOKENS)
    ours = np.array(model(mx.array(tokens)))
    assert np.abs(ours - mlxlm_logits(ref, tokens)).max() <= TOL


def test_real_presets_layer_plan():
    # Config objects only: the real shapes are never instantiated.
    scout = mod.ModelArgs.from_dict(mod.PRESETS["llama-4-scout"]).text_config
    mav = mod.ModelArgs.from_dict(mod.PRESETS["llama-4-maverick"]).text_config
    nope = [i for i in range(48) if not scout.uses_rope(i)]
    assert nope == list(range(3, 48, 4)) and not any(scout.is_chunked(i) for i in nope)
    assert all(scout.is_moe(i) for i in range(48))
    assert [i for i in range(48) if mav.is_moe(i)] == list(range(1, 48, 2))


def test_unknown_rope_type_is_refused():
    with pytest.raises(ConfigError, match="yarn"):
        mod.ModelArgs.from_dict(config(rope_scaling=dict(rope_type="yarn", factor=4.0)))


def text_only_checkpoint(folder, cfg, weights):
    """A plain Llama4ForCausalLM checkpoint (what transformers saves for the text model
    alone): model_type llama4_text, the text fields at the top, `model.`/`lm_head.` names,
    HF's fused expert tensors, no image tower."""
    import json

    from dist_runtime.writer import save_sharded, write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    flat = dict(cfg["text_config"], model_type="llama4_text",
                architectures=["Llama4ForCausalLM"])
    hf = {k.replace("language_model.", "", 1): v for k, v in to_hf_layout(weights).items()
          if k.startswith("language_model.")}
    assert any(k.startswith("model.layers.") for k in hf) and "lm_head.weight" in hf
    save_sharded(folder, hf, shard_bytes=150_000)
    (folder / "config.json").write_text(json.dumps(flat))
    write_tokenizer(folder, flat["vocab_size"])
    return folder


def test_plain_text_checkpoint_llama4_text_loads_and_matches_mlx_lm(tmp_path):
    from dist_runtime.checkpoint import load_model

    cfg = config()
    model = build(cfg)
    folder = text_only_checkpoint(tmp_path / "text", cfg, our_weights(model))
    loaded = load_model(folder)
    assert loaded.config["model_type"] == "llama4_text"
    tokens = prompt_tokens(cfg["text_config"]["vocab_size"], N_TOKENS)
    ours = np.array(loaded.model(mx.array(tokens)))
    ref = mlxlm_logits(mlxlm_model(cfg, our_weights(model)), tokens)  # the wrapped model
    assert np.abs(ours - ref).max() <= TOL
    # A stage of it reads only its own layers' tensors and keeps the global numbering.
    stage = load_model(folder, range(3, 6), has_embed=False, has_head=True).model
    assert [i for i, _ in stage.owned_layers()] == [3, 4, 5] and "embed_tokens" not in stage.model


def test_tied_embeddings_read_the_embedding():
    """text_config.tie_word_embeddings (transformers' Llama4TextConfig has it): the head
    is the embedding, as an untied model whose lm_head holds the embedding computes."""
    tied = build(config(tie_word_embeddings=True))
    assert "lm_head" not in tied.language_model
    untied = build(config())
    weights = our_weights(tied)
    weights["language_model.lm_head.weight"] = weights["language_model.model.embed_tokens.weight"]
    untied.load_weights(list(weights.items()), strict=True)
    tokens = mx.array(prompt_tokens(512, N_TOKENS))
    assert np.abs(np.array(tied(tokens)) - np.array(untied(tokens))).max() == 0
    assert "language_model.lm_head.weight" not in tied.sanitize(weights)


@pytest.mark.timeout(120)
def test_plain_text_checkpoint_runs_on_two_ranks_as_the_wrapped_one_on_one(tmp_path):
    from dist_runtime.writer import write_checkpoint
    from tests.launcher import launch

    cfg = config()
    wrapped = write_checkpoint(tmp_path / "wrapped", cfg, seed=5)
    from dist_runtime.checkpoint import load_model

    text = text_only_checkpoint(tmp_path / "text", cfg, our_weights(load_model(wrapped).model))
    args = ["--prompt", "Hello there", "--max-tokens", "8", "--ignore-eos", "--json",
            "--dump-logits"]
    one = launch(1, ["--model", str(wrapped), *args], timeout=60)
    two = launch(2, ["--model", str(text), *args], timeout=60)
    assert one.summary and two.summary and not two.errors, two.stderr
    assert two.finished == {0, 1} and two.summary["tokens"] == one.summary["tokens"]
    a, b = np.array(two.summary["first_logits"]), np.array(one.summary["first_logits"])
    assert np.abs(a - b).max() <= TOL

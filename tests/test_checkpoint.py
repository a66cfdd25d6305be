"""Checkpoint folders: clear errors for bad input (in-process and through launch/run.py),
both weight layouts, 4-bit and float32 checkpoints against mlx-lm's loader, a stage
reading only its share, and deterministic synthetic writes."""

import copy
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dist_runtime.checkpoint import load_model
from dist_runtime.synthetic import preset_config
from dist_runtime.writer import write_checkpoint
from models import MODEL_TYPES, get_module
from tests.reference import prompt_tokens

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "launch" / "run.py"
TIMEOUT = 120  # s for one launch/run.py process
TOL = 1e-4  # max abs logit difference against mlx-lm
N_TOKENS = 48
INDEX = "model.safetensors.index.json"
SINGLE = "model-00001-of-00001.safetensors"
SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1}


def vocab(config):
    return config.get("text_config", config)["vocab_size"]


def logits_of(model, config):
    tokens = prompt_tokens(vocab(config), N_TOKENS)
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def read_header(file: Path) -> dict:
    """A safetensors header, parsed here rather than with the loader's own code."""
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def read_index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(RUN), *map(str, args)], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT, env=env)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """glm4_moe tiny in one shard (so a missing tensor has one file it belongs in)."""
    return write_checkpoint(tmp_path_factory.mktemp("good"), preset_config("glm4_moe", "tiny"),
                            seed=1)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """glm4_moe tiny in many small shards."""
    folder = write_checkpoint(tmp_path_factory.mktemp("sharded"),
                              preset_config("glm4_moe", "tiny"), seed=1, shard_bytes=150_000)
    assert len(set(read_index(folder).values())) >= 8
    return folder


# ---------------------------------------------------------------- bad input

def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def drop_tensor(folder, name, from_index=True):
    """Delete `name` from the shard holding it (and from the index if asked)."""
    wmap = read_index(folder)
    file = folder / wmap[name]
    tensors = dict(mx.load(str(file)))
    del tensors[name]
    mx.save_safetensors(str(file), tensors, metadata={"format": "mlx"})
    if from_index:
        del wmap[name]
        (folder / INDEX).write_text(json.dumps({"weight_map": wmap}))
    return file.name


def break_missing_config(folder):
    (folder / "config.json").unlink()
    return [str(folder / "config.json"), "not found"]


def break_malformed_config(folder):
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    return [str(folder / "config.json"), "not valid JSON"]


def break_no_model_type(folder):
    edit_config(folder, model_type=None)
    return [str(folder / "config.json"), "model_type"]


def break_unknown_model_type(folder):
    edit_config(folder, model_type="mamba_xyz")
    return ["'mamba_xyz'", "glm", "glm4_moe", "llama4", "openelm", "lille-130m"]


MISSING = "model.layers.2.self_attn.k_proj.weight"


def break_missing_tensor(folder):
    file = drop_tensor(folder, MISSING, from_index=True)
    return [MISSING, "missing", str(folder / file)]


def break_tensor_missing_from_shard(folder):
    file = drop_tensor(folder, MISSING, from_index=False)
    return [MISSING, "missing", str(folder / file)]


def break_shape(folder):
    cfg = json.loads((folder / "config.json").read_text())
    old, new = cfg["intermediate_size"], cfg["intermediate_size"] - 32
    edit_config(folder, intermediate_size=new)
    # layer 0 is the dense MLP of width intermediate_size
    header = read_header(folder / SINGLE)
    dense = {n: tuple(t["shape"]) for n, t in header.items()
             if n.startswith("model.layers.0.mlp.") and old in t["shape"]}
    assert dense

    def check(msg):
        name = next(n for n in dense if n in msg)
        want = tuple(new if d == old else d for d in dense[name])
        return str(dense[name]) in msg and str(want) in msg
    return ["shape", check]


def break_truncated(folder):
    file = folder / sorted(set(read_index(folder).values()))[1]
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return [str(file), "truncated"]


def break_absent_shard(folder):
    file = folder / sorted(set(read_index(folder).values()))[1]
    file.unlink()
    return [str(file), "missing", INDEX]


def rewrite_header(file, edit):
    """Replace the JSON header of a safetensors file by edit(header), data untouched."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def break_header_not_a_table(folder):
    """Valid JSON, but a list where the name -> {dtype, shape, data_offsets} table belongs."""
    rewrite_header(folder / SINGLE, lambda h: [sorted(h)])
    return [str(folder / SINGLE), "corrupt header", "JSON list", "re-download"]


def break_header_entry(folder):
    """One tensor's entry lacks its data_offsets."""
    def edit(h):
        del h[MISSING]["data_offsets"]
        return h
    rewrite_header(folder / SINGLE, edit)
    return [str(folder / SINGLE), "corrupt header", MISSING, "data_offsets", "re-download"]


def break_header_offsets(folder):
    """One tensor's byte range does not fit its dtype and shape."""
    def edit(h):
        start, end = h[MISSING]["data_offsets"]
        h[MISSING]["data_offsets"] = [start, end - 4]
        return h
    rewrite_header(folder / SINGLE, edit)
    return [str(folder / SINGLE), "corrupt header", MISSING, "bytes", "re-download"]


def break_layers_as_string(folder):
    edit_config(folder, num_hidden_layers="4")
    return [str(folder / "config.json"), '"num_hidden_layers" is \'4\' (a string)', "integer",
            '"num_hidden_layers": 4']


def break_eps_as_list(folder):
    edit_config(folder, rms_norm_eps=[1e-5])
    return [str(folder / "config.json"), '"rms_norm_eps" is [1e-05] (a list)',
            "must be a finite number"]


def break_index_not_an_object(folder):
    (folder / INDEX).write_text("[]")
    return [str(folder / INDEX), "is malformed", "a JSON list", "weight_map"]


def break_index_map_values(folder):
    wmap = read_index(folder)
    wmap[MISSING] = 3
    (folder / INDEX).write_text(json.dumps({"weight_map": wmap}))
    return [str(folder / INDEX), "is malformed", MISSING, "file name"]


BREAKERS = {  # name -> (which fixture to copy, breaker returning what the message must hold)
    "missing_config": ("good", break_missing_config),
    "malformed_config": ("good", break_malformed_config),
    "no_model_type": ("good", break_no_model_type),
    "unknown_model_type": ("good", break_unknown_model_type),
    "missing_tensor": ("good", break_missing_tensor),
    "tensor_missing_from_shard": ("sharded", break_tensor_missing_from_shard),
    "shape_mismatch": ("good", break_shape),
    "truncated_shard": ("sharded", break_truncated),
    "absent_shard": ("sharded", break_absent_shard),
    "header_not_a_table": ("good", break_header_not_a_table),
    "header_entry_without_offsets": ("good", break_header_entry),
    "header_offsets_off": ("good", break_header_offsets),
    "index_not_an_object": ("sharded", break_index_not_an_object),
    "index_map_values": ("sharded", break_index_map_values),
    "layers_as_string": ("good", break_layers_as_string),
    "eps_as_list": ("good", break_eps_as_list),
}


@pytest.fixture(params=list(BREAKERS))
def broken(request, tmp_path):
    source, breaker = BREAKERS[request.param]
    folder = tmp_path / "ckpt"
    shutil.copytree(request.getfixturevalue(source), folder)
    return folder, breaker(folder)


def assert_explains(msg, expected):
    for e in expected:
        if callable(e):
            assert e(msg), msg
        else:
            assert e in msg, f"{e!r} not in: {msg}"


def test_bad_checkpoint_load_model_error(broken):
    folder, expected = broken
    with pytest.raises(Exception) as e:
        load_model(folder)
    assert type(e.value).__name__ in ("CheckpointError", "ConfigError", "UnknownModelType")
    assert_explains(str(e.value), expected)


def test_bad_checkpoint_run_error(broken):
    folder, expected = broken
    r = run_cli("--model", folder, "--max-tokens", 2, "--json")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert_explains(r.stderr, expected)


def test_good_checkpoint_loads(good):
    r = run_cli("--model", good, "--max-tokens", 3, "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["tokens"]) == 3


# ---------------------------------------------------------------- layouts

def glm4_moe_to_hf(config):
    """mlx-community names -> original HF: per-expert tensors, an MTP layer, inv_freq."""
    n_layers = config["num_hidden_layers"]
    stacked = re.compile(r"^(model\.layers\.\d+\.mlp)\.switch_mlp\.(\w+_proj)\.weight$")

    def transform(weights):
        out = {}
        for name, w in weights.items():
            m = stacked.match(name)
            if m:
                for e in range(w.shape[0]):
                    out[f"{m.group(1)}.experts.{e}.{m.group(2)}.weight"] = w[e]
            else:
                out[name] = w
        # checkpoints ship a multi-token-prediction layer after the last one, and older
        # ones rotary buffers: neither is part of the decoder
        out[f"model.layers.{n_layers}.eh_proj.weight"] = mx.ones((4, 4))
        out[f"model.layers.{n_layers}.mlp.experts.0.gate_proj.weight"] = mx.ones((4, 4))
        out["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((8,))
        return out
    return transform


def llama4_to_hf(config):
    """mlx-community names -> HF: fused gate_up_proj [E, D, 2I], down_proj [E, I, D]."""
    experts = re.compile(r"^(.*\.feed_forward\.experts)\.(gate|up|down)_proj\.weight$")

    def transform(weights):
        out, parts = {}, {}
        for name, w in weights.items():
            m = experts.match(name)
            if m:
                parts.setdefault(m.group(1), {})[m.group(2)] = w
            else:
                out[name] = w
        for prefix, p in parts.items():  # stored [E, out, in]; HF is input-major
            out[prefix + ".gate_up_proj"] = mx.concatenate(
                [p["gate"].swapaxes(1, 2), p["up"].swapaxes(1, 2)], axis=-1)
            out[prefix + ".down_proj"] = p["down"].swapaxes(1, 2)
        out["vision_model.patch_embedding.linear.weight"] = mx.ones((8, 12))
        out["vision_model.model.layers.0.mlp.fc1.weight"] = mx.ones((8, 8))
        out["multi_modal_projector.linear_1.weight"] = mx.ones((8, 8))
        return out
    return transform


@pytest.mark.parametrize("model_type,to_hf,hf_marker", [
    ("glm4_moe", glm4_moe_to_hf, ".mlp.experts.7.down_proj.weight"),
    ("llama4", llama4_to_hf, ".feed_forward.experts.gate_up_proj"),
])
def test_hf_and_mlx_layouts_give_identical_logits(tmp_path, model_type, to_hf, hf_marker):
    config = preset_config(model_type, "tiny")
    mlx_dir = write_checkpoint(tmp_path / "mlx", config, seed=4)
    hf_dir = write_checkpoint(tmp_path / "hf", config, seed=4, transform=to_hf(config))
    hf_names = read_index(hf_dir)
    assert any(n.endswith(hf_marker) for n in hf_names)
    # nothing left in the stacked layout (".experts." excludes "shared_experts")
    assert not any(re.search(r"\.switch_mlp\.|\.experts\.(gate|up|down)_proj\.weight$", n)
                   for n in hf_names)
    a, b = load_model(mlx_dir), load_model(hf_dir)
    np.testing.assert_array_equal(logits_of(a.model, a.config), logits_of(b.model, b.config))


def test_hf_layout_with_16_experts_stacks_them_in_expert_order(tmp_path):
    # With 10 or more experts, "experts.10" sorts before "experts.2" as text: the stacked
    # bank must follow the expert numbers (GLM-4.5-Air has 128 experts).
    config = dict(preset_config("glm4_moe", "tiny"), n_routed_experts=16)
    mlx_dir = write_checkpoint(tmp_path / "mlx", config, seed=4)
    hf_dir = write_checkpoint(tmp_path / "hf", config, seed=4, transform=glm4_moe_to_hf(config))
    hf_names = read_index(hf_dir)
    assert any(".mlp.experts.15.up_proj.weight" in n for n in hf_names)
    a, b = load_model(mlx_dir), load_model(hf_dir)
    pa, pb = dict(tree_flatten(a.model.parameters())), dict(tree_flatten(b.model.parameters()))
    assert sorted(pa) == sorted(pb)
    stacked = [n for n in pa if ".switch_mlp." in n]
    assert stacked and all(pa[n].shape[0] == 16 for n in stacked)
    for n in pa:
        np.testing.assert_array_equal(np.array(pb[n]), np.array(pa[n]), err_msg=n)
    np.testing.assert_array_equal(logits_of(b.model, b.config), logits_of(a.model, a.config))


def test_hf_layout_missing_expert_tensor_is_a_checkpoint_error(tmp_path):
    config = preset_config("glm4_moe", "tiny")
    folder = write_checkpoint(tmp_path, config, seed=4, transform=glm4_moe_to_hf(config))
    drop_tensor(folder, "model.layers.2.mlp.experts.3.gate_proj.weight")
    with pytest.raises(Exception) as e:
        load_model(folder)
    assert type(e.value).__name__ == "CheckpointError"
    msg = str(e.value)
    assert str(folder) in msg and "layer 2" in msg and "gate_proj" in msg and "[3]" in msg


def test_hf_layout_stage_loads_only_its_layers(tmp_path):
    # a stage handed only its own layers' per-expert tensors stacks them as the whole does
    config = preset_config("glm4_moe", "tiny")
    hf_dir = write_checkpoint(tmp_path / "hf", config, seed=4, transform=glm4_moe_to_hf(config),
                              shard_bytes=150_000)
    full = dict(tree_flatten(load_model(hf_dir).model.parameters()))
    stage = load_model(hf_dir, range(2, 4), has_embed=False, has_head=False)
    params = dict(tree_flatten(stage.model.parameters()))
    assert any(".layers.3.mlp.switch_mlp." in n for n in params)
    assert all(".layers.2." in n or ".layers.3." in n for n in params)
    for n, v in params.items():
        np.testing.assert_array_equal(np.array(v), np.array(full[n]), err_msg=n)


# ---------------------------------------------------------------- against mlx-lm's loader

def mlxlm_logits_from_folder(folder, config):
    from mlx_lm.utils import load_model as mlxlm_load_model

    model, _ = mlxlm_load_model(Path(folder))
    return logits_of(model, config)


@pytest.mark.parametrize("model_type", ["glm4_moe", "llama4"])
def test_4bit_checkpoint_matches_mlx_lm(tmp_path, model_type):
    config = preset_config(model_type, "tiny")
    folder = write_checkpoint(tmp_path, config, seed=2, bits=4, group_size=64)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4}
    names = read_index(folder)
    assert sum(n.endswith(".scales") for n in names) >= 10
    ours = load_model(folder)
    assert any(n.endswith(".scales") for n, _ in tree_flatten(ours.model.parameters()))
    got = logits_of(ours.model, ours.config)
    ref = mlxlm_logits_from_folder(folder, config)
    assert np.abs(got - ref).max() <= TOL


def mlxlm_ready(model_type, config):
    """The preset as config.json must say it for mlx-lm, where mlx-lm reads it differently.

    Both are valid configs for our loader too, so the same folder is read by both.
    """
    config = copy.deepcopy(config)
    if model_type == "glm":
        config["partial_rotary_factor"] = 1.0  # mlx-lm's glm rotates the whole head
    if model_type == "openelm":
        # HF's config.json stores the per-layer lists, which mlx-lm requires
        args = get_module("openelm").ModelArgs.from_dict(config)
        config.update(num_query_heads=args.num_query_heads, num_kv_heads=args.num_kv_heads,
                      ffn_multipliers=args.layer_ffn_multipliers)
    return config


# mlx-lm's `llama4_text` is another network (dense layers only, no chunked attention), not
# transformers' Llama4ForCausalLM; ours is compared with mlx-lm's llama4 on the same
# weights in tests/test_model_llama4.py.
@pytest.mark.parametrize("model_type", [m for m in MODEL_TYPES if m != "llama4_text"])
def test_float32_checkpoint_matches_mlx_lm(tmp_path, model_type):
    config = mlxlm_ready(model_type, preset_config(model_type, "tiny"))
    folder = write_checkpoint(tmp_path, config, seed=2)
    ours = load_model(folder)
    got = logits_of(ours.model, ours.config)
    ref = mlxlm_logits_from_folder(folder, config)
    assert np.abs(got - ref).max() <= TOL


# ---------------------------------------------------------------- a stage reads its share

@pytest.mark.parametrize("layers", [range(1, 3), range(2, 3), range(3, 4)])
def test_stage_reads_only_its_shards(sharded, layers):
    wmap = read_index(sharded)
    layer_of = {n: int(m.group(1)) for n in wmap if (m := re.search(r"\.layers\.(\d+)\.", n))}
    mine = [n for n, i in layer_of.items() if i in layers]
    expected_files = sorted({wmap[n] for n in mine})
    assert len(expected_files) < len(set(wmap.values()))  # there is something to skip
    headers = {f: read_header(sharded / f) for f in expected_files}
    expected_bytes = 0
    for n in mine:
        t = headers[wmap[n]][n]
        expected_bytes += SAFETENSORS_BYTES[t["dtype"]] * int(np.prod(t["shape"]))
    loaded = load_model(sharded, layers, has_embed=False, has_head=False)
    assert loaded.files_read == expected_files
    assert loaded.bytes_loaded == expected_bytes


# ---------------------------------------------------------------- determinism

def all_tensors(folder):
    out = {}
    for f in sorted(set(read_index(folder).values())):
        out.update({k: np.array(v) for k, v in mx.load(str(folder / f)).items()})
    return out


def test_write_checkpoint_is_deterministic(tmp_path):
    config = preset_config("glm", "tiny")
    a = all_tensors(write_checkpoint(tmp_path / "a", config, seed=7, shard_bytes=100_000))
    b = all_tensors(write_checkpoint(tmp_path / "b", config, seed=7, shard_bytes=100_000))
    c = all_tensors(write_checkpoint(tmp_path / "c", config, seed=8, shard_bytes=100_000))
    assert a.keys() == b.keys() == c.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert not np.array_equal(a[name], c[name]), name


def test_per_module_quantization_overrides(tmp_path):
    """A checkpoint quantized by mlx with mixed settings: 4-bit group 64 by default, the LM
    head at 8 bits group 32, one projection left in full precision. It loads to the same
    logits as the model it was saved from, and as mlx-lm reading the same folder."""
    import mlx.nn as nn

    from dist_runtime.checkpoint import build_model
    from dist_runtime.synthetic import randomize
    from dist_runtime.writer import save_sharded, write_tokenizer

    config = preset_config("glm4_moe", "tiny")
    overrides = {"lm_head": {"group_size": 32, "bits": 8},
                 "model.layers.1.self_attn.q_proj": False}
    model, _ = build_model(config)
    randomize(model, seed=4)

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 64:
            return False
        return overrides.get(path, True)

    nn.quantize(model, group_size=64, bits=4, class_predicate=predicate)
    assert model.lm_head.bits == 8 and model.lm_head.group_size == 32
    assert not hasattr(model.model.layers[1].self_attn.q_proj, "scales")
    save_sharded(tmp_path, dict(tree_flatten(model.parameters())), shard_bytes=200_000)
    quant = {"group_size": 64, "bits": 4, **overrides}
    (tmp_path / "config.json").write_text(json.dumps(dict(config, quantization=quant)))
    write_tokenizer(tmp_path, config["vocab_size"])

    loaded = load_model(tmp_path)
    head = loaded.model.lm_head
    assert (head.bits, head.group_size) == (8, 32)
    assert not hasattr(loaded.model.model.layers[1].self_attn.q_proj, "scales")
    got = logits_of(loaded.model, config)
    assert np.array_equal(got, logits_of(model, config))
    assert np.abs(got - mlxlm_logits_from_folder(tmp_path, config)).max() <= TOL

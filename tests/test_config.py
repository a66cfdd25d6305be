"""Reading config.json as the reference does: every spelling Hugging Face transformers
reads (its config classes, which run without torch, are the reference here), and a
warning for keys that would change the computation but are not read."""

import copy
import json
import subprocess
import sys

import pytest

from dist_runtime.synthetic import preset_config
from dist_runtime.writer import write_checkpoint
from models import ConfigError, get_module
from tests.launcher import ROOT

transformers = pytest.importorskip("transformers")

HF_CONFIGS = {"glm": "GlmConfig", "glm4_moe": "Glm4MoeConfig", "llama4": "Llama4Config"}
FLAT_ROPE = ("rope_theta", "partial_rotary_factor", "rope_scaling", "rope_parameters")


def hf_config(model_type, config):
    """transformers' parse of a config dict (given a copy: it edits what it is given)."""
    return getattr(transformers, HF_CONFIGS[model_type])(**copy.deepcopy(config))


def without_rope(config):
    return {k: v for k, v in config.items() if k not in FLAT_ROPE}


ROPE_VARIANTS = {  # the spellings of GLM's RoPE settings seen in config.json files
    "flat": dict(rope_theta=25000.0, partial_rotary_factor=0.25),
    "flat_theta_only": dict(rope_theta=25000.0),
    "transformers_5": dict(rope_parameters=dict(rope_type="default", rope_theta=25000.0,
                                                partial_rotary_factor=0.25)),
    "nested_wins": dict(rope_theta=1e6, partial_rotary_factor=1.0,
                        rope_parameters=dict(rope_type="default", rope_theta=25000.0,
                                             partial_rotary_factor=0.25)),
    "nested_theta_flat_factor": dict(partial_rotary_factor=0.75,
                                     rope_parameters=dict(rope_theta=25000.0)),
    "rope_scaling_default": dict(rope_theta=5.0, rope_scaling=dict(type="default",
                                                                   rope_theta=25000.0)),
    "none": dict(),
}


@pytest.mark.parametrize("model_type", ["glm", "glm4_moe"])
@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_glm_rope_spellings_read_as_transformers_reads_them(model_type, variant):
    config = dict(without_rope(preset_config(model_type, "tiny")), **ROPE_VARIANTS[variant])
    ref = hf_config(model_type, config).rope_parameters
    args = get_module(model_type).ModelArgs.from_dict(config)
    assert args.rope_theta == ref["rope_theta"]
    assert args.partial_rotary_factor == ref["partial_rotary_factor"]


@pytest.mark.parametrize("variant", [
    dict(rope_theta=7.0, rope_scaling=None),
    dict(rope_parameters=dict(rope_type="default", rope_theta=7.0)),
    dict(rope_theta=7.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=64)),
    dict(rope_parameters=dict(rope_type="llama3", rope_theta=7.0, factor=8.0,
                              low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64)),
])
def test_llama4_rope_spellings_read_as_transformers_reads_them(variant):
    config = preset_config("llama4", "tiny")
    config["text_config"] = dict(without_rope(config["text_config"]), **variant)
    ref = hf_config("llama4", config).text_config.rope_parameters
    theta, scaling = get_module("llama4").ModelArgs.from_dict(config).text_config.rope
    assert theta == ref["rope_theta"]
    assert (scaling or {}).get("rope_type", "default") == ref["rope_type"]
    if scaling:
        assert scaling["factor"] == ref["factor"]


def test_glm4_moe_reads_the_other_names_of_its_fields():
    """transformers maps num_local_experts and num_mtp_layers onto its own fields."""
    config = preset_config("glm4_moe", "tiny")
    other = {k: v for k, v in config.items()
             if k not in ("n_routed_experts", "num_nextn_predict_layers")}
    other.update(num_local_experts=config["n_routed_experts"], num_mtp_layers=3)
    ref = hf_config("glm4_moe", other)
    args = get_module("glm4_moe").ModelArgs.from_dict(other)
    assert args.n_routed_experts == ref.n_routed_experts == config["n_routed_experts"]
    assert args.num_nextn_predict_layers == ref.num_nextn_predict_layers == 3
    assert get_module("glm4_moe").ModelArgs.config_warnings(other) == []


def test_glm_refuses_a_rope_type_it_does_not_implement():
    config = dict(without_rope(preset_config("glm", "tiny")),
                  rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0))
    with pytest.raises(ConfigError, match=r"rope type 'yarn' is not implemented"):
        get_module("glm").ModelArgs.from_dict(config)


@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_a_config_written_by_transformers_gives_no_warning(model_type):
    """Every key transformers writes is read, or does not change the computation."""
    preset = preset_config(model_type, "tiny")
    written = hf_config(model_type, preset).to_dict()
    assert written["model_type"] == model_type
    assert get_module(model_type).ModelArgs.config_warnings(written) == []
    assert get_module(model_type).ModelArgs.config_warnings(preset) == []


@pytest.mark.parametrize("alias", ["glm4_moe", "llama4", "glm", "openelm", "lille-130m"])
def test_keys_that_change_the_computation_but_are_not_read_are_warned_about(alias):
    config = preset_config(alias, "tiny")
    text = config.get("text_config", config)
    assumed = {"openelm": ("activation_fn_name", "gelu")}.get(alias, ("hidden_act", "gelu"))
    text[assumed[0]] = assumed[1]
    text["sliding_window"] = 128
    module = get_module(config["model_type"])
    module.ModelArgs.from_dict(config)  # still loads
    warnings = module.ModelArgs.config_warnings(config, "x/config.json")
    assert len(warnings) == 2, warnings
    assert any(f'"{assumed[0]}" is \'gelu\'' in w and "differ from the reference" in w
               for w in warnings), warnings
    assert any("'sliding_window'" in w and "does not read" in w for w in warnings), warnings
    assert all(w.startswith("x/config.json") for w in warnings)


@pytest.mark.timeout(60)
def test_run_prints_the_warnings_and_generates(tmp_path):
    folder = write_checkpoint(tmp_path, preset_config("glm", "tiny"), seed=2)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_act="gelu_pytorch_tanh", sliding_window=128)
    (folder / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, str(ROOT / "launch/run.py"), "--model", str(folder),
                        "--max-tokens", "2", "--json"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "] warning: " in ln]
    assert len(lines) == 2 and all(ln.startswith("[rank 0 (") for ln in lines), r.stderr
    assert f"{folder / 'config.json'}: \"hidden_act\" is 'gelu_pytorch_tanh'" in lines[0]

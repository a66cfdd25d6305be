"""Every architecture with every synthetic preset starts, on one rank and on two.

The real-shape presets are far too big to generate with here, so for them "starts" means
what a rank does before it reads a weight: open the model (config, costs, and on rank 0
the tokenizer and the prompt), agree with the other rank, and plan, both with room to
spare and with a --memory-limit too small (a clean plan error). The tiny presets
generate for real under launch/run.py, and two ranks give the tokens of one process.
"""

import argparse

import numpy as np
import pytest

from dist_runtime.cluster import HostInfo
from dist_runtime.costs import kv_bytes_per_token
from dist_runtime.hub import ALIASES
from dist_runtime.partition import PlanError
from dist_runtime.planning import make_plan
from dist_runtime.preflight import check_facts, open_model
from dist_runtime.synthetic import preset_config
from models import get_module
from tests.launcher import launch

GB = 10**9
LOGIT_TOL = 1e-4
ARCHS = list(ALIASES)  # every architecture alias: glm4_moe, llama4, glm, openelm, lille-130m
PRESETS = [(a, p) for a in ARCHS for p in get_module(a).PRESETS]


def args_for(alias, preset):
    return argparse.Namespace(model=alias, synthetic=preset, synthetic_seed=0,
                              dtype="bfloat16", bits=None, no_chat_template=False)


def hosts(n, gb):
    return [HostInfo(r, f"mac{r}", int(gb * GB), "0.32.4", "0.1.0", "3.11.7") for r in range(n)]


def test_every_architecture_has_presets_and_the_list_is_complete():
    assert set(ARCHS) == {"glm4_moe", "llama4", "glm", "openelm", "lille-130m"}
    assert all("tiny" in get_module(a).PRESETS for a in ARCHS)


@pytest.mark.parametrize("alias,preset", PRESETS)
def test_preset_opens_and_plans_on_one_and_two_ranks(alias, preset):
    args = args_for(alias, preset)
    opened = [open_model(args, r, f"mac{r}", ["--model", alias], prompt="Hello" if r == 0
                         else None) for r in range(2)]
    for o in opened:
        assert o.facts.error == "", o.facts.error
    assert opened[0].prompt and opened[1].prompt is None
    costs = opened[0].costs
    n_layers = len(costs.weight)
    assert all(k > 0 for k in costs.kv_per_token) and len(costs.kv_per_token) == n_layers
    need = sum(costs.weight) + costs.head + sum(costs.kv_per_token) * 4096
    for n in (1, 2):
        infos = hosts(n, 4 * need / GB + 1)
        check_facts(infos, [o.facts for o in opened[:n]], 0)
        plan = make_plan(costs, infos, 4096, None)
        assert plan.ranges[0].start == 0 and plan.ranges[-1].stop == n_layers
        with pytest.raises(PlanError) as e:
            make_plan(costs, infos, 4096, None, limits=[need / GB / 1000])
        assert "does not fit" in str(e.value) and "--memory-limit" in str(e.value)


@pytest.mark.parametrize("alias,preset", PRESETS)
def test_kv_bytes_follow_the_layers_key_and_value_widths(alias, preset):
    """Per layer, 2 (keys and values) x kv heads x head width x 2 bytes, from the built
    model's own k/v projections (fused qkv: the kv share of its output rows)."""
    from dist_runtime.checkpoint import build_model

    config = preset_config(alias, preset)
    model, _ = build_model(config)
    expected = []
    for _, layer in model.owned_layers():
        attn = next(m for m in (getattr(layer, n, None) for n in ("self_attn", "attn",
                                                                   "attention")) if m)
        head = attn.q_proj.weight.shape[0] // attn.n_heads if "q_proj" in attn else \
            attn.qkv_proj.weight.shape[0] // (attn.n_heads + 2 * attn.n_kv)
        expected.append(2 * attn.n_kv * head * 2)
    assert kv_bytes_per_token(model.args) == expected


@pytest.mark.timeout(120)
@pytest.mark.parametrize("alias", ARCHS)
def test_tiny_preset_generates_on_one_and_two_ranks_alike(alias):
    args = ["--model", alias, "--synthetic", "tiny", "--prompt", "Hello there",
            "--max-tokens", "6", "--ignore-eos", "--json", "--dump-logits"]
    one, two = launch(1, args, timeout=60), launch(2, args, timeout=60)
    for job, n in ((one, 1), (two, 2)):
        assert job.summary is not None and not job.errors, job.stderr
        assert job.finished == set(range(n)) and job.summary["ranks"] == n
        assert len(job.summary["tokens"]) == 6
    assert two.summary["tokens"] == one.summary["tokens"]
    a, b = np.array(two.summary["first_logits"]), np.array(one.summary["first_logits"])
    assert np.abs(a - b).max() <= LOGIT_TOL

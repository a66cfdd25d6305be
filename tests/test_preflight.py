"""The checks before loading: pure functions on made-up hosts, then real jobs.

Version disagreement cannot be made honestly on one machine (every rank imports the
same mlx), so it is tested on HostInfo values; configs that disagree, a plan that does
not fit (--memory-limit) and a bad ring address list run as real processes.
"""

import json
import os
import subprocess
import sys

import pytest

from dist_runtime.cluster import HostInfo
from dist_runtime.costs import Costs
from dist_runtime.errors import PreflightError
from dist_runtime.partition import PlanError
from dist_runtime.preflight import (Facts, check_facts, check_ring_addresses, check_versions,
                                    even_split, fmt_bytes, model_for_rank, plan_with_advice)
from dist_runtime.synthetic import preset_config
from dist_runtime.writer import write_checkpoint
from tests.launcher import ROOT
from tests.live import LiveJob

GB = 10**9


def hosts(*avail_gb, mlx="0.32.4", project="0.1.0", python="3.11.7"):
    return [HostInfo(r, f"mac{r}", int(a * GB), mlx, project, python)
            for r, a in enumerate(avail_gb)]


def costs(n_layers=8, layer_gb=1.0, head_gb=0.5, kv_per_token=1000):
    w = [int(layer_gb * GB)] * n_layers
    return Costs(w, list(w), [kv_per_token] * n_layers, int(head_gb * GB))


# -- versions and facts ---------------------------------------------------------------------


def test_mlx_version_mismatch_names_host_and_fix():
    infos = hosts(64, 64)
    infos[1].mlx = "0.31.0"
    problems = check_versions(infos)
    assert problems[0].level == "error"
    msg = problems[0].message
    assert "rank 0 (mac0) has mlx 0.32.4" in msg and "rank 1 (mac1) has 0.31.0" in msg
    assert "pip install mlx==0.32.4 on mac1" in msg
    facts = [Facts(r, "m") for r in range(2)]
    with pytest.raises(PreflightError, match="mlx versions differ"):
        check_facts(infos, facts, 0)


def test_project_mismatch_is_an_error_python_minor_only_a_warning():
    infos = hosts(64, 64)
    infos[1].project = "0.0.9"
    assert "check out the same commit" in check_versions(infos)[0].message
    infos = hosts(64, 64)
    infos[1].python = "3.12.1"
    problems = check_versions(infos)
    assert [p.level for p in problems] == ["warning"]
    warnings = check_facts(infos, [Facts(r, "m") for r in range(2)], 0)
    assert "Python versions differ" in warnings[0].message


def test_a_rank_that_cannot_open_its_model():
    infos = hosts(64, 64, 64)
    facts = [Facts(0, "m"), Facts(1, "m", error="/x/model-2.safetensors is truncated"),
             Facts(2, "m")]
    with pytest.raises(PreflightError) as own:
        check_facts(infos, facts, 1)
    assert str(own.value) == "/x/model-2.safetensors is truncated"  # its own, in full
    for me in (0, 2):
        with pytest.raises(PreflightError) as other:
            check_facts(infos, facts, me)
        assert str(other.value).startswith("rank 1 (mac1) cannot open its model: /x/model-2")


@pytest.mark.parametrize("field,value,expected", [
    ("args_hash", "b", "rank 1 (mac1) was started with other arguments"),
    ("config_hash", "b", "rank 1 (mac1) has a different config.json than rank 0 (mac0)"),
    ("costs_hash", "b", "rank 1 (mac1)'s weight files differ from rank 0 (mac0)'s"),
])
def test_disagreement_names_the_rank(field, value, expected):
    facts = [Facts(r, f"/ckpt{r}", args_hash="a", config_hash="a", costs_hash="a")
             for r in range(2)]
    setattr(facts[1], field, value)
    with pytest.raises(PreflightError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_facts(hosts(64, 64), facts, 0)


def test_prompt_longer_than_context():
    facts = [Facts(0, "m", context=4096, prompt_tokens=5000), Facts(1, "m", context=4096)]
    with pytest.raises(PreflightError) as e:
        check_facts(hosts(64, 64), facts, 1)
    assert "the prompt is 5000 tokens" in str(e.value)
    assert "shorten the prompt by at least 905 tokens" in str(e.value)
    facts[0].prompt_tokens = 4095
    check_facts(hosts(64, 64), facts, 1)  # fits: no error


# -- plan fit -------------------------------------------------------------------------------


def test_split_that_does_not_fit_names_host_numbers_and_a_split_that_fits():
    # 8 layers of 1 GB; rank 1 can use 85% of 4 GB = 3.4 GB, so 5 layers do not fit.
    with pytest.raises(PlanError) as e:
        plan_with_advice(costs(), hosts(20, 4), 0, [3, 5])
    msg = str(e.value)
    assert "rank 1 (mac1) would hold layers 3..7 (5 layers)" in msg
    assert "needing 5.00 GB of weights" in msg and "can use 3.40 GB" in msg
    fix = msg.split("; ")[-1]
    assert fix.startswith("--split ") and "fits" in fix
    counts = [int(c) for c in fix.split()[1].split(",")]
    assert sum(counts) == 8 and counts[1] <= 3
    plan = plan_with_advice(costs(), hosts(20, 4), 0, counts)  # the proposal is accepted
    assert [len(r) for r in plan.ranges] == counts


@pytest.mark.parametrize("split,expected", [
    ([4, 4, 0], "gives rank 2 (mac2) 0 layers"),
    ([4, 4], "has 2 layer counts but the job has 3 ranks"),
    ([4, 4, 4], "adds up to 12 layers but the model has 8"),
])
def test_bad_split_values(split, expected):
    with pytest.raises(PlanError) as e:
        plan_with_advice(costs(), hosts(20, 20, 20), 0, split)
    assert expected in str(e.value) and "fits every host's memory" in str(e.value)


def test_no_plan_fits_suggests_kv_tokens_or_memory():
    # 8 GB of weights + KV; three hosts of 85% x 4 GB: KV room is what breaks it.
    c = costs(n_layers=8, layer_gb=1.0, head_gb=0.2, kv_per_token=100_000)
    with pytest.raises(PlanError) as e:
        plan_with_advice(c, hosts(4, 4, 4), 8192, None)
    msg = str(e.value)
    assert "does not fit these 3 hosts" in msg and "rank 1 (mac1) can use 3.40 GB" in msg
    assert "--max-kv-tokens" in msg and "fits" in msg
    k = int(msg.split("--max-kv-tokens ")[-1].split()[0])
    plan_with_advice(c, hosts(4, 4, 4), k, None)  # the proposal is accepted
    with pytest.raises(PlanError, match="add a host with"):
        plan_with_advice(costs(n_layers=8, layer_gb=2.0), hosts(4, 4), 1, None)


def test_memory_limit_caps_and_must_match_ranks():
    with pytest.raises(PlanError, match=r"its --memory-limit 2 GB"):
        plan_with_advice(costs(), hosts(64, 64), 0, [4, 4], limits=[64, 2])
    with pytest.raises(PlanError, match="--memory-limit has 3 values but the job has 2 ranks"):
        plan_with_advice(costs(), hosts(64, 64), 0, None, limits=[1, 2, 3])


def test_more_ranks_than_layers():
    with pytest.raises(PlanError, match="the job has 3 ranks but the model has only 2 layers"):
        plan_with_advice(costs(n_layers=2), hosts(64, 64, 64), 0, None)


def test_helpers():
    assert fmt_bytes(1_480_000) == "1.48 MB" and fmt_bytes(3.4e9) == "3.40 GB"
    assert even_split(7, 3) == [2, 2, 3]
    assert model_for_rank("/data/ckpt{rank}/{host}", 2, "mac2") == "/data/ckpt2/mac2"


def test_ring_addresses():
    assert check_ring_addresses([["10.0.0.1:5000"], ["10.0.0.2:5001"]]) == []
    dup = check_ring_addresses([["10.0.0.1:5000"], ["10.0.0.1:5000"]])
    assert "ranks 0 and 1 both listen on 10.0.0.1:5000" in dup[0].message
    assert "is not \"ip:port\"" in check_ring_addresses([["mac1:5000"], ["10.0.0.2:1"]])[0].message
    assert check_ring_addresses({"hosts": []})[0].level == "error"


# -- real jobs ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_different_config_on_one_rank(tmp_path):
    cfg = preset_config("glm4_moe", "tiny")
    write_checkpoint(tmp_path / "ckpt0", cfg, seed=1)
    write_checkpoint(tmp_path / "ckpt1", dict(cfg, hidden_size=32), seed=1)
    with LiveJob(2, ["--model", str(tmp_path / "ckpt{rank}"), "--prompt", "hi"]) as job:
        job.wait(30)
        for r in (0, 1):
            (e,) = job.errors[r]
            assert "rank 1 (" in e and "has a different config.json than rank 0" in e, e
            assert "hidden 32" in e and "hidden 64" in e
        assert set(job.exit_codes.values()) == {2} and not job.said("stage")


@pytest.mark.timeout(60)
def test_plan_that_does_not_fit_one_host():
    args = ["--model", "glm4_moe", "--synthetic", "tiny", "--split", "1,3",
            "--memory-limit", "1,0.0012"]
    with LiveJob(2, args) as job:
        job.wait(30)
        for r in (0, 1):
            (e,) = job.errors[r]
            assert "rank 1 (" in e and "would hold layers 1..3 (3 layers)" in e, e
            assert "can use 1.20 MB (its --memory-limit 0.0012 GB)" in e
            assert "--split 3,1 fits" in e
        assert set(job.exit_codes.values()) == {2} and not job.said("stage")


@pytest.mark.timeout(30)
def test_duplicate_ring_address_fails_before_connecting(tmp_path):
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([["127.0.0.1:41000"], ["127.0.0.1:41000"]]))
    env = dict(os.environ, MLX_RANK="1", MLX_HOSTFILE=str(ring))
    p = subprocess.run([sys.executable, str(ROOT / "launch/run.py"), "--model", "glm4_moe",
                        "--synthetic", "tiny"], capture_output=True, text=True, env=env,
                       timeout=25)
    assert p.returncode == 2
    assert "[rank 1 (" in p.stderr and "ranks 0 and 1 both listen on 127.0.0.1:41000" in p.stderr

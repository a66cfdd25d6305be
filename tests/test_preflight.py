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
from dist_runtime.hostfiles import check_ring_addresses
from dist_runtime.preflight import Facts, check_facts, check_versions, model_for_rank
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


def test_model_for_rank_fills_rank_and_host():
    assert model_for_rank("/data/ckpt{rank}/{host}", 2, "mac2") == "/data/ckpt2/mac2"

"""The plan's rules and advice (dist_runtime/planning.py) on made-up hosts and costs."""

import pytest

from dist_runtime.partition import PlanError
from dist_runtime.planning import (even_split, fmt_bytes, kv_room_bytes, make_plan,
                                   parse_memory_limits)
from tests.test_preflight import costs, hosts



def test_split_that_does_not_fit_names_host_numbers_and_a_split_that_fits():
    # 8 layers of 1 GB; rank 1 can use 85% of 4 GB = 3.4 GB, so 5 layers do not fit.
    with pytest.raises(PlanError) as e:
        make_plan(costs(), hosts(20, 4), 0, [3, 5])
    msg = str(e.value)
    assert "rank 1 (mac1) would hold layers 3..7 (5 layers)" in msg
    assert "needing 5.00 GB of weights" in msg and "can use 3.40 GB" in msg
    fix = msg.split("; ")[-1]
    assert fix.startswith("--split ") and "fits" in fix
    counts = [int(c) for c in fix.split()[1].split(",")]
    assert sum(counts) == 8 and counts[1] <= 3
    plan = make_plan(costs(), hosts(20, 4), 0, counts)  # the proposal is accepted
    assert [len(r) for r in plan.ranges] == counts


@pytest.mark.parametrize("split,expected", [
    ([4, 4, 0], "gives rank 2 (mac2) 0 layers"),
    ([4, 4], "has 2 layer counts but the job has 3 ranks"),
    ([4, 4, 4], "adds up to 12 layers but the model has 8"),
])
def test_bad_split_values(split, expected):
    with pytest.raises(PlanError) as e:
        make_plan(costs(), hosts(20, 20, 20), 0, split)
    assert expected in str(e.value) and "fits every host's memory" in str(e.value)


def test_no_plan_fits_suggests_kv_tokens_or_memory():
    # 8 GB of weights + KV; three hosts of 85% x 4 GB: KV room is what breaks it.
    c = costs(n_layers=8, layer_gb=1.0, head_gb=0.2, kv_per_token=100_000)
    with pytest.raises(PlanError) as e:
        make_plan(c, hosts(4, 4, 4), 8192, None)
    msg = str(e.value)
    assert "does not fit these 3 hosts" in msg and "rank 1 (mac1) can use 3.40 GB" in msg
    assert "--max-kv-tokens" in msg and "fits" in msg
    k = int(msg.split("--max-kv-tokens ")[-1].split()[0])
    make_plan(c, hosts(4, 4, 4), k, None)  # the proposal is accepted
    with pytest.raises(PlanError, match="add a host with"):
        make_plan(costs(n_layers=8, layer_gb=2.0), hosts(4, 4), 1, None)


def test_memory_limit_caps_and_must_match_ranks():
    with pytest.raises(PlanError, match=r"its --memory-limit 2 GB"):
        make_plan(costs(), hosts(64, 64), 0, [4, 4], limits=[64, 2])
    with pytest.raises(PlanError, match="--memory-limit has 3 values but the job has 2 ranks"):
        make_plan(costs(), hosts(64, 64), 0, None, limits=[1, 2, 3])


def test_more_ranks_than_layers():
    with pytest.raises(PlanError, match="the job has 3 ranks but the model has only 2 layers"):
        make_plan(costs(n_layers=2), hosts(64, 64, 64), 0, None)


def test_helpers():
    assert fmt_bytes(1_480_000) == "1.48 MB" and fmt_bytes(3.4e9) == "3.40 GB"
    assert even_split(7, 3) == [2, 2, 3]


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "0", "64,nan"])
def test_memory_limit_must_be_a_finite_positive_number(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="finite numbers of GB above 0"):
        parse_memory_limits(text)
    assert parse_memory_limits("64,48.5") == [64.0, 48.5]


def test_max_batch_reserves_kv_for_every_sequence():
    # 8 layers of 1 GB, KV 100 kB a position per layer: 4096 positions = 0.41 GB a layer.
    c = costs(kv_per_token=100_000)
    make_plan(c, hosts(20, 20), 4096, None, max_batch=1)
    with pytest.raises(PlanError) as e:
        make_plan(c, hosts(20, 20), 4096, None, max_batch=8)  # 3.3 GB a layer: no fit
    msg = str(e.value)
    assert "--max-kv-tokens 4096 x --max-batch 8" in msg and "a smaller --max-batch" in msg
    k = int(msg.split("Fix: ")[1].split("--max-kv-tokens ")[1].split()[0])
    assert k < 4096
    make_plan(c, hosts(20, 20), k, None, max_batch=8)  # the proposal is accepted


def test_a_prompt_cache_is_reserved_beside_the_batch_and_named_as_itself():
    # A server's kept positions add to --max-batch sequences' room; a refusal names the
    # user's own options (not a --max-batch raised to make room) and offers each way out.
    c = costs(kv_per_token=100_000)
    make_plan(c, hosts(20, 20), 4096, None, max_batch=2)
    with pytest.raises(PlanError) as e:
        make_plan(c, hosts(20, 20), 4096, None, max_batch=2, kept=6 * 4096)
    msg = str(e.value)
    assert "--max-kv-tokens 4096 x --max-batch 2 + --prompt-cache-tokens 24576" in msg, msg
    assert "a smaller --prompt-cache-tokens (0 fits)" in msg, msg
    k = int(msg.split("Fix: ")[1].split("--max-kv-tokens ")[1].split()[0])
    assert k < 4096
    make_plan(c, hosts(20, 20), k, None, max_batch=2, kept=6 * 4096)  # accepted
    assert kv_room_bytes(c, 4096, 2, 100) == [100_000 * (2 * 4096 + 100)] * 8

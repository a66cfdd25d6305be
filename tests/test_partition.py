"""The partition is a pure function: checked on numbers alone, against brute force."""

import itertools

import pytest

from dist_runtime.partition import PlanError, plan_layers, stage_memory

GB = 10**9


def brute_force(active, mem, budgets, head, head_time=None):
    """Best max-stage time over every contiguous split that fits, by enumeration; rank 0
    also holds `head` bytes and spends `head_time` (default: head) per token."""
    head_time = head if head_time is None else head_time
    n, r = len(active), len(budgets)
    best = None
    for cuts in itertools.combinations(range(1, n), r - 1):
        bounds = [0, *cuts, n]
        ranges = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        extra_mem = [head] + [0] * (r - 1)
        extra_time = [head_time] + [0] * (r - 1)
        if any(sum(mem[i] for i in rg) + extra_mem[k] > budgets[k]
               for k, rg in enumerate(ranges)):
            continue
        t = max(sum(active[i] for i in rg) + extra_time[k] for k, rg in enumerate(ranges))
        best = t if best is None else min(best, t)
    return best


def stage_times(plan, active, head):
    return [sum(active[i] for i in rg) + (head if k == 0 else 0)
            for k, rg in enumerate(plan.ranges)]


def assert_valid(plan, n_layers, n_ranks):
    covered = [i for rg in plan.ranges for i in rg]
    assert covered == list(range(n_layers)), "every layer exactly once, in order"
    assert len(plan.ranges) == n_ranks and all(len(rg) > 0 for rg in plan.ranges)


N_RANDOM = 120


def random_case(seed):
    """Layers, budgets and a head (embedding + LM head on rank 0) as heavy as a few
    layers: its memory and its time per token drawn apart (a token reads one row of
    the embedding), or head_time None (the planner's default: all of head_bytes)."""
    import random

    rnd = random.Random(seed)
    n, r = rnd.randint(4, 9), rnd.randint(2, 4)
    mem = [rnd.randint(1, 9) * GB for _ in range(n)]
    active = [m // rnd.choice([1, 4]) for m in mem]  # some layers MoE-like: fewer active bytes
    head = rnd.randint(0, 14) * GB
    head_time = rnd.choice([None, rnd.randint(0, head // GB) * GB])
    budgets = [rnd.randint(8, 40) * GB for _ in range(r)]
    return n, r, mem, active, head, head_time, budgets


@pytest.mark.parametrize("seed", range(N_RANDOM))
def test_plan_is_optimal_and_fits(seed):
    n, r, mem, active, head, head_time, budgets = random_case(seed)
    best = brute_force(active, mem, budgets, head, head_time)
    if best is None:
        with pytest.raises(PlanError):
            plan_layers(mem, active, budgets, head_bytes=head, head_time=head_time)
        return
    plan = plan_layers(mem, active, budgets, head_bytes=head, head_time=head_time)
    assert_valid(plan, n, r)
    for k, rg in enumerate(plan.ranges):
        assert stage_memory(rg, mem, [0] * n, head if k == 0 else 0) <= budgets[k]
    spent = head if head_time is None else head_time
    assert max(stage_times(plan, active, spent)) <= best * (1 + 1e-9) + 1


def test_random_cases_exercise_the_head():
    # The cases above are only worth their number if the head changes the answer often:
    # its time the best split, its memory whether any split fits.
    time_matters = memory_matters = 0
    for seed in range(N_RANDOM):
        n, r, mem, active, head, head_time, budgets = random_case(seed)
        with_head = brute_force(active, mem, budgets, head, head_time)
        if with_head is not None and with_head != brute_force(active, mem, budgets, head, 0):
            time_matters += 1
        if with_head is None and brute_force(active, mem, budgets, 0, head_time) is not None:
            memory_matters += 1
    assert time_matters >= N_RANDOM // 4 and memory_matters >= N_RANDOM // 20, \
        (time_matters, memory_matters)


def test_moe_and_dense_layers_balance_by_active_bytes():
    # Maverick-like: dense and MoE layers alternate; MoE weighs 8x but reads 1/4 per token.
    mem = [1 * GB, 8 * GB] * 4
    active = [1 * GB, 2 * GB] * 4
    plan = plan_layers(mem, active, [100 * GB, 100 * GB])
    times = stage_times(plan, active, 0)
    assert max(times) == brute_force(active, mem, [100 * GB] * 2, 0)


def test_small_host_gets_fewer_layers():
    mem = [4 * GB] * 12
    plan = plan_layers(mem, mem, [20 * GB, 100 * GB])
    assert len(plan.ranges[0]) <= 5


def test_infeasible_is_refused_with_numbers():
    with pytest.raises(PlanError, match=r"needs 40\.00 GB .* 2 hosts have 30\.00 GB"):
        plan_layers([10 * GB] * 4, [10 * GB] * 4, [15 * GB, 15 * GB])
    with pytest.raises(PlanError, match="no contiguous split fits"):
        plan_layers([12 * GB, 1 * GB], [1, 1], [10 * GB, 10 * GB])


def test_kv_room_counts_against_the_budget():
    mem = [4 * GB] * 4
    plan_layers(mem, mem, [10 * GB, 10 * GB])
    with pytest.raises(PlanError):
        plan_layers(mem, mem, [10 * GB, 10 * GB], kv_bytes=[2 * GB] * 4)


def test_embedding_costs_rank_0_memory_but_not_time():
    # A big embedding table is read one row a token: rank 0 should still get its share
    # of layers when only the (small) LM head counts as time.
    mem = [GB] * 8
    heavy = plan_layers(mem, mem, [100 * GB] * 2, head_bytes=6 * GB)
    light = plan_layers(mem, mem, [100 * GB] * 2, head_bytes=6 * GB, head_time=GB)
    assert len(light.ranges[0]) > len(heavy.ranges[0])
    assert max(stage_times(light, mem, GB)) == brute_force(mem, mem, [100 * GB] * 2, GB)

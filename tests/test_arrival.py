"""A rank waiting for its neighbour sleeps instead of spinning in mlx's ring receive.

Real processes (2 and 3 ranks under mlx.launch, tests/jobs/arrival_check.py): each rank
finds the ring's sockets to its neighbours (dist_runtime/arrival.py), and a wait of a
second for a message costs it almost no CPU, where posting mlx's receive at once spins a
core for the whole wait (that figure is shown, not asserted: it is mlx's behaviour). The
message arrives intact either way.
"""

import json
import os
import subprocess

import pytest

from tests.launcher import ROOT, launch_cmd

JOB = ROOT / "tests/jobs/arrival_check.py"
SLEEP_S = 1.0  # as the job sleeps


@pytest.mark.parametrize("n", [2, 3])
def test_waiting_rank_sleeps_until_its_neighbours_bytes_arrive(n):
    p = subprocess.run(launch_cmd(n, JOB), capture_output=True, text=True, timeout=120,
                       cwd=ROOT, stdin=subprocess.DEVNULL, env=dict(os.environ))
    ranks = {r["rank"]: r for r in (json.loads(line) for line in p.stdout.splitlines()
                                    if line.startswith("{"))}
    assert sorted(ranks) == list(range(n)), f"not every rank reported:\n{p.stderr}"
    for rank, r in ranks.items():
        assert r["neighbours"] == sorted({(rank - 1) % n, (rank + 1) % n}), r
        for mode in ("watched", "plain"):
            assert r[mode]["intact"], (mode, r)
            assert r[mode]["wall_s"] >= 0.5 * SLEEP_S, (mode, r)  # it did wait
        w = r["watched"]
        assert w["cpu_s"] < 0.25 * w["wall_s"], (
            f"rank {rank} used {w['cpu_s']:.2f} s of CPU in a {w['wall_s']:.2f} s wait "
            f"(without the watch: {r['plain']['cpu_s']:.2f} s in {r['plain']['wall_s']:.2f} s)")

"""A finished sequence's KV caches are freed: on rank 0 in process, and on every other
stage of a real job once its OP_RELEASE has gone round the ring.

Fresh sequence ids per run would hide caches that are never freed (nothing reads them
again), so these tests count what each stage still holds.
"""

import json
import os
import subprocess

from dist_runtime.coordinator import Coordinator, Request
from dist_runtime.sampling import Sampler, SamplingParams
from dist_runtime.stage import Stage
from tests.launcher import ROOT, launch_cmd
from tests.reference import build_tiny

JOB = ROOT / "tests/jobs/release.py"
LIVE = 2  # the stats row's field: sequences whose caches the rank holds


def test_rank_0_frees_each_sequence_when_it_finishes():
    cfg, model = build_tiny("glm4_moe", 0, 4)
    stage = Stage(model, 0, 1)
    coord = Coordinator(stage)
    gens = [2, 6, 4]  # A finishes first, then C, then B: all three in flight together
    counts = [0] * len(gens)
    snapshots = []  # (sequence that got a token, sequences with caches, expected, stats)

    def on_token(k):
        def hook(_token):
            counts[k] += 1
            # A sequence that has all its tokens leaves its micro-batch at the batch's
            # next step, which is sent before the host reads this step's tokens: one
            # whose last token came earlier must already be gone.
            expected = {i for i in range(len(gens)) if counts[i] < gens[i]} | {k}
            held = {seq - 1 for seq in stage.caches} | {  # ids are 1, 2, 3 in request order
                seq - 1 for seqs, _ in stage.batches.values() for seq in seqs}
            snapshots.append((k, held, expected, coord.collect_stats()[0][LIVE]))
            return False
        return hook

    reqs = [Request([5 + i, 9, 11 + i], g, Sampler(SamplingParams()), on_token=on_token(i))
            for i, g in enumerate(gens)]
    results = coord.generate_many(reqs)
    assert [len(r.tokens) for r in results] == gens
    assert len(snapshots) == sum(gens)
    assert any(len(exp) < len(gens) for _, _, exp, _ in snapshots)  # some finished early
    for k, held, expected, live in snapshots:
        assert held <= expected, f"after a token of sequence {k}: caches of {held}"
        assert live == len(held)
    assert any(len(held) == len(gens) for _, held, _, _ in snapshots)  # all three at once
    assert stage.caches == {} and stage.batches == {}
    assert coord.collect_stats()[0][LIVE] == 0


def test_every_stage_frees_a_finished_sequence():
    # 3 ranks: rank 1 passes the release on, rank 2 (the last) only applies it.
    n, k = 3, 3
    cmd = launch_cmd(n, JOB) + ["--model", "glm4_moe", "--synthetic", "tiny",
                                "--sequences", str(k)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT,
                       stdin=subprocess.DEVNULL, env=dict(os.environ))
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, p.stderr
    out = json.loads(lines[-1])
    assert out["during"] == [1] * n, out  # the count sees a live sequence on every rank
    assert out["after_one"] == [0] * n, out
    assert out["after_many"] == [0] * n, out

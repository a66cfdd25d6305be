"""Chunked prefill and many sequences decoding in micro-batches give the tokens of one
at a time, for every architecture, greedy and with seeded sampling.

Real processes: the job runs each prompt alone (whole-prompt prefill), then all of them
together with small prefill chunks, decoding in micro-batches as they join and finish;
a one-process run is the reference for both. The prompts' lengths (5 to 70) cross
Llama-4's tiny attention chunk (16).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.launcher import ROOT, launch_cmd

JOB = ROOT / "tests/jobs/many_sequences.py"


def run(n, model):
    args = ["--model", model, "--synthetic", "tiny", "--prompt-lens", "37,5,70,12",
            "--chunk", "8"]
    cmd = ([sys.executable, str(JOB)] if n == 1 else
           launch_cmd(n, JOB))
    p = subprocess.run(cmd + args, capture_output=True, text=True, timeout=180, cwd=ROOT,
                       stdin=subprocess.DEVNULL, env=dict(os.environ))
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, p.stderr
    return json.loads(lines[-1])


@pytest.mark.parametrize("model", ["glm4_moe", "llama4", "glm", "openelm", "lille-130m"])
def test_batched_and_chunked_equal_one_at_a_time(model):
    ref = run(1, model)
    assert ref["alone"] == ref["together"]
    assert ref["sampled_alone"] == ref["sampled_together"]
    assert ref["sampled_alone"] != ref["alone"]  # the sampling settings did something
    for n in ((2, 3) if model in ("glm4_moe", "llama4") else (3,)):
        out = run(n, model)
        for key in ref:
            assert out[key] == ref["alone" if "sampled" not in key else "sampled_alone"], \
                f"{n} ranks, {key}"

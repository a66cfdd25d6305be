"""Chunked prefill and many sequences in flight give the tokens of one at a time.

Real processes: the job runs each prompt alone (whole-prompt prefill), then all of them
together with small prefill chunks, and a one-process run is the reference for both.
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


@pytest.mark.parametrize("model", ["glm4_moe", "llama4"])
def test_in_flight_and_chunked_equal_one_at_a_time(model):
    ref = run(1, model)
    assert ref["alone"] == ref["together"]
    for n in (2, 3):
        out = run(n, model)
        assert out["alone"] == ref["alone"], f"{n} ranks, one at a time"
        assert out["together"] == ref["alone"], f"{n} ranks, all in flight"

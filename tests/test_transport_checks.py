"""The transport refuses a hidden state whose width or dtype is not the agreed one.

Real processes (2 ranks under mlx.launch, tests/jobs/transport_check.py): rank 0 sends
one message through Transport.send, rank 1 receives it through Transport.recv. A
matching message arrives intact; a wider one, or one in another dtype, is refused with
an error naming both ranks and both shapes, instead of being misread (or waited for).
"""

import json
import os
import subprocess

import numpy as np
import pytest

from tests.launcher import ROOT, launch_cmd

JOB = ROOT / "tests/jobs/transport_check.py"
WIDTH, LENGTH = 16, 3  # as the job agrees them


def exchange(width: int, dtype: str) -> dict:
    cmd = launch_cmd(2, JOB) + ["--width", str(width), "--dtype", dtype]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                       stdin=subprocess.DEVNULL, env=dict(os.environ))
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, f"rank 1 printed no result:\n{p.stderr}"
    return json.loads(lines[-1])


def test_agreed_width_and_dtype_arrive_intact():
    out = exchange(WIDTH, "float32")
    assert "error" not in out, out
    np.testing.assert_array_equal(out["payload"], np.arange(LENGTH * WIDTH) / 4)


@pytest.mark.parametrize("width,dtype", [(WIDTH + 1, "float32"), (WIDTH, "float16")])
def test_other_width_or_dtype_is_refused_naming_both_ranks(width, dtype):
    out = exchange(width, dtype)
    assert "error" in out, f"a [{width}, {dtype}] message was accepted: {out}"
    msg = out["error"]
    assert "rank 0 (" in msg and "rank 1 (" in msg, msg
    assert f"width {width}, dtype mlx.core.{dtype}" in msg, msg
    assert f"expects width {WIDTH}, dtype mlx.core.float32" in msg, msg

"""A rank compiling for a new batch size is slow, not lost.

mlx's CUDA backend compiles kernels on first use: the first step of a micro-batch of a
new size took over 20 s (the default --timeout) on a fresh H200, and the job ended
naming a rank that was only compiling. The waits on such a step now get the first-use
deadline (--first-timeout). Real processes, two ranks: one of them sleeps before the
first step of each new batch size (PIPELINE_TEST_COMPILE_DELAY, dist_runtime/stage.py),
longer than --timeout; the batched tokens still equal those of one process.
"""

import time

import pytest

from tests.launcher import launch

JOB = "tests/jobs/many_sequences.py"
ARGS = ["--model", "glm4_moe", "--synthetic", "tiny", "--prompt-lens", "9,5,12",
        "--gen", "3", "--chunk", "8"]
DELAY_S = 2.5  # per new batch size (at least 1 and 2 rows), over --timeout 1


def tokens(job) -> dict:
    assert job.summary is not None, job.stderr  # the job's last JSON line
    return job.summary


@pytest.mark.timeout(150)
@pytest.mark.parametrize("slow_rank", [0, 1])  # rank 1 waits on rank 0, and rank 0 on 1
def test_a_rank_compiling_for_a_new_batch_size_is_waited_for(slow_rank):
    ref = tokens(launch(1, ARGS, script=JOB))
    t0 = time.monotonic()
    job = launch(2, [*ARGS, "--timeout", "1", "--first-timeout", "60"], script=JOB,
                 env={"PIPELINE_TEST_COMPILE_DELAY": f"{slow_rank}:{DELAY_S}"})
    took = time.monotonic() - t0
    assert "stopped answering" not in job.stderr, job.stderr
    assert tokens(job) == ref
    assert took > 2 * DELAY_S, f"the delays did not happen ({took:.1f} s)"

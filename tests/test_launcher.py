"""Stopping a job from outside, and its exit status (issue 11, items 5-8).

A job is stopped from the terminal (Ctrl-C: SIGINT to the launcher's process group),
by a signal to the launcher alone (kill -INT, or SIGTERM as `timeout` sends), or by a
signal that reaches a rank before it could block it. In every case every rank stops
within seconds, no process is left, and the text so far and the --json summary reach
the user: on stdout through launch/start.py, and in --json-out's file when a bare
mlx.launch was killed (its ranks then see their launcher gone and stop).
launch/start.py exits with the job's status; mlx.launch exits 0 whatever happens.
"""

import json
import signal
import sys
import time

import pytest

from tests.launcher import ROOT
from tests.live import LiveJob
from tests.test_faults import DECODE, SLOW, THREE, generated

STOP_S = 10.0  # every rank gone within this of the signal
sys.path.insert(0, str(ROOT / "launch"))
from start import WRITE_POLL_S, calm_select, job_status  # noqa: E402


def check_all_stopped(job, exits, status=None):
    """Every rank exited within STOP_S and nothing is left; through launch/start.py,
    every rank said why, rank 0 how far it got, and the launcher exits with `status`."""
    assert set(exits) == {0, 1, 2} and max(exits.values()) <= STOP_S, \
        f"exits {exits}\n{job.report()}"
    rc = job.wait(15)
    assert job.leftovers() == [], "processes left behind"
    if status is not None:
        assert rc == status, f"launch/start.py exited {rc}\n{job.report()}"
        assert "Traceback" not in job.stderr, job.report()
        assert set(job.errors) == {0, 1, 2}, f"a rank's last line is missing:\n{job.report()}"
        assert generated(job) >= 0  # rank 0's last line came through
    return rc


def wait_text(job):
    """Until rank 0 has streamed some text (a load average of 10 makes fixed sleeps
    unreliable)."""
    job.wait_stages(25)
    job.wait_for(lambda: len(job.stdout) > 20, 15, "generated text")


@pytest.mark.timeout(60)
def test_ctrl_c_in_the_terminal_stops_the_job_in_order():
    """SIGINT to the whole process group (Ctrl-C): launch/start.py asks every rank to
    stop; rank 0's summary and every rank's last line come through; status 130."""
    with LiveJob(3, [*THREE, *DECODE, "--json"], start=True, session=True) as job:
        job.wait_stages()
        time.sleep(1.5)  # likely some tokens (--json streams nothing)
        job.signal_group(signal.SIGINT)
        exits = job.wait_exits([0, 1, 2], STOP_S + 5)
        check_all_stopped(job, exits, status=128 + signal.SIGINT)
        summary = job.summary()
        assert summary is not None, f"no summary on stdout:\n{job.report()}"
        assert summary["finish_reason"] == "stopped by SIGINT", summary
        assert len(summary["tokens"]) == generated(job), job.report()
        print("Ctrl-C: exits after", exits)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_launcher_alone_stops_the_job_in_order(sig):
    """kill -INT / kill -TERM (timeout's) to the launcher process only: the ranks do not
    get the signal themselves, and still stop, in order."""
    with LiveJob(3, [*THREE, *DECODE], start=True) as job:
        wait_text(job)
        job.signal_launcher(sig)
        exits = job.wait_exits([0, 1, 2], STOP_S + 5)
        name = signal.Signals(sig).name
        check_all_stopped(job, exits, status=128 + sig)
        assert generated(job) > 0 and len(job.stdout.strip()) > 20, job.report()
        assert all(name in e[0] for e in job.errors.values()), job.report()
        assert f"stopped by {name} (sent to the launcher)" in job.errors[0][0], job.report()
        print(f"{name} to launch/start.py: exits after", exits)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("phase", ["loading", "decoding"])
def test_ranks_stop_when_mlx_launch_is_killed(tmp_path, phase):
    """SIGTERM kills a bare mlx.launch at once. Its ranks see their launcher gone and
    stop (not minutes later: never); rank 0 writes what it had to --json-out."""
    out = tmp_path / "summary.json"
    # --json: rank 0 prints nothing until the end, so it does not meet the closed pipe
    # (streaming ranks died of EPIPE even before: --json and loading ones ran on).
    args = [*THREE, *DECODE, "--json", "--json-out", str(out)]
    with LiveJob(3, args, env=SLOW if phase == "loading" else None) as job:
        if phase == "loading":
            job.wait_loading()
            time.sleep(0.5)
        else:
            job.wait_stages(25)
            time.sleep(3.0)  # some tokens (a fixed wait: --json streams nothing)
        job.signal_launcher(signal.SIGTERM)
        exits = job.wait_exits([0, 1, 2], STOP_S + 5)
        check_all_stopped(job, exits)
        summary = json.loads(out.read_text())
        assert summary["finish_reason"] == "stopped: the launcher is gone", summary
        assert bool(summary["tokens"]) == (phase == "decoding"), summary
        print(f"mlx.launch killed while {phase}: exits after", exits)


@pytest.mark.timeout(60)
def test_a_stop_before_the_rank_can_block_signals_is_still_reported():
    """Each rank gets SIGTERM before Python starts. Under launch/start.py the signal is
    blocked from the start (inherited) and waits for the rank's signal thread: every
    rank says why it stops (a bare mlx.launch: killed by the signal, without a word).
    Each waits a second for news before it reports the signal; a rank whose start
    fails first because the others stopped says that instead."""
    env = {"PIPELINE_TEST_PYTHON": sys.executable}
    with LiveJob(3, THREE, start=True, env=env,
                 script=ROOT / "tests/jobs/signalled_at_start.sh") as job:
        rc = job.wait(40)
        codes = job.exit_codes
        assert set(job.errors) == {0, 1, 2}, f"a rank said nothing:\n{job.report()}"
        for r, errors in job.errors.items():
            assert codes[r] != 143 or "stopped by SIGTERM" in errors[0], job.report()
        assert list(codes.values()).count(143) >= 1, codes  # at least the first to stop
        assert all(c in (2, 3, 143) for c in codes.values()), codes  # not -15: a line
        assert rc == job_status(codes) != 0
        assert job.leftovers() == []


@pytest.mark.timeout(60)
def test_start_exits_with_the_job_status():
    """A bad argument on every rank: status 2 (mlx.launch would exit 0)."""
    with LiveJob(3, [*THREE, "--max-tokens", "-5"], start=True) as job:
        assert job.wait(40) == 2, job.report()
        assert "exit status 2" in job.stderr


def test_job_status_prefers_the_rank_at_fault():
    assert job_status({0: 0, 1: 0, 2: 0}) == 0
    assert job_status({0: 3, 1: -9, 2: 3}) == 137  # killed: the cause
    assert job_status({0: 3, 1: 2, 2: 143}) == 2  # its own error before a stop
    assert job_status({0: 130, 1: 3, 2: 3}) == 130  # Ctrl-C on rank 0
    assert job_status({0: 3, 1: "killed", 2: 3}) == 143
    assert job_status({0: 3, 1: 3}) == 3


def test_the_launchers_output_loop_waits_instead_of_spinning():
    """mlx.launch's per-rank loop selects on the rank's stdin pipe, always writable, so
    plain select() returns at once and the loop spins; calm_select must wait for output
    (or WRITE_POLL_S) first, still report the pipe writable, and return at once when
    there is output to read."""
    import os
    import select as select_module

    r, w = os.pipe()
    r2, w2 = os.pipe()
    calm = calm_select(select_module.select)
    try:
        t0 = time.perf_counter()
        spins = 0
        while time.perf_counter() - t0 < 0.5:
            readable, writable, _ = calm([r], [w2], [], 1.0)
            assert readable == [] and writable == [w2]
            spins += 1
        assert spins <= 0.5 / WRITE_POLL_S + 2, spins  # plain select(): many thousands
        plain = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.05:
            select_module.select([r], [w2], [], 1.0)
            plain += 1
        assert plain > spins, (plain, spins)  # in a tenth of the time: what the patch is for
        os.write(w, b"x")
        t0 = time.perf_counter()
        readable, writable, _ = calm([r], [w2], [], 1.0)
        assert readable == [r] and writable == [w2]
        assert time.perf_counter() - t0 < WRITE_POLL_S / 2
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)

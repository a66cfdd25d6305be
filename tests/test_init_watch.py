"""A rank waiting in mx.distributed.init for neighbours that never come still ends.

mlx holds the GIL in that wait, so the rank's own threads cannot act; the child watcher
(dist_runtime/init_watch.py) does. Real processes: one rank of a two-rank ring started
alone (its neighbour never comes), against --start-timeout, and against its launcher
going away (its parent exits). A rank whose ring port another program holds ends at
once, saying what to do.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from tests.launcher import ROOT, free_port_block
from tests.live import alive

START = "for every rank to start and connect"


def lone_rank_env(tmp_path, port: int = 0, rank: int = 1) -> dict:
    """Rank `rank` of a two-rank ring on this host (on `port` and the next, or free
    ones) whose other rank never starts."""
    port = port or free_port_block()
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(f'[["127.0.0.1:{port}"], ["127.0.0.1:{port + 1}"]]')
    return dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))


def run_args(start_timeout: int) -> list:
    return [sys.executable, str(ROOT / "launch/run.py"), "--model", "glm4_moe",
            "--synthetic", "tiny", "--prompt", "hi", "--start-timeout", str(start_timeout)]


def test_a_rank_whose_neighbour_never_comes_ends_at_its_start_timeout(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run(run_args(3), env=lone_rank_env(tmp_path), capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 20, p.stderr
    assert "[rank 1 (" in p.stderr and f"waited 3 s {START}" in p.stderr, p.stderr


def test_a_rank_whose_ring_port_is_held_says_so_and_how_to_pick_another(tmp_path):
    port = free_port_block()
    env = lone_rank_env(tmp_path, port, rank=0)  # in mlx's ring rank 0 binds, 1 connects
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))  # rank 0's ring port
        holder.listen()
        p = subprocess.run(run_args(30), env=env, capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert "[rank 0 (" in p.stderr and "Couldn't bind socket (error: 98)" in p.stderr
    assert "error 98/48 means the port is in use" in p.stderr, p.stderr
    assert "start this one with a --starting-port PORT below that range" in p.stderr


def gone_after_its_launcher(tmp_path, stderr: str) -> bool:
    """Start a lone rank from a "launcher" (bash) that says its pid and exits a second
    later, the rank's stderr redirected by `stderr`; whether the rank is gone within
    15 s (killed here otherwise)."""
    cmd = " ".join(f"'{a}'" for a in run_args(120))
    launcher = subprocess.run(["bash", "-c", f"{cmd} {stderr} & echo $!; sleep 1"],
                              env=lone_rank_env(tmp_path), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL, cwd=ROOT)
    pid = int(launcher.stdout.split()[0])
    deadline = time.monotonic() + 15
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = not alive(pid)
    if not gone:
        os.kill(pid, 9)
    return gone


def test_a_rank_waiting_for_its_neighbours_ends_when_its_launcher_goes(tmp_path):
    gone = gone_after_its_launcher(tmp_path, f"2>{tmp_path}/err")
    err = (tmp_path / "err").read_text()
    assert gone, f"the rank outlived its launcher by 14 s:\n{err}"
    assert "its launcher is gone" in err and START in err, err


def test_a_watcher_ends_the_moment_its_rank_is_killed(tmp_path):
    """SIGKILL to a rank waiting in init: its watcher sees the pipe close and ends at
    once, even while the rank is a zombie nobody has reaped yet (a watcher polling the
    pid would still see it and wait out the 120 s)."""
    rank = subprocess.Popen(run_args(120), env=lone_rank_env(tmp_path), cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        watcher = None
        deadline = time.monotonic() + 30
        while watcher is None and time.monotonic() < deadline:
            time.sleep(0.1)
            watcher = next((c for c in psutil.Process(rank.pid).children()
                            if "dist_runtime.init_watch" in " ".join(c.cmdline())), None)
        assert watcher is not None, "the rank started no watcher within 30 s"
        os.kill(rank.pid, signal.SIGKILL)  # not reaped: a zombie until rank.wait()
        try:
            watcher.wait(2)
        except psutil.TimeoutExpired:
            watcher.kill()
            raise AssertionError("the watcher outlived its killed rank by 2 s")
    finally:
        rank.kill()
        rank.wait()


def test_a_rank_ends_when_its_launcher_goes_with_the_pipe_it_read_stderr_from(tmp_path):
    """As when mlx.launch is killed: the rank's stderr is a pipe whose reader is gone,
    so the watcher's error line cannot be written; it still ends the rank (it used to
    die of the broken pipe first, leaving the rank waiting in init for good)."""
    assert gone_after_its_launcher(tmp_path, "2> >(sleep 1)"), \
        "the rank outlived its launcher and its stderr's reader by 14 s"


def test_ctrl_c_ends_a_rank_waiting_for_its_neighbours(tmp_path):
    """SIGINT to the process group (Ctrl-C in the terminal) while a rank waits in init:
    the rank cannot act on it there, its watcher (in the same group) does, and says so."""
    rank = subprocess.Popen(run_args(120), env=lone_rank_env(tmp_path), cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                "dist_runtime.init_watch" in " ".join(c.cmdline())
                for c in psutil.Process(rank.pid).children()):
            time.sleep(0.1)
        time.sleep(0.5)  # the watcher has set its signal handlers
        os.killpg(rank.pid, signal.SIGINT)
        _, err = rank.communicate(timeout=15)
    finally:
        rank.kill()
        rank.wait()
    assert f"stopped by SIGINT while it waited {START}" in err, err

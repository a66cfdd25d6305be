"""Running real multi-process jobs with mlx.launch, and reading what each rank said."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A rank's message; searched, not matched per line: under MPI's raw output two ranks'
# lines can run together.
RANK_LINE = re.compile(r"\[rank (\d+) \(([^)]*)\)\] (stage|finished|error):? ?(.*?)"
                       r"(?=\[rank \d+ \(|\n|$)")
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


@dataclass
class Job:
    """A finished job: the summary JSON (rank 0), and per-rank stage/finish/error lines."""

    stdout: str
    stderr: str
    summary: dict = None
    stages: dict = field(default_factory=dict)  # rank -> stage info
    finished: set = field(default_factory=set)
    errors: dict = field(default_factory=dict)  # rank -> message

    def __post_init__(self):
        for line in self.stdout.splitlines()[::-1]:
            if line.startswith("{"):
                self.summary = json.loads(line)
                break
        for m in RANK_LINE.finditer(self.stderr):
            rank, kind, rest = int(m.group(1)), m.group(3), m.group(4).strip()
            if kind == "stage":
                self.stages[rank] = json.loads(rest)
            elif kind == "finished":
                self.finished.add(rank)
            elif kind == "error":
                self.errors[rank] = rest


def hostfile_tool(*args, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    """launch/hostfile.py with these arguments, as a user runs it (text output kept)."""
    return subprocess.run([sys.executable, str(ROOT / "launch/hostfile.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


PORT_BLOCK = 16  # ports a job may use from its first: one per rank, and tests' offsets
_handed_out: set = set()  # blocks given to this test process's jobs so far


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to outgoing connections: Linux's from /proc,
    else 32768 (Linux's default, and below macOS's range, which starts at 49152)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port still held in TIME_WAIT counts as taken, as it does for
    # a listener that does not set it either.
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block() -> int:
    """The first of PORT_BLOCK free ports for one job's ring (and liveness channel).

    Drawn below the kernel's ephemeral range: every connection any program opens takes a
    random port from that range, so a block drawn inside it is sometimes held already
    (bind error 98), which made CI fail. Each port is also tried, and a block is never
    handed out twice in one test run."""
    # A kernel whose range starts low leaves few ports below it: then draw from a
    # thousand blocks anyway, relying on the bind test alone.
    top = max(_ephemeral_floor(), 10000 + 1000 * PORT_BLOCK) - PORT_BLOCK
    for _ in range(200):
        first = random.randrange(10000, top, PORT_BLOCK)
        if first not in _handed_out and all(map(_bindable, range(first, first + PORT_BLOCK))):
            _handed_out.add(first)
            return first
    raise RuntimeError(f"no {PORT_BLOCK} free ports in a row between 10000 and {top}")


def launch_cmd(n: int, script, backend: str = "ring") -> list:
    """mlx.launch's command line for n local ranks of `script`, on ports of its own."""
    hostfile = ROOT / "hostfiles" / (f"localhost-mpi-{n}.json" if backend == "mpi"
                                     else f"localhost-{n}.json")
    port = free_port_block()
    return ["mlx.launch", "--hostfile", str(hostfile), "--starting-port", str(port), str(script)]


def launch(n: int, args: list, backend: str = "ring", timeout: float = 180, env=None,
           script: str = "launch/run.py") -> Job:
    """`mlx.launch` `script` (launch/run.py unless said) on n local ranks (or plain python
    for n == 1)."""
    full_env = dict(os.environ, **(env or {}))
    if n == 1:
        cmd = [sys.executable, str(ROOT / script), *args]
    else:
        cmd = [*launch_cmd(n, ROOT / script, backend), *args]
        if backend == "mpi":
            full_env.update(MPI_ENV)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=full_env, stdin=subprocess.DEVNULL)
    return Job(p.stdout, p.stderr)

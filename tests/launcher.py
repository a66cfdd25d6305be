"""Running real multi-process jobs with mlx.launch, and reading what each rank said."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A rank's message; searched, not matched per line: under MPI's raw output two ranks'
# lines can run together.
RANK_LINE = re.compile(r"\[rank (\d+) \(([^)]*)\)\] (stage|finished|error):? ?(.*?)"
                       r"(?=\[rank \d+ \(|\n|$)")
PORT_RANGE = (20000, 60000)  # ring ports: a random block per job, so jobs never share them
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


def launch_cmd(n: int, script, backend: str = "ring") -> list:
    """mlx.launch's command line for n local ranks of `script`, on ports of its own."""
    hostfile = ROOT / "hostfiles" / (f"localhost-mpi-{n}.json" if backend == "mpi"
                                     else f"localhost-{n}.json")
    port = random.randrange(*PORT_RANGE, 16)
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

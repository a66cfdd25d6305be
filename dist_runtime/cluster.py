"""Joining a job: the group, and each host's facts gathered on every rank.

Every rank gathers every rank's host facts (name, available memory, versions, and on a
Mac what Metal keeps resident: dist_runtime/metal.py) with one collective, then computes
the plan itself (dist_runtime/planning.py): the plan is a pure function of those facts,
so all ranks agree without another message. The same gather (`gather_json`) carries
the preflight facts and the after-loading status (dist_runtime/preflight.py). Every
collective here can take a Watchdog and a deadline, since a rank that never arrives
would otherwise leave the others waiting forever.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
import psutil

from dist_runtime import metal
from dist_runtime.errors import StartError
from dist_runtime.hostfiles import ring_address_list
from dist_runtime.init_watch import watched
from dist_runtime.lifecycle import env_rank

INFO_BYTES = 1024  # room for one rank's JSON facts in the gather
START_WAIT = ("every rank to start and connect (a host may still be starting, may have "
              "failed to start: look for its error above, or may be unreachable at the "
              "address in the hostfile)")


@dataclass
class HostInfo:
    """One rank's facts, as gathered at start."""

    rank: int
    host: str
    available: int
    mlx: str
    project: str
    python: str
    # On Metal (dist_runtime/metal.py); the defaults mean "not a Metal rank".
    metal: bool = False
    memory: int = 0  # bytes of RAM
    working_set: int = 0  # bytes Metal keeps resident (its recommended working set)
    wired_limit_mb: int = -1  # iogpu.wired_limit_mb: 0 the macOS default, -1 unknown
    device: str = ""  # what it computes on: "metal", "cuda:<visible devices>", "cpu:<rank>"

    @property
    def name(self) -> str:
        """'rank r (host)', how messages name a rank."""
        return f"rank {self.rank} ({self.host})"


def local_info(rank: int) -> HostInfo:
    """This process's facts."""
    m = metal.device_facts()
    return HostInfo(rank, socket.gethostname(), available_memory(), mx.__version__,
                    project_version(), sys.version.split()[0], m.metal, m.memory,
                    m.working_set, m.wired_limit_mb, compute_device(rank, m.metal))


def compute_device(rank: int, is_metal: bool) -> str:
    """The device this rank computes on, named so that ranks sharing one have equal names
    on one host. CPU ranks never count as sharing (each gets cores of its own)."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return f"cpu:{rank}"
    if is_metal:
        return "metal"
    return "cuda:" + os.environ.get("CUDA_VISIBLE_DEVICES", "0")


def distinct_devices(infos: list) -> int:
    """How many devices the ranks compute on: ranks of one host on one GPU count once
    (the GPU runs their work one after the other, so overlapping them gains nothing)."""
    return len({(i.host, i.device or f"rank:{i.rank}") for i in infos})


def project_version() -> str:
    """This project's version, as pyproject.toml states it (read from the checkout, which
    is what runs: an installed copy's metadata may be older)."""
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:  # tomllib is Python 3.11+; the one line we need is simple enough to find
        found = re.search(r'^version\s*=\s*"([^"]+)"', path.read_text(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


def available_memory() -> int:
    """Bytes this rank can plan to use: GPU memory on CUDA, else available RAM."""
    if mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available():
        info = mx.device_info()
        return int(info.get("memory_size", psutil.virtual_memory().available))
    return int(psutil.virtual_memory().available)


def ring_addresses() -> Optional[list]:
    """The ring backend's per-rank 'ip:port' lists (MLX_HOSTFILE), or None."""
    return ring_address_list()


def init_group(me: str = "", timeout: Optional[float] = None):
    """The world group (size 1 when not started by mlx.launch), within `timeout` s.

    mx.distributed.init blocks until the neighbours connect, holding the GIL, so no
    thread of this process can keep its deadline: with `timeout` (and a launcher's rank
    set), a child process does (dist_runtime/init_watch.py), and a rank whose neighbour
    never comes, or whose launcher goes away, says so (`me` names it) and ends instead
    of waiting forever.
    """
    watch = watched(me, timeout, START_WAIT) if timeout and env_rank() is not None \
        else nullcontext()
    try:
        with watch:
            return mx.distributed.init()
    except RuntimeError as e:
        rank = os.environ.get("MLX_RANK", "?")
        addrs = ring_addresses()
        hint = ""
        if addrs and str(rank).isdigit():
            r = int(rank)
            nxt = (r + 1) % len(addrs)
            hint = (f"; rank {r} listens on {', '.join(addrs[r])} and connects to rank {nxt} "
                    f"at {', '.join(addrs[nxt])}: check that these IPs belong to the hosts "
                    f"(python launch/hostfile.py check HOSTFILE), that rank {nxt} started, "
                    f"and that no firewall blocks the ports")
        if "error: 98)" in str(e) or "error: 48)" in str(e):  # EADDRINUSE (Linux, macOS)
            hint += ("; error 98/48 means the port is in use: another job (or its liveness "
                     "channel) may hold it, or an outgoing connection if the port lies in the "
                     "system's ephemeral range (Linux from 32768, macOS from 49152): start "
                     "this one with a --starting-port PORT below that range that no job uses")
        raise StartError(f"could not join the group: {e}{hint}") from e


def gather_json(group, obj, nbytes: int = INFO_BYTES, guard=None,
                timeout: Optional[float] = None, what: str = "", kind: str = "") -> list:
    """Every rank's JSON-able dict `obj`, in rank order (one all_sum of [ranks, nbytes]).

    A value longer than nbytes is an error here, not a corrupt row elsewhere. `kind`
    tags the rows: a row that does not parse or has another tag comes from a rank that
    is not at the same step of the same job (another job on the same ports), and is a
    StartError naming that rank, never a crash.
    """
    if group.size() == 1:
        return [obj]
    obj = dict(obj, _kind=kind)
    raw = json.dumps(obj).encode()
    if len(raw) > nbytes:
        raise ValueError(f"gathered facts are {len(raw)} bytes, over the {nbytes} reserved")
    buf = np.zeros((group.size(), nbytes), np.int32)
    buf[group.rank(), : len(raw)] = np.frombuffer(raw, np.uint8)
    total = mx.distributed.all_sum(mx.array(buf), group=group, stream=mx.cpu)
    if guard is not None and timeout:
        guard.arm(timeout, f"waited {timeout:.0f} s for {what or START_WAIT}; "
                           f"see --load-timeout")
    try:
        mx.eval(total)
    except RuntimeError as e:
        raise StartError(f"lost the connection to another rank while waiting for "
                         f"{what or 'every rank to start'} ({e}): it died or its host became "
                         f"unreachable; look above for its error") from e
    out = []
    for r, row in enumerate(np.array(total)):
        try:
            d = json.loads(bytes(row.astype(np.uint8)).rstrip(b"\0").decode())
            ok = isinstance(d, dict) and d.pop("_kind", None) == kind
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise StartError(
                f"rank {r} sent something else than its {kind or 'facts'} at start: it is not "
                f"part of this job at this step (another job using the same ports? start "
                f"one of them with mlx.launch --starting-port PORT) or runs other code")
        out.append(d)
    return out


def gather_infos(group, guard=None, timeout: Optional[float] = None) -> list:
    """Every rank's HostInfo, in rank order."""
    rows = gather_json(group, local_info(group.rank()).__dict__, INFO_BYTES, guard, timeout,
                       kind="host facts")
    return [HostInfo(**r) for r in rows]

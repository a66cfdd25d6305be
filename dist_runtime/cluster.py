"""Starting a job: the group, each host's facts, the plan, and this rank's stage.

Every rank gathers every rank's host facts (name, available memory, versions) with one
collective, then computes the plan itself: the partition is a pure function of those
facts, so all ranks agree without another message.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
import psutil

from dist_runtime import costs as costs_mod
from dist_runtime.partition import Plan, plan_layers

INFO_BYTES = 1024  # room for one rank's JSON facts in the gather
MEMORY_FRACTION = 0.85  # of available memory a rank may plan to fill (OS, activations)
PROJECT_VERSION = "0.1.0"


@dataclass
class HostInfo:
    """One rank's facts, as gathered at start."""

    rank: int
    host: str
    available: int
    mlx: str
    project: str
    python: str

    @property
    def name(self) -> str:
        """'rank r (host)', how messages name a rank."""
        return f"rank {self.rank} ({self.host})"


def local_info(rank: int) -> HostInfo:
    """This process's facts."""
    return HostInfo(rank, socket.gethostname(), available_memory(), mx.__version__,
                    PROJECT_VERSION, sys.version.split()[0])


def available_memory() -> int:
    """Bytes this rank can plan to use: GPU memory on CUDA, else available RAM."""
    if mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available():
        info = mx.device_info()
        return int(info.get("memory_size", psutil.virtual_memory().available))
    return int(psutil.virtual_memory().available)


def init_group():
    """The world group (size 1 when not started by mlx.launch)."""
    return mx.distributed.init()


def gather_infos(group) -> list:
    """Every rank's HostInfo, in rank order (one all_sum of a [ranks, INFO_BYTES] array)."""
    me = local_info(group.rank())
    if group.size() == 1:
        return [me]
    raw = json.dumps(me.__dict__).encode()[:INFO_BYTES]
    buf = np.zeros((group.size(), INFO_BYTES), np.int32)
    buf[group.rank(), : len(raw)] = np.frombuffer(raw, np.uint8)
    total = mx.distributed.all_sum(mx.array(buf), group=group, stream=mx.cpu)
    rows = np.array(total).astype(np.uint8)
    return [HostInfo(**json.loads(bytes(r).rstrip(b"\0").decode())) for r in rows]


def make_plan(costs, infos: list, max_kv_tokens: int, split: Optional[list]) -> Plan:
    """The partition for these hosts (see dist_runtime/partition.py)."""
    kv = [k * max_kv_tokens for k in costs.kv_per_token]
    budgets = [int(i.available * MEMORY_FRACTION) for i in infos]
    return plan_layers(costs.weight, costs.active, budgets, head_bytes=costs.head,
                       kv_bytes=kv, split=split, hosts=[i.host for i in infos])

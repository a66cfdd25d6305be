"""Apple silicon's GPU memory: what Metal keeps resident, and wiring a stage's weights there.

On a Mac the GPU shares the RAM, but Metal keeps resident at most its *recommended working
set* (`max_recommended_working_set_size` in `mx.device_info()`): about three quarters of
the RAM by default on the large Macs, raised for the whole system with
`sudo sysctl iogpu.wired_limit_mb=N` (0 is the macOS default). A stage whose weights do not
stay resident pages and decodes many times slower. This module

- reads a rank's Metal facts (`device_facts`), which travel in its HostInfo to every rank
  so the plan (dist_runtime/planning.py) budgets with every host's numbers;
- wires a stage's weights and KV room for the job's lifetime (`Wiring`: mlx's
  `set_wired_limit`, which sizes this process's residency set) and gives the previous
  limit back on every exit.

On Linux (CPU or CUDA) and on a Mac running mlx on its CPU it reads nothing and wires
nothing. `device_info` and `read_sysctl` are the seams where tests stand in a Mac's facts.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from dist_runtime.planning import WIRED_LIMIT_SYSCTL

SYSCTL_TIMEOUT = 5  # s: a wedged sysctl must not wedge the start


@dataclass
class MetalFacts:
    """What Metal lets this rank keep resident (all zero off Metal)."""

    metal: bool = False
    memory: int = 0  # bytes of RAM (`memory_size`)
    working_set: int = 0  # bytes Metal keeps resident (`max_recommended_working_set_size`)
    wired_limit_mb: int = -1  # iogpu.wired_limit_mb: 0 the macOS default, -1 unknown


def device_info() -> Optional[dict]:
    """`mx.device_info()` when this process computes on Metal's GPU, else None (the seam)."""
    if not mx.metal.is_available() or mx.default_device() != mx.gpu:
        return None
    return dict(mx.device_info())


def read_sysctl(name: str) -> str:
    """`sysctl -n name`, or '' where there is none (the seam; only called on a Mac)."""
    try:
        p = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                           timeout=SYSCTL_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout.strip() if p.returncode == 0 else ""


def device_facts() -> MetalFacts:
    """This rank's Metal facts: RAM, the working set Metal keeps resident, the sysctl."""
    info = device_info()
    if not info or not info.get("max_recommended_working_set_size"):
        return MetalFacts()
    mb = read_sysctl(WIRED_LIMIT_SYSCTL)
    return MetalFacts(True, int(info.get("memory_size", 0)),
                      int(info["max_recommended_working_set_size"]),
                      int(mb) if mb.isdigit() else -1)


class Wiring:
    """This process's wired limit set to `nbytes` until `release` gives the previous one back.

    mlx keeps buffers resident up to the limit in the order they come; so the cache of
    loading's transient buffers is cleared first, and the weights (already in memory)
    take the room, then the KV caches as they grow. `release` is idempotent and safe from
    any thread (the normal return, atexit, and the error exit may all call it).
    """

    def __init__(self, nbytes: int, set_limit: Optional[Callable[[int], int]] = None):
        self.nbytes = nbytes
        self._set = set_limit or mx.set_wired_limit
        self._previous: Optional[int] = None
        self._lock = threading.Lock()

    @property
    def wired(self) -> bool:
        """Whether the limit is raised now."""
        return self._previous is not None

    def wire(self) -> "Wiring":
        mx.clear_cache()
        previous = self._set(self.nbytes)
        with self._lock:
            self._previous = int(previous)
        return self

    def release(self, synchronize: bool = True):
        """Give the previous limit back (once). `synchronize` waits for queued work first,
        as the residency set should not shrink under running kernels; the error exit
        skips it (a stream may wait on a lost rank, and the process ends right after)."""
        with self._lock:
            previous, self._previous = self._previous, None
        if previous is None:
            return
        if synchronize:
            mx.synchronize()
        self._set(previous)


def wire_stage(nbytes: Optional[int], life, me: str = "",
               set_limit: Optional[Callable[[int], int]] = None) -> Optional[Wiring]:
    """Wire `nbytes` (planning.wired_limit: None off Metal, then nothing happens) for the
    job's lifetime; the limit is given back on the error exit (`life.cleanups`), at
    interpreter exit, and by `Job.close`. A refusal by mlx is a warning, not an error: the
    job still runs, only maybe slower."""
    if nbytes is None:
        return None
    wiring = Wiring(nbytes, set_limit)
    try:
        wiring.wire()
    except (RuntimeError, ValueError) as e:
        print(f"[{me}] warning: could not keep its {nbytes / 1e9:.2f} GB of weights and KV "
              f"room resident (mx.set_wired_limit: {e}); it may page and run slower",
              file=sys.stderr, flush=True)
        return None
    life.cleanups.append(lambda: wiring.release(synchronize=False))
    atexit.register(wiring.release)
    return wiring

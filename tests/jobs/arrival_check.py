#!/usr/bin/env python3
"""Test job (2 or 3 ranks under mlx.launch): does a rank waiting for its neighbour sleep?

A message goes once round the ring per mode; each rank sleeps SLEEP_S before it passes
it on, so every rank waits at least that long. Mode "watched" waits for the bytes with
dist_runtime/arrival.py before posting mlx's receive, as the transport does; mode
"plain" posts the receive at once, as mlx alone would. Each rank prints one JSON line:
the neighbours it watches ("neighbours") and, per mode, the wall and CPU seconds of its wait (CPU of
the whole process, mlx's socket threads included) and whether the values arrived intact.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx  # noqa: E402

from dist_runtime.arrival import Arrivals  # noqa: E402

SLEEP_S = 1.0
N = 4096  # float32 values: more than one of mlx's 1024-byte segments


def main():
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    arrivals = Arrivals.find(rank, size)
    prev, nxt = (rank - 1) % size, (rank + 1) % size
    values = mx.arange(N, dtype=mx.float32)
    out = {"rank": rank, "neighbours": arrivals.watched}
    for mode in ("watched", "plain"):
        # Every rank starts the round together (a rank that finished starting later
        # would otherwise wait less than SLEEP_S).
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))
        if rank == 0:
            time.sleep(SLEEP_S)
            mx.eval(mx.distributed.send(values, nxt, group=group))
        wall, cpu = time.perf_counter(), time.process_time()
        got = mx.distributed.recv((N,), mx.float32, prev, group=group)
        if mode == "watched":
            arrivals.wait(prev, 30.0)
        mx.eval(got)
        out[mode] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                     "intact": bool(mx.array_equal(got, values).item())}
        if rank != 0:
            time.sleep(SLEEP_S)
            mx.eval(mx.distributed.send(got, nxt, group=group))
    print(json.dumps(out), flush=True)
    arrivals.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Can GPU work be queued on a CPU-stream result that is not computed yet?

A stage that queued its layers before its input arrived (issue 9's "no host stall")
needs `mx.async_eval` to return at once for GPU work whose input comes from the CPU
stream, where mlx's `recv` runs. This probe stands a CPU-stream chain of matmuls (a few
seconds) in for a receive still waiting, and times the `async_eval` call itself, not the
work. On one H200 with mlx 0.32.4's CUDA backend, the call returned only once the chain
had finished (README, Benchmarks), so a stage cannot queue ahead of its input there.

    python3 launch/queue_probe.py [--seconds 3]
"""

import argparse
import json
import time

import mlx.core as mx

SIDE = 2048  # the CPU chain's matrices: SIDE x SIDE float32


def cpu_chain(seconds: float) -> tuple:
    """(an unevaluated CPU-stream result that takes about `seconds`, that estimate)."""
    a = mx.random.normal((SIDE, SIDE), stream=mx.cpu)
    mx.eval(a)
    t = time.perf_counter()
    mx.eval(mx.matmul(a, a, stream=mx.cpu))
    one = max(time.perf_counter() - t, 1e-3)
    n = max(1, int(seconds / one))
    x = a
    for _ in range(n):
        x = mx.matmul(x, a, stream=mx.cpu) * (1.0 / SIDE)
    return x, n * one


def probe(seconds: float) -> dict:
    """Time `async_eval` of one kernel on the default device over a pending CPU result."""
    mx.eval(mx.exp(mx.ones((8, 8))))  # the device and the kernel are ready before timing
    pending, expected = cpu_chain(seconds)
    t0 = time.perf_counter()
    out = mx.exp(pending[:8, :8])
    mx.async_eval(out)
    queued = time.perf_counter() - t0
    mx.eval(out)
    done = time.perf_counter() - t0
    return {"device": str(mx.default_device()), "mlx": mx.__version__,
            "cpu_chain_s": round(expected, 3), "async_eval_s": round(queued, 3),
            "done_s": round(done, 3), "queued_without_waiting": queued < 0.25 * done}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3.0,
                   help="about how long the CPU-stream chain takes")
    print(json.dumps(probe(p.parse_args(argv).seconds)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measure one hop of the ring: what a header and a hidden state cost to send.

    mlx.launch --hostfile hostfiles/localhost-2.json launch/pingpong.py --width 4096

Rank 0 sends to rank 1 and rank 1 sends back, N times, for a decode step's payload
([1, 1, width]) and a prefill chunk's ([1, 512, width]), each with and without the
separate int32 header message the transport sends first. Prints milliseconds per hop
(half a round trip) on rank 0. It is how the benchmark's README says what limits a
decode step (messages vs compute).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_runtime.devices import pin_gpu  # noqa: E402

pin_gpu()  # before mlx starts CUDA: one GPU per rank

import mlx.core as mx  # noqa: E402

HEADER_WORDS = 8  # as dist_runtime/transport.py's header


def hop_ms(group, shape, dtype, header: bool, n: int) -> float:
    """Milliseconds per hop, averaged over n round trips (after one warm-up)."""
    rank, other = group.rank(), 1 - group.rank()
    x = mx.ones(shape, dtype)
    hdr = mx.zeros((HEADER_WORDS,), mx.int32)
    mx.eval(x, hdr)

    def send():
        if header:
            mx.eval(mx.distributed.send(hdr, other, group=group))
        mx.eval(mx.distributed.send(x, other, group=group))

    def recv():
        if header:
            h = mx.distributed.recv((HEADER_WORDS,), mx.int32, other, group=group)
            h.tolist()  # the transport reads the header on the host
        mx.eval(mx.distributed.recv(shape, dtype, other, group=group))

    for i in range(n + 1):
        if i == 1:
            t0 = time.perf_counter()
        if rank == 0:
            send()
            recv()
        else:
            recv()
            send()
    return (time.perf_counter() - t0) / n / 2 * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args()
    group = mx.distributed.init()
    if group.size() != 2:
        sys.exit("pingpong.py needs exactly 2 ranks")
    for length in (1, 512):
        for header in (False, True):
            ms = hop_ms(group, (1, length, args.width), mx.bfloat16, header,
                        args.n if length == 1 else max(args.n // 10, 5))
            if group.rank() == 0:
                print(f"payload [1, {length}, {args.width}] bf16, header message: "
                      f"{'yes' if header else 'no '}: {ms:.3f} ms per hop", flush=True)


if __name__ == "__main__":
    main()

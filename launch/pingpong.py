#!/usr/bin/env python3
"""Measure one hop of the ring: what a header and a hidden state cost to send.

    mlx.launch --hostfile hostfiles/localhost-2.json launch/pingpong.py --width 4096

Rank 0 sends to rank 1 and rank 1 sends back, N times, for a decode step's payload
([1, 1, width]) and a prefill chunk's ([1, 512, width]), each with and without the
separate int32 header message the transport sends first. Prints milliseconds per hop
(half a round trip) on rank 0. It is how the benchmark's README says what limits a
decode step (messages vs compute).

    mlx.launch --hostfile hostfiles/localhost-2.json launch/pingpong.py --work 200,1000

With --work K,...: what two ranks sharing one GPU cost beyond their work. Per K, rank 0
first runs 2K small kernels per round alone (rank 1 idle), then the two ranks take
turns: K kernels, a decode step's message to the other, K kernels there, back. The
difference per round is the price of handing the GPU from one process to the other
twice (two hops included), at that much work: the figure a two-ranks-on-one-GPU
benchmark must subtract before it says what the pipeline itself costs. Then the same
turns chained: each rank queues receive, kernels and send (`mx.async_eval`) and waits
only for the round before. On mlx's CUDA backend the async_eval of kernels whose
receive is still pending returns only once it has arrived (launch/queue_probe.py), so
there a round is not queued ahead of its data; what chaining saves is the host's waits
between a rank's kernels, its send and its next receive.
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


def work_ms(group, kernels: int, n: int, width: int, weights_gb: float) -> tuple:
    """(ms per round with rank 0 running 2*kernels alone, ms per round with the ranks
    taking turns at `kernels` each and a [16, 1, width] bf16 message each way, the same
    chained: each round queued whole before the last one is waited for). The
    kernels read `weights_gb` of distinct weights per rank in turn (rank 0 alone: twice
    as much, both ranks' share), as a stage reads its layers; 0: one small weight."""
    rank, other = group.rank(), 1 - group.rank()
    count = max(1, int(weights_gb * 1e9 / (width * width * 2)))

    def weights(m):
        ws = [(mx.random.normal((width, width)) / width ** 0.5).astype(mx.bfloat16)
              for _ in range(m)]
        mx.eval(ws)
        return ws

    mine = weights(count)
    x = mx.random.normal((16, 1, width)).astype(mx.bfloat16)
    mx.eval(x)

    def run(h, k, ws):
        for i in range(k):
            h = h @ ws[i % len(ws)]  # a decode step is many such small kernels
        return h

    alone = None
    if rank == 0:
        both = mine + weights(count) if weights_gb else mine
        mx.eval(run(x, 2 * kernels, both))  # warm-up
        t0 = time.perf_counter()
        for _ in range(n):
            mx.eval(run(x, 2 * kernels, both))
        alone = (time.perf_counter() - t0) / n * 1e3
        del both
    for i in range(n + 1):  # the first round, not timed, is also rank 1's warm-up
        if i == 1:
            t0 = time.perf_counter()
        if rank == 0:
            mx.eval(mx.distributed.send(run(x, kernels, mine), other, group=group))
            mx.eval(mx.distributed.recv(x.shape, x.dtype, other, group=group))
        else:
            h = mx.distributed.recv(x.shape, x.dtype, other, group=group)
            mx.eval(h)
            mx.eval(mx.distributed.send(run(h, kernels, mine), other, group=group))
    turns = (time.perf_counter() - t0) / n * 1e3
    return alone, turns, chained_ms(group, n, x, lambda h: run(h, kernels, mine))


def chained_ms(group, n: int, x: mx.array, run) -> float:
    """Ms per round of the turns with each rank's receive, kernels and send queued as
    one chain (rank 0's next kernels take the lazy answer as input), one round ahead.

    Each message is queued by an async_eval of its own, in the order the ranks pair
    them: within one eval, mlx may run a receive before an independent send (a deadlock
    when the other rank's send waits on that send). A send is evaluated with the kernels
    it sends, so mlx's CUDA backend waits for them on the host (its Fence::wait) once
    they are queued; queued in an async_eval apart from their send, the same rounds
    hung on one H200 (mlx 0.32.4)."""
    rank, other = group.rank(), 1 - group.rank()
    h, last = x, None
    for i in range(n + 2):
        if i == 2:
            t0 = time.perf_counter()
        if rank == 0:
            queued = [mx.distributed.send(run(h), other, group=group),
                      mx.distributed.recv(x.shape, x.dtype, other, group=group)]
            h = queued[1]
        else:
            got = mx.distributed.recv(x.shape, x.dtype, other, group=group)
            queued = [got, mx.distributed.send(run(got), other, group=group)]
        for a in queued:
            mx.async_eval(a)
        if last is not None:
            mx.eval(last)
        last = queued
    mx.eval(last)
    return (time.perf_counter() - t0) / n * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--work", default="",
                   help="comma-separated kernel counts K: the cost of sharing one GPU "
                        "between the two ranks at K kernels per rank and hop")
    p.add_argument("--weights-gb", type=float, default=0.0,
                   help="with --work: GB of distinct weights each rank's kernels read")
    args = p.parse_args()
    group = mx.distributed.init()
    if group.size() != 2:
        sys.exit("pingpong.py needs exactly 2 ranks")
    for k in (int(v) for v in args.work.split(",") if v.strip()):
        alone, turns, chained = work_ms(group, k, max(args.n // 10, 10), args.width,
                                        args.weights_gb)
        if group.rank() == 0:
            print(f"{2 * k} kernels [16, 1, {args.width}] bf16 over "
                  f"{2 * args.weights_gb:g} GB of weights: {alone:.2f} ms in one "
                  f"process, {turns:.2f} ms in two taking turns: {turns - alone:+.2f} ms "
                  f"a round; chained: {chained:.2f} ms ({chained - alone:+.2f})", flush=True)
    for length in (1, 512):
        for header in (False, True):
            ms = hop_ms(group, (1, length, args.width), mx.bfloat16, header,
                        args.n if length == 1 else max(args.n // 10, 5))
            if group.rank() == 0:
                print(f"payload [1, {length}, {args.width}] bf16, header message: "
                      f"{'yes' if header else 'no '}: {ms:.3f} ms per hop", flush=True)


if __name__ == "__main__":
    main()

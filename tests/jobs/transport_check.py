#!/usr/bin/env python3
"""Test job (2 ranks under mlx.launch): a hidden state off the agreed width or dtype.

Both ranks build a Transport agreeing on width WIDTH and float32. Rank 0 sends one
OP_FORWARD whose payload has --width and --dtype (Transport.send describes the payload
as it is, as a rank that loaded another model would). Rank 1 receives it with its own
Transport and prints one JSON line: {"error": message} when recv refused it, else
{"payload": the values it read}. Then rank 1 answers with OP_STOP, so rank 0 exits too.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402

import mlx.core as mx  # noqa: E402

from dist_runtime.cluster import gather_infos, init_group  # noqa: E402
from dist_runtime.faults import Faults, Watchdog  # noqa: E402
from dist_runtime.lifecycle import Lifecycle  # noqa: E402
from dist_runtime.transport import (OP_FORWARD, OP_STOP, Header, Transport,  # noqa: E402
                                    TransportError)

WIDTH = 16
LENGTH = 3
TIMEOUT = 10.0  # s: a receive that waits for bytes that never come ends the job


def payload(width: int, dtype) -> mx.array:
    """The values rank 0 sends: [1, LENGTH, width], exact in every dtype used."""
    return (mx.arange(LENGTH * width, dtype=mx.float32).reshape(1, LENGTH, width) / 4
            ).astype(dtype)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    life = Lifecycle()
    group = init_group()
    infos = gather_infos(group)
    watchdog = Watchdog(on_expire=lambda what: life.exit_with_error(what, 3))
    faults = Faults(group.rank(), group.size(), [i.name for i in infos], watchdog, life,
                    TIMEOUT)
    transport = Transport(group, WIDTH, mx.float32, faults, TIMEOUT, TIMEOUT)
    if group.rank() == 0:
        transport.send(1, Header(OP_FORWARD, seq=1), payload(args.width, getattr(mx, args.dtype)))
        header, _ = transport.recv(1)
        assert header.op == OP_STOP
        return
    try:
        _, h = transport.recv(0)
        out = {"payload": h.astype(mx.float32).reshape(-1).tolist()}
    except TransportError as e:
        out = {"error": str(e)}
    print(json.dumps(out), flush=True)
    transport.send(0, Header(OP_STOP))


if __name__ == "__main__":
    main()

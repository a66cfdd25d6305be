"""Messages between neighbouring ranks: a fixed-size int32 header, then the payload.

The header says what follows (op, sequence id, batch, length, cache offset, flags,
dtype, width), so a receiver always knows the payload's shape before it posts the
receive. Shapes and dtype are agreed once (width and dtype of the hidden state) and
checked on every message: a mismatch is an error naming both ranks, never a hang or a
silently misread buffer.

Every blocking wait goes through `Watchdog`: if it outlasts its deadline, the rank says
which rank it was waiting for and exits non-zero, since mx.distributed has no timeouts.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

HEADER_LEN = 8
OP_FORWARD, OP_RELEASE, OP_STOP, OP_ABORT, OP_STATS = 1, 2, 3, 4, 5
STATS_FIELDS = 2  # per rank in an OP_STATS payload: busy seconds, peak memory GB
FLAG_RETURN = 1  # the last stage sends the last position's hidden state back to rank 0
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
EXIT_PEER_LOST = 3  # exit code of a rank that gave up waiting for another


class TransportError(RuntimeError):
    """A message that does not match what the ranks agreed."""


class PeerLost(RuntimeError):
    """A neighbour's connection broke: it died or its host went away."""


@dataclass
class Header:
    """What a message carries; `length` positions of `batch` sequences at cache `offset`."""

    op: int
    seq: int = 0
    batch: int = 0
    length: int = 0
    offset: int = 0
    flags: int = 0
    dtype: int = 0
    width: int = 0

    def array(self) -> mx.array:
        """As the int32 [HEADER_LEN] array that travels."""
        return mx.array([self.op, self.seq, self.batch, self.length, self.offset, self.flags,
                         self.dtype, self.width], mx.int32)

    @classmethod
    def parse(cls, a) -> "Header":
        """From a received int32 array."""
        return cls(*[int(v) for v in a.tolist()])


class Watchdog:
    """A deadline on blocking waits; on expiry, prints the reason and exits the process."""

    def __init__(self, describe_self: str):
        self.me = describe_self
        self._deadline: Optional[float] = None
        self._what = ""
        self._cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def arm(self, seconds: float, what: str):
        """Start a deadline `seconds` from now for the wait described by `what`."""
        with self._cond:
            self._deadline, self._what = time.monotonic() + seconds, what
            self._cond.notify()

    def disarm(self):
        """The wait finished in time."""
        with self._cond:
            self._deadline = None

    def _run(self):
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                print(f"[{self.me}] error: {self._what}; giving up and exiting",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_PEER_LOST)


class Transport:
    """Header + payload messages over an mx.distributed group, with deadlines."""

    def __init__(self, group, width: int, dtype, names: list, timeout: float, lifecycle=None):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.width, self.dtype = width, dtype
        self.names = names  # "rank r (host)" for messages
        self.timeout = timeout
        self.watchdog = Watchdog(names[self.rank])
        self.lifecycle = lifecycle

    def _wait(self, arr: mx.array, what: str, timeout: Optional[float] = None, peer: int = 0):
        if self.lifecycle is not None:
            before = self.lifecycle.doing
            self.lifecycle.set(f"{before}, waiting on {self.names[peer]}")
        self.watchdog.arm(timeout or self.timeout, what)
        try:
            mx.eval(arr)
        except RuntimeError as e:  # the backend's socket to that rank broke
            raise PeerLost(f"lost the connection to {self.names[peer]} ({e}): it died or "
                           f"its host became unreachable") from e
        finally:
            self.watchdog.disarm()
            if self.lifecycle is not None:
                self.lifecycle.set(before)

    def send(self, dst: int, header: Header, payload: Optional[mx.array] = None):
        """Send the header, then the payload [batch, length, width] if the op has one."""
        if payload is not None and header.op == OP_FORWARD:
            header.dtype = DTYPES.index(payload.dtype)
            header.width = payload.shape[-1]
            header.batch, header.length = payload.shape[0], payload.shape[1]
        what = f"sending to {self.names[dst]} took over {{t}} s"
        self._wait(mx.distributed.send(header.array(), dst, group=self.group),
                   what.format(t=self.timeout), peer=dst)
        if payload is not None:
            self._wait(mx.distributed.send(payload, dst, group=self.group),
                       what.format(t=self.timeout), peer=dst)

    def recv(self, src: int, timeout: Optional[float] = None):
        """(header, payload or None) from rank src."""
        t = timeout or self.timeout
        what = f"no message from {self.names[src]} for {t:.0f} s (it died or hangs)"
        h = mx.distributed.recv((HEADER_LEN,), mx.int32, src, group=self.group)
        self._wait(h, what, t, peer=src)
        header = Header.parse(h)
        if header.op == OP_STATS:
            stats = mx.distributed.recv((self.size, STATS_FIELDS), mx.float32, src,
                                        group=self.group)
            self._wait(stats, what, t, peer=src)
            return header, stats
        if header.op != OP_FORWARD:
            return header, None
        if header.width != self.width or DTYPES[header.dtype] != self.dtype:
            raise TransportError(
                f"{self.names[src]} sent hidden states of width {header.width}, "
                f"dtype {DTYPES[header.dtype]}; {self.names[self.rank]} expects width "
                f"{self.width}, dtype {self.dtype}: the ranks loaded different models")
        payload = mx.distributed.recv((header.batch, header.length, self.width), self.dtype,
                                      src, group=self.group)
        self._wait(payload, what, t, peer=src)
        return header, payload

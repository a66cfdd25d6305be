"""Messages between neighbouring ranks: a fixed-size int32 header, then the payload.

The header says what follows (op, sequence id, batch, length, cache offset, flags,
dtype, width), so a receiver always knows the payload's shape before it posts the
receive. Every field has one meaning for every op. Shapes and dtype are agreed once
(width and dtype of the hidden state) and checked on every message: a mismatch is an
error naming both ranks, never a hang or a silently misread buffer.

`seq` names a sequence or a micro-batch (one id space, dist_runtime/schedule.py).
Payloads by op: FORWARD, a hidden state [batch, length, width] (a prompt chunk of a
sequence, or one position of each row of a micro-batch); GROUP, the micro-batch's
sequence ids [batch] (its rows from now on); STATS, a table [ranks, STATS_FIELDS];
ABORT, a Blame (dist_runtime/faults.py); FORK, the id [1] of the kept sequence whose
first `offset` positions sequence `seq` starts from (prompt reuse); RELEASE (free a
sequence's caches, kept or not), KEEP (keep a finished sequence's caches for reuse)
and STOP, none.
Every blocking wait goes through `Faults.wait`, which holds the deadline and decides
whom to blame when a wait fails; this module only frames. A receive is posted only once
its first bytes are there (dist_runtime/arrival.py: mlx's ring spins while it waits).
"""

from __future__ import annotations

import threading
from dataclasses import astuple, dataclass
from typing import Optional

import mlx.core as mx

from dist_runtime.faults import Blame, Faults

HEADER_LEN = 8
OP_FORWARD, OP_RELEASE, OP_STOP, OP_ABORT, OP_STATS, OP_GROUP = 1, 2, 3, 4, 5, 6
OP_KEEP, OP_FORK = 7, 8
# Per rank in an OP_STATS payload: busy seconds, peak memory GB, live caches (sequences
# being generated), kept caches (finished sequences kept for prompt reuse), memory in use GB.
STATS_FIELDS = 5
FLAG_RETURN = 1  # the last stage sends the last position's hidden state back to rank 0
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


class TransportError(RuntimeError):
    """A message that does not match what the ranks agreed."""


class NonFiniteError(TransportError):
    """A stage's output holds NaN or infinity: its weights are broken, or it overflows."""


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
        return mx.array(astuple(self), mx.int32)

    @classmethod
    def parse(cls, a) -> "Header":
        """From a received int32 array."""
        return cls(*[int(v) for v in a.tolist()])


class Transport:
    """Header + payload messages over an mx.distributed group, each wait with a deadline.

    The deadline is `first_timeout` until the first prompt has gone round the ring
    (first kernel compile, a long first prefill), then `timeout`.
    """

    def __init__(self, group, width: int, dtype, faults: Faults, timeout: float,
                 first_timeout: float, arrivals=None):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.width, self.dtype = width, dtype
        self.faults = faults
        self.names = faults.names  # "rank r (host)" for messages
        self.timeout = timeout
        self.first_timeout = max(first_timeout, timeout)
        self.warm = False  # the first prompt has gone round: `timeout` from now on
        # Held for a whole message (header + payload): an ABORT sent from another thread
        # must never land between a header and its payload.
        self._send_lock = threading.RLock()
        faults.link = self
        # dist_runtime.arrival.Arrivals: receives wait for their bytes there first.
        self.arrivals = arrivals

    def deadline(self, timeout: Optional[float] = None) -> float:
        """Seconds the next wait may take: `timeout` if given, else by warm-up state."""
        return timeout or (self.timeout if self.warm else self.first_timeout)

    def send(self, dst: int, header: Header, payload: Optional[mx.array] = None,
             timeout: Optional[float] = None, between=None):
        """Send the header, then the payload [batch, length, width] if the op has one.

        between(): called once the header is out and before the payload goes: a stage
        computes its (lazy) payload there, so the next rank, holding the header, builds
        its graph meanwhile; the computing is not part of any deadline or blame."""
        if payload is not None and header.op == OP_FORWARD:
            header.dtype = DTYPES.index(payload.dtype)
            header.width = payload.shape[-1]
            header.batch, header.length = payload.shape[0], payload.shape[1]
        if header.op == OP_GROUP:
            header.batch = payload.shape[0]
            payload = payload if header.batch else None  # no rows: the header says it all
        if header.op == OP_STOP:
            self.faults.expect_end()  # ranks leave from now on: no news
        t = self.deadline(timeout)
        what = f"sending to {self.names[dst]} took over {t:.0f} s"
        # Whether a hidden state is finite is computed with its send (no extra wait) and
        # checked once the whole message is out, so message boundaries always hold.
        finite = mx.all(mx.isfinite(payload)) \
            if header.op == OP_FORWARD and payload is not None else None
        with self._send_lock:
            self.faults.wait(mx.distributed.send(header.array(), dst, group=self.group),
                             what, t, peer=dst, receiving=False)
            if payload is not None:
                if between is not None:
                    between()
                op = mx.distributed.send(payload, dst, group=self.group)
                self.faults.wait(op if finite is None else [op, finite], what, t, peer=dst,
                                 receiving=False)
        if finite is not None and not finite.item():
            raise NonFiniteError(
                f"the hidden state that {self.names[self.rank]} computed (after its layers) "
                f"holds NaN or infinity (message {header.seq}, {header.length} positions): "
                f"the weights on this host are likely corrupt (compare its "
                f"checkpoint files with rank 0's, or download them again), or the "
                f"activations overflow their dtype (float16?)")
        if header.op == OP_FORWARD and header.flags & FLAG_RETURN and self.rank != 0:
            self.warm = True  # this stage has passed on the end of the first prompt

    def recv(self, src: int, timeout: Optional[float] = None, build=None):
        """(header, payload or None) from rank src; an ABORT raises PeerLost.

        build(header, payload) -> result: for a FORWARD, what to compute from the payload,
        built into the graph BEFORE the wait for the payload, so that building it overlaps
        the ranks upstream still computing (the header arrives first: they send it before
        their own work is done); then (header, result) is returned, result unevaluated."""
        t = self.deadline(timeout)
        what = f"no message from {self.names[src]} for {t:.0f} s (it died or hangs)"
        arrival = None if self.arrivals is None else \
            (lambda seconds: self.arrivals.wait(src, seconds))
        h = mx.distributed.recv((HEADER_LEN,), mx.int32, src, group=self.group)
        self.faults.wait(h, what, t, peer=src, receiving=True, arrival=arrival)
        header = Header.parse(h)
        if header.op == OP_ABORT:
            self.faults.on_abort(self._recv_blame(src), src)
        if header.op == OP_STOP:
            self.faults.expect_end()
        self.faults.check()
        shape, dtype = self._payload(header, src)
        if shape is None:
            return header, None
        payload = mx.distributed.recv(shape, dtype, src, group=self.group)
        result = build(header, payload) if build is not None and header.op == OP_FORWARD \
            else payload
        self.faults.wait(payload, what, t, peer=src, receiving=True, arrival=arrival)
        if self.rank == 0 and header.op == OP_FORWARD:
            self.warm = True  # the first result is back: the ring is compiled and loaded
        return header, result

    def _payload(self, header: Header, src: int) -> tuple:
        """(shape, dtype) of the payload that follows `header`, or (None, None)."""
        if header.op == OP_STATS:
            return (self.size, STATS_FIELDS), mx.float32
        if header.op == OP_GROUP:
            return ((header.batch,), mx.int32) if header.batch else (None, None)
        if header.op == OP_FORK:
            return (1,), mx.int32
        if header.op != OP_FORWARD:
            return None, None
        if header.width != self.width or not 0 <= header.dtype < len(DTYPES) \
                or DTYPES[header.dtype] != self.dtype:
            sent = DTYPES[header.dtype] if 0 <= header.dtype < len(DTYPES) else header.dtype
            raise TransportError(
                f"{self.names[src]} sent hidden states of width {header.width}, "
                f"dtype {sent}; {self.names[self.rank]} expects width "
                f"{self.width}, dtype {self.dtype}: the ranks loaded different models")
        return (header.batch, header.length, self.width), self.dtype

    # -- the Link that Faults uses ----------------------------------------------------------

    def send_abort(self, blame: Blame, within: float):
        """Send ABORT(blame) to the next rank from a thread of its own, on a stream of its
        own, waiting at most `within` s: the main thread may be blocked in a receive, and
        the next rank may be gone."""
        if not self._send_lock.acquire(timeout=within):
            return  # the main thread is stuck sending to that rank: it cannot hear us anyway
        nxt = (self.rank + 1) % self.size

        def send():
            try:
                stream = mx.new_stream(mx.cpu)
                for arr in (Header(OP_ABORT).array(), blame.array()):
                    mx.eval(mx.distributed.send(arr, nxt, group=self.group, stream=stream))
            except Exception:
                pass  # the next rank is gone too: it will be reported by its own neighbours

        try:
            t = threading.Thread(target=send, daemon=True, name="abort")
            t.start()
            t.join(within)
        finally:
            self._send_lock.release()

    def recv_abort(self, src: int) -> Optional[Blame]:
        """One message from `src`: its Blame if an ABORT, else None (blocking)."""
        h = mx.distributed.recv((HEADER_LEN,), mx.int32, src, group=self.group)
        mx.eval(h)
        if Header.parse(h).op != OP_ABORT:
            return None
        return self._recv_blame(src, bounded=False)

    def _recv_blame(self, src: int, bounded: bool = True) -> Blame:
        """The Blame payload after an ABORT header from `src`."""
        b = mx.distributed.recv((Blame.FIELDS,), mx.int32, src, group=self.group)
        if bounded:
            self.faults.wait(b, f"no ABORT payload from {self.names[src]}", self.deadline(),
                             peer=src, receiving=True)
        else:
            mx.eval(b)
        return Blame.parse(b)

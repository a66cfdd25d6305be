"""A stage: one rank's slice of the layer stack and the KV caches of its sequences.

A stage knows its index, whether it embeds (first) and whether it holds the head, and
how to run one chunk of one sequence through its layers (the model's `forward_layers`).
It keeps a separate list of caches per sequence id, so sequences in flight never share
cache slots, and counts the time it computes. It knows nothing of sockets: the loop at
the bottom pairs it with a Transport.
"""

from __future__ import annotations

import time

import mlx.core as mx

from dist_runtime.transport import (FLAG_RETURN, OP_FORWARD, OP_RELEASE, OP_STATS, Header,
                                    TransportError)


class Stage:
    """Rank `index` of `n_stages`: a pruned model plus per-sequence caches."""

    def __init__(self, model, index: int, n_stages: int):
        self.model, self.index, self.n_stages = model, index, n_stages
        self.caches: dict = {}  # sequence id -> list of caches, one per owned layer
        self._busy_s = 0.0  # seconds spent computing (for the benchmark's busy fraction)

    @property
    def is_last(self) -> bool:
        """Whether this stage's output goes back to the coordinator."""
        return self.index == self.n_stages - 1

    def offset(self, seq: int) -> int:
        """Positions already cached for sequence `seq`."""
        caches = self.caches.get(seq)
        return caches[0].offset if caches else 0

    def embed(self, tokens: list) -> mx.array:
        """Token ids of one sequence -> h [1, L, D] (first stage only)."""
        return self.model.embed(mx.array([tokens]))

    def forward(self, h: mx.array, seq: int, offset: int) -> mx.array:
        """Run h [B, L, D] of sequence `seq` (starting at `offset`) through the owned layers."""
        caches = self.caches.setdefault(seq, self.model.make_caches())
        if caches and caches[0].offset != offset:
            raise TransportError(f"stage {self.index}: sequence {seq} arrives at position "
                                 f"{offset} but its cache holds {caches[0].offset}")
        return self.model.forward_layers(h, caches)

    def run(self, h: mx.array, seq: int, offset: int) -> mx.array:
        """forward() evaluated, its time counted as busy."""
        t0 = time.perf_counter()
        out = self.forward(h, seq, offset)
        mx.eval(out)
        self._busy_s += time.perf_counter() - t0
        return out

    def logits(self, h: mx.array) -> mx.array:
        """The head on the last position of h [1, L, D] -> logits [V], evaluated and timed
        (the coordinator only)."""
        t0 = time.perf_counter()
        out = self.model.head(h[:, -1:])[0, 0]
        mx.eval(out)
        self._busy_s += time.perf_counter() - t0
        return out

    def take_stats(self) -> list:
        """[busy seconds, peak memory GB] since the last call (resets both), and the number
        of sequences whose caches this stage holds now."""
        out = [self._busy_s, mx.get_peak_memory() / 1e9, len(self.caches)]
        self._busy_s = 0.0
        mx.reset_peak_memory()
        return out

    def add_stats(self, table: mx.array) -> mx.array:
        """Write this stage's stats into its row of a [ranks, STATS_FIELDS] table."""
        table = mx.array(table)
        table[self.index] = mx.array(self.take_stats(), mx.float32)
        return table

    def release(self, seq: int):
        """Free sequence `seq`'s caches."""
        self.caches.pop(seq, None)


def stage_loop(stage: Stage, transport, first_timeout: float):
    """Ranks 1..N-1: receive, run, pass on, until the coordinator says stop.

    The first wait uses `first_timeout` (rank 0 may still be loading or compiling). A
    lost, silent or failed rank upstream, or an ABORT, raises PeerLost in `recv`; the
    faults protocol has already told the ranks downstream which rank it was.
    """
    prev = stage.index - 1
    nxt = (stage.index + 1) % stage.n_stages
    timeout = first_timeout
    while True:
        header, h = transport.recv(prev, timeout)
        timeout = None
        if header.op == OP_FORWARD:
            out = stage.run(h, header.seq, header.offset)
            if not stage.is_last:
                transport.send(nxt, header, out)
            elif header.flags & FLAG_RETURN:
                transport.send(nxt, header, out[:, -1:])
            continue
        if header.op == OP_STATS:
            transport.send(nxt, header, stage.add_stats(h))
            continue
        if header.op == OP_RELEASE:
            stage.release(header.seq)
            if not stage.is_last:
                transport.send(nxt, Header(header.op, header.seq))
            continue
        # STOP goes round the whole ring, so rank 0 learns every stage got it.
        transport.send(nxt, Header(header.op, header.seq))
        return header.op

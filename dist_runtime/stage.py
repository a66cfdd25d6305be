"""A stage: one rank's slice of the layer stack and the KV caches of its sequences.

A stage knows its index, whether it embeds (first) and whether it holds the head, and
how to run one chunk of one sequence through its layers. It keeps a separate list of
caches per sequence id, so sequences in flight never share cache slots. It knows
nothing of sockets: the loop at the bottom pairs it with a Transport.
"""

from __future__ import annotations

import time

import mlx.core as mx

from dist_runtime.transport import (FLAG_RETURN, OP_ABORT, OP_FORWARD, OP_RELEASE, OP_STATS,
                                    Header, PeerLost, TransportError)

ASYNC_EVAL_EVERY = 2  # layers built per hand-off to the device in Stage.forward


class Stage:
    """Rank `index` of `n_stages`: a pruned model plus per-sequence caches."""

    def __init__(self, model, index: int, n_stages: int):
        self.model, self.index, self.n_stages = model, index, n_stages
        self.layer_range = model.layer_range
        self.caches: dict = {}  # sequence id -> list of caches, one per owned layer
        self.busy_s = 0.0  # seconds spent computing (for the benchmark's busy fraction)

    @property
    def is_last(self) -> bool:
        """Whether this stage's output goes back to the coordinator."""
        return self.index == self.n_stages - 1

    def offset(self, seq: int) -> int:
        """Positions already cached for sequence `seq`."""
        caches = self.caches.get(seq)
        return caches[0].offset if caches else 0

    def forward(self, h: mx.array, seq: int, offset: int) -> mx.array:
        """Run h [B, L, D] of sequence `seq` (starting at `offset`) through the owned layers."""
        caches = self.caches.setdefault(seq, self.model.make_caches())
        if caches and caches[0].offset != offset:
            raise TransportError(f"stage {self.index}: sequence {seq} arrives at position "
                                 f"{offset} but its cache holds {caches[0].offset}")
        model = self.model
        for n, ((i, layer), cache) in enumerate(zip(model.owned_layers(), caches), 1):
            h = model.forward_layer(i, layer, h, cache)
            if n % ASYNC_EVAL_EVERY == 0:
                # Start the device on the layers built so far while Python builds the
                # rest: graph building then overlaps execution instead of preceding it.
                mx.async_eval(h)
        return h

    def run(self, h: mx.array, seq: int, offset: int) -> mx.array:
        """forward() evaluated, with its time added to busy_s."""
        t0 = time.perf_counter()
        out = self.forward(h, seq, offset)
        mx.eval(out)
        self.busy_s += time.perf_counter() - t0
        return out

    def take_stats(self) -> list:
        """[busy seconds, peak memory GB] since the last call (resets both), and the number
        of sequences whose caches this stage holds now."""
        out = [self.busy_s, mx.get_peak_memory() / 1e9, len(self.caches)]
        self.busy_s = 0.0
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

    The first wait uses `first_timeout` (rank 0 may still be loading or compiling).
    """
    prev = stage.index - 1
    nxt = (stage.index + 1) % stage.n_stages
    timeout = first_timeout
    while True:
        # A lost, silent or failed rank upstream raises PeerLost here; the transport has
        # already told the ranks downstream (and so the coordinator) which rank it was.
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
        # STOP / ABORT go round the whole ring, so rank 0 learns every stage got it.
        transport.send(nxt, Header(header.op, header.seq, offset=header.offset))
        if header.op == OP_ABORT:
            raise PeerLost(f"the job was aborted: {transport.names[header.offset]} failed")
        return header.op

"""A stage: one rank's slice of the layer stack and the KV caches of its sequences.

A stage knows its index, whether it embeds (first) and whether it holds the head, and
how to run a message through its layers (the model's `forward_layers`): a prompt chunk
of one sequence, with that sequence's own caches, or a decode step of a micro-batch,
whose rows' caches are packed into one batch cache per layer (models/batch_cache.py).
Sequences and micro-batches share one id space. A sequence's own caches move into a
micro-batch when it joins (`group`), and are dropped when it leaves or is released. A
finished sequence's caches may instead be kept (`keep`, for prompt reuse: a later
sequence starts from a copy of their first k positions, `fork`) until released. It
counts the time it computes. It knows nothing of sockets: the loop at the bottom pairs
it with a Transport.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import mlx.core as mx

from dist_runtime.transport import (FLAG_RETURN, OP_FORK, OP_FORWARD, OP_GROUP, OP_KEEP,
                                    OP_RELEASE, OP_STATS, Header, TransportError)
from models.batch_cache import BatchKVCache, row_cache


class Stage:
    """Rank `index` of `n_stages`: a pruned model plus per-sequence caches."""

    def __init__(self, model, index: int, n_stages: int):
        self.model, self.index, self.n_stages = model, index, n_stages
        self.caches: dict = {}  # sequence id -> list of caches, one per owned layer
        self.batches: dict = {}  # micro-batch id -> (sequence ids, batch cache per layer)
        self.kept: dict = {}  # finished sequence id -> its caches, kept for prompt reuse
        self._busy_s = 0.0  # seconds spent computing (for the benchmark's busy fraction)
        self._batch_sizes: set = set()  # row counts of the micro-batches formed so far

    @property
    def is_last(self) -> bool:
        """Whether this stage's output goes back to the coordinator."""
        return self.index == self.n_stages - 1

    def offset(self, seq: int) -> int:
        """Positions already cached for sequence `seq`."""
        caches = self.caches.get(seq)
        return caches[0].offset if caches else 0

    def forward(self, h: mx.array, id: int, offset: Optional[int] = None) -> mx.array:
        """Run h [B, L, D] through the owned layers (lazily): a micro-batch's step, or a
        prompt chunk of sequence `id` starting at `offset` (checked when given)."""
        if id in self.batches:
            seqs, caches = self.batches[id]
            if h.shape[0] != len(seqs):
                raise TransportError(f"stage {self.index}: micro-batch {id} has {len(seqs)} "
                                     f"rows but a step of {h.shape[0]} arrived")
            return self.model.forward_layers(h, caches)
        caches = self.caches.setdefault(id, self.model.make_caches())
        if offset is not None and caches and caches[0].offset != offset:
            raise TransportError(f"stage {self.index}: sequence {id} arrives at position "
                                 f"{offset} but its cache holds {caches[0].offset}")
        return self.model.forward_layers(h, caches)

    def send(self, transport, dst: int, header, out: mx.array):
        """Pass `out` on, computing it between the header and the payload: the header
        leaves first, so the next rank builds its graph while this one computes."""
        transport.send(dst, header, out, between=lambda: self.run(out))

    def run(self, out: mx.array):
        """Compute `out` here (a prompt chunk ending at the last stage fills its caches and
        goes no further), its time counted as busy."""
        t0 = time.perf_counter()
        mx.eval(out)
        self._busy_s += time.perf_counter() - t0

    def group(self, id: int, seqs: list) -> bool:
        """Micro-batch `id` now holds rows `seqs`, in order: rows it held keep their
        caches, new rows bring their sequence's own, rows not listed are dropped. No rows
        dissolves it. A batch of one row decodes with that sequence's own caches, as it
        would alone: a batch cache buys nothing for one row.

        Returns whether no micro-batch of this many rows was formed here before: its
        first step may compile kernels for the new shape (mlx's CUDA backend compiles on
        first use, tens of seconds for a new batch size on a fresh machine), so the
        waits on that step get the first-use deadline (--first-timeout), not --timeout."""
        self._regroup(id, seqs)
        if not seqs or len(seqs) in self._batch_sizes:
            return False
        self._batch_sizes.add(len(seqs))
        test_delay("PIPELINE_TEST_COMPILE_DELAY", self.index)
        return True

    def _regroup(self, id: int, seqs: list):
        """`group`'s caches: re-pack micro-batch `id` for rows `seqs`."""
        old_seqs, old_caches = self.batches.pop(id, ([], []))
        if not seqs:
            return
        if seqs == old_seqs:
            self.batches[id] = (old_seqs, old_caches)
            return
        if len(seqs) == 1 and seqs[0] not in old_seqs and seqs[0] in self.caches:
            self.batches[id] = (list(seqs), self.caches.pop(seqs[0]))
            return
        old_rows = [c.rows() if isinstance(c, BatchKVCache) else [c] for c in old_caches]
        layers = []
        for n in range(len(self.model.owned_layers())):
            rows = []
            for s in seqs:
                if s in old_seqs:
                    rows.append(old_rows[n][old_seqs.index(s)])
                elif s in self.caches:
                    rows.append(self.caches[s][n])
                else:
                    raise TransportError(f"stage {self.index}: sequence {s} joins micro-batch "
                                         f"{id} but this stage holds no cache for it")
            layers.append(BatchKVCache.pack(rows))
        for s in seqs:
            self.caches.pop(s, None)  # moved into the batch
        self.batches[id] = (list(seqs), layers)

    def keep(self, seq: int) -> int:
        """Keep finished sequence `seq`'s caches (its own, or a copy of its row of a
        micro-batch, which it is about to leave) for prompt reuse; returns its positions."""
        caches = self.caches.pop(seq, None)
        if caches is None:
            for seqs, layers in self.batches.values():
                if seq in seqs:
                    i = seqs.index(seq)
                    caches = [row_cache(c.rows()[i]) if isinstance(c, BatchKVCache) else c
                              for c in layers]
                    break
        if caches is None:
            raise TransportError(f"stage {self.index}: sequence {seq} is to be kept but this "
                                 f"stage holds no cache for it")
        # Copied now, while the batch's buffers are alive: the copies then hold nothing
        # of the batch once it is re-packed.
        mx.eval([a for c in caches for a in (c.keys, c.values) if a is not None])
        self.kept[seq] = caches
        return caches[0].offset if caches else 0

    def fork(self, seq: int, source: int, k: int):
        """Sequence `seq` starts from a copy of kept sequence `source`'s first k positions."""
        if source not in self.kept:
            raise TransportError(f"stage {self.index}: sequence {seq} is to start from kept "
                                 f"sequence {source}, which this stage does not hold")
        if seq in self.caches or any(seq in seqs for seqs, _ in self.batches.values()):
            raise TransportError(f"stage {self.index}: sequence {seq} is to start from kept "
                                 f"sequence {source} but already has caches")
        try:
            self.caches[seq] = [c.prefix(k) for c in self.kept[source]]
        except ValueError as e:
            raise TransportError(f"stage {self.index}: sequence {seq} cannot start from "
                                 f"{k} positions of kept sequence {source}: {e}")

    def live(self) -> int:
        """Sequences whose caches this stage holds (alone or as a micro-batch's rows)."""
        return len(self.caches) + sum(len(seqs) for seqs, _ in self.batches.values())

    def embed(self, tokens: mx.array) -> mx.array:
        """Token ids [B, L] -> h [B, L, D] (first stage only; lazy)."""
        return self.model.embed(tokens)

    def head(self, h: mx.array) -> mx.array:
        """Logits of the last position of each row: h [B, L, D] -> [B, V] (lazy)."""
        return self.model.head(h[:, -1:])[:, 0]

    def take_stats(self) -> list:
        """[busy seconds, peak memory GB] since the last call (resets both), the number of
        sequences whose caches this stage holds now (being generated, and kept for reuse),
        and the memory in use now (GB)."""
        out = [self._busy_s, mx.get_peak_memory() / 1e9, self.live(), len(self.kept),
               mx.get_active_memory() / 1e9]
        self._busy_s = 0.0
        mx.reset_peak_memory()
        return out

    def add_stats(self, table: mx.array) -> mx.array:
        """Write this stage's stats into its row of a [ranks, STATS_FIELDS] table."""
        table = mx.array(table)
        table[self.index] = mx.array(self.take_stats(), mx.float32)
        return table

    def release(self, seq: int):
        """Free sequence `seq`'s caches (those of a sequence in progress, or kept ones)."""
        self.caches.pop(seq, None)
        self.kept.pop(seq, None)


def test_delay(variable: str, rank: int):
    """Tests only: environment `variable`='r:s,...' makes rank r sleep s s here (a slow
    load, a slow first compile), so that tests can act on a job meanwhile."""
    for part in filter(None, os.environ.get(variable, "").split(",")):
        r, _, seconds = part.partition(":")
        if r.strip() == str(rank):
            time.sleep(float(seconds))


def stage_loop(stage: Stage, transport, first_timeout: float):
    """Ranks 1..N-1: receive, run, pass on, until the coordinator says stop.

    The first wait uses `first_timeout` (rank 0 may still be loading or compiling), and
    so does the wait for the first step of a micro-batch of a new size (a compile). A
    lost, silent or failed rank upstream, or an ABORT, raises PeerLost in `recv`; the
    faults protocol has already told the ranks downstream which rank it was.
    """
    prev = stage.index - 1
    nxt = (stage.index + 1) % stage.n_stages
    timeout = first_timeout

    def layers(header, h):  # built before the payload arrives (Transport.recv)
        return stage.forward(h, header.seq, header.offset)

    while True:
        header, out = transport.recv(prev, timeout, build=layers)
        timeout = None
        if header.op == OP_FORWARD:
            if not stage.is_last:
                stage.send(transport, nxt, header, out)
            elif header.flags & FLAG_RETURN:
                stage.send(transport, nxt, header, out[:, -1:])
            else:
                stage.run(out)
            continue
        h = out
        if header.op == OP_STATS:
            transport.send(nxt, header, stage.add_stats(h))
            continue
        if header.op == OP_GROUP:
            if stage.group(header.seq, h.tolist() if h is not None else []):
                timeout = first_timeout  # the step that follows compiles upstream
            if not stage.is_last:
                transport.send(nxt, header, h if h is not None else mx.zeros((0,), mx.int32))
            continue
        if header.op in (OP_RELEASE, OP_KEEP):
            (stage.release if header.op == OP_RELEASE else stage.keep)(header.seq)
            if not stage.is_last:
                transport.send(nxt, Header(header.op, header.seq))
            continue
        if header.op == OP_FORK:
            stage.fork(header.seq, int(h[0].item()), header.offset)
            if not stage.is_last:
                transport.send(nxt, Header(header.op, header.seq, offset=header.offset), h)
            continue
        # STOP goes round the whole ring, so rank 0 learns every stage got it.
        transport.send(nxt, Header(header.op, header.seq))
        return header.op

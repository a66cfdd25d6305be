"""The KV cache of a micro-batch: B sequences of different lengths decoded together.

Decode is bound by reading weights, so B sequences stepped in one forward cost about
what one does; only attention differs per row. `BatchKVCache` stores the rows in one
buffer [B, H, S, Dh], right-aligned: row i's kept keys fill the columns just before
`end`, padding before them, so one new key per row is one slice write, and one
attention call with a padding mask serves every row. Each row has its own position
(RoPE takes the vector `offset`) and its own mask.

Rows come from sequences' own caches once their prompt is in (`pack`), and a batch can be
re-packed when rows join or leave (`rows()` gives them back). With `chunk` set it serves
Llama-4's chunked local attention: a query sees only keys of its own chunk, so the mask
hides older columns, and columns no row can see any more are dropped (the buffer stays
within about a chunk plus GROWTH_STEP).

A batch only ever takes one new position per row at a time (decode steps); prompts
are filled through each sequence's own cache (models/cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .cache import GROWTH_STEP, ChunkedKVCache


@dataclass
class Row:
    """One sequence's kept keys and values, [1, H, s, Dh], its next position, and the
    attention chunk of its layer (None: it keeps every position)."""

    keys: mx.array
    values: mx.array
    position: int
    chunk: Optional[int] = None


def row_cache(row: Row):
    """A sequence's own cache (KVCache or ChunkedKVCache) holding a copy of a Row: what a
    row leaving its micro-batch keeps (prompt reuse), in a buffer of its own."""
    from .cache import KVCache

    proto = KVCache() if row.chunk is None else ChunkedKVCache(row.chunk)
    return proto.holding(row.position - row.keys.shape[2], row.keys, row.values)


def cache_row(cache) -> Row:
    """A sequence's own cache (KVCache or ChunkedKVCache) as a Row."""
    kept = cache.offset - cache.start
    chunk = cache.chunk_size if isinstance(cache, ChunkedKVCache) else None
    return Row(cache.keys[:, :, :kept], cache.values[:, :, :kept], cache.offset, chunk)


class BatchKVCache:
    """Keys and values of B rows, [B, H, S, Dh], right-aligned at column `end`."""

    batched = True  # models pick the row-aware mask for these (models/base.py)

    def __init__(self, rows: list, chunk: Optional[int] = None):
        self.chunk = chunk
        self.positions = [r.position for r in rows]  # next query position per row
        self._offset = mx.array(self.positions, mx.int32)  # the same, on the device
        kept = [self._kept(p) for p in self.positions]
        k0, v0 = rows[0].keys, rows[0].values
        _, H, _, Dk = k0.shape
        self.end = max(kept)
        cap = -(-(self.end + 1) // GROWTH_STEP) * GROWTH_STEP
        self.keys = mx.zeros((len(rows), H, cap, Dk), k0.dtype)
        self.values = mx.zeros((len(rows), H, cap, v0.shape[3]), v0.dtype)
        for i, (r, s) in enumerate(zip(rows, kept)):
            if s:
                self.keys[i:i + 1, :, self.end - s:self.end] = r.keys[:, :, -s:]
                self.values[i:i + 1, :, self.end - s:self.end] = r.values[:, :, -s:]

    @classmethod
    def pack(cls, caches: list) -> "BatchKVCache":
        """One batch from rows held by sequences' own caches or by other batches:
        `caches` lists, per row, either a cache or a Row."""
        rows = [c if isinstance(c, Row) else cache_row(c) for c in caches]
        chunks = {r.chunk for r in rows}
        if len(chunks) > 1:
            raise ValueError(f"rows of one layer's batch disagree on its chunk: {chunks}")
        return cls(rows, chunks.pop())

    def _kept(self, position: int) -> int:
        """Keys a row at `position` still needs: all, or those of its current chunk."""
        return position if self.chunk is None else position % self.chunk

    @property
    def size(self) -> int:
        """Rows B."""
        return len(self.positions)

    @property
    def offset(self):
        """Each row's position, [B] int32: RoPE and position-dependent scales take it.
        One row gets a plain int, as a sequence's own cache gives, so a single sequence
        takes the same RoPE path as it does alone (and no per-layer offset update)."""
        return self.positions[0] if len(self.positions) == 1 else self._offset

    def rows(self) -> list:
        """Each row as a Row (its kept keys only), for re-packing."""
        out = []
        for i, p in enumerate(self.positions):
            s = self._kept(p)
            out.append(Row(self.keys[i:i + 1, :, self.end - s:self.end],
                           self.values[i:i + 1, :, self.end - s:self.end], p, self.chunk))
        return out

    def _visible(self) -> list:
        """Keys the next query of each row sees: its kept keys and its own."""
        return [self._kept(p) + 1 for p in self.positions]

    def mask(self) -> Optional[mx.array]:
        """For one new query per row: boolean [B, 1, 1, W] over the W columns that
        `update_and_fetch` will return, or None when every row sees all of them (one
        row, or rows at the same place in their chunk): the fused attention then runs."""
        visible = self._visible()
        width = max(visible)
        if min(visible) == width:
            return None
        kept = self._offset if self.chunk is None else self._offset % self.chunk
        first = width - 1 - kept  # [B]: each row's first visible column of the W
        return (mx.arange(width)[None] >= first[:, None])[:, None, None, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append one position per row ([B, H, 1, Dh]); return [B, H, W, Dh] views of the
        last W columns, W the most any row sees (the columns `mask` describes)."""
        if keys.shape[2] != 1:
            raise ValueError(f"a batch cache takes one position per row, got {keys.shape[2]}")
        width = max(self._visible())
        self._grow()
        self.keys[:, :, self.end:self.end + 1] = keys
        self.values[:, :, self.end:self.end + 1] = values
        self.end += 1
        self.positions = [p + 1 for p in self.positions]
        if len(self.positions) > 1:
            self._offset = self._offset + 1
        start = self.end - width
        out = self.keys[:, :, start:self.end], self.values[:, :, start:self.end]
        self._compact()  # for the next step (this one's mask saw the columns as they were)
        return out

    def _compact(self):
        """Drop the columns no row can see any more, once they are worth a copy."""
        waste = self.end - max(self._kept(p) for p in self.positions)
        if waste >= GROWTH_STEP:
            self.keys = self.keys[:, :, waste:]
            self.values = self.values[:, :, waste:]
            self.end -= waste

    def _grow(self):
        """Make column `end` exist: grow by GROWTH_STEP."""
        if self.end + 1 > self.keys.shape[2]:
            B, H, _, Dk = self.keys.shape
            grow = lambda a: mx.concatenate(  # noqa: E731
                [a, mx.zeros((B, H, GROWTH_STEP, a.shape[3]), a.dtype)], axis=2)
            self.keys, self.values = grow(self.keys), grow(self.values)

    def trim(self):
        """Nothing to do: `update_and_fetch` drops columns no row can see (Llama-4 calls
        this after every chunked layer for the sequences' own caches)."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return self.keys.nbytes + self.values.nbytes

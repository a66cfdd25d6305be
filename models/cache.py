"""KV caches: the small protocol every attention layer uses (offset, update_and_fetch).

`KVCache` keeps every position. `ChunkedKVCache` serves Llama-4's chunked local
attention: a query only sees keys of its own chunk, so the cache drops every key before
the current chunk's start and remembers that start (absolute position) for the mask.
"""

from __future__ import annotations

import mlx.core as mx

GROWTH_STEP = 256  # positions added per reallocation: amortises concatenation in decode


class KVCache:
    """Keys and values of every position so far, [B, H, S, Dh], grown in GROWTH_STEP slices."""

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0  # absolute positions written so far
        self.start = 0  # absolute position of the first key kept (always 0 here)

    def _append(self, keys: mx.array, values: mx.array):
        """Write [B, H, L, Dh] keys/values after the kept ones, growing in GROWTH_STEP slices."""
        n = keys.shape[2]
        used = self.offset - self.start
        if self.keys is None or used + n > self.keys.shape[2]:
            grow = ((n + GROWTH_STEP - 1) // GROWTH_STEP) * GROWTH_STEP
            B, H, _, Dk = keys.shape
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[:, :, :used], new_k], axis=2)
                self.values = mx.concatenate([self.values[:, :, :used], new_v], axis=2)
        self.keys[:, :, used : used + n] = keys
        self.values[:, :, used : used + n] = values
        self.offset += n

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append [B, H, L, Dh] keys/values; return all kept keys/values."""
        self._append(keys, values)
        used = self.offset - self.start
        return self.keys[:, :, :used], self.values[:, :, :used]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class ChunkedKVCache(KVCache):
    """Cache for chunked local attention: keeps only keys of the current chunk and later.

    After each update, keys before the chunk that the *next* query falls in are dropped,
    so memory is bounded by chunk_size + the largest step.
    """

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size

    def trim(self):
        """Drop keys before the chunk that position `offset` (the next query) belongs to."""
        next_chunk_start = (self.offset // self.chunk_size) * self.chunk_size
        drop = next_chunk_start - self.start
        if drop <= 0 or self.keys is None:
            return
        used = self.offset - self.start
        self.keys = self.keys[:, :, drop:used]
        self.values = self.values[:, :, drop:used]
        self.start = next_chunk_start

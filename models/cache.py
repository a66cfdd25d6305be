"""KV caches: the small protocol every attention layer uses (offset, update_and_fetch).

`KVCache` keeps every position. `ChunkedKVCache` serves Llama-4's chunked local
attention: a query only sees keys of its own chunk, so the cache drops every key before
the current chunk's start and remembers that start (absolute position) for the mask.

`prefix(k)` copies a cache's first k positions into a new cache of the same kind (prompt
reuse: a new sequence starts from a finished one's prefix); a chunked cache can give only
the prefixes that end at or after the first key it kept (`start`).
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

    def _empty(self) -> "KVCache":
        """A new, empty cache of the same kind."""
        return KVCache()

    def holding(self, start: int, keys, values) -> "KVCache":
        """A new cache of this kind whose kept keys/values [1, H, s, Dh] (copied into a
        buffer of its own) cover positions start .. start+s-1."""
        c = self._empty()
        c.start = c.offset = start
        if keys is not None and keys.shape[2]:
            c._append(keys, values)
        return c

    def prefix(self, k: int) -> "KVCache":
        """A new cache holding a copy of this one's positions 0 .. k-1 (lazily)."""
        if not self.start <= k <= self.offset:
            raise ValueError(f"a cache holding positions {self.start}..{self.offset - 1} "
                             f"cannot give a prefix of {k}")
        n = k - self.start
        keys = self.keys[:, :, :n] if n else None
        values = self.values[:, :, :n] if n else None
        return self.holding(self.start, keys, values)


class ChunkedKVCache(KVCache):
    """Cache for chunked local attention: keeps only keys of the current chunk and later.

    After each update, keys before the chunk that the *next* query falls in are dropped,
    so memory is bounded by chunk_size + the largest step.
    """

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size

    def _empty(self) -> "ChunkedKVCache":
        return ChunkedKVCache(self.chunk_size)

    def prefix(self, k: int) -> "ChunkedKVCache":
        """As KVCache.prefix, then only the keys that position k's chunk still needs."""
        c = super().prefix(k)
        c.trim()
        return c

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

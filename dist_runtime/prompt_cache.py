"""Prompt reuse: which finished sequences' caches the stages keep, and which one a new
prompt can start from.

Every stage keeps the caches of some finished sequences (OP_KEEP, by sequence id); the
coordinator keeps this index of their tokens. A new prompt that shares its first k
tokens with a kept sequence starts from a copy of that sequence's caches trimmed to k
positions on every stage (OP_FORK), and only the rest of it is prefilled. A follow-up
turn of a conversation shares the whole previous prompt (and usually the reply as it
was generated), so its prefill is only the new message.

Memory is bounded in cache positions (the sum over kept sequences, every stage keeps
the same ones): beyond the bound the least recently used entries go first (used: kept
or forked from). An entry that a new sequence is about to fork from is pinned until the
fork has gone out. An entry whose tokens are a prefix of a newer one's is dropped when
the newer one can serve every prefix it could (a conversation keeps only its last turn).

Caches that drop old keys (Llama-4's chunked attention keeps only the current chunk)
cannot give every prefix: `floor(positions)` is the shortest prefix a kept sequence of
that many positions can give (0 where every key is kept), from the model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

MIN_REUSE = 16  # shorter shared prefixes are prefilled again: a fork is not worth it


@dataclass
class Entry:
    """A kept sequence: its tokens (those whose positions its caches hold, in order) and
    how many positions its caches hold (at least as many; the rest unknown)."""

    seq: int
    tokens: np.ndarray
    positions: int
    pins: int = 0


class PromptCache:
    """The coordinator's index of kept sequences, least recently used first."""

    def __init__(self, capacity: int, floor: Optional[Callable[[int], int]] = None,
                 min_reuse: int = MIN_REUSE):
        self.capacity = capacity  # most positions kept over all entries
        self.floor = floor or (lambda positions: 0)
        self.min_reuse = max(1, min_reuse)
        self.entries: "OrderedDict[int, Entry]" = OrderedDict()
        self.positions = 0  # kept now, over all entries
        self.hits = 0  # prompts that started from a kept sequence
        self.reused = 0  # prompt positions not prefilled thanks to it

    def match(self, prompt: list) -> Optional[tuple]:
        """(kept sequence, k) for the longest reusable prefix of `prompt` (at most all but
        its last token, which must be run to give the first new token), pinned until
        `unpin`; None when no entry shares at least min_reuse tokens."""
        if not self.entries or len(prompt) <= self.min_reuse:
            return None
        p = np.asarray(prompt, dtype=np.int64)
        best = None
        for e in self.entries.values():  # oldest first: a tie goes to the newest
            k = min(_common(p, e.tokens), len(prompt) - 1)
            if k >= self.min_reuse and k >= self.floor(e.positions) and \
                    (best is None or k >= best[1]):
                best = (e, k)
        if best is None:
            return None
        e, k = best
        e.pins += 1
        self.entries.move_to_end(e.seq)
        self.hits += 1
        self.reused += k
        return e.seq, k

    def unpin(self, seq: int):
        """The fork from `seq` went out (or will never go)."""
        e = self.entries.get(seq)
        if e is not None and e.pins:
            e.pins -= 1

    def add(self, seq: int, tokens: list, positions: int) -> list:
        """A finished sequence is kept; returns the kept sequences to release now (the
        least recently used beyond the capacity, the ones it makes redundant, or itself
        when it alone is beyond the capacity)."""
        new = Entry(seq, np.asarray(tokens, dtype=np.int64), positions)
        drop = []
        for e in list(self.entries.values()):
            if not e.pins and len(e.tokens) <= len(new.tokens) and \
                    _common(new.tokens, e.tokens) == len(e.tokens) and \
                    self.floor(new.positions) <= self.floor(e.positions):
                drop.append(e.seq)  # every prefix it gives, the new one gives too
                self._remove(e.seq)
        self.entries[seq] = new
        self.positions += positions
        for e in list(self.entries.values()):
            if self.positions <= self.capacity:
                break
            if not e.pins:
                drop.append(e.seq)
                self._remove(e.seq)
        return drop

    def clear(self) -> list:
        """Forget every unpinned entry; returns them (to release)."""
        drop = [s for s, e in self.entries.items() if not e.pins]
        for s in drop:
            self._remove(s)
        return drop

    def _remove(self, seq: int):
        self.positions -= self.entries.pop(seq).positions


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n

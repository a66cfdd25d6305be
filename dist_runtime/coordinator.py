"""Rank 0: embeds, runs the first layers, closes the ring with the head, and samples.

The coordinator drives everything: it sends each chunk of a sequence to rank 1, and
the last rank returns the last position's hidden state only when logits are needed
(the final prefill chunk, every decode step). With one rank it is the whole model and
no message is sent: one code path for one process and for N.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from dist_runtime.sampling import Sampler
from dist_runtime.stage import Stage
from dist_runtime.transport import (FLAG_RETURN, OP_ABORT, OP_FORWARD, OP_RELEASE, OP_STOP,
                                    Header, PeerLost)

PREFILL_CHUNK = 512  # prompt positions per forward: bounds activation memory, feeds the ring


@dataclass
class GenerationResult:
    """What a generation produced and how fast."""

    tokens: list = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    finish_reason: str = ""
    first_logits: Optional[mx.array] = None  # logits that chose the first token, [V]


class Coordinator:
    """Rank 0's side of the ring (or the whole model when alone)."""

    def __init__(self, stage: Stage, transport=None, prefill_chunk: int = PREFILL_CHUNK):
        self.stage = stage
        self.transport = transport
        self.n = stage.n_stages
        self.prefill_chunk = prefill_chunk
        self._next_seq = 0
        self.current = GenerationResult()  # the generation in progress (read on a stop)

    def new_sequence(self) -> int:
        """A fresh sequence id."""
        self._next_seq += 1
        return self._next_seq

    def forward(self, tokens: list, seq: int, want_logits: bool) -> Optional[mx.array]:
        """Run `tokens` of sequence `seq` around the ring; last-position logits [V] or None."""
        offset = self.stage.offset(seq)
        h = self.stage.model.embed(mx.array([tokens]))  # [1, L, D]
        h = self.stage.forward(h, seq, offset)
        if self.n > 1:
            flags = FLAG_RETURN if want_logits else 0
            self.transport.send(1, Header(OP_FORWARD, seq, offset=offset, flags=flags), h)
            if not want_logits:
                return None
            header, h = self.transport.recv(self.n - 1)
            if header.op == OP_ABORT:
                names = self.transport.names
                raise PeerLost(f"{names[header.offset]} failed or was lost (reported by the "
                               f"ranks after it)")
            if header.op != OP_FORWARD or header.seq != seq:
                raise RuntimeError(f"coordinator expected sequence {seq}'s hidden state, got "
                                   f"op {header.op} for sequence {header.seq}")
        elif not want_logits:
            mx.eval(h)
            return None
        return self.stage.model.head(h[:, -1:])[0, 0]  # [V]

    def prefill(self, prompt: list, seq: int) -> mx.array:
        """Feed the prompt in chunks; logits [V] after its last position."""
        chunks = [prompt[i:i + self.prefill_chunk]
                  for i in range(0, len(prompt), self.prefill_chunk)]
        for chunk in chunks[:-1]:
            self.forward(chunk, seq, want_logits=False)
        return self.forward(chunks[-1], seq, want_logits=True)

    def generate(self, prompt: list, max_tokens: int, sampler: Sampler, eos_ids=(),
                 on_token: Optional[Callable[[int], bool]] = None) -> GenerationResult:
        """Generate up to max_tokens after `prompt`; on_token(id) -> True stops early."""
        res = self.current = GenerationResult(prompt_tokens=len(prompt))
        seq = self.new_sequence()
        t0 = time.perf_counter()
        logits = self.prefill(prompt, seq)
        res.first_logits = logits
        token = sampler(logits)
        t1 = time.perf_counter()
        res.ttft_s = t1 - t0
        res.prefill_tps = len(prompt) / res.ttft_s
        res.finish_reason = "length"
        while True:
            if token in eos_ids:
                res.finish_reason = "eos"
                break
            res.tokens.append(token)
            if on_token is not None and on_token(token):
                res.finish_reason = "stop"
                break
            if len(res.tokens) >= max_tokens:
                break
            token = sampler(self.forward([token], seq, want_logits=True))
        steps = max(len(res.tokens) - 1, 0)
        res.decode_tps = steps / (time.perf_counter() - t1) if steps else 0.0
        self.release(seq)
        return res

    def release(self, seq: int):
        """Free the sequence's caches on every stage."""
        self.stage.release(seq)
        if self.n > 1:
            self.transport.send(1, Header(OP_RELEASE, seq))

    def stop(self, timeout: float = 30.0):
        """Tell every stage to exit and wait until the message has gone round the ring."""
        if self.n > 1:
            self.transport.send(1, Header(OP_STOP))
            self.transport.recv(self.n - 1, timeout)

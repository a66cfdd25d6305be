"""Rank 0: embeds, runs the first layers, closes the ring with the head, and samples.

The coordinator drives everything. A Schedule (dist_runtime/schedule.py) decides what
to send next: the next prompt chunk of a sequence (only a prompt's last chunk asks for
a result), a decode step, or to wait for the oldest result. Results come back from the
last rank in send order; only the last position's hidden state travels back. With one
rank the coordinator is the whole model and no message is sent: one code path for one
process and for N.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from dist_runtime.sampling import Sampler
from dist_runtime.schedule import DONE, SEND, Schedule, SeqState
from dist_runtime.stage import Stage
from dist_runtime.transport import (FLAG_RETURN, OP_FORWARD, OP_RELEASE, OP_STATS, OP_STOP,
                                    STATS_FIELDS, Header)

@dataclass
class Request:
    """One sequence to generate."""

    prompt: list
    max_tokens: int
    sampler: Sampler
    eos_ids: frozenset = frozenset()
    on_token: Optional[Callable[[int], bool]] = None  # returns True to stop this sequence


@dataclass
class GenerationResult:
    """What a generation produced and how fast."""

    tokens: list = field(default_factory=list)
    prompt_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    finish_reason: str = ""
    first_logits: Optional[mx.array] = None  # logits that chose the first token, [V]
    t_start: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0


class Coordinator:
    """Rank 0's side of the ring (or the whole model when alone)."""

    def __init__(self, stage: Stage, transport=None, prefill_chunk: Optional[int] = None):
        self.stage = stage
        self.transport = transport
        self.n = stage.n_stages
        self.prefill_chunk = prefill_chunk
        self._next_seq = 0
        self._local = deque()  # one rank: results computed at send time
        self.current = GenerationResult()  # the (first) generation in progress, for a stop

    def _send(self, seq: int, tokens: list, want: bool):
        """Embed `tokens` of `seq`, run rank 0's layers, pass them on (or finish locally)."""
        offset = self.stage.offset(seq)
        h = self.stage.run(self.stage.embed(tokens), seq, offset)  # [1, L, D]
        if self.n == 1:
            if want:
                self._local.append(self.stage.logits(h))
            return
        flags = FLAG_RETURN if want else 0
        self.transport.send(1, Header(OP_FORWARD, seq, offset=offset, flags=flags), h)

    def _recv(self, seq: int) -> mx.array:
        """Logits [V] of the oldest outstanding result, which must be sequence `seq`'s."""
        if self.n == 1:
            return self._local.popleft()
        header, h = self.transport.recv(self.n - 1)  # an ABORT raises PeerLost in there
        if header.op != OP_FORWARD or header.seq != seq:
            raise RuntimeError(f"coordinator expected sequence {seq}'s hidden state, got "
                               f"op {header.op} for sequence {header.seq}")
        return self.stage.logits(h)

    def generate_many(self, requests: list, max_in_flight: Optional[int] = None) -> list:
        """Generate every request, keeping up to max_in_flight results (default: stages)."""
        schedule = Schedule(max_in_flight or self.n)
        states, results, by_seq = [], [], {}
        for req in requests:
            self._next_seq += 1
            st = SeqState.new(self._next_seq, len(req.prompt), req.max_tokens, self.n,
                              self.prefill_chunk)
            res = GenerationResult(prompt_tokens=len(req.prompt), finish_reason="length")
            states.append(st)
            results.append(res)
            by_seq[st.seq] = (st, req, res)
        self.current = results[0]
        while True:
            action = schedule.next_action(states)
            if action.kind == DONE:
                break
            st, req, res = by_seq[action.seq]
            if action.kind == SEND:
                if st.in_prefill:
                    tokens = req.prompt[st.sent_prompt: st.sent_prompt + action.length]
                    res.t_start = res.t_start or time.perf_counter()
                else:
                    tokens = [res.tokens[-1]]
                self._send(st.seq, tokens, action.wants_result)
                schedule.sent(st, action)
                continue
            logits = self._recv(st.seq)
            finished = self._accept(req, res, logits)
            schedule.received(st, finished)
            if st.finished:
                res.t_end = time.perf_counter()
                self.release(st.seq)
        for res in results:
            _rates(res)
        return results

    def _accept(self, req: Request, res: GenerationResult, logits: mx.array) -> bool:
        """Sample a token for `res`; True when the sequence ends here."""
        token = req.sampler(logits)
        if res.first_logits is None:
            res.first_logits = logits
            res.t_first = time.perf_counter()
        if token in req.eos_ids:
            res.finish_reason = "eos"
            return True
        res.tokens.append(token)
        if req.on_token is not None and req.on_token(token):
            res.finish_reason = "stop"
            return True
        return len(res.tokens) >= req.max_tokens

    def generate(self, prompt: list, max_tokens: int, sampler: Sampler, eos_ids=(),
                 on_token: Optional[Callable[[int], bool]] = None) -> GenerationResult:
        """One sequence; on_token(id) -> True stops early."""
        return self.generate_many([Request(prompt, max_tokens, sampler, frozenset(eos_ids),
                                           on_token)])[0]

    def release(self, seq: int):
        """Free the sequence's caches on every stage."""
        self.stage.release(seq)
        if self.n > 1:
            self.transport.send(1, Header(OP_RELEASE, seq))

    def collect_stats(self) -> list:
        """Per rank [busy seconds, peak memory GB] since the last collection (then reset),
        and how many sequences' caches the rank holds.

        The request goes round the ring behind all earlier work, so every stage has
        finished what was sent before it when it adds its numbers.
        """
        table = mx.zeros((self.n, STATS_FIELDS), mx.float32)
        table = self.stage.add_stats(table)
        if self.n > 1:
            self.transport.send(1, Header(OP_STATS), table)
            header, table = self.transport.recv(self.n - 1)
            if header.op != OP_STATS:
                raise RuntimeError(f"expected the stats message back, got op {header.op}")
        return table.tolist()

    def stop(self, timeout: float = 30.0):
        """Tell every stage to exit and wait until the message has gone round the ring."""
        if self.n > 1:
            self.transport.send(1, Header(OP_STOP))
            self.transport.recv(self.n - 1, timeout)


def _rates(res: GenerationResult):
    """Fill ttft and rates from the timestamps."""
    res.ttft_s = res.t_first - res.t_start
    res.prefill_tps = res.prompt_tokens / res.ttft_s if res.ttft_s > 0 else 0.0
    steps = len(res.tokens) - 1
    span = res.t_end - res.t_first
    res.decode_tps = steps / span if steps > 0 and span > 0 else 0.0

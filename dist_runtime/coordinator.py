"""Rank 0: embeds, runs the first layers, closes the ring with the head, and samples.

The coordinator carries out what the Schedule (dist_runtime/schedule.py) decides: send
a prompt chunk (only a prompt's last chunk asks for a result), step a micro-batch of
decoding sequences (telling the stages first when its rows changed), release a
sequence's caches, or take the oldest result. Results come back from the last rank in
send order; only the last position's hidden state travels back. With one rank the
coordinator is the whole model and no message is sent: one code path for one process
and for N.

One loop serves a batch of requests (`generate_many`) and a server alike: `submit` adds
a sequence at any time, `step` carries out the schedule's next action, `cancel` ends a
sequence early (its rows leave at the next step, its caches go on every stage), and
`retire` hands back the sequences that finished. With a prompt cache
(dist_runtime/prompt_cache.py), finished sequences' caches are kept on every stage
(OP_KEEP) and a new prompt sharing a prefix with one starts from a copy of it (OP_FORK),
sent just before its first chunk.

The host never waits where it need not. Sampled tokens stay on the device: a micro-
batch's next step is built from its last step's tokens before they are read, and the
tokens are read (to stream them and to see an end of sequence) only once that next step
is queued. With one rank the step is queued with `mx.async_eval`, so the device runs
step t+1 while the host reads step t; across ranks, sending it evaluates it, and it is
built (sampling, embedding, rank 0's layers) while its input is still on its way round
the ring.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from dist_runtime.prompt_cache import PromptCache
from dist_runtime.sampling import Sampler, sample_rows
from dist_runtime.schedule import CHUNK, DONE, RECV, RELEASE, STEP, Schedule
from dist_runtime.stage import Stage
from dist_runtime.transport import (FLAG_RETURN, OP_FORK, OP_FORWARD, OP_GROUP, OP_KEEP,
                                    OP_RELEASE, OP_STATS, OP_STOP, STATS_FIELDS, Header)

KEPT_REASONS = ("eos", "length", "stop")  # sequences that ended so are kept for reuse


@dataclass
class Request:
    """One sequence to generate."""

    prompt: list
    max_tokens: int
    sampler: Sampler
    eos_ids: frozenset = frozenset()
    on_token: Optional[Callable[[int], bool]] = None  # returns True to stop this sequence
    # Called once, when it has finished and all its tokens were given to on_token.
    on_done: Optional[Callable[["GenerationResult"], None]] = None
    cache_prompt: bool = True  # with a prompt cache: reuse a kept prefix, be kept after


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
    seq: int = 0  # its sequence id
    cached_tokens: int = 0  # prompt positions reused from a kept sequence, not prefilled
    batched_with: int = 0  # most other sequences in one decode step with it


@dataclass
class _Live:
    """A sequence being generated: what was asked, what came out, its last token."""

    req: Request
    res: GenerationResult
    last: Optional[mx.array] = None  # [1] int32, on the device until read
    fork: Optional[tuple] = None  # (kept sequence, k): to copy before its first chunk
    done: bool = False  # on_done was called


@dataclass
class _Step:
    """A micro-batch's step on its way: its rows and their input tokens [B]."""

    rows: list
    tokens: mx.array


class Coordinator:
    """Rank 0's side of the ring (or the whole model when alone)."""

    def __init__(self, stage: Stage, transport=None, prefill_chunk: Optional[int] = None,
                 max_batch: Optional[int] = None, micro_batches: Optional[int] = None,
                 prompt_cache: Optional[PromptCache] = None):
        self.stage = stage
        self.prompt_cache = prompt_cache
        self.transport = transport
        self.n = stage.n_stages
        self.schedule = Schedule(self.n, max_batch, prefill_chunk, micro_batches)
        self.live: dict = {}  # sequence id -> _Live
        self.steps: dict = {}  # micro-batch id -> its last _Step sent
        self._local = deque()  # one rank: results queued at send time
        self._early = deque()  # results that came back during a stats exchange
        self._compiling: set = set()  # micro-batches whose next step is their size's first
        # Per forward message in the ring, in send order: whether a result comes back for
        # it. A wait for a result lies behind every message sent before it.
        self._ahead = deque()
        self._unread: list = []  # (sequence ids, tokens [B]) sampled but not yet read
        # (STEP action, its hidden state after rank 0's layers, lazy): the next step of a
        # micro-batch, built on the lazy result of its last step while that result was
        # still on its way (`_receive`); carried out by the next `step`.
        self._prepared: Optional[tuple] = None
        self.current = GenerationResult()  # the (first) generation in progress, for a stop
        self.heard = time.monotonic()  # when the last message came back round the ring
        # What the decode steps looked like (a server's stats): steps sent, rows in them,
        # the most rows in one step, and the most sequences decoding at once.
        self.counts = {"steps": 0, "rows": 0, "max_rows": 0, "max_decoding": 0}

    # -- the loop -------------------------------------------------------------------------

    def generate_many(self, requests: list) -> list:
        """Generate every request (all in flight as the schedule allows); their results."""
        results = [self.submit(req) for req in requests]
        self.current = results[0]
        mine = [res.seq for res in results]
        while any(not st.released or not st.finished
                  for st in (self.schedule.seqs.get(s) for s in mine) if st is not None):
            if not self.step():
                break
        self._read_tokens()
        self.retire()
        for res in results:
            _rates(res)
        return results

    def submit(self, req: Request) -> GenerationResult:
        """Add a sequence (it joins the running ones as the schedule allows); its result,
        filled in as it goes (`seq` is its id)."""
        fork = None
        if self.prompt_cache is not None and req.cache_prompt:
            fork = self.prompt_cache.match(req.prompt)
        k = fork[1] if fork else 0
        st = self.schedule.add(len(req.prompt), req.max_tokens, start=k)
        res = GenerationResult(prompt_tokens=len(req.prompt), finish_reason="length",
                               seq=st.seq, cached_tokens=k)
        self.live[st.seq] = _Live(req, res, fork=fork)
        return res

    def step(self) -> bool:
        """Carry out the schedule's next action; False when there is nothing to do."""
        if self._prepared is not None:  # built while its input came round the ring
            (action, h), self._prepared = self._prepared, None
            self._pass_on(Header(OP_FORWARD, action.id), h, action.rows)
        else:
            action = self.schedule.next_action()
            if action.kind in (RECV, DONE) and self._unread:
                self._read_tokens()  # nothing to queue first: read now
                return True
            if action.kind == DONE:
                return False
            if action.kind == RECV:
                self._receive(action.id)
                return True
            {CHUNK: self._send_chunk, STEP: self._send_step,
             RELEASE: self._send_release}[action.kind](action)
        self.schedule.sent(action)
        self._read_tokens()  # the device has the next step: now read the last one
        return True

    def cancel(self, seq: int):
        """End sequence `seq` now (its client went away): its rows leave at the next step
        and its caches are freed on every stage, not kept."""
        x, st = self.live.get(seq), self.schedule.seqs.get(seq)
        if x is None or st is None or st.finished:
            return
        x.res.finish_reason = "cancelled"
        self.schedule.stopped(seq)

    def retire(self) -> list:
        """Sequences that finished with all their tokens given: call each one's on_done
        once; forget those that hold nothing in the ring any more. Returns the results
        newly done."""
        if self._unread:
            return []  # some tokens are not read yet
        out = []
        for s, x in list(self.live.items()):
            st = self.schedule.seqs.get(s)
            if st is None or not st.finished:
                continue
            if not x.done:
                x.done = True
                _rates(x.res)
                out.append(x.res)
                if x.req.on_done is not None:
                    x.req.on_done(x.res)
            if st.released:
                if x.fork is not None:  # it never began: the kept sequence may go
                    self.prompt_cache.unpin(x.fork[0])
                    x.fork = None
                del self.live[s]
                self.schedule.forget([s])
        return out

    def idle(self) -> bool:
        """Nothing to do until a sequence is submitted."""
        return (self.schedule.idle() and not self._unread and not self.live
                and self._prepared is None)

    def generate(self, prompt: list, max_tokens: int, sampler: Sampler, eos_ids=(),
                 on_token: Optional[Callable[[int], bool]] = None) -> GenerationResult:
        """One sequence; on_token(id) -> True stops early."""
        return self.generate_many([Request(prompt, max_tokens, sampler, frozenset(eos_ids),
                                           on_token)])[0]

    # -- actions --------------------------------------------------------------------------

    def _send_chunk(self, action):
        """The next `action.length` prompt positions of a sequence."""
        s = self.schedule.seqs[action.id]
        live = self.live[action.id]
        live.res.t_start = live.res.t_start or time.perf_counter()
        if live.fork is not None:
            self._fork(action.id, *live.fork)
            live.fork = None
        tokens = mx.array([live.req.prompt[s.sent_prompt: s.sent_prompt + action.length]])
        offset = self.stage.offset(action.id)
        h = self.stage.forward(self.stage.embed(tokens), action.id)
        self._forward(Header(OP_FORWARD, action.id, offset=offset), h,
                      [action.id] if action.wants_result else None)

    def _send_step(self, action):
        """One decode step of a micro-batch (its rows changed: tell the stages first)."""
        last = self.steps.get(action.id)
        if last is None or last.rows != action.rows:
            for r in (last.rows if last is not None else []):
                if r not in action.rows and self._keepable(r):
                    self._keep(r)  # before the regroup drops its row
            if self.n > 1:
                self.transport.send(1, Header(OP_GROUP, action.id),
                                    mx.array(action.rows, mx.int32))
            if self.stage.group(action.id, action.rows):
                self._compiling.add(action.id)  # its result: the first-use deadline
        if not action.rows:
            self.steps.pop(action.id, None)
            return
        self._forward(Header(OP_FORWARD, action.id), self._build_step(action), action.rows)

    def _build_step(self, action) -> mx.array:
        """A decode step's hidden state after rank 0's layers (lazy), its tokens recorded."""
        tokens = self._step_tokens(self.steps.get(action.id), action.rows)  # [B]
        self.steps[action.id] = _Step(list(action.rows), tokens)
        self._count_step(action.rows)
        return self.stage.forward(self.stage.embed(tokens[:, None]), action.id)

    def _step_tokens(self, last: Optional[_Step], rows: list) -> mx.array:
        """Each row's last token, [B]: the previous step's for rows that stay (still on
        the device), the first token for rows that join."""
        if last is not None and last.rows == rows:
            return last.tokens
        parts = [self.live[r].last.reshape(1) for r in rows]
        return mx.concatenate(parts)

    def _send_release(self, action):
        """Free a sequence's caches on every stage (it finished outside a micro-batch), or
        keep them for prompt reuse."""
        if self._keepable(action.id):
            self._keep(action.id)
        else:
            self._release(action.id)

    def _release(self, seq: int):
        """Free sequence `seq`'s caches on every stage (kept or not)."""
        self.stage.release(seq)
        if self.n > 1:
            self.transport.send(1, Header(OP_RELEASE, seq))

    # -- prompt reuse -----------------------------------------------------------------------

    def _keepable(self, seq: int) -> bool:
        """Whether a finished sequence's caches are kept for prompt reuse."""
        x = self.live.get(seq)
        return (self.prompt_cache is not None and x is not None and x.req.cache_prompt
                and x.res.finish_reason in KEPT_REASONS)

    def _keep(self, seq: int):
        """Keep finished sequence `seq`'s caches on every stage and index its tokens;
        release what the prompt cache no longer holds."""
        positions = self.stage.keep(seq)
        if self.n > 1:
            self.transport.send(1, Header(OP_KEEP, seq))
        x = self.live[seq]
        # Positions hold the prompt, then the generated tokens in order (the last one
        # sampled was never fed; a row that rode a step after its end fed one more).
        tokens = (list(x.req.prompt) + x.res.tokens)[:positions]
        for old in self.prompt_cache.add(seq, tokens, positions):
            self._release(old)

    def _fork(self, seq: int, source: int, k: int):
        """Sequence `seq` starts from kept sequence `source`'s first k positions, on every
        stage."""
        self.stage.fork(seq, source, k)
        if self.n > 1:
            self.transport.send(1, Header(OP_FORK, seq, offset=k), mx.array([source], mx.int32))
        self.prompt_cache.unpin(source)

    def clear_prompt_cache(self):
        """Release every kept sequence that no new sequence is about to start from."""
        if self.prompt_cache is not None:
            for seq in self.prompt_cache.clear():
                self._release(seq)

    def _count_step(self, rows: list):
        """Record a decode step of `rows` (what batching achieved, for a server's stats)."""
        c = self.counts
        c["steps"] += 1
        c["rows"] += len(rows)
        c["max_rows"] = max(c["max_rows"], len(rows))
        c["max_decoding"] = max(c["max_decoding"],
                                sum(len(st.rows) for st in self.steps.values()))
        for r in rows:
            x = self.live.get(r)
            if x is not None:
                x.res.batched_with = max(x.res.batched_with, len(rows) - 1)

    def _forward(self, header: Header, h: mx.array, rows: Optional[list]):
        """Pass h [B, L, D] (rank 0's layers' output, lazy) on, or finish it here with one
        rank; `rows`: the sequences whose tokens the result gives (None: none wanted)."""
        if self.n == 1:
            if rows is None:
                mx.async_eval(h)  # the device starts; the host goes on
                return
            # The whole step up to its sampled tokens is queued at once: an async_eval of
            # the hidden state alone, with head and sampling added later, was measured to
            # wait for the device (35.7 against 41.2 tok/s on one H200).
            result = self._sample(h, rows)
            self._local.append(result)
            mx.async_eval(result[1])
            return
        self._pass_on(header, h, rows)

    def _pass_on(self, header: Header, h: mx.array, rows: Optional[list]):
        """Send h to rank 1, computing it between the header and the payload."""
        header.flags = FLAG_RETURN if rows is not None else 0
        self.stage.send(self.transport, 1, header, h)
        self._ahead.append(rows is not None)

    def _sample(self, h: mx.array, rows: list) -> tuple:
        """(logits [B, V], tokens [B]) of the last position of each row of h (lazy)."""
        logits = self.stage.head(h)
        return logits, sample_rows(logits, [self.live[s].req.sampler for s in rows])

    # -- results --------------------------------------------------------------------------

    def _receive(self, id: int):
        """The oldest result: its rows' tokens, left on the device for now.

        Across ranks, the result's sampling and, when the schedule's next action is this
        micro-batch's next step with the same rows, that step's graph through rank 0's
        layers are built on the lazy receive, before waiting for it: building them is
        host time that the last stage's compute now hides (one rank does the same with
        `mx.async_eval`)."""
        if self.n == 1:
            self._take(id, *self._local.popleft())
            return
        if self._early:  # an ABORT raises PeerLost in recv
            header, h = self._early.popleft()
            self._take(id, *self._sample_result(id, header, h))
        else:
            def build(header, h):
                self._take(id, *self._sample_result(id, header, h))
                self._prepare_next()

            compiling = id in self._compiling
            self._compiling.discard(id)
            header, _ = self.transport.recv(
                self.n - 1, self._deadline(self._answered(), compiling), build=build)
            self._check_result(id, header)
        self.heard = time.monotonic()

    def _check_result(self, id: int, header: Header):
        """The message that came back is the result of `id`, as results come in order."""
        if header.op != OP_FORWARD or header.seq != id:
            raise RuntimeError(f"coordinator expected the result of {id}, got op "
                               f"{header.op} for {header.seq}")

    def _sample_result(self, id: int, header: Header, h: mx.array) -> tuple:
        """(logits, tokens) of a result that came back from the last rank (lazy)."""
        self._check_result(id, header)
        return self._sample(h, self.steps[id].rows if id in self.steps else [id])

    def _prepare_next(self):
        """Build the schedule's next action now if it is a step of a micro-batch with the
        rows of its last step (nothing to tell the stages first); `step` sends it."""
        action = self.schedule.next_action()  # a new micro-batch's id, unused, is skipped
        last = self.steps.get(action.id) if action.kind == STEP else None
        if last is not None and last.rows == action.rows:
            self._prepared = (action, self._build_step(action))

    def _take(self, id: int, logits: mx.array, tokens: mx.array):
        """Record a result's sampled tokens [B] (on the device) for its rows."""
        rows = self.schedule.received(id)
        for i, s in enumerate(rows):
            x = self.live[s]
            if x.res.first_logits is None:
                x.res.first_logits = logits[i]
            x.last = tokens[i]
        if id in self.steps:
            self.steps[id].tokens = tokens
        self._unread.append((rows, tokens))

    def _read_tokens(self):
        """Read the sampled tokens (a host sync) and give each to its sequence."""
        unread, self._unread = self._unread, []
        for rows, tokens in unread:
            now = time.perf_counter()
            for s, token in zip(rows, tokens.tolist()):
                st = self.schedule.seqs.get(s)
                x = self.live.get(s)
                if x is None or (st.finished and len(x.res.tokens) >= st.max_new) \
                        or x.res.finish_reason != "length":
                    continue  # a row that had stopped rode one more step for nothing
                if self._accept(x, token, now):
                    self.schedule.stopped(s)
                if self.schedule.seqs[s].finished and not x.res.t_end:
                    x.res.t_end = now

    def _accept(self, x: _Live, token: int, now: float) -> bool:
        """Take `token` for a sequence; True when it ends here (EOS or on_token)."""
        if not x.res.t_first:
            x.res.t_first = now
        if token in x.req.eos_ids:
            x.res.finish_reason = "eos"
            return True
        x.res.tokens.append(token)
        if x.req.on_token is not None and x.req.on_token(token):
            x.res.finish_reason = "stop"
            return True
        return False

    # -- the ring -------------------------------------------------------------------------

    def collect_stats(self) -> list:
        """Per rank [busy seconds, peak memory GB, live caches] since the last collection
        (busy time and peak then reset).

        The request goes round the ring behind all earlier work, so every stage has
        finished what was sent before it when it adds its numbers; results of that work
        that come back first are kept for the generation in progress.
        """
        table = mx.zeros((self.n, STATS_FIELDS), mx.float32)
        table = self.stage.add_stats(table)
        if self.n > 1:
            self.transport.send(1, Header(OP_STATS), table)
            while True:
                behind = len(self._ahead) + 1  # the stats message comes after all of them
                header, payload = self.transport.recv(self.n - 1, self._deadline(behind))
                if header.op != OP_FORWARD:
                    break
                self._answered()
                self._early.append((header, payload))
            if header.op != OP_STATS:
                raise RuntimeError(f"expected the stats message back, got op {header.op}")
            table = payload
        self.heard = time.monotonic()
        return table.tolist()

    def _answered(self) -> int:
        """A result comes back: the messages it answers for, up to and including its own."""
        n = 0
        while self._ahead:
            n += 1
            if self._ahead.popleft():
                break
        return max(n, 1)

    def _deadline(self, messages: int, compiling: bool = False) -> float:
        """How long to wait for a message from the last rank that comes back behind
        `messages` forward messages: the transport's deadline (--timeout once warm) for
        each, as a long prompt's chunks queue at the slowest stage and only the last one
        answers; --first-timeout for the first step of a micro-batch of a new size (the
        stages compile for it). A rank that dies is still seen at once (its socket
        closes)."""
        each = self.transport.first_timeout if compiling else self.transport.deadline()
        return each * messages

    def stop(self, timeout: float = 30.0):
        """Tell every stage to exit and wait until the message has gone round the ring."""
        if self.n > 1:
            self.transport.send(1, Header(OP_STOP))
            self.transport.recv(self.n - 1, timeout)


def _rates(res: GenerationResult):
    """Fill ttft and rates from the timestamps."""
    res.t_end = res.t_end or time.perf_counter()
    res.ttft_s = res.t_first - res.t_start
    res.prefill_tps = res.prompt_tokens / res.ttft_s if res.ttft_s > 0 else 0.0
    steps = len(res.tokens) - 1
    span = res.t_end - res.t_first
    res.decode_tps = steps / span if steps > 0 and span > 0 else 0.0

"""The schedule: in what order the coordinator sends work into the ring.

Decode is bound by reading weights: a step costs about the same for one sequence as for
sixteen. So sequences that have their first token decode together, in micro-batches:
one message carries a micro-batch's rows [B, 1, D], each row with its own cache and
position. The schedule fills the ring three ways:
- up to one micro-batch per stage (by default), so while stage 2 steps micro-batch A,
  stage 1 steps B: with as many micro-batches as stages and enough sequences, no stage
  waits;
- a prompt is cut into chunks that follow each other without waiting (only the last
  chunk's result comes back), so stage k runs chunk i while stage k+1 runs i-1;
- prompt chunks go between decode steps (at most one chunk's worth of positions per
  step sent), so running sequences keep decoding while new prompts fill.
Rows join a micro-batch between its steps (when their prompt is in) and leave when they
finish; a STEP action lists the rows, and the coordinator tells the stages when they
changed. Results come back in the order they were sent (every message takes the same
path), so the coordinator always receives the oldest outstanding one.

The coordinator reads a step's tokens only after it has sent the next step (so the
device never waits for the host): `received` counts a token for every row at once,
`stopped` ends a row later (end of sequence, a stop string), and a row that stopped
has then ridden one step for nothing.

A sequence may start part-way into its prompt (`add(..., start=k)`): its first k
positions come from a kept sequence's caches (prompt reuse, dist_runtime/prompt_cache.py),
and only the rest is cut into chunks.

The policy is a pure object over ids; sequences and micro-batches share one id space
(the header's `seq` field). `simulate` plays it on N unit-time stages and prints the
plan as a grid of steps by rank, so plans are tested with no hosts at all.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

CHUNK, STEP, RECV, RELEASE, DONE = "chunk", "step", "recv", "release", "done"

PREFILL_CHUNK = 512  # most prompt positions per forward on one rank: bounds activations
# Across ranks, smaller: on two H200s (GLM-4.5-Air, 4 bits, 4096-token prompt) chunks of
# 128 reached the first token as fast as 512 (6.55 s vs 6.66 s) with 4.3 GB less peak
# memory per rank, where mlx's kernels for long inputs hold large transient buffers.
PIPELINE_CHUNK = 128
MIN_CHUNK = 64  # fewer positions per message waste the matmuls' width
CHUNKS_PER_STAGE = 4  # a prompt is cut in at least this many chunks per stage, when
# long enough: N stages then finish it in about (chunks + N - 1) / chunks of one pass
# over the stages, instead of a full pass per chunk.


def chunk_size(prompt_len: int, n_stages: int, largest: Optional[int] = None) -> int:
    """Prompt positions per message for one prompt on n_stages (largest: a user's cap)."""
    if largest is None:
        largest = PREFILL_CHUNK if n_stages == 1 else PIPELINE_CHUNK
    if n_stages == 1:
        return largest  # nothing to overlap with: the biggest chunks are fastest
    want = -(-prompt_len // (CHUNKS_PER_STAGE * n_stages))
    return max(1, min(largest, max(MIN_CHUNK, want)))


@dataclass
class SeqState:
    """One sequence as the schedule sees it."""

    seq: int
    prompt_len: int
    max_new: int
    chunk: int
    sent_prompt: int = 0  # prompt positions already sent (or reused: they start at `start`)
    start: int = 0  # prompt positions reused from a kept sequence, never sent
    began: bool = False  # its first chunk went: it holds caches on the stages
    generated: int = 0  # tokens produced so far (counted when their step came back)
    waiting: bool = False  # its prompt's result is outstanding
    finished: bool = False
    released: bool = False  # its caches are gone from every stage
    mb: Optional[int] = None  # the micro-batch it decodes in
    last_sent: int = -1  # schedule clock of its last chunk: the oldest goes first

    @property
    def in_prefill(self) -> bool:
        """Whether prompt positions remain to be sent."""
        return self.sent_prompt < self.prompt_len

    @property
    def joining(self) -> bool:
        """Its prompt is in and its first token out: it waits for a micro-batch."""
        return (not self.in_prefill and not self.waiting and not self.finished
                and self.mb is None)

    def next_chunk(self) -> tuple:
        """(length, wants_result) of its next prompt chunk."""
        n = min(self.chunk, self.prompt_len - self.sent_prompt)
        return n, self.sent_prompt + n == self.prompt_len


@dataclass
class MicroBatch:
    """Sequences stepped together; `rows` as of the last step sent."""

    id: int
    rows: list = field(default_factory=list)
    in_flight: bool = False


@dataclass
class Action:
    """CHUNK of a prompt, STEP of a micro-batch (its rows), RECV the oldest result,
    RELEASE a sequence's caches, or DONE. A STEP with no rows dissolves the batch."""

    kind: str
    id: Optional[int] = None
    length: int = 0
    wants_result: bool = False
    rows: list = field(default_factory=list)


class Schedule:
    """Micro-batches for decoding sequences, chunks for prompts, in one id space.

    n_stages: ring length; max_batch: the most sequences started and not finished at
    once (None: no limit), the KV room the plan reserved; micro_batches: the most decoding
    at once (default: one per stage, so every stage has work; ranks that share one device
    gain nothing from more than one, which only splits the weight reads).
    """

    def __init__(self, n_stages: int, max_batch: Optional[int] = None,
                 largest_chunk: Optional[int] = None, micro_batches: Optional[int] = None):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.n_stages, self.max_batch, self.largest_chunk = n_stages, max_batch, largest_chunk
        self.n_mbs = micro_batches or n_stages
        self.seqs: dict = {}  # id -> SeqState, in arrival order
        self.mbs: dict = {}  # id -> MicroBatch
        self.outstanding: deque = deque()  # ids whose results are on their way back
        self.clock = 0
        self._next_id = 0
        # prompt positions that may go before the next decode step: one chunk's worth
        self._credit_per_step = largest_chunk or (PREFILL_CHUNK if n_stages == 1
                                                  else PIPELINE_CHUNK)
        self._chunk_credit = self._credit_per_step

    def new_id(self) -> int:
        """A fresh id for a sequence or a micro-batch."""
        self._next_id += 1
        return self._next_id

    def add(self, prompt_len: int, max_new: int, start: int = 0) -> SeqState:
        """A sequence to generate; its prompt from position `start` on (the positions
        before it are reused) is cut as `chunk_size` says."""
        if not 0 <= start < prompt_len:
            raise ValueError(f"a sequence reuses {start} of its {prompt_len} prompt positions; "
                             f"at least the last one must be sent")
        s = SeqState(self.new_id(), prompt_len, max_new,
                     chunk_size(prompt_len - start, self.n_stages, self.largest_chunk),
                     sent_prompt=start, start=start)
        self.seqs[s.seq] = s
        return s

    # -- the policy ---------------------------------------------------------------------

    def next_action(self) -> Action:
        """The next thing the coordinator should do."""
        for s in self.seqs.values():
            if s.finished and not s.released and s.mb is None and not s.waiting \
                    and s.began:
                return Action(RELEASE, s.seq)
        joiners = [s.seq for s in self.seqs.values() if s.joining]
        for mb in self.mbs.values():
            if not mb.in_flight:
                kept = [r for r in mb.rows if not self.seqs[r].finished]
                take = max(0, self._share(len(joiners)) - len(kept))
                return Action(STEP, mb.id, rows=kept + joiners[:take])
        if joiners and len(self.mbs) < self.n_mbs:
            return Action(STEP, self.new_id(), rows=joiners[:self._share(len(joiners))])
        prefill = self._next_prompt()
        if prefill is not None:
            n, wants = prefill.next_chunk()
            return Action(CHUNK, prefill.seq, n, wants)
        if self.outstanding:
            return Action(RECV, self.outstanding[0])
        return Action(DONE)

    def _share(self, n_joiners: int) -> int:
        """Rows a micro-batch should hold: the decoding sequences spread evenly."""
        decoding = sum(len(mb.rows) for mb in self.mbs.values()) + n_joiners
        return -(-decoding // self.n_mbs)

    def _next_prompt(self) -> Optional[SeqState]:
        """The sequence whose prompt chunk may go now, if any."""
        if self.mbs and self._chunk_credit <= 0:
            return None  # decode first: a chunk's worth of positions per step sent
        started = sum(1 for s in self.seqs.values() if s.began and not s.finished)
        ready = [s for s in self.seqs.values()
                 if s.in_prefill and not s.waiting and not s.finished
                 and (s.began or self.max_batch is None or started < self.max_batch)]
        return min(ready, key=lambda s: (s.last_sent, s.seq)) if ready else None

    # -- what happened ------------------------------------------------------------------

    def sent(self, action: Action):
        """Record that `action` (CHUNK, STEP or RELEASE) was carried out."""
        if action.kind == RELEASE:
            self.seqs[action.id].released = True
            return
        if action.kind == STEP:
            mb = self.mbs.setdefault(action.id, MicroBatch(action.id))
            for r in mb.rows:
                if r not in action.rows:  # left: its caches went with the old rows
                    self.seqs[r].mb, self.seqs[r].released = None, True
            for r in action.rows:
                self.seqs[r].mb = mb.id
            mb.rows = list(action.rows)
            if not mb.rows:
                del self.mbs[mb.id]
                return
            mb.in_flight = True
            self.outstanding.append(mb.id)
            self._chunk_credit = self._credit_per_step
            return
        s = self.seqs[action.id]
        s.last_sent, self.clock = self.clock, self.clock + 1
        s.began = True
        s.sent_prompt += action.length
        self._chunk_credit -= action.length
        if action.wants_result:
            s.waiting = True
            self.outstanding.append(s.seq)

    def received(self, id: int) -> list:
        """The oldest result (id) came back: a token for each of its sequences, which
        are returned; a sequence that has all its tokens finishes."""
        assert self.outstanding.popleft() == id, "results come back in send order"
        if id in self.mbs:
            mb = self.mbs[id]
            mb.in_flight = False
            rows = [self.seqs[r] for r in mb.rows]
        else:
            rows = [self.seqs[id]]
            rows[0].waiting = False
        for s in rows:
            if not s.finished:
                s.generated += 1
                s.finished = s.generated >= s.max_new
        return [s.seq for s in rows]

    def stopped(self, seq: int):
        """Sequence `seq` ends early (end of sequence, a stop string, a cancel). One that
        never began holds nothing anywhere: it counts as released at once."""
        s = self.seqs[seq]
        s.finished = True
        if not s.began and not s.waiting:
            s.released = True

    def forget(self, seqs):
        """Drop finished sequences that no longer hold anything anywhere."""
        for s in list(seqs):
            st = self.seqs.get(s)
            if st is not None and st.finished and st.released:
                del self.seqs[s]

    def idle(self) -> bool:
        """Nothing started and unfinished: no work, no micro-batch, nothing in flight."""
        return not self.mbs and not self.outstanding and all(
            s.finished and (s.released or not s.began) for s in self.seqs.values())


def simulate(schedule: Schedule, n_stages: int, max_steps: int = 10_000,
             stop_at: Optional[dict] = None):
    """Play the schedule on n unit-time stages; returns (grid, steps).

    grid[t][r] is the label of the work stage r does at step t ('' when idle): for a
    prompt chunk the sequence's letter and chunk number ('A1'), for a decode step the
    micro-batch's rows' letters ('ABd'). Each stage takes one step per message; a message
    enters stage r+1 the step after stage r finished it; the coordinator (stage 0) also
    samples, free. `stop_at`: {seq: tokens} ends a sequence early after that many.
    """
    queues = [deque() for _ in range(n_stages)]  # messages waiting at each stage
    returned = deque()  # results back at the coordinator
    grid, t = [], 0
    chunk_no: dict = {}
    stop_at = stop_at or {}
    while t < max_steps:
        while True:  # the coordinator acts: sends while it may, receives what arrived
            a = schedule.next_action()
            if a.kind == RECV and returned and returned[0] == a.id:
                returned.popleft()
                for s in schedule.received(a.id):
                    st = schedule.seqs[s]
                    if not st.finished and stop_at.get(s) == st.generated:
                        schedule.stopped(s)
                continue
            if a.kind in (CHUNK, STEP, RELEASE):
                label = _label(schedule, a, chunk_no)
                schedule.sent(a)
                if label:
                    queues[0].append((label, a.id, a.kind == STEP or a.wants_result))
                continue
            break
        if a.kind == DONE and not any(queues):
            return grid, t
        row, moved = [], []
        for r in range(n_stages):
            if queues[r]:
                msg = queues[r].popleft()
                row.append(msg[0])
                moved.append((r, msg))
            else:
                row.append("")
        for r, msg in moved:
            if r + 1 < n_stages:
                queues[r + 1].append(msg)
            elif msg[2]:
                returned.append(msg[1])
        grid.append(row)
        t += 1
    raise RuntimeError(f"schedule did not finish in {max_steps} steps")


def _letter(seq: int) -> str:
    return chr(ord("A") + (seq - 1) % 26)


def _label(schedule: Schedule, a: Action, chunk_no: dict) -> str:
    """What a message shows in the grid ('' for messages that take no stage time)."""
    if a.kind == CHUNK:
        chunk_no[a.id] = chunk_no.get(a.id, 0) + 1
        return f"{_letter(a.id)}{chunk_no[a.id]}"
    if a.kind == STEP and a.rows:
        return "".join(_letter(r) for r in a.rows) + "d"
    return ""


def format_grid(grid: list) -> str:
    """The plan as text: one line per step, one column per rank."""
    n = len(grid[0]) if grid else 0
    width = max([4] + [len(c) for row in grid for c in row])
    head = "step | " + " ".join(f"r{r:<{width - 1}}" for r in range(n))
    lines = [head, "-" * len(head)]
    for t, row in enumerate(grid):
        lines.append(f"{t:4d} | " + " ".join(f"{c or '.':<{width}}" for c in row))
    return "\n".join(lines)


def busy_fraction(grid: list) -> list:
    """Per rank, the share of steps it worked."""
    if not grid:
        return []
    return [sum(1 for row in grid if row[r]) / len(grid) for r in range(len(grid[0]))]

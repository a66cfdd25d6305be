"""The schedule: in what order the coordinator sends work into the ring.

One sequence alone keeps one stage busy at a time. The schedule fills the ring two ways:
- a long prompt is cut into chunks that follow each other without waiting: only the
  last chunk's result comes back, so stage k runs chunk i while stage k+1 runs i-1;
- several sequences are in flight at once (up to `max_in_flight` results outstanding),
  so while stage 2 decodes sequence A, stage 1 decodes B.
Results come back in the order they were sent (every message takes the same path), so
the coordinator always receives the oldest outstanding one.

The policy is a pure object: `next_action` looks only at the sequences' states. The
same object drives the real coordinator and `simulate`, which plays a plan on N
unit-time stages and prints it as a grid of steps by rank, so plans are tested with no
hosts at all.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

SEND, RECV, DONE = "send", "recv", "done"

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
    sent_prompt: int = 0  # prompt positions already sent
    generated: int = 0  # tokens sampled so far
    waiting: bool = False  # a result for it is outstanding
    finished: bool = False
    last_sent: int = -1  # schedule clock of its last message: the oldest goes first

    @classmethod
    def new(cls, seq: int, prompt_len: int, max_new: int, n_stages: int,
            largest_chunk: Optional[int] = None) -> "SeqState":
        """A sequence about to start, its prompt cut as `chunk_size` says."""
        return cls(seq, prompt_len, max_new, chunk_size(prompt_len, n_stages, largest_chunk))

    @property
    def in_prefill(self) -> bool:
        """Whether prompt positions remain to be sent."""
        return self.sent_prompt < self.prompt_len

    def next_work(self) -> tuple:
        """(length, wants_result) of the next message for this sequence."""
        if self.in_prefill:
            n = min(self.chunk, self.prompt_len - self.sent_prompt)
            return n, self.sent_prompt + n == self.prompt_len
        return 1, True


@dataclass
class Action:
    """SEND work for `seq` (length positions, wants_result), RECV the oldest result, DONE."""

    kind: str
    seq: Optional[int] = None
    length: int = 0
    wants_result: bool = False


@dataclass
class Schedule:
    """Round-robin over ready sequences, with at most max_in_flight results outstanding."""

    max_in_flight: int
    outstanding: deque = field(default_factory=deque)
    clock: int = 0

    def next_action(self, states: list) -> Action:
        """The next thing the coordinator should do."""
        ready = [s for s in states if not s.finished and not s.waiting]
        if ready and len(self.outstanding) < self.max_in_flight:
            s = min(ready, key=lambda s: (s.last_sent, s.seq))
            n, wants = s.next_work()
            return Action(SEND, s.seq, n, wants)
        if self.outstanding:
            return Action(RECV, self.outstanding[0])
        if ready:  # only reachable with max_in_flight == 0
            raise ValueError("max_in_flight must be at least 1")
        return Action(DONE)

    def sent(self, s: SeqState, action: Action):
        """Record that `action` (a SEND) went out for sequence state `s`."""
        s.last_sent, self.clock = self.clock, self.clock + 1
        if s.in_prefill:
            s.sent_prompt += action.length
        if action.wants_result:
            s.waiting = True
            self.outstanding.append(s.seq)

    def received(self, s: SeqState, finished: bool):
        """Record the oldest result arrived (a token was sampled); finished ends s."""
        assert self.outstanding.popleft() == s.seq, "results come back in send order"
        s.waiting = False
        s.generated += 1
        s.finished = finished or s.generated >= s.max_new


def simulate(schedule: Schedule, states: list, n_stages: int, max_steps: int = 10_000):
    """Play the schedule on n unit-time stages; returns (grid, steps).

    grid[t][r] is the label of the work stage r does at step t ('' when idle): the
    sequence letter and, for prompt chunks, the chunk number, e.g. 'A1' or 'Bd' for a
    decode step. Each stage takes one step per message; a message enters stage r+1
    the step after stage r finished it; the coordinator (stage 0) also samples, free.
    """
    by_seq = {s.seq: s for s in states}
    queues = [deque() for _ in range(n_stages)]  # messages waiting at each stage
    returned = deque()  # results back at the coordinator
    grid, t = [], 0
    chunk_no = {s.seq: 0 for s in states}
    while t < max_steps:
        # The coordinator acts (sends as long as it may; receives what has arrived).
        while True:
            a = schedule.next_action(states)
            if a.kind == SEND:
                s = by_seq[a.seq]
                label = _label(s, chunk_no)
                schedule.sent(s, a)
                queues[0].append((label, a.seq, a.wants_result))
                continue
            if a.kind == RECV and returned and returned[0] == a.seq:
                returned.popleft()
                schedule.received(by_seq[a.seq], finished=False)
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
        for r, (label, seq, wants) in moved:
            if r + 1 < n_stages:
                queues[r + 1].append((label, seq, wants))
            elif wants:
                returned.append(seq)
        grid.append(row)
        t += 1
    raise RuntimeError(f"schedule did not finish in {max_steps} steps")


def _label(s: SeqState, chunk_no: dict) -> str:
    letter = chr(ord("A") + (s.seq - 1) % 26)
    if s.in_prefill:
        chunk_no[s.seq] += 1
        return f"{letter}{chunk_no[s.seq]}"
    return f"{letter}d"


def format_grid(grid: list) -> str:
    """The plan as text: one line per step, one column per rank."""
    n = len(grid[0]) if grid else 0
    head = "step | " + " ".join(f"r{r:<3}" for r in range(n))
    lines = [head, "-" * len(head)]
    for t, row in enumerate(grid):
        lines.append(f"{t:4d} | " + " ".join(f"{c or '.':<4}" for c in row))
    return "\n".join(lines)


def busy_fraction(grid: list) -> list:
    """Per rank, the share of steps it worked."""
    if not grid:
        return []
    return [sum(1 for row in grid if row[r]) / len(grid) for r in range(len(grid[0]))]

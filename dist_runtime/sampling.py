"""Choosing the next token from logits, on the coordinator only.

Greedy, temperature, top-k, top-p (nucleus), min-p and a repetition penalty, each
sequence with its own settings. A seeded run draws step t's random numbers from
key(seed, t), so the same seed gives the same text whatever the number of ranks and
whichever sequences share its micro-batch (only rank 0 ever samples).

Tokens stay on the device (`Sampler.sample`, `sample_rows` are lazy): the coordinator
builds the next step from them before it reads them. The penalty's window may hold
such unread tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

STEP_KEY_STRIDE = 1_000_003  # prime > any generation length: (seed, step) pairs never collide


# Each field's range, checked by run.py's options and by the server's requests alike
# (each names the field its own way: FLAGS here, API_NAMES in launch/api_requests.py).
RANGES = (
    ("temp", lambda v: v >= 0, ">= 0 (0 is greedy)"),
    ("top_k", lambda v: v >= 0, ">= 0 (0 turns it off)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("min_p", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("repetition_penalty", lambda v: v > 0, "> 0 (1.0 turns it off)"),
    ("repetition_window", lambda v: v >= 0, ">= 0 (0: no token is penalised)"),
)
FLAGS = {"temp": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
         "repetition_penalty": "--repetition-penalty"}


@dataclass
class SamplingParams:
    """How to pick tokens; temp == 0 means greedy (argmax)."""

    temp: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already seen
    repetition_window: int = 64  # how many recent tokens the penalty looks at
    seed: Optional[int] = None

    def out_of_range(self) -> Optional[tuple]:
        """(field, value, what it must be) of the first field out of its range, else
        None. NaN is out of every range."""
        for field, ok, what in RANGES:
            value = getattr(self, field)
            if not ok(value):
                return field, value, what
        return None

    def check(self):
        """Raise ValueError naming the first out-of-range field by its run.py flag."""
        bad = self.out_of_range()
        if bad is not None:
            field, value, what = bad
            raise ValueError(f"{FLAGS.get(field, field)} must be {what}, got {value}")


def apply_repetition_penalty(logits: mx.array, recent: list, penalty: float) -> mx.array:
    """Divide positive / multiply negative logits of recently seen tokens by `penalty`.

    Returns a new array; the caller's `logits` are left unchanged.
    """
    if penalty == 1.0 or not recent:
        return logits
    seen = mx.zeros(logits.shape, mx.bool_)
    if all(isinstance(t, int) for t in recent):
        seen[mx.array(sorted(set(recent)))] = True
    else:  # some tokens are still on the device
        seen[mx.stack([mx.array(t, mx.int32).reshape(()) for t in recent])] = True
    penalised = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalised, logits)


def filter_logits(logits: mx.array, p: SamplingParams) -> mx.array:
    """Set to -inf every token that top-k, top-p or min-p excludes; logits [V], scaled."""
    neg = mx.array(-float("inf"), logits.dtype)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = mx.sort(logits)[-p.top_k]
        logits = mx.where(logits < kth, neg, logits)
    probs = mx.softmax(logits, axis=-1)
    if p.min_p > 0:
        logits = mx.where(probs < p.min_p * probs.max(), neg, logits)
    if p.top_p < 1.0:
        order = mx.argsort(-probs)
        sorted_probs = probs[order]
        # keep a token if the mass before it is still below top_p (the first always stays)
        before = mx.cumsum(sorted_probs) - sorted_probs
        keep_sorted = before < p.top_p
        keep = mx.zeros_like(keep_sorted)
        keep[order] = keep_sorted
        logits = mx.where(keep, logits, neg)
    return logits


class Sampler:
    """Stateful sampler: remembers the step count (for seeded keys) and recent tokens."""

    def __init__(self, params: SamplingParams, prompt: Optional[list] = None):
        params.check()
        self.p = params
        self.recent = _last(list(prompt or []), params.repetition_window)
        self.step = 0
        self.seed = params.seed

    @property
    def greedy(self) -> bool:
        """Plain argmax: no temperature and no penalty (batched in one op)."""
        return self.p.temp == 0 and self.p.repetition_penalty == 1.0

    def sample(self, logits: mx.array) -> mx.array:
        """logits [V] (the last position's) -> next token id, a lazy int32 scalar."""
        logits = apply_repetition_penalty(logits.astype(mx.float32), self.recent,
                                          self.p.repetition_penalty)
        if self.p.temp == 0:
            token = mx.argmax(logits)
        else:
            logits = filter_logits(logits / self.p.temp, self.p)
            key = step_key(self.seed, self.step) if self.seed is not None else None
            token = mx.random.categorical(logits, key=key)
        self.step += 1
        if self.p.repetition_penalty != 1.0:
            self.recent = _last(self.recent + [token], self.p.repetition_window)
        return token.astype(mx.int32)

    def __call__(self, logits: mx.array) -> int:
        """logits [V] -> next token id, read now."""
        return int(self.sample(logits).item())


def sample_rows(logits: mx.array, samplers: list) -> mx.array:
    """logits [B, V] -> tokens [B] int32 (lazy), row i by samplers[i]'s own settings."""
    if all(s.greedy for s in samplers):
        for s in samplers:
            s.step += 1
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    return mx.stack([s.sample(logits[i]) for i, s in enumerate(samplers)])


def _last(tokens: list, n: int) -> list:
    """The last n tokens (none for n == 0, where a plain [-n:] slice would keep all)."""
    return tokens[len(tokens) - n:] if n > 0 else []


def step_key(seed: int, step: int) -> mx.array:
    """A key for step `step` that depends only on the seed and the step."""
    return mx.random.key((seed * STEP_KEY_STRIDE + step) % (2**63))

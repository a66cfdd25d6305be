#!/usr/bin/env python3
"""What cutting the model into stages costs, in one process, with no hop.

    python3 launch/split_cost.py --model glm4_moe --synthetic glm-4.5-air --bits 4 \\
        --dtype bfloat16 --rows 16 --stages 2

Times a decode step of `--rows` sequences three ways on the same weights and caches:
as one rank runs it (step t+1 built and queued while step t runs), whole but waited
for each step, and cut into `--stages` parts evaluated one after the other, as
stages with one micro-batch run them. The last two differ from the first by the lost
lookahead, which no pipeline can keep: a stage cannot start step t+1 before step t's
token has come round the ring. Next to a job's figures it separates what the pipeline
costs from what its hops and a shared GPU cost (README, "One H200").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from dist_runtime.source import Source  # noqa: E402
from launch.options import DTYPES  # noqa: E402

PROMPT = 128  # positions in the caches before the timed steps
WARM_STEPS = 3


class Stepper:
    """The model with caches for `rows` sequences after a PROMPT-long prefill."""

    def __init__(self, model, rows: int):
        self.model, self.layers = model, model.owned_layers()
        self.caches = model.make_caches()
        logits = model(mx.array([list(range(1, PROMPT + 1))] * rows), self.caches)
        self.tokens = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(self.tokens)

    def part(self, h, lo: int, hi: int):
        """Layers [lo, hi) on h (lazy)."""
        for (i, layer), cache in zip(self.layers[lo:hi], self.caches[lo:hi]):
            h = self.model.forward_layer(i, layer, h, cache)
        return h

    def step(self, tokens, cuts: list):
        """A greedy step, evaluated after each part but the last (lazy at the end)."""
        h = self.model.embed(tokens[:, None])
        for lo, hi in zip(cuts, cuts[1:]):
            if lo:
                mx.eval(h)
            h = self.part(h, lo, hi)
        return mx.argmax(self.model.head(h)[:, -1], axis=-1)


def ms_per_step(model, rows: int, steps: int, cuts: list, lookahead: bool) -> float:
    """Milliseconds a decode step, after a warm-up."""
    s = Stepper(model, rows)
    tok = s.tokens
    for _ in range(WARM_STEPS):
        tok = s.step(tok, cuts)
        mx.eval(tok)
    t0 = time.perf_counter()
    if lookahead:
        nxt = s.step(tok, cuts)
        mx.async_eval(nxt)
        for _ in range(steps - 1):
            cur, nxt = nxt, s.step(nxt, cuts)
            mx.async_eval(nxt)
            cur.tolist()
        nxt.tolist()
    else:
        for _ in range(steps):
            tok = s.step(tok, cuts)
            tok.tolist()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--synthetic", metavar="PRESET")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--bits", type=int, choices=[4, 8])
    p.add_argument("--rows", type=int, default=1, help="sequences decoding together")
    p.add_argument("--stages", type=int, default=2, help="parts to cut the layers into")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per figure")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    source = Source(args.model, args.synthetic, 0, args.dtype, args.bits)
    n = len(source.costs().weight)
    if not 1 <= args.stages <= n:
        p.error(f"--stages must be between 1 and the model's {n} layers, got {args.stages}")
    model = source.load(range(0, n), True, True, "")[0]
    whole, cuts = [0, n], [n * k // args.stages for k in range(args.stages + 1)]
    for _ in range(args.repeats):
        ahead = ms_per_step(model, args.rows, args.steps, whole, True)
        waited = ms_per_step(model, args.rows, args.steps, whole, False)
        split = ms_per_step(model, args.rows, args.steps, cuts, False)
        print(f"{args.rows} rows: {ahead:.1f} ms a step with lookahead, {waited:.1f} waited "
              f"for, {split:.1f} in {args.stages} parts one after the other "
              f"({ahead / split:.2f} of the lookahead rate)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

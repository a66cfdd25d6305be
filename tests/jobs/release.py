#!/usr/bin/env python3
"""Test job (run under mlx.launch): how many sequences' caches each rank holds.

Rank 0 generates one sequence and, while it is in flight, asks every rank (OP_STATS,
round the ring) how many sequences' caches it holds; again once it has finished (its
OP_RELEASE went round first); then generates several sequences in flight at once and
asks a third time. Prints one JSON line on rank 0:
{"during": [count per rank], "after_one": [...], "after_many": [...], "sequences": k}.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_runtime.devices import pin_gpu  # noqa: E402
from dist_runtime.lifecycle import Lifecycle, block_signals  # noqa: E402

block_signals()
pin_gpu()

import argparse  # noqa: E402

from dist_runtime.coordinator import Request  # noqa: E402
from dist_runtime.job import start_job  # noqa: E402
from dist_runtime.sampling import Sampler, SamplingParams  # noqa: E402
from launch.options import add_model_args  # noqa: E402

LIVE = 2  # the stats row's field: sequences whose caches the rank holds


def main():
    life = Lifecycle()
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--sequences", type=int, default=3)
    args = p.parse_args()
    job = start_job(args, life)
    if job.rank != 0:
        job.serve_stage()
        return
    coord = job.coordinator()

    def live():
        return [int(row[LIVE]) for row in coord.collect_stats()]

    during = []

    def on_token(_token):
        # One sequence alone: when a token arrives nothing else is outstanding, so the
        # stats message may go round the ring here.
        if not during:
            during.extend(live())
        return False

    coord.generate([1, 2, 3, 4, 5], 4, Sampler(SamplingParams()), on_token=on_token)
    after_one = live()
    coord.generate_many([Request([7, 8, 9][: i + 1], 3 + 2 * i, Sampler(SamplingParams()))
                         for i in range(args.sequences)])
    after_many = live()
    coord.stop()
    print(json.dumps({"during": during, "after_one": after_one, "after_many": after_many,
                      "sequences": args.sequences}), flush=True)


if __name__ == "__main__":
    main()

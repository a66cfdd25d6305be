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

from dist_runtime.cluster import gather_infos, init_group  # noqa: E402
from dist_runtime.coordinator import Coordinator, Request  # noqa: E402
from dist_runtime.sampling import Sampler, SamplingParams  # noqa: E402
from dist_runtime.stage import stage_loop  # noqa: E402
from dist_runtime.transport import Transport, Watchdog  # noqa: E402
from launch.run import activation_dtype, add_model_args, hidden_width, start  # noqa: E402

LIVE = 2  # the stats row's field: sequences whose caches the rank holds


def main():
    life = Lifecycle()
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--sequences", type=int, default=3)
    args = p.parse_args()
    group = init_group()
    infos = gather_infos(group)
    life.rank, life.me = group.rank(), infos[group.rank()].name
    _, _, stage, config, _, _ = start(args, life, group, infos, Watchdog(life.me))
    transport = Transport(group, hidden_width(config), activation_dtype(stage.model),
                          [i.name for i in infos], args.timeout, life,
                          first_timeout=args.first_timeout)
    if group.rank() != 0:
        stage_loop(stage, transport, args.first_timeout)
        return
    coord = Coordinator(stage, transport)

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
                         for i in range(args.sequences)], max_in_flight=args.sequences)
    after_many = live()
    coord.stop()
    print(json.dumps({"during": during, "after_one": after_one, "after_many": after_many,
                      "sequences": args.sequences}), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Test job (run under mlx.launch): the same prompts one at a time, then all in flight.

Prints one JSON line on rank 0: {"alone": [[ids]...], "together": [[ids]...]} where
'alone' uses whole-prompt prefill and one sequence at a time, and 'together' uses small
prefill chunks with every sequence in flight at once. Greedy, EOS ignored.
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

import numpy as np  # noqa: E402

from dist_runtime.cluster import gather_infos, init_group  # noqa: E402
from dist_runtime.coordinator import Coordinator, Request  # noqa: E402
from dist_runtime.sampling import Sampler, SamplingParams  # noqa: E402
from dist_runtime.stage import stage_loop  # noqa: E402
from dist_runtime.transport import Transport, Watchdog  # noqa: E402
from launch.run import activation_dtype, add_model_args, hidden_width, start  # noqa: E402


def main():
    life = Lifecycle()
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--prompt-lens", default="37,5,70")
    p.add_argument("--gen", type=int, default=10)
    p.add_argument("--chunk", type=int, default=8)
    args = p.parse_args()
    group = init_group()
    infos = gather_infos(group)
    life.rank, life.me = group.rank(), infos[group.rank()].name
    source, plan, stage, config, _, _ = start(args, life, group, infos, Watchdog(life.me))
    transport = None
    if group.size() > 1:
        transport = Transport(group, hidden_width(config), activation_dtype(stage.model),
                              [i.name for i in infos], args.timeout, life,
                              first_timeout=args.first_timeout)
    if group.rank() != 0:
        stage_loop(stage, transport, args.first_timeout)
        return
    vocab = config.get("text_config", config)["vocab_size"]
    lens = [int(v) for v in args.prompt_lens.split(",")]
    prompts = [np.random.default_rng(i).integers(0, vocab, n).tolist() for i, n in enumerate(lens)]
    # Different generation lengths, so sequences finish at different times.
    gens = [args.gen + 3 * i for i in range(len(prompts))]

    def reqs():
        return [Request(pr, g, Sampler(SamplingParams())) for pr, g in zip(prompts, gens)]

    whole = Coordinator(stage, transport, prefill_chunk=10_000)
    alone = [whole.generate_many([r])[0].tokens for r in reqs()]
    chunked = Coordinator(stage, transport, prefill_chunk=args.chunk)
    chunked._next_seq = 100  # fresh sequence ids
    together = [r.tokens for r in chunked.generate_many(reqs(), max_in_flight=len(prompts))]
    chunked.stop()
    print(json.dumps({"alone": alone, "together": together}), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Test job (run under mlx.launch): the same prompts one at a time, then all in flight.

Prints one JSON line on rank 0: {"alone": [[ids]...], "together": [[ids]...],
"sampled_alone": ..., "sampled_together": ...} where 'alone' uses whole-prompt prefill
and one sequence at a time, and 'together' small prefill chunks with every sequence in
flight at once, decoding in micro-batches (joining and finishing at different steps).
The greedy pair runs first; the sampled pair gives each sequence its own settings
(temperature, top-k, top-p, min-p, repetition penalty, seed). EOS ignored.
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

from dist_runtime.coordinator import Coordinator, Request  # noqa: E402
from dist_runtime.job import start_job  # noqa: E402
from dist_runtime.sampling import Sampler, SamplingParams  # noqa: E402
from launch.options import add_model_args  # noqa: E402


def main():
    life = Lifecycle()
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--prompt-lens", default="37,5,70")
    p.add_argument("--gen", type=int, default=10)
    p.add_argument("--chunk", type=int, default=8)
    args = p.parse_args()
    job = start_job(args, life)
    if job.rank != 0:
        job.serve_stage()
        return
    stage, transport = job.stage, job.transport
    vocab = job.config.get("text_config", job.config)["vocab_size"]
    lens = [int(v) for v in args.prompt_lens.split(",")]
    prompts = [np.random.default_rng(i).integers(0, vocab, n).tolist() for i, n in enumerate(lens)]
    # Different generation lengths, so sequences finish at different times.
    gens = [args.gen + 3 * i for i in range(len(prompts))]

    settings = [dict(temp=0.9, seed=11), dict(temp=1.2, top_k=20, seed=12),
                dict(temp=0.7, top_p=0.8, repetition_penalty=1.3, seed=13),
                dict(temp=1.0, min_p=0.05, seed=14)]

    def reqs(sampled=False):
        return [Request(pr, g, Sampler(SamplingParams(**(settings[i % len(settings)]
                                                         if sampled else {})), pr))
                for i, (pr, g) in enumerate(zip(prompts, gens))]

    whole = Coordinator(stage, transport, prefill_chunk=10_000)
    chunked = Coordinator(stage, transport, prefill_chunk=args.chunk)
    out = {}
    for name, sampled in (("", False), ("sampled_", True)):
        out[name + "alone"] = [whole.generate_many([r])[0].tokens for r in reqs(sampled)]
        out[name + "together"] = [r.tokens for r in chunked.generate_many(reqs(sampled))]
    chunked.stop()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

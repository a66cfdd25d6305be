#!/usr/bin/env python3
"""Test job (one process, or under mlx.launch): prompt reuse through the ring.

Rank 0 runs conversations with a prompt cache: first turns (several decoding together,
so some are kept from a micro-batch's rows), then follow-ups that extend each first
turn's prompt and reply, reused (OP_KEEP, OP_FORK) and again with a full prefill
(cache_prompt off). Prints one JSON line on rank 0: {"reused": tokens per follow-up,
"fresh": ..., "cached": cached_tokens per follow-up, "kept": kept caches per rank,
"live": live caches per rank, "after_clear": kept caches per rank after releasing all}.
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

from dist_runtime.coordinator import Coordinator, Request  # noqa: E402
from dist_runtime.job import start_job  # noqa: E402
from dist_runtime.prompt_cache import PromptCache  # noqa: E402
from dist_runtime.sampling import Sampler, SamplingParams  # noqa: E402
from launch.options import add_model_args  # noqa: E402

LIVE, KEPT = 2, 3  # stats fields: caches in progress, caches kept


def main():
    life = Lifecycle()
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--prompt-lens", default="37,70,21")
    args = p.parse_args()
    job = start_job(args, life)
    if job.rank != 0:
        job.serve_stage()
        return
    cache = PromptCache(100_000, job.stage.model.reuse_floor, min_reuse=4)
    coord = Coordinator(job.stage, job.transport, prefill_chunk=8, max_batch=8,
                        prompt_cache=cache)
    vocab = job.config.get("text_config", job.config)["vocab_size"]
    lens = [int(v) for v in args.prompt_lens.split(",")]
    firsts = [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(n)] for i, n in enumerate(lens)]
    greedy = SamplingParams()
    done = coord.generate_many([Request(p, 9, Sampler(greedy)) for p in firsts])
    follow = [p + r.tokens + [5, 6, 7 + i] for i, (p, r) in enumerate(zip(firsts, done))]

    def turn(prompts, cache_prompt):
        return coord.generate_many([Request(p, 6, Sampler(greedy), cache_prompt=cache_prompt)
                                    for p in prompts])

    reused = turn(follow, True)
    stats = coord.collect_stats()
    fresh = turn(follow, False)
    coord.clear_prompt_cache()
    after = coord.collect_stats()
    coord.stop()
    print(json.dumps({"reused": [r.tokens for r in reused], "fresh": [r.tokens for r in fresh],
                      "cached": [r.cached_tokens for r in reused],
                      "prompt_lens": [len(p) for p in follow],
                      "kept": [int(row[KEPT]) for row in stats],
                      "live": [int(row[LIVE]) for row in stats],
                      "after_clear": [int(row[KEPT]) for row in after]}), flush=True)


if __name__ == "__main__":
    main()

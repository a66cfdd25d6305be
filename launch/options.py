"""Command-line options every launcher shares: the model, its split, and the deadlines.

run.py, bench.py and the tests' jobs take these alike, so one hostfile and one set of
model options work for all. Errors print as '[rank r (host)] error: ...' and exit 2 on
every rank, before any rank connects.
"""

from __future__ import annotations

import argparse
import socket
import sys

from dist_runtime.lifecycle import env_rank
from dist_runtime.planning import parse_memory_limits
from dist_runtime.schedule import PIPELINE_CHUNK, PREFILL_CHUNK
from dist_runtime.source import DTYPES

# Deadlines on every wait for another rank (see the README's Troubleshooting section):
DEFAULT_TIMEOUT = 20.0  # s a rank waits for a neighbour once the first prompt went round
DEFAULT_FIRST_TIMEOUT = 600.0  # s until then: first kernel compile, a long first prefill
LOAD_TIMEOUT = 1800.0  # s for every rank to start, pass the checks and load (100 GB loads)
# s for every rank to start and connect the ring: mlx.launch starts them together, so
# this is the slowest host's start (ssh, Python, mlx), not its load. A rank that failed
# to start (its port in use) leaves the others waiting in mlx's init, where no signal
# reaches them (dist_runtime/init_watch.py): this bounds that wait.
START_TIMEOUT = 120.0
HEARTBEAT_TIMEOUT = 6.0  # s without a heartbeat before a rank is named, whatever it does


class RankParser(argparse.ArgumentParser):
    """Argument errors as '[rank r (host)] error: ...' and exit 2, on every rank alike."""

    def error(self, message):
        rank = env_rank()
        print(f"[rank {0 if rank is None else rank} ({socket.gethostname()})] error: "
              f"{message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def layer_counts(text: str) -> list:
    """argparse type for --split: '10,12,12' -> [10, 12, 12]."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--split must be comma-separated layer counts, e.g. 10,12; got {text!r}")


def add_model_args(p: argparse.ArgumentParser):
    """Options that choose the model, how it is split, and the deadlines."""
    p.add_argument("--model", required=True, help="alias (glm4_moe, llama4, glm, openelm, "
                   "lille-130m), local folder, or Hugging Face repo id")
    p.add_argument("--synthetic", metavar="PRESET", help="random weights of a preset (tiny, "
                   "glm-4.5-air, llama-4-scout, ...) instead of a checkpoint; --model names "
                   "the architecture")
    p.add_argument("--synthetic-seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="synthetic weights' dtype")
    p.add_argument("--bits", type=int, choices=[4, 8], help="quantize synthetic weights")
    p.add_argument("--split", type=layer_counts,
                   help="layers per rank, e.g. 10,12,12,12 (default: by memory)")
    p.add_argument("--memory-limit", type=parse_memory_limits, metavar="GB[,GB...]",
                   help="plan with at most this much memory per rank (one value for all, "
                   "or one per rank), e.g. to leave room for other programs")
    p.add_argument("--max-kv-tokens", type=int, default=4096,
                   help="KV-cache positions per sequence to reserve memory for when planning")
    p.add_argument("--max-batch", type=int, default=1,
                   help="sequences decoding at once (micro-batches through the ring); the "
                   "plan reserves KV room for this many times --max-kv-tokens")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="decoding sequences are stepped in this many groups through the "
                   "ring (default: one per device, so every rank has work: ranks of one "
                   "host sharing its GPU count once, CPU ranks once each)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help=f"most prompt positions per message (default {PREFILL_CHUNK} on one "
                   f"rank, {PIPELINE_CHUNK} across ranks; shorter prompts use smaller chunks)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds a rank waits for another before it names it as lost "
                   "(after the first prompt has gone round the ring)")
    p.add_argument("--first-timeout", type=float, default=DEFAULT_FIRST_TIMEOUT,
                   help="the same until the first prompt has gone round (first compile, "
                   "long first prefill); at least --timeout")
    p.add_argument("--start-timeout", type=float, default=START_TIMEOUT,
                   help="seconds for every rank to start and connect the ring (a rank "
                   "that failed to start leaves the others waiting this long)")
    p.add_argument("--load-timeout", type=float, default=LOAD_TIMEOUT,
                   help="seconds for every rank to start, pass the checks and load its layers")
    p.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT,
                   help="seconds without a heartbeat from a rank (sent by a thread of its "
                   "own, whatever the rank computes or loads) before it is named as stopped "
                   "or unreachable")
    p.add_argument("--liveness-port", type=int, default=0, metavar="PORT",
                   help="rank r listens for the other ranks' heartbeats on TCP port PORT + r "
                   "(default: its ring port's number, free again once the ring connected)")


def check_at_least(p: argparse.ArgumentParser, args, names, low: int):
    """p.error (exit 2) for the first of these integer options given and below `low`."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got "
                    f"{getattr(args, name)}")


def check_model_args(p: argparse.ArgumentParser, args):
    """The range checks argparse cannot express; p.error (exit 2) on the first failure."""
    check_at_least(p, args, ("prefill_chunk", "max_kv_tokens", "max_batch", "micro_batches"), 1)
    if not 0 <= args.liveness_port < 65536:
        p.error(f"--liveness-port must be a TCP port (1 to 65535, or 0 for the ring's "
                f"ports), got {args.liveness_port}")
    for name in ("timeout", "first_timeout", "start_timeout", "load_timeout",
                 "heartbeat_timeout"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be above 0 seconds, got "
                    f"{getattr(args, name)}")
    if args.first_timeout < args.timeout:
        p.error(f"--first-timeout ({args.first_timeout:g} s) is below --timeout "
                f"({args.timeout:g} s); the first prompt's waits may take longer than later "
                f"ones, never shorter: raise --first-timeout to at least {args.timeout:g}")

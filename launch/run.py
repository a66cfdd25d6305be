#!/usr/bin/env python3
"""Generate text with a model split across the ranks of an mlx.launch job (or one process).

    python launch/run.py --model glm4_moe --synthetic tiny --prompt "Hello"
    mlx.launch --hostfile hostfiles/localhost-2.json launch/run.py --model glm4_moe \
        --synthetic tiny --prompt "Hello"

Rank 0 tokenizes, samples and prints; each rank loads only its layers. With --json the
last line on stdout is one JSON object (tokens, text, timings, memory, ranks, plan).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mlx.launch runs us as a file

from dist_runtime.devices import pin_gpu  # noqa: E402
from dist_runtime.lifecycle import Lifecycle, block_signals, env_rank  # noqa: E402

block_signals()  # before mlx starts its threads: see dist_runtime/lifecycle.py
pin_gpu()  # before mlx starts CUDA: one GPU per rank

import mlx.core as mx  # noqa: E402

from dist_runtime import preflight  # noqa: E402
from dist_runtime.cluster import gather_infos, init_group, make_plan  # noqa: E402
from dist_runtime.coordinator import PIPELINE_CHUNK, PREFILL_CHUNK, Coordinator  # noqa: E402
from dist_runtime.costs import text_config  # noqa: E402
from dist_runtime.errors import PreflightError, StartError, fail  # noqa: E402
from dist_runtime.sampling import Sampler, SamplingParams  # noqa: E402
from dist_runtime.source import DTYPES  # noqa: E402
from dist_runtime.stage import Stage, stage_loop  # noqa: E402
from dist_runtime.tokenizer import StreamingDetokenizer  # noqa: E402
from dist_runtime.transport import EXIT_PEER_LOST, Transport, Watchdog  # noqa: E402

# Deadlines on every wait for another rank (see the README's Troubleshooting section):
DEFAULT_TIMEOUT = 20.0  # s a rank waits for a neighbour once the first prompt went round
DEFAULT_FIRST_TIMEOUT = 600.0  # s until then: first kernel compile, a long first prefill
LOAD_TIMEOUT = 1800.0  # s for every rank to start, pass the checks and load (100 GB loads)


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
    """Options that choose the model and how it is split (shared with launch/bench.py)."""
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
    p.add_argument("--memory-limit", type=preflight.parse_memory_limits, metavar="GB[,GB...]",
                   help="plan with at most this much memory per rank (one value for all, "
                   "or one per rank), e.g. to leave room for other programs")
    p.add_argument("--max-kv-tokens", type=int, default=4096,
                   help="KV-cache positions to reserve memory for when planning")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help=f"most prompt positions per message (default {PREFILL_CHUNK} on one "
                   f"rank, {PIPELINE_CHUNK} across ranks; shorter prompts use smaller chunks)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds a rank waits for another before it names it as lost "
                   "(after the first prompt has gone round the ring)")
    p.add_argument("--first-timeout", type=float, default=DEFAULT_FIRST_TIMEOUT,
                   help="the same until the first prompt has gone round (first compile, "
                   "long first prefill)")
    p.add_argument("--load-timeout", type=float, default=LOAD_TIMEOUT,
                   help="seconds for every rank to start, pass the checks and load its layers")


def parse_args(argv=None):
    """Command-line options."""
    p = RankParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", default="Hello")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="seed sampling: same seed, same text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens regardless")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is")
    p.add_argument("--json", action="store_true", help="last stdout line: a JSON summary")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be at least 1 (how many tokens to generate), got "
                f"{args.max_tokens}")
    for name in ("prefill_chunk", "max_kv_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("timeout", "first_timeout", "load_timeout"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be above 0 seconds, got "
                    f"{getattr(args, name)}")
    from dist_runtime.tokenizer import TokenizerError, check_prompt_text
    try:  # on every rank alike, not as rank 0's tokenizer error after the start
        check_prompt_text(args.prompt)
    except TokenizerError as e:
        p.error(str(e))
    try:  # sampling options fail here, on every rank, not on rank 0 after loading
        SamplingParams(args.temp, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                       seed=args.seed).check()
    except ValueError as e:
        p.error(str(e))
    return args


def hidden_width(config: dict) -> int:
    """Width of the hidden state that travels between stages."""
    c = text_config(config)
    return c.get("hidden_size") or c.get("model_dim") or c["n_embd"]


def activation_dtype(model):
    """dtype of the hidden state: the float dtype most parameters use."""
    from collections import Counter

    from mlx.utils import tree_flatten

    kinds = Counter(p.dtype for _, p in tree_flatten(model.parameters())
                    if p.dtype in (mx.float32, mx.float16, mx.bfloat16))
    return kinds.most_common(1)[0][0]


def start(args, life, group, infos, guard, argv=None):
    """Check the job before any weight is read, load this rank's layers, and wait until
    every rank has loaded (dist_runtime/preflight.py). Every rank raises the same error
    for a failed check; a rank that cannot load raises its own, the others name it.

    Returns (source, plan, stage, config, load_s, opened); `opened` has rank 0's
    tokenizer and prompt ids.
    """
    rank, n = group.rank(), group.size()
    me = infos[rank]
    argv = sys.argv[1:] if argv is None else argv
    prompt = getattr(args, "prompt", None)  # launch/bench.py makes its own prompts
    opened = preflight.open_model(args, rank, me.host, argv,
                                  prompt=prompt if rank == 0 else None)
    facts = preflight.gather_facts(group, opened.facts, guard, args.load_timeout)
    for warning in preflight.check_facts(infos, facts, rank):
        print(f"[{me.name}] warning: {warning.message}", file=sys.stderr, flush=True)
    plan = make_plan(opened.costs, infos, args.max_kv_tokens, args.split, args.memory_limit)
    life.set("loading")
    t0 = time.perf_counter()
    error, loaded = None, None
    try:
        loaded = opened.source.load(plan.ranges[rank], has_embed=rank == 0, has_head=rank == 0,
                                    log_prefix=f"[{me.name}] ")
    except Exception as e:  # the others learn it at the barrier, and name this rank
        error = e
    load_s = time.perf_counter() - t0
    if error is None:  # as soon as loaded: the ranks' lines come at different moments
        model, config, files, nbytes = loaded
        report_stage(me.name, model, files, nbytes, load_s)
    preflight.ready_barrier(group, infos, rank, error, guard, args.load_timeout)
    return opened.source, plan, Stage(model, rank, n), config, load_s, opened


def report_stage(me: str, model, files: list, nbytes: int, load_s: float):
    """One stderr line per rank: what it holds and what it read (operators and tests)."""
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    layers = [i for i, _ in model.owned_layers()]
    top = sorted({n.split(".layers.")[0] if ".layers." in n else n.rsplit(".", 1)[0]
                  for n, _ in params if ".layers." not in n and not n.startswith("layers.")})
    info = {"layers": [layers[0], layers[-1] + 1], "modules": top, "pid": os.getpid(),
            "param_bytes": sum(p.nbytes for _, p in params), "loaded_bytes": nbytes,
            "files": files, "load_s": round(load_s, 3)}
    print(f"[{me}] stage {json.dumps(info)}", file=sys.stderr, flush=True)


def run_coordinator(args, life, stage, transport, summarise, opened):
    """Rank 0: generate, stream; on a stop signal or a lost rank, print what it has.

    `opened` holds the tokenizer and the prompt ids from the start checks, which have
    also refused a prompt longer than the context.
    """
    tok, prompt = opened.tokenizer, opened.prompt
    coord = Coordinator(stage, transport, args.prefill_chunk)
    sampler = Sampler(SamplingParams(args.temp, args.top_k, args.top_p, args.min_p,
                                     args.repetition_penalty, seed=args.seed), prompt)
    detok = StreamingDetokenizer(tok)
    text = []

    stop_window = max((len(s) for s in args.stop), default=0)
    tail = [""]  # the last characters, enough to see a stop string cross pieces

    def on_token(token: int) -> bool:
        piece = detok.add(token)
        text.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
        if not stop_window:
            return False
        tail[0] = (tail[0] + piece)[-(stop_window + len(piece)):]
        return any(s in tail[0] for s in args.stop)

    def on_stop(reason: str):
        res = coord.current
        res.finish_reason = reason
        partial = "".join(text) + detok.finish()
        if args.json:
            print(json.dumps(summarise(res, partial, len(prompt))), flush=True)
        else:
            print(detok.finish(), flush=True)
        print(f"[{life.me}] stopped after {len(res.tokens)} generated tokens",
              file=sys.stderr, flush=True)

    life.on_stop = on_stop
    eos = set() if args.ignore_eos else tok.eos_ids
    res = coord.generate(prompt, args.max_tokens, sampler, eos, on_token)
    life.on_stop = None
    tail = detok.finish()
    text.append(tail)
    full = "".join(text)
    for s in args.stop:
        if s in full:
            full = full[: full.index(s)]
    if not args.json:
        print(tail, flush=True)
    peaks = [round(row[1], 4) for row in coord.collect_stats()]  # through the ring: any device
    coord.stop()
    return res, full, len(prompt), peaks


def summary(res, text, n_prompt, peaks, load_s, infos, plan) -> dict:
    """The --json object."""
    return {
        "tokens": res.tokens, "text": text, "prompt_tokens": n_prompt,
        "ttft_s": res.ttft_s, "prefill_tps": res.prefill_tps, "decode_tps": res.decode_tps,
        "peak_memory_gb": max(peaks) if peaks else None, "peak_memory_gb_per_rank": peaks,
        "finish_reason": res.finish_reason, "load_s": load_s, "ranks": len(infos),
        "plan": [{"rank": i.rank, "host": i.host, "layers": [r.start, r.stop]}
                 for i, r in zip(infos, plan.ranges)],
        "first_logits": None if not os.environ.get("PIPELINE_DUMP_LOGITS") or
        res.first_logits is None else res.first_logits.astype(mx.float32).tolist(),
    }


def main(argv=None) -> int:
    """Entry point on every rank.

    Errors exit non-zero on every rank with one '[rank r (host)] error: ...' line:
    arguments (2, before connecting), the start checks and loading (2, all ranks alike),
    a lost, silent or failed rank (3, naming it), a signal (128 + signal).
    """
    life = Lifecycle()
    args = parse_args(argv)
    try:
        preflight.check_start_env(life.me)
    except PreflightError as e:
        fail(life.me, e, life.rank or 0, life=life)
    # Deadlines for the collectives before the ring carries data (start, checks, load).
    guard = Watchdog(life.me, on_expire=lambda what: life.exit_with_error(what, EXIT_PEER_LOST))
    try:
        group = init_group(guard, args.load_timeout)
    except StartError as e:
        fail(life.me, e, life.rank or 0, life=life)
    rank = life.rank = group.rank()
    infos = gather_infos(group, guard, args.load_timeout)
    me = life.me = guard.me = infos[rank].name
    transport = None
    try:
        life.set("checking the job before loading")
        source, plan, stage, config, load_s, opened = start(args, life, group, infos, guard, argv)
        if group.size() > 1:
            transport = Transport(group, hidden_width(config), activation_dtype(stage.model),
                                  [i.name for i in infos], args.timeout, life,
                                  first_timeout=args.first_timeout)
        if rank != 0:
            life.set("serving as a stage")
            stage_loop(stage, transport, args.first_timeout)
            print(f"[{me}] finished", file=sys.stderr, flush=True)
            return 0
        life.set("generating")
        res, text, n_prompt, peaks = run_coordinator(
            args, life, stage, transport,
            lambda r, t, n: summary(r, t, n, [], load_s, infos, plan), opened)
    except Exception as e:  # noqa: BLE001  (one error line, the others told, then exit)
        fail(me, e, rank, abort=transport, life=life)
    if args.json:
        print(json.dumps(summary(res, text, n_prompt, peaks, load_s, infos, plan)), flush=True)
    print(f"[{me}] finished", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

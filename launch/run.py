#!/usr/bin/env python3
"""Generate text with a model split across the ranks of an mlx.launch job (or one process).

    python launch/run.py --model glm4_moe --synthetic tiny --prompt "Hello"
    mlx.launch --hostfile hostfiles/localhost-2.json launch/run.py --model glm4_moe \
        --synthetic tiny --prompt "Hello"

Rank 0 tokenizes, samples and prints; each rank loads only its layers. With --json the
last line on stdout is one JSON object (tokens, text, timings, memory, ranks, plan);
--json-out FILE writes it to FILE as well, also when the job is stopped or fails.
"""

from __future__ import annotations

import signal

# First of all, before any import: a stop signal that arrives while this rank starts must
# wait for the signal thread (dist_runtime/lifecycle.py), not kill it without a word.
signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mlx.launch runs us as a file

from dist_runtime.devices import pin_gpu  # noqa: E402
from dist_runtime.lifecycle import ORPHAN, Lifecycle, block_signals  # noqa: E402

block_signals()  # the full set (the same as above, kept in one place)
pin_gpu()  # before mlx starts CUDA: one GPU per rank

import mlx.core as mx  # noqa: E402

from dist_runtime.errors import fail  # noqa: E402
from dist_runtime.job import start_job  # noqa: E402
from dist_runtime.sampling import Sampler, SamplingParams  # noqa: E402
from dist_runtime.tokenizer import StreamingDetokenizer  # noqa: E402
from dist_runtime.faults import PeerLost  # noqa: E402
from dist_runtime.transport import NonFiniteError  # noqa: E402

NAN_NEWS_S = 2.0  # s rank 0 waits for a stage to report the NaN it sent before blaming its head
from launch.options import RankParser, add_model_args, check_model_args  # noqa: E402


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
    p.add_argument("--json-out", metavar="FILE", help="rank 0 writes the JSON summary to "
                   "FILE (on its host), also when the job is stopped or fails")
    p.add_argument("--dump-logits", action="store_true", help="with --json: add the logits "
                   "that chose the first token (for comparing implementations)")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be at least 1 (how many tokens to generate), got "
                f"{args.max_tokens}")
    check_model_args(p, args)
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


def run_coordinator(args, life, job):
    """Rank 0: generate, stream; on a stop signal or a lost rank, print what it has.

    The job's start checks tokenized the prompt and refused one longer than the context.
    """
    tok, prompt = job.opened.tokenizer, job.opened.prompt
    n_max, limit = generation_room(len(prompt), args.max_tokens, job.opened.facts.context,
                                   args.max_kv_tokens)
    if limit != "length":
        room = (f"the model's context of {job.opened.facts.context} positions"
                if limit == "context" else f"--max-kv-tokens {args.max_kv_tokens}")
        print(f"[{life.me}] warning: --max-tokens {args.max_tokens} runs past {room}: the "
              f"prompt's {len(prompt)} tokens leave room for {n_max}; generation stops there "
              f"(finish_reason \"{limit}\")", file=sys.stderr, flush=True)
    coord = job.coordinator(args.prefill_chunk)
    sampler = Sampler(SamplingParams(args.temp, args.top_k, args.top_p, args.min_p,
                                     args.repetition_penalty, seed=args.seed), prompt)
    detok = StreamingDetokenizer(tok)
    text = []

    stop_window = max((len(s) for s in args.stop), default=0)
    tail = [""]  # the last characters, enough to see a stop string cross pieces

    def on_token(token: int) -> bool:
        if not text:  # the first token: its logits are in
            check_logits(coord.current, job)
        piece = detok.add(token)
        text.append(piece)
        if not args.json:
            try:
                print(piece, end="", flush=True)
            except OSError:  # nothing reads stdout: the launcher is gone
                life.stop(signal.SIGHUP, ORPHAN, "its stdout to the launcher closed")
        if not stop_window:
            return False
        tail[0] = (tail[0] + piece)[-(stop_window + len(piece)):]
        return any(s in tail[0] for s in args.stop)

    def on_stop(reason: str):
        res = coord.current
        res.finish_reason = reason
        partial = "".join(text) + detok.finish()
        out = summary(args, res, partial, len(prompt), [], job)
        write_json_out(args, out)  # first: stdout may lead nowhere (the launcher is gone)
        try:
            print(json.dumps(out) if args.json else detok.finish(), flush=True)
            print(f"[{life.me}] stopped after {len(res.tokens)} generated tokens",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    life.on_stop = on_stop
    eos = set() if args.ignore_eos else tok.eos_ids
    res = coord.generate(prompt, n_max, sampler, eos, on_token)
    check_logits(res, job)  # also when the first token was an end of sequence
    if res.finish_reason == "length":
        res.finish_reason = limit
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
    job.expect_end()
    coord.stop()
    job.finish()
    return res, full, len(prompt), peaks


def generation_room(n_prompt: int, max_tokens: int, context: int, max_kv_tokens: int) -> tuple:
    """(tokens to generate at most, why it stops there): "length" for --max-tokens,
    "context" when the model's context (0: unknown) is full first, "max_kv_tokens" when
    the KV positions the plan reserved memory for are. The start checks refused a
    prompt that leaves no room at all."""
    limits = [(max_tokens, "length")]
    if context:
        limits.append((context - n_prompt, "context"))
    if max_kv_tokens:
        limits.append((max_kv_tokens - n_prompt, "max_kv_tokens"))
    n, why = min(limits, key=lambda x: x[0])  # the first of equals: --max-tokens
    return max(n, 1), why


def check_logits(res, job):
    """The logits that chose the first token must be finite: NaN or infinity there means
    broken weights (each stage checks the hidden state it sends, so with several ranks
    this is rank 0's head: the final norm and the LM head)."""
    logits = res.first_logits
    if logits is None or mx.all(mx.isfinite(logits)).item():
        return
    if job.liveness is not None:  # a stage that sent NaN says so as it exits: name it
        blame = job.liveness.culprit(wait=NAN_NEWS_S)
        if blame is not None:
            raise PeerLost(job.faults.describe(blame), blame)
    where = (f"{job.infos[0].name}'s head (the final norm and LM head) produced them from "
             f"finite hidden states" if job.size > 1 else "the model's weights")
    raise NonFiniteError(
        f"the logits that chose the first token hold NaN or infinity: {where}; the weights "
        f"are likely corrupt (download the checkpoint again), or the activations overflow "
        f"their dtype (float16?)")


def summary(args, res, text, n_prompt, peaks, job) -> dict:
    """The --json object."""
    out = {
        "tokens": res.tokens, "text": text, "prompt_tokens": n_prompt,
        "ttft_s": res.ttft_s, "prefill_tps": res.prefill_tps, "decode_tps": res.decode_tps,
        "peak_memory_gb": max(peaks) if peaks else None, "peak_memory_gb_per_rank": peaks,
        "finish_reason": res.finish_reason, "load_s": job.load_s, "ranks": job.size,
        "plan": [{"rank": i.rank, "host": i.host, "layers": [r.start, r.stop]}
                 for i, r in zip(job.infos, job.plan.ranges)],
    }
    if args.dump_logits and res.first_logits is not None:
        out["first_logits"] = res.first_logits.astype(mx.float32).tolist()
    return out


def write_json_out(args, out: dict):
    """--json-out: the summary into FILE, whole or not at all (written aside, then renamed)."""
    if not args.json_out:
        return
    path = Path(args.json_out)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    """Entry point on every rank.

    Errors exit non-zero on every rank with one '[rank r (host)] error: ...' line:
    arguments (2, before connecting), the start checks and loading (2, all ranks alike),
    a lost, silent or failed rank (3, naming it), a signal (128 + signal).
    """
    life = Lifecycle()
    args = parse_args(argv)
    if args.json_out and life.rank in (0, None):  # a failure before generating: say so
        life.on_stop = lambda reason: write_json_out(  # noqa: E731
            args, {"tokens": [], "text": "", "finish_reason": reason})
    job = None
    try:
        job = start_job(args, life, argv, prompt=args.prompt)
        if job.rank != 0:
            return job.serve_as_stage(life)
        life.set("generating")
        res, text, n_prompt, peaks = run_coordinator(args, life, job)
        job.close()  # the GPU wired limit back (on a Mac); errors: Lifecycle's cleanups
    except Exception as e:  # noqa: BLE001  (one error line, the others told, then exit)
        fail(e, life, job.faults if job is not None else None)
    out = summary(args, res, text, n_prompt, peaks, job)
    write_json_out(args, out)
    if args.json:
        print(json.dumps(out), flush=True)
    life.finished()
    return 0


if __name__ == "__main__":
    sys.exit(main())

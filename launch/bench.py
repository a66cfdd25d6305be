#!/usr/bin/env python3
"""Benchmark the pipeline: sweep prompt length, generation length and concurrency.

    mlx.launch --hostfile hostfiles/localhost-2.json launch/bench.py --model glm4_moe \
        --synthetic tiny --prompt-lens 128,1024 --gen-lens 32 --concurrency 1,4

Prompts are random ids of exactly the asked length and EOS is ignored, so every row
does the same work; a row's sequences decode together (micro-batches). Each row: time
to first token, prefill tokens/s, decode tokens/s per sequence and in aggregate,
end-to-end tokens/s, each stage's busy fraction, each rank's peak memory. Where mlx-lm
is installed it runs in the same job (launch/baseline.py): on one rank on our very
arrays, alternating with ours `--repeats` times (rows are then medians); across ranks
its pipeline mode, after ours. Writes JSON, CSV and a PNG plot to --out and prints a
table and the ratios on rank 0.
"""

from __future__ import annotations

import csv
import gc
import json
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_runtime.devices import pin_gpu  # noqa: E402
from dist_runtime.lifecycle import Lifecycle, block_signals  # noqa: E402

block_signals()  # before mlx starts its threads: see dist_runtime/lifecycle.py
pin_gpu()  # before mlx starts CUDA: one GPU per rank

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from dist_runtime.coordinator import Coordinator, Request  # noqa: E402
from dist_runtime.errors import fail  # noqa: E402
from dist_runtime.job import start_job  # noqa: E402
from dist_runtime.sampling import Sampler, SamplingParams  # noqa: E402
from launch.baseline import Baseline  # noqa: E402
from launch.options import RankParser, add_model_args, check_model_args  # noqa: E402
from launch.sweep import (format_row, points, ints, prompt_ids, sweep, vocab_size,  # noqa: E402
                          warm_up_size)



WARM_BATCH_TOKENS = 8  # a warm-up of each batch size: its kernels compile on first use


def parse_args(argv=None):
    """Command-line options."""
    p = RankParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompt-lens", type=ints, default=[128])
    p.add_argument("--gen-lens", type=ints, default=[32])
    p.add_argument("--concurrency", type=ints, default=[1])
    p.add_argument("--points", type=points, help="explicit P:G:C triples instead of the sweep, "
                   "e.g. 4096:64:1,128:64:16")
    p.add_argument("--baseline", choices=["auto", "off", "only"], default="auto",
                   help="run mlx-lm too, where it is installed: on one rank in the same "
                   "process on the same arrays, alternating with ours; across ranks its "
                   "pipeline mode after ours ('only': skip our runtime)")
    p.add_argument("--repeats", type=int, default=1, help="one rank: measure ours and "
                   "mlx-lm alternately this many times; rows are medians")
    p.add_argument("--out", default="runs/bench", help="folder for JSON, CSV and PNG")
    p.add_argument("--label", default="", help="a note stored with every row")
    args = p.parse_args(argv)
    check_model_args(p, args)
    # Every row's sequences decode together: reserve KV room for the largest.
    args.max_batch = max(args.max_batch, max(C for _, _, C in sweep(args)))
    return args


def measure(coord: Coordinator, vocab: int, P: int, G: int, C: int) -> dict:
    """One sweep point on our runtime: C sequences at once, batched as the job allows."""
    greedy = SamplingParams()
    reqs = [Request(prompt_ids(vocab, P, i), G, Sampler(greedy)) for i in range(C)]
    coord.collect_stats()  # reset busy time and peak memory
    t0 = time.perf_counter()
    results = coord.generate_many(reqs)
    wall = time.perf_counter() - t0
    stats = coord.collect_stats()
    first = min(r.t_first for r in results)
    end = max(r.t_end for r in results)
    decoded = sum(len(r.tokens) - 1 for r in results)
    return {
        "impl": "pipeline", "prompt_len": P, "gen_len": G, "concurrency": C,
        "ttft_s": float(np.mean([r.ttft_s for r in results])),
        "prefill_tps": C * P / (max(r.t_first for r in results) - t0),
        "decode_tps_per_seq": float(np.mean([r.decode_tps for r in results])),
        "decode_tps_aggregate": decoded / (end - first) if end > first else 0.0,
        "e2e_tps": C * G / wall,
        "busy_fraction": [round(s[0] / wall, 3) for s in stats],
        "peak_memory_gb": [round(s[1], 3) for s in stats],
        "wall_s": wall,
    }


def warm_up_ours(args, coord, vocab: int):
    """One generation at the sweep's largest point, and one per batch size: mlx's kernels
    compile on first use of each shape."""
    P, G = warm_up_size(args)
    coord.generate_many([Request(prompt_ids(vocab, P, -1), G, Sampler(SamplingParams()))])
    for C in sorted({C for _, _, C in sweep(args) if C > 1}):
        coord.generate_many([Request(prompt_ids(vocab, P, -2 - i), WARM_BATCH_TOKENS,
                                     Sampler(SamplingParams())) for i in range(C)])


def run_ours(args, coord, vocab: int) -> list:
    """Every sweep point once."""
    rows = []
    for P, G, C in sweep(args):
        rows.append(measure(coord, vocab, P, G, C))
        print(format_row(rows[-1]), flush=True)
    return rows


def medians(rows: list) -> list:
    """One row per (implementation, point): the median of each rate over the repeats."""
    groups: dict = {}
    errors = [r for r in rows if "error" in r]
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["impl"], r["prompt_len"], r["gen_len"], r["concurrency"]),
                              []).append(r)
    out = []
    for (impl, P, G, C), rs in groups.items():
        m = dict(rs[0], repeats=len(rs))
        for k in ("ttft_s", "prefill_tps", "decode_tps_per_seq", "decode_tps_aggregate",
                  "e2e_tps", "wall_s"):
            m[k] = float(np.median([r.get(k, 0.0) for r in rs]))
        m["decode_tps_aggregate_runs"] = [round(r["decode_tps_aggregate"], 1) for r in rs]
        out.append(m)
    return out + [dict(t) for t in {tuple(sorted(e.items())) for e in errors}]


def ratios(summary: list) -> list:
    """Lines comparing ours with mlx-lm at each point both measured (medians); a point
    where either side has only an error row (mlx-lm cannot batch Llama 4) has none."""
    measured = [r for r in summary if "error" not in r]
    ref = {(r["prompt_len"], r["gen_len"], r["concurrency"]): r for r in measured
           if r["impl"].startswith("mlx-lm")}
    lines = []
    for r in measured:
        other = ref.get((r["prompt_len"], r["gen_len"], r["concurrency"]))
        if r["impl"] == "pipeline" and other:
            lines.append(f"P={r['prompt_len']} G={r['gen_len']} C={r['concurrency']}: "
                         f"decode {r['decode_tps_aggregate']:.1f} against {other['impl']} "
                         f"{other['decode_tps_aggregate']:.1f} tok/s = "
                         f"{r['decode_tps_aggregate'] / other['decode_tps_aggregate']:.2f}x")
    return lines


def write_outputs(out: Path, rows: list, meta: dict, runs: Optional[list] = None):
    """JSON (rows + meta, and every run where rows are medians over repeats), CSV, and a
    PNG of decode rates if matplotlib is there."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                  "runs": runs or rows}, indent=1))
    keys = sorted({k for r in rows for k in r})
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl in sorted({r["impl"] for r in rows}):
        mine = [r for r in rows if r["impl"] == impl and "error" not in r]
        # Time to first token depends on the prompt only: one line per implementation.
        ttft = {}
        for r in sorted(mine, key=lambda r: r["prompt_len"]):
            if r["concurrency"] == 1:
                ttft.setdefault(r["prompt_len"], r["ttft_s"])
        if ttft:
            axes[0].plot(list(ttft), list(ttft.values()), marker="o", label=impl)
        # Aggregate decode against concurrency, one line per (prompt, generation).
        for P, G in sorted({(r["prompt_len"], r["gen_len"]) for r in mine}):
            sel = sorted((r for r in mine if (r["prompt_len"], r["gen_len"]) == (P, G)),
                         key=lambda r: r["concurrency"])
            axes[1].plot([r["concurrency"] for r in sel],
                         [r["decode_tps_aggregate"] for r in sel], marker="o",
                         label=f"{impl} P={P} G={G}")
    axes[0].set(xlabel="prompt tokens", ylabel="time to first token (s)", xscale="log")
    axes[1].set(xlabel="concurrent sequences", ylabel="aggregate decode tokens/s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(meta.get("title", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


def pipeline_baseline(args, job) -> list:
    """mlx-lm's pipeline on the same ranks, after ours (every rank, in lockstep): our
    weights and wired memory freed first, as its model loads its own; rank 0's rows."""
    job.stage = None
    job.close()
    gc.collect()
    mx.clear_cache()
    base = Baseline(args, job.source, job.group, job.config)
    base.warm_up(args)
    return base.rows(sweep(args))


def main(argv=None) -> int:
    """Entry point on every rank."""
    life = Lifecycle()
    args = parse_args(argv)
    if args.baseline == "only":
        return baseline_only(args)
    try:
        job = start_job(args, life, argv)
    except Exception as e:  # noqa: BLE001  (one error line, the others told, then exit)
        fail(e, life)
    if job.rank != 0:
        job.serve_stage()
        if args.baseline != "off":  # mlx-lm's pipeline runs in lockstep on every rank
            pipeline_baseline(args, job)
        else:
            job.close()  # give back the wired memory (Metal)
        return 0
    life.set("benchmarking")
    vocab = vocab_size(job.config)
    coord = job.coordinator(args.prefill_chunk)  # --max-batch: the most at once
    warm_up_ours(args, coord, vocab)
    side_by_side = job.size == 1 and args.baseline != "off"
    baseline = (Baseline(args, job.source, job.group, job.config, share=job.stage.model)
                if side_by_side else None)
    if baseline is not None:
        baseline.warm_up(args)
    rows = []
    for _ in range(args.repeats if side_by_side else 1):  # ours and mlx-lm, alternating
        rows += run_ours(args, coord, vocab)
        if baseline is not None:
            rows += baseline.rows(sweep(args))
    coord.stop()
    if job.size > 1 and args.baseline != "off":
        del coord
        rows += pipeline_baseline(args, job)
    summary = medians(rows)
    for line in ratios(summary):
        print(line, flush=True)
    n = job.size
    meta = {"ranks": n, "hosts": [i.host for i in job.infos], "mlx": mx.__version__,
            "device": str(mx.default_device()), "model": args.model,
            "synthetic": args.synthetic, "bits": args.bits, "dtype": args.dtype,
            "plan": job.plan.describe(), "load_s": job.load_s, "label": args.label,
            "repeats": args.repeats if side_by_side else 1,
            "baseline_shares_our_arrays": bool(baseline and baseline.shared),
            "title": f"{args.model} {args.synthetic or ''}"
                     f"{f' {args.bits}-bit' if args.bits else ''}, {n} ranks, "
                     f"mlx {mx.__version__}, {mx.default_device()}"}
    write_outputs(Path(args.out), summary, meta, runs=rows)
    print(f"wrote {args.out}/results.json, results.csv, results.png", flush=True)
    job.close()
    return 0


def baseline_only(args) -> int:
    """--baseline only: mlx-lm alone, e.g. when both would not fit in memory at once."""
    from dist_runtime.cluster import init_group
    from dist_runtime.source import Source

    group = init_group()
    source = Source(args.model, args.synthetic, args.synthetic_seed, args.dtype, args.bits)
    base = Baseline(args, source, group, source.config)
    base.warm_up(args)
    rows = base.rows(sweep(args))
    if group.rank() == 0:
        write_outputs(Path(args.out), rows, {"ranks": group.size(), "mlx": mx.__version__,
                                             "device": str(mx.default_device()),
                                             "model": args.model, "label": args.label})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's sweep points and rows, shared by our runtime's rows (launch/bench.py)
and the mlx-lm baseline's (launch/baseline.py): both measure the same points, warm up
the same way, and print the same table.
"""

from __future__ import annotations

import argparse

import numpy as np


def warm_up_size(args) -> tuple:
    """(prompt, generation) of the warm-up: the largest of the sweep.

    mlx's CUDA backend compiles kernels on first use for each new range of key lengths
    (measured: decode after a 6000-token prompt took 8.8 ms a step the first time, 4.5
    the second), so a warm-up must reach every length the timed rows will.
    """
    pts = sweep(args)
    return max(p for p, _, _ in pts), max(g for _, g, _ in pts)


def ints(text: str) -> list:
    """'128,1024' -> [128, 1024]."""
    return [int(v) for v in text.split(",") if v]


def points(text: str) -> list:
    """'4096:64:1,128:64:16' -> [(4096, 64, 1), (128, 64, 16)]."""
    try:
        return [tuple(int(v) for v in t.split(":")) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--points wants P:G:C triples, got {text!r}")


def sweep(args) -> list:
    """The (prompt, generation, concurrency) points to measure."""
    if args.points:
        return args.points
    return [(P, G, C) for P in args.prompt_lens for G in args.gen_lens for C in args.concurrency]


def prompt_ids(vocab: int, length: int, index: int) -> list:
    """A deterministic random prompt of exactly `length` ids."""
    return np.random.default_rng(1000 + index).integers(0, vocab, length).tolist()


def vocab_size(config: dict) -> int:
    """The model's vocabulary size."""
    return config.get("text_config", config)["vocab_size"]


def format_row(r: dict) -> str:
    """One table line."""
    if "error" in r:
        return f"{r['impl']:<18} P={r['prompt_len']:<6} G={r['gen_len']:<5} error: {r['error']}"
    busy = "/".join(f"{b:.2f}" for b in r.get("busy_fraction", [])) or "-"
    mem = "/".join(f"{m:.2f}" for m in r.get("peak_memory_gb", [])) or "-"
    return (f"{r['impl']:<18} P={r['prompt_len']:<6} G={r['gen_len']:<5} C={r['concurrency']:<3} "
            f"ttft={r['ttft_s']:8.3f}s prefill={r['prefill_tps']:9.1f} tok/s "
            f"decode/seq={r['decode_tps_per_seq']:7.1f} agg={r['decode_tps_aggregate']:7.1f} "
            f"e2e={r.get('e2e_tps', 0):7.1f} busy={busy} peakGB={mem}")

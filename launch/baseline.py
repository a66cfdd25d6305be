"""mlx-lm on the same weights: the benchmark's baseline, in the same job.

Runs only where mlx-lm is installed. On one rank it is mlx-lm's plain model: its
`stream_generate` for single sequences and its `batch_generate` for the rows with
several (architectures mlx-lm cannot batch, such as Llama-4, get an error row saying
so). On several ranks it is mlx-lm's pipeline mode, which splits the layers evenly in
reverse rank order and all-gathers the hidden state after the last stage, so every rank
runs the same loop in lockstep; it generates one sequence at a time. Synthetic weights
are filled by name with the same seeded values our stages use
(dist_runtime/synthetic.py), so both sides compute on identical numbers where the names
agree.
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
import numpy as np

from dist_runtime.synthetic import fill_model
from models import get_module
from launch.sweep import format_row, sweep, warm_up_size


def mlxlm_model(args, source, group, config):
    """(model, tokenizer) of mlx-lm in pipeline mode, holding this rank's share."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import _get_classes, sharded_load

    if not args.synthetic:
        return sharded_load(str(source.path), group, None)[:2]
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if group.size() > 1:
        if not hasattr(getattr(model, "model", None), "pipeline"):
            raise NotImplementedError(f"mlx-lm has no pipeline mode for {config['model_type']}")
        model.model.pipeline(group)
    # mlx-lm's `layers` property is a slice copy in pipeline mode: name the real list,
    # which sits where our model of the same architecture keeps it.
    fill_model(model, source.seed, source.dtype, source.bits, source.group_size,
               layers_path=get_module(config["model_type"]).Model.LAYERS_PATH)
    return model, load_tokenizer(source.tokenizer_folder())


def run_baseline(args, source, group, config) -> list:
    """Baseline rows, or rows with the error that prevented them."""
    rank = group.rank()
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        return []
    from mlx_lm.generate import stream_generate

    try:
        model, tokenizer = mlxlm_model(args, source, group, config)
    except Exception as e:  # no pipeline mode for this architecture, etc.
        return _error_rows(e, rank)
    tokenizer._eos_token_ids = set()  # ignore EOS, as our rows do
    vocab = config.get("text_config", config)["vocab_size"]
    rows = []
    todo = sorted({(P, G) for P, G, _ in sweep(args)})
    warm_len, warm_gen = warm_up_size(args)
    warm = np.random.default_rng(999).integers(0, vocab, warm_len).tolist()
    try:
        for _ in stream_generate(model, tokenizer, warm, max_tokens=warm_gen):
            pass
        barrier(group)
    except Exception as e:  # e.g. CUDA: "Recv has no CUDA implementation"
        return _error_rows(e, rank)
    for P, G in todo:
        prompt = np.random.default_rng(1000).integers(0, vocab, P).tolist()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        last = None
        for last in stream_generate(model, tokenizer, prompt, max_tokens=G):
            pass
        wall = time.perf_counter() - t0
        barrier(group)
        impl = "mlx-lm pipeline" if group.size() > 1 else "mlx-lm"
        row = {"impl": impl, "prompt_len": P, "gen_len": G, "concurrency": 1,
               "ttft_s": P / last.prompt_tps, "prefill_tps": last.prompt_tps,
               "decode_tps_per_seq": last.generation_tps,
               "decode_tps_aggregate": last.generation_tps,
               "peak_memory_gb": [round(last.peak_memory, 3)], "wall_s": wall}
        rows.append(row)
        if rank == 0:
            print(format_row(row), flush=True)
    if group.size() == 1:
        rows += [batch_row(model, tokenizer, vocab, P, G, C) for P, G, C in sweep(args) if C > 1]
    return rows if rank == 0 else []


def batch_row(model, tokenizer, vocab: int, P: int, G: int, C: int) -> dict:
    """One point with C sequences through mlx-lm's `batch_generate` (one rank)."""
    from mlx_lm.generate import batch_generate

    from launch.sweep import prompt_ids

    row = {"impl": "mlx-lm batch", "prompt_len": P, "gen_len": G, "concurrency": C}
    prompts = [prompt_ids(vocab, P, i) for i in range(C)]
    try:
        batch_generate(model, tokenizer, [prompt_ids(vocab, P, -2 - i) for i in range(C)],
                       max_tokens=8)  # warm-up: this batch size's kernels compile now
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        resp = batch_generate(model, tokenizer, prompts, max_tokens=G)
        wall = time.perf_counter() - t0
    except Exception as e:  # e.g. Llama-4's chunked cache: no batching with history
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"[rank 0] mlx-lm batch_generate did not run: {msg}", file=sys.stderr, flush=True)
        return dict(row, error=msg)
    st = resp.stats
    row.update({"ttft_s": st.prompt_time, "prefill_tps": st.prompt_tps,
                "decode_tps_per_seq": st.generation_tps / C,
                "decode_tps_aggregate": st.generation_tps, "e2e_tps": C * G / wall,
                "peak_memory_gb": [round(st.peak_memory, 3)], "wall_s": wall})
    print(format_row(row), flush=True)
    return row


def barrier(group):
    """Wait for every rank. mlx-lm's loop has already queued the next step's send/recv
    when it stops, so a rank that exited at once would break its peers' last step."""
    mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))


def _error_rows(e: Exception, rank: int) -> list:
    """Say on every rank why the baseline did not run; rank 0 keeps it as a row."""
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"[rank {rank}] baseline (mlx-lm) did not run: {msg}", file=sys.stderr, flush=True)
    if rank != 0:
        return []
    return [{"impl": "mlx-lm pipeline", "prompt_len": 0, "gen_len": 0, "concurrency": 1,
             "error": msg}]

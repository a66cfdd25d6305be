"""mlx-lm on the same weights: the benchmark's baseline, in the same job.

Runs only where mlx-lm is installed. On one rank it is mlx-lm's plain model: its
`stream_generate` for single sequences and its `batch_generate` for the rows with
several (architectures mlx-lm cannot batch, such as Llama-4, get an error row saying
so). On one rank it can share our stage's arrays (`share`): every parameter mlx-lm's
model names as ours does, with the same shape, is the very same array, so both models
live in one process at the cost of one, and the benchmark alternates between them
(run-to-run drift on a GPU is larger than the differences measured). On several ranks
it is mlx-lm's pipeline mode, which splits the layers evenly in reverse rank order and
all-gathers the hidden state after the last stage, so every rank runs the same loop in
lockstep; it generates one sequence at a time. Otherwise synthetic weights are filled by
name with the same seeded values our stages use (dist_runtime/synthetic.py).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from dist_runtime.synthetic import fill_model, quantization_predicate
from launch.sweep import format_row, prompt_ids, sweep, warm_up_size
from models import get_module


def mlxlm_model(args, source, group, config, share=None):
    """(model, tokenizer, shared) of mlx-lm holding this rank's share; `shared` says
    whether it reads our model's arrays (`share`, one rank only)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import _get_classes, sharded_load

    if not args.synthetic:
        return (*sharded_load(str(source.path), group, None)[:2], False)
    model_class, args_class = _get_classes(config)
    tokenizer = load_tokenizer(source.tokenizer_folder())
    if group.size() == 1 and share is not None:
        model = model_class(args_class.from_dict(config))
        if _share_arrays(model, share, source):
            return model, tokenizer, True
    model = model_class(args_class.from_dict(config))
    if group.size() > 1:
        if not hasattr(getattr(model, "model", None), "pipeline"):
            raise NotImplementedError(f"mlx-lm has no pipeline mode for {config['model_type']}")
        model.model.pipeline(group)
    # mlx-lm's `layers` property is a slice copy in pipeline mode: name the real list,
    # which sits where our model of the same architecture keeps it.
    fill_model(model, source.seed, source.dtype, source.bits, source.group_size,
               layers_path=get_module(config["model_type"]).Model.LAYERS_PATH)
    return model, tokenizer, False


def _share_arrays(model, ours, source) -> bool:
    """Give mlx-lm's freshly built (not yet evaluated) model our arrays, when every name
    and shape agrees (dtypes are ours); False when they do not (then drop that model)."""
    if source.bits:
        nn.quantize(model, source.group_size, source.bits,
                    class_predicate=quantization_predicate(source.group_size))
    mine = dict(tree_flatten(ours.parameters()))
    theirs = tree_flatten(model.parameters())
    if any(n not in mine or mine[n].shape != p.shape for n, p in theirs):
        return False
    model.load_weights([(n, mine[n]) for n, _ in theirs], strict=True)
    return True


class Baseline:
    """mlx-lm's rows for the benchmark's points, or rows saying why there are none."""

    def __init__(self, args, source, group, config, share=None):
        self.group, self.rank = group, group.rank()
        self.vocab = config.get("text_config", config)["vocab_size"]
        self.model = self.tokenizer = None
        self.error: Optional[str] = None
        self.shared = False
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            self.error = "mlx-lm is not installed"
            return
        try:
            self.model, self.tokenizer, self.shared = mlxlm_model(args, source, group, config,
                                                                  share)
            self.tokenizer._eos_token_ids = set()  # ignore EOS, as our rows do
        except Exception as e:  # no pipeline mode for this architecture, etc.
            self.error = _describe(e)

    @property
    def impl(self) -> str:
        """How the single-sequence rows are labelled."""
        return "mlx-lm pipeline" if self.group.size() > 1 else "mlx-lm"

    def warm_up(self, args):
        """One generation at the sweep's largest point (kernels compile on first use),
        and one per batch size."""
        if self.error:
            return
        from mlx_lm.generate import batch_generate, stream_generate

        P, G = warm_up_size(args)
        try:
            for _ in stream_generate(self.model, self.tokenizer, prompt_ids(self.vocab, P, -1),
                                     max_tokens=G):
                pass
            barrier(self.group)
        except Exception as e:  # e.g. CUDA: "Recv has no CUDA implementation"
            self.error = _describe(e)
            return
        if self.group.size() == 1:
            try:
                for C in sorted({C for _, _, C in sweep(args) if C > 1}):
                    batch_generate(self.model, self.tokenizer,
                                   [prompt_ids(self.vocab, P, -2 - i) for i in range(C)],
                                   max_tokens=8)
            except Exception:  # e.g. Llama-4: its batch rows will say why
                pass

    def rows(self, points: list) -> list:
        """One row per point: single sequences by stream_generate, several (one rank) by
        batch_generate; on ranks other than 0, none."""
        if self.error:
            print(f"[rank {self.rank}] baseline (mlx-lm) did not run: {self.error}",
                  file=sys.stderr, flush=True)
            return [] if self.rank else [{"impl": self.impl, "prompt_len": 0, "gen_len": 0,
                                          "concurrency": 1, "error": self.error}]
        rows = []
        for P, G, C in points:
            if C > 1 and self.group.size() > 1:
                continue  # mlx-lm batches on one rank only
            rows.append(self._single(P, G) if C == 1 else self._batch(P, G, C))
            if self.rank == 0:
                print(format_row(rows[-1]), flush=True)
        return rows if self.rank == 0 else []

    def _single(self, P: int, G: int) -> dict:
        from mlx_lm.generate import stream_generate

        mx.reset_peak_memory()
        t0 = time.perf_counter()
        last = None
        for last in stream_generate(self.model, self.tokenizer, prompt_ids(self.vocab, P, 0),
                                    max_tokens=G):
            pass
        wall = time.perf_counter() - t0
        barrier(self.group)
        return {"impl": self.impl, "prompt_len": P, "gen_len": G, "concurrency": 1,
                "ttft_s": P / last.prompt_tps, "prefill_tps": last.prompt_tps,
                "decode_tps_per_seq": last.generation_tps,
                "decode_tps_aggregate": last.generation_tps, "e2e_tps": G / wall,
                "peak_memory_gb": [round(last.peak_memory, 3)], "wall_s": wall}

    def _batch(self, P: int, G: int, C: int) -> dict:
        """C sequences through mlx-lm's `batch_generate` (one rank)."""
        from mlx_lm.generate import batch_generate

        row = {"impl": "mlx-lm batch", "prompt_len": P, "gen_len": G, "concurrency": C}
        try:
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            resp = batch_generate(self.model, self.tokenizer,
                                  [prompt_ids(self.vocab, P, i) for i in range(C)],
                                  max_tokens=G)
            wall = time.perf_counter() - t0
        except Exception as e:  # e.g. Llama-4's chunked cache: no batching with history
            return dict(row, error=_describe(e))
        st = resp.stats
        return dict(row, ttft_s=st.prompt_time, prefill_tps=st.prompt_tps,
                    decode_tps_per_seq=st.generation_tps / C,
                    decode_tps_aggregate=st.generation_tps, e2e_tps=C * G / wall,
                    peak_memory_gb=[round(st.peak_memory, 3)], wall_s=wall)


def barrier(group):
    """Wait for every rank. mlx-lm's loop has already queued the next step's send/recv
    when it stops, so a rank that exited at once would break its peers' last step."""
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))


def _describe(e: Exception) -> str:
    """An exception as one line for a row."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

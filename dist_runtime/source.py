"""One interface over where a stage's weights come from: a folder, the Hub, or synthetic.

Every rank opens the same source, asks it for the per-layer costs (to plan), then for
its own stage. Nothing here reads a weight before the plan exists.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx

from dist_runtime import hub
from dist_runtime.checkpoint import (CONFIG_FILE, build_model, config_warnings, fit_config,
                                     load_config, load_model, log_progress, weight_map)
from dist_runtime.costs import checkpoint_costs, model_costs
from dist_runtime.synthetic import preset_config, synthetic_model

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class Source:
    """Config, costs and stage loading for one --model / --synthetic choice."""

    def __init__(self, model: str, synthetic: Optional[str] = None, seed: int = 0,
                 dtype: str = "float32", bits: Optional[int] = None, group_size: int = 64):
        self.spec, self.synthetic, self.seed = model, synthetic, seed
        self.dtype, self.bits, self.group_size = DTYPES[dtype], bits, group_size
        self.repo = None
        if synthetic:
            if not hub.is_alias(model):
                raise hub.ModelNotFound(
                    f"--synthetic needs an architecture alias for --model, one of "
                    f"{', '.join(hub.ALIASES)}; got {model!r}")
            self.config = preset_config(model, synthetic)
            self.path = None
        else:
            kind, value = hub.resolve(model)
            if kind == "local":
                self.path = value
            else:
                self.repo = value
                self.path = hub.fetch_metadata(value)
            self.config = load_config(self.path)
            for message in config_warnings(self.config, str(Path(self.path) / CONFIG_FILE)):
                warn(message)
            if kind == "local":  # from the Hub no shard is here yet: load_model does it
                self.config = fit_config(self.path, self.config, weight_map(self.path))

    def costs(self):
        """Per-layer costs (dist_runtime/costs.py) without reading any weight."""
        if self.synthetic:
            skeleton, _, _ = synthetic_skeleton(self.config, self.dtype, self.bits,
                                                self.group_size)
            return model_costs(skeleton, self.config)
        if self.repo:  # shard headers come with the download; plan on the config's shapes
            skeleton, _ = build_model(self.config)
            return model_costs(skeleton, self.config)
        return checkpoint_costs(self.path, self.config, build_model(self.config)[0])

    def load(self, layers: range, has_embed: bool, has_head: bool, log_prefix: str = ""):
        """(model, config, files read, bytes read) of this rank's stage."""
        if self.synthetic:
            model, _, config = synthetic_model(self.config, self.seed, layers, has_embed,
                                               has_head, self.dtype, self.bits,
                                               self.group_size)
            return model, config, [], 0
        if self.repo:
            self.path = hub.fetch_stage_weights(self.repo, self.path, layers,
                                                has_embed or has_head)
        loaded = load_model(self.path, layers, has_embed, has_head, log_progress(log_prefix))
        return loaded.model, loaded.config, loaded.files_read, loaded.bytes_loaded

    def tokenizer_folder(self) -> Path:
        """Where tokenizer.json lives (synthetic: a built tokenizer, cached per vocabulary)."""
        if self.path is not None:
            return self.path
        from dist_runtime.writer import tokenizer_recipe_id, write_tokenizer

        vocab = self.config.get("text_config", self.config)["vocab_size"]
        name = f"mlx-pipeline-tokenizer-{vocab}-{tokenizer_recipe_id()}"
        folder = Path(tempfile.gettempdir()) / name
        if not (folder / "tokenizer_config.json").is_file():
            # Built aside and renamed into place: ranks of one host may race here.
            tmp = Path(tempfile.mkdtemp(prefix=folder.name + "-", dir=folder.parent))
            write_tokenizer(tmp, vocab)
            try:
                tmp.rename(folder)
            except OSError:  # another rank got there first: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
        return folder


def warn(message: str):
    """One '[rank r (host)] warning: ...' line on stderr, as every rank's messages look."""
    from dist_runtime.lifecycle import env_rank

    rank = env_rank()
    print(f"[rank {0 if rank is None else rank} ({socket.gethostname()})] warning: {message}",
          file=sys.stderr, flush=True)


def synthetic_skeleton(config: dict, dtype, bits, group_size):
    """An unevaluated synthetic model with the final dtypes and packing, for its shapes."""
    import mlx.nn as nn

    from dist_runtime.synthetic import quantization_predicate

    model, args = build_model(config)
    model.set_dtype(dtype)
    if bits:
        nn.quantize(model, group_size, bits, class_predicate=quantization_predicate(group_size))
    return model, args, config

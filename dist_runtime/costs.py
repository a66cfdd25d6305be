"""Per-layer costs for the partition: weight bytes, active bytes per token, KV bytes.

Read from safetensors headers for a local checkpoint (exact, whatever the quantization)
or from the shapes of an unevaluated model for a synthetic one (mlx arrays are lazy, so
building a GLM-4.5-sized skeleton allocates nothing).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlx.utils import tree_flatten

from dist_runtime.checkpoint import (DTYPE_SIZES, UNUSED_PREFIXES, layer_index,
                                     safetensors_header, weight_map)

DTYPE_BYTES = DTYPE_SIZES  # bytes per element of each safetensors dtype
EXPERT_MARKERS = (".switch_mlp.", ".experts.")  # stacked expert banks: only top-k are read
FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names of the float dtypes
EMBED_MARKERS = ("embed_tokens.", "token_embeddings.", "tok_embeddings.")  # one row a token


@dataclass
class Costs:
    """Bytes per layer (weights, active per token, KV per cached position) and head bytes."""

    weight: list
    active: list
    kv_per_token: list
    head: int
    head_active: int = 0  # of `head`, what one token reads: not the embedding table
    quantized: bool = False  # some weights are already packed (`.scales` tensors)
    # Bytes of one position's hidden state, what crosses a stage boundary per token (its
    # width times the activation dtype's size); 0 where unknown.
    hidden_bytes: int = 0


def text_config(config: dict) -> dict:
    """The text model's fields (Llama-4 nests them under text_config)."""
    return config.get("text_config", config)


def expert_fraction(config: dict) -> float:
    """Share of a stacked expert bank one token reads: top-k / experts."""
    c = text_config(config)
    k = c.get("num_experts_per_tok", 1)
    e = c.get("n_routed_experts") or c.get("num_local_experts") or c.get("num_experts") or k
    return k / e


def kv_bytes_per_token(args, dtype_bytes: int = 2) -> list:
    """Per layer, bytes one cached position takes (keys + values).

    `args` is the model's parsed config (its ModelArgs), which knows each layer's kv
    heads and head width however its config.json spells them (OpenELM's vary by layer).
    """
    return [v * dtype_bytes for v in args.kv_values_per_token()]


def _accumulate(sizes: dict, n_layers: int, frac: float, tied: bool):
    weight, active, head, head_active = [0] * n_layers, [0] * n_layers, 0, 0
    for name, nbytes in sizes.items():
        if name.startswith(UNUSED_PREFIXES):
            continue
        i = layer_index(name)
        if i is None:
            head += nbytes
            if tied or not any(m in name for m in EMBED_MARKERS):
                head_active += nbytes  # a tied embedding is the LM head too
        elif i < n_layers:  # beyond: multi-token-prediction layers, never loaded
            weight[i] += nbytes
            active[i] += nbytes * frac if any(m in name for m in EXPERT_MARKERS) else nbytes
    return weight, [int(a) for a in active], head, head_active


def tied(config: dict) -> bool:
    """Whether the LM head reuses the embedding (so a token reads all of it)."""
    c = text_config(config)
    return bool(c.get("tie_word_embeddings") or c.get("share_input_output_layers")
                or c.get("model_type") == "lille-130m")


def checkpoint_costs(path: Path, config: dict, model) -> Costs:
    """Costs from a local checkpoint's safetensors headers; `model` (unevaluated, built
    from `config`) gives the layer count and the KV layout."""
    n_layers = len(model.layers)
    sizes = {}
    dtypes = []
    for fname in sorted(set(weight_map(path).values())):
        for name, t in safetensors_header(Path(path) / fname).items():
            dtypes.append(t["dtype"])
            n = DTYPE_BYTES.get(t["dtype"], 4)
            for d in t["shape"]:
                n *= d
            sizes[name] = n
    w, a, h, ha = _accumulate(sizes, n_layers, expert_fraction(config), tied(config))
    packed = any(n.endswith(".scales") for n in sizes)
    floats = Counter(d for d in dtypes if d in FLOAT_DTYPES)  # what the layers compute in
    width = DTYPE_BYTES[floats.most_common(1)[0][0]] if floats else 2
    return Costs(w, a, kv_bytes_per_token(model.args), h, ha, packed,
                 model.hidden_width * width)


def model_costs(model, config: dict) -> Costs:
    """Costs from an (unevaluated) model's parameter shapes."""
    sizes = {n: p.nbytes for n, p in tree_flatten(model.parameters())}
    n_layers = len(model.layers)
    w, a, h, ha = _accumulate(sizes, n_layers, expert_fraction(config), tied(config))
    packed = any(n.endswith(".scales") for n in sizes)
    return Costs(w, a, kv_bytes_per_token(model.args), h, ha, packed,
                 model.hidden_width * model.activation_dtype().size)

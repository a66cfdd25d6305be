"""Independent references the tests compare against.

mlx-lm's implementation of each architecture is the oracle for logits (installed for
tests only; its code is never copied into the project).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


def mlxlm_model(config: dict, weights: dict):
    """mlx-lm's model for `config`, holding `weights` (names in mlx-community layout)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(dict(weights))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def mlxlm_logits(model, tokens) -> np.ndarray:
    """Full-forward logits [B, L, V] from an mlx-lm model, as float32 numpy."""
    out = model(mx.array(tokens))
    return np.array(out.astype(mx.float32))


def our_weights(model) -> dict:
    """Our model's parameters as a flat name -> array dict."""
    return dict(tree_flatten(model.parameters()))


def stepwise_logits(model, tokens, first: int) -> np.ndarray:
    """Prefill `first` tokens, then decode one at a time; logits for positions first-1.."""
    toks = mx.array(tokens)
    caches = model.make_caches()
    outs = [model(toks[:, :first], caches)[:, -1]]
    for i in range(first, toks.shape[1]):
        outs.append(model(toks[:, i : i + 1], caches)[:, -1])
    return np.array(mx.stack(outs, axis=1).astype(mx.float32))


def prompt_tokens(vocab_size: int, n: int = 48, seed: int = 0) -> list:
    """A [1, n] batch of deterministic token ids below vocab_size."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(1, n)).tolist()


def chain_vs_whole(a, b, whole, vocab_size: int, n: int = 40) -> float:
    """Max |logits| difference between stage a -> stage b and the whole model.

    The chain prefills n-2 tokens, then decodes the last two one at a time, with each
    stage's own caches; the whole model runs one full forward.
    """
    toks = mx.array(prompt_tokens(vocab_size, n))
    caches_a, caches_b = a.make_caches(), b.make_caches()

    def chain(t):
        return b.head(b.forward_layers(a.forward_layers(a.embed(t), caches_a), caches_b))

    outs = [chain(toks[:, : n - 2])] + [chain(toks[:, i : i + 1]) for i in (n - 2, n - 1)]
    chained = np.array(mx.concatenate(outs, axis=1))
    return float(np.abs(chained - np.array(whole(toks))).max())


def build_tiny(model_type: str, start=None, end=None, has_embed=True, has_head=True,
               seed: int = 3, **overrides):
    """(config, model): the `tiny` preset (with overrides), optionally pruned to a stage,
    holding seeded random weights (the same numbers whatever the stage)."""
    from dist_runtime.synthetic import randomize
    from models import get_module

    mod = get_module(model_type)
    cfg = dict(mod.PRESETS["tiny"], **overrides)
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    if start is not None:
        model.pipeline(start, end, has_embed, has_head)
    randomize(model, seed=seed)
    return cfg, model

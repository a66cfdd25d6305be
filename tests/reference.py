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


def chain_vs_whole(stages, whole_logits: np.ndarray, tokens, first: int) -> float:
    """Max |logits| difference between the stages run in order and the whole model.

    `whole_logits` are the whole model's for `tokens` in one full forward. The chain, with
    every stage's own fresh caches, prefills `first` tokens (all of them: one pass) then
    decodes the rest one at a time; every position's logits are compared.
    """
    toks = mx.array(tokens)
    caches = [s.make_caches() for s in stages]

    def chain(t):
        h = stages[0].embed(t)
        for s, c in zip(stages, caches):
            h = s.forward_layers(h, c)
        return stages[-1].head(h)

    parts = [toks[:, :first]] + [toks[:, i : i + 1] for i in range(first, toks.shape[1])]
    chained = np.array(mx.concatenate([chain(t) for t in parts], axis=1))
    return float(np.abs(chained - whole_logits).max())


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

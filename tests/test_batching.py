"""A micro-batch's forward equals each of its rows run alone, for every architecture.

The reference is the same model stepping each sequence with its own caches
(models/cache.py); the batch packs those rows into one BatchKVCache per layer, with
different positions per row, rows joining and leaving between steps. Prompt lengths
cross Llama-4's tiny attention chunk (16), so chunked layers mask per row.
"""

import mlx.core as mx
import numpy as np
import pytest

from models import MODEL_TYPES
from models.batch_cache import BatchKVCache
from models.cache import GROWTH_STEP
from tests.reference import build_tiny

LENS = [5, 23, 40]  # prompt lengths: rows sit at different positions
STEPS = 12  # decode steps (40 + 12 crosses two 16-position chunks)


def next_token(token: int, step: int, vocab: int) -> int:
    """A fixed token stream per row, independent of the model's output."""
    return (token * 7 + step + 3) % vocab


def setup(model_type):
    cfg, model = build_tiny(model_type)
    vocab = cfg.get("text_config", cfg)["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, n).tolist() for n in LENS]
    return model, vocab, prompts


def alone(model, vocab, prompt, steps):
    """Logits [steps, V] of one sequence stepped with its own caches."""
    caches = model.make_caches()
    model(mx.array([prompt]), caches)
    token, out = prompt[-1], []
    for t in range(steps):
        token = next_token(token, t, vocab)
        out.append(model(mx.array([[token]]), caches)[0, -1])
    return np.array(mx.stack(out))


def prefilled(model, prompt):
    caches = model.make_caches()
    model(mx.array([prompt]), caches)
    return caches


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_batch_equals_each_row_alone(model_type):
    model, vocab, prompts = setup(model_type)
    per_row = [prefilled(model, p) for p in prompts]
    layers = [BatchKVCache.pack([c[n] for c in per_row]) for n in range(len(per_row[0]))]
    tokens, outs = [p[-1] for p in prompts], []
    for t in range(STEPS):
        tokens = [next_token(x, t, vocab) for x in tokens]
        outs.append(model(mx.array([[x] for x in tokens]), layers)[:, -1])
    batched = np.array(mx.stack(outs, axis=1))  # [B, STEPS, V]
    for r, p in enumerate(prompts):
        np.testing.assert_allclose(batched[r], alone(model, vocab, p, STEPS), atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama4", "glm4_moe"])
def test_rows_join_and_leave_between_steps(model_type):
    """Row 2 joins after 4 steps; row 0 leaves after 8: the others are undisturbed."""
    model, vocab, prompts = setup(model_type)
    refs = [alone(model, vocab, p, STEPS) for p in prompts]
    own = [prefilled(model, p) for p in prompts]
    n_layers = len(own[0])
    rows, tokens = [0, 1], {r: prompts[r][-1] for r in range(3)}
    layers = [BatchKVCache.pack([own[r][n] for r in rows]) for n in range(n_layers)]
    done = {0: 0, 1: 0, 2: 0}
    for step in range(STEPS):
        if step == 4:  # row 2 joins: the batch is re-packed from its rows and row 2's own
            layers = [BatchKVCache.pack(c.rows() + [own[2][n]]) for n, c in enumerate(layers)]
            rows = [0, 1, 2]
        if step == 8:  # row 0 leaves
            layers = [BatchKVCache.pack(c.rows()[1:]) for c in layers]
            rows = [1, 2]
        for r in rows:
            tokens[r] = next_token(tokens[r], done[r], vocab)
        out = model(mx.array([[tokens[r]] for r in rows]), layers)[:, -1]
        for i, r in enumerate(rows):
            np.testing.assert_allclose(np.array(out[i]), refs[r][done[r]], atol=1e-4,
                                       err_msg=f"row {r}, its step {done[r]}")
            done[r] += 1
    assert done == {0: 8, 1: STEPS, 2: STEPS - 4}


def test_chunked_batch_keeps_about_one_chunk():
    """Llama-4's chunked layers: the batch drops columns no row can see any more."""
    model, vocab, prompts = setup("llama4")
    per_row = [prefilled(model, p) for p in prompts]
    layers = [BatchKVCache.pack([c[n] for c in per_row]) for n in range(len(per_row[0]))]
    chunk = model.text.attention_chunk_size
    tokens = [p[-1] for p in prompts]
    for t in range(3 * GROWTH_STEP):
        tokens = [next_token(x, t, vocab) for x in tokens]
        mx.eval(model(mx.array([[x] for x in tokens]), layers))
    chunked = [c for c in layers if c.chunk is not None]
    full = [c for c in layers if c.chunk is None]
    assert chunked and full
    assert all(c.keys.shape[2] <= chunk + 2 * GROWTH_STEP for c in chunked)
    assert all(c.keys.shape[2] >= max(LENS) + 3 * GROWTH_STEP for c in full)

"""Sampling: greedy, top-k, top-p, min-p and repetition penalty against NumPy references,
seeded reproducibility, and parameter checks that name the command-line flag."""

import math

import mlx.core as mx
import numpy as np
import pytest

from dist_runtime.sampling import (Sampler, SamplingParams, apply_repetition_penalty,
                                   filter_logits)

# A fixed distribution with no ties and no cumulative mass near the thresholds used below;
# the probabilities are placed at shuffled positions so "first index" shortcuts fail.
PROBS = np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.06, 0.04, 0.02])
PERM = np.array([5, 2, 7, 0, 3, 6, 1, 4])
N_SEEDS = 300  # draws per support check: a kept token (p >= 0.12/0.8) is missed w.p. < 1e-20


def fixed_logits() -> np.ndarray:
    logits = np.empty(len(PROBS), np.float32)
    logits[PERM] = np.log(PROBS)
    return logits


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_top_p_support(logits, temp, p) -> set:
    """Smallest set of most likely tokens whose probability mass reaches p."""
    probs = np_softmax(logits / temp)
    order = np.argsort(-probs)
    k = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1  # first prefix with mass >= p
    return set(order[:k].tolist())


def ref_min_p_support(logits, temp, min_p) -> set:
    probs = np_softmax(logits / temp)
    return set(np.flatnonzero(probs >= min_p * probs.max()).tolist())


def sampled_support(params: dict, logits) -> set:
    """Tokens drawn over N_SEEDS seeded samplers, one draw each."""
    return {Sampler(SamplingParams(seed=s, **params))(mx.array(logits)) for s in range(N_SEEDS)}


def kept(filtered: mx.array) -> set:
    return set(np.flatnonzero(np.isfinite(np.array(filtered))).tolist())


def random_logits(seed, n=64, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


# ---------------------------------------------------------------- greedy and top-k

@pytest.mark.parametrize("seed", range(5))
def test_temp_zero_is_argmax(seed):
    logits = random_logits(seed)
    sampler = Sampler(SamplingParams(temp=0.0))
    assert sampler(mx.array(logits)) == int(np.argmax(logits))


@pytest.mark.parametrize("seed", range(5))
def test_top_k_one_is_argmax(seed):
    logits = random_logits(seed, scale=0.3)  # flat: without top-k, draws would vary
    draws = {Sampler(SamplingParams(temp=1.5, top_k=1, seed=s))(mx.array(logits))
             for s in range(30)}
    assert draws == {int(np.argmax(logits))}


def test_top_k_keeps_the_k_largest():
    logits = random_logits(7)
    f = filter_logits(mx.array(logits), SamplingParams(temp=1.0, top_k=5))
    assert kept(f) == set(np.argsort(-logits)[:5].tolist())


# ---------------------------------------------------------------- top-p

@pytest.mark.parametrize("p,temp", [(0.5, 1.0), (0.75, 1.0), (0.9, 1.0), (0.75, 0.7),
                                    (0.25, 1.0)])
def test_top_p_keeps_smallest_set_reaching_p(p, temp):
    logits = fixed_logits()
    ref = ref_top_p_support(logits, temp, p)
    assert 1 <= len(ref) < len(PROBS)
    f = filter_logits(mx.array(logits / temp), SamplingParams(temp=temp, top_p=p))
    assert kept(f) == ref
    assert sampled_support(dict(temp=temp, top_p=p), logits) == ref


def test_top_p_one_is_off():
    logits = fixed_logits()
    assert sampled_support(dict(temp=1.0, top_p=1.0), logits) == set(range(len(PROBS)))


# ---------------------------------------------------------------- min-p

@pytest.mark.parametrize("min_p,temp", [(0.3, 1.0), (0.5, 1.0), (0.3, 0.5), (0.3, 2.0)])
def test_min_p_excludes_tokens_below_fraction_of_max(min_p, temp):
    logits = fixed_logits()
    ref = ref_min_p_support(logits, temp, min_p)
    assert 1 < len(ref) < len(PROBS)
    f = filter_logits(mx.array(logits / temp), SamplingParams(temp=temp, min_p=min_p))
    assert kept(f) == ref
    assert sampled_support(dict(temp=temp, min_p=min_p), logits) == ref


# ---------------------------------------------------------------- repetition penalty

def ref_repetition_penalty(logits, recent, penalty):
    out = logits.copy()
    for t in set(recent):
        out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return out


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_reference(penalty):
    logits = random_logits(3, n=32)
    recent = [0, 5, 5, 9, 31, 12, 0]
    assert (logits[recent] > 0).any() and (logits[recent] < 0).any()
    before = logits.copy()
    arr = mx.array(logits)
    out = np.array(apply_repetition_penalty(arr, recent, penalty))
    np.testing.assert_allclose(out, ref_repetition_penalty(logits, recent, penalty), rtol=1e-6)
    # the caller's array is left alone
    np.testing.assert_array_equal(np.array(arr), before)


def test_repetition_penalty_window_and_generated_tokens():
    # token 0 leads, token 1 is close behind; 0 is only penalised while in the window
    logits = np.zeros(8, np.float32)
    logits[0], logits[1] = 2.0, 1.5
    # 0 is in the prompt but 4 tokens back, outside a window of 3: not penalised
    s = Sampler(SamplingParams(repetition_penalty=2.0, repetition_window=3), [0, 4, 5, 6])
    assert s(mx.array(logits)) == 0
    # now 0 was just generated: 2.0 / 2 = 1.0 < 1.5, so 1 wins; then 1 is penalised too
    assert s(mx.array(logits)) == 1
    # both penalised: 1.0 vs 0.75
    assert s(mx.array(logits)) == 0
    # a prompt token inside the window is penalised from the first step
    s = Sampler(SamplingParams(repetition_penalty=2.0, repetition_window=3), [4, 5, 0])
    assert s(mx.array(logits)) == 1


def edge_trace(window, distance, steps=24, vocab=64, penalty=2.0):
    """Greedy steps where token 0 leads (2.0) and a token never seen before comes second
    (1.5): 0 wins exactly when it is not among the last `window` tokens. The prompt puts
    0 `distance` tokens from its end. Returns (ours, reference, distances at which the
    reference saw 0 when it chose), the reference from the whole history in NumPy."""
    prompt = [0] + list(range(vocab - distance + 1, vocab))  # 0, then distance-1 others
    sampler = Sampler(SamplingParams(repetition_penalty=penalty, repetition_window=window),
                      prompt)
    history, ours, ref, seen_at = list(prompt), [], [], []
    for t in range(steps):
        logits = np.full(vocab, -3.0, np.float32)
        logits[0], logits[1 + t] = 2.0, 1.5
        ours.append(sampler(mx.array(logits)))
        recent = history[len(history) - window:] if window else []
        pick = int(np.argmax(ref_repetition_penalty(logits, recent, penalty)))
        last0 = max(i for i, tok in enumerate(history) if tok == 0)
        seen_at.append(len(history) - last0)  # 1: the last token was 0
        ref.append(pick)
        history.append(pick)
    return ours, ref, seen_at


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_repetition_penalty_window_edge(window):
    # A token exactly `window` tokens back is penalised; one more back is not: at the
    # prompt's start and each time the generated tokens push it to the edge.
    for distance in (window, window + 1):
        ours, ref, seen_at = edge_trace(window, distance)
        assert ours == ref, f"window {window}, 0 first {distance} back: {ours} vs {ref}"
        assert seen_at[0] == distance
        picks = dict(zip(seen_at, ref))
        assert picks[window] != 0 and picks[window + 1] == 0  # the edge was met


def test_repetition_penalty_one_is_off():
    logits = random_logits(4, n=16)
    out = np.array(apply_repetition_penalty(mx.array(logits), list(range(16)), 1.0))
    np.testing.assert_array_equal(out, logits)


# ---------------------------------------------------------------- seeds

def draw(seed, n=30, **params):
    s = Sampler(SamplingParams(temp=1.0, seed=seed, **params))
    logits = mx.zeros((512,))  # uniform: every draw is up to the key
    return [s(logits) for _ in range(n)]


def test_same_seed_same_sequence_different_seed_differs():
    a, b, c = draw(11), draw(11), draw(12)
    assert a == b
    assert a != c
    assert len(set(a)) > 1  # the key changes per step


def test_seeded_sampling_with_filters_is_reproducible():
    logits = mx.array(fixed_logits())
    runs = []
    for seed in (5, 5, 6):
        s = Sampler(SamplingParams(temp=0.9, top_k=6, top_p=0.9, min_p=0.05, seed=seed))
        runs.append([s(logits) for _ in range(40)])
    assert runs[0] == runs[1] and runs[0] != runs[2]


# ---------------------------------------------------------------- parameter checks

@pytest.mark.parametrize("field,value,flag", [
    ("temp", -0.5, "--temp"),
    ("temp", math.nan, "--temp"),
    ("top_k", -1, "--top-k"),
    ("top_p", 0.0, "--top-p"),
    ("top_p", 1.5, "--top-p"),
    ("top_p", math.nan, "--top-p"),
    ("min_p", -0.1, "--min-p"),
    ("min_p", 1.0, "--min-p"),
    ("repetition_penalty", 0.0, "--repetition-penalty"),
    ("repetition_penalty", -1.0, "--repetition-penalty"),
    ("repetition_penalty", math.nan, "--repetition-penalty"),
])
def test_bad_parameters_raise_naming_the_flag(field, value, flag):
    with pytest.raises(ValueError) as e:
        Sampler(SamplingParams(**{field: value}))
    assert flag in str(e.value) and str(value) in str(e.value)


def test_negative_repetition_window_is_refused():
    with pytest.raises(ValueError, match="repetition_window"):
        Sampler(SamplingParams(repetition_penalty=1.2, repetition_window=-1))


def test_zero_repetition_window_penalises_nothing():
    logits = np.zeros(4, np.float32)
    logits[0], logits[1] = 2.0, 1.5
    s = Sampler(SamplingParams(repetition_penalty=4.0, repetition_window=0), [0, 0, 0])
    assert [s(mx.array(logits)) for _ in range(3)] == [0, 0, 0]

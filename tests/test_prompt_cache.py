"""Prompt reuse: the coordinator's index of kept sequences (least recently used first,
bounded in positions, chunked caches' floor), caches copied to a prefix, and a follow-up
that starts from a kept sequence generating exactly what a full prefill gives: in one
process, and through a ring of 3 ranks where the middle one passes KEEP and FORK on.
"""

from __future__ import annotations


import mlx.core as mx
import pytest

from dist_runtime.coordinator import Coordinator, Request
from dist_runtime.prompt_cache import PromptCache
from dist_runtime.sampling import Sampler, SamplingParams
from dist_runtime.stage import Stage
from models.cache import ChunkedKVCache, KVCache
from tests.launcher import launch
from tests.reference import build_tiny


def test_the_longest_shared_prefix_wins_and_one_token_is_always_left_to_run():
    pc = PromptCache(1000, min_reuse=2)
    assert pc.add(1, [1, 2, 3, 4, 5], 5) == []
    assert pc.add(2, [1, 2, 9, 9], 4) == []
    assert pc.match([1, 2, 3, 4, 5, 6]) == (1, 5)
    assert pc.match([1, 2, 3, 4, 5]) == (1, 4)  # its last token must still be run
    assert pc.match([1, 2, 9, 8]) == (2, 3)
    assert pc.match([1, 7]) is None  # shares 1 < min_reuse
    assert pc.match([8, 2, 3]) is None
    assert pc.hits == 3 and pc.reused == 12


def test_least_recently_used_go_first_within_the_bound_and_pins_hold():
    pc = PromptCache(10, min_reuse=1)
    pc.add(1, [1, 1, 1, 1], 4)
    pc.add(2, [2, 2, 2, 2], 4)
    assert pc.match([1, 1, 1, 5]) == (1, 3)  # 1 is now the most recently used, and pinned
    assert pc.add(3, [3, 3, 3, 3], 4) == [2]
    pc.unpin(1)
    assert pc.add(4, [4, 4, 4], 3) == [1]
    assert list(pc.entries) == [3, 4] and pc.positions == 7
    assert pc.add(5, list(range(20)), 20) == [3, 4, 5]  # alone beyond the bound: not kept
    assert not pc.entries


def test_a_conversation_keeps_only_its_last_turn_unless_the_floor_says_otherwise():
    pc = PromptCache(1000, min_reuse=1)
    pc.add(1, [1, 2, 3], 3)
    assert pc.add(2, [1, 2, 3, 4, 5], 5) == [1]  # turn 2 gives every prefix turn 1 gave
    chunked = PromptCache(1000, floor=lambda n: n // 4 * 4, min_reuse=1)
    chunked.add(1, [1, 2, 3, 4, 5], 5)
    assert chunked.add(2, [1, 2, 3, 4, 5, 6, 7, 8, 9], 9) == []  # 1 gives 4..5, 2 only 8..9
    assert chunked.match([1, 2, 3, 4, 5, 0]) == (1, 5)
    assert chunked.match([1, 2, 3, 0]) is None  # 3 positions: below both floors


def test_a_prefix_copy_is_its_own_and_a_chunked_one_ends_in_the_last_chunk():
    k = mx.random.normal((1, 2, 10, 4))
    c = KVCache()
    c.update_and_fetch(k, k)
    p = c.prefix(6)
    p.update_and_fetch(k[:, :, :1] * 0, k[:, :, :1] * 0)
    assert p.offset == 7 and c.offset == 10
    assert mx.array_equal(c.keys[:, :, :10], k).item()  # the original is untouched
    assert mx.array_equal(p.keys[:, :, :6], k[:, :, :6]).item()
    cc = ChunkedKVCache(4)
    cc.update_and_fetch(k, k)
    cc.trim()
    assert (cc.start, cc.offset) == (8, 10)
    assert cc.prefix(9).offset == 9 and cc.prefix(8).keys is None
    with pytest.raises(ValueError):
        cc.prefix(7)


@pytest.mark.parametrize("model", ["glm4_moe", "llama4"])
def test_a_follow_up_from_a_kept_sequence_equals_a_full_prefill_in_one_process(model):
    _, m = build_tiny(model)
    stage = Stage(m, 0, 1)
    cache = PromptCache(10_000, m.reuse_floor, min_reuse=4)
    coord = Coordinator(stage, prefill_chunk=8, max_batch=4, prompt_cache=cache)
    greedy = SamplingParams()
    firsts = [[(5 * i + 11 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([37, 21, 50])]
    done = coord.generate_many([Request(p, 7, Sampler(greedy)) for p in firsts])
    assert len(stage.kept) == 3 and not stage.caches and not stage.batches
    follow = [p + r.tokens + [9, 8] for p, r in zip(firsts, done)]
    reused = coord.generate_many([Request(p, 5, Sampler(greedy)) for p in follow])
    fresh = coord.generate_many([Request(p, 5, Sampler(greedy), cache_prompt=False)
                                 for p in follow])
    assert [r.tokens for r in reused] == [r.tokens for r in fresh]
    # The reply's positions are kept too (all but its last token, never fed) ...
    for p, r, f in zip(firsts, reused, follow):
        floor = m.reuse_floor(len(p) + 6)
        assert r.cached_tokens == (len(p) + 6 if len(p) + 6 >= floor else 0)
    assert all(r.cached_tokens == 0 for r in fresh)
    # ... and each follow-up replaced its first turn where it gives every prefix the first
    # gave: always with caches that keep every key; with Llama-4's chunked ones, when both
    # end in the same chunk.
    assert set(stage.kept) == set(cache.entries)
    both = sum(m.reuse_floor(len(f) + 4) > m.reuse_floor(len(p) + 6)
               for p, f in zip(firsts, follow))
    assert len(cache.entries) == 3 + both
    assert both == (0 if model == "glm4_moe" else 2)
    coord.clear_prompt_cache()
    assert not stage.kept and not cache.entries


def test_the_prompt_cache_stays_within_its_bound_and_frees_what_it_drops():
    _, m = build_tiny("glm4_moe")
    stage = Stage(m, 0, 1)
    cache = PromptCache(100, min_reuse=4)
    coord = Coordinator(stage, max_batch=2, prompt_cache=cache)
    for i in range(6):
        coord.generate([(i + j) % 400 + 3 for j in range(30 + i)], 4, Sampler(SamplingParams()))
        assert cache.positions <= 100
        assert set(stage.kept) == set(cache.entries)
    assert len(stage.kept) == 2  # 33 + 34 + 35 > 100: the oldest went


def run_job(n: int, model: str) -> dict:
    job = launch(n, ["--model", model, "--synthetic", "tiny"], timeout=120,
                 script="tests/jobs/reuse.py")
    assert job.summary is not None, job.stderr
    return job.summary


@pytest.mark.timeout(150)
def test_every_rank_keeps_and_forks_and_the_tokens_equal_a_full_prefill():
    out = run_job(3, "llama4")  # chunked caches; the middle rank passes KEEP and FORK on
    assert out["reused"] == out["fresh"], out
    assert all(c > 0 for c in out["cached"]), out
    # Every rank keeps the same sequences: the 3 follow-ups, and (chunked caches) the first
    # turns whose prefixes they cannot give.
    assert len(set(out["kept"])) == 1 and out["kept"][0] >= 3, out
    assert out["live"] == [0, 0, 0], out
    assert out["after_clear"] == [0, 0, 0], out

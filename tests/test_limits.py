"""What a job cannot do is said, not done silently (issue 11, items 10 and 11).

- Positions: a prompt that fills --max-kv-tokens (the KV positions the plan reserves
  memory for) is refused before loading, with the numbers; --max-tokens past the model's
  context or --max-kv-tokens stops there, with a finish reason that says which.
- Non-finite values: a rank whose copy of the weights holds NaN makes NaN hidden states
  and logits. Each stage checks what it sends (with the send, no extra wait), so the
  first rank whose output is broken names itself and every other rank names it; on one
  process the logits are checked. Before, such a job exited 0 with empty text.
"""

import glob
import json
import shutil

import mlx.core as mx
import pytest

from dist_runtime.synthetic import preset_config
from dist_runtime.writer import write_checkpoint
from tests.launcher import launch

TINY = ["--model", "glm4_moe", "--synthetic", "tiny", "--no-chat-template"]
SIX_WORDS = ["--prompt", "one two three four five six"]


def generation_room(*args):
    import sys

    from tests.launcher import ROOT

    sys.path.insert(0, str(ROOT / "launch"))
    from run import generation_room as room

    return room(*args)


def test_prompt_that_fills_max_kv_tokens_is_refused_with_the_numbers():
    job = launch(1, [*TINY, *SIX_WORDS, "--max-kv-tokens", "4"], timeout=60)
    err = job.errors.get(0, "")
    assert "but --max-kv-tokens is 4, the KV-cache positions the plan reserves memory for" \
        in err and "pass --max-kv-tokens" in err, job.stderr
    assert not job.stages, "it loaded before refusing"


def test_max_tokens_past_max_kv_tokens_stops_there_and_says_why():
    job = launch(1, [*TINY, *SIX_WORDS, "--max-kv-tokens", "24", "--max-tokens", "100",
                     "--ignore-eos", "--json"], timeout=60)
    out = job.summary
    assert out is not None, job.stderr
    assert out["finish_reason"] == "max_kv_tokens"
    assert out["prompt_tokens"] + len(out["tokens"]) == 24
    assert "--max-tokens 100 runs past --max-kv-tokens 24" in job.stderr


def test_generation_room():
    assert generation_room(10, 5, 4096, 4096) == (5, "length")
    assert generation_room(10, 100, 64, 4096) == (54, "context")
    assert generation_room(10, 100, 4096, 32) == (22, "max_kv_tokens")
    assert generation_room(10, 22, 4096, 32) == (22, "length")  # exactly fits: --max-tokens
    assert generation_room(10, 100, 0, 0) == (100, "length")  # no context known


@pytest.fixture(scope="module")
def nan_copies(tmp_path_factory):
    """Two copies of one tiny checkpoint; in copy 1, layer 3 (rank 1's with --split 2,2)
    holds NaN."""
    root = tmp_path_factory.mktemp("nan")
    good = write_checkpoint(root / "ckpt-0", preset_config("glm4_moe", "tiny"), seed=3)
    bad = root / "ckpt-1"
    shutil.copytree(good, bad)
    for fn in glob.glob(str(bad / "*.safetensors")):
        w = mx.load(fn)
        name = "model.layers.3.self_attn.o_proj.weight"
        if name in w:
            w[name] = mx.full(w[name].shape, float("nan"), w[name].dtype)
            mx.save_safetensors(fn, w, metadata={"format": "mlx"})
    return root


@pytest.mark.timeout(120)
def test_nan_weights_on_one_rank_are_named(nan_copies):
    job = launch(2, ["--model", str(nan_copies / "ckpt-{rank}"), "--split", "2,2",
                     "--prompt", "hi", "--max-tokens", "4", "--timeout", "10"], timeout=90)
    assert "holds NaN or infinity" in job.errors.get(1, ""), job.stderr
    assert "rank 1 (" in job.errors[1] and "weights on this host" in job.errors[1]
    assert job.errors.get(0, "").startswith("rank 1 ("), job.stderr  # rank 0 names it
    assert not job.finished


def test_nan_logits_on_one_process_are_an_error(nan_copies):
    job = launch(1, ["--model", str(nan_copies / "ckpt-1"), "--prompt", "hi",
                     "--max-tokens", "4", "--json"], timeout=60)
    assert "the logits that chose the first token hold NaN or infinity" in \
        job.errors.get(0, ""), job.stderr
    assert not job.finished
    assert job.summary is None or json.dumps(job.summary).find("error") >= 0

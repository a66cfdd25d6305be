"""Bad input on 2 ranks: a clear error on every rank, naming rank and host, non-zero exits.

Real processes under mlx.launch on 127.0.0.1. Each job must end by itself within
seconds (no rank left waiting for another), every rank prints one error line with the
message asserted here, mlx.launch reports a non-zero exit for each rank, and no rank
says 'finished'. Checkpoints that differ per rank use `--model DIR/ckpt{rank}`: each rank
opens its own copy, as hosts with their own disks do.
"""

import json
import re
import shutil
import struct

import pytest

from dist_runtime.synthetic import preset_config
from dist_runtime.writer import write_checkpoint
from tests.live import LiveJob

TINY = ["--model", "glm4_moe", "--synthetic", "tiny"]
JOB_S = 30  # a bad job must be over within this


def run_bad(args, n=2) -> LiveJob:
    """Run a job that must fail on every rank; returns it after checking the common part."""
    with LiveJob(n, args) as job:
        job.wait(JOB_S)
        errors = job.errors
        assert set(errors) == set(range(n)), f"ranks with an error: {set(errors)}\n{job.report()}"
        codes = job.exit_codes
        assert all(codes.get(r) not in (None, 0) for r in range(n)), \
            f"exit codes {codes}\n{job.report()}"
        assert not job.finished
        assert job.leftovers() == []
        return job


def one_error(job, rank) -> str:
    errs = job.errors[rank]
    assert len(errs) == 1, errs
    return errs[0]


@pytest.mark.timeout(60)
def test_prompt_longer_than_context():
    prompt = "hello world " * 420  # ~4200 tokens; the tiny preset's context is 4096
    job = run_bad([*TINY, "--prompt", prompt])
    for r in (0, 1):
        e = one_error(job, r)
        assert "the prompt is 42" in e and "context is 4096" in e, e
        assert "shorten the prompt by at least" in e
    assert set(job.exit_codes.values()) == {2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_tokens_below_one(value):
    job = run_bad([*TINY, "--max-tokens", value])
    for r in (0, 1):
        e = one_error(job, r)
        assert "--max-tokens must be at least 1" in e and f"got {value}" in e, e


@pytest.mark.timeout(60)
def test_empty_prompt_without_chat_template():
    """'' with --no-chat-template tokenizes to nothing (the tiny tokenizer adds no BOS)."""
    job = run_bad([*TINY, "--prompt", "", "--no-chat-template"])
    mine, theirs = one_error(job, 0), one_error(job, 1)
    for e in (mine, theirs):
        assert "the prompt '' gives no tokens" in e and "--no-chat-template" in e, e
        assert "non-empty --prompt" in e and "internal error" not in e
    assert "rank 0 (" in theirs
    assert set(job.exit_codes.values()) == {2}


@pytest.mark.timeout(60)
def test_prompt_that_is_not_utf8():
    # A command line with the byte 0xff: Python hands it over as the surrogate U+DCFF.
    job = run_bad([*TINY, "--prompt", "caf\udcff au lait"])
    for r in (0, 1):
        e = one_error(job, r)
        assert "--prompt is not valid UTF-8" in e and "byte 0xff at position 3" in e, e
        assert "'caf\\xff au lait'" in e and "UTF-8" in e.split(";")[-1], e
        assert "cannot open its model" not in e
    assert set(job.exit_codes.values()) == {2}


@pytest.mark.timeout(60)
def test_first_timeout_below_timeout_is_refused():
    """It used to be raised to --timeout without a word (issue 11, item 4)."""
    job = run_bad([*TINY, "--timeout", "30", "--first-timeout", "5"])
    for r in (0, 1):
        e = one_error(job, r)
        assert "--first-timeout (5 s) is below --timeout (30 s)" in e, e
        assert "raise --first-timeout to at least 30" in e, e
    assert set(job.exit_codes.values()) == {2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["inf", "nan", "64,inf"])
def test_memory_limit_not_a_finite_number(value):
    job = run_bad([*TINY, "--memory-limit", value])
    for r in (0, 1):
        e = one_error(job, r)
        assert "--memory-limit" in e and f"got {value!r}" in e, e
        assert "finite" in e and "e.g. 64 or 64,48" in e, e
    assert set(job.exit_codes.values()) == {2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra,expected", [
    (["--synthetic", "tiny"], "--synthetic needs an architecture alias for --model"),
    ([], "is neither a folder, a Hub repo id (owner/name) nor an alias"),
])
def test_unknown_alias(extra, expected):
    job = run_bad(["--model", "glm5", *extra])
    for r in (0, 1):
        e = one_error(job, r)
        assert expected in e and "'glm5'" in e and "glm4_moe" in e, e


@pytest.mark.timeout(60)
@pytest.mark.parametrize("split,expected", [
    ("1,1,2", "--split 1,1,2 has 3 layer counts but the job has 2 ranks"),
    ("0,4", "--split 0,4 gives rank 0 ({host}) 0 layers; every rank needs at least 1"),
    ("1,2", "--split 1,2 adds up to 3 layers but the model has 4"),
    ("2,x", "--split must be comma-separated layer counts"),
])
def test_bad_split(split, expected):
    job = run_bad([*TINY, "--split", split])
    host = job.stderr.split("[rank 0 (")[1].split(")")[0]
    for r in (0, 1):
        e = one_error(job, r)
        assert expected.format(host=host) in e, e
        if split != "2,x":
            # the plan by memory and speed, proposed as a split that fits
            proposed = re.search(r"--split (\d+),(\d+) fits", e)
            assert proposed, e
            assert sum(map(int, proposed.groups())) == 4 and "0" not in proposed.groups(), e


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A sharded tiny GLM-4 MoE checkpoint: shard 5 holds only layer 3 (rank 1's)."""
    path = write_checkpoint(tmp_path_factory.mktemp("good") / "ckpt",
                            preset_config("glm4_moe", "tiny"), seed=3, shard_bytes=400_000)
    wmap = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = wmap["model.layers.3.mlp.switch_mlp.down_proj.weight"]
    assert {n for n, f in wmap.items() if f == shard} <= {n for n in wmap if ".layers.3." in n}
    return path, shard


def per_rank_copies(good, tmp_path):
    """ckpt0 and ckpt1, copies of the good checkpoint; returns (pattern, ckpt1)."""
    path, _ = good
    for r in (0, 1):
        shutil.copytree(path, tmp_path / f"ckpt{r}")
    return str(tmp_path / "ckpt{rank}"), tmp_path / "ckpt1"


def check_one_rank_bad(job, file_text, words):
    """Rank 1 names the file; rank 0 names rank 1 and passes on its message."""
    mine, theirs = one_error(job, 1), one_error(job, 0)
    host = job.stderr.split("[rank 1 (")[1].split(")")[0]
    assert file_text in mine and words in mine, mine
    assert f"rank 1 ({host})" in theirs and file_text in theirs, theirs
    assert set(job.exit_codes.values()) == {2}, job.exit_codes


@pytest.mark.timeout(60)
def test_truncated_weights_on_one_rank(good_checkpoint, tmp_path):
    pattern, bad = per_rank_copies(good_checkpoint, tmp_path)
    shard = bad / good_checkpoint[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    job = run_bad(["--model", pattern, "--prompt", "hi"])
    check_one_rank_bad(job, str(shard), "is truncated")
    assert "cannot open its model" in one_error(job, 0)
    assert not job.said("stage"), "a rank loaded weights before the checks failed"


@pytest.mark.timeout(60)
def test_missing_weight_file_on_one_rank(good_checkpoint, tmp_path):
    pattern, bad = per_rank_copies(good_checkpoint, tmp_path)
    (bad / good_checkpoint[1]).unlink()
    job = run_bad(["--model", pattern, "--prompt", "hi"])
    check_one_rank_bad(job, str(bad / good_checkpoint[1]), "is missing")


@pytest.mark.timeout(60)
def test_unreadable_weights_on_one_rank_fail_at_load(good_checkpoint, tmp_path):
    """A header that passes the cheap checks but not mx.load: caught while loading, and
    the other rank, waiting at the barrier after loading, names rank 1."""
    pattern, bad = per_rank_copies(good_checkpoint, tmp_path)
    shard = bad / good_checkpoint[1]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode().replace('"F32"', '"X32"', 1)  # same length, same sizes
    raw[8:8 + n] = header.encode()
    shard.write_bytes(bytes(raw))
    job = run_bad(["--model", pattern, "--prompt", "hi"])
    check_one_rank_bad(job, str(shard), "cannot read")
    assert "could not load its layers" in one_error(job, 0)

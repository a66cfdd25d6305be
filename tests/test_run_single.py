"""launch/run.py in one process: greedy tokens equal mlx-lm's greedy generation on the same
checkpoint and prompt ids; the JSON summary; and the command-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from dist_runtime.hub import ALIASES
from dist_runtime.synthetic import preset_config
from dist_runtime.writer import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "launch" / "run.py"
TIMEOUT = 120  # s for one launch/run.py process
MAX_TOKENS = 24
PROMPT = "Quick brown foxes 日本語 🙂"
SUMMARY_KEYS = ("tokens", "text", "prompt_tokens", "ttft_s", "prefill_tps", "decode_tps",
                "peak_memory_gb")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(RUN), *map(str, args)], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT, env=env)


def summary_of(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def mlxlm_greedy(folder, prompt, n):
    """(prompt ids, greedy tokens) from mlx-lm's loader, tokenizer and generate_step."""
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tokenizer = mlx_lm.load(str(folder))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True)
    if isinstance(ids, dict):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    steps = generate_step(mx.array(ids), model, max_tokens=n,
                          sampler=lambda logits: mx.argmax(logits, axis=-1))
    return list(ids), [int(t) for t, _ in steps], tokenizer


@pytest.mark.parametrize("model_type", ["glm4_moe", "llama4"])
def test_greedy_tokens_equal_mlx_lm(tmp_path, model_type):
    folder = write_checkpoint(tmp_path, preset_config(model_type, "tiny"), seed=5)
    out = summary_of(run_cli("--model", folder, "--prompt", PROMPT, "--temp", 0,
                             "--max-tokens", MAX_TOKENS, "--json", "--ignore-eos"))
    ids, ref, tokenizer = mlxlm_greedy(folder, PROMPT, MAX_TOKENS)
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == ref
    assert len(set(ref)) > 1  # not a degenerate repeat that any model would match
    assert out["text"] == tokenizer.decode(ref, skip_special_tokens=True)
    check_summary(out, MAX_TOKENS)


def check_summary(out, n_tokens):
    for key in SUMMARY_KEYS:
        assert key in out, key
    assert len(out["tokens"]) == n_tokens and isinstance(out["text"], str)
    assert out["prompt_tokens"] > 0
    assert out["ttft_s"] > 0
    # prefill_tps is the prompt over the time to first token
    assert out["prefill_tps"] == pytest.approx(out["prompt_tokens"] / out["ttft_s"], rel=1e-6)
    assert out["decode_tps"] > 0
    assert 0 < out["peak_memory_gb"] < 64


def test_synthetic_alias_runs():
    out = summary_of(run_cli("--model", "glm4_moe", "--synthetic", "tiny", "--prompt", "hi",
                             "--max-tokens", 6, "--json", "--ignore-eos"))
    check_summary(out, 6)


def test_unknown_alias_lists_the_aliases():
    r = run_cli("--model", "nonexistent_alias_xyz", "--max-tokens", 2)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "nonexistent_alias_xyz" in r.stderr
    for alias in ("glm4_moe", "llama4", "glm", "openelm", "lille-130m"):
        assert alias in ALIASES and alias in r.stderr, alias


def test_alias_offline_without_local_copy_suggests_synthetic(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    r = run_cli("--model", "glm4_moe", "--max-tokens", 2, env=env)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "--synthetic" in r.stderr and ALIASES["glm4_moe"] in r.stderr


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_tokens_must_be_positive(value):
    r = run_cli("--model", "glm4_moe", "--synthetic", "tiny", "--max-tokens", value)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "--max-tokens" in r.stderr and value in r.stderr


def test_stop_string_ends_generation_and_is_cut_from_the_text():
    base = ["--model", "glm4_moe", "--synthetic", "tiny", "--max-tokens", "40", "--ignore-eos",
            "--json"]
    full = summary_of(run_cli(*base))
    # A stop string taken from the middle of the free-running text.
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 4]
    assert stop.strip() and text.index(stop) > 0
    cut = summary_of(run_cli(*base, "--stop", stop))
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.index(stop)]
    assert cut["tokens"] == full["tokens"][: len(cut["tokens"])]
    assert len(cut["tokens"]) < len(full["tokens"])

"""Pipelines of real processes on 127.0.0.1 against one process on the same checkpoint.

Each job runs under mlx.launch (ring, or MPI with Open MPI 5 from PyPI); the tests read
what every rank printed (its stage line and its 'finished' line), never the launcher's
exit code, which is 0 even when a rank fails.
"""

import json
import shutil

import numpy as np
import pytest

from dist_runtime.checkpoint import layer_index, safetensors_header, weight_map
from dist_runtime.costs import DTYPE_BYTES
from dist_runtime.synthetic import preset_config
from dist_runtime.writer import write_checkpoint
from tests.launcher import launch

N_LAYERS = 7  # divides evenly by none of 2, 3 and 4 ranks
LOGIT_TOL = 1e-4
PROMPT = "The pipeline passes hidden states from host to host until the coordinator samples."
GEN = ["--max-tokens", "12", "--ignore-eos", "--json", "--prompt", PROMPT]


def seven_layers(model_type):
    cfg = preset_config(model_type, "tiny")
    if "text_config" in cfg:
        cfg["text_config"] = dict(cfg["text_config"], num_hidden_layers=N_LAYERS)
    else:
        cfg["num_hidden_layers"] = N_LAYERS
    return cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {m: write_checkpoint(root / m, seven_layers(m), seed=7, shard_bytes=150_000)
            for m in ("glm4_moe", "llama4")}


@pytest.fixture(scope="module")
def single(checkpoints):
    """One-process reference runs, with first-token logits."""
    out = {}
    for m, path in checkpoints.items():
        job = launch(1, ["--model", str(path), *GEN, "--dump-logits"])
        assert job.summary, job.stderr
        out[m] = job.summary
    return out


def check_job(job, n):
    assert job.summary is not None, f"rank 0 printed no summary:\n{job.stderr}"
    assert not job.errors, job.errors
    assert job.finished == set(range(n)), f"ranks that finished: {job.finished}\n{job.stderr}"
    assert job.summary["ranks"] == n


def compare(job, ref):
    assert job.summary["tokens"] == ref["tokens"]
    a, b = np.array(job.summary["first_logits"]), np.array(ref["first_logits"])
    assert np.abs(a - b).max() <= LOGIT_TOL


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("model", ["glm4_moe", "llama4"])
def test_ring_equals_one_process(checkpoints, single, model, n):
    job = launch(n, ["--model", str(checkpoints[model]), *GEN, "--dump-logits"])
    check_job(job, n)
    compare(job, single[model])
    ranges = [tuple(p["layers"]) for p in job.summary["plan"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == N_LAYERS
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("model", ["glm4_moe", "llama4"])
def test_split_override(checkpoints, single, model):
    job = launch(3, ["--model", str(checkpoints[model]), "--split", "1,4,2", *GEN, "--dump-logits"])
    check_job(job, 3)
    assert [p["layers"] for p in job.summary["plan"]] == [[0, 1], [1, 5], [5, 7]]
    compare(job, single[model])


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed")
@pytest.mark.parametrize("model", ["glm4_moe", "llama4"])
def test_mpi_equals_one_process(checkpoints, single, model):
    job = launch(2, ["--model", str(checkpoints[model]), *GEN, "--dump-logits"], backend="mpi")
    check_job(job, 2)
    compare(job, single[model])


def test_seeded_sampling_same_on_one_and_three_ranks(checkpoints):
    args = ["--model", str(checkpoints["glm4_moe"]), "--temp", "0.9", "--top-p", "0.95",
            "--seed", "11", *GEN]
    one, three = launch(1, args), launch(3, args)
    check_job(three, 3)
    assert one.summary["tokens"] == three.summary["tokens"]
    other = launch(1, [*args[:-len(GEN)], "--seed", "12", *GEN])
    assert other.summary["tokens"] != one.summary["tokens"]


def expected_share(path, layers: range, non_layer: bool) -> int:
    """Bytes of the checkpoint's tensors a stage owns, from the safetensors headers."""
    total = 0
    for fname in sorted(set(weight_map(path).values())):
        for name, t in safetensors_header(path / fname).items():
            idx = layer_index(name)
            if (idx in layers) if idx is not None else non_layer:
                total += DTYPE_BYTES[t["dtype"]] * int(np.prod(t["shape"]))
    return total


@pytest.mark.parametrize("model", ["glm4_moe", "llama4"])
def test_each_rank_holds_only_its_share(checkpoints, model):
    path = checkpoints[model]
    job = launch(3, ["--model", str(path), *GEN, "--dump-logits"])
    check_job(job, 3)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for rank, info in job.stages.items():
        layers = range(*info["layers"])
        assert [p["layers"] for p in job.summary["plan"]][rank] == info["layers"]
        share = expected_share(path, layers, non_layer=rank == 0)
        assert info["param_bytes"] == share == info["loaded_bytes"]
        files = {f for n, f in index.items()
                 if (layer_index(n) in layers if layer_index(n) is not None else rank == 0)}
        assert set(info["files"]) == files
        if rank == 0:
            assert any("embed_tokens" in m for m in info["modules"])
            assert any("lm_head" in m for m in info["modules"])
        else:
            assert info["modules"] == [], f"rank {rank} holds non-layer modules {info['modules']}"

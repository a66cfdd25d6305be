"""Loading from a Hub repo id: each rank fetches config and tokenizer, then only its shards.

huggingface_hub's snapshot_download is replaced by a fake that serves a local folder
(no test touches the network) and records what was asked for.
"""

import fnmatch
import json
import shutil

import pytest

from dist_runtime import hub
from dist_runtime.checkpoint import layer_index
from dist_runtime.source import Source
from dist_runtime.synthetic import preset_config
from dist_runtime.writer import write_checkpoint

REPO = "someone/glm4-moe-tiny"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    remote = write_checkpoint(tmp_path / "remote", preset_config("glm4_moe", "tiny"), seed=5,
                              shard_bytes=150_000)
    cache = tmp_path / "cache"
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **_):
        assert repo_id == REPO
        asked.append(list(allow_patterns))
        cache.mkdir(exist_ok=True)
        for f in remote.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, cache / f.name)
        return str(cache)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return remote, cache, asked


def test_a_stage_downloads_only_its_shards(fake_hub):
    remote, cache, asked = fake_hub
    source = Source(REPO)
    assert not list(cache.glob("*.safetensors")), "metadata first, no weights"
    assert (cache / "tokenizer.json").is_file() and (cache / "config.json").is_file()
    model, _, files, nbytes = source.load(range(2, 4), has_embed=False, has_head=False)
    index = json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {f for n, f in index.items() if layer_index(n) in range(2, 4)}
    assert {p.name for p in cache.glob("*.safetensors")} == expected
    assert set(files) == expected and nbytes > 0
    assert [i for i, _ in model.owned_layers()] == [2, 3]


def test_unreachable_hub_suggests_synthetic(monkeypatch):
    import huggingface_hub

    def offline(**_):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(hub.ModelNotFound, match="--synthetic tiny"):
        Source("glm4_moe")

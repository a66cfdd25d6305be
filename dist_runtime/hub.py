"""Where weights come from: a local folder, a Hugging Face repo id, or a model alias.

From the Hub only the files a rank needs are fetched: config and tokenizer files first,
then only the safetensors shards that hold the rank's tensors (the index says which).
`HF_HUB_OFFLINE=1` is honoured by huggingface_hub itself.
"""

from __future__ import annotations

from pathlib import Path

from dist_runtime.checkpoint import (CONFIG_FILE, INDEX_FILE, TOKENIZER_FILES, CheckpointError,
                                     wanted, weight_map)

# alias -> Hub repo: what a user means by the architecture's name (a 4-bit mlx-community
# conversion where one exists, since these runs are about fitting big models).
ALIASES = {
    "glm4_moe": "mlx-community/GLM-4.5-Air-4bit",
    "llama4": "mlx-community/Llama-4-Scout-17B-16E-Instruct-4bit",
    "glm": "THUDM/glm-4-9b-chat-hf",
    "openelm": "mlx-community/OpenELM-270M-Instruct",
    "lille-130m": "mlx-community/lille-130m-instruct-fp16",
}


class ModelNotFound(CheckpointError):
    """Neither a local folder nor a reachable Hub repo."""


def is_alias(spec: str) -> bool:
    """Whether `spec` is one of the architecture aliases."""
    return spec in ALIASES


def resolve(spec: str) -> tuple:
    """(kind, value): ('local', Path) or ('hub', repo_id) for a --model argument."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return "local", path
    if spec in ALIASES:
        return "hub", ALIASES[spec]
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return "hub", spec
    raise ModelNotFound(f"--model {spec!r} is neither a folder, a Hub repo id (owner/name) nor "
                        f"an alias ({', '.join(ALIASES)})")


def _hub_call(fn, repo: str, **kw):
    try:
        return fn(repo_id=repo, **kw)
    except Exception as e:  # offline, unknown repo, gated, network down
        raise ModelNotFound(
            f"cannot get {repo} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}) and there is no local copy; pass a "
            f"local folder with --model, or run with no weights at all: --synthetic tiny")


def fetch_metadata(repo: str) -> Path:
    """Download config, index and tokenizer files (no weights); returns the local folder."""
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_FILE, INDEX_FILE, *TOKENIZER_FILES]
    return Path(_hub_call(snapshot_download, repo, allow_patterns=patterns))


def fetch_stage_weights(repo: str, folder: Path, layers: range, non_layer: bool) -> Path:
    """Download only the shards that hold tensors of `layers` (and non-layer ones if asked)."""
    from huggingface_hub import snapshot_download

    index = Path(folder) / INDEX_FILE
    if index.is_file():
        wmap = weight_map(folder)  # checks the index's layout
        files = sorted({f for n, f in wmap.items() if wanted(n, layers, non_layer)})
    else:
        files = ["*.safetensors"]
    return Path(_hub_call(snapshot_download, repo, allow_patterns=files + [CONFIG_FILE]))

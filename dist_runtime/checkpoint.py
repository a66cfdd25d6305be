"""Finding and reading checkpoints: config, safetensors shards, quantization, layouts.

A stage reads only what it owns: the index (`model.safetensors.index.json`) says which
file holds each tensor, so a rank opens only the shards with its layers (and, from the
Hub, downloads only those). Tensors are read lazily by `mx.load`, so a shard shared with
another stage costs only the bytes of this stage's tensors. Every failure names the file
and, where it helps, the tensor and both shapes.

Knows nothing of ranks: callers pass a layer range.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from models import ConfigError, get_module

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", GENERATION_CONFIG_FILE]
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Prefixes of towers that text generation never reads (Llama-4's vision encoder).
UNUSED_PREFIXES = ("vision_model.", "multi_modal_projector.", "vision_tower.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: the message names the file and the fix."""


def load_config(path: Path) -> dict:
    """Read `config.json` of a checkpoint folder, with errors that name the problem."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found: a checkpoint folder needs the model's "
                              f"config.json next to its *.safetensors files")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-download or fix it")
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} holds a {type(config).__name__}, not a JSON object")
    if "model_type" not in config:
        raise CheckpointError(f"{cfg_path} has no 'model_type' field, so the architecture "
                              f"is unknown; add e.g. \"model_type\": \"glm4_moe\"")
    check_config(config, str(cfg_path))
    gen_path = Path(path) / GENERATION_CONFIG_FILE
    if gen_path.is_file():
        try:
            config["_generation_config"] = json.loads(gen_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen_path} is not valid JSON ({e})")
    return config


def check_config(config: dict, where: str = CONFIG_FILE):
    """Parse `config` as its architecture does, so a bad value fails now, naming `where`:
    an unknown model_type, a missing field, a value of the wrong type or an impossible
    shape (ConfigError / UnknownModelType)."""
    module = get_module(config["model_type"])
    try:
        module.ModelArgs.from_dict(config, where=where)
    except ConfigError as e:
        raise ConfigError(str(e) if where in str(e) else f"{where}: {e}") from None
    except (TypeError, ValueError, ArithmeticError) as e:  # e.g. 0 heads
        raise ConfigError(f"{where} does not fit model_type {config['model_type']!r}: "
                          f"{type(e).__name__}: {e}") from None


def config_warnings(config: dict, where: str = CONFIG_FILE) -> list:
    """Keys of `config` its architecture ignores though they may change the computation
    (models/base.py, BaseConfig.config_warnings); one message each, naming `where`."""
    return get_module(config["model_type"]).ModelArgs.config_warnings(config, where)


def fit_config(path: Path, config: dict, wmap: dict) -> dict:
    """`config` with what only the checkpoint's shapes settle (Lille's MLP width when
    config.json omits it), for architectures that declare `config_from_shapes`. Reads
    the safetensors headers of the files at hand (from the Hub: those downloaded)."""
    module = get_module(config["model_type"])
    hook = getattr(module, "config_from_shapes", None)
    if hook is None:
        return config
    path = Path(path)
    at_hand = [n for n in wmap if (path / wmap[n]).is_file()]

    def shape_of(name):
        entry = safetensors_header(path / wmap[name]).get(name)
        return tuple(entry["shape"]) if entry else None

    return hook(config, at_hand, shape_of)


def layer_index(name: str) -> Optional[int]:
    """Global layer number in a tensor name (`model.layers.12.mlp...` -> 12), else None."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def wanted(name: str, layers: range, non_layer: bool) -> bool:
    """Whether a stage owning `layers` (and non-layer tensors if non_layer) reads `name`."""
    if name.startswith(UNUSED_PREFIXES):
        return False
    idx = layer_index(name)
    return (idx in layers) if idx is not None else non_layer


def weight_map(path: Path) -> dict:
    """tensor name -> file name, from the index, or from the one file's header."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index} is malformed ({e}); it needs a 'weight_map' object; "
                                  f"re-download it")
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict):
            what = (f"a JSON {_json_kind(data)}" if not isinstance(data, dict) else
                    "no 'weight_map'" if wmap is None else f"a 'weight_map' {_json_kind(wmap)}")
            raise CheckpointError(f"{index} is malformed ({what}); it needs a 'weight_map' "
                                  f"object of tensor name -> file name; re-download it")
        for name, fname in wmap.items():
            if not isinstance(fname, str) or not fname:
                raise CheckpointError(f"{index} is malformed (tensor {name!r} -> {fname!r} is "
                                      f"not a file name in the folder); re-download it")
        return wmap
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return {name: f for f in files for name in safetensors_header(path / f)}


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file is whole."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {INDEX_FILE} lists tensors in it, but "
                              f"the file is not in the folder; download it again")
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{file} is truncated: its header alone needs {8 + n} bytes, "
                                  f"the file has {size}; re-download it")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} has a corrupt header ({e}); re-download it")
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt header (a JSON {_json_kind(header)} where "
                              f"a safetensors header has an object of tensor name -> "
                              f"{{dtype, shape, data_offsets}}); re-download it")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointError(f"{file} has a corrupt header (tensor {name!r}: {problem}); "
                                  f"re-download it")
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file} is truncated: its tensors need {8 + n + end} bytes, "
                              f"the file has {size}; re-download it")
    return header


# Bytes per element of the safetensors dtypes mlx reads; others are left to mx.load.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4,
               "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _json_kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry_problem(entry) -> Optional[str]:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return (f"a JSON {_json_kind(entry)}, not an object with dtype, shape and "
                f"data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        return f"no {' or '.join(missing)} in {json.dumps(entry)[:120]}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        return f"dtype {dtype!r} is not a string such as \"F32\""
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} is not [start, end] with 0 <= start <= end"
    if dtype in DTYPE_SIZES:
        need = DTYPE_SIZES[dtype]
        for d in shape:
            need *= d
        if offsets[1] - offsets[0] != need:
            return (f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but "
                    f"{dtype} of shape {shape} needs {need}")
    return None


@dataclass
class Loaded:
    """A built (possibly partial) model and what it took to load it."""

    model: nn.Module
    config: dict
    args: object
    path: Optional[Path] = None
    files_read: list = field(default_factory=list)
    bytes_loaded: int = 0


def build_model(config: dict, layers: Optional[range] = None, has_embed: bool = True,
                has_head: bool = True):
    """(model, args) for `config`, pruned to a stage. Weights are still the random init."""
    module = get_module(config["model_type"])
    try:
        args = module.ModelArgs.from_dict(config)
    except TypeError as e:
        raise ConfigError(f"config.json does not fit model_type {config['model_type']!r}: {e}")
    model = module.Model(args)
    n = len(model.layers)
    layers = range(n) if layers is None else layers
    model.pipeline(layers.start, layers.stop, has_embed, has_head)
    return model, args


def quantize_like(model: nn.Module, config: dict, weights: dict):
    """Turn into quantized layers exactly the modules the checkpoint stores packed.

    `quantization` in config.json gives the default bits/group size and per-module
    overrides (a dict, or false for a module left in full precision); a module is
    quantized when its `.scales` tensor is present, which is what mlx wrote.
    """
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return
    defaults = {"group_size": q.get("group_size", 64), "bits": q.get("bits", 4),
                "mode": q.get("mode", "affine")}

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = q.get(path)
        if isinstance(override, dict):
            return {**defaults, **override}
        return override is not False and defaults

    nn.quantize(model, class_predicate=predicate)


def read_weights(path: Path, names: list, wmap: dict, progress: Optional[Callable] = None):
    """Read `names` from the shards that hold them (`wmap`: weight_map(path)):
    (weights, files, bytes)."""
    by_file: dict = {}
    for name in names:
        by_file.setdefault(wmap[name], []).append(name)
    weights, total = {}, 0
    for i, (fname, fnames) in enumerate(sorted(by_file.items()), 1):
        file = Path(path) / fname
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in {INDEX_FILE} but missing; download it")
        safetensors_header(file)
        try:
            tensors = mx.load(str(file))
        except Exception as e:  # mlx reports a bad file as a bare RuntimeError
            raise CheckpointError(f"cannot read {file}: {e}; re-download it")
        for name in fnames:
            if name not in tensors:
                raise CheckpointError(f"tensor {name} is missing from {file}, where "
                                      f"{INDEX_FILE} says it is")
            weights[name] = tensors[name]
            total += tensors[name].nbytes
        if progress:
            progress(i, len(by_file), fname, total)
    return weights, sorted(by_file), total


def load_model(path: Path, layers: Optional[range] = None, has_embed: bool = True,
               has_head: bool = True, progress: Optional[Callable] = None) -> Loaded:
    """Build the stage owning `layers` and load its tensors, checking names and shapes."""
    path = Path(path)
    wmap = weight_map(path)
    config = fit_config(path, load_config(path), wmap)
    model, args = build_model(config, layers, has_embed, has_head)
    owned = range(*model.layer_range)
    names = [n for n in wmap if wanted(n, owned, has_embed or has_head)]
    weights, files, _ = read_weights(path, names, wmap, progress)
    try:
        weights = model.sanitize(weights)
    except ValueError as e:  # e.g. an original-layout expert tensor absent from the files
        raise CheckpointError(f"{path}: the tensors read ({', '.join(files)}) cannot be put "
                              f"in this model's layout: {e}; is a shard missing or stale?")
    quantize_like(model, config, weights)
    expected = dict(tree_flatten(model.parameters()))
    # Non-layer tensors the stage does not hold (the head on a first-only stage...).
    weights = {k: v for k, v in weights.items() if k in expected or layer_index(k) is not None}
    check_weights(expected, weights, wmap, path)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    nbytes = sum(v.nbytes for v in weights.values())
    return Loaded(model, config, args, path, files, nbytes)


def check_weights(expected: dict, weights: dict, wmap: dict, path: Path):
    """Every expected tensor present with its shape, nothing unexpected."""
    for name, param in expected.items():
        if name not in weights:
            where = wmap.get(name)
            if where is None:
                files = sorted(set(wmap.values()))
                where = files[0] if len(files) == 1 else f"one of {', '.join(files)}"
            raise CheckpointError(f"tensor {name} is missing from the weights: expected in "
                                  f"{Path(path) / where}")
        if tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(weights[name].shape)} in the "
                                  f"checkpoint but the config implies {tuple(param.shape)}; "
                                  f"config.json and the weights do not match")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise CheckpointError(f"{len(extra)} tensor(s) in {path} belong to no module of this "
                              f"model, e.g. {extra[0]}; is config.json from another model?")


def log_progress(prefix: str = ""):
    """A progress callback that prints one line per shard to stderr."""
    def report(i, n, fname, total):
        print(f"{prefix}loaded {fname} ({i}/{n}, {total / 1e9:.2f} GB so far)",
              file=sys.stderr, flush=True)
    return report

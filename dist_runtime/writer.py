"""Writing checkpoints in the Hugging Face folder layout, and a tokenizer to go with them.

Used to turn a synthetic model into files that go through exactly the loading path a
downloaded checkpoint takes (config.json, sharded safetensors with
`model.safetensors.index.json`, tokenizer.json, tokenizer_config.json with a chat
template, generation_config.json). The tokenizer is a byte-level BPE trained here on a
short built-in text, so any prompt encodes and every id below its size decodes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from dist_runtime.synthetic import EOS_ID, synthetic_model

SHARD_BYTES = 2 << 30  # per safetensors file, as Hub checkpoints shard at a few GB
SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|user|>", "<|assistant|>"]  # EOS_ID = 2
TOKENIZER_MAX_VOCAB = 2000  # merges learned from the corpus stop well before this
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """The pipeline runs one slice of the model on every host. Each stage passes its
hidden state to the next, and the coordinator samples the next token. Mixture of experts
layers route every token to a few experts; attention looks back over the cache.
Machines join over Thunderbolt or Ethernet. Quick brown foxes jump over lazy dogs.
Numbers 0123456789 and punctuation, ; : ! ? ( ) [ ] { } " ' - + = / * & % $ # @.
Ünïcödé wörds, 日本語のテキスト, 中文文本, emoji 🙂🚀 travel through the byte-level tokenizer."""


def tokenizer_recipe_id() -> str:
    """A short hash of what decides the synthetic tokenizer (for caching it safely)."""
    recipe = "\0".join([CORPUS, CHAT_TEMPLATE, *SPECIAL_TOKENS, str(TOKENIZER_MAX_VOCAB)])
    return f"{zlib.crc32(recipe.encode()):08x}"


def build_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with at most vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, TOKENIZER_MAX_VOCAB), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    assert tok.token_to_id("<|endoftext|>") == EOS_ID
    return tok


def write_tokenizer(folder: Path, vocab_size: int):
    """tokenizer.json and tokenizer_config.json (with the chat template) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE}, indent=1))


def save_sharded(folder: Path, weights: dict, shard_bytes: int = SHARD_BYTES):
    """weights -> model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    folder = Path(folder)
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        arr = weights[name]
        if current and size + arr.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    wmap = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / fname), shard, metadata={"format": "mlx"})
        wmap.update({k: fname for k in shard})
    total = sum(a.nbytes for a in weights.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": wmap}, indent=1))


def write_checkpoint(folder: Path, config: dict, seed: int = 0, dtype=mx.float32,
                     bits: int = None, group_size: int = 64, shard_bytes: int = SHARD_BYTES,
                     transform=None) -> Path:
    """Write a synthetic model as a checkpoint folder; returns the folder.

    `transform(weights) -> weights` may rewrite names/layouts (e.g. into the original
    Hugging Face layout) before saving.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, _, config = synthetic_model(config, seed, dtype=dtype, bits=bits,
                                       group_size=group_size)
    weights = dict(tree_flatten(model.parameters()))
    if transform is not None:
        weights = transform(weights)
    save_sharded(folder, weights, shard_bytes)
    config = dict(config, torch_dtype={mx.float32: "float32", mx.bfloat16: "bfloat16",
                                       mx.float16: "float16"}[dtype])
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID]}))
    text_cfg = config.get("text_config", config)
    write_tokenizer(folder, text_cfg["vocab_size"])
    return folder

"""Lille 130M's own details: the MLP width rule (and its other rounding in checkpoints).

Logits against mlx-lm, cached decode, stage chains, sanitize: tests/test_models.py.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from models import get_module
from models.base import ConfigError
from tests.reference import mlxlm_logits, prompt_tokens

TOL = 1e-4  # fp32 max abs difference allowed against the reference
SEED = 3

mod = get_module("lille-130m")


def test_ffn_width():
    assert mod.ffn_width(640) == 1792  # the published model: int(1706.67) -> 7 * 256
    assert mod.ffn_width(768) == 2048  # exactly 8 * 768 / 3
    assert mod.ffn_width(64) == 256  # the tiny preset
    assert mod.ffn_width(128) == 512  # rounded up (mlx-lm's nearest rounding gives 256)


def test_published_shape():
    args = mod.ModelArgs.from_dict(mod.PRESETS["lille-130m"])
    assert args.head_dim == 64
    n_params = sum(p.size for _, p in tree_flatten(mod.Model(args).parameters()))
    assert 120e6 < n_params < 140e6  # "130M" (the README says closer to 140M)


def test_untied_config_is_rejected():
    with pytest.raises(ConfigError):
        mod.ModelArgs.from_dict(dict(mod.PRESETS["tiny"], tie_word_embeddings=False))


def mlxlm_checkpoint(folder, cfg, seed=SEED):
    """mlx-lm's Lille for `cfg` (its own MLP width rule: the nearest multiple of 256),
    seeded, saved as a checkpoint folder whose config.json states no MLP width."""
    import json

    from mlx_lm.utils import _get_classes

    from dist_runtime.synthetic import fill_model
    from dist_runtime.writer import save_sharded, write_tokenizer

    model_class, args_class = _get_classes(cfg)
    ref = model_class(args_class.from_dict(cfg))
    fill_model(ref, seed, layers_path="transformer.layers")
    folder.mkdir(parents=True)
    save_sharded(folder, dict(tree_flatten(ref.parameters())), shard_bytes=100_000)
    (folder / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(folder, cfg["vocab_size"])
    return ref


@pytest.mark.parametrize("n_embd", [128, 64])  # 128: mlx-lm's width 256, our rule's 512
def test_mlp_width_comes_from_the_checkpoint_when_the_config_has_none(tmp_path, n_embd):
    from dist_runtime.checkpoint import load_model

    cfg = dict(mod.PRESETS["tiny"], n_embd=n_embd)
    assert "intermediate_size" not in cfg
    ref = mlxlm_checkpoint(tmp_path / "ckpt", cfg)
    width = ref.layers[0].feed_forward.gate_proj.weight.shape[0]
    assert (width != mod.ffn_width(n_embd)) == (n_embd == 128)
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.model.layers[0].feed_forward.gate_proj.weight.shape[0] == width
    tokens = prompt_tokens(cfg["vocab_size"], 48)
    ours = np.array(loaded.model(mx.array(tokens)))
    assert np.abs(ours - mlxlm_logits(ref, tokens)).max() <= TOL
    # a last stage reads the width from its own layers' shards
    stage = load_model(tmp_path / "ckpt", range(2, 4), has_embed=False, has_head=True).model
    assert stage.layers[3].feed_forward.down_proj.weight.shape[1] == width


def test_a_stated_mlp_width_is_used():
    args = mod.ModelArgs.from_dict(dict(mod.PRESETS["tiny"], n_embd=128, intermediate_size=256))
    assert mod.Model(args).layers[0].feed_forward.up_proj.weight.shape == (256, 128)


@pytest.mark.timeout(120)
def test_checkpoint_with_the_other_rounding_runs_on_two_ranks(tmp_path):
    from tests.launcher import launch

    mlxlm_checkpoint(tmp_path / "ckpt", dict(mod.PRESETS["tiny"], n_embd=128))
    args = ["--model", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-tokens", "6",
            "--ignore-eos", "--json"]
    one, two = launch(1, args, timeout=60), launch(2, args, timeout=60)
    assert one.summary and two.summary and not two.errors, two.stderr
    assert two.finished == {0, 1} and two.summary["tokens"] == one.summary["tokens"]

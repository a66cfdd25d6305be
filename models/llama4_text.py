"""Llama 4, text model alone (Hugging Face `model_type: llama4_text`, `Llama4ForCausalLM`).

The same network as models/llama4.py, saved without the multimodal wrapper: config.json
holds the text fields at the top level (what sits under `text_config` in a Scout or
Maverick checkpoint), and the tensors are named `model.layers.N...`, `model.embed_tokens`,
`model.norm` and `lm_head` instead of `language_model.model...` and
`language_model.lm_head`. Everything else, and every per-layer decision, is llama4.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from . import llama4
from .llama4 import TextConfig, TextModel


@dataclass
class ModelArgs(TextConfig):
    """A `Llama4TextConfig` config.json: TextConfig's fields at the top level."""


class Model(llama4.Model):
    """Llama4ForCausalLM: the text model (`model.`) and its LM head (`lm_head`)."""

    LAYERS_PATH = "model.layers"
    EMBED_PATH = "model.embed_tokens"
    NORM_PATH = "model.norm"
    LM_HEAD_PATH = "lm_head"

    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)  # not llama4.Model's: no language_model wrapper
        self.args = args
        self.text = args
        self.model = TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


# Synthetic presets (dist_runtime/synthetic.py): llama4's, unwrapped.
PRESETS = {name: dict(p["text_config"], model_type="llama4_text")
           for name, p in llama4.PRESETS.items()}

"""The architectures, by Hugging Face `model_type`: one literal table, imported lazily.

Adding an architecture means one row here, a `tiny` preset in its PRESETS (the shared
tests in tests/test_models.py run over every row), and its own details in
tests/test_model_<type>.py.
"""

import importlib

from .base import ConfigError  # noqa: F401  (re-exported for loaders)

# model_type -> module under models/. Aliases map other model_type spellings.
MODEL_TYPES = {
    "glm": "glm",
    "glm4_moe": "glm4_moe",
    "openelm": "openelm",
    "lille-130m": "lille_130m",
    "llama4": "llama4",
    "llama4_text": "llama4_text",  # Llama4ForCausalLM: the text model without its wrapper
}


class UnknownModelType(ValueError):
    """A config names a `model_type` no module here implements."""


def get_module(model_type: str):
    """The module implementing `model_type` (exports ModelArgs, Model, PRESETS)."""
    name = MODEL_TYPES.get(model_type)
    if name is None:
        raise UnknownModelType(
            f"unknown model_type {model_type!r}; known model types: {', '.join(sorted(MODEL_TYPES))}"
        )
    return importlib.import_module(f"{__name__}.{name}")

"""Text in and out, on the coordinator only: `tokenizer.json`, chat template, EOS, streaming.

Uses the `tokenizers` library on the checkpoint's `tokenizer.json` and renders the chat
template (from `tokenizer_config.json` or `chat_template.jinja`) with jinja2. The
streaming detokenizer re-decodes the tokens since the last safe point and holds text
back while it ends in an incomplete UTF-8 sequence, so a multi-byte character split
over two tokens is never printed half.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import jinja2
from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
WINDOW = 64  # ids re-decoded at most per step


class TokenizerError(RuntimeError):
    """Missing or unusable tokenizer files."""


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _token_text(v) -> Optional[str]:
    """tokenizer_config stores special tokens as strings or {"content": ...} dicts."""
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template and EOS ids."""

    def __init__(self, path: Path, config: Optional[dict] = None):
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file} not found: the coordinator needs the "
                                 f"checkpoint's tokenizer.json")
        try:
            self.hf = HFTokenizer.from_file(str(tok_file))
        except Exception as e:
            raise TokenizerError(f"cannot read {tok_file}: {e}")
        cfg_file = path / "tokenizer_config.json"
        self.tok_config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = self.tok_config.get("chat_template")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            template[0]["template"] if template else None)
        self.chat_template = template
        self.eos_ids = self._eos_ids(config or {})

    def _eos_ids(self, config: dict) -> set:
        ids = set()
        gen = config.get("_generation_config", {})
        text_cfg = config.get("text_config", {})
        for src in (gen, config, text_cfg):
            ids.update(_as_list(src.get("eos_token_id")))
        eos_tok = _token_text(self.tok_config.get("eos_token"))
        if eos_tok is not None and self.hf.token_to_id(eos_tok) is not None:
            ids.add(self.hf.token_to_id(eos_tok))
        return {int(i) for i in ids}

    @property
    def bos_token(self) -> str:
        """The BOS token's text ('' when the tokenizer has none)."""
        return _token_text(self.tok_config.get("bos_token")) or ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Text -> ids."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list) -> str:
        """Ids -> text (special tokens skipped)."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list) -> str:
        """Render the chat template with a generation prompt; plain text if there is none."""
        if not self.chat_template:
            return "\n".join(m["content"] for m in messages)
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
            eos_token=_token_text(self.tok_config.get("eos_token")) or "")

    def chat_ids(self, messages: list) -> list:
        """Token ids of a conversation: the chat template rendered (it places the special
        tokens), or without one the contents joined and encoded with them."""
        return self.encode(self.apply_chat_template(messages),
                           add_special_tokens=not self.chat_template)

    def prompt_ids(self, prompt: str, chat: bool = True) -> list:
        """Token ids of a user prompt, through the chat template when asked and present.

        Raises TokenizerError for a prompt that is not UTF-8 text, or that gives no
        tokens at all (nothing to generate from).
        """
        check_prompt_text(prompt)
        ids = self.chat_ids([{"role": "user", "content": prompt}]) if chat else \
            self.encode(prompt)
        if not ids:
            how = ("through the chat template" if chat and self.chat_template else
                   "as is (--no-chat-template, or the checkpoint has no chat template), "
                   "and this tokenizer adds no BOS token")
            raise TokenizerError(f"the prompt {prompt!r} gives no tokens {how}, so there is "
                                 f"nothing to generate from; give a non-empty --prompt")
        return ids


def utf8_problem(text: str) -> Optional[str]:
    """Why `text` is not valid UTF-8 text, or None when it is.

    Python hands over command-line bytes that are not UTF-8 as lone surrogates
    (U+DC80..U+DCFF, 'surrogateescape'); the tokenizer cannot take them.
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape") if all(
            0xDC80 <= ord(c) <= 0xDCFF for c in text[e.start:e.end]) else None
        shown = (raw.decode("utf-8", "backslashreplace") if raw is not None
                 else text.encode("utf-8", "backslashreplace").decode("ascii"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        where = len(text[:e.start].encode("utf-8"))
        what = (f"byte 0x{raw[where]:02x}" if raw is not None
                else f"the lone surrogate U+{ord(text[e.start]):04X}")
        return f"{what} at position {where} of '{shown}'"


def check_prompt_text(prompt: str):
    """Raise TokenizerError, with the offending byte and the fix, unless `prompt` is UTF-8."""
    problem = utf8_problem(prompt)
    if problem:
        raise TokenizerError(f"--prompt is not valid UTF-8: {problem}; pass UTF-8 text "
                             f"(check the terminal's or the file's encoding)")


def _raise_template_error(msg):
    raise TokenizerError(f"chat template: {msg}")


class StreamingDetokenizer:
    """Feed ids one at a time; `add` returns only text that is complete and new."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list = []
        self.emitted = ""  # text already returned for self.ids

    def add(self, token: int) -> str:
        """Add one id, return the newly printable text ('' while a character is split)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith(REPLACEMENT):
            return ""
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        if len(self.ids) > WINDOW:
            # Keep re-decoding cheap: restart from the last id, kept as context so
            # decoders that treat the first token specially (leading spaces) agree.
            self.ids = self.ids[-1:]
            self.emitted = self.tok.decode(self.ids)
        return new

    def finish(self) -> str:
        """Whatever is left (an incomplete character shows as U+FFFD)."""
        text = self.tok.decode(self.ids)
        rest = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.ids, self.emitted = [], ""
        return rest

"""Tokenizer: streaming detokenization of multi-byte text, chat templates (checked against
transformers' rendering of the same files) and where EOS ids come from."""

import json

import pytest

from dist_runtime.checkpoint import load_config
from dist_runtime.synthetic import preset_config
from dist_runtime.tokenizer import REPLACEMENT, WINDOW, StreamingDetokenizer, Tokenizer
from dist_runtime.writer import write_tokenizer

VOCAB = 512
# CJK and emoji both seen by the tokenizer's training text (merged tokens that may end
# mid-character) and unseen (one token per byte: 3- and 4-byte characters split), a
# skin-tone modifier, Hangul, combining text, and ASCII between them.
TEXT = ("Stream 日本語のテキスト and 中文文本 🙂🚀 then 漢字かな交じり 👍🏽🎉, 한국어 텍스트, "
        "Ünïcödé wörds ✓ → ∞; emoji🙂again🚀 end. ")
MESSAGES = [{"role": "user", "content": "Hello 日本 🙂"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, VOCAB)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


def stream(tok, ids):
    detok = StreamingDetokenizer(tok)
    chunks = [detok.add(i) for i in ids]
    chunks.append(detok.finish())
    return chunks


def test_ids_really_split_characters(tok):
    ids = tok.encode(TEXT * 3)
    # the text must exercise the case under test: single ids that are only part of a
    # character, and more ids than the re-decode window
    assert sum(REPLACEMENT in tok.decode([i]) for i in ids) >= 10
    assert len(ids) > 2 * WINDOW


@pytest.mark.parametrize("shift", range(0, 12))
def test_streaming_never_splits_a_character(tok, shift):
    # shifting the text moves where the window restarts relative to the split characters
    ids = tok.encode("x" * shift + TEXT * 3)
    assert tok.decode(ids) == "x" * shift + TEXT * 3  # the tokenizer round-trips
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert not [c for c in chunks if REPLACEMENT in c]


def test_streaming_of_separately_encoded_pieces(tok):
    # ids of pieces encoded one by one, as a model might emit them: byte tokens of an
    # unseen character arrive one at a time, and the window restarts many times
    ids = [i for ch in (TEXT * 4) for i in tok.encode(ch)]
    assert len(ids) > 4 * WINDOW
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == TEXT * 4
    assert not [c for c in chunks if REPLACEMENT in c]


def test_incomplete_character_at_the_end_shows_on_finish(tok):
    ids = tok.encode("ab") + tok.encode("👍")[:-1]  # the emoji's last byte never comes
    detok = StreamingDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids) == "ab"
    assert detok.finish() == tok.decode(ids)[2:] and REPLACEMENT in tok.decode(ids)


# ---------------------------------------------------------------- chat templates

def hf_render(folder) -> str:
    """transformers' rendering of the folder's chat template: the reference."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_chat_template_from_tokenizer_config(tok_dir, tok):
    assert tok.chat_template == json.loads((tok_dir / "tokenizer_config.json").read_text())[
        "chat_template"]
    text = tok.apply_chat_template(MESSAGES)
    assert text == hf_render(tok_dir)
    assert text.startswith(tok.bos_token) and "Hello 日本 🙂" in text
    assert tok.prompt_ids("Hello 日本 🙂") == tok.encode(text, add_special_tokens=False)


def test_chat_template_jinja_file_takes_precedence(tmp_path):
    write_tokenizer(tmp_path, VOCAB)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    text = Tokenizer(tmp_path).apply_chat_template(MESSAGES)
    assert text == hf_render(tmp_path)
    assert text.startswith("[USER] Hello")


def test_no_chat_template_feeds_the_prompt_as_is(tmp_path):
    write_tokenizer(tmp_path, VOCAB)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(tmp_path)
    assert tok.prompt_ids("plain text") == tok.encode("plain text")


# ---------------------------------------------------------------- EOS ids

def eos_ids(folder, config=None, generation=None):
    cfg = {k: v for k, v in preset_config("glm4_moe", "tiny").items() if k != "eos_token_id"}
    cfg.update(config or {})  # a whole config: load_config checks it
    (folder / "config.json").write_text(json.dumps(cfg))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return Tokenizer(folder, load_config(folder)).eos_ids


@pytest.fixture
def bare_tok_dir(tmp_path):
    write_tokenizer(tmp_path, VOCAB)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["eos_token"]  # only the config files name EOS ids here
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_eos_from_generation_config(bare_tok_dir):
    assert eos_ids(bare_tok_dir, generation={"eos_token_id": [7, 9]}) == {7, 9}
    assert eos_ids(bare_tok_dir, generation={"eos_token_id": 11}) == {11}


def test_eos_from_config_json(bare_tok_dir):
    assert eos_ids(bare_tok_dir, config={"eos_token_id": 5}) == {5}
    assert eos_ids(bare_tok_dir, config={"eos_token_id": [5, 6]}) == {5, 6}
    # Llama-4 nests the text model's fields
    assert eos_ids(bare_tok_dir, config={"text_config": {"eos_token_id": [8]}}) == {8}


def test_eos_from_both_files_and_tokenizer_config(tmp_path):
    write_tokenizer(tmp_path, VOCAB)
    eos_text = json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"]
    eos_tok = Tokenizer(tmp_path).hf.token_to_id(eos_text)
    assert eos_ids(tmp_path, config={"eos_token_id": 5},
                   generation={"eos_token_id": [7, 9]}) == {5, 7, 9, eos_tok}


def test_a_prompt_with_no_tokens_is_refused_unless_bos_is_added(tok_dir):
    from dist_runtime.tokenizer import TokenizerError
    from tokenizers import processors

    tok = Tokenizer(tok_dir)
    assert tok.prompt_ids("", chat=True)  # the chat template adds its own tokens
    with pytest.raises(TokenizerError, match=r"the prompt '' gives no tokens as is"):
        tok.prompt_ids("", chat=False)
    bos = tok.hf.token_to_id("<s>")
    tok.hf.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                          special_tokens=[("<s>", bos)])
    assert tok.prompt_ids("", chat=False) == [bos]  # BOS alone: a prompt to start from


@pytest.mark.parametrize("prompt,expected", [
    ("caf\udcff", "byte 0xff at position 3 of 'caf\\xff'"),
    ("日本\udce6\udc97", "byte 0xe6 at position 6 of '日本\\xe6\\x97'"),
    ("a\ud800b", "the lone surrogate U+D800 at position 1"),
])
def test_a_prompt_that_is_not_utf8_names_the_byte(tok, prompt, expected):
    from dist_runtime.tokenizer import TokenizerError

    with pytest.raises(TokenizerError) as e:
        tok.prompt_ids(prompt)
    assert str(e.value).startswith("--prompt is not valid UTF-8: " + expected), str(e.value)

"""Reading an OpenAI-style request: its JSON, its settings and its prompt, each fault
answered as OpenAI's API answers it (`ApiError`: status, message, the offending field).

launch/serve.py owns the HTTP side and the engine; this module only reads and checks
what a request asks for, so its rules stay in one place and are tested through the
server (tests/test_serve.py).
"""

from __future__ import annotations

import json
import math

from dist_runtime.sampling import SamplingParams


class ApiError(Exception):
    """An error answered the way OpenAI's API does: status and {"error": {...}}."""

    def __init__(self, status: int, message: str, param=None, code=None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = \
            status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _get(body: dict, name: str, kind: str, default=None):
    """Field `name` of the request, checked to be of `kind` (number, integer, boolean,
    string, object); absent or null gives `default`."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"number": isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v),
          "integer": isinstance(v, int) and not isinstance(v, bool),
          "boolean": isinstance(v, bool), "string": isinstance(v, str),
          "object": isinstance(v, dict)}[kind]
    if not ok:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ApiError(400, f"'{name}' must be {'a finite number' if kind == 'number' else article + ' ' + kind}, "
                       f"got {_type_name(v)} ({json.dumps(v)[:40]})", param=name,
                       code="invalid_type")
    return v


# SamplingParams' fields by the names a request gives them.
API_NAMES = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repetition_penalty"}


def _range(name: str, v, ok: bool, what: str):
    if not ok:
        raise ApiError(400, f"'{name}' must be {what}, got {v}", param=name, code="invalid_value")


class Settings:
    """What a request asks for, checked."""

    def __init__(self, body: dict, model_name: str):
        model = body.get("model")
        if model is None:
            raise ApiError(400, "'model' is required", param="model", code="missing_field")
        _get(body, "model", "string")
        if model != model_name:
            raise ApiError(404, f"the model '{model}' does not exist: this server serves "
                           f"'{model_name}' (GET /v1/models)", param="model",
                           code="model_not_found")
        self.stream = _get(body, "stream", "boolean", False)
        opts = _get(body, "stream_options", "object", {}) or {}
        self.include_usage = bool(opts.get("include_usage", False))
        n = _get(body, "n", "integer", 1)
        _range("n", n, n == 1, "1 (one choice per request)")
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        self.max_tokens = _get({name: mt}, name, "integer", None)
        if self.max_tokens is not None:
            _range(name, self.max_tokens, self.max_tokens >= 1, "at least 1")
        temp = _get(body, "temperature", "number", 1.0)
        _range("temperature", temp, temp <= 2, "at most 2 (OpenAI's range: 0 to 2)")
        top_p = _get(body, "top_p", "number", 1.0)
        top_k = _get(body, "top_k", "integer", 0)
        min_p = _get(body, "min_p", "number", 0.0)
        rep = _get(body, "repetition_penalty", "number", 1.0)
        seed = _get(body, "seed", "integer", None)
        for name in ("frequency_penalty", "presence_penalty"):
            v = _get(body, name, "number", 0.0)
            _range(name, v, v == 0, "0 (not supported; use repetition_penalty)")
        if body.get("logprobs") not in (None, False, 0):
            raise ApiError(400, "'logprobs' is not supported", param="logprobs",
                           code="unsupported")
        self.params = SamplingParams(temp, top_k, top_p, min_p, rep, seed=seed)
        bad = self.params.out_of_range()  # the ranges run.py's options have
        if bad is not None:
            field, value, what = bad
            _range(API_NAMES[field], value, False, what)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ApiError(400, f"'stop' must be a string or an array of strings, got "
                           f"{_type_name(stop)}", param="stop", code="invalid_type")
        _range("stop", len(stop), len(stop) <= 16, "at most 16 strings")
        self.stops = [s for s in stop if s]
        self.ignore_eos = _get(body, "ignore_eos", "boolean", False)
        self.cache_prompt = _get(body, "cache_prompt", "boolean", True)


def _text(value: str, param: str):
    """400 for a string the tokenizer cannot take (lone surrogates from JSON escapes)."""
    from dist_runtime.tokenizer import utf8_problem

    problem = utf8_problem(value)
    if problem:
        raise ApiError(400, f"'{param}' is not valid UTF-8 text: {problem}", param=param,
                       code="invalid_value")


def chat_prompt(body: dict, tok) -> list:
    """The token ids of a chat request's messages, through the chat template."""
    from dist_runtime.tokenizer import TokenizerError

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects"
                       + ("" if messages is None else f", got {_type_name(messages)}"),
                       param="messages", code="invalid_type" if messages else "missing_field")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object, got {_type_name(m)}",
                           param=where, code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise ApiError(400, f"'{where}.role' must be a string, got {_type_name(role)}",
                           param=f"{where}.role", code="invalid_type")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"'{where}.content' parts must be "
                                   f"{{\"type\": \"text\", \"text\": ...}}: only text is "
                                   f"supported", param=f"{where}.content", code="invalid_type")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or an array of text "
                           f"parts, got {_type_name(content)}", param=f"{where}.content",
                           code="invalid_type")
        _text(content, f"{where}.content")
        out.append({"role": role, "content": content})
    try:
        ids = tok.chat_ids(out)
    except TokenizerError as e:
        raise ApiError(400, str(e), param="messages")
    except Exception as e:  # jinja2 errors in a template given odd messages
        raise ApiError(400, f"the chat template cannot render these messages: {e}",
                       param="messages")
    if not ids:
        raise ApiError(400, "the messages give no tokens: nothing to generate from",
                       param="messages")
    return ids


def completion_prompt(body: dict, tok, vocab: int) -> list:
    """The token ids of a completion request's prompt (a string, or token ids)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _text(prompt, "prompt")
        ids = tok.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"'prompt' holds token id {bad[0]}, outside the vocabulary "
                           f"(0..{vocab - 1})", param="prompt", code="invalid_value")
        ids = list(prompt)
    elif prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_field")
    else:
        raise ApiError(400, f"'prompt' must be a string or an array of token ids (one prompt "
                       f"per request), got {_type_name(prompt)}", param="prompt",
                       code="invalid_type")
    if not ids:
        raise ApiError(400, "the prompt gives no tokens: nothing to generate from",
                       param="prompt")
    return ids


def json_object(raw: bytes) -> dict:
    """A request body as a JSON object, or the 400 that says why it is not one."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json")
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got "
                       f"{_type_name(body)}", code="invalid_type")
    return body

#!/usr/bin/env python3
"""Prompt reuse, measured: time to first token of a conversation's second turn against
its first, on a running server (launch/serve.py).

    python launch/serve_bench.py --url http://127.0.0.1:8000 --tokens 2000

Each conversation: a user message of about --tokens tokens (first turn), then the same
messages with the reply and a short question (second turn, which shares the whole first
turn with the kept sequence), then the second turn again with the prompt cache off (a
full prefill of the same prompt). Time to first token is measured at the client, from
sending the request to the first streamed text. Prints a table, then one JSON line.
Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request

WORDS = ("stage ring token cache prompt layer expert router batch decode prefill host "
         "memory chunk sample model weight tensor stream client server queue reply turn "
         "question answer mountain river window garden winter summer orange purple").split()


def post(url: str, body: dict, timeout: float) -> tuple:
    """Stream a chat completion: (seconds to the first text, text, usage)."""
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                 data=json.dumps(dict(body, stream=True, stream_options={
                                     "include_usage": True})).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", []):
                piece = (c.get("delta") or {}).get("content")
                if piece is not None and "role" not in c["delta"]:
                    first = first or time.perf_counter() - t0
                    text.append(piece)
    return first or time.perf_counter() - t0, "".join(text), usage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="the served model's name (default: the first listed)")
    p.add_argument("--tokens", type=int, default=2000, help="first turn's prompt tokens")
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    url = args.url.rstrip("/")
    model = args.model
    if model is None:
        with urllib.request.urlopen(url + "/v1/models", timeout=args.timeout) as r:
            model = json.load(r)["data"][0]["id"]
    base = {"model": model, "temperature": 0}

    def message(n_words: int, seed: int) -> str:
        rng = random.Random(seed)
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    # Words per token of this tokenizer (a prompt that is never kept).
    _, _, u = post(url, dict(base, max_tokens=1, cache_prompt=False,
                             messages=[{"role": "user", "content": message(400, -1)}]),
                   args.timeout)
    n_words = max(1, round(400 * args.tokens / u["prompt_tokens"]))
    rows = []
    for i in range(args.conversations):
        first = [{"role": "user", "content": message(n_words, i)}]
        t1, reply, u1 = post(url, dict(base, max_tokens=args.reply_tokens, messages=first),
                             args.timeout)
        second = first + [{"role": "assistant", "content": reply},
                          {"role": "user", "content": "Thanks. Say that again, shorter."}]
        t2, _, u2 = post(url, dict(base, max_tokens=args.reply_tokens, messages=second),
                         args.timeout)
        t3, _, _ = post(url, dict(base, max_tokens=args.reply_tokens, messages=second,
                                  cache_prompt=False), args.timeout)
        rows.append({"first_prompt_tokens": u1["prompt_tokens"], "ttft_first_s": t1,
                     "second_prompt_tokens": u2["prompt_tokens"],
                     "cached_tokens": u2["prompt_tokens_details"]["cached_tokens"],
                     "ttft_second_s": t2, "ttft_second_no_reuse_s": t3})
        print(f"conversation {i}: first turn {u1['prompt_tokens']} tokens, ttft {t1:.3f} s; "
              f"second turn {u2['prompt_tokens']} tokens "
              f"({rows[-1]['cached_tokens']} reused), ttft {t2:.3f} s "
              f"(without reuse {t3:.3f} s); ratio {t2 / t1:.3f}", file=sys.stderr, flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out = {"conversations": rows, "median": med,
           "ratio_second_to_first": med["ttft_second_s"] / med["ttft_first_s"]}
    print(f"median ttft: first turn {med['ttft_first_s']:.3f} s, second turn "
          f"{med['ttft_second_s']:.3f} s (ratio {out['ratio_second_to_first']:.3f}); second "
          f"turn without reuse {med['ttft_second_no_reuse_s']:.3f} s", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

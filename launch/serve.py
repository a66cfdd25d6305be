#!/usr/bin/env python3
"""Serve a model split across the ranks of an mlx.launch job: an OpenAI-compatible API.

    mlx.launch --hostfile hostfiles/localhost-2.json launch/serve.py --model glm4_moe \
        --synthetic tiny --port 8000

Rank 0 listens (--host, --port) and runs the ring; the other ranks are stages and know
nothing of HTTP. Endpoints: POST /v1/chat/completions and /v1/completions (streamed as
server-sent events or not), GET /v1/models, GET /health (every rank's state).

The HTTP side is FastAPI on uvicorn, in a thread with its own event loop; the engine
(dist_runtime/serving.py) keeps rank 0's main thread, which owns mlx and the transport.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mlx.launch runs us as a file

from dist_runtime.devices import pin_gpu  # noqa: E402
from dist_runtime.lifecycle import Lifecycle, block_signals, env_rank  # noqa: E402

block_signals()  # before mlx starts its threads: see dist_runtime/lifecycle.py
pin_gpu()  # before mlx starts CUDA: one GPU per rank

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from dist_runtime.costs import text_config  # noqa: E402
from dist_runtime.errors import StartError, fail  # noqa: E402
from dist_runtime.job import start_job  # noqa: E402
from launch.api_requests import (ApiError, Settings, chat_prompt,  # noqa: E402
                                 completion_prompt, json_object)
from launch.options import (RankParser, add_model_args, check_at_least,  # noqa: E402
                            check_model_args)

DEFAULT_MAX_BATCH = 8  # sequences decoding at once (run.py's default is 1)
DEFAULT_MAX_QUEUE = 32  # requests waiting beyond those; more get 429
DEFAULT_MAX_TOKENS = 512  # a request that does not say how many tokens it wants
HEALTH_WAIT_S = 2.0  # /health waits this long for fresh numbers from the ring
POLL_S = 0.25  # a waiting request looks this often whether its client is still there


def parse_args(argv=None):
    """Command-line options: run.py's model options, and the server's."""
    p = RankParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.set_defaults(max_batch=DEFAULT_MAX_BATCH)
    p.add_argument("--host", default="127.0.0.1", help="address rank 0 listens on "
                   "(0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port rank 0 listens on (0: any free "
                   "port; the 'serving' line says which)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait beyond the --max-batch running ones; "
                   "beyond, 429")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="tokens generated for a request that gives no max_tokens")
    p.add_argument("--prompt-cache-tokens", type=int, default=None,
                   help="KV positions of finished sequences kept on every rank for prompt "
                   "reuse (default: 2 x --max-kv-tokens; 0: no reuse); the plan reserves "
                   "memory for them")
    args = p.parse_args(argv)
    check_model_args(p, args)
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in 0..65535, got {args.port}")
    check_at_least(p, args, ("max_queue", "prompt_cache_tokens"), 0)
    check_at_least(p, args, ("max_tokens",), 1)
    if args.prompt_cache_tokens is None:
        args.prompt_cache_tokens = 2 * args.max_kv_tokens
    args.no_chat_template = False  # the start checks tokenize a probe prompt through it
    return args


# -- the app ------------------------------------------------------------------------------

class Front:
    """The HTTP side: checks requests, hands tickets to the engine, streams the answers."""

    def __init__(self, engine, tok, model_name: str, limit: int, limit_why: str, vocab: int,
                 max_batch: int, max_queue: int, default_max_tokens: int):
        self.engine, self.tok, self.model_name = engine, tok, model_name
        self.limit, self.limit_why, self.vocab = limit, limit_why, vocab
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_active = max_batch + max_queue  # running and queued
        self.default_max_tokens = default_max_tokens
        self.active = 0  # requests admitted and not answered (the event loop's thread only)
        self.created = int(time.time())

    def app(self) -> FastAPI:
        app = FastAPI(title="mlx-pipeline", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_request, e: ApiError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(HTTPException)
        async def http_error(_request, e: HTTPException):
            return JSONResponse(ApiError(e.status_code, str(e.detail), code="not_found"
                                         if e.status_code == 404 else None).body(),
                                status_code=e.status_code)

        @app.exception_handler(Exception)
        async def internal(_request, e: Exception):
            return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                         type_="server_error").body(), status_code=500)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self.model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str):
            if name != self.model_name:
                raise ApiError(404, f"the model '{name}' does not exist: this server serves "
                               f"'{self.model_name}'", param="model", code="model_not_found")
            return self.model_card()

        @app.get("/health")
        async def health():
            if self.engine.lost is not None:  # no fresh numbers will come
                return JSONResponse(self.engine.health(), status_code=503)
            try:
                report = await asyncio.wait_for(
                    asyncio.wrap_future(self.engine.fresh_stats()), HEALTH_WAIT_S)
            except (asyncio.TimeoutError, Exception):
                report = self.engine.health()  # the engine is busy: the last numbers
            return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self.complete(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self.complete(request, chat=False)

        return app

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "mlx-pipeline"}

    async def complete(self, request, chat: bool):
        """One completion request, streamed or not."""
        from dist_runtime.serving import Ticket

        body = json_object(await request.body())
        s = Settings(body, self.model_name)
        prompt = chat_prompt(body, self.tok) if chat else \
            completion_prompt(body, self.tok, self.vocab)
        max_tokens = self.check_length(len(prompt), s.max_tokens,
                                       "messages" if chat else "prompt")
        if self.engine.lost is not None:
            raise ApiError(503, self.engine.lost["message"], type_="server_error",
                           code="rank_lost")
        if self.active >= self.max_active:
            raise ApiError(429, f"the server is busy: {self.max_batch} requests running and "
                           f"{self.max_queue} waiting, the most it queues (--max-batch, "
                           f"--max-queue); retry later", type_="rate_limit_error",
                           code="queue_full")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        t = Ticket(prompt, max_tokens, s.params,
                   emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                   stops=s.stops, eos_ids=frozenset() if s.ignore_eos else
                   frozenset(self.tok.eos_ids), cache_prompt=s.cache_prompt)
        self.active += 1
        handed_off = False
        try:
            self.engine.submit(t)
            first = await self.next_event(t, events, request)
            if first is None:
                return JSONResponse({}, status_code=499)  # the client is gone
            if first[0] == "error":
                raise ApiError(first[1], first[2], type_="server_error" if first[1] >= 500
                               else "invalid_request_error",
                               code="rank_lost" if first[1] == 503 else None)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            if s.stream:
                handed_off = True
                return TicketStream(self.stream(t, events, first, rid, chat, s),
                                    on_close=lambda: self.done(t),
                                    media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})
            return await self.whole(t, events, request, first, rid, chat)
        finally:
            if not handed_off:
                self.done(t)

    def check_length(self, n: int, asked, param: str) -> int:
        """max_tokens for a prompt of n tokens, or 400 when it does not fit."""
        if n >= self.limit:
            raise ApiError(400, f"the prompt is {n} tokens but this server's context is "
                           f"{self.limit} positions ({self.limit_why}), and generation needs "
                           f"at least one more; shorten the prompt by at least "
                           f"{n - self.limit + 1} tokens", param=param,
                           code="context_length_exceeded")
        if asked is None:
            return min(self.default_max_tokens, self.limit - n)
        if n + asked > self.limit:
            raise ApiError(400, f"the prompt is {n} tokens and max_tokens asks for {asked} "
                           f"more, but this server's context is {self.limit} positions "
                           f"({self.limit_why}); ask for at most {self.limit - n}",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    def done(self, t):
        """The request's answer is over (sent, failed, or its client left); once."""
        if t.answered:
            return
        t.answered = True
        self.active -= 1
        if not t.closed:
            self.engine.cancel(t)
        t.delivered.set()

    async def next_event(self, t, events: asyncio.Queue, request):
        """The ticket's next event; None when the client went away first (looked at every
        POLL_S, however fast the events come)."""
        while True:
            if time.monotonic() >= t.next_check:
                t.next_check = time.monotonic() + POLL_S
                if await request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if self.engine.lost is not None and events.empty() and not t.closed:
                    return ("error", 503, self.engine.lost["message"])

    async def whole(self, t, events, request, ev, rid: str, chat: bool):
        """A non-streamed answer: wait for the whole text."""
        text = []
        while ev[0] == "text":
            text.append(ev[1])
            ev = await self.next_event(t, events, request)
            if ev is None:
                return JSONResponse({}, status_code=499)
        if ev[0] == "error":
            raise ApiError(ev[1], ev[2], type_="server_error", code="rank_lost"
                           if ev[1] == 503 else None)
        info = ev[1]
        choice = {"index": 0, "finish_reason": info["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice],
                "usage": info["usage"]}

    async def stream(self, t, events, ev, rid: str, chat: bool, s: Settings):
        """A streamed answer: server-sent events, one chunk per piece of text."""
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, finish=None, role=False, usage=None, choices=True) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": self.model_name}
            if choices:
                c = {"index": 0, "finish_reason": finish, "logprobs": None}
                if chat:
                    c["delta"] = ({"role": "assistant", "content": ""} if role else
                                  {"content": text} if text is not None else {})
                else:
                    c["text"] = text or ""
                body["choices"] = [c]
            else:
                body["choices"] = []
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(role=True)
            while True:
                if ev[0] == "text":
                    yield chunk(ev[1])
                elif ev[0] == "done":
                    yield chunk(finish=ev[1]["finish_reason"])
                    if s.include_usage:
                        yield chunk(usage=ev[1]["usage"], choices=False)
                    yield "data: [DONE]\n\n"
                    return
                else:
                    err = ApiError(ev[1], ev[2], type_="server_error",
                                   code="rank_lost" if ev[1] == 503 else None)
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                ev = await events.get()
        finally:
            self.done(t)  # also when the client went away: its sequence is cancelled


class TicketStream(StreamingResponse):
    """A streamed answer that calls `on_close` however it ends, even when the client left
    before its first byte (then the body's generator never starts, nor its `finally`)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def listen(host: str, port: int) -> socket.socket:
    """Rank 0's listening socket, bound before the job starts (a taken port fails fast)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise StartError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another "
                         f"--port (0: any free one) or --host")
    return sock


def start_http(app, sock: socket.socket, me: str):
    """uvicorn in a thread of its own (its own event loop); returns the server."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="http")
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise StartError(f"{me}: the HTTP server did not start (see uvicorn's message "
                             f"above)")
        time.sleep(0.02)
    return server


def serve(args, life, job, sock):
    """Rank 0: the engine on this thread, the HTTP front in another."""
    from dist_runtime.coordinator import Coordinator
    from dist_runtime.prompt_cache import PromptCache
    from dist_runtime.serving import Engine

    tok = job.opened.tokenizer
    cache = None
    if args.prompt_cache_tokens:
        cache = PromptCache(args.prompt_cache_tokens, job.stage.model.reuse_floor)
    coord = Coordinator(job.stage, job.transport, args.prefill_chunk, args.max_batch,
                        args.micro_batches, prompt_cache=cache)
    keepalive = min(5.0, args.timeout / 4)
    engine = Engine(coord, tok, [i.name for i in job.infos],
                    [[r.start, r.stop] for r in job.plan.ranges], keepalive, life, job.faults)
    life.on_stop = engine.on_exit
    ctx = job.opened.facts.context
    limit = min(ctx, args.max_kv_tokens) if ctx else args.max_kv_tokens
    why = ("the model's context, max_position_embeddings" if ctx and ctx <= args.max_kv_tokens
           else f"--max-kv-tokens {args.max_kv_tokens}")
    vocab = text_config(job.config)["vocab_size"]
    name = args.served_model_name or args.model
    front = Front(engine, tok, name, limit, why, vocab, args.max_batch, args.max_queue, args.max_tokens)
    start_http(front.app(), sock, life.me)
    host, port = sock.getsockname()[:2]
    print(f"[{life.me}] serving {name} at http://{host}:{port}/v1 (OpenAI API; GET /health); "
          f"{args.max_batch} requests at once, {args.max_queue} more queued; prompt cache "
          f"{args.prompt_cache_tokens} positions", file=sys.stderr, flush=True)
    engine.run()


def main(argv=None) -> int:
    """Entry point on every rank; exits as run.py's ranks do (see its main)."""
    life = Lifecycle()
    args = parse_args(argv)
    job = None
    try:
        sock = listen(args.host, args.port) if env_rank() in (None, 0) else None
        # The plan reserves KV room for the running sequences and the prompt cache.
        job = start_job(args, life, argv, prompt="Hello",
                        kept_kv_tokens=args.prompt_cache_tokens)
        if job.rank != 0:
            return job.serve_as_stage(life)
        life.set("serving")
        serve(args, life, job, sock)
    except Exception as e:  # noqa: BLE001  (one error line, the others told, then exit)
        fail(e, life, job.faults if job is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

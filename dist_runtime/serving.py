"""The serving engine: rank 0's main thread runs the coordinator's loop for a server.

The engine owns mlx and the transport, so it runs on the main thread; the HTTP front
(launch/serve.py) runs in another thread and talks to it only through `Ticket`s: a
ticket goes into the engine's inbox (a thread-safe queue) and the engine hands each
ticket's events back through the ticket's `emit` (the HTTP side passes them to its
event loop). Between two actions of the ring the engine takes what arrived: new
sequences join the running micro-batches at their next step, cancelled ones leave.

Text is made here, next to the tokens: each ticket detokenizes as its tokens come, and
a stop string ends its sequence at once. Events: ("text", piece), then ("done", info)
or ("error", status, message).

While idle, the engine waits on its inbox, and every `keepalive_s` sends a stats message
round the ring: the stages wait for messages with a deadline (--timeout), and the round
trip also refreshes every rank's numbers for /health. A lost rank (PeerLost) ends every
open ticket with an error naming it; /health and new requests say so (503) for
LOST_GRACE_S, then the error goes up and the process exits non-zero.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

from dist_runtime.coordinator import Coordinator, GenerationResult, Request
from dist_runtime.faults import PeerLost
from dist_runtime.sampling import Sampler, SamplingParams
from dist_runtime.tokenizer import StreamingDetokenizer

IDLE_POLL_S = 0.05  # s to wait for work when the ring has nothing to do but is not idle
FRESH_S = 0.2  # s within which /health takes the last stats instead of a new round trip
LOST_GRACE_S = 2.0  # s the server keeps answering 503 (naming the lost rank) before exiting
EXIT_NOTICE_S = 1.0  # s at most an exiting server waits for the clients to get their error
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's


class StopText:
    """Text as it may be shown: stop strings cut it (the stop string is not shown), and
    while it ends in what may be the start of one, that end is held back. Only the text
    not shown yet is kept: a stop string that ends in a new piece starts at most `hold`
    characters before it, so the text already shown is never searched again."""

    def __init__(self, stops: list):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""  # text not shown yet
        self.stopped = False

    def add(self, piece: str) -> str:
        """Take a piece; returns the text that may be shown now."""
        if self.stopped:
            return ""
        self.pending += piece
        if self.stops:
            cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.stopped = True
                self.pending = self.pending[:cut]
                return self._release(cut)
        return self._release(len(self.pending) - self.hold)

    def finish(self, piece: str = "") -> str:
        """The last piece; returns the rest."""
        out = self.add(piece)
        return out + self._release(len(self.pending))

    def _release(self, upto: int) -> str:
        if upto <= 0:
            return ""
        out, self.pending = self.pending[:upto], self.pending[upto:]
        return out


@dataclass
class Ticket:
    """One request, as the HTTP side hands it to the engine."""

    prompt: list  # token ids
    max_tokens: int
    params: SamplingParams
    emit: Callable[[tuple], None]  # thread-safe: ("text", s) / ("done", info) / ("error", ...)
    stops: list = field(default_factory=list)
    eos_ids: frozenset = frozenset()
    cache_prompt: bool = True
    seq: int = 0  # set by the engine
    cancelled: bool = False
    closed: bool = False  # its last event went out
    delivered: threading.Event = field(default_factory=threading.Event)  # HTTP side: sent
    next_check: float = 0.0  # HTTP side: when to look again whether the client is there
    answered: bool = False  # HTTP side: its answer is over
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, event: tuple):
        """Emit an event; after the last (done, error), nothing more."""
        with self._lock:
            if self.closed:
                return
            if event[0] in ("done", "error"):
                self.closed = True
        try:
            self.emit(event)
        except RuntimeError:  # the HTTP side's loop is gone (shutting down)
            self.delivered.set()


class Engine:
    """The coordinator's loop for a server, fed by tickets."""

    def __init__(self, coord: Coordinator, tokenizer, names: list, layers: list,
                 keepalive_s: float = 5.0, life=None, faults=None, log=None):
        self.coord = coord
        self.tok = tokenizer
        self.names = names  # 'rank r (host)' per rank
        self.layers = layers  # [start, end) per rank
        self.keepalive_s = keepalive_s
        self.life, self.faults = life, faults
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.inbox: queue.Queue = queue.Queue()
        self._open: dict = {}  # id -> Ticket without its last event (any thread, locked)
        self._open_lock = threading.Lock()
        self.lost: Optional[dict] = None  # {"rank": r or None, "message": ...} once failed
        self.lost_at: Optional[float] = None  # when the loop failed
        n = len(names)
        self.stats = {"time": None, "rows": [[0.0] * 5 for _ in range(n)], "peak": [0.0] * n}
        self.requests = {"done": 0, "cancelled": 0, "failed": 0}
        self.running = self.waiting = 0

    # -- the HTTP side's calls (any thread) -------------------------------------------------

    def submit(self, t: Ticket):
        """Queue a ticket; its events come through its emit."""
        if self.lost is not None:
            t.send(("error", 503, self.lost["message"]))
            return
        with self._open_lock:
            self._open[id(t)] = t
        self.inbox.put(("submit", t))

    def cancel(self, t: Ticket):
        """The client went away: end its sequence and free its caches everywhere."""
        t.cancelled = True
        self.inbox.put(("cancel", t))

    def fresh_stats(self) -> Future:
        """A future of the health snapshot after a stats round trip through the ring."""
        f: Future = Future()
        self.inbox.put(("stats", f))
        return f

    def health(self) -> dict:
        """What /health reports: every rank's state, the queue, batching, prompt reuse."""
        now = time.monotonic()
        rows, peaks = self.stats["rows"], self.stats["peak"]
        ranks = []
        for r, name in enumerate(self.names):
            state = "ok"
            if self.lost is not None:
                state = "lost" if self.lost.get("rank") == r else "stopping"
            row = rows[r]
            ranks.append({
                "rank": r, "name": name, "layers": self.layers[r], "state": state,
                "memory_gb": round(row[4], 4), "peak_memory_gb": round(peaks[r], 4),
                "live_sequences": int(row[2]), "kept_sequences": int(row[3]),
                "last_heard_s": 0.0 if r == 0 else round(now - self.coord.heard, 3),
            })
        pc = self.coord.prompt_cache
        c = self.coord.counts
        out = {
            "status": "ok" if self.lost is None else "lost",
            "ranks": ranks,
            "stats_age_s": None if self.stats["time"] is None
            else round(now - self.stats["time"], 3),
            "requests": dict(self.requests, running=self.running, waiting=self.waiting),
            "batching": {"decode_steps": c["steps"], "max_rows_in_a_step": c["max_rows"],
                         "mean_rows_per_step": round(c["rows"] / c["steps"], 3)
                         if c["steps"] else 0.0,
                         "max_sequences_decoding": c["max_decoding"]},
            "prompt_cache": None if pc is None else {  # read, not iterated: another thread
                "kept_sequences": len(pc.entries), "positions": pc.positions,
                "capacity": pc.capacity, "hits": pc.hits, "reused_tokens": pc.reused},
        }
        if self.lost is not None:
            out["error"] = self.lost["message"]
            out["lost_rank"] = self.lost.get("rank")
        return out

    # -- the main thread ----------------------------------------------------------------------

    def run(self):
        """Serve until an error (raised after the clients were told)."""
        try:
            self._stats()
            while True:
                self._take(self.keepalive_s if self.coord.idle() else 0.0)
                worked = self.coord.step()
                self._retire()
                if not worked:
                    self._take(self.keepalive_s if self.coord.idle() else IDLE_POLL_S)
        except BaseException as e:
            self._failed(e)
            raise

    def _take(self, wait: float):
        """Handle what the HTTP side sent, waiting up to `wait` s for the first command;
        a wait that reaches keepalive_s since the ring was last heard from sends stats
        round it (the stages' waits have deadlines)."""
        while True:
            try:
                if wait > 0:
                    due = self.coord.heard + self.keepalive_s - time.monotonic()
                    cmd = self.inbox.get(timeout=max(0.0, min(wait, due)))
                else:
                    cmd = self.inbox.get_nowait()
            except queue.Empty:
                if wait > 0 and time.monotonic() >= self.coord.heard + self.keepalive_s:
                    self._stats()
                return
            self._handle(cmd)
            wait = 0.0  # something to do: take the rest without waiting

    def _handle(self, cmd: tuple):
        kind, arg = cmd
        if kind == "submit":
            self._start(arg)
        elif kind == "cancel":
            self.coord.cancel(arg.seq)  # a sequence that ended, or never began: nothing
        elif kind == "stats":
            if self.stats["time"] is None or time.monotonic() - self.stats["time"] > FRESH_S:
                self._stats()  # requests that waited together share one round trip
            arg.set_result(self.health())

    def _start(self, t: Ticket):
        """A ticket becomes a sequence."""
        if t.cancelled:
            self._close(t)
            return
        try:
            sampler = Sampler(t.params, t.prompt)
        except ValueError as e:
            t.send(("error", 400, str(e)))
            self._close(t)
            return
        detok = StreamingDetokenizer(self.tok)
        text = StopText(t.stops)

        def on_token(token: int) -> bool:
            piece = text.add(detok.add(token))
            if piece:
                t.send(("text", piece))
            return text.stopped or t.cancelled

        def on_done(res: GenerationResult):
            self._finish(t, res, text, detok)

        res = self.coord.submit(Request(t.prompt, t.max_tokens, sampler, t.eos_ids, on_token,
                                        on_done, t.cache_prompt))
        t.seq = res.seq

    def _finish(self, t: Ticket, res: GenerationResult, text: StopText, detok):
        """A sequence finished: its last text, the usage, the reason."""
        if t.cancelled or res.finish_reason == "cancelled":
            self.requests["cancelled"] += 1
            self.log(f"[{self.names[0]}] request {res.seq} cancelled after "
                     f"{len(res.tokens)} tokens: its client went away")
            self._close(t)
            return
        rest = text.finish(detok.finish()) if not text.stopped else ""
        if rest:
            t.send(("text", rest))
        reason = "stop" if text.stopped else FINISH.get(res.finish_reason, "stop")
        usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.tokens),
                 "total_tokens": res.prompt_tokens + len(res.tokens),
                 "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}
        t.send(("done", {"finish_reason": reason, "usage": usage}))
        self.requests["done"] += 1
        self.log(f"[{self.names[0]}] request {res.seq}: {res.prompt_tokens} prompt tokens "
                 f"({res.cached_tokens} reused), {len(res.tokens)} generated, {reason}; "
                 f"ttft {res.ttft_s:.3f} s, {res.decode_tps:.1f} tok/s; decoded with up to "
                 f"{res.batched_with} other sequences in a step")
        self._close(t)

    def _retire(self):
        self.coord.retire()
        seqs = self.coord.schedule.seqs.values()
        self.running = sum(1 for s in seqs if s.began and not s.finished)
        self.waiting = sum(1 for s in seqs if not s.began and not s.finished)

    def _stats(self):
        """A stats round trip: every rank's numbers (and proof that each is alive)."""
        rows = self.coord.collect_stats()
        self.stats["rows"] = rows
        self.stats["peak"] = [max(p, row[1]) for p, row in zip(self.stats["peak"], rows)]
        self.stats["time"] = time.monotonic()

    def _close(self, t: Ticket):
        with self._open_lock:
            self._open.pop(id(t), None)

    # -- failures ---------------------------------------------------------------------------

    def _failed(self, e: BaseException):
        """The loop ended with `e`: tell every client, keep saying so for a while."""
        blame = getattr(e, "blame", None)
        if isinstance(e, PeerLost):
            message = str(e)
        elif isinstance(e, (KeyboardInterrupt, SystemExit)):
            message = "the server is stopping"
        else:
            message = f"the server failed: {type(e).__name__}: {e}"
        self.lost = {"rank": blame.rank if blame is not None else None, "message": message}
        self.lost_at = time.monotonic()
        self._tell_all(message)
        if isinstance(e, Exception):
            self.log(f"[{self.names[0]}] serving stopped: {message}; answering 503 for "
                     f"{LOST_GRACE_S:g} s, then exiting")
            time.sleep(LOST_GRACE_S)

    def _tell_all(self, message: str):
        """End every open ticket with a 503 error carrying `message`."""
        with self._open_lock:
            open_tickets = list(self._open.values())
        for t in open_tickets:
            t.send(("error", 503, message))
            self.requests["failed"] += 1
        end = time.monotonic() + EXIT_NOTICE_S
        for t in open_tickets:
            t.delivered.wait(max(0.0, end - time.monotonic()))
        with self._open_lock:
            for t in open_tickets:
                self._open.pop(id(t), None)

    def on_exit(self, reason: str):
        """Lifecycle's on_stop: the process is about to exit (a signal, a lost rank seen by
        the watchdog, an error): tell the clients why first (bounded). After a lost rank,
        /health keeps saying so for LOST_GRACE_S whoever ends the process (mlx.launch
        sends SIGTERM as soon as a rank dies)."""
        if self.lost_at is not None:
            time.sleep(max(0.0, self.lost_at + LOST_GRACE_S - time.monotonic()))
        if self.lost is None:
            f = self.faults
            blame = f.blame if f is not None else None
            if blame is not None:
                message = f.describe(blame)
            else:
                message = f"the server is stopping ({reason})"
            self.lost = {"rank": blame.rank if blame is not None else None,
                         "message": message}
        self._tell_all(self.lost["message"])

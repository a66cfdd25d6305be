"""Messages between neighbouring ranks: a fixed-size int32 header, then the payload.

The header says what follows (op, sequence id, batch, length, cache offset, flags,
dtype, width), so a receiver always knows the payload's shape before it posts the
receive. Shapes and dtype are agreed once (width and dtype of the hidden state) and
checked on every message: a mismatch is an error naming both ranks, never a hang or a
silently misread buffer.

Every blocking wait goes through `Watchdog`, since mx.distributed has no timeouts. The
deadline is `first_timeout` until the first prompt has gone round the ring (first
kernel compile, a long first prefill), then `timeout`.

When a rank is lost, every other rank must learn which one. The ranks only talk in a
ring, so the news travels with the data, as an OP_ABORT message naming the lost rank
(header: offset = that rank, flags = why, batch = who noticed, length = seconds
waited, seq = signal number):
- a broken socket is certain: the neighbour that sees it names the rank, sends ABORT
  downstream and exits; every rank passes the ABORT on and exits naming the same rank;
- silence is not: when rank k has waited `timeout` for rank k-1, it only suspects k-1.
  If a rank upstream stopped instead, k-1 is waiting too. So k sends its suspicion
  downstream and listens `CONFIRM_S` more: anything that arrives from k-1 proves k-1
  alive, and an ABORT from it names the rank it knows better. The rank right after the
  stopped one hears nothing and keeps its suspicion, which is the truth; it reaches
  every other rank as the last ABORT they receive (each rank passes messages on in
  order, after at most its own earlier guess), so every rank ends up naming it.
ABORTs are sent from a helper thread on a stream of their own, with a bounded wait, so
a rank that is already failing never blocks on a neighbour that is gone.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

HEADER_LEN = 8
OP_FORWARD, OP_RELEASE, OP_STOP, OP_ABORT, OP_STATS = 1, 2, 3, 4, 5
STATS_FIELDS = 3  # per rank in an OP_STATS payload: busy seconds, peak memory GB, live caches
FLAG_RETURN = 1  # the last stage sends the last position's hidden state back to rank 0
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
EXIT_PEER_LOST = 3  # exit code of a rank that gave up waiting for another

# Why an ABORT names a rank (its header's flags).
LOST, TIMEOUT, SEND_TIMEOUT, FAILED, STOPPED = 1, 2, 3, 4, 5
FIRST_TIMEOUT = 1800.0  # s: default deadline until the first prompt has gone round the ring
CONFIRM_S = 2.0  # s a rank that suspects a silent neighbour listens for better news
NOTIFY_S = 1.0  # s at most spent sending an ABORT on the way out
LISTEN_S = 0.5  # s a rank whose next rank vanished listens upstream for the reason
TICK_S = 0.25  # the watchdog wakes this often, to notice when the process was suspended
SUSPEND_GAP_S = 1.5  # a tick this late means the process did not run (SIGSTOP, host sleep)


class TransportError(RuntimeError):
    """A message that does not match what the ranks agreed."""


class PeerLost(RuntimeError):
    """Another rank died, stopped answering, failed or was stopped: `blame` says which."""

    def __init__(self, message: str, blame: Optional["Blame"] = None):
        super().__init__(message)
        self.blame = blame


@dataclass
class Header:
    """What a message carries; `length` positions of `batch` sequences at cache `offset`."""

    op: int
    seq: int = 0
    batch: int = 0
    length: int = 0
    offset: int = 0
    flags: int = 0
    dtype: int = 0
    width: int = 0

    def array(self) -> mx.array:
        """As the int32 [HEADER_LEN] array that travels."""
        return mx.array([self.op, self.seq, self.batch, self.length, self.offset, self.flags,
                         self.dtype, self.width], mx.int32)

    @classmethod
    def parse(cls, a) -> "Header":
        """From a received int32 array."""
        return cls(*[int(v) for v in a.tolist()])


@dataclass(frozen=True)
class Blame:
    """Which rank ended the job and why, as ABORT messages carry it."""

    rank: int
    reason: int  # LOST, TIMEOUT, SEND_TIMEOUT, FAILED or STOPPED
    reporter: int  # the rank that noticed
    seconds: int = 0  # TIMEOUT / SEND_TIMEOUT: how long the reporter waited
    sig: int = 0  # STOPPED: the signal

    @property
    def certain(self) -> bool:
        """False for a suspicion from silence, which a rank upstream may correct."""
        return self.reason not in (TIMEOUT, SEND_TIMEOUT)

    def header(self) -> Header:
        """The ABORT message that carries it."""
        return Header(OP_ABORT, seq=self.sig, batch=self.reporter, length=self.seconds,
                      offset=self.rank, flags=self.reason)

    @classmethod
    def from_header(cls, h: Header) -> "Blame":
        """From a received ABORT header."""
        return cls(h.offset, h.flags, h.batch, h.length, h.seq)

    def describe(self, names: list, me: int) -> str:
        """One sentence for rank `me`'s error line; `names[r]` is 'rank r (host)'."""
        who = names[self.rank] if 0 <= self.rank < len(names) else f"rank {self.rank}"
        by = names[self.reporter] if 0 <= self.reporter < len(names) else f"rank {self.reporter}"
        if self.reason == LOST:
            if self.reporter == me:
                return (f"lost the connection to {who}: its process died or its host became "
                        f"unreachable")
            return (f"{who} was lost: its process died or its host became unreachable "
                    f"(noticed by {by})")
        if self.reason in (TIMEOUT, SEND_TIMEOUT):
            what = ("no message from it" if self.reason == TIMEOUT
                    else "it took no data from")
            whom = "" if self.reason == TIMEOUT else f" {by}"
            seen = "" if self.reporter == me else f" (noticed by {by})"
            if self.reason == SEND_TIMEOUT and self.reporter == me:
                whom = " this rank"
            return (f"{who} stopped answering: {what}{whom} for {self.seconds} s{seen}; it "
                    f"hangs, is stopped, or its host is unreachable (deadline: --timeout)")
        if self.reason == FAILED:
            return f"{who} failed (its error is above); stopping too"
        if self.reason == STOPPED:
            import signal

            try:
                name = signal.Signals(self.sig).name
            except ValueError:
                name = f"signal {self.sig}"
            return f"{who} was stopped by {name}; stopping too"
        return f"{who} ended the job (reason {self.reason})"


class Watchdog:
    """A deadline on blocking waits; on expiry, runs the wait's action (default: exit).

    The default action prints the wait's description and exits with EXIT_PEER_LOST; an
    owner may pass `on_expire(what)` instead, and each `arm` may give its own action.
    Actions run on the watchdog's thread, outside its lock, and may arm it again.

    It ticks every TICK_S; a tick much later than that means this process was not
    running (stopped with SIGSTOP, a debugger, a host that slept): `suspended_for()` says
    so, and a deadline passed during a suspension is this rank's fault, not its peer's.
    """

    def __init__(self, describe_self: str, on_expire: Optional[Callable[[str], None]] = None):
        self.me = describe_self
        self.on_expire = on_expire
        self._deadline: Optional[float] = None
        self._what = ""
        self._action: Optional[Callable[[str], None]] = None
        self._cond = threading.Condition()
        self._suspended = (0.0, 0.0)  # (when it ended, how long) of the last suspension
        threading.Thread(target=self._run, daemon=True, name="watchdog").start()

    def suspended_for(self, within: float) -> float:
        """Seconds this process was suspended, if that ended in the last `within` s, else 0."""
        ended, length = self._suspended
        return length if ended and time.monotonic() - ended < within else 0.0

    def arm(self, seconds: float, what: str, action: Optional[Callable[[str], None]] = None):
        """Start a deadline `seconds` from now for the wait described by `what`."""
        with self._cond:
            self._deadline, self._what = time.monotonic() + seconds, what
            self._action = action
            # No notify: the thread looks every TICK_S anyway, and waking it for each of
            # the many waits of a decode step costs a context switch each.

    def disarm(self):
        """The wait finished in time."""
        with self._cond:
            self._deadline = None
            self._action = None  # it may hold the transport: let it go (see Transport)

    def _run(self):
        last = time.monotonic()
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if now - last > SUSPEND_GAP_S:
                        self._suspended = (now, now - last)
                    last = now
                    if self._deadline is not None and self._deadline <= now:
                        break
                    left = TICK_S if self._deadline is None else self._deadline - now
                    self._cond.wait(min(left, TICK_S))
                what, action = self._what, self._action or self.on_expire
                self._deadline = self._action = None
            if action is not None:
                action(what)
                action = None
            else:
                print(f"[{self.me}] error: {what}; giving up and exiting",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_PEER_LOST)


class Transport:
    """Header + payload messages over an mx.distributed group, with deadlines."""

    def __init__(self, group, width: int, dtype, names: list, timeout: float, lifecycle=None,
                 first_timeout: Optional[float] = FIRST_TIMEOUT, confirm_s: float = CONFIRM_S):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.width, self.dtype = width, dtype
        self.names = names  # "rank r (host)" for messages
        self.timeout = timeout
        self.first_timeout = max(first_timeout or timeout, timeout)
        self.confirm_s = confirm_s
        self.warm = False  # the first prompt has gone round: `timeout` from now on
        self.next = (self.rank + 1) % self.size
        self.watchdog = Watchdog(names[self.rank])
        self.lifecycle = lifecycle
        self.blame: Optional[Blame] = None  # set once this rank knows the job is ending
        self._lock = threading.Lock()
        self._wait_no = 0  # numbers the waits, so a late deadline finds its wait gone
        self._waiting = 0  # number of the wait in progress, 0 for none
        self._sent: set = set()  # blames already passed downstream
        # Held for a whole message (header + payload): an ABORT sent from another thread
        # must never land between a header and its payload.
        self._send_lock = threading.RLock()
        if lifecycle is not None:  # a weak reference: see Lifecycle.transport
            lifecycle.transport = self

    # -- deadlines ------------------------------------------------------------------------

    def deadline(self, timeout: Optional[float] = None) -> float:
        """Seconds the next wait may take: `timeout` if given, else by warm-up state."""
        return timeout or (self.timeout if self.warm else self.first_timeout)

    def _wait(self, arr: mx.array, what: str, timeout: Optional[float] = None, peer: int = 0,
              receiving: bool = True):
        t = self.deadline(timeout)
        if self.lifecycle is not None:
            before = self.lifecycle.doing
            self.lifecycle.set(f"{before}, waiting on {self.names[peer]}")
        with self._lock:
            self._wait_no += 1
            wait_no = self._waiting = self._wait_no
        expired = self._recv_expired if receiving else self._send_expired
        self.watchdog.arm(t, what, lambda _what: expired(wait_no, peer, t))
        try:
            mx.eval(arr)
        except RuntimeError as e:  # the backend's socket to that rank broke
            self.watchdog.disarm()
            raise self._lost(peer, e) from e
        finally:
            self.watchdog.disarm()
            with self._lock:
                self._waiting = 0
            if self.lifecycle is not None:
                self.lifecycle.set(before)
        if self.blame is not None and not receiving:
            raise PeerLost(self.describe(), self.blame)

    def _recv_expired(self, wait_no: int, src: int, t: float):
        """Watchdog thread: rank `src` has been silent for `t` s. Suspect it, tell the
        next rank, and listen CONFIRM_S more for an ABORT that names the real culprit."""
        if self._suspended():
            self.finalize()  # the silence was ours: accuse no one
        with self._lock:
            if self._waiting != wait_no:
                return  # the message arrived just now
            if self.blame is None:
                self.blame = Blame(src, TIMEOUT, self.rank, round(t))
        self.notify(self.blame)
        self.watchdog.arm(self.confirm_s, "", lambda _what: self.finalize())

    def _send_expired(self, wait_no: int, dst: int, t: float):
        """Watchdog thread: rank `dst` has taken no data for `t` s."""
        with self._lock:
            if self._waiting != wait_no:
                return
            if self.blame is None:
                self.blame = Blame(dst, SEND_TIMEOUT, self.rank, round(t))
        self.finalize()

    def _lost(self, peer: int, err: Exception) -> PeerLost:
        """The socket to `peer` broke: name it (unless a better blame is known), tell the
        next rank, and return the error to raise.

        When the next rank went away, the reason may be on its way round the ring (it
        was stopped by a signal, or failed, and said so before exiting): listen to the
        previous rank for LISTEN_S and take a certain ABORT from it over our guess."""
        with self._lock:
            if self.blame is None or not self.blame.certain:
                self.blame = Blame(peer, LOST, self.rank)
        prev = (self.rank - 1) % self.size
        if peer == self.next and prev != peer and self.blame.reason == LOST:
            h = mx.distributed.recv((HEADER_LEN,), mx.int32, prev, group=self.group)
            self.watchdog.arm(LISTEN_S, "", lambda _what: self.finalize())
            try:
                mx.eval(h)
                news = Header.parse(h)
                if news.op == OP_ABORT and Blame.from_header(news).certain:
                    with self._lock:
                        self.blame = Blame.from_header(news)
            except RuntimeError:
                pass
            finally:
                self.watchdog.disarm()
        self.notify(self.blame)
        return PeerLost(self.describe(), self.blame)

    # -- ending the job -------------------------------------------------------------------

    def describe(self, blame: Optional[Blame] = None) -> str:
        """The error line for the current (or given) blame."""
        gap = self._suspended()
        if gap:
            return (f"this rank was suspended for {gap:.0f} s (SIGSTOP, a debugger, or its host "
                    f"slept), longer than the other ranks wait for it (--timeout "
                    f"{self.timeout:g} s); they have given up on it")
        return (blame or self.blame).describe(self.names, self.rank)

    def notify(self, blame: Blame):
        """Send ABORT(blame) to the next rank once, waiting at most NOTIFY_S.

        Runs the send on a thread and stream of its own: the main thread may be blocked
        in a receive, and the next rank may be gone.
        """
        if self.size < 2 or self.next == blame.rank:
            return
        with self._lock:
            if blame in self._sent:
                return
            self._sent.add(blame)
        if not self._send_lock.acquire(timeout=NOTIFY_S):
            return  # the main thread is stuck sending to that rank: it cannot hear us anyway

        def send():
            try:
                stream = mx.new_stream(mx.cpu)
                mx.eval(mx.distributed.send(blame.header().array(), self.next,
                                            group=self.group, stream=stream))
            except Exception:
                pass  # the next rank is gone too: it will be reported by its own neighbours

        try:
            t = threading.Thread(target=send, daemon=True, name="abort")
            t.start()
            t.join(NOTIFY_S)
        finally:
            self._send_lock.release()

    def notify_failure(self, err: Exception):
        """This rank is exiting with `err`: pass the news downstream (bounded)."""
        if self.size < 2:
            return
        blame = getattr(err, "blame", None)
        if blame is None:
            with self._lock:
                self.blame = blame = self.blame or Blame(self.rank, FAILED, self.rank)
        self.notify(blame)

    def _suspended(self) -> float:
        """Seconds this process was recently suspended (its own deadlines then mean little)."""
        return self.watchdog.suspended_for(self.timeout + self.confirm_s + 10)

    def finalize(self):
        """Watchdog thread: report the current blame and exit (the main thread is stuck)."""
        message = self.describe()
        if self.lifecycle is not None:
            self.lifecycle.exit_with_error(message, EXIT_PEER_LOST)
        print(f"[{self.names[self.rank]}] error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def _on_abort(self, header: Header, src: int):
        """An ABORT arrived from `src`, which is therefore alive: adopt its blame, pass it
        on, and for a suspicion keep listening for corrections. Raises PeerLost."""
        blame = Blame.from_header(header)
        while True:
            with self._lock:
                self.blame = blame
            self.notify(blame)
            if blame.certain:
                break
            h = mx.distributed.recv((HEADER_LEN,), mx.int32, src, group=self.group)
            with self._lock:
                self._wait_no += 1
                self._waiting = self._wait_no
            self.watchdog.arm(self.confirm_s, "", lambda _what: self.finalize())
            try:
                mx.eval(h)
            except RuntimeError:
                break  # src exited after its last word
            finally:
                self.watchdog.disarm()
                with self._lock:
                    self._waiting = 0
            nxt = Header.parse(h)
            if nxt.op != OP_ABORT:
                break
            blame = Blame.from_header(nxt)
        raise PeerLost(self.describe(), self.blame)

    # -- messages -------------------------------------------------------------------------

    def send(self, dst: int, header: Header, payload: Optional[mx.array] = None,
             timeout: Optional[float] = None):
        """Send the header, then the payload [batch, length, width] if the op has one."""
        if payload is not None and header.op == OP_FORWARD:
            header.dtype = DTYPES.index(payload.dtype)
            header.width = payload.shape[-1]
            header.batch, header.length = payload.shape[0], payload.shape[1]
        t = self.deadline(timeout)
        what = f"sending to {self.names[dst]} took over {t:.0f} s"
        with self._send_lock:
            self._wait(mx.distributed.send(header.array(), dst, group=self.group), what, t,
                       peer=dst, receiving=False)
            if payload is not None:
                self._wait(mx.distributed.send(payload, dst, group=self.group), what, t,
                           peer=dst, receiving=False)
        if header.op == OP_FORWARD and header.flags & FLAG_RETURN and self.rank != 0:
            self.warm = True  # this stage has passed on the end of the first prompt

    def recv(self, src: int, timeout: Optional[float] = None):
        """(header, payload or None) from rank src; an ABORT raises PeerLost."""
        t = self.deadline(timeout)
        what = f"no message from {self.names[src]} for {t:.0f} s (it died or hangs)"
        h = mx.distributed.recv((HEADER_LEN,), mx.int32, src, group=self.group)
        self._wait(h, what, t, peer=src)
        header = Header.parse(h)
        if header.op == OP_ABORT:
            self._on_abort(header, src)
        if self.blame is not None:  # our deadline passed before this arrived
            raise PeerLost(self.describe(), self.blame)
        if header.op == OP_STATS:
            stats = mx.distributed.recv((self.size, STATS_FIELDS), mx.float32, src,
                                        group=self.group)
            self._wait(stats, what, t, peer=src)
            return header, stats
        if header.op != OP_FORWARD:
            return header, None
        if header.width != self.width or DTYPES[header.dtype] != self.dtype:
            raise TransportError(
                f"{self.names[src]} sent hidden states of width {header.width}, "
                f"dtype {DTYPES[header.dtype]}; {self.names[self.rank]} expects width "
                f"{self.width}, dtype {self.dtype}: the ranks loaded different models")
        payload = mx.distributed.recv((header.batch, header.length, self.width), self.dtype,
                                      src, group=self.group)
        self._wait(payload, what, t, peer=src)
        if self.rank == 0:
            self.warm = True  # the first result is back: the ring is compiled and loaded
        return header, payload

"""Liveness: every rank watches every other rank, apart from its work, over a side channel.

The ring only tells a rank about its two neighbours, and only when it waits on them: a
rank that died two hops away, or one stopped (SIGSTOP, a sleeping host) while the others
load for ten minutes, is invisible to it. So each pair of ranks also holds one small TCP
connection of its own (rank i connects to every rank j > i), and on it:

- a heartbeat line every BEAT_S, sent by a thread of its own: a rank that computes,
  loads or waits still beats; a stopped or frozen process, or an unreachable host, does
  not. `timeout` s without a beat names the rank (SILENT).
- a rank that dies closes its connections at once (the kernel does it, even for kill -9),
  so every rank sees it die (LOST), however far away in the ring.
- a rank's last word before it exits: `done` when the job ended normally, or the Blame it
  exits with (its own failure, a signal, or the rank it lost), so every rank names the
  same rank even when the ring is broken between them.

What to do about it is the owner's (dist_runtime/job.py): `on_verdict(blame)` is called
once, from this module's thread, when this rank should stop; `word(peer)` and `culprit()`
answer the main thread's and the signal thread's questions.

Addresses: once the ring has connected, each rank listens on its ring port's number
again (mlx's ring closes its listener then; `--liveness-port P` picks P + rank instead),
on 127.0.0.1 for a local ring or, for a ring across hosts, on every interface; the
addresses travel in the job's first exchange, the ring's IP first, then the host's other
IPv4 addresses (in a Thunderbolt ring a rank reaches only its neighbours' ring IPs, and
the others over the LAN). A peer that cannot be reached is left unwatched, with a
warning: the deadlines of dist_runtime/faults.py still cover it.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import sys
import threading
import time
from typing import Callable, Optional

from dist_runtime.faults import (CUT_OFF, LOST, SILENT, Blame, explained_by_suspension,
                                  recent_gap, suspended_message)
from dist_runtime.hostfiles import ring_address_list

BEAT_S = 0.5  # s between heartbeats
TICK_S = 0.25  # the thread looks at its sockets and clocks this often
CONNECT_S = 10.0  # s to set the channel up before a peer is left unwatched
TRY_S = 2.0  # s per connection attempt to one address
WORD_GRACE_S = 1.0  # s a peer's last word waits for this rank's own report of the same
GONE_GRACE_S = 0.3  # s a death waits for the ring's STOP that may explain it (a normal end)
SUSPEND_GAP_S = 1.5  # a tick this late: this process did not run (SIGSTOP, host sleep)
MAX_IPS = 8
# A rank that hears from none of two or more peers (none for ALL_QUIET_S when one goes
# past the deadline) is more likely cut off itself than watching them all fail at once:
# it holds its verdict CUT_OFF_GRACE_S longer, so that the others, who still hear each
# other, name it first, then says it lost them all (CUT_OFF), not that one of them died.
ALL_QUIET_S = 3 * BEAT_S
CUT_OFF_GRACE_S = 3.0

# Peer states.
CONNECTING, UP, DONE, LEFT, GONE, SILENT_STATE, UNWATCHED = (
    "connecting", "up", "done", "left", "gone", "silent", "unwatched")


def ring_address(rank: int) -> tuple:
    """(IP, port) of this rank's first address in the ring backend's list (MLX_HOSTFILE),
    or (None, 0)."""
    nodes = ring_address_list()
    if not nodes:
        return None, 0
    try:
        ip, _, port = nodes[rank][0].rpartition(":")
        ipaddress.ip_address(ip)
        return ip, int(port)
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        return None, 0


def host_ips() -> list:
    """This host's IPv4 addresses other than loopback."""
    try:
        import psutil

        out = []
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET and not a.address.startswith("127."):
                    out.append(a.address)
        return out
    except Exception:  # noqa: BLE001  (a host we cannot list still has its ring IP)
        return []


class Peer:
    """What this rank knows about one other rank."""

    def __init__(self, rank: int, ips: list, port: int):
        self.rank, self.ips, self.port = rank, ips, port
        self.sock: Optional[socket.socket] = None
        self.buf = b""
        self.state = CONNECTING
        self.last = 0.0  # monotonic time of the last line from it
        self.word: Optional[Blame] = None  # its last word, if it said why it exits
        self.word_at = 0.0
        self.gone_at = 0.0  # when its connection ended without a word


class Liveness:
    """This rank's side of the channel (see the module docstring)."""

    def __init__(self, rank: int, size: int, timeout: float, port: int = 0, watchdog=None):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.watchdog = watchdog  # its suspension record counts too
        self.names = [f"rank {r}" for r in range(size)]
        self.token = ""
        self.on_verdict: Optional[Callable[[Blame], None]] = None
        ip, ring_port = ring_address(rank)
        local = ip is None or ipaddress.ip_address(ip).is_loopback
        bind = "127.0.0.1" if local else "0.0.0.0"
        self.ips = ["127.0.0.1"] if local else \
            list(dict.fromkeys([ip, *host_ips()]))[:MAX_IPS]
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The ring's own port number, free again once the ring has connected: a job
        # takes no port beyond its ring's (an ephemeral port could be another job's ring
        # port, which would then connect here); --liveness-port pins another.
        self.server.bind((bind, port + rank if port else ring_port))
        self.server.listen(max(size, 4))
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.peers: dict = {}
        self._pending: dict = {}  # accepted sockets that have not said hello -> bytes so far
        self._lock = threading.Condition()
        self._send_lock = threading.Lock()
        self.ending = False  # the job ends normally: ranks leaving is no news
        self.closed = False
        self.verdict: Optional[Blame] = None  # the first certain cause found
        self._acted = False
        self._suspended = (0.0, 0.0)  # (when it ended, how long) of the last gap
        self._started = 0.0

    # -- setting up ---------------------------------------------------------------------

    def address(self) -> dict:
        """What the other ranks need to reach this one (travels in the first exchange)."""
        return {"ips": self.ips, "port": self.port}

    def start(self, addresses: list, names: list, token: str,
              on_verdict: Callable[[Blame], None]):
        """Connect to every other rank (`addresses[r]` from `address()`) and start
        watching; `on_verdict(blame)` is called once when this rank should stop."""
        self.names, self.token, self.on_verdict = names, token, on_verdict
        self._started = time.monotonic()
        for r, a in enumerate(addresses):
            if r != self.rank and a:
                self.peers[r] = Peer(r, list(a.get("ips", [])), int(a.get("port", 0)))
        for r in self.peers:
            if r > self.rank:
                threading.Thread(target=self._connect, args=(self.peers[r],), daemon=True,
                                 name=f"liveness-connect-{r}").start()
        threading.Thread(target=self._run, daemon=True, name="liveness").start()

    def _hello(self) -> bytes:
        return f"hello {self.rank} {self.token}\n".encode()

    def _connect(self, peer: Peer):
        """Reach `peer` at one of its addresses and say hello; the loop reads its answer."""
        end = time.monotonic() + CONNECT_S
        errors = []
        while time.monotonic() < end and not self.closed:
            for ip in peer.ips:
                try:
                    s = socket.create_connection((ip, peer.port), timeout=TRY_S)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.sendall(self._hello())
                    s.setblocking(False)
                    with self._lock:
                        peer.sock, peer.last = s, time.monotonic()  # its hello is due
                    return
                except OSError as e:
                    errors.append(f"{ip}:{peer.port}: {e.strerror or e}")
            time.sleep(0.5)
        self._unwatched(peer, f"cannot connect to it ({'; '.join(errors[-len(peer.ips):])})")

    def _unwatched(self, peer: Peer, why: str):
        with self._lock:
            if peer.state != CONNECTING or self.closed or self.ending:
                return
            peer.state = UNWATCHED
        print(f"[{self.names[self.rank]}] warning: no liveness channel to "
              f"{self.names[peer.rank]}: {why}; a firewall may block TCP between the hosts "
              f"(README, Troubleshooting: Deadlines). If it stops answering, it is named "
              f"only after the deadlines (--timeout, --first-timeout, --load-timeout)",
              file=sys.stderr, flush=True)

    # -- the thread -----------------------------------------------------------------------

    def _run(self):
        last_tick = last_beat = time.monotonic()
        while not self.closed:
            with self._lock:
                socks = [p.sock for p in self.peers.values()
                         if p.sock is not None and p.state in (UP, CONNECTING)]
                socks += list(self._pending)
            try:
                readable, _, _ = select.select([self.server, *socks], [], [], TICK_S)
            except (OSError, ValueError):
                readable = []  # a socket closed under us: look again
            now = time.monotonic()
            gap = now - last_tick > SUSPEND_GAP_S  # this process (or thread) did not run
            if gap:
                self._suspended = (now, now - last_tick)
            last_tick = now
            for s in readable:
                if s is self.server:
                    self._accept()
                else:
                    self._read(s, now)
            if gap:
                # The others' silence during our own gap says nothing (their beats queued
                # meanwhile have just been read): their clocks start again now.
                with self._lock:
                    for p in self.peers.values():
                        p.last = max(p.last, now)
            if now - last_beat >= BEAT_S:
                last_beat = now
                self._send_all(b"b\n")
            self._check(now)

    def _accept(self):
        try:
            s, _ = self.server.accept()
        except OSError:
            return
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        with self._lock:
            self._pending[s] = b""

    def _read(self, s, now: float):
        with self._lock:
            peer = next((p for p in self.peers.values() if p.sock is s), None)
        try:
            data = s.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._closed(s, peer)
            return
        if peer is None:  # an accepted connection: its first line must be its hello
            with self._lock:
                buf = self._pending.get(s, b"") + data
                if b"\n" not in buf:
                    self._pending[s] = buf[-4096:]
                    return
            line, _, data = buf.partition(b"\n")
            peer = self._greet(s, line.decode(errors="replace").split(), now)
            if peer is None:
                return
        peer.buf += data
        peer.last = now
        while b"\n" in peer.buf:
            line, _, peer.buf = peer.buf.partition(b"\n")
            self._line(peer, line.decode(errors="replace").split(), now)

    def _greet(self, s, words: list, now: float) -> Optional[Peer]:
        """An accepted connection's hello: bind it to its rank and answer, or drop it."""
        with self._lock:
            self._pending.pop(s, None)
            ok = len(words) == 3 and words[0] == "hello" and words[1].isdigit() \
                and words[2] == self.token
            peer = self.peers.get(int(words[1])) if ok else None
            if peer is None or peer.sock is not None or peer.rank > self.rank:
                peer = None  # not of this job, or a duplicate
            else:
                peer.sock, peer.last = s, now
                if peer.state == CONNECTING:
                    peer.state = UP
        if peer is None:
            s.close()
            return None
        self._send(peer, self._hello())  # so it knows this rank lives
        return peer

    def _line(self, peer: Peer, words: list, now: float):
        if not words:
            return
        with self._lock:
            if words[0] == "hello" and peer.state == CONNECTING:
                peer.state = UP  # the rank we connected to answered
            elif words[0] == "done":
                peer.state = DONE
                self.ending = True  # a rank ends only after the coordinator said stop
            elif words[0] == "bye" and len(words) == 6:
                try:
                    peer.word = Blame(*[int(w) for w in words[1:]])
                except ValueError:
                    return
                peer.word_at = now
            self._lock.notify_all()

    def _closed(self, s, peer: Optional[Peer]):
        """EOF or an error on a socket: the peer's process is gone (its word, if any, came
        first: TCP keeps order)."""
        with self._lock:
            self._pending.pop(s, None)
            try:
                s.close()
            except OSError:
                pass
            if peer is not None:
                peer.sock = None
                if peer.state in (UP, CONNECTING):
                    peer.state = LEFT if peer.word is not None else GONE
                    peer.gone_at = time.monotonic()
            self._lock.notify_all()

    def _check(self, now: float):
        """Decide whether this rank should stop, and act once."""
        act, unwatched = None, []
        with self._lock:
            if self.ending or self._acted or self.closed:
                return
            for p in self.peers.values():
                if p.state == GONE and self.verdict is None and now - p.gone_at >= GONE_GRACE_S:
                    self.verdict = Blame(p.rank, LOST, self.rank)  # it died without a word
                if p.state == CONNECTING and p.sock is None and now - self._started > CONNECT_S \
                        and p.rank < self.rank:
                    unwatched.append(p)  # it never connected: a firewall, or it hangs
                elif p.state in (UP, CONNECTING) and p.sock is not None \
                        and now - p.last > self.timeout and self.verdict is None:
                    quiet = self._all_quiet(now)
                    if quiet is None:
                        p.state = SILENT_STATE
                        self.verdict = Blame(p.rank, SILENT, self.rank, round(now - p.last))
                    elif quiet > self.timeout + CUT_OFF_GRACE_S:
                        self.verdict = Blame(self.rank, CUT_OFF, self.rank, round(quiet))
            if self.verdict is not None:
                act = self.verdict
            else:
                ready = [p for p in self.peers.values()
                         if p.word is not None and now - p.word_at >= WORD_GRACE_S]
                if ready:
                    act = min(ready, key=lambda p: p.word_at).word
            self._acted = act is not None
        for p in unwatched:
            self._unwatched(p, f"it did not connect within {CONNECT_S:.0f} s")
        if act is not None and self.on_verdict is not None:
            self.on_verdict(act)

    def _all_quiet(self, now: float) -> Optional[float]:
        """Seconds since the last heartbeat from any peer when two or more are watched and
        none has beaten for ALL_QUIET_S (this rank, not they, is likely cut off); else
        None. Called under the lock."""
        watched = [p for p in self.peers.values()
                   if p.state in (UP, CONNECTING) and p.sock is not None]
        if len(watched) < 2:
            return None
        quiet = now - max(p.last for p in watched)
        return quiet if quiet > ALL_QUIET_S else None

    # -- questions from the other threads -------------------------------------------------

    def word(self, peer: int, wait: float) -> Optional[Blame]:
        """The reason `peer` gave when it exited, waiting up to `wait` s for its connection
        to end (None: it died without a word, or is not watched)."""
        p = self.peers.get(peer)
        if p is None:
            return None
        end = time.monotonic() + wait
        with self._lock:
            while p.word is None and p.state in (UP, CONNECTING) and not self.closed:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            return p.word

    def culprit(self, wait: float = 0.0) -> Optional[Blame]:
        """The rank that ended the job as far as this rank knows (a death, a silence, or
        another rank's last word), waiting up to `wait` s for news."""
        end = time.monotonic() + wait
        with self._lock:
            while True:
                if self.verdict is not None:
                    return self.verdict
                words = [p for p in self.peers.values() if p.word is not None]
                if words:  # why the others exit: the cause, where a death is its effect
                    return min(words, key=lambda p: p.word_at).word
                gone = [p for p in self.peers.values() if p.state == GONE]
                if gone and not self.ending:
                    return Blame(min(gone, key=lambda p: p.gone_at).rank, LOST, self.rank)
                left = end - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self._lock.wait(min(left, TICK_S))

    def suspended_for(self, within: float) -> float:
        """Seconds this process was suspended, if that ended in the last `within` s."""
        ended, length = self._suspended
        own = length if ended and time.monotonic() - ended < within else 0.0
        other = self.watchdog.suspended_for(within) if self.watchdog is not None else 0.0
        return max(own, other)

    def describe(self, blame: Blame) -> str:
        """The error line for `blame`, or this rank's own suspension if that explains it."""
        gap = recent_gap(lambda: self.suspended_for(self.timeout * 4 + 10), blame, self.rank)
        if gap and explained_by_suspension(blame, self.rank, gap, self.timeout):
            return suspended_message(gap)
        return blame.describe(self.names, self.rank)

    # -- last words -----------------------------------------------------------------------

    def _send(self, peer: Peer, data: bytes):
        s = peer.sock
        if s is None:
            return
        with self._send_lock:
            try:
                s.send(data)
            except (BlockingIOError, InterruptedError):
                pass  # its buffer is full: it has not read for a long time
            except OSError:
                pass  # read side sees the close

    def _send_all(self, data: bytes, states=(UP,)):
        with self._lock:
            peers = [p for p in self.peers.values() if p.sock is not None and p.state in states]
        for p in peers:
            self._send(p, data)

    def expect_end(self):
        """The job is ending normally (the coordinator sends STOP): ranks may leave."""
        with self._lock:
            self.ending = True

    def bye(self, blame: Blame):
        """Tell every rank why this one exits (before os._exit). Unread bytes are read
        first: a socket closed with unread bytes resets the connection, and the reset can
        destroy the word before the peer reads it."""
        self.ending = True
        with self._lock:
            socks = [p.sock for p in self.peers.values() if p.sock is not None]
        for sock in socks:
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # nothing more to read (or gone)
        # A silent rank gets the word too: if it was only stopped, it reads it when it
        # runs again, and says that the others gave up on it.
        self._send_all(f"bye {blame.rank} {blame.reason} {blame.reporter} {blame.seconds} "
                       f"{blame.sig}\n".encode(), states=(UP, SILENT_STATE))
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_WR)  # the word, then end of stream
            except OSError:
                pass

    def finish(self):
        """The job ended normally on this rank: say so and stop watching. The sockets are
        only half-closed: closing one with unread beats in it would reset the connection,
        and the reset could overtake the `done` on its way."""
        self.ending = True
        self._send_all(b"done\n")
        with self._lock:
            self.closed = True
            self._lock.notify_all()
            socks = [p.sock for p in self.peers.values() if p.sock is not None]
        for s in socks:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        with self._lock:
            self.closed = True
            self._lock.notify_all()
            socks = [p.sock for p in self.peers.values() if p.sock is not None]
            for p in self.peers.values():
                p.sock = None
        for s in [*socks, *self._pending, self.server]:
            try:
                s.close()
            except OSError:
                pass

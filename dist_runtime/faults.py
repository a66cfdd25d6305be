"""Lost ranks: deadlines on every wait, and a protocol by which every rank names the same
rank when the job ends because one died, hung, failed or was stopped.

mx.distributed has no timeouts, so every blocking wait goes through a `Watchdog`. The
deadline is `first_timeout` until the first prompt has gone round the ring (first
kernel compile, a long first prefill), then `timeout`.

When a rank is lost, every other rank must learn which one. The ranks only talk in a
ring, so the news travels with the data, as an ABORT message carrying a `Blame` (who,
why, who noticed). `Faults` decides what to blame and when; the transport only frames
the messages (dist_runtime/transport.py gives it `Link`'s two operations):
- a broken socket is certain: the neighbour that sees it names the rank, sends ABORT
  downstream and exits; every rank passes the ABORT on and exits naming the same rank;
- silence is not: when rank k has waited `timeout` for rank k-1, it only suspects k-1.
  If a rank upstream stopped instead, k-1 is waiting too. So k sends its suspicion
  downstream and listens `CONFIRM_S` more: anything that arrives from k-1 proves k-1
  alive, and an ABORT from it names the rank it knows better. The rank right after the
  stopped one hears nothing and keeps its suspicion, which is the truth; it reaches
  every other rank as the last ABORT they receive (each rank passes messages on in
  order, after at most its own earlier guess), so every rank ends up naming it.
ABORTs are sent from a helper thread with a bounded wait, so a rank that is already
failing never blocks on a neighbour that is gone.

The ring alone cannot tell rank 0 that the last rank died while rank 1 was still
sending (rank 1's ABORT goes to the dead rank), and sees a stopped rank only when some
wait on it runs out. So every rank also watches every other one over a side channel
(dist_runtime/liveness.py): heartbeats, deaths, and each rank's last word. When a
neighbour's socket breaks, `_lost` first asks that channel what the neighbour said before
it went: a rank that exits because of another one names that one.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import astuple, dataclass
from typing import Callable, Optional, Protocol

import mlx.core as mx

EXIT_PEER_LOST = 3  # exit code of a rank that gave up waiting for another

# Why a Blame names a rank. SILENT: no heartbeat on the side channel (dist_runtime/liveness.py);
# ORPHANED: the rank stopped because its launcher is gone (dist_runtime/lifecycle.py);
# CUT_OFF: the rank heard from no other rank at once: its own network is the likely cause.
LOST, TIMEOUT, SEND_TIMEOUT, FAILED, STOPPED, SILENT, ORPHANED, CUT_OFF = 1, 2, 3, 4, 5, 6, 7, 8
CONFIRM_S = 2.0  # s a rank that suspects a silent neighbour listens for better news
NOTIFY_S = 1.0  # s at most spent sending an ABORT on the way out
LISTEN_S = 0.5  # s a rank whose next rank vanished listens upstream for the reason
TICK_S = 0.25  # the watchdog wakes this often, to notice when the process was suspended
SUSPEND_GAP_S = 1.5  # a tick this late means the process did not run (SIGSTOP, host sleep)
SETTLE_S = 0.5  # s a rank the others blame waits for its ticking threads to see its own gap


class PeerLost(RuntimeError):
    """Another rank died, stopped answering, failed or was stopped: `blame` says which."""

    def __init__(self, message: str, blame: Optional["Blame"] = None):
        super().__init__(message)
        self.blame = blame


@dataclass(frozen=True)
class Blame:
    """Which rank ended the job and why: the payload of an ABORT message."""

    rank: int
    reason: int  # LOST, TIMEOUT, SEND_TIMEOUT, FAILED or STOPPED
    reporter: int  # the rank that noticed
    seconds: int = 0  # TIMEOUT / SEND_TIMEOUT / SILENT / CUT_OFF: how long it waited
    sig: int = 0  # STOPPED: the signal

    FIELDS = 5  # int32 values on the wire

    @property
    def certain(self) -> bool:
        """False for a suspicion from silence, which a rank upstream may correct."""
        return self.reason not in (TIMEOUT, SEND_TIMEOUT)

    def array(self) -> mx.array:
        """As the int32 [FIELDS] payload that travels."""
        return mx.array(astuple(self), mx.int32)

    @classmethod
    def parse(cls, a) -> "Blame":
        """From a received int32 payload."""
        return cls(*[int(v) for v in a.tolist()])

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
        if self.reason == SILENT:
            seen = "" if self.reporter == me else f" (noticed by {by})"
            return (f"{who} stopped answering: no heartbeat from it for {self.seconds} s{seen}; "
                    f"it is stopped (SIGSTOP, Ctrl-Z, a debugger), hangs, or its host sleeps or "
                    f"is unreachable (deadline: --heartbeat-timeout)")
        if self.reason == CUT_OFF:
            who = "this rank" if self.rank == me else who
            return (f"{who} lost every other rank at once (no heartbeat from any for "
                    f"{self.seconds} s): its host's network or its link to the ring is likely "
                    f"down (deadline: --heartbeat-timeout)")
        if self.reason == ORPHANED:
            return (f"{who} stopped because its launcher is gone (mlx.launch or launch/start.py "
                    f"was killed, or its terminal or ssh connection closed); stopping too")
        if self.reason == FAILED:
            return f"{who} failed (its error is above); stopping too"
        if self.reason == STOPPED:
            try:
                name = signal.Signals(self.sig).name
            except ValueError:
                name = f"signal {self.sig}"
            return f"{who} was stopped by {name}; stopping too"
        return f"{who} ended the job (reason {self.reason})"


def suspended_message(gap: float) -> str:
    """What a rank says when it finds that it was itself suspended for `gap` s."""
    return (f"this rank was suspended for {gap:.0f} s (SIGSTOP, a debugger, or its host "
            f"slept), longer than the other ranks wait for it; they have given up on it")


def explained_by_suspension(blame: Optional[Blame], me: int, gap: float = 0.0,
                            patience: float = float("inf")) -> bool:
    """Whether a suspension of this rank for `gap` s explains `blame`: one that names
    this rank, a deadline of its own that ran out (or none yet), or a rank gone while
    this one was away longer than the others wait (`patience`): they gave up on it."""
    return blame is None or blame.rank == me or blame.reason in (TIMEOUT, SEND_TIMEOUT) \
        or (blame.reason == LOST and gap >= patience)


def recent_gap(suspended: Callable[[], float], blame: Optional[Blame], me: int) -> float:
    """`suspended()`, waiting up to SETTLE_S when `blame` names this rank: just resumed,
    the thread that asks may run before the ticking threads have recorded the gap."""
    gap = suspended()
    if gap or not (blame is None or blame.rank == me):
        return gap
    end = time.monotonic() + SETTLE_S
    while not gap and time.monotonic() < end:
        time.sleep(0.05)
        gap = suspended()
    return gap


class Watchdog:
    """A deadline on blocking waits; on expiry, runs the wait's action.

    Each `arm` may give its own action; otherwise `on_expire(what)` runs (the owner's
    exit with an error). Actions run on the watchdog's thread, outside its lock, and may
    arm it again. One per rank: the start checks, the load and the ring share it.

    It ticks every TICK_S; a tick much later than that means this process was not
    running (stopped with SIGSTOP, a debugger, a host that slept): `suspended_for()` says
    so, and a deadline passed during a suspension is this rank's fault, not its peer's.
    """

    def __init__(self, on_expire: Callable[[str], None]):
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

    def forget_suspension(self):
        """Drop the record of a past gap: a long start (a load holding the CPU) says
        nothing about the ring that starts now."""
        self._suspended = (0.0, 0.0)

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
            self._action = None  # it may hold the transport: let it go

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
            action(what)  # may take a while (a bounded ABORT send): not a suspension
            action = None
            last = time.monotonic()


class Link(Protocol):
    """What `Faults` needs from the transport: the two ABORT operations on the wire."""

    def send_abort(self, blame: Blame, within: float) -> None:
        """Send ABORT(blame) to the next rank, giving up after `within` s."""

    def recv_abort(self, src: int) -> Optional[Blame]:
        """Receive one message from `src` (blocking): its Blame if it is an ABORT, else None.
        Raises RuntimeError when the socket breaks."""


class Faults:
    """This rank's side of the blame protocol: deadlines on waits, suspicion, ABORTs.

    `life` (dist_runtime/lifecycle.py) is the rank's one way out (`exit_with_error`) and
    says what the rank is doing (`doing`, `set`) for the stop message.
    """

    def __init__(self, rank: int, size: int, names: list, watchdog: Watchdog, life,
                 timeout: float, confirm_s: float = CONFIRM_S):
        self.rank, self.size, self.names = rank, size, names
        self.next = (rank + 1) % size
        self.watchdog = watchdog
        watchdog.forget_suspension()
        self.life = life
        self.timeout = timeout
        self.confirm_s = confirm_s
        self.link: Optional[Link] = None  # set by the Transport that owns this
        self.liveness = None  # dist_runtime.liveness.Liveness: what the other ranks said
        self.blame: Optional[Blame] = None  # set once this rank knows the job is ending
        self._lock = threading.Lock()
        self._wait_no = 0  # numbers the waits, so a late deadline finds its wait gone
        self._waiting = 0  # number of the wait in progress, 0 for none
        self._sent: set = set()  # blames already passed downstream

    # -- waits ----------------------------------------------------------------------------

    def wait(self, arr, what: str, seconds: float, peer: int, receiving: bool,
             arrival: Optional[Callable[[float], object]] = None):
        """Evaluate `arr` (a send or receive with `peer`, or a list of them) within
        `seconds`, or blame. arrival(seconds), if given, sleeps until the peer's bytes
        are there, inside the same deadline (dist_runtime/arrival.py says why).

        A send that finished after this rank learnt the job is ending raises PeerLost; a
        receive leaves that to the caller (`check`), which may have received the ABORT."""
        before = self.life.doing
        self.life.set(f"{before}, waiting on {self.names[peer]}")
        with self._lock:
            self._wait_no += 1
            wait_no = self._waiting = self._wait_no
        expired = self._recv_expired if receiving else self._send_expired
        self.watchdog.arm(seconds, what, lambda _what: expired(wait_no, peer, seconds))
        try:
            if arrival is not None:
                arrival(seconds)
            mx.eval(arr)
        except RuntimeError as e:  # the backend's socket to that rank broke
            self.watchdog.disarm()
            raise self._lost(peer) from e
        finally:
            self.watchdog.disarm()
            with self._lock:
                self._waiting = 0
            self.life.set(before)
        if not receiving:
            self.check()

    def expect_end(self):
        """The coordinator's STOP is on its way round: ranks that leave now end normally."""
        if self.liveness is not None:
            self.liveness.expect_end()

    def check(self):
        """Raise PeerLost if this rank already knows the job is ending (a deadline passed)."""
        if self.blame is not None:
            raise PeerLost(self.describe(), self.blame)

    def _recv_expired(self, wait_no: int, src: int, t: float):
        """Watchdog thread: rank `src` has been silent for `t` s. Suspect it, tell the
        next rank, and listen confirm_s more for an ABORT that names the real culprit."""
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

    def _lost(self, peer: int) -> PeerLost:
        """The socket to `peer` broke: name it (unless a better blame is known), tell the
        next rank, and return the error to raise.

        When the next rank went away, the reason may be on its way round the ring (it
        was stopped by a signal, or failed, and said so before exiting): listen to the
        previous rank for LISTEN_S and take a certain ABORT from it over our guess."""
        word = self.liveness.word(peer, LISTEN_S) if self.liveness is not None else None
        with self._lock:
            if self.blame is None or not self.blame.certain:
                # Its last word names the rank it exited for (itself when it failed or
                # was stopped); without one, it died.
                self.blame = word if word is not None else Blame(peer, LOST, self.rank)
        prev = (self.rank - 1) % self.size
        if peer == self.next and prev != peer and self.blame.reason == LOST:
            news = self._listen(prev, LISTEN_S)
            if news is not None and news.certain:
                with self._lock:
                    self.blame = news
        self.notify(self.blame)
        return PeerLost(self.describe(), self.blame)

    def _listen(self, src: int, seconds: float) -> Optional[Blame]:
        """The Blame of the next message from `src` if it is an ABORT arriving within
        `seconds` (then this rank exits, see finalize), else None."""
        with self._lock:
            self._wait_no += 1
            self._waiting = self._wait_no
        self.watchdog.arm(seconds, "", lambda _what: self.finalize())
        try:
            return self.link.recv_abort(src)
        except RuntimeError:
            return None  # src exited after its last word
        finally:
            self.watchdog.disarm()
            with self._lock:
                self._waiting = 0

    def on_abort(self, blame: Blame, src: int):
        """An ABORT arrived from `src`, which is therefore alive: adopt its blame, pass it
        on, and for a suspicion keep listening for corrections. Raises PeerLost."""
        while True:
            with self._lock:
                self.blame = blame
            self.notify(blame)
            if blame.certain:
                break
            news = self._listen(src, self.confirm_s)
            if news is None:
                break
            blame = news
        raise PeerLost(self.describe(), self.blame)

    # -- ending the job -------------------------------------------------------------------

    def describe(self, blame: Optional[Blame] = None) -> str:
        """The error line for the current (or given) blame; this rank's own suspension
        when that explains it (its deadline ran out, or the others blame it), never for
        another rank's death."""
        blame = blame or self.blame
        gap = recent_gap(self._suspended, blame, self.rank)
        patience = min(self.timeout, self.liveness.timeout if self.liveness else self.timeout)
        if gap and explained_by_suspension(blame, self.rank, gap, patience):
            return suspended_message(gap)
        return blame.describe(self.names, self.rank)

    def notify(self, blame: Blame):
        """Send ABORT(blame) to the next rank once, waiting at most NOTIFY_S."""
        if self.size < 2 or self.next == blame.rank or self.link is None:
            return
        with self._lock:
            if blame in self._sent:
                return
            self._sent.add(blame)
        self.link.send_abort(blame, NOTIFY_S)

    def notify_failure(self, err: Exception):
        """This rank is exiting with `err`: pass the news downstream (bounded)."""
        if self.size < 2:
            return
        blame = getattr(err, "blame", None)
        if blame is None:
            with self._lock:
                self.blame = blame = self.blame or Blame(self.rank, FAILED, self.rank)
        self.notify(blame)

    def notify_stopped(self, sig: int):
        """This rank was stopped by signal `sig`: tell the next rank (bounded)."""
        self.notify(Blame(self.rank, STOPPED, self.rank, sig=sig))

    def _suspended(self) -> float:
        """Seconds this process was recently suspended (its own deadlines then mean little)."""
        within = self.timeout + self.confirm_s + 10
        gap = self.watchdog.suspended_for(within)
        if self.liveness is not None:
            gap = max(gap, self.liveness.suspended_for(within))
        return gap

    def finalize(self):
        """Watchdog thread: report the current blame and exit (the main thread is stuck)."""
        self.life.exit_with_error(self.describe(), EXIT_PEER_LOST, word=self.blame)

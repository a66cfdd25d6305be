"""Signals, stop requests and exits: every rank says why it stopped, names itself or the
rank at fault, and exits non-zero.

mlx.launch stops every other rank with SIGTERM as soon as one exits non-zero, and exits 0
itself. So each rank handles SIGINT, SIGTERM and SIGHUP on a thread of its own
(`sigwait`, with the signals blocked everywhere else): the message gets out even while
the main thread sits in a blocking receive, where a Python signal handler would never
run. The coordinator also prints what it had generated (and writes it to --json-out).

A rank stops for one of three reasons:
- a signal sent to it. A SIGTERM usually means another rank failed first (mlx.launch's
  reaction), so the rank waits up to TERM_GRACE_S for the news (the ring's ABORT, or the
  liveness channel of dist_runtime/liveness.py) and names that rank; failing that, it
  reports the signal. SIGINT on the coordinator (Ctrl-C) stops it at once.
- a stop relayed by the launcher: launch/start.py writes `mlx-pipeline: stop SIGINT`
  (or SIGTERM) to mlx.launch's stdin, which mlx.launch copies to every rank's stdin, on
  every host. The rank stops at once, as if it had been sent that signal itself.
- its launcher is gone (killed, or its terminal or ssh connection closed): its stdin
  (a pipe from mlx.launch, or a pty over ssh) reaches end of file, its parent process
  changes, or SIGHUP arrives. Nothing would read the rank's output any more, so it stops
  rather than run on for hours holding its memory.
A rank stopped by any of these tells the next rank (an ABORT naming itself), so the rest
of the ring stops even without mlx.launch. A stop that reaches every rank (from the
launcher, or its loss) stops the coordinator at once, and the other ranks wait up to
TERM_GRACE_S for its news, so that the coordinator reports the stop itself (its summary's
finish_reason says why) rather than another rank's.

Every exit for an error goes through `exit_with_error`: one error line per rank, the
others told (the ring's ABORT, the liveness channel's last word), the coordinator's text
so far, then `os._exit` (no waiting on threads stuck in a receive).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import weakref
from typing import Callable, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_SIGNAL_BASE = 128  # shell convention: killed by signal N exits 128 + N
TERM_GRACE_S = 1.0  # s a rank given SIGTERM waits to learn which rank failed first
CONTROL = "mlx-pipeline:"  # launch/start.py writes "mlx-pipeline: stop SIGINT" to every stdin
WATCH_S = 0.5  # s between looks at the parent process
SIGNAL, LAUNCHER, ORPHAN = "signal", "launcher", "orphan"  # why `stop` was called


def block_signals():
    """Block SIGINT/SIGTERM/SIGHUP in this thread and every thread started after it.

    Call before importing mlx: its import starts worker threads, and a thread that does
    not block the signals would take them (SIGTERM's default then kills the process
    with no word said).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def env_rank() -> Optional[int]:
    """This process's rank as the launcher set it (before mx.distributed.init), or None."""
    for var in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def under_ring_launcher() -> bool:
    """Whether mlx.launch started this rank for the ring backend: then stdin is its pipe
    (or an ssh pty) that stays open as long as the launcher lives."""
    if os.environ.get("MLX_RANK") is None or os.environ.get("MLX_HOSTFILE") is None:
        return False
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or os.isatty(0)


class Lifecycle:
    """What this rank is doing now, and what to do when told to stop."""

    def __init__(self, watch_launcher: Optional[bool] = None):
        rank = env_rank()
        self.rank: Optional[int] = rank
        self.me = f"rank {'?' if rank is None else rank} ({socket.gethostname()})"
        self.doing = "starting"
        # Coordinator: print what was generated; called with the finish reason.
        self.on_stop: Optional[Callable[[str], None]] = None
        # Run last before an exit for an error, e.g. give back the wired limit (metal.py).
        self.cleanups: list = []
        self._faults = None  # weakref to the Faults: who failed, how to tell others
        self.liveness = None  # dist_runtime.liveness.Liveness, once the job has started
        self.exiting = False
        self._exit_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._stopping = False
        block_signals()  # again, in case the caller did not (see block_signals)
        threading.Thread(target=self._signals, daemon=True, name="signals").start()
        if watch_launcher if watch_launcher is not None else under_ring_launcher():
            self._ppid = os.getppid()
            threading.Thread(target=self._watch_launcher, daemon=True,
                             name="launcher").start()

    @property
    def faults(self):
        """The rank's Faults (dist_runtime/faults.py), once the ring carries data (held
        weakly: a reference from this object, which the signal thread keeps alive, would
        keep the group alive past the end of main, and mlx then never finalizes it; MPI
        reports that as an improper exit)."""
        return self._faults() if self._faults is not None else None

    @faults.setter
    def faults(self, f):
        self._faults = weakref.ref(f) if f is not None else None

    def set(self, doing: str):
        """Record the current activity, for the stop message."""
        self.doing = doing

    def finished(self):
        """The main thread's normal end: print `[me] finished`. A stop requested before
        it (a signal still in its TERM_GRACE_S wait for news) is carried out instead of
        lost with the process: this waits for the stop to report and exit."""
        with self._stop_lock:
            stopping = self._stopping
        if stopping:
            threading.Event().wait()
        _say(f"[{self.me}] finished")

    def exit_with_error(self, message: str, code: int, reason: Optional[str] = None,
                        then: Optional[Callable[[], None]] = None, word=None):
        """Print `[me] error: message`, run `then` (tell the next rank), tell every rank
        over the liveness channel (`word`: the Blame this rank exits with; by default its
        own failure), let the coordinator print its text so far, and exit with `code`.
        Only the first caller reports; any other thread calling it meanwhile waits."""
        self._exit_lock.acquire()
        self.exiting = True
        _say(f"[{self.me}] error: {message}")
        steps = [then, self._last_word(word, code),
                 (lambda: self.on_stop(reason or "error")) if self.on_stop else None,
                 *self.cleanups]
        for step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception as e:  # the exit must happen whatever the callbacks do
                _say(f"[{self.me}] error while stopping: {e}")
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass  # nothing reads it any more (the launcher is gone)
        os._exit(code)

    def _last_word(self, word, code: int) -> Optional[Callable[[], None]]:
        live = self.liveness
        if live is None or self.rank is None:
            return None
        if word is None:
            from dist_runtime.faults import FAILED, Blame

            word = Blame(self.rank, FAILED, self.rank)
        return lambda: live.bye(word)

    # -- stop requests --------------------------------------------------------------------

    def _signals(self):
        while True:
            sig = signal.sigwait(HANDLED)
            if sig == signal.SIGHUP:
                self.stop(sig, ORPHAN, "SIGHUP: its terminal or ssh connection closed")
            else:
                self.stop(sig, SIGNAL)

    def _watch_launcher(self):
        """Stdin: the launcher's stop requests, and its end of file when it is gone; and
        the parent process, which changes when the launcher dies."""
        pending = b""
        while True:
            try:
                ready, _, _ = select.select([0], [], [], WATCH_S)
            except (OSError, ValueError):
                ready = []
            if os.getppid() != self._ppid:
                self.stop(signal.SIGHUP, ORPHAN, f"its parent process {self._ppid} exited")
                return
            if not ready:
                continue
            try:
                data = os.read(0, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""  # a pty whose other side closed
            if not data:
                self.stop(signal.SIGHUP, ORPHAN, "its stdin from the launcher closed")
                return
            pending = (pending + data)[-4096:]
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                words = line.decode(errors="replace").split()
                if len(words) == 3 and words[0] == CONTROL and words[1] == "stop" \
                        and words[2] in ("SIGINT", "SIGTERM"):
                    threading.Thread(target=self.stop, daemon=True, name="stop",
                                     args=(signal.Signals[words[2]], LAUNCHER)).start()

    def stop(self, sig: int, source: str, detail: str = ""):
        """Stop this rank: `sig` was sent to it (SIGNAL), relayed by the launcher
        (LAUNCHER), or its launcher is gone (ORPHAN, with `detail`). Reports and exits;
        only the first request counts."""
        with self._stop_lock:
            if self._stopping:
                return
            self._stopping = True
        from dist_runtime.faults import ORPHANED, SILENT, STOPPED, TIMEOUT, Blame

        name = signal.Signals(sig).name
        first = self.rank in (0, None) and (source in (LAUNCHER, ORPHAN)
                                            or sig == signal.SIGINT)
        if not first:
            # A signal to one rank usually means another failed (mlx.launch's reaction),
            # a lost launcher loses every rank at once, and a stop from the launcher
            # reaches every rank: let the coordinator stop first (it prints what it had)
            # and the news arrive.
            end = time.monotonic() + TERM_GRACE_S
            while time.monotonic() < end and not self.exiting:
                time.sleep(0.02)
        if self.exiting:  # the main thread is reporting a failure: let it finish
            threading.Event().wait()
        f = self.faults
        blame = f.blame if f is not None else None
        if blame is None and self.liveness is not None:
            blame = self.liveness.culprit()
        if source == LAUNCHER:
            blame = None  # every rank was asked to stop: each says so itself
        me = self.rank if self.rank is not None else -1
        gave_up = blame is not None and blame.rank == me and blame.reason in (SILENT, TIMEOUT)
        if blame is not None and (blame.rank != me or gave_up) and blame.reason != ORPHANED:
            describe = f.describe if f is not None else self.liveness.describe
            what = "its launcher is gone" if source == ORPHAN else f"stopped by {name}"
            self.exit_with_error(f"{describe(blame)} (then {what})", EXIT_SIGNAL_BASE + sig,
                                 reason=f"stopped by {name}", word=blame)
        if source == ORPHAN:
            word = Blame(me, ORPHANED, me)
            message = (f"stopped because its launcher is gone ({detail}; mlx.launch or "
                       f"launch/start.py was killed, or its terminal closed): nothing reads "
                       f"this rank's output any more")
            reason = "stopped: the launcher is gone"
        else:
            word = Blame(me, STOPPED, me, sig=sig)
            how = " (sent to the launcher)" if source == LAUNCHER else ""
            message = f"stopped by {name}{how} while {self.doing}"
            if sig == signal.SIGTERM and source == SIGNAL:
                message += (" (mlx.launch sends SIGTERM to every rank once one has failed; "
                            "a user or a tool such as timeout may have sent it: look above "
                            "for another rank's error)")
            reason = f"stopped by {name}"
        then = (lambda: f.notify(word)) if f is not None else None  # noqa: E731
        self.exit_with_error(message, EXIT_SIGNAL_BASE + sig, reason=reason, then=then,
                             word=word)


def _say(line: str):
    """One line on stderr, even when nothing reads it any more."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass

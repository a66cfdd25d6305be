"""Signals and exits: every rank says why it stopped, names itself, and exits non-zero.

mlx.launch stops every other rank with SIGTERM as soon as one exits non-zero, and exits 0
itself. So each rank handles SIGTERM and SIGINT on a thread of its own (`sigwait`, with
the signals blocked everywhere else): the message gets out even while the main thread
sits in a blocking receive, where a Python signal handler would never run. The
coordinator also prints what it had generated.

A SIGTERM usually means another rank failed first (mlx.launch's reaction), so a rank
given one waits up to TERM_GRACE_S for the news to reach it through the ring (its main
thread then reports the failed rank and exits); failing that, it reports what it knows.
SIGINT on the coordinator (Ctrl-C) stops at once. A rank stopped by a signal tells the
next rank (an ABORT naming itself), so the rest of the ring stops even without
mlx.launch.

Every exit for an error goes through `exit_with_error`: one error line per rank, the
coordinator's text so far, then `os._exit` (no waiting on threads stuck in a receive).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import weakref
from typing import Callable, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM)
EXIT_SIGNAL_BASE = 128  # shell convention: killed by signal N exits 128 + N
TERM_GRACE_S = 1.0  # s a rank given SIGTERM waits to learn which rank failed first


def block_signals():
    """Block SIGINT/SIGTERM in this thread and every thread started after it.

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


class Lifecycle:
    """What this rank is doing now, and what to do when told to stop."""

    def __init__(self):
        rank = env_rank()
        self.rank: Optional[int] = rank
        self.me = f"rank {'?' if rank is None else rank} ({socket.gethostname()})"
        self.doing = "starting"
        # Coordinator: print what was generated; called with the finish reason.
        self.on_stop: Optional[Callable[[str], None]] = None
        # Run last before an exit for an error, e.g. give back the wired limit (metal.py).
        self.cleanups: list = []
        self._faults = None  # weakref to the Faults: who failed, how to tell others
        self.exiting = False
        self._exit_lock = threading.Lock()
        block_signals()  # again, in case the caller did not (see block_signals)
        threading.Thread(target=self._wait, daemon=True, name="signals").start()

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

    def exit_with_error(self, message: str, code: int, reason: Optional[str] = None,
                        then: Optional[Callable[[], None]] = None):
        """Print `[me] error: message`, run `then` (tell the others), let the coordinator
        print its text so far, and exit with `code`. Only the first caller reports; any
        other thread calling it meanwhile waits for the exit."""
        self._exit_lock.acquire()
        self.exiting = True
        print(f"[{self.me}] error: {message}", file=sys.stderr, flush=True)
        for step in (then, (lambda: self.on_stop(reason or "error")) if self.on_stop else None,
                     *self.cleanups):
            if step is None:
                continue
            try:
                step()
            except Exception as e:  # the exit must happen whatever the callbacks do
                print(f"[{self.me}] error while stopping: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _wait(self):
        sig = signal.sigwait(HANDLED)
        name = signal.Signals(sig).name
        if not (sig == signal.SIGINT and self.rank == 0):
            end = time.monotonic() + TERM_GRACE_S
            while time.monotonic() < end and not self.exiting:
                time.sleep(0.02)
        if self.exiting:  # the main thread is reporting a failure: let it finish
            threading.Event().wait()
        f = self.faults
        blame = f.blame if f is not None else None
        then = None
        if blame is not None and blame.rank != self.rank:
            message = f"{f.describe(blame)} (then stopped by {name})"
        else:
            message = f"stopped by {name} while {self.doing}"
            if sig == signal.SIGTERM:
                message += (" (mlx.launch sends SIGTERM to every rank once one has failed: "
                            "look for the rank that failed first above)")
            if f is not None:
                then = lambda: f.notify_stopped(sig)  # noqa: E731
        self.exit_with_error(message, EXIT_SIGNAL_BASE + sig, reason=f"stopped by {name}",
                             then=then)

"""Signals and exits: every rank says why it stopped, names itself, and exits non-zero.

mlx.launch stops every other rank with SIGTERM as soon as one exits non-zero, and exits 0
itself. So each rank handles SIGTERM and SIGINT on a thread of its own (`sigwait`, with
the signals blocked everywhere else): the message gets out even while the main thread
sits in a blocking receive, where a Python signal handler would never run. The
coordinator also prints what it had generated.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM)
EXIT_SIGNAL_BASE = 128  # shell convention: killed by signal N exits 128 + N


def block_signals():
    """Block SIGINT/SIGTERM in this thread and every thread started after it.

    Call before importing mlx: its import starts worker threads, and a thread that does
    not block the signals would take them (SIGTERM's default then kills the process
    with no word said).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


class Lifecycle:
    """What this rank is doing now, and what to do when told to stop."""

    def __init__(self):
        self.me = f"rank ? ({os.uname().nodename})"
        self.doing = "starting"
        self.on_stop: Optional[Callable[[str], None]] = None
        block_signals()  # again, in case the caller did not (see block_signals)
        threading.Thread(target=self._wait, daemon=True, name="signals").start()

    def set(self, doing: str):
        """Record the current activity, for the stop message."""
        self.doing = doing

    def _wait(self):
        sig = signal.sigwait(HANDLED)
        name = signal.Signals(sig).name
        print(f"[{self.me}] error: stopped by {name} while {self.doing}"
              + (" (mlx.launch sends SIGTERM to every rank once one has failed: look for "
                 "the rank that failed first above)" if sig == signal.SIGTERM else ""),
              file=sys.stderr, flush=True)
        if self.on_stop is not None:
            try:
                self.on_stop(name)
            except Exception as e:  # the exit must happen whatever the callback does
                print(f"[{self.me}] error while stopping: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_SIGNAL_BASE + sig)

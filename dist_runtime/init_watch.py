"""A deadline for mx.distributed.init, kept by a process of its own.

mlx's binding of `mx.distributed.init` holds Python's GIL while the ring backend waits
in accept()/connect() for the neighbours. So while a rank waits there, none of its
Python threads run: not the Watchdog (dist_runtime/faults.py), not the launcher watch
or the signal thread (dist_runtime/lifecycle.py). A rank whose neighbour never came,
or whose launcher was killed meanwhile, waited forever (seen: a rank left over by a
killed test job, still in accept() an hour later). So the wait runs under a small child
process that needs nothing from the rank: when the deadline passes, or the rank's
parent (its launcher) goes away, it prints the rank's error line and kills the rank
(SIGKILL: a blocked rank can act on no other signal); so it does when a stop signal
sent to the rank's process group (Ctrl-C) reaches it. A SIGTERM to the rank alone (as
mlx.launch sends once another rank failed) is taken by the rank's signal thread, which
then waits for the GIL: such a rank ends at the deadline (--start-timeout), or when its
launcher goes. It exits once the rank is through, or gone. The rank holds the write
end of a pipe on the child's stdin, so the child sees the rank go (end of file) the
moment it does, however it goes; a rank that exits on purpose meanwhile (a stop,
dist_runtime/lifecycle.py) ends and reaps its watchers first (`stop_watchers`, one of
its Lifecycle's cleanups), so no watcher outlives its job.

    python -m dist_runtime.init_watch PID PARENT_PID SECONDS ME   (started by `watched`)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import psutil

from dist_runtime.lifecycle import HANDLED

POLL_S = 0.2
_watchers: set = set()  # this rank's running watcher processes


@contextmanager
def watched(me: str, seconds: float, waiting_for: str):
    """Run the body (the blocking init) under the child watcher; `me` names the rank in
    its error line ('rank r (host)'), `waiting_for` says what it waits for."""
    read_end, write_end = os.pipe()  # the write end stays here (not inherited)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "dist_runtime.init_watch", str(os.getpid()),
             str(os.getppid()), str(seconds), me, waiting_for],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            stdin=read_end, stdout=subprocess.DEVNULL)
    finally:
        os.close(read_end)
    _watchers.add(child)
    try:
        yield
    finally:
        os.close(write_end)
        _end(child)


def stop_watchers():
    """End and reap this rank's watchers: a Lifecycle cleanup (dist_runtime/job.py),
    run on the way to os._exit, which skips the `finally` of a `watched` body still
    running in the main thread."""
    for child in list(_watchers):
        _end(child)


def _end(child: subprocess.Popen):
    _watchers.discard(child)
    child.kill()
    child.wait()


def watch(pid: int, parent: int, seconds: float, me: str, waiting_for: str):
    """The child: until rank `pid` is gone (its pipe on stdin reaches end of file), kill
    it with its error line when `seconds` pass, its parent is no longer `parent`, or a
    stop signal reaches the watcher: one sent to the whole process group (Ctrl-C in the
    terminal) reaches the rank too, which cannot act on it in init (its signal thread
    needs the GIL), so its watcher does."""
    stops: list = []
    for sig in HANDLED:
        signal.signal(sig, lambda sig, _frame: stops.append(sig))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # the rank's mask is inherited
    end = time.monotonic() + seconds
    while True:
        if select.select([sys.stdin], [], [], POLL_S)[0]:
            return  # the rank closed its end: through init, or gone
        try:
            now_parent = psutil.Process(pid).ppid()
        except psutil.NoSuchProcess:
            return
        if stops:
            why = (f"stopped by {signal.Signals(stops[0]).name} while it waited for "
                   f"{waiting_for}")
        elif now_parent != parent:
            why = (f"stopped because its launcher is gone (its parent process {parent} "
                   f"exited) while it waited for {waiting_for}")
        elif time.monotonic() >= end:
            why = f"waited {seconds:.0f} s for {waiting_for}; see --start-timeout"
        else:
            continue
        try:
            print(f"[{me}] error: {why}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # nothing reads it any more (the launcher is gone): kill the rank anyway
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


if __name__ == "__main__":
    _pid, _parent, _seconds, _me, _waiting_for = sys.argv[1:6]
    watch(int(_pid), int(_parent), float(_seconds), _me, _waiting_for)

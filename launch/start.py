#!/usr/bin/env python3
"""Start a job on the hosts of a hostfile: mlx.launch's arguments, the job's exit status.

    python3 launch/start.py --hostfile hostfiles/localhost-2.json launch/run.py \
        --model glm4_moe --synthetic tiny --prompt "Hello"

It runs mlx.launch's own launcher (the ring backend) in this process, and adds what
mlx.launch lacks:

- Its exit status is the job's: 0 when every rank finished, else the code of the rank at
  fault (`job_status`): a rank's own failure (1, 2, or 128 + N when signal N killed it,
  137 for kill -9) before a stop by a signal (129 SIGHUP, 130 SIGINT, 143 SIGTERM)
  before 3 (a rank that only lost another). mlx.launch itself exits 0 whatever happens.
- Ctrl-C, SIGTERM (as `timeout` sends) and SIGHUP stop the job in order: every rank is
  told to stop (a line on mlx.launch's stdin, which mlx.launch copies to every rank's
  stdin on every host; dist_runtime/lifecycle.py reads it), rank 0 prints the text so far
  and the --json summary, and every rank's last lines come through. mlx.launch, given
  Ctrl-C, dies with a traceback and drops the ranks' output; given SIGTERM it dies at
  once and leaves the ranks running. A second signal, or a job still running STOP_S
  after the first, kills the ranks.
- Each rank starts with SIGINT, SIGTERM and SIGHUP blocked (inherited from here), so a
  stop that arrives while it starts waits for its signal thread instead of killing it
  without a word; and in a session of its own, so a Ctrl-C in the terminal reaches only
  this launcher, which stops the ranks in order.
- mlx.launch's loop that copies each rank's output spins on a select() that returns at
  once (`calm_select`); here it waits, leaving the cores to the ranks.
- Every rank gets the job's id (PIPELINE_JOB_ID), so two jobs started on the same ports
  say what happened (dist_runtime/job.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import uuid

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

CONTROL = "mlx-pipeline:"  # the line the ranks understand (dist_runtime/lifecycle.py)
STOP_S = 10.0  # s the ranks get to stop in order before they are killed
EXIT_PEER_LOST = 3  # dist_runtime/faults.py: a rank that lost another
STOPPED = (128 + signal.SIGHUP, 128 + signal.SIGINT, 128 + signal.SIGTERM)
NODE_RE = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
PREFIX = "[launch/start.py]"
WRITE_POLL_S = 0.05  # s mlx.launch's loop waits for a rank's output before it writes stdin


def calm_select(real):
    """select() for mlx.launch's per-rank loop, which spins otherwise.

    That loop asks whether the rank's stdin pipe is writable, which an empty pipe always
    is, so each call returns at once and the loop spins, burning most of a core on the
    launcher's host (81% measured with 2 ranks on a 2-core machine, where the ranks need
    every cycle). Here it first waits up to WRITE_POLL_S for output or an error, then
    asks about the write ends without waiting: stdin lines (the stop request) still go
    through within WRITE_POLL_S."""
    def select(rlist, wlist, xlist, timeout=None):
        if not wlist:
            return real(rlist, wlist, xlist, timeout)
        wait = WRITE_POLL_S if timeout is None else min(timeout, WRITE_POLL_S)
        readable, _, errors = real(rlist, [], xlist, wait)
        _, writable, _ = real([], wlist, [], 0)
        return readable, writable, errors
    return select


def job_status(codes: dict) -> int:
    """The job's exit status from each rank's exit code (see the module docstring).
    A negative code (killed by that signal) counts as 128 + N; 'killed' (mlx.launch
    killed a rank that did not stop) as SIGTERM's."""
    norm = {}
    for rank, c in codes.items():
        if c == "killed":
            c = 128 + signal.SIGTERM
        norm[rank] = 128 - c if c < 0 else c
    for cls in (lambda c: c not in (0, EXIT_PEER_LOST, *STOPPED), lambda c: c in STOPPED,
                lambda c: c == EXIT_PEER_LOST):
        hits = [norm[r] for r in sorted(norm) if cls(norm[r])]
        if hits:
            return hits[0]
    return 0


def backend_of(argv: list) -> str:
    """The backend mlx.launch would use for these arguments."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--backend")
    p.add_argument("--hostfile")
    known, _ = p.parse_known_args(argv)
    if known.backend:
        return known.backend
    if known.hostfile:
        try:
            with open(known.hostfile) as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("backend"):
                return data["backend"]
        except (OSError, ValueError):
            pass  # mlx.launch says what is wrong with it
    import mlx.core as mx

    return "nccl" if mx.cuda.is_available() else "ring"


def main(argv=None) -> int:
    # Before anything else, mlx's import included (it starts threads): every thread, and
    # every rank started from one, inherits the blocked set; the signal thread takes them.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    backend = backend_of(argv)
    if backend != "ring":
        print(f"{PREFIX} error: this launcher runs the ring backend; the hostfile or "
              f"--backend asks for {backend!r}: start it with mlx.launch (with mpirun, its "
              f"exit status is already the ranks')", file=sys.stderr, flush=True)
        return 2

    import mlx._distributed_utils.launch as launch

    # mlx.launch forwards what it reads on stdin to every rank: make that our pipe.
    read_end, control = os.pipe()
    os.dup2(read_end, 0)
    os.close(read_end)

    children = []  # each rank's process (or its ssh), in a session of its own
    real_popen = launch.Popen

    def popen(*args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        p = real_popen(*args, **kwargs)
        children.append(p)
        return p

    codes: dict = {}
    real_warning = launch.log_warning

    def warning(*args, **kwargs):
        m = NODE_RE.search(" ".join(str(a) for a in args))
        if m:
            codes[int(m.group(1))] = int(m.group(2)) if m.group(2) else "killed"
        real_warning(*args, **kwargs)

    launch.Popen, launch.log_warning = popen, warning
    launch.select = calm_select(launch.select)

    def kill_all():
        for p in list(children):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass

    def on_signals():
        first = None
        while True:
            sig = signal.sigwait(SIGNALS)
            if first is not None:
                print(f"{PREFIX} {signal.Signals(sig).name} again: killing the ranks",
                      file=sys.stderr, flush=True)
                kill_all()
                continue
            first = sig
            name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
            print(f"{PREFIX} {signal.Signals(sig).name}: asking every rank to stop (once more "
                  f"to kill them)", file=sys.stderr, flush=True)
            try:
                os.write(control, f"\n{CONTROL} stop {name}\n".encode())
            except OSError:
                pass
            timer = threading.Timer(STOP_S, kill_all)
            timer.daemon = True
            timer.start()

    threading.Thread(target=on_signals, daemon=True, name="signals").start()
    sys.argv = ["mlx.launch", "--env", f"PIPELINE_JOB_ID={uuid.uuid4().hex[:12]}", *argv]
    try:
        launch.main()
    except SystemExit as e:  # mlx.launch's argument errors
        if e.code not in (None, 0):
            return e.code if isinstance(e.code, int) else 2
    status = job_status(codes)
    if status:
        ranks = ", ".join(f"rank {r}: {c}" for r, c in sorted(codes.items()))
        print(f"{PREFIX} exit status {status} (exit codes: {ranks}; README, Troubleshooting)",
              file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

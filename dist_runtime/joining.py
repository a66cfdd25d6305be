"""The first exchange of a job: every rank that joined belongs to this job, and each
starts watching every other (dist_runtime/liveness.py).

Each rank sends its job identity: the job id that launch/start.py gives every rank of one
job, the launcher that started it (its pid, for ranks on the launcher's host), and a hash
of its command line. Two jobs started on the same ports join each other's rings (mlx's
ring backend lets two processes listen on one port); the identity lets every rank say so,
and how to fix it, before anything else happens. The same exchange carries each rank's
liveness address, so from here on a rank that dies or stops answering is named, however
long a load or a prefill takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Optional

from dist_runtime.cluster import INFO_BYTES, gather_json, ring_addresses
from dist_runtime.errors import StartError
from dist_runtime.faults import EXIT_PEER_LOST, LISTEN_S, PeerLost
from dist_runtime.liveness import Liveness


def launcher_identity() -> str:
    """'host:pid:start' of the launcher process that started this rank (mlx.launch or
    launch/start.py, on its own host), or '' when the parent is something else (sshd for
    a rank on another host, mpirun)."""
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        cmd = " ".join(parent.cmdline())
        if "mlx.launch" in cmd or "_distributed_utils" in cmd or "start.py" in cmd:
            return f"{socket.gethostname()}:{parent.pid}:{parent.create_time():.2f}"
    except Exception:  # noqa: BLE001  (no identity is no check, never a failure)
        pass
    return ""


def job_identity(argv: list) -> dict:
    """What every rank of one job shares and another job's ranks do not."""
    return {"job": os.environ.get("PIPELINE_JOB_ID", ""), "launcher": launcher_identity(),
            "argv": hashlib.sha256(json.dumps(list(argv)).encode()).hexdigest()[:16]}


def check_one_job(rows: list):
    """Raise StartError, the same on every rank, when the ranks that joined do not all
    belong to one job (rows: each rank's first exchange, in rank order)."""
    names = [f"rank {r} ({row['host']})" for r, row in enumerate(rows)]

    def pid(row) -> str:
        return row["launcher"].split(":")[1] if row["launcher"] else "?"

    ref = rows[0]
    for r, row in enumerate(rows[1:], 1):
        why = None
        if row["job"] != ref["job"]:
            why = (f"launch/start.py started it as job {row['job'] or '(none)'}, {names[0]} "
                   f"as job {ref['job'] or '(none)'}")
        else:
            for q in range(r):
                other = rows[q]
                if row["host"] == other["host"] and row["launcher"] and other["launcher"] \
                        and row["launcher"] != other["launcher"]:
                    why = (f"another launcher started it (pid {pid(row)}) than {names[q]} "
                           f"(pid {pid(other)}) on the same host")
                    break
        if why is None and row["argv"] != ref["argv"]:
            why = f"it runs another command line than {names[0]}"
        if why is not None:
            raise StartError(
                f"{names[r]} is not part of this job: {why}. Two jobs started on the same "
                f"ports join each other's rings{_ports_hint()}; start one of them on other "
                f"ports (mlx.launch --starting-port PORT, or launch/start.py --starting-port "
                f"PORT), or wait until the other job ends")


def _ports_hint() -> str:
    addrs = ring_addresses()
    try:
        ports = [int(a.rpartition(":")[2]) for node in addrs for a in node]
    except (TypeError, ValueError, AttributeError):
        return ""
    if not ports:
        return ""
    return (f" (this job's ring listens on ports {min(ports)}-{max(ports)}; e.g. "
            f"--starting-port {max(ports) + 1} is free of both)")


def join_job(group, life, watchdog, args, argv: list) -> Optional[Liveness]:
    """The first exchange: check that every rank belongs to this job, and start watching
    every other rank (returns the Liveness, None for one rank or another backend)."""
    rank, n = group.rank(), group.size()
    if n == 1:
        return None
    liveness = None
    if ring_addresses() is not None:  # the ring backend: IPs we can reach the ranks at
        try:
            liveness = Liveness(rank, n, args.heartbeat_timeout, args.liveness_port, watchdog)
        except OSError as e:
            port = f"--liveness-port {args.liveness_port} + {rank}" if args.liveness_port \
                else "this rank's ring port"
            raise StartError(f"cannot open the liveness channel's port ({port}) again after "
                             f"the ring connected: {e.strerror or e}; another program took "
                             f"it: pass --liveness-port PORT (rank r listens on PORT + r)") from e
    mine = {"host": socket.gethostname(), **job_identity(argv),
            "live": liveness.address() if liveness is not None else None}
    rows = gather_json(group, mine, INFO_BYTES, watchdog, args.load_timeout, kind="job")
    try:
        check_one_job(rows)
    except StartError:
        if liveness is not None:
            liveness.close()
        raise
    if liveness is not None:
        token = hashlib.sha256(json.dumps(rows[0], sort_keys=True).encode()).hexdigest()[:16]
        names = [f"rank {r} ({row['host']})" for r, row in enumerate(rows)]

        def on_verdict(blame):
            f = life.faults
            message = f.describe(blame) if f is not None else liveness.describe(blame)
            then = (lambda: f.notify(blame)) if f is not None else None  # noqa: E731
            life.exit_with_error(message, EXIT_PEER_LOST, reason=f"error: {message}",
                                 then=then, word=blame)

        liveness.start([row["live"] for row in rows], names, token, on_verdict)
        life.liveness = liveness
    return liveness


class named_culprit:
    """Around the start's collectives: a broken connection names the rank at fault when
    the liveness channel knows it (the collective's own error cannot say which)."""

    def __init__(self, liveness: Optional[Liveness]):
        self.liveness = liveness

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if self.liveness is None or not isinstance(err, StartError):
            return False
        blame = self.liveness.culprit(wait=LISTEN_S * 2)
        if blame is None:
            return False
        raise PeerLost(self.liveness.describe(blame), blame) from err

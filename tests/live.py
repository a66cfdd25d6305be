"""Jobs watched while they run: signal a chosen rank, time every rank's exit, find orphans.

`LiveJob` starts `mlx.launch` (or the project's launcher, launch/start.py) on local
ranks with a unique marker in the environment, reads stdout and stderr as they come (with
timestamps), learns each rank's pid from its loading or stage line, and after a signal
polls every rank until it has exited. mlx.launch's own exit status is 0 whatever
happens, so exit codes come from its '[WARN] Node with rank r exited with code c' lines.
`leftovers()` lists processes that still carry the marker; `close()` resumes and kills
them, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil

from tests.launcher import ROOT, free_port_block

# A rank's line, wherever it starts (mlx.launch may put its own text before it), up to the
# end of the line or the next rank's line run into it.
RANK_RE = re.compile(r"\[rank (\d+) \(([^)]*)\)\] (stage|loading|finished|error|warning|stopped)"
                     r":? ?((?:(?!\[rank \d+ \()[^\n])*)")
CODE_RE = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")
KILLED_RE = re.compile(r"Node with rank (\d+) was killed")
MARKER_VAR = "PIPELINE_TEST_MARKER"


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie or a reaped process does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LiveJob:
    """One mlx.launch job on n local ranks (n == 1: plain python) of launch/run.py, or of
    another script (`script`, relative to the repository)."""

    def __init__(self, n: int, args: list, env=None, hostfile=None, start: bool = False,
                 session: bool = False, script=None):
        """`start`: through launch/start.py instead of mlx.launch; `session`: in a process
        group of its own, as a terminal's foreground job (see `signal_group`); `script`:
        what each rank runs instead of launch/run.py."""
        self.n = n
        self.marker = uuid.uuid4().hex
        full_env = dict(os.environ, **(env or {}), **{MARKER_VAR: self.marker})
        script = str(ROOT / (script or "launch/run.py"))
        if n == 1:
            cmd = [sys.executable, script, *args]
        else:
            hf = hostfile or ROOT / "hostfiles" / f"localhost-{n}.json"
            # Ports of its own: jobs run by other tests at the same time must not join it.
            port = free_port_block()
            launcher = [sys.executable, str(ROOT / "launch/start.py")] if start \
                else ["mlx.launch"]
            cmd = [*launcher, "--hostfile", str(hf), "--starting-port", str(port), script,
                   *args]
        self.t0 = time.monotonic()
        self.lines: list = []  # (seconds since start, 'out' | 'err', text)
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, cwd=ROOT, env=full_env,
                                     text=True, errors="replace", start_new_session=session)
        self._readers = [threading.Thread(target=self._read, args=(f, tag), daemon=True)
                         for f, tag in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._readers:
            t.start()
        self.signalled_at = None

    def _read(self, f, tag):
        for line in f:
            with self._lock:
                self.lines.append((time.monotonic() - self.t0, tag, line.rstrip("\n")))

    # -- what it said -----------------------------------------------------------------------

    def text(self, tag: str) -> str:
        with self._lock:
            return "\n".join(t for _, g, t in self.lines if g == tag)

    @property
    def stdout(self) -> str:
        return self.text("out")

    @property
    def stderr(self) -> str:
        return self.text("err")

    def said(self, kind: str) -> dict:
        """rank -> list of messages of `kind` (error, stage, finished, stopped, warning)."""
        out: dict = {}
        for m in RANK_RE.finditer(self.stderr):
            if m.group(3) == kind:
                out.setdefault(int(m.group(1)), []).append(m.group(4).strip())
        return out

    @property
    def errors(self) -> dict:
        return self.said("error")

    @property
    def finished(self) -> set:
        return set(self.said("finished"))

    @property
    def pids(self) -> dict:
        """rank -> pid, from its loading line (or its stage line)."""
        out = {r: json.loads(v[0])["pid"] for r, v in self.said("stage").items()}
        out.update({r: json.loads(v[0])["pid"] for r, v in self.said("loading").items()})
        return out

    @property
    def exit_codes(self) -> dict:
        """rank -> exit code as mlx.launch reported it; 'killed' when mlx.launch killed it."""
        codes = {int(r): int(c) for r, c in CODE_RE.findall(self.stderr)}
        codes.update({int(r): "killed" for r in KILLED_RE.findall(self.stderr)})
        return codes

    def summary(self):
        """The last JSON line rank 0 printed on stdout, or None."""
        for line in self.stdout.splitlines()[::-1]:
            if line.startswith("{"):
                return json.loads(line)
        return None

    def report(self) -> str:
        """Everything it printed, for assertion messages."""
        with self._lock:
            return "\n".join(f"{t:7.2f} {g} {x[:400]}" for t, g, x in self.lines
                             if "[ring]" not in x)

    # -- driving it -------------------------------------------------------------------------

    def wait_for(self, predicate, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if self.proc.poll() is not None and not predicate():
                time.sleep(0.2)  # let the readers drain
                if predicate():
                    return
                raise AssertionError(f"job ended before {what}:\n{self.report()}")
            time.sleep(0.02)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.report()}")

    def wait_stages(self, timeout: float = 40):
        """Until every rank has printed its stage line (it has loaded); returns the pids."""
        self.wait_for(lambda: len(self.said("stage")) == self.n, timeout,
                      "stage line from every rank")
        return self.pids

    def wait_loading(self, timeout: float = 40):
        """Until every rank has said it is loading its layers; returns the pids."""
        self.wait_for(lambda: len(self.said("loading")) == self.n, timeout,
                      "loading line from every rank")
        return self.pids

    def signal(self, rank: int, sig) -> float:
        """Send `sig` to rank's process; returns the time (since start) it was sent."""
        os.kill(self.pids[rank], sig)
        self.signalled_at = time.monotonic() - self.t0
        return self.signalled_at

    def signal_launcher(self, sig) -> float:
        """Send `sig` to the launcher process alone (mlx.launch or launch/start.py)."""
        os.kill(self.proc.pid, sig)
        self.signalled_at = time.monotonic() - self.t0
        return self.signalled_at

    def signal_group(self, sig) -> float:
        """Send `sig` to the launcher's process group, as a terminal does on Ctrl-C
        (start the job with session=True)."""
        os.killpg(self.proc.pid, sig)
        self.signalled_at = time.monotonic() - self.t0
        return self.signalled_at

    def wait_exits(self, ranks, timeout: float) -> dict:
        """rank -> seconds from the signal to its exit, for each of `ranks` that exited
        within `timeout` (the caller asserts on which did)."""
        pids = self.pids
        start = self.t0 + self.signalled_at
        out: dict = {}
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(out) < len(ranks):
            for r in ranks:
                if r not in out and not alive(pids[r]):
                    out[r] = round(time.monotonic() - start, 2)
            time.sleep(0.02)
        return out

    def wait(self, timeout: float) -> int:
        """Until mlx.launch exits (raises subprocess.TimeoutExpired otherwise)."""
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc

    def leftovers(self) -> list:
        """'pid: command line' of each process still running with this job's marker
        (ranks, launcher, watchers), not us: what an assertion shows."""
        out = []
        for p in self._marked():
            try:
                out.append(f"{p.pid}: {' '.join(p.cmdline())}")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out

    def _marked(self) -> list:
        """The processes behind leftovers()."""
        found = []
        for p in psutil.process_iter(["pid"]):
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get(MARKER_VAR) == self.marker and \
                        p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def close(self):
        """Resume and kill whatever is left of the job (always call, e.g. in finally)."""
        for p in self._marked():
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

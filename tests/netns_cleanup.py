"""Nothing of a simulated cluster outlives it: the processes inside its namespaces (ranks,
sshds, probes), its wire, its namespaces and its links in the root namespace.

Each run keeps a state file (RUNS/ID/state.json: namespaces, root-side links, pids of
the processes it started and the pid of its owner) from its first namespace on, so a
cluster is torn down from that file alone: by Cluster.close(), by
`launch/cluster_sim.py down`, or, once its owner has died (a test run killed with -9), by
the next cluster that starts (`sweep_stale`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.live import alive
from tests.netns_ssh import SSHD

RUNS = Path(tempfile.gettempdir()) / "netns-cluster"  # one folder per run: state, keys, logs
STOP_GRACE_S = 1.0  # SIGTERM, then this, then SIGKILL
CMD_S = 30  # one ip/tc command, at most


def run(cmd: list, check: bool = True, timeout: float = CMD_S) -> subprocess.CompletedProcess:
    """A command, its output captured; a failure says which command and why."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(map(str, cmd))}` failed ({p.returncode}): "
                           f"{p.stderr.strip() or p.stdout.strip()}")
    return p


def stop(proc: subprocess.Popen):
    """SIGTERM to its process group (it leads one: start_new_session), SIGKILL after
    STOP_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            proc.send_signal(sig)
        try:
            proc.wait(STOP_GRACE_S if sig == signal.SIGTERM else 5)
            return
        except subprocess.TimeoutExpired:
            continue


def _netns_pids(ns: str) -> list:
    p = run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def teardown(state: dict):
    """Kill every process inside the namespaces (ranks, sshds, probes), then the listed
    pids that are still ours (sshd, the wire), then delete namespaces and root links."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for ns in state["namespaces"] for pid in _netns_pids(ns)]
        pids += [p for p in state.get("pids", []) if _ours(p)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + STOP_GRACE_S
        while pids and time.monotonic() < end and any(alive(p) for p in pids):
            time.sleep(0.05)
    for ns in state["namespaces"]:
        run(["ip", "netns", "del", ns], check=False)
    for ifname in state.get("root_ifs", []):
        if Path(f"/sys/class/net/{ifname}").exists():
            run(["ip", "link", "del", ifname], check=False)


def _ours(pid: int) -> bool:
    """Whether pid is still a process this harness started (sshd or the wire), not a
    stranger that got the number."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "netns_wire.py" in cmd or (SSHD in cmd and str(RUNS) in cmd)


def sweep_stale() -> list:
    """Tear down clusters whose owner process is gone (a test run killed with -9);
    clusters started by hand (no owner) stay until `cluster_sim.py down`."""
    swept = []
    for state_file in RUNS.glob("*/state.json") if RUNS.exists() else []:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        owner = state.get("owner")
        if owner and not alive(owner):
            teardown(state)
            shutil.rmtree(state_file.parent, ignore_errors=True)
            swept.append(state["id"])
    return swept


def down(run_id: str) -> bool:
    """Tear down the cluster with this id (from its state file); False if none."""
    state_file = RUNS / run_id / "state.json"
    if not state_file.exists():
        return False
    teardown(json.loads(state_file.read_text()))
    shutil.rmtree(RUNS / run_id, ignore_errors=True)
    return True

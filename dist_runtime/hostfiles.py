"""Hostfiles: the one mlx.launch reads and the ring backend's own address list.

mlx.launch's hostfile must be valid JSON with an `ssh` name per host, IP addresses for
the ring backend, no address shared by two machines, and no loopback address next to
remote hosts. For mlx's RDMA backends (`jaccl`: a full mesh of Thunderbolt 5 cables;
`jaccl-ring`: each host cabled to the next) every host lists an `rdma` device per peer
(`check_rdma`, the format mlx.launch reads), and rank 0 an IP, the coordinator's. The ring's address list (MLX_HOSTFILE, written by mlx.launch) must give
every rank its own ip:port. `launch/hostfile.py check` uses the first; every rank checks
the second at start (`check_start_env`). Every finding says what is wrong and the fix.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dist_runtime.errors import PreflightError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BACKENDS = ("ring", "mpi", "nccl", "jaccl", "jaccl-ring")
HOST_KEYS = ("ssh", "ips", "rdma")
RDMA_BACKENDS = ("jaccl", "jaccl-ring")
RDMA_PREFIX = "rdma_"  # ibv_devices names Thunderbolt's RDMA devices rdma_en2, rdma_en3, ...
RING_MAX_CABLES = 4  # mlx's jaccl ring opens at most 4 connections to each neighbour
WRITE_HINT = "python launch/hostfile.py write --hosts a,b --ips IP_A,IP_B -o hostfiles/x.json"



@dataclass
class Problem:
    """One finding about a hostfile: 'error' stops a job, 'warning' may not, 'note' is for
    information."""

    level: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def is_ip(text) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except (ValueError, TypeError):
        return False


def load_hostfile(path) -> tuple:
    """(data or None, problems) for the mlx.launch hostfile at `path`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        return None, [Problem("error", f"cannot read hostfile {path}: {e.strerror}; check the "
                                       f"path, or write one with {WRITE_HINT}")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [Problem("error", f"hostfile {path} is not valid JSON: {e.msg} at line "
                                       f"{e.lineno}, column {e.colno}; fix it (a trailing "
                                       f"comma? single quotes?) or write it with {WRITE_HINT}")]
    return data, check_hostfile_data(data, str(path))


def check_hostfile_data(data, where: str = "the hostfile") -> list:
    """Problems with an mlx.launch hostfile's content (see the module docstring)."""
    problems = []

    def error(msg):
        problems.append(Problem("error", msg))

    def warn(msg):
        problems.append(Problem("warning", msg))

    if isinstance(data, list):
        hosts, backend, envs = data, "", []
    elif isinstance(data, dict):
        if "hosts" not in data:
            error(f"{where} has no \"hosts\" list; it needs {{\"backend\": \"ring\", \"hosts\": "
                  f"[{{\"ssh\": \"mac1.local\", \"ips\": [\"192.168.1.2\"]}}, ...]}}")
            return problems
        hosts, backend, envs = data["hosts"], data.get("backend", ""), data.get("envs", [])
    else:
        error(f"{where} holds a JSON {type(data).__name__}; it needs an object with a "
              f"\"hosts\" list")
        return problems
    if not isinstance(hosts, list) or not hosts:
        error(f"{where}: \"hosts\" must be a non-empty list of {{\"ssh\": ..., \"ips\": [...]}}, "
              f"one per rank (rank 0 first)")
        return problems
    if backend not in ("",) + BACKENDS:
        error(f"{where}: unknown backend {backend!r}; use one of {', '.join(BACKENDS)} "
              f"(ring for TCP over Ethernet or Thunderbolt)")
    backend = backend or "ring"
    if not isinstance(envs, list):
        error(f"{where}: \"envs\" must be a list of \"NAME=value\" strings")
        envs = []
    for e in envs:
        key = e.split("=", 1)[0] if isinstance(e, str) else ""
        if not isinstance(e, str) or "=" not in e or not key or \
                not all(c.isalnum() or c == "_" for c in key):
            error(f"{where}: envs entry {e!r} is not \"NAME=value\" (mlx.launch ignores it); "
                  f"write e.g. \"MLX_METAL_FAST_SYNCH=1\"")
    remote = [i for i, h in enumerate(hosts)
              if isinstance(h, dict) and h.get("ssh") not in LOCAL_HOSTS]
    seen_ips: dict = {}
    ip_counts = set()
    for i, h in enumerate(hosts):
        if not isinstance(h, dict):
            error(f"{where}: host {i} is a {type(h).__name__}, not an object like "
                  f"{{\"ssh\": \"mac1.local\", \"ips\": [\"192.168.1.2\"]}}")
            continue
        ssh = h.get("ssh")
        label = f"host {i} ({ssh})" if isinstance(ssh, str) and ssh else f"host {i}"
        if not isinstance(ssh, str) or not ssh.strip():
            error(f"{where}: {label} has no \"ssh\" name; add the name or address mlx.launch "
                  f"should ssh to (127.0.0.1 for this machine)")
        for key in h:
            if key not in HOST_KEYS:
                hint = " (did you mean \"ips\"?)" if key in ("ip", "IPs", "addr", "address") else ""
                warn(f"{where}: {label} has a field {key!r} that mlx.launch ignores{hint}; it "
                     f"reads {', '.join(HOST_KEYS)}")
        ips = h.get("ips", [])
        if not isinstance(ips, list):
            error(f"{where}: {label}: \"ips\" must be a list like [\"192.168.1.2\"], got {ips!r}")
            continue
        if backend == "ring":
            ip_counts.add(len(ips))
            if not ips:
                error(f"{where}: {label} has no \"ips\": the ring backend connects to IP "
                      f"addresses, not names; add \"ips\": [\"<its address>\"] (on a Mac: "
                      f"ipconfig getifaddr en0, or the Thunderbolt Bridge address)")
        for ip in ips:
            if not is_ip(ip):
                error(f"{where}: {label}: {ip!r} in \"ips\" is not an IP address; the ring "
                      f"backend needs numeric addresses such as 192.168.1.2")
                continue
            if ipaddress.ip_address(ip).is_loopback and remote:
                first = hosts[remote[0]].get("ssh")
                error(f"{where}: {label} lists the loopback address {ip}, but host "
                      f"{remote[0]} ({first}) is another machine and cannot reach it there; "
                      f"use {label}'s LAN or Thunderbolt address")
            j = seen_ips.get(ip)
            if j is not None and hosts[j].get("ssh") != ssh:
                error(f"{where}: {label} and host {j} ({hosts[j].get('ssh')}) both list IP {ip}: "
                      f"two machines cannot have one address; give each its own")
            seen_ips.setdefault(ip, i)
        if ssh == "localhost" and backend == "ring":
            warn(f"{where}: {label}: mlx.launch starts only 127.0.0.1 without ssh; "
                 f"'localhost' goes through ssh (needs an ssh server and keys); write "
                 f"127.0.0.1 to start the rank locally")
    if backend in RDMA_BACKENDS:
        problems += check_rdma(hosts, backend, where)
    if backend == "ring" and len(ip_counts) > 1:
        error(f"{where}: hosts list different numbers of \"ips\" ({sorted(ip_counts)}); the ring "
              f"backend opens one connection per address to each neighbour, so every host "
              f"needs the same number")
    return problems


def rdma_peers(i: int, n: int, backend: str) -> list:
    """The hosts host i needs an RDMA device to, in the order `hostfile.py write --rdma`
    takes them: every other host for the jaccl mesh, the previous and the next for
    jaccl-ring (as mlx.launch checks)."""
    if backend == "jaccl-ring":  # the previous host, then the next (one for two hosts)
        return [p for p in dict.fromkeys([(i - 1) % n, (i + 1) % n]) if p != i]
    return [j for j in range(n) if j != i]


def check_rdma(hosts: list, backend: str, where: str = "the hostfile") -> list:
    """Problems with a jaccl / jaccl-ring hostfile's "rdma" lists and coordinator: each
    host's list has one entry per host, null for itself, a device name (or a list, one
    per cable) for each peer it needs, no device for two peers; rank 0 has an IP."""
    problems = []
    n = len(hosts)
    fix = (f"write it with python launch/hostfile.py write --backend {backend} --hosts ... "
           f"--ips ... --rdma ... (see 'Your cluster' in the README)")

    def error(msg):
        problems.append(Problem("error", f"{where}: {msg}"))

    def name(k):
        h = hosts[k]
        return f"host {k} ({h.get('ssh')})" if isinstance(h, dict) else f"host {k}"

    if isinstance(hosts[0], dict) and not hosts[0].get("ips"):
        error(f"{name(0)} has no \"ips\": the {backend} backend's coordinator is rank 0 at "
              f"its first IP, which every host must reach (e.g. its Ethernet address); add "
              f"\"ips\": [\"<its address>\"]")
    peer_kind = "neighbour" if backend == "jaccl-ring" else "other host"
    counts = {}
    for i, h in enumerate(hosts):
        if not isinstance(h, dict):
            continue
        rdma = h.get("rdma")
        if rdma is None:
            error(f"{name(i)} has no \"rdma\" list: the {backend} backend needs one entry "
                  f"per host, null for itself and the RDMA device (ibv_devices, e.g. "
                  f"rdma_en2) of the cable to each {peer_kind}; {fix}")
            continue
        if not isinstance(rdma, list) or len(rdma) != n:
            error(f"{name(i)}: \"rdma\" must be a list of {n} entries (one per host, in rank "
                  f"order), got {rdma!r}; {fix}")
            continue
        if rdma[i] is not None:
            error(f"{name(i)}: \"rdma\" entry {i} is {rdma[i]!r}, but a host's own entry must "
                  f"be null (no cable to itself)")
        used = {}
        for j in rdma_peers(i, n, backend):
            dev = rdma[j]
            if dev is None:
                error(f"{name(i)} lists no RDMA device for {name(j)} (\"rdma\" entry {j} is "
                      f"null), and the {backend} backend connects them: give the device of "
                      f"the cable from {name(i)} to {name(j)} (ibv_devices on "
                      f"{h.get('ssh')}); {fix}")
                continue
            devs = dev if isinstance(dev, list) else [dev]
            if not devs or not all(isinstance(d, str) and d.startswith(RDMA_PREFIX) and
                                   len(d) > len(RDMA_PREFIX) for d in devs):
                error(f"{name(i)}: {dev!r} (\"rdma\" entry {j}, for {name(j)}) is not an RDMA "
                      f"device name or a list of them: ibv_devices lists them as "
                      f"{RDMA_PREFIX}en2, {RDMA_PREFIX}en3, ...; write e.g. "
                      f"\"{RDMA_PREFIX}en2\"")
                continue
            if backend == "jaccl-ring" and len(devs) > RING_MAX_CABLES:
                error(f"{name(i)}: {len(devs)} devices for {name(j)}, but the jaccl ring uses "
                      f"at most {RING_MAX_CABLES} cables to a neighbour; list at most "
                      f"{RING_MAX_CABLES}")
            counts.setdefault(i, []).append(len(devs))
            for d in devs:
                if d in used and used[d] != j:
                    error(f"{name(i)} lists {d} for both {name(used[d])} and {name(j)}: one "
                          f"Thunderbolt port (one cable) joins one pair of hosts; give each "
                          f"peer the device of its own cable")
                used.setdefault(d, j)
    if backend == "jaccl-ring" and len({c for cs in counts.values() for c in cs}) > 1:
        problems.append(Problem("warning", f"{where}: hosts list different numbers of RDMA "
                                           f"devices per neighbour ({counts}); the jaccl ring "
                                           f"uses as many cables on each side of every host"))
    return problems


def check_ring_addresses(nodes, where: str = "MLX_HOSTFILE") -> list:
    """Problems with the ring backend's address list: [["ip:port", ...] per rank]."""
    problems = []
    if not isinstance(nodes, list) or not all(isinstance(n, list) and n for n in nodes):
        return [Problem("error", f"{where} must be a JSON list with one non-empty list of "
                                 f"\"ip:port\" strings per rank, e.g. [[\"10.0.0.1:32323\"], "
                                 f"[\"10.0.0.2:32324\"]]")]
    owner: dict = {}
    for r, addrs in enumerate(nodes):
        for a in addrs:
            ip, _, port = a.rpartition(":") if isinstance(a, str) else ("", "", "")
            if not is_ip(ip) or not port.isdigit() or not 0 < int(port) < 65536:
                problems.append(Problem("error", f"{where}: rank {r}'s address {a!r} is not "
                                                 f"\"ip:port\" (e.g. 10.0.0.1:32323)"))
                continue
            if a in owner:
                problems.append(Problem(
                    "error", f"{where}: ranks {owner[a]} and {r} both listen on {a}; every "
                             f"rank needs its own ip:port (mlx.launch numbers ports up from "
                             f"--starting-port; a hand-written list must do the same)"))
            owner.setdefault(a, r)
    if len({len(n) for n in nodes}) > 1:
        problems.append(Problem("error", f"{where}: ranks list different numbers of addresses; "
                                         f"the ring needs as many connections on every rank"))
    return problems


def ring_address_list(environ=None) -> Optional[list]:
    """The ring backend's per-rank "ip:port" lists (MLX_HOSTFILE, which mlx.launch
    writes), or None when it is unset or unreadable (check_start_env says why)."""
    path = (os.environ if environ is None else environ).get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def check_start_env():
    """At start on every rank: the ring's address list, if mlx.launch (or a user) set one."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return
    try:
        nodes = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PreflightError(f"MLX_HOSTFILE={path} cannot be read as JSON ({e}); it should "
                             f"list each rank's \"ip:port\" addresses (mlx.launch writes it)")
    errors = [p for p in check_ring_addresses(nodes, f"MLX_HOSTFILE ({path})")
              if p.level == "error"]
    if errors:
        raise PreflightError(errors[0].message)

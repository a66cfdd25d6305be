"""A cluster on one machine: N "hosts" made of Linux network namespaces, joined in a
ring of point-to-point links shaped like Thunderbolt, 10 Gb Ethernet or Wi-Fi, each
reachable over ssh, and a hostfile that mlx.launch runs across them as users do.

    from tests.netns_cluster import Cluster, unavailable_reason
    with Cluster(n=3, profile="wifi") as c:
        c.hostfile_path          # mlx.launch's JSON: {"backend": "ring", "hosts": [...]}
        c.hosts[1].address       # the hostfile's ips[1]: host 1's end of the link from host 0
        c.hosts[1].ssh           # its ssh name (alias in the cluster's ssh config)
        c.env                    # an environment for mlx.launch: `ssh` finds every host
        c.launch_cmd(port, "launch/run.py", ...)   # mlx.launch --hostfile ... --starting-port
        c.exec(1, ["ip", "addr"])                   # a command inside host 1's namespace
        c.link_down(1); c.link_up(1)                # its ring links (not its processes)
        c.measure_hop(0)         # TCP round trip and bandwidth from host 0 to host 1
    # gone: every sshd, every process in the namespaces, the wire, the namespaces

Layout (n >= 3; n == 2 has just the one link between the two):

    link L joins host L-1 (172.31.L.1/24) and host L (172.31.L.2/24), L = 0..n-1 mod n
    hostfile ips[i] = 172.31.i.2: host i's address on the link from host i-1, which is
    where mlx's ring backend has rank i-1 connect (rank i listens on ips[i])
    every host forwards, and routes every other host's addresses the short way round the
    ring to that host, so any host reaches any other (the liveness channel connects every
    pair of ranks at their ring IPs) and one host cut off does not cut the others apart
    management: a veth from the root namespace to each host, 10.X.Y.(4i+2)/30, unshaped
    (the Macs' LAN), carrying ssh only; X.Y is picked per run to avoid the root's routes

Links (`link=`): "veth" pairs, shaped by `tbf` for rate and `netem` for delay and loss
where the kernel has netem; otherwise ("wire", what "auto" picks for a delayed profile
on a kernel without netem) TUN pairs joined by tests/netns_wire.py, a process that holds
each packet for the one-way delay and drops a fraction, with `tbf` for rate. The wire
runs at real-time priority (SCHED_FIFO 1) so that it forwards before the ranks compute,
as a kernel would; NETNS_WIRE_REALTIME=0 runs it as an ordinary process.

Names come from a per-run id (namespaces `nsc-ID-hI`, interfaces `rIDlLa`, `mIDhI`), so
parallel runs never collide. Teardown (close(), `with`, launch/cluster_sim.py down) kills
everything inside the namespaces, the sshds and the wire, and deletes the namespaces,
even after a failure; a cluster whose owner died is swept by the next one that starts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests import netns_ssh
from tests.launcher import free_port_block
from tests.netns_cleanup import CMD_S, RUNS, run, stop, sweep_stale, teardown
from tests.netns_profiles import Profile, profile as find_profile

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "nsc"
RING_NET = "172.31.{link}.{end}"  # inside the namespaces only: no clash with the root's
MAX_HOSTS = 60  # a /30 per host in the run's management /24
WIRE_START_S = 10.0
LINK_UP_S = 10.0  # both ends of a link carrying again after link_up, at most
WIRE = Path(__file__).resolve().parent / "netns_wire.py"
PROBE = Path(__file__).resolve().parent / "netns_probe.py"


def unavailable_reason(profile_name="none", link: str = "auto", install: bool = True):
    """None when a cluster can be built here, else why not (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    for tool in ("ip", "tc", "unshare"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed (iproute2, util-linux)"
    probe = f"{PREFIX}-probe-{uuid.uuid4().hex[:6]}"
    p = run(["ip", "netns", "add", probe], check=False)
    if p.returncode != 0:
        return f"cannot create network namespaces here (needs root/CAP_SYS_ADMIN): " \
               f"{p.stderr.strip()}"
    run(["ip", "netns", "del", probe], check=False)
    prof = find_profile(profile_name)
    if _link_kind(prof, link) == "wire" and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "the kernel has no netem and /dev/net/tun is missing: no way to delay links"
    return netns_ssh.sshd_missing_reason(install)


_NETEM = None


def has_netem() -> bool:
    """Whether this kernel's tc has the netem qdisc (tried once, in a scratch namespace)."""
    global _NETEM
    if _NETEM is None:
        ns = f"{PREFIX}-netem-{uuid.uuid4().hex[:6]}"
        run(["ip", "netns", "add", ns])
        try:
            p = run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root",
                     "netem", "delay", "1ms"], check=False)
            _NETEM = p.returncode == 0
        finally:
            run(["ip", "netns", "del", ns], check=False)
    return _NETEM


def _link_kind(prof: Profile, link: str) -> str:
    if link not in ("auto", "veth", "wire"):
        raise ValueError(f"link must be auto, veth or wire, got {link!r}")
    if link != "auto":
        return link
    return "wire" if prof.needs_delay and not has_netem() else "veth"


@dataclass
class Host:
    """One simulated machine: what a test needs to reach it, and to cut it off."""

    index: int
    ssh: str  # ssh alias and host name: h{i}-{run id}
    netns: str
    address: str  # the hostfile's ips[i]
    mgmt: str  # management address, where its sshd listens
    ring_ifs: list  # its ring interfaces, in its namespace


class Cluster:
    """See the module docstring. `n` hosts (2..MAX_HOSTS), link `profile` (a name in
    tests/netns_profiles.PROFILES), `link` "auto" | "veth" | "wire"."""

    def __init__(self, n: int = 3, profile="none", link: str = "auto", owner: int | None = None,
                 keep: bool = False):
        """`owner`: the pid whose death lets the next cluster sweep this one (default this
        process; 0 for none: launch/cluster_sim.py up); `keep`: leave the run's folder
        (logs, keys) after close()."""
        if not isinstance(n, int) or not 2 <= n <= MAX_HOSTS:
            raise ValueError(f"a cluster has 2 to {MAX_HOSTS} hosts, got n={n!r}")
        self.n, self.profile = n, find_profile(profile)
        self.kind = _link_kind(self.profile, link)
        if self.kind == "veth" and self.profile.needs_delay and not has_netem():
            raise ValueError(f"profile {self.profile.name} needs delay or loss, which veth "
                             "links get from netem, and this kernel has no netem: use "
                             "link='wire' (or 'auto')")
        self.id = uuid.uuid4().hex[:6]
        self.dir = RUNS / self.id
        self.owner = os.getpid() if owner is None else (owner or None)
        self.hosts: list = []
        self.links: list = []  # (L, host a, if a, host b, if b)
        self.sshds: list = []
        self.wire = None
        self.mgmt_net = None
        self.hostfile_path = self.dir / "hostfile.json"
        self.ssh = None
        self.keep = keep
        self.final_wire_stats: list = []
        self.wire_exit, self.wire_log = None, ""  # how the wire ended (after close())

    # -- building ---------------------------------------------------------------------

    def start(self) -> "Cluster":
        sweep_stale()
        self.dir.mkdir(parents=True)
        try:
            self._namespaces()
            self._ring()
            self._management()
            self._routes()
            self._sshds()
            self._write_hostfile()
        except BaseException:
            self.close()
            raise
        return self

    def _namespaces(self):
        self.mgmt_net = _free_mgmt_net(self.id)
        net = ipaddress.ip_network(self.mgmt_net)
        for i in range(self.n):
            ns = f"{PREFIX}-{self.id}-h{i}"
            run(["ip", "netns", "add", ns])
            self.hosts.append(Host(i, f"h{i}-{self.id}", ns, "", str(net[4 * i + 2]), []))
            self._save()
            self.exec(i, ["ip", "link", "set", "lo", "up"], check=True)
            self.exec(i, ["sysctl", "-qw", "net.ipv4.ip_forward=1",
                          "net.ipv4.conf.all.rp_filter=0",
                          "net.ipv4.conf.default.rp_filter=0"], check=True)

    def _ring(self):
        n = self.n
        links = [1] if n == 2 else list(range(n))
        for L in links:
            a, b = (L - 1) % n, L
            ifa, ifb = f"r{self.id}l{L}a", f"r{self.id}l{L}b"
            self.links.append((L, a, ifa, b, ifb))
        for h in self.hosts:  # ips[i]: host i's end of the link from host i-1
            h.address = RING_NET.format(link=1, end=h.index + 1) if n == 2 \
                else RING_NET.format(link=h.index, end=2)
        if self.kind == "wire":
            self._start_wire()
        else:
            for L, a, ifa, b, ifb in self.links:
                run(["ip", "link", "add", ifa, "netns", self.hosts[a].netns, "type", "veth",
                     "peer", "name", ifb, "netns", self.hosts[b].netns])
        for L, a, ifa, b, ifb in self.links:
            for h, ifname, end in ((a, ifa, 1), (b, ifb, 2)):
                self.hosts[h].ring_ifs.append(ifname)
                self.exec(h, ["ip", "addr", "add", RING_NET.format(link=L, end=end) + "/24",
                              "dev", ifname], check=True)
                self.exec(h, ["ip", "link", "set", ifname, "mtu", str(self.profile.mtu), "up"],
                          check=True)
                self._shape(h, ifname)
        self._save()

    def _start_wire(self):
        spec = {"links": [{"a": [self.hosts[a].netns, ifa], "b": [self.hosts[b].netns, ifb]}
                          for L, a, ifa, b, ifb in self.links],
                "one_way_s": self.profile.one_way_s, "loss": self.profile.loss,
                "seed": int(self.id, 16), "parent": self.owner,
                "realtime": os.environ.get("NETNS_WIRE_REALTIME", "1") != "0",
                "stats": str(self.dir / "wire_stats.json")}
        (self.dir / "wire.json").write_text(json.dumps(spec))
        log = open(self.dir / "wire.log", "wb")
        self.wire = subprocess.Popen([sys.executable, str(WIRE), str(self.dir / "wire.json")],
                                     stdout=subprocess.PIPE, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._save()
        line = _read_line(self.wire, WIRE_START_S)
        if line.strip() != "ready":
            raise RuntimeError(f"the wire did not start: {line!r}; "
                               f"{(self.dir / 'wire.log').read_text()[-2000:]}")

    def _shape(self, h: int, ifname: str):
        """Rate (tbf) and, on veth links with netem, delay and loss: on this end's egress,
        so each direction is shaped once."""
        p = self.profile
        if self.kind == "veth" and p.needs_delay:
            cmd = ["tc", "qdisc", "replace", "dev", ifname, "root", "netem", "delay",
                   f"{p.one_way_s * 1e6:.0f}us", "limit", "100000"]
            if p.loss:
                cmd += ["loss", f"{p.loss * 100:g}%"]
            if p.rate_mbit:
                cmd += ["rate", f"{p.rate_mbit:g}mbit"]
            self.exec(h, cmd, check=True)
        elif p.rate_mbit:
            # burst: 4 ms of data (a 250 Hz tick) or a few packets, whichever is larger
            burst = max(int(p.rate_mbit * 1e6 / 8 / 250), 4 * p.mtu)
            self.exec(h, ["tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate",
                          f"{p.rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"],
                      check=True)

    def _management(self):
        self.ssh = netns_ssh.SshSetup(self.dir / "ssh", {h.ssh: h.mgmt for h in self.hosts})
        self.ssh.write()
        for h in self.hosts:
            root_if = f"m{self.id}h{h.index}"
            run(["ip", "link", "add", root_if, "type", "veth", "peer", "name", f"m{self.id}",
                 "netns", h.netns])
            root_addr = ipaddress.ip_address(h.mgmt) - 1
            run(["ip", "addr", "add", f"{root_addr}/30", "dev", root_if])
            run(["ip", "link", "set", root_if, "up"])
            self.exec(h.index, ["ip", "addr", "add", f"{h.mgmt}/30", "dev", f"m{self.id}"],
                      check=True)
            self.exec(h.index, ["ip", "link", "set", f"m{self.id}", "up"], check=True)

    def _routes(self):
        """Each address of every other host that is not on one of this host's own links,
        as a /32 towards its owner the short way round the ring (ties: clockwise): so
        host 0 reaches host 2's address on the link 1-2 straight over the link 2-0, and
        losing host 1 does not cut 0 from 2 (the liveness channel goes to ring IPs)."""
        n = self.n
        if n == 2:
            return
        for i in range(n):
            mine = {L for L, a, _, b, _ in self.links if i in (a, b)}
            for L, a, _, b, _ in self.links:
                if L in mine:
                    continue  # a subnet of its own: the kernel's route
                for owner, end in ((a, 1), (b, 2)):
                    clockwise = (owner - i) % n <= (i - owner) % n
                    via = RING_NET.format(link=(i + 1) % n, end=2) if clockwise \
                        else RING_NET.format(link=i, end=1)
                    self.exec(i, ["ip", "route", "replace", RING_NET.format(link=L, end=end),
                                  "via", via], check=True)

    def _sshds(self):
        for h in self.hosts:
            cfg = self.ssh.sshd_config(h.mgmt, h.ssh)
            log = self.dir / f"sshd_{h.ssh}.log"
            self.sshds.append(netns_ssh.start_sshd(h.netns, h.ssh, cfg, log))
            self._save()
        for h, proc in zip(self.hosts, self.sshds):
            netns_ssh.wait_listening(h.mgmt, proc, self.dir / f"sshd_{h.ssh}.log")

    def _write_hostfile(self):
        self.hostfile_path.write_text(json.dumps(self.hostfile, indent=2) + "\n")

    @property
    def hostfile(self) -> dict:
        return {"backend": "ring", "hosts": [{"ssh": h.ssh, "ips": [h.address]}
                                             for h in self.hosts]}

    @property
    def env(self) -> dict:
        """This process's environment with the cluster's `ssh` first on PATH."""
        return self.ssh.env()

    def launch_cmd(self, port: int, script, *args) -> list:
        """mlx.launch across the cluster, ring ports from `port` (pick one at random)."""
        return ["mlx.launch", "--hostfile", str(self.hostfile_path), "--starting-port",
                str(port), str(script), *map(str, args)]

    # -- using it ---------------------------------------------------------------------

    def exec(self, i: int, cmd, check: bool = False, timeout: float = CMD_S):
        """Run `cmd` (a list, or a string for sh -c) inside host i's namespace."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return run(["ip", "netns", "exec", self.hosts[i].netns, *argv], check=check,
                   timeout=timeout)

    def popen(self, i: int, cmd: list, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[i].netns, *cmd], **kw)

    def link_down(self, i: int):
        """Cut host i off the ring: its ring interfaces down (its processes run on)."""
        for ifname in self.hosts[i].ring_ifs:
            self.exec(i, ["ip", "link", "set", ifname, "down"], check=True)

    def link_up(self, i: int, within: float = LINK_UP_S):
        """Host i back on the ring: its interfaces up, then, once both ends of each of
        its links carry again, the routes the kernel dropped and the neighbour entries
        that failed meanwhile (else the first packets after are refused, EHOSTUNREACH)."""
        for ifname in self.hosts[i].ring_ifs:
            self.exec(i, ["ip", "link", "set", ifname, "up"], check=True)
        ends = [(h, ifname) for L, a, ifa, b, ifb in self.links if i in (a, b)
                for h, ifname in ((a, ifa), (b, ifb))]
        end = time.monotonic() + within
        while any("state DOWN" in self.exec(h, ["ip", "-o", "link", "show", ifname]).stdout
                  for h, ifname in ends):
            if time.monotonic() > end:
                raise RuntimeError(f"host {i}'s ring links did not come up within {within} s")
            time.sleep(0.05)
        for h, ifname in ends:
            self.exec(h, ["ip", "neigh", "flush", "dev", ifname])
        self._routes()

    def measure_hop(self, i: int, count: int = 200, size: int = 64, bulk_mb: float = 8.0,
                    timeout: float = 60) -> dict:
        """What the link from host i to host i+1 costs at the TCP level: the median and
        quantiles of `count` round trips of `size` bytes, and the bandwidth of one
        `bulk_mb` MB transfer (tests/netns_probe.py on both ends)."""
        j = (i + 1) % self.n
        port = free_port_block()
        server = self.popen(j, [sys.executable, str(PROBE), "serve", self.hosts[j].address,
                                str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            _read_line(server, 10)
            p = self.exec(i, [sys.executable, str(PROBE), "ping", self.hosts[j].address,
                              str(port), str(count), str(size), str(bulk_mb)], check=True,
                          timeout=timeout)
            lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
            if not lines:
                raise RuntimeError(f"the probe printed no result: stdout {p.stdout!r}, "
                                   f"stderr {p.stderr!r}")
            return json.loads(lines[-1])
        finally:
            stop(server)

    def wire_stats(self) -> list:
        """Per link direction: packets forwarded, dropped (loss), failed (link down);
        written by the wire when it stops (so: after close(), kept in
        `final_wire_stats`)."""
        path = self.dir / "wire_stats.json"
        return json.loads(path.read_text()) if path.exists() else []

    # -- teardown ---------------------------------------------------------------------

    def _save(self):
        state = {"id": self.id, "owner": self.owner, "dir": str(self.dir),
                 "namespaces": [h.netns for h in self.hosts],
                 "root_ifs": [f"m{self.id}h{h.index}" for h in self.hosts],
                 "pids": [p.pid for p in self.sshds] + ([self.wire.pid] if self.wire else []),
                 "hostfile": str(self.hostfile_path)}
        (self.dir / "state.json").write_text(json.dumps(state))

    def close(self):
        """Everything goes: processes in the namespaces, sshds, wire, namespaces, links."""
        for p in self.sshds:
            stop(p)
        teardown({"namespaces": [h.netns for h in self.hosts],
                  "root_ifs": [f"m{self.id}h{h.index}" for h in self.hosts], "pids": []})
        if self.wire is not None:
            stop(self.wire)
            self.wire_exit = self.wire.returncode
            self.wire = None
            log = self.dir / "wire.log"
            self.wire_log = log.read_text()[-2000:] if log.exists() else ""
        self.final_wire_stats = self.wire_stats() or self.final_wire_stats  # a 2nd close
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            (self.dir / "state.json").unlink(missing_ok=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc):
        self.close()


def _read_line(proc: subprocess.Popen, within: float) -> str:
    """The first line `proc` prints, waiting at most `within` s (raises otherwise)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(within):
            raise RuntimeError(f"{proc.args[:4]} printed nothing within {within} s")
        return proc.stdout.readline() if hasattr(proc.stdout, "encoding") \
            else proc.stdout.readline().decode()
    finally:
        sel.close()


def _free_mgmt_net(run_id: str) -> str:
    """A 10.X.Y.0/24 that no route or address of the root namespace overlaps."""
    taken = []
    for what in ("route", "addr"):
        p = run(["ip", "-4", "-o", what], check=False)
        for word in p.stdout.split():
            try:
                taken.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    rng = random.Random(run_id)
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(200, 255)}.{rng.randrange(256)}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return str(net)
    raise RuntimeError("no free 10.200-254.x.0/24 for the management links")

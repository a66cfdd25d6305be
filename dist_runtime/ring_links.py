"""The ring's links, measured: which to probe, how to start the probe on the hosts, what
the numbers mean, and how they are recorded for the planner.

The pipeline sends only to the next rank, so what matters is each hop i -> i+1 at the
hostfile's addresses, and the last host back to host 0. `survey` measures those one
after another (two probes at once would share a host's NIC and each other's time), with
dist_runtime/links.py started on both ends over the same ssh path `launch/hostfile.py
check` reaches the hosts by (or locally for 127.0.0.1). For n >= 3 hosts it measures
also the hops that would close a shorter ring (host k-1 back to host 0, k = 2..n-1),
which the planner needs to price the job on the first k hosts only.

A link's record (the hostfile's "links" list, written by `check --save`, and the
PIPELINE_LINKS environment variable mlx.launch passes on from the hostfile's "envs"):
    {"from": 0, "to": 1, "to_ip": "192.168.100.2", "rtt_s": 0.00031,
     "bytes_per_s": 2.9e9}
The planner takes a hop's latency as half its round trip, and its bandwidth as measured.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shlex
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

from dist_runtime.hostfiles import LOCAL_HOSTS, Problem, ring_address_list
from dist_runtime.partition import closing_hops, ring_hops

PROBE_SOURCE = Path(__file__).with_name("links.py")
ENV_NAME = "PIPELINE_LINKS"  # the hostfile's "envs" entry that carries the links to ranks
# A link is "far slower than the others" past these ratios to the ring's median link...
SLOW_RTT_RATIO, SLOW_BANDWIDTH_RATIO = 3.0, 1 / 3
SLOW_RTT_FLOOR = 0.5e-3  # ...and at least this much more round trip (s): jitter is not slow
# Slow for any pipeline whatever the others: Wi-Fi's round trips are milliseconds and its
# throughput tens of MB/s; cables (Ethernet, Thunderbolt) stay well under / above these.
WIFI_RTT, WIFI_BANDWIDTH = 2e-3, 60e6


def host_command(ssh_host: str, python: str, ssh: str, timeout: float, py_args: list) -> list:
    """argv that runs `python *py_args` on ssh_host: directly for 127.0.0.1/localhost-like
    names, else over ssh without a password prompt (BatchMode) and with a connect timeout."""
    if ssh_host in LOCAL_HOSTS:
        return [python, *py_args]
    remote = " ".join([python, *(shlex.quote(a) for a in py_args)])  # python: as given
    return [*shlex.split(ssh), "-o", "BatchMode=yes", "-o",
            f"ConnectTimeout={max(int(timeout), 1)}", ssh_host, remote]


def _read_line(proc, deadline: float) -> str:
    """The first line proc writes to stdout before `deadline` (monotonic), or ''."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return ""
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
    finally:
        sel.close()
    return buf.decode(errors="replace").split("\n")[0]


def _stop(proc, grace: float = 2.0) -> str:
    """End a probe process (it has its own deadline too); its stderr's last line."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    return (err.splitlines() or [""])[-1]


def measure_hop(src: dict, dst: dict, python: str, ssh: str, timeout: float,
                pings: int = 20, bulk_seconds: float = 0.25) -> dict:
    """Measure one hop: src and dst are {'ssh': name, 'ip': address}. The probe's result
    ({'rtt_s', 'bytes_per_s', ...}) or {'error': what failed, with the hosts named}."""
    code = PROBE_SOURCE.read_text()
    token = secrets.token_hex(16)
    deadline = time.monotonic() + timeout
    probe_s = max(timeout - 2, 1.0)  # the probes' own deadline: they end before we stop them
    server = subprocess.Popen(
        host_command(dst["ssh"], python, ssh, timeout,
                     ["-c", code, "serve", "--bind", dst["ip"], "--token", token,
                      "--deadline", f"{probe_s:.1f}"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = _read_line(server, deadline)
        try:
            port = json.loads(line)["port"]
        except (ValueError, KeyError, TypeError):
            why = (json.loads(line).get("error") if line.startswith("{") else None) or \
                _stop(server, 0.5) or "no answer"
            return {"error": f"could not start the probe's listener on {dst['ssh']} at "
                             f"{dst['ip']}: {why}"}
        host = f"[{dst['ip']}]" if ":" in dst["ip"] else dst["ip"]
        left = max(deadline - time.monotonic(), 1.0)
        try:
            client = subprocess.run(
                host_command(src["ssh"], python, ssh, left,
                             ["-c", code, "measure", "--to", f"{host}:{port}", "--token", token,
                              "--deadline", f"{max(left - 1, 0.5):.1f}", "--pings", str(pings),
                              "--bulk-seconds", str(bulk_seconds)]),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=left + 2)
        except subprocess.TimeoutExpired:
            return {"error": f"the probe from {src['ssh']} to {dst['ip']} did not finish "
                             f"within {timeout:g} s"}
        lines = [ln for ln in client.stdout.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if lines else {
            "error": (client.stderr.strip().splitlines() or [f"exit {client.returncode}"])[-1]}
        if "error" in result:
            result["error"] = f"from {src['ssh']} to {dst['ssh']} at {dst['ip']}: " \
                              f"{result['error']}"
        return result
    finally:
        if server.poll() is None:
            _stop(server)
        else:
            _stop(server, 0.1)


def survey(hosts: list, python: str, ssh: str, timeout: float) -> list:
    """Measure the ring's hops and the hops closing shorter rings, one at a time. `hosts`:
    the hostfile's entries ({'ssh', 'ips'}). One record per hop, 'error' where it failed."""
    n = len(hosts)
    ends = [{"ssh": h["ssh"], "ip": (h.get("ips") or [None])[0]} for h in hosts]
    out = []
    for kind, hops in (("ring", ring_hops(n)), ("closing", closing_hops(n))):
        for i, j in hops:
            res = measure_hop(ends[i], ends[j], python, ssh, timeout)
            rec = {"from": i, "to": j, "to_ip": ends[j]["ip"], "kind": kind}
            if "error" in res:
                rec["error"] = res["error"]
            else:
                rec |= {k: res[k] for k in ("rtt_s", "rtt_min_s", "rtt_max_s",
                                            "bytes_per_s", "bulk_bytes")}
            out.append(rec)
    return out


def fmt_rate(bytes_per_s: float) -> str:
    """2.9e9 -> '2.90 GB/s (23.2 Gbit/s)'."""
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:.2f} {unit} ({bytes_per_s * 8 / 1e9:.3g} Gbit/s)"
    return f"{bytes_per_s:.0f} B/s"


def describe(rec: dict, names: list) -> str:
    """'link 0 -> 1 (a -> b at 10.0.0.2): round trip 0.31 ms (0.28..0.52), 2.90 GB/s ...'."""
    label = (f"link {rec['from']} -> {rec['to']} ({names[rec['from']]} -> {names[rec['to']]}"
             f" at {rec['to_ip']})")
    if rec.get("kind") == "closing":
        label += f", closes a ring of the first {rec['from'] + 1} hosts"
    if "error" in rec:
        return f"{label}: FAILED"
    return (f"{label}: round trip {rec['rtt_s'] * 1e3:.3g} ms (median; "
            f"{rec['rtt_min_s'] * 1e3:.3g}..{rec['rtt_max_s'] * 1e3:.3g}), "
            f"{fmt_rate(rec['bytes_per_s'])}")


def link_problems(records: list, names: list) -> list:
    """Findings about measured links: a failed probe is an error (the ring would not
    connect either, for a ring hop); a ring hop far slower than the others, or as slow as
    Wi-Fi, is a warning with the likely cause and the fix."""
    problems = []
    ring = [r for r in records if r.get("kind", "ring") == "ring" and "error" not in r]
    for r in records:
        if "error" in r:
            level = "error" if r.get("kind", "ring") == "ring" else "warning"
            what = ("the ring backend connects along it" if level == "error" else
                    "fewer hosts cannot be priced")
            problems.append(Problem(level, f"link {r['from']} -> {r['to']} ({names[r['from']]}"
                                           f" -> {names[r['to']]} at {r['to_ip']}): "
                                           f"{r['error']}; {what}"))
    if not ring:
        return problems
    med_rtt = statistics.median(r["rtt_s"] for r in ring)
    med_bw = statistics.median(r["bytes_per_s"] for r in ring)
    for r in ring:
        label = (f"link {r['from']} -> {r['to']} ({names[r['from']]} -> {names[r['to']]} at "
                 f"{r['to_ip']})")
        nums = f"round trip {r['rtt_s'] * 1e3:.3g} ms, {fmt_rate(r['bytes_per_s'])}"
        slow_rtt = r["rtt_s"] > SLOW_RTT_RATIO * med_rtt and \
            r["rtt_s"] - med_rtt > SLOW_RTT_FLOOR
        slow_bw = r["bytes_per_s"] < SLOW_BANDWIDTH_RATIO * med_bw
        wifi = r["rtt_s"] > WIFI_RTT or r["bytes_per_s"] < WIFI_BANDWIDTH
        if len(ring) > 1 and (slow_rtt or slow_bw):
            problems.append(Problem("warning", (
                f"{label} is far slower than the ring's other links ({nums}; their median "
                f"{med_rtt * 1e3:.3g} ms, {fmt_rate(med_bw)}): every token crosses it. Does "
                f"{r['to_ip']} route over Wi-Fi or a slower network? Put the host's "
                f"Thunderbolt or Ethernet address in \"ips\", or check that link's cable")))
        elif wifi:
            problems.append(Problem("warning", (
                f"{label} is slow for a pipeline ({nums}; a cable gives well under "
                f"{WIFI_RTT * 1e3:g} ms and over {fmt_rate(WIFI_BANDWIDTH)}): every token "
                f"crosses it; if {r['to_ip']} is a Wi-Fi address, use the host's Thunderbolt "
                f"or Ethernet address in \"ips\"")))
    return problems


def compact(records: list) -> list:
    """The records as saved: only what the planner reads, rounded."""
    return [{"from": r["from"], "to": r["to"], "to_ip": r["to_ip"],
             "rtt_s": float(f"{r['rtt_s']:.4g}"),
             "bytes_per_s": float(f"{r['bytes_per_s']:.4g}")}
            for r in records if "error" not in r]


def hop_table(records) -> dict:
    """{(from, to): (latency_s, bytes_per_s)} from link records: latency is half the round
    trip. Raises ValueError on a record that is not one."""
    if not isinstance(records, list):
        raise ValueError("links must be a list of {\"from\", \"to\", \"rtt_s\", "
                         "\"bytes_per_s\"} records")
    table = {}
    for r in records:
        try:
            i, j, rtt, bw = int(r["from"]), int(r["to"]), float(r["rtt_s"]), \
                float(r["bytes_per_s"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"link record {r!r} lacks from/to/rtt_s/bytes_per_s numbers")
        if not (rtt >= 0 and bw > 0):
            raise ValueError(f"link record {r!r}: rtt_s must be >= 0 and bytes_per_s > 0")
        table[(i, j)] = (rtt / 2, bw)
    return table


def env_entry(records: list) -> str:
    """The hostfile's "envs" entry that hands the links to every rank (mlx.launch sets the
    hostfile's envs on each rank)."""
    return f"{ENV_NAME}={json.dumps(compact(records), separators=(',', ':'))}"


def ring_ips_from_env(environ=None) -> Optional[list]:
    """Each rank's first ring IP from MLX_HOSTFILE (the ring backend's address list that
    mlx.launch writes), or None."""
    nodes = ring_address_list(environ)
    try:
        return [n[0].rpartition(":")[0].strip("[]") for n in nodes] if nodes else None
    except (TypeError, IndexError, AttributeError):
        return None


def advice_at_start(costs, infos: list, max_kv_tokens: int, limits, max_batch: int,
                    environ=None, kept: int = 0) -> list:
    """What rank 0 says at start about the links (PIPELINE_LINKS, from the hostfile's envs
    once `check --save` recorded them): the advice on fewer hosts, or why the recorded
    links were ignored; [] without recorded links (the job plans as it always did)."""
    from dist_runtime.planning import host_count_advice

    environ = os.environ if environ is None else environ
    if not environ.get(ENV_NAME):
        return []
    fix = "measure again with python launch/hostfile.py check --save"
    try:
        records = json.loads(environ[ENV_NAME])
        hops = hop_table(records)
    except ValueError as e:
        return [f"{ENV_NAME} (from the hostfile's envs) is unreadable ({e}); the plan ignores "
                f"the links; {fix}"]
    ips = ring_ips_from_env(environ)
    for r in records:
        if ips and r["to"] < len(ips) and r.get("to_ip") not in (None, ips[r["to"]]):
            return [f"{ENV_NAME} was measured for other addresses (link {r['from']} -> "
                    f"{r['to']} went to {r.get('to_ip')}, rank {r['to']} listens on "
                    f"{ips[r['to']]}); the plan ignores the links; {fix}"]

    def keep(k):
        ip_text = ",".join(ips[:k]) if ips else "<their ips>"
        return (f"keep only the hostfile's first {k} entries ("
                f"{', '.join(i.name for i in infos[:k])}), e.g. python launch/hostfile.py "
                f"write --hosts <their ssh names> --ips {ip_text} -o hostfiles/fewer.json")

    advice = host_count_advice(costs, infos, hops, max_kv_tokens, limits, max_batch, keep,
                               kept=kept)
    return [advice] if advice else []

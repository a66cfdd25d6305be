#!/usr/bin/env python3
"""Write an mlx.launch hostfile, or check one before a long load.

    python launch/hostfile.py write --hosts mac1.local,mac2.local \
        --ips 192.168.100.1,192.168.100.2 -o hostfiles/macs.json
    python launch/hostfile.py check hostfiles/macs.json

`check` validates the file (dist_runtime/preflight.py: JSON, ssh names, IPs for the ring
backend, no address on two machines, no loopback next to remote hosts), then reaches
every host, over ssh or locally for 127.0.0.1/localhost, with a deadline per host, and
runs a small Python snippet there: free and total memory, mlx version (and whether it
imports), Python version, the host's own addresses (is the hostfile's IP really there?)
and whether this project is at the same path (mlx.launch runs the same path on every
host). Exit status 0 when nothing is wrong, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dist_runtime.hostfiles import (LOCAL_HOSTS, Problem, check_hostfile_data,  # noqa: E402
                                    is_ip, load_hostfile)
from dist_runtime.planning import fmt_bytes  # noqa: E402

HOST_TIMEOUT = 20.0  # s per host: ssh, start Python, import mlx

# Runs on each host: `python -c SNIPPET PROJECT_ROOT`; prints one JSON line.
SNIPPET = r"""
import json, os, platform, socket, sys
out = {"hostname": socket.gethostname(), "python": platform.python_version(),
       "platform": platform.platform()}
try:
    import psutil
    vm = psutil.virtual_memory()
    out["available"], out["total"] = vm.available, vm.total
    out["addresses"] = sorted({a.address.split("%")[0] for addrs in psutil.net_if_addrs().values()
                               for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)})
except Exception as e:
    out["psutil_error"] = f"{type(e).__name__}: {e}"
    try:
        out["total"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
try:
    import mlx.core as mx
    out["mlx"] = mx.__version__
except Exception as e:
    out["mlx_error"] = f"{type(e).__name__}: {e}"
root = sys.argv[1] if len(sys.argv) > 1 else ""
out["project"] = bool(root) and os.path.isfile(os.path.join(root, "launch", "run.py"))
print(json.dumps(out))
"""


def build_hostfile(hosts: list, ips=None, backend: str = "ring", envs=None) -> dict:
    """The hostfile for `hosts` (ssh names), with `ips` (one per host) or the hosts' own
    names where those are IP addresses already. Raises ValueError with the fix."""
    if not hosts or any(not h.strip() for h in hosts):
        raise ValueError("--hosts needs comma-separated ssh names or addresses, e.g. "
                         "mac1.local,mac2.local (no empty entries)")
    if ips is not None and len(ips) != len(hosts):
        raise ValueError(f"--hosts has {len(hosts)} entries but --ips has {len(ips)}; give one "
                         f"IP per host, in the same order")
    entries = []
    for i, h in enumerate(hosts):
        host_ips = [ips[i]] if ips is not None else ([h] if is_ip(h) else [])
        if backend == "ring" and not host_ips:
            raise ValueError(f"host {i} ({h}) is a name, and the ring backend needs IP "
                             f"addresses: pass --ips with one address per host (on a Mac: "
                             f"ipconfig getifaddr en0, or the Thunderbolt Bridge address)")
        entry = {"ssh": h}
        if host_ips:
            entry["ips"] = host_ips
        entries.append(entry)
    return {"backend": backend, "envs": list(envs or []), "hosts": entries}


def probe(ssh_host: str, python: str, ssh: str, timeout: float) -> dict:
    """Run SNIPPET on one host: {'ok': bool, 'facts': {...}} or {'ok': False, 'error': str}."""
    local = ssh_host in LOCAL_HOSTS
    remote_cmd = f"{python} -c {shlex.quote(SNIPPET)} {shlex.quote(str(ROOT))}"
    if local:
        cmd = [python, "-c", SNIPPET, str(ROOT)]
    else:
        cmd = [*shlex.split(ssh), "-o", "BatchMode=yes", "-o",
               f"ConnectTimeout={max(int(timeout), 1)}", ssh_host, remote_cmd]
    how = "locally" if local else f"over ssh ({ssh} {ssh_host})"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not answer within {timeout:g} s when reached {how}: "
                                      f"is the host asleep, the name wrong, or ssh asking for "
                                      f"a password? (raise --timeout if it is just slow)"}
    except FileNotFoundError as e:
        return {"ok": False, "error": f"cannot run {e.filename!r}: install it, or pass --python/"
                                      f"--ssh"}
    last = (p.stderr.strip().splitlines() or [""])[-1]
    if p.returncode == 255 and not local:
        return {"ok": False, "error": f"cannot ssh to {ssh_host} ({last or 'ssh failed'}): make "
                                      f"`ssh {ssh_host}` work without a password (ssh-copy-id "
                                      f"{ssh_host}) and check the name"}
    if p.returncode == 127:
        return {"ok": False, "error": f"{python} not found on {ssh_host} ({last}): install Python "
                                      f"there or pass --python"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"ok": False, "error": f"the check failed on {ssh_host} (exit {p.returncode}): "
                                      f"{last or p.stdout.strip()[-200:]}"}
    return {"ok": True, "facts": json.loads(lines[-1])}


def check_hosts(data: dict, python: str, ssh: str, timeout: float) -> tuple:
    """({ssh name: probe result}, problems) for every distinct host of a parsed hostfile."""
    hosts = data["hosts"] if isinstance(data, dict) else data
    ranks: dict = {}
    for i, h in enumerate(hosts):
        if isinstance(h, dict) and isinstance(h.get("ssh"), str) and h["ssh"].strip():
            ranks.setdefault(h["ssh"], []).append(i)
    results: dict = {}

    def run(name):
        results[name] = probe(name, python, ssh, timeout)

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    problems = []
    versions: dict = {}
    pythons: dict = {}
    for name, rs in ranks.items():
        label = f"host {','.join(map(str, rs))} ({name})"
        res = results.get(name) or {"ok": False, "error": "no answer"}
        if not res["ok"]:
            problems.append(Problem("error", f"{label}: {res['error']}"))
            continue
        f = res["facts"]
        if "mlx_error" in f:
            problems.append(Problem("error", f"{label}: mlx does not import ({f['mlx_error']}); "
                                             f"pip install mlx (on Linux: pip install "
                                             f"'mlx[cpu]' or 'mlx[cuda13]')"))
        else:
            versions.setdefault(f["mlx"], []).append(label)
        pythons.setdefault(".".join(f["python"].split(".")[:2]), []).append(label)
        if "psutil_error" in f:
            problems.append(Problem("error", f"{label}: psutil does not import "
                                             f"({f['psutil_error']}); the runtime needs it to "
                                             f"plan by memory: pip install psutil"))
        if not f.get("project"):
            problems.append(Problem("error", f"{label}: no {ROOT}/launch/run.py there; mlx.launch "
                                             f"runs the same path on every host: clone the "
                                             f"project at {ROOT}"))
        addrs = set(f.get("addresses") or [])
        for i in rs:
            for ip in (hosts[i].get("ips") or []):
                if addrs and ip not in addrs:
                    problems.append(Problem(
                        "error", f"{label}: the hostfile gives it IP {ip}, but its interfaces "
                                 f"have {', '.join(sorted(addrs))}; the ring backend listens on "
                                 f"that address, so fix the \"ips\" entry"))
    if len(versions) > 1:
        problems.append(Problem("error", "mlx versions differ: " + "; ".join(
            f"{v} on {', '.join(ls)}" for v, ls in versions.items()) +
            "; install the same version everywhere"))
    if len(pythons) > 1:
        problems.append(Problem("warning", "Python versions differ: " + "; ".join(
            f"{v} on {', '.join(ls)}" for v, ls in pythons.items())))
    return results, problems


def describe_host(name: str, ranks: list, res: dict) -> str:
    """One report line for a host."""
    label = f"host {','.join(map(str, ranks))} {name}"
    if not res["ok"]:
        return f"{label}: FAILED"
    f = res["facts"]
    mem = (f"{fmt_bytes(f['available'])} free of {fmt_bytes(f['total'])}" if "available" in f
           else f"{fmt_bytes(f['total'])} total" if "total" in f else "memory unknown")
    return (f"{label} ({f['hostname']}): {mem}, mlx {f.get('mlx', 'missing')}, "
            f"Python {f['python']}, {f['platform']}")


def cmd_write(args) -> int:
    hosts = args.hosts.split(",")
    ips = args.ips.split(",") if args.ips else None
    try:
        data = build_hostfile(hosts, ips, args.backend, args.env)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    problems = check_hostfile_data(data, "the new hostfile")
    for p in problems:
        print(p, file=sys.stderr)
    if any(p.level == "error" for p in problems):
        return 1
    text = json.dumps(data, indent=2) + "\n"
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out} ({len(hosts)} hosts, rank 0 = {hosts[0]}); check it with: "
              f"python launch/hostfile.py check {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_check(args) -> int:
    data, problems = load_hostfile(args.hostfile)
    results = {}
    if data is not None and not any("\"hosts\"" in p.message and p.level == "error"
                                    for p in problems):
        results, more = check_hosts(data, args.python, args.ssh, args.timeout)
        problems += more
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list):  # refused above ("hosts" must be a non-empty list)
        hosts = []
    ranks: dict = {}
    for i, h in enumerate(hosts):
        if isinstance(h, dict) and h.get("ssh") in results:
            ranks.setdefault(h["ssh"], []).append(i)
    errors = [p for p in problems if p.level == "error"]
    if args.json:
        print(json.dumps({"ok": not errors, "hosts": results,
                          "problems": [p.__dict__ for p in problems]}))
    else:
        for name, res in results.items():
            print(describe_host(name, ranks.get(name, []), res))
        for p in problems:
            print(p)
        total = sum(r["facts"].get("available", 0) for r in results.values() if r["ok"])
        if results:
            print(f"{'OK' if not errors else 'PROBLEMS'}: "
                  f"{sum(r['ok'] for r in results.values())}/{len(results)} host(s) answered, "
                  f"{fmt_bytes(total)} free in all, {len(errors)} error(s)")
    return 1 if errors else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a hostfile from a list of hosts")
    w.add_argument("--hosts", required=True, help="ssh names, rank 0 first: a,b,c")
    w.add_argument("--ips", help="one IP per host, same order (needed for names with ring)")
    w.add_argument("--backend", default="ring", choices=["ring", "mpi", "nccl", "jaccl",
                                                          "jaccl-ring"])
    w.add_argument("--env", action="append", default=[], help="NAME=value for every rank")
    w.add_argument("-o", "--output", help="file to write (default: stdout)")
    c = sub.add_parser("check", help="validate a hostfile and reach every host in it")
    c.add_argument("hostfile")
    c.add_argument("--timeout", type=float, default=HOST_TIMEOUT, help="seconds per host")
    c.add_argument("--python", default="python3", help="Python to run on the hosts")
    c.add_argument("--ssh", default="ssh", help="ssh command, e.g. 'ssh -p 2222'")
    c.add_argument("--json", action="store_true", help="print one JSON report")
    args = p.parse_args(argv)
    return cmd_write(args) if args.cmd == "write" else cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())

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
host). On a Mac also the chip, macOS version, RAM, what Metal keeps resident (its
recommended working set) and the GPU wired limit (`iogpu.wired_limit_mb`), with a
warning where macOS is too old for the hostfile's backend (jaccl needs 26.2) or to keep
weights resident (15). Then (launch/ring_check.py) it measures each link along the
ring with a probe started on both hosts (round trip, bandwidth; a warning for a link
far slower than the others, or as slow as Wi-Fi), checks a jaccl hostfile's RDMA devices
against each Mac's ibv_devices, with `--model` plans the model over the measured links
(advising fewer hosts where they would be clearly faster), and with `--save` records the
links in the hostfile for the jobs. Exit status 0 when nothing is wrong, 1 otherwise.

`write --backend jaccl|jaccl-ring --rdma ...` writes the RDMA backends' device lists.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dist_runtime.hostfiles import (RDMA_BACKENDS, Problem,  # noqa: E402
                                    check_hostfile_data, is_ip, load_hostfile, rdma_peers)
from dist_runtime.hostfiles import LOCAL_HOSTS  # noqa: E402
from dist_runtime.planning import fmt_bytes, parse_memory_limits  # noqa: E402
from launch import ring_check  # noqa: E402
from dist_runtime.ring_links import host_command  # noqa: E402

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # dist_runtime/source.py's DTYPES (no mlx here)
HOST_TIMEOUT = 20.0  # s per host: ssh, start Python, import mlx
GIB, MIB = 2**30, 2**20
# mlx's jaccl backends run on RDMA over Thunderbolt 5, which macOS has from 26.2 (Apple's
# TN3205); mx.set_wired_limit keeps buffers resident from macOS 15 (its docs).
RDMA_MACOS = (26, 2)
WIRED_MACOS = (15, 0)

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
    if mx.metal.is_available():
        d = (getattr(mx, "device_info", None) or mx.metal.device_info)()
        out["gpu"] = d.get("device_name", "")
        out["working_set"] = d.get("max_recommended_working_set_size")
except Exception as e:
    out["mlx_error"] = f"{type(e).__name__}: {e}"
if platform.system() == "Darwin":
    import subprocess
    def sysctl(name):
        try:
            p = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                               timeout=5, stdin=subprocess.DEVNULL)
        except Exception:
            return ""
        return p.stdout.strip() if p.returncode == 0 else ""
    out["macos"] = platform.mac_ver()[0]
    out["chip"] = sysctl("machdep.cpu.brand_string")
    out["ram"] = sysctl("hw.memsize")
    out["wired_limit_mb"] = sysctl("iogpu.wired_limit_mb")
import shutil
if shutil.which("ibv_devices"):  # RDMA over Thunderbolt enabled (macOS 26.2+): its devices
    import subprocess
    try:
        p = subprocess.run(["ibv_devices"], capture_output=True, text=True, timeout=5,
                           stdin=subprocess.DEVNULL)
        out["rdma_devices"] = [w for w in p.stdout.split() if w.startswith("rdma_")]
    except Exception as e:
        out["rdma_error"] = f"{type(e).__name__}: {e}"
root = sys.argv[1] if len(sys.argv) > 1 else ""
out["project"] = bool(root) and os.path.isfile(os.path.join(root, "launch", "run.py"))
print(json.dumps(out))
"""


def rdma_matrix(per_host: list, backend: str) -> list:
    """Each host's "rdma" list from --rdma values, one per host in rank order: the devices
    of the cables to its peers, comma-separated, in rank order (jaccl: every other host;
    jaccl-ring: the previous host, then the next; one for two hosts), '+' between the
    devices of several cables to one peer. Raises ValueError with the fix."""
    n = len(per_host)
    out = []
    for i, text in enumerate(per_host):
        peers = rdma_peers(i, n, backend)
        names = [d.strip() for d in text.split(",")]
        if len(names) != len(peers):
            order = ("the previous host, then the next" if backend == "jaccl-ring" and n > 2
                     else "one per other host, in rank order")
            raise ValueError(f"--rdma for host {i} is {text!r}: {len(names)} device(s), but "
                             f"{backend} needs {len(peers)} ({order}), e.g. --rdma "
                             f"{','.join(f'rdma_en{k + 2}' for k in range(len(peers)))}")
        row = [None] * n
        for j, name in zip(peers, names):
            devs = [d for d in name.split("+") if d]
            row[j] = devs[0] if len(devs) == 1 else devs
        out.append(row)
    return out


def build_hostfile(hosts: list, ips=None, backend: str = "ring", envs=None,
                   rdma=None) -> dict:
    """The hostfile for `hosts` (ssh names), with `ips` (one per host) or the hosts' own
    names where those are IP addresses already; for jaccl backends `rdma`, one --rdma
    value per host (rdma_matrix). Raises ValueError with the fix."""
    if not hosts or any(not h.strip() for h in hosts):
        raise ValueError("--hosts needs comma-separated ssh names or addresses, e.g. "
                         "mac1.local,mac2.local (no empty entries)")
    if ips is not None and len(ips) != len(hosts):
        raise ValueError(f"--hosts has {len(hosts)} entries but --ips has {len(ips)}; give one "
                         f"IP per host, in the same order")
    if backend in RDMA_BACKENDS:
        if not rdma or len(rdma) != len(hosts):
            raise ValueError(f"the {backend} backend needs --rdma once per host, in rank "
                             f"order ({len(hosts)} hosts, {len(rdma or [])} given): the RDMA "
                             f"devices (ibv_devices on that host, e.g. rdma_en2) of its "
                             f"cables to " + ("the previous and the next host" if backend ==
                                              "jaccl-ring" else "every other host"))
        rdma = rdma_matrix(rdma, backend)
    elif rdma:
        raise ValueError(f"--rdma is for the jaccl and jaccl-ring backends, not {backend}; "
                         f"pass --backend jaccl (every pair of hosts cabled) or jaccl-ring "
                         f"(each host cabled to the next)")
    entries = []
    for i, h in enumerate(hosts):
        host_ips = [ips[i]] if ips is not None else ([h] if is_ip(h) else [])
        if not host_ips and (backend == "ring" or (backend in RDMA_BACKENDS and i == 0)):
            need = ("the ring backend needs IP addresses" if backend == "ring" else
                    f"the {backend} backend's coordinator is rank 0 at its IP")
            raise ValueError(f"host {i} ({h}) is a name, and {need}: pass --ips with one "
                             f"address per host (on a Mac: ipconfig getifaddr en0, or the "
                             f"Thunderbolt Bridge address)")
        entry = {"ssh": h}
        if host_ips:
            entry["ips"] = host_ips
        if rdma:
            entry["rdma"] = rdma[i]
        entries.append(entry)
    return {"backend": backend, "envs": list(envs or []), "hosts": entries}


def probe(ssh_host: str, python: str, ssh: str, timeout: float) -> dict:
    """Run SNIPPET on one host: {'ok': bool, 'facts': {...}} or {'ok': False, 'error': str}."""
    local = ssh_host in LOCAL_HOSTS
    cmd = host_command(ssh_host, python, ssh, timeout, ["-c", SNIPPET, str(ROOT)])
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


def macos_version(text) -> tuple:
    """'15.3.1' -> (15, 3, 1); () when unknown."""
    parts = str(text or "").split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()


def mac_facts(f: dict):
    """A Mac's facts from SNIPPET's output: chip, macOS, RAM, what Metal keeps resident and
    the GPU wired limit (None where unknown); None for a host that is no Mac."""
    if "macos" not in f:
        return None

    def num(v):
        return int(v) if isinstance(v, int) or (isinstance(v, str) and v.isdigit()) else None

    return {"chip": f.get("chip") or f.get("gpu") or None, "macos": f.get("macos") or None,
            "ram": num(f.get("ram")) or num(f.get("total")),
            "working_set": num(f.get("working_set")),
            "wired_limit_mb": num(f.get("wired_limit_mb"))}


def describe_mac(m: dict) -> str:
    """'Apple M2 Ultra, macOS 15.3.1, 206.16 GB (192 GiB) RAM; Metal keeps ... resident;
    ...' for the report."""
    parts = [m["chip"] or "unknown chip", f"macOS {m['macos'] or 'unknown'}"]
    ram = m["ram"]
    parts.append(f"{fmt_bytes(ram)} ({ram / GIB:.0f} GiB) RAM" if ram else "RAM unknown")
    text = ", ".join(parts)
    ws = m["working_set"]
    if ws:
        share = f", {ws / ram:.0%} of RAM" if ram else ""
        text += (f"; Metal keeps up to {fmt_bytes(ws)} ({ws // MIB} MiB{share}) resident "
                 f"(recommended working set)")
    else:
        text += "; Metal's recommended working set unknown (mlx not on Metal)"
    mb = m["wired_limit_mb"]
    text += ("; GPU wired limit: iogpu.wired_limit_mb=0, the macOS default" if mb == 0 else
             f"; GPU wired limit: iogpu.wired_limit_mb={mb}" if mb is not None else
             "; GPU wired limit unknown (no iogpu.wired_limit_mb)")
    return text


def mac_problems(label: str, m: dict, backend: str) -> list:
    """What a Mac's macOS means for this hostfile: a warning below 26.2 with a jaccl
    backend (RDMA), a note below 26.2 otherwise, a warning below 15 (nothing is wired)."""
    v = macos_version(m["macos"])
    if not v:
        return []
    out = []
    if v < RDMA_MACOS:
        need = ".".join(map(str, RDMA_MACOS))
        if backend in RDMA_BACKENDS:
            out.append(Problem("warning", f"{label} runs macOS {m['macos']}, but the hostfile's "
                                          f"{backend} backend needs RDMA over Thunderbolt 5, "
                                          f"which macOS has from {need} (on Macs with "
                                          f"Thunderbolt 5): update macOS there, or use the "
                                          f"ring backend"))
        else:
            out.append(Problem("note", f"{label} runs macOS {m['macos']}: mlx's RDMA backends "
                                       f"(jaccl, jaccl-ring) would need macOS {need} or newer; "
                                       f"the {backend} backend works"))
    if v < WIRED_MACOS:
        out.append(Problem("warning", f"{label} runs macOS {m['macos']}: before macOS 15 mlx "
                                      f"cannot keep a stage's weights resident (no Metal "
                                      f"residency sets), so they may page out and decode "
                                      f"slower; update macOS there"))
    return out


def check_hosts(data: dict, python: str, ssh: str, timeout: float) -> tuple:
    """({ssh name: probe result}, problems) for every distinct host of a parsed hostfile."""
    hosts = data["hosts"] if isinstance(data, dict) else data
    backend = (data.get("backend") if isinstance(data, dict) else None) or "ring"
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
        mac = mac_facts(f)
        if mac is not None:
            res["mac"] = mac
            problems += mac_problems(label, mac, backend)
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
    line = (f"{label} ({f['hostname']}): {mem}, mlx {f.get('mlx', 'missing')}, "
            f"Python {f['python']}, {f['platform']}")
    mac = res.get("mac") or mac_facts(f)
    return line + (f"\n    {describe_mac(mac)}" if mac is not None else "")


def cmd_write(args) -> int:
    hosts = args.hosts.split(",")
    ips = args.ips.split(",") if args.ips else None
    try:
        data = build_hostfile(hosts, ips, args.backend, args.env, args.rdma)
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
    reachable = data is not None and not any("\"hosts\"" in p.message and p.level == "error"
                                             for p in problems)
    if reachable:
        results, more = check_hosts(data, args.python, args.ssh, args.timeout)
        problems += more
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list):  # refused above ("hosts" must be a non-empty list)
        hosts = []
    ranks: dict = {}
    for i, h in enumerate(hosts):
        if isinstance(h, dict) and h.get("ssh") in results:
            ranks.setdefault(h["ssh"], []).append(i)
    records, link_lines, plan_lines, plan_json, notes = [], [], [], None, []
    answered = reachable and all(r["ok"] for r in results.values()) and \
        all(isinstance(h, dict) and h.get("ssh") in results for h in hosts)
    if answered:
        data = data if isinstance(data, dict) else {"hosts": hosts}
        problems += ring_check.rdma_device_problems(data, results)
        problems += ring_check.saved_links_problems(data)
        why_not = "links not measured (--no-links)" if args.no_links else \
            ring_check.can_measure(data)
        if why_not:
            notes.append(Problem("note", why_not))
        else:
            records, more, link_lines = ring_check.measure_links(
                data, [h["ssh"] for h in hosts], args.python, args.ssh, args.timeout)
            problems += more
        if args.model:
            plan_lines, more, plan_json = ring_check.plan_report(data, results, records, args)
            problems += more
    problems += notes
    errors = [p for p in problems if p.level == "error"]
    if args.save:
        if records and not any("error" in r for r in records):
            print(ring_check.save_links(args.hostfile, records), file=sys.stderr)
        else:
            print("error: --save: no complete set of measured links to save (see above)",
                  file=sys.stderr)
            errors.append(Problem("error", "--save had nothing to save"))
    if args.json:
        print(json.dumps({"ok": not errors, "hosts": results, "links": records,
                          "plan": plan_json, "problems": [p.__dict__ for p in problems]}))
    else:
        for name, res in results.items():
            print(describe_host(name, ranks.get(name, []), res))
        for line in link_lines + plan_lines:
            print(line)
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
    w.add_argument("--rdma", action="append", metavar="DEV[,DEV...]",
                   help="jaccl/jaccl-ring: once per host, in rank order, the RDMA devices "
                   "(ibv_devices) of its cables to its peers in rank order (jaccl: every "
                   "other host; jaccl-ring: the previous host, then the next), e.g. "
                   "rdma_en2,rdma_en3; '+' joins several cables to one peer")
    w.add_argument("-o", "--output", help="file to write (default: stdout)")
    c = sub.add_parser("check", help="validate a hostfile and reach every host in it")
    c.add_argument("hostfile")
    c.add_argument("--timeout", type=float, default=HOST_TIMEOUT, help="seconds per host")
    c.add_argument("--python", default="python3", help="Python to run on the hosts")
    c.add_argument("--ssh", default="ssh", help="ssh command, e.g. 'ssh -p 2222'")
    c.add_argument("--json", action="store_true", help="print one JSON report")
    c.add_argument("--no-links", action="store_true",
                   help="do not measure the links along the ring")
    c.add_argument("--save", action="store_true",
                   help="record the measured links in the hostfile (\"links\", and an envs "
                   "entry the ranks read) so jobs plan with them")
    c.add_argument("--model", help="also plan this model on these hosts (as run.py's "
                   "--model), over the measured links")
    c.add_argument("--synthetic", metavar="PRESET", help="with --model: a synthetic preset")
    c.add_argument("--dtype", choices=list(DTYPE_NAMES), default="float32",
                   help="with --synthetic: its dtype")
    c.add_argument("--bits", type=int, choices=[4, 8], help="with --synthetic: quantized")
    c.add_argument("--max-kv-tokens", type=int, default=4096)
    c.add_argument("--max-batch", type=int, default=1)
    c.add_argument("--memory-limit", type=parse_memory_limits, metavar="GB[,GB...]")
    args = p.parse_args(argv)
    return cmd_write(args) if args.cmd == "write" else cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())

"""`launch/hostfile.py check`'s second half: the ring's links, the plan over them, the
RDMA devices the hostfile names, and `--save`.

Kept apart from hostfile.py (which reaches the hosts and reports their facts) because it
works on what that gathered: the links are measured along the ring once every host
answered (dist_runtime/ring_links.py), the plan is made from the hosts' reported memory
exactly as a job would make it (dist_runtime/planning.py), and the plan's line says what
a decode step would cost over the measured links, with a warning when fewer hosts would
be clearly faster. `--save` writes the links into the hostfile twice over: a "links" list
(for people and for this tool) and an "envs" entry PIPELINE_LINKS (mlx.launch sets the
hostfile's envs on every rank, which is how a job started with plain mlx.launch learns
them); mlx.launch reads only "backend", "envs" and "hosts", so the file stays its.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dist_runtime.hostfiles import RDMA_BACKENDS, Problem
from dist_runtime.partition import PlanError
from dist_runtime.planning import (counts_text, fmt_bytes, host_count_advice, make_plan,
                                   step_estimates)
from dist_runtime.ring_links import (ENV_NAME, compact, describe, env_entry, hop_table,
                                     link_problems, survey)


def can_measure(data: dict) -> Optional[str]:
    """None when the ring's links can be probed, else why not (a note)."""
    hosts = data["hosts"]
    backend = data.get("backend") or "ring"
    if backend in RDMA_BACKENDS:
        return (f"links not measured: the {backend} backend sends over RDMA (Thunderbolt 5), "
                f"which a TCP probe cannot measure")
    if len(hosts) < 2:
        return "links not measured: one host has no links"
    if not all(h.get("ips") for h in hosts):
        return "links not measured: not every host lists an IP in \"ips\""
    return None


def measure_links(data: dict, names: list, python: str, ssh: str, timeout: float) -> tuple:
    """(records, problems, report lines) for the ring's links."""
    records = survey(data["hosts"], python, ssh, timeout)
    return records, link_problems(records, names), [describe(r, names) for r in records]


def rdma_device_problems(data: dict, results: dict) -> list:
    """Each RDMA device the hostfile names, looked up in that host's ibv_devices (where the
    host reported them)."""
    problems = []
    for i, h in enumerate(data["hosts"]):
        res = results.get(h.get("ssh")) or {}
        facts = res.get("facts") or {}
        if not isinstance(h.get("rdma"), list) or "rdma_devices" not in facts:
            if isinstance(h.get("rdma"), list) and res.get("ok") and "macos" in facts:
                problems.append(Problem("error", (
                    f"host {i} ({h['ssh']}): ibv_devices is not there, so RDMA over "
                    f"Thunderbolt is not enabled: on macOS 26.2 or newer, start in Recovery, "
                    f"run rdma_ctl enable in its Terminal, and restart (Apple's TN3205)")))
            continue
        have = set(facts["rdma_devices"])
        for j, dev in enumerate(h["rdma"]):
            for d in (dev if isinstance(dev, list) else [dev] if dev else []):
                if d not in have:
                    problems.append(Problem("error", (
                        f"host {i} ({h['ssh']}) lists {d} for host {j}, but its ibv_devices "
                        f"shows {', '.join(sorted(have)) or 'none'}: give the device of the "
                        f"port that cable is in (an empty list: RDMA is not enabled there; "
                        f"rdma_ctl enable in Recovery)")))
    return problems


def host_infos(data: dict, results: dict) -> Optional[list]:
    """Every rank's HostInfo, as a job would gather it, from the hosts' reported facts;
    None when some host did not answer or reported no free memory."""
    from dist_runtime.cluster import HostInfo  # mlx: only where a plan is asked for

    infos = []
    for r, h in enumerate(data["hosts"]):
        res = results.get(h.get("ssh")) or {}
        f = res.get("facts") or {}
        if not res.get("ok") or "available" not in f:
            return None
        mac = res.get("mac") or {}
        ws = mac.get("working_set") or 0
        wired = mac.get("wired_limit_mb")
        infos.append(HostInfo(r, h["ssh"], int(f["available"]), f.get("mlx", ""), "",
                              f["python"], bool(ws), int(mac.get("ram") or f.get("total") or 0),
                              int(ws), -1 if wired is None else wired))
    return infos


def model_costs(args):
    """The model's per-layer costs, from its config and headers only (no weights read)."""
    from dist_runtime.source import Source

    return Source(args.model, args.synthetic, 0, args.dtype, args.bits).costs()


def write_command(data: dict, k: int, hostfile: str) -> str:
    """The hostfile.py write line that keeps the first k hosts."""
    hosts = data["hosts"][:k]
    out = Path(hostfile).with_name(f"{Path(hostfile).stem}-{k}.json")
    cmd = (f"python launch/hostfile.py write --hosts {','.join(h['ssh'] for h in hosts)} "
           f"--ips {','.join(h['ips'][0] for h in hosts)}")
    backend = data.get("backend") or "ring"
    if backend != "ring":
        cmd += f" --backend {backend}"
    return f"{cmd} -o {out}"


def plan_report(data: dict, results: dict, records: list, args) -> tuple:
    """(lines, problems, json) for the plan of args.model on these hosts: the split, and
    with measured links a decode step's cost and the advice on fewer hosts."""
    infos = host_infos(data, results)
    if infos is None:
        return [], [Problem("note", "plan not made: not every host reported its memory")], None
    costs = model_costs(args)
    try:
        plan = make_plan(costs, infos, args.max_kv_tokens, None, args.memory_limit,
                         args.max_batch)
    except PlanError as e:
        return [], [Problem("error", f"plan: {e}")], {"error": str(e)}
    split = counts_text(len(r) for r in plan.ranges)
    out = {"split": split, "ranges": plan.describe()}
    line = (f"plan: {args.model}{' (' + args.synthetic + ')' if args.synthetic else ''} on "
            f"{len(infos)} host(s): --split {split} "
            f"({fmt_bytes(sum(costs.weight) + costs.head)} of weights)")
    problems = []
    hops = hop_table(compact(records)) if records else None
    if hops:
        est = step_estimates(costs, infos, hops, args.max_kv_tokens, args.memory_limit,
                             args.max_batch)
        out["step_s"] = [None if e is None else {"compute": e[0], "network": e[1]}
                         for e in est]
        if est[-1] is not None:
            c, n, _ = est[-1]
            line += (f"; a decode step of {args.max_batch} sequence(s) about "
                     f"{(c + n) * 1e3:.3g} ms ({c * 1e3:.3g} ms reading weights at the "
                     f"assumed rate, {n * 1e3:.3g} ms in {len(infos)} hops)")
        kept = {}

        def fix(k):
            kept["k"] = k
            return f"{write_command(data, k, args.hostfile)} keeps the first {k} hosts"

        advice = host_count_advice(costs, infos, hops, args.max_kv_tokens, args.memory_limit,
                                   args.max_batch, fix=fix, est=est)
        if advice:
            out["fewer_hosts"] = kept["k"]
            problems.append(Problem("warning", advice))
    elif len(infos) > 1:
        line += "; links not measured, so the plan is by memory and compute only"
    return [line], problems, out


def save_links(path: str, records: list) -> str:
    """Write the measured links into the hostfile at `path` ("links" and the envs entry),
    keeping everything else as it is; the line to report."""
    data = json.loads(Path(path).read_text())
    data["links"] = compact(records)
    envs = [e for e in data.get("envs", []) if not str(e).startswith(ENV_NAME + "=")]
    data["envs"] = envs + [env_entry(records)]
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    return (f"saved {len(data['links'])} link(s) into {path} (\"links\", and the envs entry "
            f"{ENV_NAME} that mlx.launch passes to every rank for the plan)")


def saved_links_problems(data: dict) -> list:
    """A saved "links" list that no longer matches the hostfile (or its envs entry)."""
    saved = data.get("links") if isinstance(data, dict) else None
    if saved is None:
        return []
    fix = "measure again with python launch/hostfile.py check --save"
    try:
        hop_table(saved)
    except ValueError as e:
        return [Problem("warning", f"\"links\": {e}; {fix}")]
    hosts = data["hosts"]
    for r in saved:
        j = r["to"]
        ip = (hosts[j].get("ips") or [None])[0] if 0 <= j < len(hosts) else None
        if r.get("to_ip") != ip:
            return [Problem("warning", f"\"links\" were measured for another hostfile (link "
                                       f"{r['from']} -> {j} went to {r.get('to_ip')}, host "
                                       f"{j} now lists {ip}); {fix}")]
    if f"{ENV_NAME}=" + json.dumps(saved, separators=(",", ":")) not in data.get("envs", []):
        return [Problem("warning", f"\"links\" and the envs entry {ENV_NAME} differ (the "
                                   f"ranks read the envs entry); {fix}")]
    return []

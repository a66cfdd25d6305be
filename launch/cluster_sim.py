#!/usr/bin/env python3
"""A cluster on this machine, by hand: N hosts in network namespaces, a ring of shaped
links, an sshd on each, and the hostfile to run mlx.launch across them (as root, on
Linux; the harness is tests/netns_cluster.py, whose docstring says how it is built).

    python3 launch/cluster_sim.py up --hosts 3 --profile thunderbolt-tcp
        # prints the id, the hostfile and the PATH that makes `ssh` find the hosts
    PATH=/tmp/netns-cluster/ID/ssh/bin:$PATH mlx.launch --hostfile /tmp/netns-cluster/ID/hostfile.json \
        --starting-port 41000 launch/run.py --model glm4_moe --synthetic tiny --prompt hi
    python3 launch/cluster_sim.py down ID          # or: down --all
    python3 launch/cluster_sim.py list

    # build, run one command, tear down ({hostfile} is replaced by the hostfile's path);
    # exits with the command's status
    python3 launch/cluster_sim.py run --hosts 2 --profile wifi -- \
        mlx.launch --hostfile {hostfile} --starting-port 41000 launch/pingpong.py --width 256

    # what each link costs at the TCP level (round trip, bandwidth), then tear down
    python3 launch/cluster_sim.py measure --hosts 3 --profile ethernet-10g

Profiles: thunderbolt-tcp, ethernet-10g, wifi, none (tests/netns_profiles.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import netns_cleanup, netns_cluster  # noqa: E402
from tests.netns_profiles import PROFILES  # noqa: E402

RUN_TIMEOUT_S = 3600  # `run`'s command, at most


def build(args) -> netns_cluster.Cluster:
    reason = netns_cluster.unavailable_reason(args.profile, args.link)
    if reason:
        sys.exit(f"cluster_sim: cannot build a cluster here: {reason}")
    try:
        return netns_cluster.Cluster(args.hosts, args.profile, args.link,
                                     owner=0 if args.command == "up" else None)
    except ValueError as e:
        sys.exit(f"cluster_sim: {e}")


def describe(c: netns_cluster.Cluster) -> str:
    lines = [f"cluster {c.id}: {c.n} hosts, {c.profile.describe()}, {c.kind} links",
             f"hostfile: {c.hostfile_path}", json.dumps(c.hostfile, indent=2)]
    for h in c.hosts:
        lines.append(f"host {h.index}: ssh {h.ssh} ({h.mgmt}), ring address {h.address}, "
                     f"namespace {h.netns}")
    lines.append(f"ssh: PATH={c.ssh.bin}:$PATH  (or ssh -F {c.ssh.config} HOST)")
    return "\n".join(lines)


def cmd_up(args) -> int:
    c = build(args).start()
    print(describe(c))
    print(f"tear down with: python3 {sys.argv[0]} down {c.id}")
    return 0


def cmd_down(args) -> int:
    if args.all:
        ids = [p.parent.name for p in netns_cleanup.RUNS.glob("*/state.json")]
    elif args.id:
        ids = [args.id]
    else:
        sys.exit("cluster_sim down: give a cluster id (see `list`) or --all")
    status = 0
    for run_id in ids:
        if netns_cleanup.down(run_id):
            print(f"cluster {run_id}: torn down")
        else:
            print(f"cluster {run_id}: no such cluster under {netns_cleanup.RUNS} "
                  "(see `list`)", file=sys.stderr)
            status = 1
    return status


def cmd_list(args) -> int:
    for p in sorted(netns_cleanup.RUNS.glob("*/state.json")):
        state = json.loads(p.read_text())
        owner = state.get("owner") or "none (by hand)"
        print(f"{state['id']}: {len(state['namespaces'])} hosts, owner {owner}, "
              f"hostfile {state['hostfile']}")
    return 0


def cmd_run(args) -> int:
    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        sys.exit("cluster_sim run: give the command after --, e.g. "
                 "run --hosts 2 -- mlx.launch --hostfile {hostfile} ...")
    with build(args) as c:
        print(describe(c), file=sys.stderr, flush=True)
        command = [a.replace("{hostfile}", str(c.hostfile_path)) for a in command]
        env = dict(c.env, CLUSTER_HOSTFILE=str(c.hostfile_path))
        try:
            return subprocess.run(command, env=env, timeout=RUN_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            print(f"cluster_sim: the command ran over {RUN_TIMEOUT_S} s", file=sys.stderr)
            return 124


def cmd_measure(args) -> int:
    with build(args) as c:
        print(describe(c).splitlines()[0])
        for i in range(c.n if c.n > 2 else 1):
            m = c.measure_hop(i, count=args.count)
            print(f"link host {i} -> host {(i + 1) % c.n}: round trip median "
                  f"{m['rtt_ms_median']:.3f} ms (p10 {m['rtt_ms_p10']:.3f}, p90 "
                  f"{m['rtt_ms_p90']:.3f}; nominal {c.profile.rtt_ms:g}), bandwidth "
                  f"{m['bandwidth_mbit']:.0f} Mbit/s (nominal "
                  f"{c.profile.rate_mbit or 'unshaped'})")
            print(json.dumps(m))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("up", "run", "measure"):
        s = sub.add_parser(name)
        s.add_argument("--hosts", type=int, default=3, help="how many hosts (2 or more)")
        s.add_argument("--profile", default="thunderbolt-tcp", choices=sorted(PROFILES),
                       help="what the ring links cost")
        s.add_argument("--link", default="auto", choices=["auto", "veth", "wire"],
                       help="veth (+netem) or the user-space wire; auto: wire where the "
                       "profile needs delay and the kernel has no netem")
        if name == "run":
            s.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
        if name == "measure":
            s.add_argument("--count", type=int, default=200, help="round trips per link")
    d = sub.add_parser("down")
    d.add_argument("id", nargs="?")
    d.add_argument("--all", action="store_true", help="every cluster under " +
                   str(netns_cleanup.RUNS))
    sub.add_parser("list")
    args = p.parse_args(argv)
    return {"up": cmd_up, "down": cmd_down, "list": cmd_list, "run": cmd_run,
            "measure": cmd_measure}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""Jobs across a cluster of network namespaces, started the way users start them.

Each test builds hosts with tests/netns_cluster.py (a ring of shaped point-to-point
links, an sshd per host, a management link from here) and runs `mlx.launch --hostfile`
over ssh, as on a user's Macs: the ranks run in their hosts' namespaces with their own
addresses and host names, their ring traffic crosses the shaped links, and the liveness
channel connects each pair of ranks across the ring. The reference is one process
(no ssh, no ring) on the same synthetic weights: the tokens must be the same, the first
logits within tolerance.

Skipped, with the reason, where namespaces cannot be made (not root, not Linux) or
OpenSSH's sshd is missing and cannot be installed.
"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from dist_runtime.faults import CONFIRM_S, EXIT_PEER_LOST
from tests.launcher import ROOT, Job, free_port_block, launch
from tests.live import LiveJob, alive
from tests import netns_cluster, netns_ssh
from tests.netns_cluster import Cluster, unavailable_reason

MODEL = ["--model", "glm4_moe", "--synthetic", "tiny", "--split", "1,2,1"]
# A prompt of a few chunks, so prefill crosses every link several times.
PROMPT = "The pipeline passes hidden states from host to host until the coordinator samples."
GEN = ["--prompt", PROMPT, "--prefill-chunk", "8", "--max-tokens", "12", "--ignore-eos",
       "--json", "--dump-logits", "--timeout", "30"]
LOGIT_TOL = 1e-4
JOB_S = 120  # one whole job across the cluster, at most (~4 s on an idle 2-core VM)
HEARTBEAT = 3  # --heartbeat-timeout: a cut-off rank is named within seconds
RING_TIMEOUT = 6  # --timeout for the link-down test
DECODE = ["--prompt", "x", "--max-tokens", "3000", "--ignore-eos"]  # far longer than the test


@pytest.fixture(scope="module")
def reference():
    """One process, no ssh: the tokens and first logits every cluster must reproduce."""
    job = launch(1, [*MODEL[:4], *GEN])
    assert job.summary, job.stderr
    return job.summary


def cluster(n, profile, **kw) -> Cluster:
    reason = unavailable_reason(profile, kw.get("link", "auto"))
    if reason:
        pytest.skip(f"no cluster of network namespaces here: {reason}")
    return Cluster(n, profile, **kw)


def run_across(c: Cluster, args: list, tmp_path) -> Job:
    """launch/run.py across the cluster under mlx.launch, on ring ports of its own.
    Over `ssh -tt` a rank's stderr comes back on its terminal, so on mlx.launch's stdout,
    where the ranks' chunks can split each other's lines: the rank lines are looked for
    anywhere in both streams, and rank 0's summary is read from --json-out (the hosts
    share this machine's files)."""
    port = free_port_block()
    out = tmp_path / f"summary-{port}.json"
    p = subprocess.run(c.launch_cmd(port, ROOT / "launch/run.py", *args, "--json-out", out),
                       env=c.env, cwd=ROOT, capture_output=True, text=True, timeout=JOB_S,
                       stdin=subprocess.DEVNULL)
    job = Job("", p.stdout + "\n" + p.stderr)
    job.summary = json.loads(out.read_text()) if out.exists() else None
    return job


class SshJob(LiveJob):
    """A LiveJob whose ranks run over ssh: their lines arrive on stdout too (see above)."""

    @property
    def stderr(self) -> str:
        with self._lock:
            return "\n".join(t for _, _, t in self.lines)


def check_same_as_one_process(job: Job, c: Cluster, ref: dict):
    assert job.summary is not None, f"rank 0 printed no summary:\n{job.stderr}"
    assert not job.errors, job.errors
    assert job.finished == set(range(c.n)), f"finished: {job.finished}\n{job.stderr}"
    # Each rank ran on its own host, reached over ssh (the host name is the sshd's).
    assert [p["host"] for p in job.summary["plan"]] == [h.ssh for h in c.hosts], job.summary
    assert job.summary["tokens"] == ref["tokens"]
    a, b = np.array(job.summary["first_logits"]), np.array(ref["first_logits"])
    assert np.abs(a - b).max() <= LOGIT_TOL


@pytest.mark.timeout(180)
def test_three_hosts_over_ssh_give_the_tokens_of_one_process(reference, tmp_path):
    """Thunderbolt-like links: the same tokens, and the ring's traffic went over the
    shaped links (the wire forwarded it) rather than some other way."""
    c = cluster(3, "thunderbolt-tcp")
    with c:
        job = run_across(c, [*MODEL, *GEN], tmp_path)
        check_same_as_one_process(job, c, reference)
    if c.kind == "wire":
        per_link = {}
        for row in c.final_wire_stats:
            per_link[row["link"]] = per_link.get(row["link"], 0) + row["bytes"]
        # every link carried at least the prompt's hidden states ([1, 8, 64] float32 per
        # chunk and hop, the tiny preset) besides heartbeats
        assert len(per_link) == 3 and min(per_link.values()) > 8 * 64 * 4, \
            f"{per_link}; the wire exited {c.wire_exit}: {c.wire_log}"


@pytest.mark.timeout(180)
def test_wifi_links_slow_and_lossy_still_give_the_same_tokens(reference, tmp_path):
    """6 ms round trips and 0.1% loss: slower, the same tokens. The link's measured round
    trip shows the shaping was in force."""
    c = cluster(3, "wifi")
    with c:
        hop = c.measure_hop(0, count=20, bulk_mb=1)
        assert hop["rtt_ms_median"] >= c.profile.rtt_ms, hop
        t = time.monotonic()
        job = run_across(c, [*MODEL, *GEN], tmp_path)
        took = time.monotonic() - t
        check_same_as_one_process(job, c, reference)
    print(f"wifi: hop {hop['rtt_ms_median']} ms, job {took:.1f} s, wire {c.final_wire_stats}")


@pytest.mark.timeout(120)
def test_a_host_cut_off_the_ring_is_named_by_the_others():
    """Host 1's ring links go down mid-decode (its process runs on, its sockets stay
    open): ranks 0 and 2, which still reach each other over the link 2-0, name rank 1
    within the heartbeat deadline, and no other; every rank exits, none hangs."""
    c = cluster(3, "none")  # veth links, unshaped
    args = [*MODEL, *DECODE, "--timeout", str(RING_TIMEOUT), "--heartbeat-timeout",
            str(HEARTBEAT)]
    with c, SshJob(3, args, env=c.env, hostfile=c.hostfile_path) as job:
        pids = job.wait_stages(60)
        job.wait_for(lambda: len(job.stdout) > 20, 30, "generated text")
        c.link_down(1)
        job.signalled_at = time.monotonic() - job.t0
        assert alive(pids[1])
        exits = job.wait_exits([0, 1, 2], HEARTBEAT + CONFIRM_S + 20)
        assert set(exits) == {0, 1, 2}, f"exited: {exits}\n{job.report()}"
        assert max(exits[0], exits[2]) <= HEARTBEAT + CONFIRM_S + 5, exits
        job.wait(15)
        # Who is heard: once one rank exits with an error mlx.launch kills the others'
        # ssh clients, and what those ranks print after is lost (on 127.0.0.1 it signals
        # the ranks themselves and their last lines come through). Rank 1 hears no one
        # and holds its verdict (dist_runtime/liveness.py, CUT_OFF_GRACE_S), so rank 0 or
        # rank 2, or both, name it first; no rank blames another (before the hold, rank
        # 1 often spoke first and named rank 0, the only line the user saw).
        host = c.hosts[1].ssh
        said = {r: job.errors.get(r, []) for r in (0, 2)}
        assert any(f"rank 1 ({host}) stopped answering" in e for r in (0, 2) for e in said[r]), \
            f"neither rank 0 nor rank 2 named rank 1:\n{job.report()}"
        wrong = [e for r in (0, 1, 2) for e in job.errors.get(r, []) if "stopped answering"
                 in e and not e.startswith(f"rank 1 ({host})")]
        assert not wrong, f"blamed another rank: {wrong}\n{job.report()}"
        # mlx.launch (0.32.4) reports no exit code for a remote rank it tried to kill:
        # over `ssh -tt` the pidfile name it reads ends in '\r', its kill script fails
        # and the rank's thread dies with CalledProcessError. So: every code it did
        # report is "lost another rank".
        codes = job.exit_codes
        assert codes and set(codes.values()) == {EXIT_PEER_LOST}, f"{codes}\n{job.report()}"
        assert not job.finished
        print("host 1 cut off: exits after", exits, "rank 1 said", job.errors.get(1))


@pytest.mark.parametrize("link", ["veth", "wire"])
def test_the_cluster_is_laid_out_as_documented_and_leaves_nothing(link):
    """The hostfile's addresses are each host's end of the link from the previous host;
    any host reaches any other; a cut host is unreachable and reachable again after
    link_up; after close() no namespace, interface or process of the run is left."""
    c = cluster(3, "none", link=link)
    with c:
        ips = [h["ips"][0] for h in c.hostfile["hosts"]]
        assert ips == ["172.31.0.2", "172.31.1.2", "172.31.2.2"]
        probe = "import socket,sys; s=socket.socket(); s.settimeout(2); " \
                "print(s.connect_ex((sys.argv[1], 9)))"

        def reach(i, addr):  # 111: refused, so routed there; else unreachable or timed out
            return c.exec(i, [sys.executable, "-c", probe, addr]).stdout.strip() == "111"
        assert all(reach(i, h.address) for i in range(3) for h in c.hosts if h.index != i)
        c.link_down(1)
        assert not reach(0, c.hosts[1].address) and reach(0, c.hosts[2].address)
        c.link_up(1)
        assert reach(0, c.hosts[1].address) and reach(2, c.hosts[1].address)
        namespaces = [h.netns for h in c.hosts]
        sshd_pids = [p.pid for p in c.sshds]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces), listed
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert c.id not in links, links
    assert not any(alive(p) for p in sshd_pids)
    assert not c.dir.exists()
    if link == "wire":
        assert c.wire is None and c.final_wire_stats, \
            f"the wire wrote no stats; it exited {c.wire_exit}: {c.wire_log}"


def test_bad_input_is_refused_with_the_value():
    with pytest.raises(ValueError, match="unknown link profile 'adsl'"):
        Cluster(3, "adsl")
    with pytest.raises(ValueError, match="2 to .* hosts, got n=1"):
        Cluster(1)


def test_without_namespaces_or_sshd_the_reason_is_given(monkeypatch):
    """What the tests skip with where namespaces are not allowed or sshd is missing."""
    real_run = netns_cluster.run

    def refused(cmd, check=True, timeout=30):
        if cmd[:3] == ["ip", "netns", "add"]:
            return subprocess.CompletedProcess(cmd, 1, "", "mount --make-shared /run/netns "
                                               "failed: Operation not permitted")
        return real_run(cmd, check, timeout)
    monkeypatch.setattr(netns_cluster, "run", refused)
    reason = unavailable_reason("wifi")
    assert "cannot create network namespaces" in reason and "not permitted" in reason
    monkeypatch.setattr(netns_ssh, "SSHD", "/nonexistent/sshd")
    assert "/nonexistent/sshd is not installed (apt-get install openssh-server)" in \
        netns_ssh.sshd_missing_reason(install=False)
    monkeypatch.setattr(netns_ssh.os, "geteuid", lambda: 1000)
    assert "cannot be installed here (needs root" in netns_ssh.sshd_missing_reason()

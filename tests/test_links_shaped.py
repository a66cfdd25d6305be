"""`hostfile.py check` on shaped links: three "hosts" in network namespaces, reached over
ssh (tests/netns_cluster.py), their ring shaped like Wi-Fi or 10 Gb Ethernet.

The reference is the profile each link was shaped to (its round trip and rate,
tests/netns_profiles.py): what check measures must agree with it, on Wi-Fi it must warn
about every link and advise fewer hosts (the model fits one), on Ethernet neither. On
Wi-Fi the saved links then reach a job started by mlx.launch over ssh, whose rank 0
gives the same advice. Skipped with the harness's reason where namespaces cannot be made.
"""

import json
import subprocess

import pytest

from tests.launcher import ROOT, free_port_block, hostfile_tool
from tests.test_netns_cluster import cluster
from tests.netns_profiles import PROFILES



def check(c, *args):
    p = hostfile_tool("check", c.hostfile_path, "--json", "--model", "glm4_moe", "--synthetic",
                      "small", *args, timeout=180, env=c.env)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout), p.stderr


def shaped(name):
    """(the profile, a 3-host cluster shaped to it), or a skip with the harness's reason."""
    return PROFILES[name], cluster(3, name)


def tcp_ceiling(prof) -> float:
    """Bytes/s one TCP flow can reach on the profile: its rate, or less where its loss
    limits the window (Mathis et al.: MSS / RTT * 1.22 / sqrt(loss)); Wi-Fi's 0.1% loss
    at 6 ms caps a flow near 9 MB/s, under its 25 MB/s rate."""
    rate = prof.rate_mbit * 1e6 / 8
    if not prof.loss:
        return rate
    return min(rate, (prof.mtu - 52) / (prof.rtt_ms / 1e3) * 1.22 / prof.loss ** 0.5)


def ring_links(report):
    return [r for r in report["links"] if r["kind"] == "ring"]


@pytest.mark.timeout(300)
def test_wifi_links_are_measured_warned_about_and_fewer_hosts_advised():
    prof, cluster = shaped("wifi")
    with cluster as c:
        report, err = check(c, "--save")
        links = ring_links(report)
        assert [(r["from"], r["to"]) for r in links] == [(0, 1), (1, 2), (2, 0)]
        for r in links:  # the shaping, seen by the probe (the wire adds under 2 ms)
            assert prof.rtt_ms / 1e3 <= r["rtt_s"] < prof.rtt_ms / 1e3 + 2e-3, r
            rate = prof.rate_mbit * 1e6 / 8
            assert 0.4 * tcp_ceiling(prof) < r["bytes_per_s"] <= 1.05 * rate, r
        slow = [p["message"] for p in report["problems"] if "is slow for a pipeline" in
                p["message"]]
        assert len(slow) == 3
        assert report["plan"]["fewer_hosts"] == 1
        advice = [p["message"] for p in report["problems"] if "the links make" in p["message"]]
        assert f"--hosts {c.hosts[0].ssh} --ips {c.hosts[0].address}" in advice[0]
        assert "saved 4 link(s)" in err
        # The saved links travel with the hostfile to every rank: rank 0 advises too.
        port = free_port_block()
        job = subprocess.run([*c.launch_cmd(port, "launch/run.py"), "--model", "glm4_moe",
                              "--synthetic", "tiny", "--prompt", "hi", "--max-tokens", "1"],
                             capture_output=True, text=True, timeout=180, cwd=ROOT, env=c.env)
        assert job.returncode == 0, job.stderr[-3000:]
        said = job.stdout + job.stderr  # over ssh (a terminal) the ranks' stderr is in stdout
        warned = [ln for ln in said.splitlines() if "the links make this job" in ln]
        assert len(warned) == 1 and warned[0].startswith("[rank 0 (")
        assert f"--ips {c.hosts[0].address} " in warned[0]


@pytest.mark.timeout(300)
def test_ethernet_links_neither_warn_nor_advise_fewer_hosts():
    prof, cluster = shaped("ethernet-10g")
    with cluster as c:
        report, _ = check(c)
        for r in ring_links(report):  # the wire tops out far below 10 Gbit/s: see its docs
            assert prof.rtt_ms / 1e3 <= r["rtt_s"] < prof.rtt_ms / 1e3 + 2e-3, r
            assert r["bytes_per_s"] > 60e6, r
        assert [p for p in report["problems"] if p["level"] != "note"] == []
        assert "fewer_hosts" not in report["plan"] and report["plan"]["step_s"][-1]

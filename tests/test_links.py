"""Measuring the ring's links (dist_runtime/links.py, ring_links.py) and what check and a
job do with them.

The probe is checked against a serving end written here with a known delay per echo and
a known pace for bulk data, so the round trip and bandwidth it reports are compared with
figures set by the test, not with its own. `check` runs for real on 127.0.0.1; `--save`
is checked by mlx.launch itself (its hostfile parser, and a job that reads the envs entry
the links travel in). Shaped links are tests/test_links_shaped.py's.
"""

import json
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from dist_runtime import links
from dist_runtime.hostfiles import Problem
from dist_runtime.ring_links import (ENV_NAME, advice_at_start, compact, env_entry, hop_table,
                                     link_problems, survey)
from launch.ring_check import saved_links_problems
from tests.launcher import ROOT, free_port_block, hostfile_tool
from tests.test_link_plan import macs, model

TOKEN = "t" * links.TOKEN_BYTES


class PacedEnd:
    """A serving end on 127.0.0.1 that echoes each ping after `delay` s and acknowledges a
    block once `rate` bytes/s would have carried it (counted from the block's header)."""

    def __init__(self, delay: float, rate: float, stall: bool = False):
        self.delay, self.rate, self.stall = delay, rate, stall
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def recv(self, conn, n):
        return links.recv_exact(conn, n, links.Deadline(10), "test")

    def run(self):
        self.sock.settimeout(10)
        conn, _ = self.sock.accept()
        with conn:
            self.recv(conn, links.TOKEN_BYTES)
            if self.stall:
                time.sleep(3)
                return
            while True:
                op = self.recv(conn, 1)
                if op == links.PING:
                    n = struct.unpack("!I", self.recv(conn, 4))[0]
                    data = self.recv(conn, n)
                    time.sleep(self.delay)
                    conn.sendall(data)
                elif op == links.BULK:
                    n = struct.unpack("!Q", self.recv(conn, 8))[0]
                    t0 = time.perf_counter()
                    self.recv(conn, n)
                    time.sleep(max(0.0, n / self.rate - (time.perf_counter() - t0)))
                    time.sleep(self.delay)  # the ack's way back is half a round trip...
                    conn.sendall(b"A")
                else:
                    return

    def close(self):
        self.sock.close()
        self.thread.join(5)


def test_probe_reports_the_round_trip_and_bandwidth_it_was_given():
    end = PacedEnd(delay=0.02, rate=20e6)
    try:
        r = links.measure(f"127.0.0.1:{end.port}", TOKEN, links.Deadline(20), pings=5,
                          bulk_seconds=0.2, max_bytes=8 << 20)
    finally:
        end.close()
    # 20 ms of echo delay per ping; loopback adds well under 5 ms on this machine.
    assert 0.02 <= r["rtt_s"] < 0.025 and r["pings"] == 5
    # Blocks paced at 20 MB/s (+ a 20 ms round trip, which the probe subtracts): the
    # block grew until it took 0.2 s, so 4 MB or more.
    assert r["bulk_bytes"] >= 4 << 20
    assert r["bytes_per_s"] == pytest.approx(20e6, rel=0.15)


def test_probe_ends_on_its_deadline_when_the_other_end_stalls():
    end = PacedEnd(delay=0, rate=1e9, stall=True)
    t0 = time.monotonic()
    with pytest.raises(links.ProbeError, match="deadline passed while waiting for a ping"):
        links.measure(f"127.0.0.1:{end.port}", TOKEN, links.Deadline(1.0))
    assert time.monotonic() - t0 < 2.0
    end.close()
    # A listener nobody reaches gives up at its deadline too, naming the likely cause.
    with pytest.raises(links.ProbeError, match="firewall, or no route"):
        links.serve("127.0.0.1", 0, TOKEN, links.Deadline(0.5), out=open("/dev/null", "w"))


def test_serving_end_ignores_a_stranger_and_serves_the_token_holder():
    out = {}

    class Lines:
        def write(self, text):
            out.setdefault("port", json.loads(text)["port"]) if text.strip() else None

        def flush(self):
            pass

    t = threading.Thread(target=lambda: out.update(
        served=links.serve("127.0.0.1", 0, TOKEN, links.Deadline(10), out=Lines())),
        daemon=True)
    t.start()
    for _ in range(100):
        if "port" in out:
            break
        time.sleep(0.02)
    with socket.create_connection(("127.0.0.1", out["port"]), timeout=5) as stranger:
        stranger.sendall(b"x" * links.TOKEN_BYTES)  # wrong token: closed, not served
        assert stranger.recv(1) == b""
    r = links.measure(f"127.0.0.1:{out['port']}", TOKEN, links.Deadline(10), pings=3,
                      bulk_seconds=0.01, max_bytes=1 << 20)
    t.join(5)
    assert out["served"]["pings"] == 3 and out["served"]["blocks"] >= 1
    assert r["rtt_s"] > 0 and r["bytes_per_s"] > 0


def test_survey_measures_the_ring_and_the_closing_hops_in_order():
    hosts = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 4
    records = survey(hosts, sys.executable, "ssh", 20)
    assert [(r["from"], r["to"], r["kind"]) for r in records] == [
        (0, 1, "ring"), (1, 2, "ring"), (2, 3, "ring"), (3, 0, "ring"),
        (1, 0, "closing"), (2, 0, "closing")]
    assert all("error" not in r and r["rtt_s"] > 0 and r["bytes_per_s"] > 0 for r in records)
    # A host that answers on no address: that hop fails, named, within the deadline.
    bad = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["192.0.2.1"]}]
    t0 = time.monotonic()
    records = survey(bad, sys.executable, "ssh", 5)
    assert time.monotonic() - t0 < 2 * 7
    assert "could not start the probe's listener on 127.0.0.1 at 192.0.2.1" in \
        records[0]["error"]
    errors = [p for p in link_problems(records, ["a", "b"]) if p.level == "error"]
    assert errors and "link 0 -> 1 (a -> b at 192.0.2.1)" in errors[0].message


def rec(i, j, rtt_ms, mb_s, kind="ring"):
    return {"from": i, "to": j, "to_ip": f"10.0.0.{j + 1}", "kind": kind,
            "rtt_s": rtt_ms / 1e3, "rtt_min_s": rtt_ms / 1e3, "rtt_max_s": rtt_ms / 1e3,
            "bytes_per_s": mb_s * 1e6}


def test_a_link_far_slower_than_the_others_is_named():
    names = ["a", "b", "c", "d"]
    fast = [rec(0, 1, 0.3, 2000), rec(1, 2, 0.35, 1800), rec(2, 3, 0.3, 2100),
            rec(3, 0, 0.32, 2000)]
    assert link_problems(fast, names) == []
    wifi = fast[:2] + [rec(2, 3, 6.0, 25)] + fast[3:]
    found = link_problems(wifi, names)
    assert [p.level for p in found] == ["warning"]
    assert "link 2 -> 3 (c -> d at 10.0.0.4) is far slower than the ring's other links" \
        in found[0].message and "Wi-Fi" in found[0].message
    # Every link as slow as Wi-Fi: none is slower than the others, all are slow.
    slow = [rec(0, 1, 6.0, 25), rec(1, 0, 5.5, 30)]
    assert [p.message.split(" is ")[1][:20] for p in link_problems(slow, names)] == \
        ["slow for a pipeline "] * 2


def test_saved_links_are_what_mlx_launch_passes_on(tmp_path):
    records = [rec(0, 1, 0.3, 2000), rec(1, 0, 0.3, 2000)]
    table = hop_table(compact(records))
    assert table[(0, 1)] == pytest.approx((0.15e-3, 2e9))
    data = {"backend": "ring", "envs": [env_entry(records)],
            "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}],
            "links": compact(records)}
    assert saved_links_problems(data) == []
    data["hosts"][1]["ips"] = ["10.0.0.9"]
    assert "measured for another hostfile" in saved_links_problems(data)[0].message
    assert isinstance(saved_links_problems({"hosts": [], "links": "x"})[0], Problem)
    # The job's side: fewer hosts advised from the envs entry, none when it is absent.
    slow = [rec(0, 1, 12, 4), rec(1, 0, 12, 4)]
    env = {ENV_NAME: env_entry(slow).split("=", 1)[1]}
    said = advice_at_start(model(), macs(64, 64), 16, None, 1, env)
    assert len(said) == 1 and "on the first 1 (rank 0 (mac0); no hops)" in said[0]
    assert advice_at_start(model(), macs(64, 64), 16, None, 1, {}) == []
    assert "unreadable" in advice_at_start(model(), macs(64, 64), 16, None, 1,
                                           {ENV_NAME: "[{]"})[0]


def check(*args, timeout=120):
    return hostfile_tool("check", *args, timeout=timeout)


def test_check_measures_saves_and_mlx_launch_accepts_the_file(tmp_path):
    hf = tmp_path / "local.json"
    hf.write_text((ROOT / "hostfiles/localhost-2.json").read_text())
    c = check(hf, "--json", "--save", "--model", "glm4_moe", "--synthetic", "small")
    assert c.returncode == 0, c.stdout + c.stderr
    report = json.loads(c.stdout)
    assert [(r["from"], r["to"]) for r in report["links"]] == [(0, 1), (1, 0)]
    assert report["plan"]["split"] and "fewer_hosts" not in report["plan"]
    assert len(report["plan"]["step_s"]) == 2 and "saved 2 link(s)" in c.stderr
    saved = json.loads(hf.read_text())
    assert saved["links"] == compact(report["links"])
    from mlx._distributed_utils.common import Hostfile

    parsed = Hostfile.from_file(str(hf))  # mlx.launch's own parser
    assert [h.ips for h in parsed.hosts] == [["127.0.0.1"]] * 2
    assert parsed.envs == saved["envs"]
    # A job started by mlx.launch with that file sees the links in its environment.
    script = tmp_path / "show.py"
    script.write_text(f"import os; print(os.environ.get({ENV_NAME!r}))\n")
    port = free_port_block()
    p = subprocess.run(["mlx.launch", "--hostfile", str(hf), "--starting-port", str(port),
                        sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    shown = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("[")]
    assert shown == [saved["links"]] * 2
    # The text report: one line per link and the plan line.
    text = check(hf, "--no-links", "--model", "glm4_moe", "--synthetic", "tiny").stdout
    assert "note: links not measured (--no-links)" in text and "plan: glm4_moe (tiny)" in text


def test_the_job_warns_when_recorded_links_make_fewer_hosts_faster(tmp_path):
    hf = tmp_path / "slow.json"
    slow = [rec(0, 1, 40, 2), rec(1, 0, 40, 2)]
    for r in slow:
        r["to_ip"] = "127.0.0.1"
    data = json.loads((ROOT / "hostfiles/localhost-2.json").read_text())
    data["envs"] = [env_entry(slow)]
    hf.write_text(json.dumps(data))
    port = free_port_block()
    p = subprocess.run(["mlx.launch", "--hostfile", str(hf), "--starting-port", str(port),
                        "launch/run.py", "--model", "glm4_moe", "--synthetic", "tiny",
                        "--prompt", "hi", "--max-tokens", "2", "--json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    warned = [ln for ln in p.stderr.splitlines() if "the links make this job slower" in ln]
    assert len(warned) == 1 and warned[0].startswith("[rank 0 (")
    assert "--ips 127.0.0.1 " in warned[0]
    # A warning, not a refusal: the job ran, and gave one process's tokens.
    one = subprocess.run([sys.executable, "launch/run.py", "--model", "glm4_moe", "--synthetic",
                          "tiny", "--prompt", "hi", "--max-tokens", "2", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    tokens = json.loads(p.stdout.splitlines()[-1])["tokens"]
    assert len(tokens) == 2 and tokens == json.loads(one.stdout.splitlines()[-1])["tokens"]
    assert "the links make" not in one.stderr

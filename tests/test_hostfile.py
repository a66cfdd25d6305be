"""launch/hostfile.py: write a hostfile, validate one, and reach every host in it.

Hosts are reached for real where that is possible here: 127.0.0.1 locally. Remote hosts
go through a stand-in for ssh (a script passed with --ssh) that fails like ssh does,
or hangs, so the per-host deadline is tested without a network.
"""

import json
import sys

import mlx.core as mx
import pytest

from dist_runtime.hostfiles import check_hostfile_data
from launch.hostfile import build_hostfile
from tests.launcher import ROOT, hostfile_tool

tool = hostfile_tool


def errors_of(data):
    return [p.message for p in check_hostfile_data(data) if p.level == "error"]


def test_write_then_check_localhost(tmp_path):
    out = tmp_path / "hf" / "local.json"
    w = tool("write", "--hosts", "127.0.0.1,127.0.0.1", "-o", out)
    assert w.returncode == 0, w.stderr
    data = json.loads(out.read_text())
    assert data["backend"] == "ring"
    assert data["hosts"] == [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2
    c = tool("check", out, "--json")
    assert c.returncode == 0, c.stdout + c.stderr
    report = json.loads(c.stdout)
    facts = report["hosts"]["127.0.0.1"]["facts"]
    assert report["ok"] and facts["mlx"] == mx.__version__
    assert facts["python"] == ".".join(map(str, sys.version_info[:3]))
    assert facts["available"] > 0 and facts["total"] >= facts["available"]
    assert facts["project"] is True and "127.0.0.1" in facts["addresses"]
    text = tool("check", out).stdout
    assert "host 0,1 127.0.0.1" in text and f"mlx {mx.__version__}" in text and "free of" in text


def test_write_with_ips_and_the_existing_hostfiles_are_valid(tmp_path):
    w = tool("write", "--hosts", "mac1.local,mac2.local", "--ips", "192.168.100.1,192.168.100.2")
    assert w.returncode == 0, w.stderr
    assert json.loads(w.stdout)["hosts"][1] == {"ssh": "mac2.local", "ips": ["192.168.100.2"]}
    for f in sorted((ROOT / "hostfiles").glob("*.json")):
        assert errors_of(json.loads(f.read_text())) == [], f


@pytest.mark.parametrize("args,expected", [
    (["--hosts", "mac1,mac2"], "host 0 (mac1) is a name, and the ring backend needs IP"),
    (["--hosts", "mac1,mac2", "--ips", "10.0.0.1"], "--hosts has 2 entries but --ips has 1"),
    (["--hosts", "mac1,mac2", "--ips", "10.0.0.1,mac2.lan"], "'mac2.lan' in \"ips\" is not an IP"),
    (["--hosts", "mac1,mac2", "--ips", "10.0.0.1,10.0.0.1"], "both list IP 10.0.0.1"),
])
def test_write_refuses_a_bad_list(args, expected):
    w = tool("write", *args)
    assert w.returncode == 1 and expected in w.stderr, w.stderr
    assert build_hostfile(["127.0.0.1"])["hosts"] == [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]


@pytest.mark.parametrize("data,expected", [
    ({"backend": "ring"}, "has no \"hosts\" list"),
    ({"hosts": []}, "must be a non-empty list"),
    ({"hosts": [{"ips": ["10.0.0.1"]}]}, "host 0 has no \"ssh\" name"),
    ({"hosts": [{"ssh": "a"}, {"ssh": "b"}]}, "host 0 (a) has no \"ips\": the ring backend"),
    ({"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.1"]}]},
     "host 1 (b) and host 0 (a) both list IP 10.0.0.1"),
    ({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]},
     "lists the loopback address 127.0.0.1, but host 1 (mac2) is another machine"),
    ({"hosts": [{"ssh": "a", "ips": ["10.0.0.1", "10.0.1.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]},
     "hosts list different numbers of \"ips\""),
    ({"backend": "tcp", "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}]}, "unknown backend 'tcp'"),
    ({"envs": ["NO VALUE"], "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}]}, "is not \"NAME=value\""),
])
def test_validation_errors(data, expected):
    assert any(expected in e for e in errors_of(data)), errors_of(data)


def test_mpi_needs_no_ips_and_localhost_warns_for_ring():
    assert errors_of({"backend": "mpi", "hosts": [{"ssh": "a"}, {"ssh": "b"}]}) == []
    problems = check_hostfile_data({"hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"]}]})
    assert [p.level for p in problems] == ["warning"] and "127.0.0.1" in problems[0].message


def test_check_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]},]}')
    c = tool("check", bad)
    assert c.returncode == 1 and "is not valid JSON" in c.stdout and "line 1" in c.stdout
    c = tool("check", tmp_path / "nope.json")
    assert c.returncode == 1 and "cannot read hostfile" in c.stdout


@pytest.mark.parametrize("data", [
    {"backend": "ring", "hosts": []},  # mlx.launch runs nothing and exits 0, silently
    {"backend": "mpi", "hosts": []},
    [],
    {"hosts": None},
])
def test_check_refuses_a_hostfile_without_hosts(tmp_path, data):
    hf = tmp_path / "empty.json"
    hf.write_text(json.dumps(data))
    c = tool("check", hf)
    assert c.returncode == 1 and "Traceback" not in c.stderr, c.stdout + c.stderr
    assert "\"hosts\" must be a non-empty list" in c.stdout and "one per rank" in c.stdout
    report = tool("check", hf, "--json")
    assert report.returncode == 1 and json.loads(report.stdout)["ok"] is False


def fake_ssh(tmp_path, body):
    script = tmp_path / "fake-ssh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.timeout(60)
def test_check_reports_an_unreachable_host(tmp_path):
    hf = tmp_path / "two.json"
    hf.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                        {"ssh": "gone.example", "ips": ["127.0.0.1"]}]}))
    ssh = fake_ssh(tmp_path, "echo 'ssh: connect to host gone.example port 22: "
                             "Connection refused' >&2; exit 255")
    c = tool("check", hf, "--ssh", ssh)
    assert c.returncode == 1
    assert "host 1 (gone.example): cannot ssh to gone.example (ssh: connect to host" in c.stdout
    assert "ssh-copy-id gone.example" in c.stdout
    assert "host 0 127.0.0.1" in c.stdout and "free of" in c.stdout  # the local one answered


@pytest.mark.timeout(60)
def test_check_has_a_deadline_per_host(tmp_path):
    hf = tmp_path / "slow.json"
    hf.write_text(json.dumps({"backend": "mpi", "hosts": [{"ssh": "asleep.example"}]}))
    c = tool("check", hf, "--ssh", fake_ssh(tmp_path, "sleep 30"), "--timeout", "1",
             timeout=20)
    assert c.returncode == 1
    assert "host 0 (asleep.example): did not answer within 1 s" in c.stdout


@pytest.mark.timeout(60)
def test_check_finds_an_ip_the_host_does_not_have(tmp_path):
    hf = tmp_path / "wrong-ip.json"
    hf.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["192.0.2.77"]}]}))
    c = tool("check", hf)
    assert c.returncode == 1
    assert "the hostfile gives it IP 192.0.2.77, but its interfaces have" in c.stdout


# -- Macs: chip, macOS, RAM, what Metal keeps resident, the GPU wired limit ------------------
# No Mac here: a stand-in for ssh answers with what SNIPPET prints on one (its Darwin
# branch is run below with a stand-in for sysctl), so the parsing and report are real.

def mac_output(host, ip, macos="15.3.1", chip="Apple M2 Ultra", ram_gib=192, wired="0"):
    gib = 2**30
    return {"hostname": host, "python": ".".join(map(str, sys.version_info[:3])),
            "platform": f"macOS-{macos}-arm64-arm-64bit", "available": int(0.9 * ram_gib * gib),
            "total": ram_gib * gib, "addresses": ["127.0.0.1", ip], "mlx": mx.__version__,
            "gpu": chip, "project": True,  # a raised wired limit raises the working set:
            "working_set": int(wired) * 2**20 if int(wired) else ram_gib * gib * 3 // 4,
            "macos": macos, "chip": chip, "ram": str(ram_gib * gib), "wired_limit_mb": wired}


def macs_hostfile(tmp_path, backend, outputs):
    """A hostfile of Macs, and an ssh stand-in that prints each one's SNIPPET output."""
    hf = tmp_path / "macs.json"
    hosts = [{"ssh": o["hostname"], "ips": [o["addresses"][1]]} for o in outputs]
    if backend in ("jaccl", "jaccl-ring"):  # a device to every peer (jaccl-ring uses 2)
        for i, h in enumerate(hosts):
            h["rdma"] = [None if j == i else f"rdma_en{j + 2}" for j in range(len(hosts))]
        for o in outputs:  # each Mac's ibv_devices, as the snippet reports them
            o["rdma_devices"] = [f"rdma_en{j + 2}" for j in range(len(hosts))]
    hf.write_text(json.dumps({"backend": backend, "hosts": hosts}))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({o["hostname"]: o for o in outputs}))
    script = tmp_path / "mac-ssh"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"host = sys.argv[-2]  # ssh [options] HOST COMMAND\n"
                      f"print(json.dumps(json.load(open({str(answers)!r}))[host]))\n")
    script.chmod(0o755)
    return hf, str(script)


@pytest.mark.timeout(60)
def test_check_reports_each_macs_chip_macos_ram_working_set_and_wired_limit(tmp_path):
    hf, ssh = macs_hostfile(tmp_path, "ring", [
        mac_output("studio1", "192.168.100.1"),
        mac_output("mbp", "192.168.100.2", macos="26.2", chip="Apple M4 Max", ram_gib=128,
                   wired="110000")])
    c = tool("check", hf, "--ssh", ssh, "--no-links")  # the stand-in runs no link probe
    assert c.returncode == 0, c.stdout + c.stderr
    assert ("    Apple M2 Ultra, macOS 15.3.1, 206.16 GB (192 GiB) RAM; Metal keeps up to "
            "154.62 GB (147456 MiB, 75% of RAM) resident (recommended working set); GPU wired "
            "limit: iogpu.wired_limit_mb=0, the macOS default") in c.stdout
    assert ("    Apple M4 Max, macOS 26.2, 137.44 GB (128 GiB) RAM; Metal keeps up to "
            "115.34 GB (110000 MiB, 84% of RAM) resident (recommended working set); GPU wired "
            "limit: iogpu.wired_limit_mb=110000") in c.stdout
    # ring: an old macOS is only a note; macOS 26.2 none
    assert ("note: host 0 (studio1) runs macOS 15.3.1: mlx's RDMA backends (jaccl, jaccl-ring) "
            "would need macOS 26.2 or newer; the ring backend works") in c.stdout
    assert "host 1 (mbp) runs" not in c.stdout and "warning" not in c.stdout
    report = json.loads(tool("check", hf, "--ssh", ssh, "--json", "--no-links").stdout)
    assert report["hosts"]["mbp"]["mac"] == {
        "chip": "Apple M4 Max", "macos": "26.2", "ram": 128 * 2**30,
        "working_set": 110000 * 2**20, "wired_limit_mb": 110000}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["jaccl", "jaccl-ring"])
def test_check_warns_where_macos_is_too_old_for_rdma(tmp_path, backend):
    hf, ssh = macs_hostfile(tmp_path, backend, [
        mac_output("studio1", "192.168.100.1", macos="26.1"),
        mac_output("studio2", "192.168.100.2", macos="26.3"),
        mac_output("mini", "192.168.100.3", macos="14.6", chip="Apple M2 Pro", ram_gib=32)])
    c = tool("check", hf, "--ssh", ssh)
    assert c.returncode == 0, c.stdout + c.stderr  # warnings do not fail the check
    assert (f"warning: host 0 (studio1) runs macOS 26.1, but the hostfile's {backend} backend "
            f"needs RDMA over Thunderbolt 5, which macOS has from 26.2") in c.stdout
    assert "host 1 (studio2) runs" not in c.stdout
    assert f"warning: host 2 (mini) runs macOS 14.6, but the hostfile's {backend}" in c.stdout
    assert ("warning: host 2 (mini) runs macOS 14.6: before macOS 15 mlx cannot keep a stage's "
            "weights resident") in c.stdout


def test_the_snippet_reports_a_macs_facts(tmp_path, monkeypatch, capsys):
    import platform

    from launch.hostfile import SNIPPET, describe_mac, mac_facts

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sysctl = bin_dir / "sysctl"
    sysctl.write_text("#!/bin/sh\ncase \"$2\" in\n"
                      "machdep.cpu.brand_string) echo 'Apple M3 Ultra';;\n"
                      "hw.memsize) echo 274877906944;;\n"
                      "iogpu.wired_limit_mb) echo 0;;\n"
                      "*) echo \"sysctl: unknown oid '$2'\" >&2; exit 1;;\nesac\n")
    sysctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "mac_ver", lambda: ("26.2", ("", "", ""), "arm64"))
    monkeypatch.setattr(sys, "argv", ["-c", str(ROOT)])
    exec(SNIPPET, {"__name__": "__main__"})
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["macos"] == "26.2" and out["chip"] == "Apple M3 Ultra"
    assert out["ram"] == "274877906944" and out["wired_limit_mb"] == "0"
    m = mac_facts(out)  # mlx is not on Metal here: no working set
    assert m["ram"] == 256 * 2**30 and m["working_set"] is None
    assert describe_mac(m).startswith("Apple M3 Ultra, macOS 26.2, 274.88 GB (256 GiB) RAM; "
                                      "Metal's recommended working set unknown")

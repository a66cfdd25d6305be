"""Hostfiles for mlx's RDMA backends (jaccl: a full mesh of Thunderbolt 5 cables;
jaccl-ring: each host cabled to the next): `hostfile.py write --rdma` makes them and
`check` validates them.

The reference is mlx's own launcher (mlx._distributed_utils.launch.launch_jaccl, run up
to the point where it would start processes): what `write` makes it accepts, with the
device matrix it hands the ranks; what `check` refuses it refuses too, or would fail on
at start. No Mac here, so the hosts' ibv_devices are given as reported facts.
"""

import argparse
import json

import pytest

from dist_runtime.hostfiles import check_hostfile_data
from launch.hostfile import build_hostfile
from launch.ring_check import rdma_device_problems
from tests.launcher import hostfile_tool



def mlx_launch_accepts(data: dict, tmp_path, monkeypatch) -> list:
    """What mlx.launch would hand each rank as MLX_IBV_DEVICES for this hostfile; raises
    ValueError with mlx's own message where it refuses the file."""
    from mlx._distributed_utils import launch as mlx_launch
    from mlx._distributed_utils.common import Hostfile

    path = tmp_path / "hf.json"
    path.write_text(json.dumps(data))
    hosts = Hostfile.from_file(str(path)).hosts

    class Parser:
        def error(self, msg):
            raise ValueError(msg)

    seen = {}
    monkeypatch.setattr(mlx_launch, "_launch_with_io",
                        lambda cls, arguments, verbose: seen.update(arguments=arguments))
    args = argparse.Namespace(backend=data["backend"], env=[], cwd=None, verbose=False,
                              starting_port=32323, python=None)
    mlx_launch.launch_jaccl(Parser(), hosts, args, ["launch/run.py"])
    (_, _, _, _, files, env, _), _ = seen["arguments"][0]
    assert f"MLX_JACCL_COORDINATOR={data['hosts'][0]['ips'][0]}:32323" in env
    assert ("MLX_JACCL_RING=1" in env) == (data["backend"] == "jaccl-ring")
    return json.loads(files["MLX_IBV_DEVICES"])


def write(*args):
    return hostfile_tool("write", *args)


def test_write_a_jaccl_mesh_that_mlx_launch_accepts(tmp_path, monkeypatch):
    # Three Macs, every pair cabled: each lists the devices to its peers in rank order.
    w = write("--backend", "jaccl", "--hosts", "m1,m2,m3", "--ips", "10.0.0.1,10.0.0.2,10.0.0.3",
              "--rdma", "rdma_en2,rdma_en3", "--rdma", "rdma_en2,rdma_en4",
              "--rdma", "rdma_en3,rdma_en4")
    assert w.returncode == 0, w.stderr
    data = json.loads(w.stdout)
    assert [h["rdma"] for h in data["hosts"]] == [
        [None, "rdma_en2", "rdma_en3"], ["rdma_en2", None, "rdma_en4"],
        ["rdma_en3", "rdma_en4", None]]
    assert mlx_launch_accepts(data, tmp_path, monkeypatch) == [h["rdma"] for h in data["hosts"]]
    assert check_hostfile_data(data) == []


def test_write_a_jaccl_ring_that_mlx_launch_accepts(tmp_path, monkeypatch):
    # Four Macs in a ring of cables: each lists the previous host's cable, then the next's;
    # two cables between hosts 0 and 1 ('+').
    data = build_hostfile(["m1", "m2", "m3", "m4"], ["10.0.0.1", "10.0.0.2", "10.0.0.3",
                                                       "10.0.0.4"], "jaccl-ring",
                          rdma=["rdma_en5,rdma_en2+rdma_en3", "rdma_en2+rdma_en3,rdma_en4",
                                "rdma_en2,rdma_en3", "rdma_en4,rdma_en5"])
    rows = [h["rdma"] for h in data["hosts"]]
    assert rows[0] == [None, ["rdma_en2", "rdma_en3"], None, "rdma_en5"]
    assert rows[2] == [None, "rdma_en2", None, "rdma_en3"]
    assert mlx_launch_accepts(data, tmp_path, monkeypatch) == rows
    found = check_hostfile_data(data)
    assert [p.level for p in found] == ["warning"]  # 2 cables on one side, 1 on others
    assert "different numbers of RDMA devices per neighbour" in found[0].message
    # Two hosts: one cable each, both neighbours at once.
    two = build_hostfile(["m1", "m2"], ["10.0.0.1", "10.0.0.2"], "jaccl-ring",
                         rdma=["rdma_en2", "rdma_en3"])
    assert [h["rdma"] for h in two["hosts"]] == [[None, "rdma_en2"], ["rdma_en3", None]]
    assert mlx_launch_accepts(two, tmp_path, monkeypatch) and check_hostfile_data(two) == []


@pytest.mark.parametrize("args,expected", [
    (["--backend", "jaccl", "--hosts", "m1,m2", "--ips", "10.0.0.1,10.0.0.2"],
     "the jaccl backend needs --rdma once per host"),
    (["--backend", "jaccl", "--hosts", "m1,m2,m3", "--ips", "10.0.0.1,10.0.0.2,10.0.0.3",
      "--rdma", "rdma_en2", "--rdma", "rdma_en2,rdma_en3", "--rdma", "rdma_en2,rdma_en3"],
     "--rdma for host 0 is 'rdma_en2': 1 device(s), but jaccl needs 2"),
    (["--backend", "jaccl-ring", "--hosts", "m1,m2", "--rdma", "rdma_en2", "--rdma", "rdma_en2"],
     "host 0 (m1) is a name, and the jaccl-ring backend's coordinator is rank 0 at its IP"),
    (["--hosts", "10.0.0.1,10.0.0.2", "--rdma", "rdma_en2", "--rdma", "rdma_en2"],
     "--rdma is for the jaccl and jaccl-ring backends, not ring"),
    (["--backend", "jaccl", "--hosts", "m1,m2", "--ips", "10.0.0.1,10.0.0.2",
      "--rdma", "en2", "--rdma", "rdma_en2"], "'en2' (\"rdma\" entry 1, for host 1 (m2)) is "
                                             "not an RDMA device name"),
])
def test_write_refuses_bad_rdma_lists(args, expected):
    w = write(*args)
    assert w.returncode == 1 and expected in w.stderr, w.stderr


def mesh(n):
    return {"backend": "jaccl", "hosts": [
        {"ssh": f"m{i}", "ips": [f"10.0.0.{i + 1}"],
         "rdma": [None if j == i else f"rdma_en{j + 2}" for j in range(n)]} for i in range(n)]}


@pytest.mark.parametrize("change,expected", [
    (lambda d: d["hosts"][1]["rdma"].__setitem__(0, None),
     "host 1 (m1) lists no RDMA device for host 0 (m0)"),
    (lambda d: d["hosts"][1]["rdma"].__setitem__(1, "rdma_en9"),
     "host 1 (m1): \"rdma\" entry 1 is 'rdma_en9', but a host's own entry must be null"),
    (lambda d: d["hosts"][2].__setitem__("rdma", ["rdma_en2", None]),
     "host 2 (m2): \"rdma\" must be a list of 3 entries"),
    (lambda d: d["hosts"][2].pop("rdma"), "host 2 (m2) has no \"rdma\" list"),
    (lambda d: d["hosts"][0].pop("ips"), "host 0 (m0) has no \"ips\": the jaccl backend's "
                                         "coordinator"),
    (lambda d: d["hosts"][0]["rdma"].__setitem__(2, "rdma_en3"),
     "host 0 (m0) lists rdma_en3 for both host 1 (m1) and host 2 (m2)"),
])
def test_check_refuses_what_mlx_launch_or_the_cables_would(change, expected, tmp_path,
                                                            monkeypatch):
    data = mesh(3)
    assert check_hostfile_data(data) == []
    change(data)
    errors = [p.message for p in check_hostfile_data(data) if p.level == "error"]
    assert any(expected in e for e in errors), errors
    if "own entry" in expected or "both" in expected:
        return  # mlx.launch lets these through; the ranks would fail to connect
    with pytest.raises((ValueError, KeyError, IndexError, TypeError)):
        mlx_launch_accepts(data, tmp_path, monkeypatch)


def test_check_looks_each_device_up_in_the_hosts_ibv_devices():
    data = mesh(2)
    facts = {"m0": {"ok": True, "facts": {"macos": "26.2", "rdma_devices": ["rdma_en3"]}},
             "m1": {"ok": True, "facts": {"macos": "26.2"}}}  # no ibv_devices: RDMA off
    found = [p.message for p in rdma_device_problems(data, facts)]
    assert len(found) == 1 and "host 1 (m1): ibv_devices is not there" in found[0]
    data["hosts"][0]["rdma"][1] = "rdma_en4"
    found = [p.message for p in rdma_device_problems(data, facts)]
    assert "host 0 (m0) lists rdma_en4 for host 1, but its ibv_devices shows rdma_en3" in found[0]
    assert "host 1 (m1): ibv_devices is not there" in found[1] and "rdma_ctl enable" in found[1]

"""On a Mac, the plan budgets what Metal keeps resident, advises raising the GPU wired limit,
and each stage wires its weights and KV room (dist_runtime/metal.py, planning.py).

There is no Mac here: Metal's device facts are stood in at the seam over
`mx.device_info` (`metal.device_info`, with `metal.read_sysctl` for iogpu.wired_limit_mb),
with the numbers a 64 GB, a 128 GB and a 192 GB Mac report; everything from there on is
the real code: the HostInfo a rank gathers, the budgets, the plan and its messages, the
wired limit, and the exits that give it back. On this Linux CPU machine the real seam
reports no Metal, and nothing changes.
"""

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from dist_runtime import cluster, metal
from dist_runtime.partition import PlanError
from dist_runtime.planning import (MiB, budgets_for, make_plan, max_wired_limit,
                                   stage_bytes, kv_room_bytes, wired_limit)
from tests.launcher import ROOT
from tests.test_preflight import costs

GB = 10**9
GiB = 2**30

# What mx.device_info() reports on these Macs at the macOS default (iogpu.wired_limit_mb=0):
# Metal's recommended working set is three quarters of the RAM.
MACS = {
    64: {"architecture": "applegpu_g13s", "device_name": "Apple M1 Max",
         "memory_size": 64 * GiB, "max_recommended_working_set_size": 48 * GiB},
    128: {"architecture": "applegpu_g15s", "device_name": "Apple M3 Max",
          "memory_size": 128 * GiB, "max_recommended_working_set_size": 96 * GiB},
    192: {"architecture": "applegpu_g14d", "device_name": "Apple M2 Ultra",
          "memory_size": 192 * GiB, "max_recommended_working_set_size": 144 * GiB},
}


def mac_info(monkeypatch, ram_gib, rank=0, wired_mb=0, free=0.92):
    """The HostInfo a rank gathers (cluster.local_info) on a Mac of `ram_gib` GiB whose
    sysctl iogpu.wired_limit_mb is `wired_mb` (a raised limit raises the working set)."""
    info = dict(MACS[ram_gib])
    if wired_mb:
        info["max_recommended_working_set_size"] = wired_mb * MiB
    monkeypatch.setattr(metal, "device_info", lambda: info)
    monkeypatch.setattr(metal, "read_sysctl",
                        lambda name: str(wired_mb) if name == "iogpu.wired_limit_mb" else "")
    monkeypatch.setattr(cluster, "available_memory", lambda: int(free * ram_gib * GiB))
    return dataclasses.replace(cluster.local_info(rank), host=f"mac{ram_gib}")


# -- the facts ------------------------------------------------------------------------------


def test_a_metal_rank_gathers_what_metal_keeps_resident(monkeypatch):
    info = mac_info(monkeypatch, 192)
    assert info.metal and info.memory == 192 * GiB and info.working_set == 144 * GiB
    assert info.wired_limit_mb == 0
    row = cluster.HostInfo(**info.__dict__)  # what travels in the gather comes back whole
    assert row == info and len(str(info.__dict__)) < cluster.INFO_BYTES


def test_this_linux_rank_has_no_metal_and_plans_as_before():
    assert metal.device_facts() == metal.MetalFacts()  # the real seam, on this machine
    info = cluster.local_info(0)
    assert not info.metal and info.working_set == 0
    budgets, why = budgets_for([info])
    assert budgets == [int(info.available * 0.85)] and why[0].startswith("85% of its")
    assert max_wired_limit(info) == 0
    c = costs()
    plan = make_plan(c, [info], 16, None)
    assert wired_limit(c, plan.ranges, 0, info, 16) is None


# -- the budget -----------------------------------------------------------------------------


@pytest.mark.parametrize("ram", [64, 128, 192])
def test_budget_is_what_metal_keeps_resident_when_that_is_less(monkeypatch, ram):
    info = mac_info(monkeypatch, ram)
    (b,), (why,) = budgets_for([info])
    # 85% of 92% of the RAM is more than 90% of three quarters of it: Metal's cap rules.
    assert b == int(0.9 * 0.75 * ram * GiB) < int(0.85 * info.available)
    assert why.startswith(f"90% of the {0.75 * ram * GiB / GB:.2f} GB that Metal keeps "
                          f"resident, its GPU wired limit")
    # With little RAM free, the RAM rule is the smaller one, as on any host.
    low = mac_info(monkeypatch, ram, free=0.5)
    (b,), (why,) = budgets_for([low])
    assert b == int(0.85 * low.available) and why.startswith("85% of its")
    # --memory-limit still caps both.
    (b,), (why,) = budgets_for([info], [10])
    assert b == 10 * GB and why == "its --memory-limit 10 GB"


# -- the advice -----------------------------------------------------------------------------


def layers_between_caps(info):
    """A model (1 GB layers, 0.5 GB head) above Metal's cap but within the RAM rule."""
    n = int(0.9 * info.working_set / GB) + 2
    assert (n + 1) * GB < 0.85 * info.available
    return costs(n_layers=n)


@pytest.mark.parametrize("ram", [64, 128, 192])
def test_plan_that_fits_only_with_a_raised_limit_says_the_sysctl(monkeypatch, ram):
    info = mac_info(monkeypatch, ram)
    c = layers_between_caps(info)
    with pytest.raises(PlanError) as e:
        make_plan(c, [info], 4096, None)
    msg = str(e.value)
    assert "does not fit these 1 hosts" in msg and "that Metal keeps resident" in msg
    fix = msg.split("Fix: ")[1]
    assert fix.startswith("raise the GPU wired limit, and it fits: sudo sysctl "
                          "iogpu.wired_limit_mb=")
    assert (f"on rank 0 (mac{ram}), where Metal keeps {0.75 * ram * GiB / GB:.2f} GB resident "
            f"now (iogpu.wired_limit_mb is 0, the macOS default)") in fix
    mb = int(fix.split("iogpu.wired_limit_mb=")[1].split()[0])
    assert mb % 1024 == 0 and 0.75 * ram * 1024 < mb <= max_wired_limit(info) // MiB
    assert max_wired_limit(info) <= ram * GiB - 8 * GiB  # macOS keeps at least 8 GiB
    # Done as advised, the Mac reports the raised working set, and the same job plans.
    raised = mac_info(monkeypatch, ram, wired_mb=mb)
    assert raised.working_set == mb * MiB and raised.wired_limit_mb == mb
    plan = make_plan(c, [raised], 4096, None)
    assert len(plan.ranges[0]) == len(c.weight)


def test_one_sysctl_per_mac_that_needs_it(monkeypatch):
    infos = [dataclasses.replace(mac_info(monkeypatch, ram), rank=r)
             for r, ram in enumerate([192, 128, 64])]
    total = sum(int(0.9 * i.working_set) for i in infos)
    c = costs(n_layers=total // GB + 6)  # a few GB more than the three caps hold
    with pytest.raises(PlanError) as e:
        make_plan(c, infos, 4096, None)
    fix = str(e.value).split("Fix: ")[1]
    commands = fix.split("raise the GPU wired limit, and it fits: ")[1].split(" (it lasts")[0]
    values = {}
    for part in commands.split(", and "):
        mb, where = part.split("iogpu.wired_limit_mb=")[1].split(" on ", 1)
        values[where.split(", where")[0]] = int(mb)
    assert set(values) <= {"rank 0 (mac192)", "rank 1 (mac128)", "rank 2 (mac64)"} and values
    for r, ram in enumerate([192, 128, 64]):  # raise as told, then it plans
        name = f"rank {r} (mac{ram})"
        infos[r] = dataclasses.replace(mac_info(monkeypatch, ram, wired_mb=values.get(name, 0)),
                                       rank=r)
    make_plan(c, infos, 4096, None)


def test_no_sysctl_advice_when_raising_would_not_be_enough(monkeypatch):
    info = mac_info(monkeypatch, 64)
    c = costs(n_layers=60)  # 60 GB: over the RAM rule too
    with pytest.raises(PlanError) as e:
        make_plan(c, [info], 16, None)
    assert "sysctl" not in str(e.value) and "add a host with" in str(e.value)


def test_a_split_over_metals_cap_says_the_sysctl(monkeypatch):
    infos = [dataclasses.replace(mac_info(monkeypatch, ram), rank=r)
             for r, ram in enumerate([192, 64])]
    c = costs(n_layers=60)
    with pytest.raises(PlanError) as e:  # 50 layers + head on the 64 GB Mac: over 46.4 GB
        make_plan(c, infos, 16, [10, 50])
    msg = str(e.value)
    assert "rank 1 (mac64) would hold layers 10..59 (50 layers)" in msg
    assert "but it can use 46.39 GB (90% of the 51.54 GB that Metal keeps resident" in msg
    assert "; raise the GPU wired limit, and it fits: sudo sysctl iogpu.wired_limit_mb=" in msg
    assert "on rank 1 (mac64)" in msg and "on rank 0" not in msg
    assert "; or --split " in msg and "fits every host's memory" in msg


# -- the wiring -----------------------------------------------------------------------------


@pytest.mark.parametrize("ram", [64, 128, 192])
def test_each_stage_wires_its_weights_and_kv_room(monkeypatch, ram):
    infos = [dataclasses.replace(mac_info(monkeypatch, ram), rank=r) for r in range(2)]
    c = costs(n_layers=ram // 4, kv_per_token=50_000)
    plan = make_plan(c, infos, 4096, None, max_batch=2)
    kv = kv_room_bytes(c, 4096, 2)
    for r in range(2):
        need = stage_bytes(c, plan.ranges[r], r, kv)
        assert wired_limit(c, plan.ranges, r, infos[r], 4096, 2) == need
        assert need <= budgets_for(infos)[0][r] < infos[r].working_set
    assert stage_bytes(c, plan.ranges[0], 0, kv) - stage_bytes(c, plan.ranges[0], 1, kv) \
        == c.head  # rank 0 also wires its embedding and head
    calls, life = [], type("Life", (), {"cleanups": []})()

    def set_limit(n):
        calls.append(n)
        return 0

    w = metal.wire_stage(wired_limit(c, plan.ranges, 0, infos[0], 4096, 2), life, "r0",
                         set_limit)
    assert calls == [stage_bytes(c, plan.ranges[0], 0, kv)] and w.wired
    life.cleanups[0]()  # the error exit gives the limit back, once
    w.release()
    assert calls[1:] == [0] and not w.wired


def test_linux_wires_nothing(monkeypatch):
    calls = []
    life = type("Life", (), {"cleanups": []})()
    assert metal.wire_stage(None, life, "r0", calls.append) is None
    assert calls == [] and life.cleanups == []


def test_a_refused_wire_is_a_warning(capsys):
    life = type("Life", (), {"cleanups": []})()

    def refuse(n):
        raise ValueError("[metal::set_wired_limit] Setting a wired limit larger than the "
                         "maximum working set size is not allowed.")

    assert metal.wire_stage(5 * GB, life, "rank 0 (m)", refuse) is None
    err = capsys.readouterr().err
    assert "[rank 0 (m)] warning: could not keep its 5.00 GB" in err and life.cleanups == []


EXIT_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from dist_runtime.lifecycle import Lifecycle
    from dist_runtime import metal
    def set_limit(n):
        print("wired limit", n, flush=True)
        return 7
    life = Lifecycle()
    metal.wire_stage(123, life, life.me, set_limit)
    if sys.argv[1] == "error":
        life.exit_with_error("boom", 2)
    print("returning", flush=True)
""")


@pytest.mark.parametrize("how,code", [("error", 2), ("return", 0)])
def test_the_limit_is_given_back_on_every_exit(how, code):
    p = subprocess.run([sys.executable, "-c", EXIT_SCRIPT.format(root=str(ROOT)), how],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == code, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("wired limit")]
    assert lines == ["wired limit 123", "wired limit 7"], p.stdout  # set, then given back

"""The plan and the links (dist_runtime/partition.py's link model, planning.py's advice):
numbers in, decision out, checked against the step times worked out by hand here."""

import pytest

from dist_runtime.cluster import HostInfo
from dist_runtime.costs import Costs
from dist_runtime.partition import (closing_hops, fewest_hosts_time, hop_seconds, ring_hops,
                                    step_seconds)
from dist_runtime.planning import (FEWER_HOSTS_MARGIN, READ_RATE_METAL, host_count_advice,
                                   make_plan, step_estimates)

GB = 10**9
HIDDEN = 8192  # bytes of one position's hidden state (4096 wide, bfloat16)
THUNDERBOLT = (0.3e-3, 3e9)  # round trip s, bytes/s
WIFI = (12e-3, 4e6)


def macs(*gb):
    """Metal hosts with `gb` available and as much kept resident."""
    return [HostInfo(r, f"mac{r}", int(a * GB), "0.32.4", "0.1.0", "3.11.7", True,
                     int(a * GB), int(a * GB), 0) for r, a in enumerate(gb)]


def model(n_layers=8, layer_gb=1.0, head_gb=0.5):
    w = [int(layer_gb * GB)] * n_layers
    return Costs(w, list(w), [1000] * n_layers, int(head_gb * GB), int(head_gb * GB),
                 hidden_bytes=HIDDEN)


def links(n, link, closing=None):
    """The hop table ({(i, j): (latency, bytes/s)}) with every ring hop `link` and the
    hops closing shorter rings `closing` (default: the same)."""
    rtt, bw = link
    table = {h: (rtt / 2, bw) for h in ring_hops(n)}
    c_rtt, c_bw = closing or link
    table.update({h: (c_rtt / 2, c_bw) for h in closing_hops(n) if h not in table})
    return table


def by_hand(n_hosts, link, batch=1, total_gb=8.5):
    """A step on n_hosts: the whole model's reads (all layers and the head, whatever the
    split) at the Metal rate plus n_hosts hops of half a round trip and the batch's
    hidden states over the bandwidth (no hop on one host)."""
    rtt, bw = link
    hops = n_hosts if n_hosts > 1 else 0
    return total_gb * GB / READ_RATE_METAL + hops * (rtt / 2 + batch * HIDDEN / bw)


def test_the_link_model_on_numbers():
    assert hop_seconds(8192, 1e-3, 8192e3) == pytest.approx(2e-3)
    compute, network = step_seconds([2e9, 4e9], [200e9, 100e9], [(1e-3, 1e6), (2e-3, 1e6)],
                                    1000)
    assert compute == pytest.approx(0.01 + 0.04) and network == pytest.approx(3e-3 + 2e-3)
    assert fewest_hosts_time([1.0, 1.2, 1.16], 0.15) == 1  # all take 16% longer than one
    assert fewest_hosts_time([1.0, 1.2, 1.14], 0.15) is None  # within the margin
    assert fewest_hosts_time([None, 1.0, 2.0], 0.15) == 2  # one host cannot hold it
    assert fewest_hosts_time([None, None, 2.0], 0.15) is None
    assert fewest_hosts_time([1.0, None], 0.15) is None  # all hosts unknown: no advice


def test_fast_links_keep_all_hosts():
    infos, c = macs(64, 64, 64), model()
    est = step_estimates(c, infos, links(3, THUNDERBOLT), 16)
    for k, e in enumerate(est, start=1):
        assert e[0] + e[1] == pytest.approx(by_hand(k, THUNDERBOLT))
    assert host_count_advice(c, infos, links(3, THUNDERBOLT), 16) is None


def test_slow_links_and_a_model_that_fits_fewer_hosts_advise_fewer():
    infos, c = macs(64, 64, 64), model()
    advice = host_count_advice(c, infos, links(3, WIFI), 16)
    assert advice is not None
    # By hand: 8.5 GB at 200 GB/s = 42.5 ms; three Wi-Fi hops add 3 x (6 + 2.05) ms.
    t_all, t_one = by_hand(3, WIFI), by_hand(1, WIFI)
    assert t_all > t_one * (1 + FEWER_HOSTS_MARGIN)
    assert f"about {t_all * 1e3:.3g} ms on all 3 hosts" in advice
    assert f"about {t_one * 1e3:.3g} ms on the first 1 (rank 0 (mac0); no hops)" in advice
    assert "--split 8" in advice and "keep only the hostfile's first 1 entries" in advice
    assert "check --save" in advice
    # A batch of 16 sends 16 hidden states a hop: the numbers follow.
    advice16 = host_count_advice(c, infos, links(3, WIFI), 16, max_batch=16)
    assert f"about {by_hand(3, WIFI, 16) * 1e3:.3g} ms on all 3" in advice16


def test_slow_links_but_the_model_needs_every_host_gives_no_advice():
    # 8.5 GB of model; each host can use 90% of 4 GB: three are needed.
    infos, c = macs(4, 4, 4), model()
    est = step_estimates(c, infos, links(3, WIFI), 16)
    assert est[0] is None and est[1] is None and est[2] is not None
    assert make_plan(c, infos, 16, None).ranges  # it does plan on all three
    assert host_count_advice(c, infos, links(3, WIFI), 16) is None


def test_fewer_hosts_need_their_closing_hop_measured_and_fitting():
    infos, c = macs(64, 64, 64), model()
    table = links(3, WIFI)
    del table[(1, 0)]  # the hop closing a 2-host ring is unknown: k = 2 is not priced
    est = step_estimates(c, infos, table, 16)
    assert est[1] is None and est[0] is not None
    # Two hosts only: the 2-host ring is the full ring, one host the only alternative.
    infos2 = macs(4.5, 64)  # rank 0 alone cannot hold 8.5 GB in 90% of 4.5
    assert host_count_advice(c, infos2, links(2, WIFI), 16) is None
    assert host_count_advice(c, macs(64, 64), links(2, WIFI), 16) is not None


def test_unknown_links_change_nothing():
    infos, c = macs(64, 64, 64), model()
    assert host_count_advice(c, infos, None, 16) is None
    assert host_count_advice(c, infos, {}, 16) is None
    assert all(e is None for e in step_estimates(c, infos, {}, 16)[1:])


@pytest.mark.parametrize("dtype,bits", [("bfloat16", None), ("float32", 4)])
def test_the_hidden_state_bytes_a_hop_carries(tmp_path, dtype, bits):
    """From a checkpoint's headers and from a synthetic skeleton alike: the hidden width
    times the float dtype the layers compute in (4-bit weights keep float scales)."""
    from dist_runtime.source import DTYPES, Source, preset_config
    from dist_runtime.writer import write_checkpoint

    width = preset_config("glm4_moe", "tiny")["hidden_size"]
    size = {"bfloat16": 2, "float32": 4}[dtype]
    synthetic = Source("glm4_moe", "tiny", 0, dtype, bits).costs()
    folder = write_checkpoint(tmp_path / "ckpt", preset_config("glm4_moe", "tiny"),
                              dtype=DTYPES[dtype], bits=bits)
    from_headers = Source(str(folder)).costs()
    assert synthetic.hidden_bytes == from_headers.hidden_bytes == width * size

"""The default number of micro-batches: one per device the ranks compute on.

Ranks of one host on one GPU take turns on it, so overlapping them gains nothing and a
second micro-batch only reads the weights again (README, "Ranks sharing one GPU get one
micro-batch"); CPU ranks use cores of their own and count once each.
"""

from dataclasses import replace

import mlx.core as mx
import pytest

from dist_runtime.cluster import HostInfo, compute_device, distinct_devices, local_info

BASE = HostInfo(0, "a", 1 << 30, "0.32.4", "0.1.0", "3.11.7")


def ranks(*placements):
    """HostInfos from (host, device) pairs, ranks in order."""
    return [replace(BASE, rank=r, host=h, device=d) for r, (h, d) in enumerate(placements)]


def test_ranks_sharing_one_gpu_count_once():
    assert distinct_devices(ranks(("a", "cuda:0"), ("a", "cuda:0"))) == 1
    assert distinct_devices(ranks(("a", "metal"), ("a", "metal"), ("b", "metal"))) == 2


def test_separate_gpus_or_hosts_count_each():
    assert distinct_devices(ranks(("a", "cuda:0"), ("a", "cuda:1"))) == 2
    assert distinct_devices(ranks(("a", "metal"), ("b", "metal"))) == 2
    assert distinct_devices(ranks(("a", "cuda:0"), ("b", "cuda:0"))) == 2


def test_cpu_ranks_and_unknown_devices_count_each():
    assert distinct_devices(ranks(("a", "cpu:0"), ("a", "cpu:1"), ("a", "cpu:2"))) == 3
    # a rank that did not say (an older HostInfo row) is never merged with another
    assert distinct_devices(ranks(("a", ""), ("a", ""))) == 2


@pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu,
                    reason="this machine computes on a GPU")
def test_this_machine_names_its_cpu_device_per_rank():
    assert compute_device(3, is_metal=False) == "cpu:3"
    assert local_info(2).device == "cpu:2"

"""Named link profiles for the simulated cluster (tests/netns_cluster.py): what a ring
link between two "hosts" costs, in round trip, bandwidth, loss and MTU.

The figures are the conditions users meet, not what this machine can reach: the links
are shaped down to them (rate by the kernel's `tbf`, delay and loss by `netem` where the
kernel has it, else by the user-space wire of tests/netns_wire.py). The wire is one
Python process on a 2-core VM: it adds its own cost per packet and tops out far below
the Thunderbolt figure, so what a hop really costs is measured (`Cluster.measure_hop`)
and reported beside the nominal figure, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """One kind of link. `rtt_ms` is the round trip it adds (half each way); `rate_mbit`
    the bandwidth each way (None: unshaped); `loss` the fraction of packets dropped each
    way; `mtu` the interfaces' MTU."""

    name: str
    rtt_ms: float
    rate_mbit: float | None
    loss: float
    mtu: int
    source: str

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0

    @property
    def needs_delay(self) -> bool:
        """Whether the kernel's rate limiting alone cannot give this link (delay or loss)."""
        return self.rtt_ms > 0 or self.loss > 0

    def describe(self) -> str:
        rate = "unshaped" if self.rate_mbit is None else \
            (f"{self.rate_mbit / 1000:g} Gbit/s" if self.rate_mbit >= 1000
             else f"{self.rate_mbit:g} Mbit/s")
        loss = f", {self.loss * 100:g}% loss" if self.loss else ""
        return f"{self.name}: {self.rtt_ms:g} ms round trip, {rate}{loss}, MTU {self.mtu}"


PROFILES = {p.name: p for p in (
    # TCP over a Thunderbolt Bridge between two Macs. Bandwidth: a Thunderbolt 4 / USB4
    # peer link negotiates 20 Gbit/s each way and iperf3 measured 16.4 Gbit/s of TCP
    # with jumbo frames (jiribrejcha.net, "Direct 20 Gbps connection between Mac and
    # Windows ... no Ethernet adapters", 2024); Thunderbolt 5 links are faster, so 20 is
    # a floor. Round trip: 0.3-1 ms for TCP over the bridge, the figure in this
    # project's issue 13; we take the middle, 0.5 ms. MTU 9000: the jumbo frames that
    # the same post needed for full speed.
    Profile("thunderbolt-tcp", rtt_ms=0.5, rate_mbit=20_000, loss=0.0, mtu=9000,
            source="TB4 bridge iperf3 16.4 Gbit/s (jiribrejcha.net 2024); RTT 0.3-1 ms (issue 13)"),
    # 10GBASE-T through one switch: 10 Gbit/s line rate; a small-packet round trip
    # between two hosts' kernels is typically 0.1-0.3 ms (NIC interrupt moderation and
    # the switch dominate); we take 0.2 ms. Jumbo frames, as on a tuned cluster LAN.
    Profile("ethernet-10g", rtt_ms=0.2, rate_mbit=10_000, loss=0.0, mtu=9000,
            source="10GbE line rate; 0.1-0.3 ms host-to-host RTT through one switch"),
    # Two Macs on one Wi-Fi access point (a hostfile that routes over Wi-Fi by mistake):
    # each packet crosses the air twice. Wi-Fi 5/6 at good signal gives a few hundred
    # Mbit/s of TCP; a LAN ping over Wi-Fi is a few ms, with spikes. We take 200 Mbit/s,
    # 6 ms and 0.1% loss left after the radio's own retries. MTU 1500: no jumbo frames.
    Profile("wifi", rtt_ms=6.0, rate_mbit=200, loss=0.001, mtu=1500,
            source="typical Wi-Fi 5/6 LAN: a few hundred Mbit/s TCP, a few ms RTT"),
    # No shaping at all: the fastest the namespaces go (a control, and what tests use
    # when the link's cost does not matter).
    Profile("none", rtt_ms=0.0, rate_mbit=None, loss=0.0, mtu=9000,
            source="unshaped veth pairs"),
)}


def profile(name) -> Profile:
    """The profile called `name` (a Profile passes through; None means 'none')."""
    if isinstance(name, Profile):
        return name
    if name is None:
        return PROFILES["none"]
    if name not in PROFILES:
        raise ValueError(f"unknown link profile {name!r}: pick one of "
                         f"{', '.join(sorted(PROFILES))}")
    return PROFILES[name]

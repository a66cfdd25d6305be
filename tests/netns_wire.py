#!/usr/bin/env python3
"""A user-space wire: the ring links of a simulated cluster, delayed and lossy, on a
kernel without `netem`.

Why a wire and not a TCP relay: the ring backend binds the very address its neighbour
connects to (mlx/distributed/ring: rank r listens on ips[r]:port and rank r-1 connects
there), so a relay on a separate address or port cannot sit between them without NAT;
and a relay would delay only the TCP streams it knows of. A wire delays every packet of
every protocol (the ring, the liveness channel, pings), lets TCP see the loss and
retransmit as on a real link, and needs nothing but the kernel's TUN driver.

Each link is a pair of TUN devices, one in each host's network namespace, created by
this process (it enters each namespace in turn with setns(2) to open the device there;
the file descriptor keeps working once it is back). A packet the kernel sends out of
one end is read here, held for the link's one-way delay, dropped with probability
`loss`, and written into the other end, which the kernel receives as if it came off the
cable. Delay is constant, so each direction is a FIFO and order is kept. Rate limits are
the kernel's (`tbf` on each device, set by the harness), not this process's.

The devices live as long as this process: when it ends, the links vanish. It ends on
SIGTERM/SIGINT, or when the process that started it (`parent`) is gone, so a harness
killed with -9 does not leave it running. Before it exits it writes what it forwarded
and dropped per link to `stats` (JSON), and prints `ready` once every device exists.

    python3 tests/netns_wire.py SPEC.json     # (the harness starts it; see netns_cluster)
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import json
import os
import random
import select
import signal
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MAX_PACKET = 65536
BATCH = 64  # packets read from one device per wake-up, so one busy link cannot starve others
PARENT_CHECK_S = 0.5  # how often the parent's life is checked
IDLE_S = 0.5  # longest sleep when nothing is queued


def open_tun(netns: str, name: str) -> int:
    """A TUN device called `name`, created inside network namespace `netns` (by path
    /var/run/netns/NAME, as `ip netns add` makes it); returns its non-blocking fd."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns into {netns}: {os.strerror(e)}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:  # never stay in a host's namespace
                raise OSError(ctypes.get_errno(), "setns back to the root namespace")
    finally:
        os.close(target)
        os.close(home)
    return fd


class Direction:
    """One way along one link: packets read from `src`, due at `due`, written to `dst`."""

    def __init__(self, link: int, src: int, dst: int):
        self.link, self.src, self.dst = link, src, dst
        self.queue: collections.deque = collections.deque()  # (due, packet)
        self.forwarded = self.dropped = self.failed = self.bytes = 0


class Wire:
    def __init__(self, spec: dict):
        self.delay = float(spec["one_way_s"])
        self.loss = float(spec["loss"])
        self.rng = random.Random(spec.get("seed", 0))
        self.parent = spec.get("parent")
        self.stats_path = spec.get("stats")
        self.dirs: list = []
        for i, link in enumerate(spec["links"]):
            a = open_tun(*link["a"])
            b = open_tun(*link["b"])
            self.dirs += [Direction(i, a, b), Direction(i, b, a)]
        self.by_src = {d.src: d for d in self.dirs}
        self.stop = False

    def _read(self, d: Direction, now: float):
        for _ in range(BATCH):
            try:
                packet = os.read(d.src, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError as e:  # the device was set down or removed
                if e.errno in (errno.EIO, errno.EBADFD, errno.ENODEV):
                    return
                raise
            if self.loss and self.rng.random() < self.loss:
                d.dropped += 1
                continue
            d.queue.append((now + self.delay, packet))

    def _deliver(self, now: float) -> float:
        """Write every due packet; returns seconds until the next one is due."""
        wait = IDLE_S
        for d in self.dirs:
            q = d.queue
            while q and q[0][0] <= now:
                _, packet = q.popleft()
                try:
                    os.write(d.dst, packet)
                    d.forwarded += 1
                    d.bytes += len(packet)
                except OSError:  # EIO: the far end is down, as a cut cable drops it
                    d.failed += 1
            if q:
                wait = min(wait, q[0][0] - now)
        return max(wait, 0.0)

    def run(self):
        fds = list(self.by_src)
        next_check = 0.0
        wait = IDLE_S
        while not self.stop:
            try:
                ready, _, _ = select.select(fds, [], [], wait)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in ready:
                self._read(self.by_src[fd], now)
            wait = self._deliver(time.monotonic())
            if now >= next_check:
                next_check = now + PARENT_CHECK_S
                if self.parent and not os.path.exists(f"/proc/{self.parent}"):
                    break
        self.write_stats()

    def write_stats(self):
        if not self.stats_path:
            return
        rows = [{"link": d.link, "forwarded": d.forwarded, "dropped": d.dropped,
                 "failed": d.failed, "bytes": d.bytes} for d in self.dirs]
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f)
        os.replace(tmp, self.stats_path)


def realtime():
    """Run before the ranks whenever a packet is due (SCHED_FIFO, the lowest real-time
    priority): on a loaded 2-core machine a wire that waits its turn behind the ranks
    adds milliseconds per packet that no real cable adds, since a real host forwards in
    the kernel. It sleeps between packets; the kernel's real-time throttling leaves the
    rest of the machine 5% of each core should it ever spin. Without the privilege it
    runs as an ordinary process."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (PermissionError, OSError) as e:
        print(f"netns_wire: no real-time priority ({e}); packets may wait for the CPU",
              file=sys.stderr)


def main(argv: list) -> int:
    if len(argv) != 1:
        print("usage: netns_wire.py SPEC.json (see the module docstring)", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    wire = Wire(spec)
    if spec.get("realtime"):
        realtime()

    def on_signal(sig, frame):
        wire.stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A parent may have blocked them (launch/run.py and launch/start.py do, in-process in
    # some tests), and a child inherits the mask: unblocked, SIGTERM stops the wire in
    # order (its stats written) instead of waiting for the SIGKILL.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    print("ready", flush=True)
    wire.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

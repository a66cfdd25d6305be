#!/usr/bin/env python3
"""What one link of the simulated cluster costs at the TCP level: round trips of small
messages and the bandwidth of one bulk transfer (tests/netns_cluster.Cluster.measure_hop
runs `serve` in one host's namespace and `ping` in its neighbour's).

    netns_probe.py serve ADDR PORT               # prints 'ready', serves two connections
    netns_probe.py ping ADDR PORT COUNT SIZE MB  # prints one JSON line

TCP_NODELAY on both ends, as mlx's ring backend sets it: a small message leaves at once.
"""

import json
import socket
import statistics
import sys
import time

TIMEOUT_S = 30.0  # any one socket operation


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def serve(addr: str, port: int):
    srv = socket.create_server((addr, port))
    srv.settimeout(TIMEOUT_S)
    print("ready", flush=True)
    # 1: echo fixed-size messages; 2: swallow a bulk transfer, answer one byte
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT_S)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    count, size = json.loads(recv_exact(conn, 64).decode().strip())
    for _ in range(count):
        conn.sendall(recv_exact(conn, size))
    conn.close()
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT_S)
    total = int(recv_exact(conn, 16).decode())
    got = 0
    while got < total:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    conn.sendall(b"k")
    conn.close()


def ping(addr: str, port: int, count: int, size: int, mb: float) -> dict:
    s = socket.create_connection((addr, port), timeout=TIMEOUT_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(json.dumps([count, size]).encode().ljust(64))
    msg = b"x" * size
    rtts = []
    for _ in range(count):
        t = time.perf_counter()
        s.sendall(msg)
        recv_exact(s, size)
        rtts.append((time.perf_counter() - t) * 1e3)
    s.close()
    total = int(mb * 1e6)
    b = socket.create_connection((addr, port), timeout=TIMEOUT_S)
    block = b"y" * (1 << 20)
    t = time.perf_counter()
    b.sendall(str(total).encode().ljust(16))
    sent = 0
    while sent < total:
        part = block[: total - sent]
        b.sendall(part)
        sent += len(part)
    recv_exact(b, 1)
    secs = time.perf_counter() - t
    b.close()
    q = statistics.quantiles(rtts, n=10)
    return {"rtt_ms_median": round(statistics.median(rtts), 4), "rtt_ms_p10": round(q[0], 4),
            "rtt_ms_p90": round(q[-1], 4), "rtt_ms_min": round(min(rtts), 4), "count": count,
            "size": size, "bulk_mb": mb, "bandwidth_mbit": round(total * 8 / secs / 1e6, 1)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["ping"]:
        a = sys.argv[2:]
        print(json.dumps(ping(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]))))
    else:
        sys.exit("usage: netns_probe.py serve ADDR PORT | ping ADDR PORT COUNT SIZE MB")

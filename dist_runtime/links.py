"""Measure one network link, as the pipeline's activations cross it: round trip and bandwidth.

Two ends, each started on its own host (`launch/hostfile.py check` starts them over the
same ssh path it reaches the hosts by, dist_runtime/ring_links.py):

    python3 links.py serve --bind 192.168.100.2 --deadline 20
        -> prints {"port": P}, then serves one client and exits
    python3 links.py measure --to 192.168.100.2:P --token T --deadline 20
        -> prints {"rtt_s": ..., "bytes_per_s": ..., ...}

The client runs on host i and connects to host i+1 at the hostfile's address, so the
measurement takes the route the ring backend's connection takes (whatever interface the
routing table picks for that address: the Wi-Fi case shows up here). Round trip: the
median of `--pings` small messages echoed back (TCP_NODELAY, as the ring sets it, so no
message waits for Nagle). Bandwidth: a block sent and acknowledged, doubled from 1 MB
until it takes `--bulk-seconds` or reaches `--max-bytes`; bytes over the time to the
acknowledgement less one round trip.

Standard library only, and no import of this project: the checking tool sends this
file's source with `python3 -c`, so a host needs nothing but Python. Every wait (accept,
connect, each receive) has the deadline; a stray connection without the token is closed.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time

PING_BYTES = 64  # a small message: the round trip is latency, not bandwidth
PINGS = 20
FIRST_BULK = 1 << 20  # bytes of the first bulk block; doubled until it is slow enough
MAX_BULK = 64 << 20
BULK_SECONDS = 0.25  # a block this slow measures bandwidth, not latency
CHUNK = 1 << 16
TOKEN_BYTES = 32
PING, BULK, QUIT = b"P", b"B", b"Q"


class ProbeError(RuntimeError):
    """The probe could not finish: what it waited for and why."""


class Deadline:
    """Seconds left until a fixed moment; every socket wait takes its timeout from it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise ProbeError(f"deadline passed while {what}")
        return left

    def arm(self, sock, what: str):
        sock.settimeout(self.left(what))


def split_address(text: str) -> tuple:
    """'10.0.0.2:4000' or '[fe80::1]:4000' -> (host, port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ProbeError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def recv_exact(sock, n: int, deadline: Deadline, what: str) -> bytes:
    """n bytes, or ProbeError when the peer closes or the deadline passes."""
    parts, got = [], 0
    while got < n:
        deadline.arm(sock, what)
        try:
            b = sock.recv(min(n - got, CHUNK))
        except socket.timeout:
            raise ProbeError(f"deadline passed while {what}")
        if not b:
            raise ProbeError(f"the peer closed the connection while {what}")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def send_all(sock, data, deadline: Deadline, what: str):
    view = memoryview(data)
    while view:
        deadline.arm(sock, what)
        try:
            sent = sock.send(view[:CHUNK * 16])
        except socket.timeout:
            raise ProbeError(f"deadline passed while {what}")
        view = view[sent:]


def no_delay(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve(bind: str, port: int, token: str, deadline: Deadline, out=sys.stdout) -> dict:
    """Listen on bind:port (0: any free port), print {"port": P}, serve one client that
    sends `token`: echo pings, acknowledge bulk blocks, until it quits."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lst.bind((bind, port))
        except OSError as e:
            raise ProbeError(f"cannot listen on {bind}:{port} ({e.strerror}); is {bind} an "
                             f"address of this host?")
        lst.listen(4)
        print(json.dumps({"port": lst.getsockname()[1]}), file=out, flush=True)
        while True:
            deadline.arm(lst, "waiting for the measuring host to connect")
            try:
                conn, peer = lst.accept()
            except socket.timeout:
                raise ProbeError("deadline passed while waiting for the measuring host to "
                                 "connect (a firewall, or no route between the hosts?)")
            with conn:
                no_delay(conn)
                try:
                    got = recv_exact(conn, TOKEN_BYTES, deadline, "reading the token")
                except ProbeError:
                    continue
                if got.decode(errors="replace") != token:
                    continue  # someone else's connection
                return _echo(conn, deadline) | {"peer": peer[0]}


def _echo(conn, deadline: Deadline) -> dict:
    pings = blocks = 0
    while True:
        op = recv_exact(conn, 1, deadline, "waiting for the next probe message")
        if op == PING:
            n = struct.unpack("!I", recv_exact(conn, 4, deadline, "reading a ping"))[0]
            send_all(conn, recv_exact(conn, n, deadline, "reading a ping"), deadline,
                     "echoing a ping")
            pings += 1
        elif op == BULK:
            n = struct.unpack("!Q", recv_exact(conn, 8, deadline, "reading a block"))[0]
            left = n
            while left:
                left -= len(recv_exact(conn, min(left, CHUNK * 16), deadline,
                                       "reading a block"))
            send_all(conn, b"A", deadline, "acknowledging a block")
            blocks += 1
        elif op == QUIT:
            return {"pings": pings, "blocks": blocks}
        else:
            raise ProbeError(f"unknown probe message {op!r}")


def measure(to: str, token: str, deadline: Deadline, pings: int = PINGS,
            bulk_seconds: float = BULK_SECONDS, max_bytes: int = MAX_BULK) -> dict:
    """Connect to a serving end and measure: {'rtt_s' (median), 'rtt_min_s', 'rtt_max_s',
    'bytes_per_s', 'bulk_bytes', 'bulk_s'}."""
    host, port = split_address(to)
    try:
        sock = socket.create_connection((host, port), timeout=deadline.left(
            f"connecting to {to}"))
    except socket.timeout:
        raise ProbeError(f"deadline passed while connecting to {to}")
    except OSError as e:
        raise ProbeError(f"cannot connect to {to} ({e.strerror or e})")
    with sock:
        no_delay(sock)
        send_all(sock, token.encode(), deadline, "sending the token")
        payload = bytes(PING_BYTES)
        rtts = []
        for _ in range(max(pings, 1)):
            t0 = time.perf_counter()
            send_all(sock, PING + struct.pack("!I", len(payload)) + payload, deadline,
                     "sending a ping")
            recv_exact(sock, len(payload), deadline, "waiting for a ping's echo")
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)
        size, block = FIRST_BULK, None
        while True:
            data = bytes(size)
            t0 = time.perf_counter()
            send_all(sock, BULK + struct.pack("!Q", size), deadline, "sending a block")
            send_all(sock, data, deadline, "sending a block")
            recv_exact(sock, 1, deadline, "waiting for a block's acknowledgement")
            block = (size, time.perf_counter() - t0)
            if block[1] >= bulk_seconds or size * 2 > max_bytes:
                break
            if deadline.end - time.monotonic() < block[1] * 3 + 1:
                break  # the next, twice as large, might not finish in time
            size *= 2
        send_all(sock, QUIT, deadline, "saying goodbye")
    nbytes, seconds = block
    transfer = max(seconds - rtt, seconds / 2)  # the first byte's way out, the ack's back
    return {"rtt_s": rtt, "rtt_min_s": min(rtts), "rtt_max_s": max(rtts),
            "pings": len(rtts), "bytes_per_s": nbytes / transfer, "bulk_bytes": nbytes,
            "bulk_s": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--token", required=True)
    s.add_argument("--deadline", type=float, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--to", required=True, help="host:port of the serving end")
    m.add_argument("--token", required=True)
    m.add_argument("--deadline", type=float, required=True)
    m.add_argument("--pings", type=int, default=PINGS)
    m.add_argument("--bulk-seconds", type=float, default=BULK_SECONDS)
    m.add_argument("--max-bytes", type=int, default=MAX_BULK)
    args = p.parse_args(argv)
    deadline = Deadline(args.deadline)
    try:
        if args.cmd == "serve":
            result = serve(args.bind, args.port, args.token, deadline)
        else:
            result = measure(args.to, args.token, deadline, args.pings, args.bulk_seconds,
                             args.max_bytes)
    except (ProbeError, OSError) as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

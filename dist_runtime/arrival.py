"""Sleep until a neighbour's bytes arrive, instead of spinning in mlx's ring receive.

mlx's ring backend serves each socket with a thread that, while a receive is pending,
calls recv() on the non-blocking socket in a loop (mlx/distributed/ring/ring.cpp,
SocketThread::worker): a rank that waits for its neighbour keeps a core busy for the
whole wait. Where stages share a host's cores (two ranks on one Mac, a small VM) that
core is taken from the stage that is computing; on any host it is power spent on
nothing. So before it posts a receive, the transport waits in select() until the first
bytes are readable on the socket they will come in on; the receive then finds them.

The sockets are found among this process's open files by their addresses. The ring
accepts its left neighbour's connections on this rank's own addresses and connects to
the right neighbour's, one connection per address, in order; mlx sends a message from
the left on the left sockets and splits it over them in order, so its first bytes
always come on the first one. Where the sockets are not found (another backend, such
as MPI, or an mlx that connects otherwise) `wait` returns at once and the receive
waits as mlx does.
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
from typing import Optional

from dist_runtime.hostfiles import ring_address_list
from dist_runtime.links import ProbeError, split_address


def _open_tcp_sockets() -> list:
    """(socket, local (ip, port), peer (ip, port)) for each connected TCP socket this
    process holds, each a duplicate of the original (closing it leaves the original)."""
    found = []
    names = [n for n in os.listdir("/dev/fd") if n.isdigit()]  # Linux and macOS
    for fd in sorted(map(int, names)):  # in the order they were opened (the ring's first)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except (ValueError, OSError):
            continue
        try:
            if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET,
                                                                socket.AF_INET6):
                raise OSError
            found.append((s, s.getsockname()[:2], s.getpeername()[:2]))
        except OSError:  # not TCP, or listening (no peer)
            s.close()
    return found


class Arrivals:
    """Per neighbour rank, a selector on the socket its messages come in on."""

    def __init__(self, selectors_by_rank: dict):
        self._by_rank = selectors_by_rank

    @classmethod
    def find(cls, rank: int, size: int, nodes: Optional[list] = None) -> "Arrivals":
        """The ring's sockets of rank `rank` in a ring of `size`, from its addresses
        (MLX_HOSTFILE's lists when `nodes` is None); none found: an empty Arrivals.
        Call it right after mx.distributed.init, before the process opens any other
        connection: a later one may be given the ring's (closed) listening port as its
        own local port, and a lower fd than the ring's, and would be taken for it."""
        nodes = ring_address_list() if nodes is None else nodes
        if size < 2 or not nodes or len(nodes) != size:
            return cls({})
        try:
            mine = split_address(nodes[rank][0])
            right = split_address(nodes[(rank + 1) % size][0])
        except (IndexError, TypeError, ProbeError):
            return cls({})
        left_sock = right_sock = None
        # The first match of each: the ring opens one connection per address, in order.
        for s, local, peer in _open_tcp_sockets():
            if left_sock is None and local[1] == mine[1] and _same_ip(local[0], mine[0]):
                left_sock = s
            elif right_sock is None and peer[1] == right[1] and _same_ip(peer[0], right[0]):
                right_sock = s
            else:
                s.close()
        by_rank = {}
        # As mlx does: a message from the left neighbour comes on the left sockets, and
        # from the right one (a different rank) on the right sockets.
        for src, s in (((rank + 1) % size, right_sock), ((rank - 1) % size, left_sock)):
            if s is not None:
                sel = selectors.DefaultSelector()
                sel.register(s, selectors.EVENT_READ)
                by_rank[src] = (sel, s)
        return cls(by_rank)

    @property
    def watched(self) -> list:
        """The neighbour ranks whose arrivals can be waited for."""
        return sorted(self._by_rank)

    def wait(self, src: int, seconds: float) -> bool:
        """Sleep until bytes from rank `src` are readable (or its socket closed), at most
        `seconds`; True when they are. Returns at once for a rank not watched."""
        entry = self._by_rank.get(src)
        if entry is None:
            return True
        try:
            return bool(entry[0].select(seconds))
        except (OSError, ValueError):  # the socket went away: the receive will say how
            return True

    def close(self):
        """Close the duplicates (mlx's own sockets stay open)."""
        for sel, s in self._by_rank.values():
            sel.close()
            s.close()
        self._by_rank = {}


def _same_ip(a: str, b: str) -> bool:
    """Whether a socket's address `a` is the hostfile's `b` (an IPv4-mapped IPv6
    address counts as its IPv4 one)."""
    return a.removeprefix("::ffff:") == b.removeprefix("::ffff:")

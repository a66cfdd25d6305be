"""A rank that hears from no other rank at once holds its verdict, then blames itself.

Without the hold, the rank whose link went down names the first peer whose heartbeat is
overdue, and under mlx.launch over ssh its line is often the only one the user sees
(mlx.launch then kills the others' ssh sessions): the wrong rank. The cluster test
(test_netns_cluster.py) shows the whole job; this one the rule, on fake peers.
"""

import time

from dist_runtime.faults import CUT_OFF, SILENT
from dist_runtime.liveness import ALL_QUIET_S, CUT_OFF_GRACE_S, UP, Liveness, Peer

TIMEOUT = 3.0


def watching(lasts: dict) -> tuple:
    """A Liveness of rank 1 of 3 whose peers beat last at now - lasts[r]; its verdicts."""
    live = Liveness(1, 3, TIMEOUT)
    verdicts = []
    live.on_verdict = verdicts.append
    now = time.monotonic()
    for rank, ago in lasts.items():
        p = Peer(rank, ["127.0.0.1"], 1)
        p.state, p.sock, p.last = UP, object(), now - ago
        live.peers[rank] = p
    return live, verdicts, now


def test_one_silent_peer_among_others_that_beat_is_named_at_once():
    live, verdicts, now = watching({0: TIMEOUT + 0.1, 2: 0.2})
    live._check(now)
    live.server.close()
    assert [(v.rank, v.reason) for v in verdicts] == [(0, SILENT)]


def test_all_peers_silent_holds_then_blames_this_rank():
    quiet = TIMEOUT + 0.1
    assert quiet > ALL_QUIET_S
    live, verdicts, now = watching({0: quiet, 2: quiet - 0.2})
    live._check(now)
    assert verdicts == [], "named a peer while every peer was quiet: it may be this rank"
    live._check(now + CUT_OFF_GRACE_S + 0.3)
    live.server.close()
    assert [(v.rank, v.reason) for v in verdicts] == [(1, CUT_OFF)]
    text = verdicts[0].describe(["rank 0 (a)", "rank 1 (b)", "rank 2 (c)"], 1)
    assert text.startswith("this rank lost every other rank at once"), text
    other = verdicts[0].describe(["rank 0 (a)", "rank 1 (b)", "rank 2 (c)"], 0)
    assert other.startswith("rank 1 (b) lost every other rank at once"), other


def test_two_ranks_keep_the_old_rule():
    """With one peer, its silence and this rank's isolation look the same: name it."""
    live = Liveness(0, 2, TIMEOUT)
    verdicts = []
    live.on_verdict = verdicts.append
    now = time.monotonic()
    p = Peer(1, ["127.0.0.1"], 1)
    p.state, p.sock, p.last = UP, object(), now - TIMEOUT - 0.1
    live.peers[1] = p
    live._check(now)
    live.server.close()
    assert [(v.rank, v.reason) for v in verdicts] == [(1, SILENT)]

"""The partition: which contiguous layers each rank holds. A pure function, no hosts.

Inputs are numbers only: each layer's weight bytes (memory) and active bytes per token
(time: an MoE layer reads only its chosen experts), each rank's memory budget, the
bytes rank 0 pays for the embedding and head, and the KV-cache bytes per layer. The
plan minimises the slowest stage's time subject to every rank's memory budget, every
layer placed exactly once, contiguous, in rank order, at least one layer per rank.
An infeasible request raises PlanError with the numbers. The rules a user's request
must meet (a --split, more ranks than layers) and the advice belong to
dist_runtime/planning.py, which calls this.

The link model is numbers too: a hop costs its latency (s) plus the bytes it carries over
its bandwidth (bytes/s); one decode step crosses every hop of the ring once (mlx's ring
backend sends only to direct neighbours, so every listed rank is a hop, with or without
work) and reads every stage's active bytes at that host's read rate. `fewest_hosts_time`
compares the steps on the first k hosts and says when fewer are clearly faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

GB = 1e9


class PlanError(ValueError):
    """No plan can satisfy the request; the message has the numbers and a fix."""


@dataclass(frozen=True)
class Plan:
    """ranges[r] = range of global layer indices rank r runs."""

    ranges: tuple

    def describe(self) -> list:
        """[[start, end], ...] for JSON output."""
        return [[r.start, r.stop] for r in self.ranges]


def stage_memory(layers: range, weight_bytes, kv_bytes, extra: int) -> int:
    """Bytes a stage needs: its layers' weights and KV room, plus fixed extras."""
    return sum(weight_bytes[i] + kv_bytes[i] for i in layers) + extra


def ranges_from_counts(counts: Sequence[int]) -> tuple:
    """[3, 5, 4] -> (range(0,3), range(3,8), range(8,12))."""
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return tuple(out)


def _greedy(limit_time: float, time_cost, mem_cost, budgets, extra_time, extra_mem):
    """Fill ranks in order, each as far as time and memory allow; None if layers remain."""
    n_layers, n_ranks = len(time_cost), len(budgets)
    counts, i = [], 0
    for r in range(n_ranks):
        t, m, c = extra_time[r], extra_mem[r], 0
        ranks_after = n_ranks - r - 1
        while i < n_layers - ranks_after:
            if c > 0 and (t + time_cost[i] > limit_time or m + mem_cost[i] > budgets[r]):
                break
            if c == 0 and m + mem_cost[i] > budgets[r]:
                return None
            t, m, c, i = t + time_cost[i], m + mem_cost[i], c + 1, i + 1
        if c == 0:
            return None
        counts.append(c)
    return counts if i == n_layers else None


def plan_layers(weight_bytes: Sequence[int], active_bytes: Sequence[int],
                budgets: Sequence[int], head_bytes: int = 0,
                kv_bytes: Optional[Sequence[int]] = None, head_time: Optional[int] = None,
                hosts: Optional[Sequence[str]] = None) -> Plan:
    """The plan; see the module docstring. Budgets and costs in bytes.

    head_bytes: embedding + final norm + LM head, all on rank 0.
    head_time: what of those a token reads (the LM head and norm; an embedding lookup
    reads one row); head_bytes when not given.
    kv_bytes: per layer, the KV cache the run may fill.
    """
    n_layers, n_ranks = len(weight_bytes), len(budgets)
    kv_bytes = list(kv_bytes) if kv_bytes is not None else [0] * n_layers
    hosts = list(hosts) if hosts is not None else [f"rank {r}" for r in range(n_ranks)]
    mem_cost = [w + k for w, k in zip(weight_bytes, kv_bytes)]
    extra_mem = [head_bytes] + [0] * (n_ranks - 1)
    head_time = head_bytes if head_time is None else head_time
    extra_time = [head_time] + [0] * (n_ranks - 1)
    total_mem = sum(mem_cost) + head_bytes
    if total_mem > sum(budgets):
        raise PlanError(
            f"the model needs {total_mem / GB:.2f} GB (weights + KV room) but the "
            f"{n_ranks} hosts have {sum(budgets) / GB:.2f} GB available together; add a host, "
            f"use a quantized checkpoint, or shorten --max-kv-tokens")
    lo, hi = 0.0, float(sum(active_bytes) + head_time)
    best = _greedy(hi, active_bytes, mem_cost, budgets, extra_time, extra_mem)
    if best is None:
        raise PlanError(_no_fit_message(mem_cost, budgets, head_bytes, hosts))
    for _ in range(60):  # bisection on the slowest stage's time
        mid = (lo + hi) / 2
        counts = _greedy(mid, active_bytes, mem_cost, budgets, extra_time, extra_mem)
        if counts is None:
            lo = mid
        else:
            hi, best = mid, counts
    return Plan(ranges_from_counts(best))


def _no_fit_message(mem_cost, budgets, head_bytes, hosts) -> str:
    biggest = max(mem_cost)
    return (f"no contiguous split fits: layers need up to {biggest / GB:.2f} GB each, rank 0 "
            f"also holds {head_bytes / GB:.2f} GB of embedding and head, and the budgets are "
            + ", ".join(f"{h}: {b / GB:.2f} GB" for h, b in zip(hosts, budgets)))


def ring_hops(n: int) -> list:
    """[(i, i+1 mod n)] for n >= 2 hosts: the hops a decode step crosses, in order."""
    return [(i, (i + 1) % n) for i in range(n)] if n > 1 else []


def closing_hops(n: int) -> list:
    """[(k-1, 0)] for k = 2..n-1: the hops that close a ring of the first k hosts (the
    others are hops of the full ring already)."""
    return [(k - 1, 0) for k in range(2, n)]


def hop_seconds(nbytes: float, latency_s: float, bytes_per_s: float) -> float:
    """Time one message of nbytes takes over a hop."""
    return latency_s + nbytes / bytes_per_s


def step_seconds(stage_bytes: Sequence[float], read_rates: Sequence[float],
                 hops: Sequence[tuple], hop_bytes: float) -> tuple:
    """(compute s, network s) of one decode step through a ring: each stage reads its
    active bytes at its host's rate (bytes/s), then its output crosses one hop
    ((latency s, bytes/s) each, one per stage: the last closes the ring to rank 0)."""
    compute = sum(b / r for b, r in zip(stage_bytes, read_rates))
    network = sum(hop_seconds(hop_bytes, lat, bw) for lat, bw in hops)
    return compute, network


def fewest_hosts_time(times: Sequence[Optional[float]], margin: float) -> Optional[int]:
    """times[k-1]: a decode step's seconds on the first k hosts (None where the model does
    not fit them or a link is unknown); the last entry is all hosts. The k (< all) with
    the shortest time when that is faster than all hosts by more than `margin` (0.15:
    all hosts take over 15% longer), else None."""
    if not times or times[-1] is None:
        return None
    known = [(t, k) for k, t in enumerate(times[:-1], start=1) if t is not None]
    if not known:
        return None
    best, k = min(known)
    return k if times[-1] > best * (1 + margin) else None

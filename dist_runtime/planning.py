"""Planning: which layers each rank holds, checked against what each host can use.

The one owner of the plan's rules. Budgets come from each host's available memory
(gathered at start, dist_runtime/cluster.py), on a Mac also from what Metal keeps
resident (its recommended working set, dist_runtime/metal.py), and `--memory-limit`; KV
room for `--max-kv-tokens` counts against them; rank 0 also pays for the embedding and
head. A `--split` is validated here (one count per rank, each at least 1, adding up to
the layers, fitting every host); otherwise the partition (dist_runtime/partition.py, a
pure function) finds the fastest plan that fits. Every refusal names the host, the
numbers and a fix: a raised GPU wired limit (the sysctl per Mac), a --split that fits, a
--max-kv-tokens that fits, or what is missing. How much each Metal rank wires for its
stage (`wired_limit`) is decided here too, from the same numbers.

With the ring's links measured (`launch/hostfile.py check --save`), `host_count_advice`
prices a decode step on the first k hosts, k = 1..n, each with its plan by memory: the
stages' reads at an assumed rate per host plus every hop's latency and the step's
activations over its bandwidth. Every listed host is a hop (mlx's ring sends only to
direct neighbours, so a rank with no layers could not be skipped), so the only way to
fewer hops is fewer hosts: when those fit the model and are clearly faster, the advice
says so with the numbers and which hosts to keep. A warning, never a refusal; without
measured links nothing changes.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

from dist_runtime.partition import (Plan, PlanError, fewest_hosts_time, plan_layers,
                                    ranges_from_counts, ring_hops, stage_memory, step_seconds)

MEMORY_FRACTION = 0.85  # of available memory a rank may plan to fill (OS, activations)
# Of what Metal keeps resident, the share a rank may plan to fill: its stage's weights and
# KV room are wired there (`wired_limit`); the rest is for activations.
WORKING_SET_FRACTION = 0.9
MiB, GiB = 2**20, 2**30
# A raised GPU wired limit leaves macOS at least this much RAM, or this share, the larger.
WIRED_RESERVE = 8 * GiB
WIRED_RESERVE_FRACTION = 0.1
WIRED_LIMIT_SYSCTL = "iogpu.wired_limit_mb"  # MiB the GPU may wire; 0: the macOS default
# Bytes of weights a rank reads per second while decoding, to weigh a step's compute
# against its hops. Assumptions, not measurements: Apple silicon's GPUs read at 120
# (M4 Pro: 273 GB/s peak) to 800 GB/s (Ultra) and decode reaches a good share of it;
# this project's CPU ranks decoded `small` (15 MB a token) at ~100 tokens/s on 2 cores.
READ_RATE_METAL = 200e9
READ_RATE_OTHER = 2e9
FEWER_HOSTS_MARGIN = 0.15  # fewer hosts are advised when all of them take this much longer



def fmt_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as memory is sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def counts_text(counts) -> str:
    """[1, 2, 1] -> '1,2,1'."""
    return ",".join(str(c) for c in counts)



def parse_memory_limits(text: str) -> list:
    """argparse type for --memory-limit: '64' or '64,48.5' (GB) -> [GB, ...]."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--memory-limit takes GB per rank, e.g. 64 or 64,48; got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--memory-limit values must be finite numbers of GB "
                                         f"above 0, e.g. 64 or 64,48; got {text!r}")
    return values


def percent(fraction: float) -> str:
    """0.85 -> '85%'."""
    return f"{round(fraction * 100)}%"


def _budget(info, cap: Optional[int], working_set: int) -> tuple:
    """(bytes one rank may plan to fill, why): MEMORY_FRACTION of its available RAM; on
    Metal at most WORKING_SET_FRACTION of what Metal keeps resident (`working_set`); at
    most its --memory-limit (`cap`)."""
    b = int(info.available * MEMORY_FRACTION)
    w = f"{percent(MEMORY_FRACTION)} of its {fmt_bytes(info.available)} available"
    if info.metal and working_set and int(working_set * WORKING_SET_FRACTION) < b:
        b = int(working_set * WORKING_SET_FRACTION)
        w = (f"{percent(WORKING_SET_FRACTION)} of the {fmt_bytes(working_set)} that Metal keeps "
             f"resident, its GPU wired limit; {fmt_bytes(info.available)} of RAM available")
    if cap is not None and cap < b:
        b, w = cap, f"its --memory-limit {cap / 1e9:g} GB"
    return b, w


def max_wired_limit(info) -> int:
    """The largest GPU wired limit this project advises for a Mac (bytes, whole MiB): its
    RAM less WIRED_RESERVE or WIRED_RESERVE_FRACTION of it, the larger; 0 off Metal."""
    if not info.metal or not info.memory:
        return 0
    keep = max(WIRED_RESERVE, int(info.memory * WIRED_RESERVE_FRACTION))
    return max(0, (info.memory - keep) // MiB * MiB)


def budgets_for(infos: list, limits: Optional[list] = None, raised: bool = False) -> tuple:
    """(bytes each rank may plan to fill, why) from available memory, what Metal keeps
    resident and --memory-limit. `raised`: as if each Mac's GPU wired limit were raised to
    `max_wired_limit` (for the advice)."""
    n = len(infos)
    if limits is not None and len(limits) not in (1, n):
        raise PlanError(f"--memory-limit has {len(limits)} values but the job has {n} ranks; "
                        f"give one value for all, or one per rank")
    budgets, why = [], []
    for r, info in enumerate(infos):
        cap = None if limits is None else int(limits[0 if len(limits) == 1 else r] * 1e9)
        ws = max(info.working_set, max_wired_limit(info)) if raised else info.working_set
        b, w = _budget(info, cap, ws)
        budgets.append(b)
        why.append(w)
    return budgets, why


def stage_bytes(costs, rng: range, rank: int, kv: list) -> int:
    """A stage's memory: its layers' weights and KV room (`kv`: bytes per layer), and on
    rank 0 the embedding and head."""
    return stage_memory(rng, costs.weight, kv, costs.head if rank == 0 else 0)


def kv_room_bytes(costs, max_kv_tokens: int, max_batch: int = 1, kept: int = 0) -> list:
    """Per layer, the KV room reserved for max_batch sequences of max_kv_tokens each, and
    `kept` positions more (a server's prompt cache: finished sequences kept for reuse)."""
    return [k * (max_kv_tokens * max_batch + kept) for k in costs.kv_per_token]


def wired_limit(costs, ranges: list, rank: int, info, max_kv_tokens: int,
                max_batch: int = 1, kept: int = 0) -> Optional[int]:
    """Bytes this rank keeps resident for the job (dist_runtime/metal.py wires them): its
    stage's weights and KV room; None off Metal (nothing is wired there). Never above
    what Metal keeps resident, as mlx refuses more; the plan kept it within its budget."""
    if not info.metal or not info.working_set:
        return None
    need = stage_bytes(costs, ranges[rank], rank, kv_room_bytes(costs, max_kv_tokens,
                                                                max_batch, kept))
    return min(need, info.working_set)


def wired_limit_mb_for(need: int) -> int:
    """The iogpu.wired_limit_mb with which a Mac's budget holds `need` bytes, rounded up to
    whole GiB (in MiB, the sysctl's unit)."""
    mb = math.ceil(need / WORKING_SET_FRACTION / MiB)
    return -(-mb // 1024) * 1024


def _wired_now(info) -> str:
    if info.wired_limit_mb == 0:
        return f"{WIRED_LIMIT_SYSCTL} is 0, the macOS default"
    if info.wired_limit_mb > 0:
        return f"{WIRED_LIMIT_SYSCTL} is {info.wired_limit_mb}"
    return f"{WIRED_LIMIT_SYSCTL} unknown"


def _wired_advice(costs, infos: list, limits: Optional[list], kv: list,
                  ranges: Optional[list] = None) -> str:
    """When `ranges` (else the plan by memory) fit only once some Mac's GPU may keep more
    resident: 'raise the GPU wired limit ...' with the sysctl and value per host; else ''."""
    budgets, _ = budgets_for(infos, limits)
    raised, _ = budgets_for(infos, limits, raised=True)
    if raised == budgets:
        return ""
    if ranges is None:
        plan = _auto(costs, raised, kv, [i.name for i in infos])
        if plan is None:
            return ""
        ranges = plan.ranges
    needs = [stage_bytes(costs, rng, r, kv) for r, rng in enumerate(ranges)]
    if any(need > b for need, b in zip(needs, raised)):
        return ""
    steps = []
    for info, need, b in zip(infos, needs, budgets):
        if need > b:
            mb = min(wired_limit_mb_for(need), max_wired_limit(info) // MiB)
            steps.append(f"sudo sysctl {WIRED_LIMIT_SYSCTL}={mb} on {info.name}, where Metal "
                         f"keeps {fmt_bytes(info.working_set)} resident now "
                         f"({_wired_now(info)})")
    return (f"raise the GPU wired limit, and it fits: {', and '.join(steps)} (it lasts until "
            f"the next restart; see 'Your cluster' in the README)")


def _auto(costs, budgets, kv, names) -> Optional[Plan]:
    try:
        return plan_layers(costs.weight, costs.active, budgets, head_bytes=costs.head,
                           kv_bytes=kv, hosts=names, head_time=costs.head_active)
    except PlanError:
        return None


def _kv_that_fits(costs, budgets, names, max_kv: int, batch: int = 1, kept: int = 0) -> int:
    """The largest --max-kv-tokens below max_kv with which some plan fits (for `batch`
    sequences at once, and `kept` positions more), or 0."""
    def fits(k):
        return _auto(costs, budgets, kv_room_bytes(costs, k, batch, kept), names) is not None

    lo, hi = 0, max_kv - 1
    if hi < 1 or not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def kv_room(max_kv: int, batch: int, kept: int = 0) -> str:
    """How the KV room was asked for, for messages."""
    return (f"--max-kv-tokens {max_kv}" + (f" x --max-batch {batch}" if batch > 1 else "")
            + (f" + --prompt-cache-tokens {kept}" if kept else ""))


def _no_fit_fixes(costs, budgets, names, max_kv: int, need: int, batch: int = 1,
                  kept: int = 0) -> str:
    """The ways out when no plan fits: hosts too small, less KV room, more memory,
    quantization; joined with 'or'."""
    fixes = []
    smallest = min(w + k for w, k in zip(costs.weight, kv_room_bytes(costs, max_kv, batch,
                                                                      kept)))
    empty = [nm for r, (nm, b) in enumerate(zip(names, budgets))
             if b < smallest + (costs.head if r == 0 else 0)]
    if empty:
        head = " (rank 0 also the embedding and head)" if names[0] in empty else ""
        fixes.append(f"{', '.join(empty)} cannot hold even one layer ({fmt_bytes(smallest)} "
                     f"with its KV room{head}): give it more memory or leave it out of the "
                     f"hostfile")
    k = _kv_that_fits(costs, budgets, names, max_kv, batch, kept)
    if k:
        fixes.append(f"--max-kv-tokens {k} fits (the prompt and the generated tokens must "
                     f"stay under it)")
    if batch > 1 and _kv_that_fits(costs, budgets, names, max_kv + 1, 1, kept) == max_kv:
        fixes.append("a smaller --max-batch (1 fits)")
    if kept and _kv_that_fits(costs, budgets, names, max_kv + 1, batch) == max_kv:
        fixes.append("a smaller --prompt-cache-tokens (0 fits)")
    short = need - sum(budgets)
    if short > 0:
        fixes.append(f"add a host with {fmt_bytes(short)} more free memory")
    if not costs.quantized:
        fixes.append("use a quantized checkpoint (--bits 4 with --synthetic)")
    return "; or ".join(fixes)


def make_plan(costs, infos: list, max_kv_tokens: int, split: Optional[list],
              limits: Optional[list] = None, max_batch: int = 1, kept: int = 0) -> Plan:
    """The plan, or a PlanError naming the host that does not fit and a fix. KV room is
    reserved for max_batch sequences of max_kv_tokens positions each, and `kept`
    positions more (a server's prompt cache)."""
    names = [i.name for i in infos]
    n, n_layers = len(infos), len(costs.weight)
    budgets, why = budgets_for(infos, limits)
    kv = kv_room_bytes(costs, max_kv_tokens, max_batch, kept)
    if n > n_layers:
        raise PlanError(f"the job has {n} ranks but the model has only {n_layers} layers, and "
                        f"every rank needs at least one; list at most {n_layers} hosts in "
                        f"the hostfile")
    auto = _auto(costs, budgets, kv, names)
    need_all = sum(costs.weight) + sum(kv) + costs.head
    if split is not None:
        def fix(ranges: Optional[tuple] = None) -> str:
            """The way out of a refused --split (only worked out when one is refused);
            `ranges`: a well-formed split that does not fit, which a raised GPU wired
            limit may make fit."""
            text = (f"--split {counts_text(len(r) for r in auto.ranges)} fits every host's "
                    f"memory (or leave --split out to plan by memory)" if auto is not None else
                    f"e.g. --split {counts_text(even_split(n_layers, n))}, though no split "
                    f"fits the hosts' memory: " + _no_fit_fixes(costs, budgets, names,
                                                               max_kv_tokens, need_all,
                                                               max_batch, kept))
            wired = _wired_advice(costs, infos, limits, kv, ranges) if ranges else ""
            return f"{wired}; or {text}" if wired else text

        return _checked_split(list(split), costs, kv, budgets, why, names,
                              kv_room(max_kv_tokens, max_batch, kept), fix)
    if auto is not None:
        return auto
    hosts = ", ".join(f"{nm} can use {fmt_bytes(b)} ({w})" for nm, b, w in zip(names, budgets, why))
    raise PlanError(
        f"the model does not fit these {n} hosts: it needs {fmt_bytes(need_all)} "
        f"({fmt_bytes(sum(costs.weight) + costs.head)} of weights + {fmt_bytes(sum(kv))} of KV "
        f"room for {kv_room(max_kv_tokens, max_batch, kept)}; its largest layer "
        f"{fmt_bytes(max(w + k for w, k in zip(costs.weight, kv)))}, and rank 0 also holds "
        f"{fmt_bytes(costs.head)} of embedding and head), and no contiguous split keeps every "
        f"host within its memory: {hosts}. Fix: "
        + "; or ".join(f for f in (_wired_advice(costs, infos, limits, kv),
                                   _no_fit_fixes(costs, budgets, names, max_kv_tokens,
                                                 need_all, max_batch, kept)) if f))


def _checked_split(split: list, costs, kv: list, budgets: list, why: list, names: list,
                   room: str, fix: Callable[..., str]) -> Plan:
    """A user's --split as a Plan: one count per rank, each at least 1, adding up to the
    layers, every rank within its budget; else PlanError ending with what `fix` says
    (given the ranges when they are well formed but do not fit)."""
    n, n_layers, text = len(names), len(costs.weight), counts_text(split)
    if len(split) != n:
        raise PlanError(f"--split {text} has {len(split)} layer counts but the job has {n} "
                        f"ranks (one per host in the hostfile); {fix()}")
    bad = [r for r, c in enumerate(split) if c <= 0]
    if bad:
        raise PlanError(f"--split {text} gives {names[bad[0]]} {split[bad[0]]} layers; every "
                        f"rank needs at least 1; {fix()}")
    if sum(split) != n_layers:
        raise PlanError(f"--split {text} adds up to {sum(split)} layers but the model has "
                        f"{n_layers}; {fix()}")
    ranges = ranges_from_counts(split)
    for r, rng in enumerate(ranges):
        w = sum(costs.weight[i] for i in rng)
        k = sum(kv[i] for i in rng)
        head = costs.head if r == 0 else 0
        if w + k + head > budgets[r]:
            parts = f"{fmt_bytes(w)} of weights + {fmt_bytes(k)} of KV room for {room}"
            if head:
                parts += f" + {fmt_bytes(head)} of embedding and head"
            raise PlanError(
                f"--split {text}: {names[r]} would hold layers {rng.start}..{rng.stop - 1} "
                f"({len(rng)} layers), needing {parts} = {fmt_bytes(w + k + head)}, but it "
                f"can use {fmt_bytes(budgets[r])} ({why[r]}); {fix(ranges)}")
    return Plan(ranges)


def even_split(n_layers: int, n: int) -> list:
    """Layer counts as equal as can be, the extra layers on the last ranks."""
    base, extra = divmod(n_layers, n)
    return [base + (1 if r >= n - extra else 0) for r in range(n)]


def read_rate(info) -> float:
    """Assumed bytes/s of weights a rank reads while decoding (see READ_RATE_METAL)."""
    return READ_RATE_METAL if info.metal else READ_RATE_OTHER


def step_estimates(costs, infos: list, hops: dict, max_kv_tokens: int,
                   limits: Optional[list] = None, max_batch: int = 1, kept: int = 0) -> list:
    """Per k = 1..n: None where the first k hosts cannot hold the model (or a hop of
    their ring was not measured), else (compute s, network s, plan) of one decode step
    of max_batch sequences on them. `hops`: {(from, to): (latency s, bytes/s)}."""
    kv = kv_room_bytes(costs, max_kv_tokens, max_batch, kept)
    hop_bytes = costs.hidden_bytes * max_batch  # [batch, 1, hidden] crosses every hop
    out = []
    for k in range(1, len(infos) + 1):
        ring = ring_hops(k)
        if k > len(costs.weight) or any(h not in hops for h in ring):
            out.append(None)
            continue
        lim = limits if limits is None or len(limits) == 1 else limits[:k]
        budgets, _ = budgets_for(infos[:k], lim)
        plan = _auto(costs, budgets, kv, [i.name for i in infos[:k]])
        if plan is None:
            out.append(None)
            continue
        reads = [sum(costs.active[i] for i in rng) + (costs.head_active if r == 0 else 0)
                 for r, rng in enumerate(plan.ranges)]
        compute, network = step_seconds(reads, [read_rate(i) for i in infos[:k]],
                                         [hops[h] for h in ring], hop_bytes)
        out.append((compute, network, plan))
    return out


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms"


def host_count_advice(costs, infos: list, hops: Optional[dict], max_kv_tokens: int,
                      limits: Optional[list] = None, max_batch: int = 1,
                      fix: Optional[Callable[[int], str]] = None,
                      est: Optional[list] = None, kept: int = 0) -> Optional[str]:
    """The warning when the first k < n hosts would decode clearly faster than all n over
    the measured links, with the numbers and `fix(k)` (how to keep those hosts; by default
    it names them); None when all hosts are best, the links are unknown, or fewer hosts
    cannot hold the model. `est`: step_estimates' result when the caller has it."""
    if not hops or len(infos) < 2:
        return None
    if est is None:
        est = step_estimates(costs, infos, hops, max_kv_tokens, limits, max_batch, kept)
    k = fewest_hosts_time([None if e is None else e[0] + e[1] for e in est],
                          FEWER_HOSTS_MARGIN)
    if k is None:
        return None
    n = len(infos)
    (c_all, n_all, _), (c_k, n_k, plan_k) = est[-1], est[k - 1]
    kept = ", ".join(i.name for i in infos[:k])
    hop_text = (f"{k} hops, {_ms(n_k)}" if k > 1 else "no hops")
    fix_text = fix(k) if fix else (f"keep only the hostfile's first {k} entries ({kept}), "
                                   f"e.g. python launch/hostfile.py write --hosts <their ssh "
                                   f"names> --ips <their ips>")
    return (f"the links make this job slower than fewer hosts would: a decode step of "
            f"{max_batch} sequence{'s' if max_batch > 1 else ''} takes about {_ms(c_all + n_all)} on all {n} hosts "
            f"({_ms(c_all)} reading weights, {_ms(n_all)} in {n} hops over the measured "
            f"links), but about {_ms(c_k + n_k)} on the first {k} ({kept}; {hop_text}), "
            f"which hold the model (--split {counts_text(len(r) for r in plan_k.ranges)}). "
            f"Every host in the hostfile is a hop (the ring backend sends only to the next "
            f"rank). Fix: {fix_text}; or connect the hosts by faster links (Thunderbolt, "
            f"Ethernet) and measure again with python launch/hostfile.py check --save")

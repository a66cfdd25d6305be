"""Checks before any weight is read, so a bad job fails in seconds with a fix, not after
a 100 GB load or as a hang.

- Hostfiles: the one mlx.launch reads (valid JSON, an `ssh` name per host, IPs for the
  ring backend, no address shared by two machines, no loopback address next to remote
  hosts) and the ring's own address list (MLX_HOSTFILE: no ip:port twice). Used by
  `launch/hostfile.py check` and, for MLX_HOSTFILE, by every rank at start.
- Agreement: every rank opens its model (config, safetensors headers, and on rank 0 the
  tokenizer and prompt) and the facts travel in one gather: a rank that could not open
  its model, different mlx or project versions, different command lines, configs or
  weight files, a prompt longer than the context. Every rank runs the same checks on the
  same facts, so all stop together, each naming the rank at fault.
- Plan fit: each rank's share of the weights plus its KV room against what that host
  can use. A failure names the host and the numbers, and proposes a --split that fits
  (or the --max-kv-tokens that would, or how much memory is missing).
- After loading, a second gather (`ready_barrier`) tells every rank whether the others
  loaded: a rank with an unreadable or corrupt file names the file, the others name it.

Every message names the rank and host, says what is wrong with the value, and the fix;
the README's Troubleshooting section lists them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from dist_runtime.cluster import MEMORY_FRACTION, gather_json
from dist_runtime.errors import PreflightError
from dist_runtime.partition import Plan, PlanError, plan_layers, ranges_from_counts

FACTS_BYTES = 4096  # one rank's preflight facts in the gather
STATUS_BYTES = 2048  # one rank's after-loading status
MAX_ERROR_CHARS = 1500
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BACKENDS = ("ring", "mpi", "nccl", "jaccl", "jaccl-ring")
HOST_KEYS = ("ssh", "ips", "rdma")
WRITE_HINT = "python launch/hostfile.py write --hosts a,b --ips IP_A,IP_B -o hostfiles/x.json"


# -- numbers --------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as memory is sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def counts_text(counts) -> str:
    """[1, 2, 1] -> '1,2,1'."""
    return ",".join(str(c) for c in counts)


# -- hostfiles ------------------------------------------------------------------------------


@dataclass
class Problem:
    """One finding about a hostfile: 'error' stops a job, 'warning' may not."""

    level: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def _is_ip(text) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except (ValueError, TypeError):
        return False


def load_hostfile(path) -> tuple:
    """(data or None, problems) for the mlx.launch hostfile at `path`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        return None, [Problem("error", f"cannot read hostfile {path}: {e.strerror}; check the "
                                       f"path, or write one with {WRITE_HINT}")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [Problem("error", f"hostfile {path} is not valid JSON: {e.msg} at line "
                                       f"{e.lineno}, column {e.colno}; fix it (a trailing "
                                       f"comma? single quotes?) or write it with {WRITE_HINT}")]
    return data, check_hostfile_data(data, str(path))


def check_hostfile_data(data, where: str = "the hostfile") -> list:
    """Problems with an mlx.launch hostfile's content (see the module docstring)."""
    problems = []

    def error(msg):
        problems.append(Problem("error", msg))

    def warn(msg):
        problems.append(Problem("warning", msg))

    if isinstance(data, list):
        hosts, backend, envs = data, "", []
    elif isinstance(data, dict):
        if "hosts" not in data:
            error(f"{where} has no \"hosts\" list; it needs {{\"backend\": \"ring\", \"hosts\": "
                  f"[{{\"ssh\": \"mac1.local\", \"ips\": [\"192.168.1.2\"]}}, ...]}}")
            return problems
        hosts, backend, envs = data["hosts"], data.get("backend", ""), data.get("envs", [])
    else:
        error(f"{where} holds a JSON {type(data).__name__}; it needs an object with a "
              f"\"hosts\" list")
        return problems
    if not isinstance(hosts, list) or not hosts:
        error(f"{where}: \"hosts\" must be a non-empty list of {{\"ssh\": ..., \"ips\": [...]}}, "
              f"one per rank (rank 0 first)")
        return problems
    if backend not in ("",) + BACKENDS:
        error(f"{where}: unknown backend {backend!r}; use one of {', '.join(BACKENDS)} "
              f"(ring for TCP over Ethernet or Thunderbolt)")
    backend = backend or "ring"
    if not isinstance(envs, list):
        error(f"{where}: \"envs\" must be a list of \"NAME=value\" strings")
        envs = []
    for e in envs:
        key = e.split("=", 1)[0] if isinstance(e, str) else ""
        if not isinstance(e, str) or "=" not in e or not key or \
                not all(c.isalnum() or c == "_" for c in key):
            error(f"{where}: envs entry {e!r} is not \"NAME=value\" (mlx.launch ignores it); "
                  f"write e.g. \"MLX_METAL_FAST_SYNCH=1\"")
    remote = [i for i, h in enumerate(hosts)
              if isinstance(h, dict) and h.get("ssh") not in LOCAL_HOSTS]
    seen_ips: dict = {}
    ip_counts = set()
    for i, h in enumerate(hosts):
        if not isinstance(h, dict):
            error(f"{where}: host {i} is a {type(h).__name__}, not an object like "
                  f"{{\"ssh\": \"mac1.local\", \"ips\": [\"192.168.1.2\"]}}")
            continue
        ssh = h.get("ssh")
        label = f"host {i} ({ssh})" if isinstance(ssh, str) and ssh else f"host {i}"
        if not isinstance(ssh, str) or not ssh.strip():
            error(f"{where}: {label} has no \"ssh\" name; add the name or address mlx.launch "
                  f"should ssh to (127.0.0.1 for this machine)")
        for key in h:
            if key not in HOST_KEYS:
                hint = " (did you mean \"ips\"?)" if key in ("ip", "IPs", "addr", "address") else ""
                warn(f"{where}: {label} has a field {key!r} that mlx.launch ignores{hint}; it "
                     f"reads {', '.join(HOST_KEYS)}")
        ips = h.get("ips", [])
        if not isinstance(ips, list):
            error(f"{where}: {label}: \"ips\" must be a list like [\"192.168.1.2\"], got {ips!r}")
            continue
        if backend == "ring":
            ip_counts.add(len(ips))
            if not ips:
                error(f"{where}: {label} has no \"ips\": the ring backend connects to IP "
                      f"addresses, not names; add \"ips\": [\"<its address>\"] (on a Mac: "
                      f"ipconfig getifaddr en0, or the Thunderbolt Bridge address)")
        for ip in ips:
            if not _is_ip(ip):
                error(f"{where}: {label}: {ip!r} in \"ips\" is not an IP address; the ring "
                      f"backend needs numeric addresses such as 192.168.1.2")
                continue
            if ipaddress.ip_address(ip).is_loopback and remote:
                first = hosts[remote[0]].get("ssh")
                error(f"{where}: {label} lists the loopback address {ip}, but host "
                      f"{remote[0]} ({first}) is another machine and cannot reach it there; "
                      f"use {label}'s LAN or Thunderbolt address")
            j = seen_ips.get(ip)
            if j is not None and hosts[j].get("ssh") != ssh:
                error(f"{where}: {label} and host {j} ({hosts[j].get('ssh')}) both list IP {ip}: "
                      f"two machines cannot have one address; give each its own")
            seen_ips.setdefault(ip, i)
        if ssh == "localhost" and backend == "ring":
            warn(f"{where}: {label}: mlx.launch starts only 127.0.0.1 without ssh; "
                 f"'localhost' goes through ssh (needs an ssh server and keys); write "
                 f"127.0.0.1 to start the rank locally")
    if backend == "ring" and len(ip_counts) > 1:
        error(f"{where}: hosts list different numbers of \"ips\" ({sorted(ip_counts)}); the ring "
              f"backend opens one connection per address to each neighbour, so every host "
              f"needs the same number")
    return problems


def check_ring_addresses(nodes, where: str = "MLX_HOSTFILE") -> list:
    """Problems with the ring backend's address list: [["ip:port", ...] per rank]."""
    problems = []
    if not isinstance(nodes, list) or not all(isinstance(n, list) and n for n in nodes):
        return [Problem("error", f"{where} must be a JSON list with one non-empty list of "
                                 f"\"ip:port\" strings per rank, e.g. [[\"10.0.0.1:32323\"], "
                                 f"[\"10.0.0.2:32324\"]]")]
    owner: dict = {}
    for r, addrs in enumerate(nodes):
        for a in addrs:
            ip, _, port = a.rpartition(":") if isinstance(a, str) else ("", "", "")
            if not _is_ip(ip) or not port.isdigit() or not 0 < int(port) < 65536:
                problems.append(Problem("error", f"{where}: rank {r}'s address {a!r} is not "
                                                 f"\"ip:port\" (e.g. 10.0.0.1:32323)"))
                continue
            if a in owner:
                problems.append(Problem(
                    "error", f"{where}: ranks {owner[a]} and {r} both listen on {a}; every "
                             f"rank needs its own ip:port (mlx.launch numbers ports up from "
                             f"--starting-port; a hand-written list must do the same)"))
            owner.setdefault(a, r)
    if len({len(n) for n in nodes}) > 1:
        problems.append(Problem("error", f"{where}: ranks list different numbers of addresses; "
                                         f"the ring needs as many connections on every rank"))
    return problems


def check_start_env(me: str):
    """At start on every rank: the ring's address list, if mlx.launch (or a user) set one."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return
    try:
        nodes = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PreflightError(f"MLX_HOSTFILE={path} cannot be read as JSON ({e}); it should "
                             f"list each rank's \"ip:port\" addresses (mlx.launch writes it)")
    errors = [p for p in check_ring_addresses(nodes, f"MLX_HOSTFILE ({path})")
              if p.level == "error"]
    if errors:
        raise PreflightError(errors[0].message)


# -- facts and agreement --------------------------------------------------------------------


@dataclass
class Facts:
    """What one rank found when it opened its model, for the agreement checks."""

    rank: int
    model: str
    args_hash: str = ""
    config: str = ""  # a short summary, for messages
    config_hash: str = ""
    costs_hash: str = ""
    weight_bytes: int = 0
    context: int = 0
    prompt_tokens: int = -1  # rank 0 only
    error: str = ""


@dataclass
class Opened:
    """This rank's model, opened but not loaded: what setup needs after the checks."""

    source: object = None
    costs: object = None
    tokenizer: object = None
    prompt: Optional[list] = None
    facts: Facts = field(default=None)


def model_for_rank(spec: str, rank: int, host: str) -> str:
    """--model with '{rank}' and '{host}' filled in: one checkpoint path per host or rank."""
    return spec.replace("{rank}", str(rank)).replace("{host}", host)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_summary(config: dict) -> str:
    """'glm4_moe, 46 layers, hidden 4096, vocab 151552, 4-bit' for messages."""
    c = config.get("text_config", config)
    parts = [str(config.get("model_type", "?"))]
    for key, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden"),
                       ("vocab_size", "vocab")):
        if key in c:
            parts.append(f"{label} {c[key]}")
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and "bits" in q:
        parts.append(f"{q['bits']}-bit")
    return ", ".join(parts)


def context_length(config: dict) -> int:
    """Positions the model was trained for (0 when the config does not say)."""
    c = config.get("text_config", config)
    return int(c.get("max_position_embeddings") or c.get("block_size") or 0)


def error_text(err: BaseException) -> str:
    """An exception as one line for a message."""
    from dist_runtime.errors import USER_ERRORS

    text = str(err) if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:MAX_ERROR_CHARS]


def open_model(args, rank: int, host: str, argv: Optional[list] = None,
               prompt: Optional[str] = None) -> Opened:
    """Open this rank's model without reading weights; errors go into the facts."""
    from dist_runtime.source import Source

    facts = Facts(rank, model_for_rank(args.model, rank, host),
                  args_hash=_hash(list(argv) if argv is not None else []))
    out = Opened(facts=facts)
    try:
        out.source = Source(facts.model, args.synthetic, args.synthetic_seed, args.dtype,
                            args.bits)
        config = out.source.config
        facts.config = config_summary(config)
        facts.config_hash = _hash({k: v for k, v in config.items() if not k.startswith("_")})
        facts.context = context_length(config)
        out.costs = out.source.costs()
        c = out.costs
        facts.costs_hash = _hash([c.weight, c.active, c.kv_per_token, c.head])
        facts.weight_bytes = sum(c.weight) + c.head
        if prompt is not None:
            from dist_runtime.tokenizer import Tokenizer

            out.tokenizer = Tokenizer(out.source.tokenizer_folder(), config)
            out.prompt = out.tokenizer.prompt_ids(prompt, chat=not args.no_chat_template)
            facts.prompt_tokens = len(out.prompt)
    except Exception as e:  # reported to every rank by check_facts
        facts.error = error_text(e)
    return out


def gather_facts(group, facts: Facts, guard=None, timeout: Optional[float] = None) -> list:
    """Every rank's Facts, in rank order (one gather)."""
    d = asdict(facts)
    while len(json.dumps(d).encode()) > FACTS_BYTES - 40:  # a long path or error: shorten
        d["error"] = d["error"][: len(d["error"]) * 3 // 4]
        d["model"] = d["model"][-(len(d["model"]) * 3 // 4):]
    rows = gather_json(group, d, FACTS_BYTES, guard, timeout,
                       what="every rank to open its model (config and weight headers)",
                       kind="model facts")
    return [Facts(**r) for r in rows]


def check_versions(infos: list) -> list:
    """Problems with mlx, project or Python versions across ranks."""
    problems = []
    first = infos[0]
    for i in infos[1:]:
        if i.mlx != first.mlx:
            problems.append(Problem("error", (
                f"mlx versions differ: {first.name} has mlx {first.mlx}, {i.name} has "
                f"{i.mlx}; install the same on every host, e.g. pip install mlx=={first.mlx} "
                f"on {i.host}")))
            break
    for i in infos[1:]:
        if i.project != first.project:
            problems.append(Problem("error", (
                f"project versions differ: {first.name} runs {first.project}, {i.name} runs "
                f"{i.project}; check out the same commit of this project on every host")))
            break
    for i in infos[1:]:
        if i.python.split(".")[:2] != first.python.split(".")[:2]:
            problems.append(Problem("warning", (
                f"Python versions differ: {first.name} has {first.python}, {i.name} has "
                f"{i.python}; it usually works, but use the same minor version to be safe")))
            break
    return problems


def check_facts(infos: list, facts: list, me: int) -> list:
    """Raise PreflightError for the first failed check (the same on every rank, except
    that the rank at fault gives its own message in full); returns warnings."""
    names = [i.name for i in infos]
    broken = [f for f in facts if f.error]
    if broken:
        if facts[me].error:
            raise PreflightError(facts[me].error)
        f = broken[0]
        also = (f" (and {', '.join(names[g.rank] for g in broken[1:])})"
                if len(broken) > 1 else "")
        raise PreflightError(f"{names[f.rank]} cannot open its model{also}: {f.error}")
    problems = check_versions(infos)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise PreflightError(errors[0].message)
    ref = facts[0]
    for f in facts[1:]:
        if f.args_hash != ref.args_hash:
            raise PreflightError(
                f"{names[f.rank]} was started with other arguments than {names[0]}; every "
                f"rank must run the same command line (start them all with one mlx.launch)")
    for f in facts[1:]:
        if f.config_hash != ref.config_hash:
            raise PreflightError(
                f"{names[f.rank]} has a different config.json than {names[0]}: {f.model} is "
                f"'{f.config}', {ref.model} is '{ref.config}'; every host needs the same "
                f"checkpoint: copy rank 0's folder to {infos[f.rank].host}")
    for f in facts[1:]:
        if f.costs_hash != ref.costs_hash:
            raise PreflightError(
                f"{names[f.rank]}'s weight files differ from {names[0]}'s ({f.model} holds "
                f"{fmt_bytes(f.weight_bytes)}, {ref.model} {fmt_bytes(ref.weight_bytes)}) though "
                f"their config.json agree; a copy is partial or from another conversion: "
                f"copy rank 0's folder to {infos[f.rank].host} again")
    if ref.context and ref.prompt_tokens >= ref.context:
        over = ref.prompt_tokens - ref.context + 1
        raise PreflightError(
            f"the prompt is {ref.prompt_tokens} tokens (tokenized on {names[0]}) but the model's "
            f"context is {ref.context} positions (max_position_embeddings in its config), and "
            f"generation needs at least one more; shorten the prompt by at least {over} tokens")
    return [p for p in problems if p.level == "warning"]


# -- plan fit -------------------------------------------------------------------------------


def parse_memory_limits(text: str) -> list:
    """argparse type for --memory-limit: '64' or '64,48.5' (GB) -> [GB, ...]."""
    import argparse

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--memory-limit takes GB per rank, e.g. 64 or 64,48; got {text!r}")
    if not all(0 < v < float("inf") for v in values):  # also refuses nan
        raise argparse.ArgumentTypeError(f"--memory-limit values must be finite numbers of GB "
                                         f"above 0, e.g. 64 or 64,48; got {text!r}")
    return values


def budgets_for(infos: list, limits: Optional[list] = None) -> tuple:
    """(bytes each rank may plan to fill, why) from available memory and --memory-limit."""
    n = len(infos)
    if limits is not None and len(limits) not in (1, n):
        raise PlanError(f"--memory-limit has {len(limits)} values but the job has {n} ranks; "
                        f"give one value for all, or one per rank")
    budgets, why = [], []
    for r, info in enumerate(infos):
        b = int(info.available * MEMORY_FRACTION)
        w = f"{int(MEMORY_FRACTION * 100)}% of its {fmt_bytes(info.available)} available"
        if limits is not None:
            cap = int(limits[0 if len(limits) == 1 else r] * 1e9)
            if cap < b:
                b, w = cap, f"its --memory-limit {cap / 1e9:g} GB"
        budgets.append(b)
        why.append(w)
    return budgets, why


def _auto(costs, budgets, kv, names) -> Optional[Plan]:
    try:
        return plan_layers(costs.weight, costs.active, budgets, head_bytes=costs.head,
                           kv_bytes=kv, hosts=names, head_time=costs.head_active)
    except PlanError:
        return None


def _kv_that_fits(costs, budgets, names, max_kv: int) -> int:
    """The largest --max-kv-tokens below max_kv with which some plan fits, or 0."""
    def fits(k):
        return _auto(costs, budgets, [b * k for b in costs.kv_per_token], names) is not None

    lo, hi = 0, max_kv - 1
    if hi < 1 or not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _no_fit_fixes(costs, budgets, names, max_kv: int, need: int) -> str:
    fixes = []
    smallest = min(w + k * max_kv for w, k in zip(costs.weight, costs.kv_per_token))
    empty = [nm for r, (nm, b) in enumerate(zip(names, budgets))
             if b < smallest + (costs.head if r == 0 else 0)]
    if empty:
        head = " (rank 0 also the embedding and head)" if names[0] in empty else ""
        fixes.append(f"{', '.join(empty)} cannot hold even one layer ({fmt_bytes(smallest)} "
                     f"with its KV room{head}): give it more memory or leave it out of the "
                     f"hostfile")
    k = _kv_that_fits(costs, budgets, names, max_kv)
    if k:
        fixes.append(f"--max-kv-tokens {k} fits (the prompt and the generated tokens must "
                     f"stay under it)")
    short = need - sum(budgets)
    if short > 0:
        fixes.append(f"add a host with {fmt_bytes(short)} more free memory")
    if not costs.quantized:
        fixes.append("use a quantized checkpoint (--bits 4 with --synthetic)")
    return "; or ".join(fixes)


def plan_with_advice(costs, infos: list, max_kv_tokens: int, split: Optional[list],
                     limits: Optional[list] = None) -> Plan:
    """The plan, or a PlanError naming the host that does not fit and a fix."""
    names = [i.name for i in infos]
    n, n_layers = len(infos), len(costs.weight)
    budgets, why = budgets_for(infos, limits)
    kv = [k * max_kv_tokens for k in costs.kv_per_token]
    if n > n_layers:
        raise PlanError(f"the job has {n} ranks but the model has only {n_layers} layers, and "
                        f"every rank needs at least one; list at most {n_layers} hosts in "
                        f"the hostfile")
    auto = _auto(costs, budgets, kv, names)
    need_all = sum(costs.weight) + sum(kv) + costs.head
    if split is not None:
        split = list(split)
        text = counts_text(split)
        fix = (f"--split {counts_text(len(r) for r in auto.ranges)} fits every host's memory "
               f"(or leave --split out to plan by memory)" if auto is not None else
               f"e.g. --split {counts_text(even_split(n_layers, n))}, though no split fits "
               f"the hosts' memory: " + _no_fit_fixes(costs, budgets, names, max_kv_tokens,
                                                      need_all))
        if len(split) != n:
            raise PlanError(f"--split {text} has {len(split)} layer counts but the job has {n} "
                            f"ranks (one per host in the hostfile); {fix}")
        bad = [r for r, c in enumerate(split) if c <= 0]
        if bad:
            raise PlanError(f"--split {text} gives {names[bad[0]]} {split[bad[0]]} layers; every "
                            f"rank needs at least 1; {fix}")
        if sum(split) != n_layers:
            raise PlanError(f"--split {text} adds up to {sum(split)} layers but the model has "
                            f"{n_layers}; {fix}")
        ranges = ranges_from_counts(split)
        for r, rng in enumerate(ranges):
            w = sum(costs.weight[i] for i in rng)
            k = sum(kv[i] for i in rng)
            head = costs.head if r == 0 else 0
            if w + k + head > budgets[r]:
                parts = f"{fmt_bytes(w)} of weights + {fmt_bytes(k)} of KV room for " \
                        f"--max-kv-tokens {max_kv_tokens}"
                if head:
                    parts += f" + {fmt_bytes(head)} of embedding and head"
                raise PlanError(
                    f"--split {text}: {names[r]} would hold layers {rng.start}..{rng.stop - 1} "
                    f"({len(rng)} layers), needing {parts} = {fmt_bytes(w + k + head)}, but it "
                    f"can use {fmt_bytes(budgets[r])} ({why[r]}); {fix}")
        return Plan(ranges)
    if auto is not None:
        return auto
    hosts = ", ".join(f"{nm} can use {fmt_bytes(b)} ({w})" for nm, b, w in zip(names, budgets, why))
    raise PlanError(
        f"the model does not fit these {n} hosts: it needs {fmt_bytes(need_all)} "
        f"({fmt_bytes(sum(costs.weight) + costs.head)} of weights + {fmt_bytes(sum(kv))} of KV "
        f"room for --max-kv-tokens {max_kv_tokens}; its largest layer "
        f"{fmt_bytes(max(w + k for w, k in zip(costs.weight, kv)))}, and rank 0 also holds "
        f"{fmt_bytes(costs.head)} of embedding and head), and no contiguous split keeps every "
        f"host within its memory: {hosts}. Fix: "
        + _no_fit_fixes(costs, budgets, names, max_kv_tokens, need_all))


def even_split(n_layers: int, n: int) -> list:
    """Layer counts as equal as can be, the extra layers on the last ranks."""
    base, extra = divmod(n_layers, n)
    return [base + (1 if r >= n - extra else 0) for r in range(n)]


# -- after loading --------------------------------------------------------------------------


def ready_barrier(group, infos: list, me: int, error: Optional[BaseException], guard=None,
                  timeout: Optional[float] = None):
    """Every rank says whether it loaded; raise the own error, or name the rank that failed."""
    text = "" if error is None else error_text(error)
    while len(json.dumps({"error": text}).encode()) > STATUS_BYTES - 40:
        text = text[: len(text) * 3 // 4]
    rows = gather_json(group, {"error": text}, STATUS_BYTES, guard, timeout,
                       what="every rank to load its layers", kind="load status")
    if error is not None:
        raise error
    failed = [(r, row["error"]) for r, row in enumerate(rows) if row.get("error")]
    if failed:
        r, msg = failed[0]
        also = "" if len(failed) == 1 else \
            f" (and {', '.join(infos[g].name for g, _ in failed[1:])})"
        raise PreflightError(f"{infos[r].name} could not load its layers{also}: {msg}")

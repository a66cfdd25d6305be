"""Agreement before any weight is read, so a bad job fails in seconds with a fix, not
after a 100 GB load or as a hang.

- Every rank opens its model (config, safetensors headers, and on rank 0 the tokenizer
  and prompt) and the facts travel in one gather: a rank that could not open its model,
  different mlx or project versions, different command lines, configs or weight files,
  a prompt longer than the context. Every rank runs the same checks on the same facts,
  so all stop together, each naming the rank at fault.
- After loading, a second gather (`ready_barrier`) tells every rank whether the others
  loaded: a rank with an unreadable or corrupt file names the file, the others name it.

Hostfiles are checked in dist_runtime/hostfiles.py, the plan in dist_runtime/planning.py.
Every message names the rank and host, says what is wrong with the value, and the fix;
the README's Troubleshooting section lists them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from dist_runtime.cluster import gather_json
from dist_runtime.errors import USER_ERRORS, PreflightError
from dist_runtime.hostfiles import Problem
from dist_runtime.planning import fmt_bytes

FACTS_BYTES = 4096  # one rank's preflight facts in the gather
STATUS_BYTES = 2048  # one rank's after-loading status
MAX_ERROR_CHARS = 1500


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


def check_kv_room(facts: list, infos: list, max_kv_tokens: int):
    """Refuse a prompt that fills the KV positions the plan reserves memory for
    (--max-kv-tokens): it would use memory the plan did not count (the same on every rank)."""
    n = facts[0].prompt_tokens
    if max_kv_tokens and n >= max_kv_tokens:
        raise PreflightError(
            f"the prompt is {n} tokens (tokenized on {infos[0].name}) but --max-kv-tokens is "
            f"{max_kv_tokens}, the KV-cache positions the plan reserves memory for, and "
            f"generation needs at least one more: pass --max-kv-tokens {n + 1} or more "
            f"(the prompt plus the tokens to generate), or shorten the prompt by at least "
            f"{n - max_kv_tokens + 1} tokens")


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

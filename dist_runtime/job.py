"""A started job: this rank's place in the ring and everything it needs to take part.

`start_job` is the one start path for run.py, bench.py, the server and the tests' jobs:
join the group, make sure every rank that joined belongs to this job, start watching
every other rank (dist_runtime/liveness.py), gather every host's facts, open the model
and agree on it (dist_runtime/preflight.py), plan (dist_runtime/planning.py), load this
rank's layers, wait until every rank has loaded, keep them resident on a Mac
(dist_runtime/metal.py: the GPU wired limit, given back by `Job.close`, at exit, and on
the error exit), and connect the ring. One Watchdog
guards every wait of the rank, from the first connection to the last message
(dist_runtime/faults.py); the liveness channel names a rank that dies or stops answering
at any point after the first exchange, however long a load or a prefill takes.

The first exchange (job identity, liveness addresses) is dist_runtime/joining.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from dist_runtime import preflight
from dist_runtime.arrival import Arrivals
from dist_runtime.cluster import distinct_devices, gather_infos, init_group
from dist_runtime.coordinator import Coordinator
from dist_runtime.faults import EXIT_PEER_LOST, Faults, Watchdog
from dist_runtime.hostfiles import check_start_env
from dist_runtime.init_watch import stop_watchers
from dist_runtime.joining import join_job, named_culprit
from dist_runtime.liveness import Liveness
from dist_runtime.partition import Plan
from dist_runtime.metal import Wiring, wire_stage
from dist_runtime.planning import fmt_bytes, make_plan, wired_limit
from dist_runtime.ring_links import advice_at_start
from dist_runtime.stage import Stage, stage_loop, test_delay
from dist_runtime.transport import Transport


@dataclass
class Job:
    """This rank's share of a started job."""

    group: object
    infos: list  # HostInfo per rank, in rank order
    plan: Plan
    stage: Stage
    source: object  # dist_runtime.source.Source: config, tokenizer folder, weights
    opened: preflight.Opened  # rank 0: the tokenizer and the prompt ids
    faults: Faults
    transport: Optional[Transport]  # None when the job has one rank
    load_s: float
    first_timeout: float
    max_batch: int
    micro_batches: Optional[int]
    wiring: Optional[Wiring] = None  # on Metal: the stage's weights kept resident
    liveness: Optional[Liveness] = None  # None when the job has one rank, or not over a ring

    def close(self):
        """Give back the GPU wired limit (on Metal; idempotent). The job's normal end."""
        if self.wiring is not None:
            self.wiring.release()

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.group.rank()

    @property
    def size(self) -> int:
        """Ranks in the job."""
        return self.group.size()

    @property
    def config(self) -> dict:
        """The model's config.json."""
        return self.source.config

    def coordinator(self, prefill_chunk: Optional[int] = None) -> Coordinator:
        """Rank 0's driver of the ring, decoding at most max_batch sequences at once."""
        return Coordinator(self.stage, self.transport, prefill_chunk, self.max_batch,
                           self.micro_batches)

    def serve_stage(self):
        """Ranks 1..N-1: run the stage loop until the coordinator says stop."""
        stage_loop(self.stage, self.transport, self.first_timeout)
        self.finish()

    def serve_as_stage(self, life) -> int:
        """Ranks 1..N-1 of a generating job or the server: the stage loop to its end, the
        wired limit given back, the 'finished' line; the rank's exit status (0)."""
        life.set("serving as a stage")
        self.serve_stage()
        self.close()
        life.finished()
        return 0

    def expect_end(self):
        """Rank 0, before it sends STOP: ranks that leave from now on end normally."""
        if self.liveness is not None:
            self.liveness.expect_end()

    def finish(self):
        """This rank's part ended normally: tell the other ranks, stop watching them."""
        if self.liveness is not None:
            self.liveness.finish()


def start_job(args, life, argv: Optional[list] = None, prompt: Optional[str] = None,
              kept_kv_tokens: int = 0) -> Job:
    """Start this rank's part of the job described by `args` (run.py's model options).
    `kept_kv_tokens`: KV positions the plan reserves beyond --max-batch sequences (a
    server's prompt cache).

    Every rank raises the same error for a failed check; a rank that cannot load raises
    its own, the others name it. `prompt` (rank 0 only) is tokenized in the checks, so a
    prompt longer than the context is refused before any weight is read.
    """
    check_start_env()
    watchdog = Watchdog(on_expire=lambda what: life.exit_with_error(what, EXIT_PEER_LOST))
    life.cleanups.append(stop_watchers)  # an exit during init skips the watcher's end
    group = init_group(life.me, min(args.start_timeout, args.load_timeout))
    rank, n = group.rank(), group.size()
    # Now, while the ring's are the only connections this rank holds (the liveness
    # channel's come next, and may reuse the ring's listening port and a lower fd).
    arrivals = Arrivals.find(rank, n)
    life.rank = rank
    argv = sys.argv[1:] if argv is None else argv
    liveness = join_job(group, life, watchdog, args, argv)
    with named_culprit(liveness):
        infos = gather_infos(group, watchdog, args.load_timeout)
        me = life.me = infos[rank].name
        life.set("checking the job before loading")
        opened = preflight.open_model(args, rank, infos[rank].host, argv,
                                      prompt=prompt if rank == 0 else None)
        facts = preflight.gather_facts(group, opened.facts, watchdog, args.load_timeout)
    for warning in preflight.check_facts(infos, facts, rank):
        print(f"[{me}] warning: {warning.message}", file=sys.stderr, flush=True)
    preflight.check_kv_room(facts, infos, args.max_kv_tokens)
    plan = make_plan(opened.costs, infos, args.max_kv_tokens, args.split, args.memory_limit,
                     args.max_batch, kept_kv_tokens)
    if rank == 0:  # measured links (hostfile.py check --save): would fewer hosts be faster?
        for advice in advice_at_start(opened.costs, infos, args.max_kv_tokens,
                                      args.memory_limit, args.max_batch,
                                      kept=kept_kv_tokens):
            print(f"[{me}] warning: {advice}", file=sys.stderr, flush=True)
    life.set("loading")
    r = plan.ranges[rank]
    print(f"[{me}] loading {json.dumps({'layers': [r.start, r.stop], 'pid': os.getpid()})}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    error, loaded = None, None
    try:
        test_delay("PIPELINE_TEST_LOAD_DELAY", rank)  # a slow disk
        loaded = opened.source.load(r, has_embed=rank == 0, has_head=rank == 0,
                                    log_prefix=f"[{me}] ")
    except Exception as e:  # the others learn it at the barrier, and name this rank
        error = e
    load_s = time.perf_counter() - t0
    if error is None:  # as soon as loaded: the ranks' lines come at different moments
        model, _config, files, nbytes = loaded
        report_stage(me, model, files, nbytes, load_s)
    with named_culprit(liveness):
        preflight.ready_barrier(group, infos, rank, error, watchdog, args.load_timeout)
    wiring = wire_stage(wired_limit(opened.costs, plan.ranges, rank, infos[rank],
                                    args.max_kv_tokens, args.max_batch, kept_kv_tokens),
                        life, me)
    if wiring is not None:
        print(f"[{me}] keeps {fmt_bytes(wiring.nbytes)} resident for its weights and KV room "
              f"(GPU wired limit; Metal keeps at most {fmt_bytes(infos[rank].working_set)})",
              file=sys.stderr, flush=True)
    stage = Stage(model, rank, n)
    faults = Faults(rank, n, [i.name for i in infos], watchdog, life, args.timeout)
    faults.liveness = liveness
    life.faults = faults
    transport = None
    if n > 1:
        transport = Transport(group, model.hidden_width, model.activation_dtype(), faults,
                              args.timeout, args.first_timeout, arrivals)
    # Default: a micro-batch per device, so each one has work; ranks sharing a GPU would
    # only take turns on it, each micro-batch reading the weights again.
    micro_batches = args.micro_batches or distinct_devices(infos)
    return Job(group, infos, plan, stage, opened.source, opened, faults, transport, load_s,
               args.first_timeout, args.max_batch, micro_batches, wiring, liveness)


def report_stage(me: str, model, files: list, nbytes: int, load_s: float):
    """One stderr line per rank: what it holds and what it read (operators and tests)."""
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    layers = [i for i, _ in model.owned_layers()]
    top = sorted({n.split(".layers.")[0] if ".layers." in n else n.rsplit(".", 1)[0]
                  for n, _ in params if ".layers." not in n and not n.startswith("layers.")})
    info = {"layers": [layers[0], layers[-1] + 1], "modules": top, "pid": os.getpid(),
            "param_bytes": sum(p.nbytes for _, p in params), "loaded_bytes": nbytes,
            "files": files, "load_s": round(load_s, 3)}
    print(f"[{me}] stage {json.dumps(info)}", file=sys.stderr, flush=True)

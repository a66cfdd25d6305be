"""The schedule, played on simulated stages: no hosts needed."""

import pytest

from dist_runtime.schedule import (CHUNK, DONE, RECV, RELEASE, STEP, Schedule, busy_fraction,
                                   format_grid, simulate)


def schedule(n_stages, n_seqs, prompt, gen, chunk=None, max_batch=None):
    s = Schedule(n_stages, max_batch, chunk)
    for _ in range(n_seqs):
        s.add(prompt, gen)
    return s


def drive(sched, stop_after=None):
    """Carry out every action in order, results arriving when asked; returns the log.
    stop_after: {seq: n} ends that sequence after n tokens (an end of sequence)."""
    log = []
    while (a := sched.next_action()).kind != DONE:
        log.append(a)
        if a.kind == RECV:
            for s in sched.received(a.id):
                st = sched.seqs[s]
                if stop_after and stop_after.get(s) == st.generated and not st.finished:
                    sched.stopped(s)
        else:
            sched.sent(a)
    return log


def test_prompt_chunks_overlap_across_stages():
    grid, _ = simulate(schedule(3, 1, 40, 1, chunk=10), n_stages=3)
    # stage k works on chunk i while stage k+1 works on chunk i-1
    assert grid[2] == ["A3", "A2", "A1"]
    assert grid[3] == ["A4", "A3", "A2"]
    # 4 chunks through 3 stages: 4 + 3 - 1 steps, not 4 * 3
    assert len(grid) == 6


def test_one_sequence_decode_uses_one_stage_at_a_time():
    grid, _ = simulate(schedule(3, 1, 5, 6, chunk=10), n_stages=3)
    decode_rows = [row for row in grid if "Ad" in row]
    assert decode_rows and all(sum(1 for c in row if c) == 1 for row in decode_rows)


@pytest.mark.parametrize("n_stages", [2, 3, 4])
@pytest.mark.parametrize("per_stage", [1, 3])
def test_as_many_micro_batches_as_stages_keep_every_stage_busy(n_stages, per_stage):
    n_seqs = n_stages * per_stage
    grid, _ = simulate(schedule(n_stages, n_seqs, 8, 40, chunk=8), n_stages)
    decode = [row for row in grid if any(c.endswith("d") for c in row)]
    steady = decode[n_stages: -n_stages]
    assert steady and all(all(c for c in row) for row in steady)
    # once every prompt is in, every sequence decodes in one of n_stages micro-batches
    # of per_stage rows
    middle = decode[len(decode) // 2: len(decode) // 2 + n_stages]
    batches = {c for row in middle for c in row}
    assert len(batches) == n_stages and all(len(c) == per_stage + 1 for c in batches)
    assert sorted("".join(batches).replace("d", "")) == [chr(65 + i) for i in range(n_seqs)]
    assert min(busy_fraction(grid[n_seqs:])) > 0.85


def test_sixteen_sequences_on_one_stage_step_as_one_batch():
    grid, steps = simulate(schedule(1, 16, 4, 10), n_stages=1)
    widths = [len(row[0]) - 1 for row in grid if row[0].endswith("d")]
    assert max(widths) == 16
    # 16 prompts, and 9 decode steps for each sequence (the first token comes with the
    # prompt): done in far fewer than the 16 * 9 steps of one sequence at a time
    assert sum(widths) == 16 * 9 and steps <= 16 + 9 + 16


def test_every_sequence_gets_its_tokens_and_every_cache_is_released():
    sched = schedule(2, 5, 7, 6, chunk=4)
    log = drive(sched, stop_after={2: 3})
    assert all(s.finished and s.released for s in sched.seqs.values())
    assert [s.generated for s in sched.seqs.values()] == [6, 3, 6, 6, 6]
    assert not sched.mbs and not sched.outstanding and sched.idle()
    # a sequence's decode steps: one STEP per token after the first
    steps_of = {s: sum(1 for a in log if a.kind == STEP and s in a.rows) for s in sched.seqs}
    assert steps_of[1] == 5 and steps_of[3] == 5
    # sequence 2 stopped after its 3rd token, read after the next step went: one extra
    assert steps_of[2] in (2, 3)


def test_rows_join_between_steps_and_leave_when_done():
    sched = schedule(1, 2, 3, 8, chunk=8)
    log, third = [], None
    while (a := sched.next_action()).kind != DONE:
        log.append(a)
        if a.kind == RECV:
            sched.received(a.id)
            continue
        sched.sent(a)
        if a.kind == STEP and third is None:
            third = sched.add(40, 2).seq  # a long prompt arriving: it fills between steps
    steps = [a.rows for a in log if a.kind == STEP]
    assert steps[0] == [1] and [1, 2] in steps and [1, 2, third] in steps
    assert steps[-1] == [] and all(r == sorted(r) for r in steps)  # kept rows keep order
    # 3's prompt was sent in chunks while 1 and 2 decoded, not before or after them all
    kinds = [("c" if a.kind == CHUNK and a.id == third else "s" if a.kind == STEP else "")
             for a in log]
    seq = "".join(kinds)
    assert seq.count("c") == 5 and "scscs" in seq


def test_max_batch_holds_back_new_prompts():
    sched = schedule(1, 4, 3, 4, max_batch=2)
    started = []
    while (a := sched.next_action()).kind != DONE:
        if a.kind == RECV:
            sched.received(a.id)
            continue
        if a.kind == CHUNK and a.id not in started:
            started.append(a.id)
        sched.sent(a)
        live = [s for s in sched.seqs.values() if s.sent_prompt and not s.finished]
        assert len(live) <= 2
    assert started == [1, 2, 3, 4]


def test_a_sequence_that_finishes_with_its_prompt_is_released():
    sched = schedule(2, 1, 5, 1)
    log = drive(sched)
    assert [a.kind for a in log] == [CHUNK, RECV, RELEASE]


def test_results_come_back_in_send_order():
    sched = schedule(3, 3, 4, 10)
    sent = []
    while (a := sched.next_action()).kind != RECV:
        sched.sent(a)
        sent.append(a.id)
    assert a.id == sent[0]
    with pytest.raises(AssertionError):
        sched.received(sent[1])


def parse_grid(text: str) -> tuple:
    """(rank column names, rows of cells with '' for idle) read back from format_grid."""
    lines = text.splitlines()
    names = lines[0].split("|")[1].split()
    assert set(lines[1]) == {"-"}
    rows = []
    for t, line in enumerate(lines[2:]):
        step, cells = line.split("|")
        assert int(step) == t
        rows.append(["" if c == "." else c for c in cells.split()])
    return names, rows


@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_grid_prints_one_column_per_rank(n_stages):
    n_seqs, prompt, gen, chunk = 3, 20, 4, 8
    grid, _ = simulate(schedule(n_stages, n_seqs, prompt, gen, chunk), n_stages=n_stages)
    names, rows = parse_grid(format_grid(grid))
    assert names == [f"r{r}" for r in range(n_stages)]
    assert rows == grid  # every cell in its step's line and its rank's column
    # What the grid shows: every message (each prompt chunk, then each decode step)
    # passes every rank once, in send order, one rank per step.
    chunks = -(-prompt // chunk)
    columns = [[(t, row[r]) for t, row in enumerate(grid) if row[r]] for r in range(n_stages)]
    first = [c for _, c in columns[0]]
    assert sorted(c for c in first if not c.endswith("d")) == sorted(
        f"{chr(ord('A') + s)}{c}" for s in range(n_seqs) for c in range(1, chunks + 1))
    # each sequence rides gen - 1 decode steps (the first token comes with its prompt)
    for s in range(n_seqs):
        letter = chr(ord("A") + s)
        assert sum(1 for c in first if c.endswith("d") and letter in c) == gen - 1
    for r in range(1, n_stages):
        assert [c for _, c in columns[r]] == [c for _, c in columns[r - 1]]
        assert all(t > t_prev for (t, _), (t_prev, _) in zip(columns[r], columns[r - 1]))


def test_chunk_size_follows_prompt_and_ring():
    from dist_runtime.schedule import MIN_CHUNK, PIPELINE_CHUNK, PREFILL_CHUNK, chunk_size

    assert chunk_size(4096, 1) == PREFILL_CHUNK  # alone: the biggest chunks
    assert chunk_size(4096, 2) == PIPELINE_CHUNK  # across ranks: the pipeline cap
    assert chunk_size(300, 2) == MIN_CHUNK  # short prompt: never below the minimum
    assert chunk_size(1024, 2, largest=512) == 1024 // (4 * 2)  # 4 chunks per stage
    assert chunk_size(100, 3, largest=8) == 8  # a user's cap wins


def test_micro_batches_option_groups_every_row_in_one():
    sched = Schedule(2, None, None, micro_batches=1)
    for _ in range(4):
        sched.add(3, 6)
    grid, _ = simulate(sched, n_stages=2)
    assert "ABCDd" in {c for row in grid for c in row}
    assert all(len(c) <= 5 for row in grid for c in row)

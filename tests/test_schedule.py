"""The schedule, played on simulated stages: no hosts needed."""

import pytest

from dist_runtime.schedule import (DONE, RECV, SEND, Schedule, SeqState, busy_fraction,
                                   format_grid, simulate)


def seqs(n, prompt, gen, chunk):
    return [SeqState(i + 1, prompt, gen, chunk) for i in range(n)]


def test_prompt_chunks_overlap_across_stages():
    grid, _ = simulate(Schedule(1), seqs(1, 40, 1, 10), n_stages=3)
    # stage k works on chunk i while stage k+1 works on chunk i-1
    assert grid[2] == ["A3", "A2", "A1"]
    assert grid[3] == ["A4", "A3", "A2"]
    # 4 chunks through 3 stages: 4 + 3 - 1 steps, not 4 * 3
    assert len(grid) == 6


def test_one_sequence_decode_uses_one_stage_at_a_time():
    grid, _ = simulate(Schedule(3), seqs(1, 5, 6, 10), n_stages=3)
    decode_rows = [row for row in grid if "Ad" in row]
    assert all(sum(1 for c in row if c) == 1 for row in decode_rows)


@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_as_many_sequences_as_stages_keep_every_stage_busy(n_stages):
    grid, _ = simulate(Schedule(n_stages), seqs(n_stages, 8, 40, 8), n_stages)
    steady = grid[n_stages: -n_stages]
    assert steady and all(all(c for c in row) for row in steady)
    assert min(busy_fraction(grid)) > 0.9


def test_in_flight_limit_is_respected():
    sched = Schedule(2)
    states = seqs(4, 3, 5, 8)
    sent = 0
    while True:
        a = sched.next_action(states)
        if a.kind == DONE:
            break
        s = next(x for x in states if x.seq == a.seq)
        if a.kind == SEND:
            sched.sent(s, a)
            sent += 1
        else:
            sched.received(s, finished=False)
        assert len(sched.outstanding) <= 2
    assert all(s.finished and s.generated == 5 for s in states)
    assert sent == 4 * 5  # one prompt chunk + 4 decode steps each


def test_results_come_back_in_send_order_and_finishing_one_keeps_others():
    sched = Schedule(3)
    states = seqs(3, 4, 10, 8)
    order = []
    for _ in range(3):
        a = sched.next_action(states)
        assert a.kind == SEND
        sched.sent(next(s for s in states if s.seq == a.seq), a)
        order.append(a.seq)
    a = sched.next_action(states)
    assert a.kind == RECV and a.seq == order[0]
    sched.received(states[0], finished=True)  # EOS on the first sequence
    remaining = []
    while (a := sched.next_action(states)).kind != DONE:
        s = next(x for x in states if x.seq == a.seq)
        if a.kind == SEND:
            sched.sent(s, a)
        else:
            sched.received(s, finished=False)
        remaining.append(a.seq)
    assert 1 not in remaining and {2, 3} <= set(remaining)


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
    grid, _ = simulate(Schedule(2), seqs(n_seqs, prompt, gen, chunk), n_stages=n_stages)
    names, rows = parse_grid(format_grid(grid))
    assert names == [f"r{r}" for r in range(n_stages)]
    assert rows == grid  # every cell in its step's line and its rank's column
    # What the grid shows: every message (each prompt chunk, then a decode step per
    # token after the first) passes every rank once, in send order, one rank per step.
    chunks = -(-prompt // chunk)
    expected = sorted(f"{chr(ord('A') + s)}{c}" for s in range(n_seqs)
                      for c in [*range(1, chunks + 1), *["d"] * (gen - 1)])
    columns = [[(t, row[r]) for t, row in enumerate(grid) if row[r]] for r in range(n_stages)]
    assert sorted(c for _, c in columns[0]) == expected
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

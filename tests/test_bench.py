"""launch/bench.py on one rank, ours beside mlx-lm on the same arrays: every point gets a
row from each side, a side that cannot run a point gets an error row that says why (mlx-lm
cannot batch Llama 4's chunked caches), and the ratio lines cover exactly the points both
sides measured. Rates are not checked: they are what the benchmark is for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launcher import ROOT

BENCH = ROOT / "launch" / "bench.py"
TIMEOUT = 240  # s for one bench process on the 2-core VM


def bench(model: str, out: Path) -> tuple:
    """(rows by (impl, concurrency), meta, stdout) of a 2-repeat bench at 1 and 4 sequences."""
    r = subprocess.run([sys.executable, str(BENCH), "--model", model, "--synthetic", "tiny",
                        "--points", "16:8:1,16:8:4", "--repeats", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    rows = {(row["impl"], row["concurrency"]): row for row in data["rows"]}
    assert len(rows) == len(data["rows"]), data["rows"]
    return rows, data["meta"], r.stdout


@pytest.mark.parametrize("model, batches", [("glm4_moe", True), ("llama4", False)])
def test_bench_rows_and_ratios_for_what_each_side_can_run(model, batches, tmp_path):
    rows, meta, out = bench(model, tmp_path)
    assert meta["baseline_shares_our_arrays"] is True, meta
    assert set(rows) == {("pipeline", 1), ("pipeline", 4), ("mlx-lm", 1),
                         ("mlx-lm batch", 4)}, sorted(rows)
    for key in (("pipeline", 1), ("pipeline", 4), ("mlx-lm", 1)):
        assert "error" not in rows[key], rows[key]
        assert rows[key]["decode_tps_aggregate"] > 0 and rows[key]["repeats"] == 2, rows[key]
    batch = rows[("mlx-lm batch", 4)]
    ratio_lines = [line for line in out.splitlines() if " tok/s = " in line]
    if batches:
        assert "error" not in batch and batch["decode_tps_aggregate"] > 0, batch
        assert [line.split(":")[0] for line in ratio_lines] == \
            ["P=16 G=8 C=1", "P=16 G=8 C=4"], out
    else:
        assert "batching" in batch["error"], batch
        assert [line.split(":")[0] for line in ratio_lines] == ["P=16 G=8 C=1"], out

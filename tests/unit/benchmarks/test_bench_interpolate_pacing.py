"""benchmarks/bench_interpolate_pacing.py measures a real output thread: every engine frame and its in-betweens go
out, at gaps near the even step (bounds 10x looser than the benchmark's figures, for a loaded machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_interpolate_pacing.py"


@pytest.mark.parametrize("size", [64])
def test_a_short_run_sends_the_in_betweens_at_gaps_near_the_step(size: int) -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--sizes", str(size), "--seconds", "1", "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    [row] = json.loads(out)
    assert row["size"] == size and row["offered"] == 30 and row["step_ms"] == pytest.approx(16.67, abs=0.01)
    assert row["offered"] // 2 <= row["sent"] <= 2 * row["offered"]  # at most every engine frame and its in-between
    assert row["step_ms"] / 10 < row["median_ms"] < row["step_ms"] * 10

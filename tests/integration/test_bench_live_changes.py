"""benchmarks/bench_live_changes.py runs here as on a GPU: every row, a JSON report, the rows' ratio to the
steady one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_live_change_rows_run_with_a_controlnet(tmp_path):
    out = tmp_path / "live.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_live_changes.py"), "--tiny", "--controlnet",
                          "--calls", "2", "--rounds", "1", "--warmup", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["name"] for row in rows] == ["steady", "strength LFO (one step count)",
                                             "strength LFO across step counts", "a new seed every 8 frames",
                                             "guidance LFO", "ControlNet scale LFO"]
    assert all(row["ms_max"] >= row["ms_p99"] for row in rows)
    assert rows[0]["vs_steady"] == 1.0 and all(row["fps"] > 0 and row["vs_steady"] > 0 for row in rows)
    assert "| strength LFO (one step count) |" in run.stdout

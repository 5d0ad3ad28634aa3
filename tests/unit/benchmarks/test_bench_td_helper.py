"""benchmarks/bench_td_helper.py times the TouchDesigner helper beside another copy of it, and refuses a copy that
packs a frame differently (its figures would compare two different things)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BENCH = ROOT / "benchmarks" / "bench_td_helper.py"
HELPER = ROOT / "examples" / "touchdesigner" / "sdbridge_td.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--rounds", "1", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_rows_for_both_helpers_at_each_size(tmp_path):
    result = run("--against", str(HELPER), "--json", str(tmp_path / "rows.json"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(row["helper"], row["size"]) for row in rows] == [
        (helper, size) for size in ("512x512", "1024x576", "1920x1080") for helper in ("against", "this tree")]
    assert all(row["pack_ms"] > 0 and row["unpack_ms"] > 0 for row in rows)
    assert "1920x1080" in result.stdout


def test_a_helper_that_packs_otherwise_is_refused(tmp_path):
    other = tmp_path / "other.py"
    other.write_text(HELPER.read_text().replace("scaled += 0.5", "scaled += 0.25"))  # rounds down at the halves
    result = run("--against", str(other))
    assert result.returncode != 0 and "pack 512x512 differently" in result.stderr

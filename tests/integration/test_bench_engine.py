"""benchmarks/bench_engine.py, the command a lent GPU runs first, proven to run here: the feature bank's
rows on the tiny model through torch.compile's eager backend (Dynamo's graphs; tests/unit/engines runs
AOTAutograd's), with the banked row's parity within bound and each row's figure in the log; and the fp16
rows at another step count (``--steps``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "engine.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--tiny", "--skip-diffusers",
                          "--calls", "2", "--warmup", "1", "--rounds", "1", "--json", str(out), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return run, out


def test_the_feature_bank_rows_run_with_parity(tmp_path):
    run, out = bench(tmp_path, "--feature-bank", "--compile-backend", "eager")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "partial" not in report
    names = [row["name"] for row in report["rows"]]
    assert names == ["compiled engine (eager), stream batch", "eager engine (TAESD) + feature bank",
                     "compiled engine (eager), stream batch + feature bank"]
    banked = report["rows"][-1]
    assert banked["parity_ok"] is True and banked["parity_rel_error"] <= 1e-4 and banked["fps"] > 0
    assert "frames/s, p50" in run.stderr   # each row's figure in the log as it ends


def test_the_fp16_rows_at_another_step_count_keep_parity(tmp_path):
    """``--steps 2`` (what --quick's sd-turbo section takes): the multi-step rows run at 2 steps, and every row of
    ours is checked against diffusers (its float output, computed whether or not its rows are timed) at its own
    step count."""
    run, out = bench(tmp_path, "--steps", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    steps = {row["name"]: row["steps"] for row in rows}
    assert steps["compiled engine (not compiled), 2 steps in sequence"] == 2
    assert steps["compiled engine (not compiled), stream batch"] == 2
    assert steps["compiled engine (not compiled), batch 1"] == 1
    assert sorted(row["steps"] for row in rows) == [1, 1, 1, 2, 2, 2, 2, 2]
    assert all(row["parity_ok"] and row["parity_rel_error"] <= 1e-4 for row in rows)


def test_the_padding_rows_run_and_compare_the_padded_frames(tmp_path):
    """``--padding`` (the GPU session's engine_padding step) runs its rows and compares the two 3-session rows'
    frames. Uncompiled here, where nothing is padded (each row says the batch it ran at): the padding itself is
    proven in tests/unit/engines (frames, graphs), and compiling would add half a minute to the suite."""
    run, out = bench(tmp_path, "--padding", "--compile-backend", "none")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["frames_per_call"], row["runs_at"]) for row in rows] == [(4, 4), (3, 3), (3, 3)]
    assert rows[-1]["padded_vs_unpadded_ok"] is True and rows[-1]["padded_vs_unpadded_rel_error"] <= 1e-4
    assert all(row["parity_ok"] and row["fps"] > 0 for row in rows)
    assert "3 sessions with padding on (run at 3) against off" in run.stdout


def test_the_guided_rows_run_exact_with_parity_and_residual_against_it(tmp_path):
    """``--guidance`` (the GPU session's engine_guidance step): the eager engine and the compiled stream batch with
    exact and with residual guidance; the exact row's first frame is the eager engine's, the residual row's is
    reported against it."""
    run, out = bench(tmp_path, "--guidance", "3", "--steps", "2", "--compile-backend", "none")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row.get("cfg") for row in rows] == [None, "exact", "residual"]
    assert rows[1]["parity_ok"] is True and rows[1]["parity_rel_error"] <= 1e-4
    assert 0 < rows[2]["residual_vs_exact_rel_error"] < 1 and all(row["fps"] > 0 for row in rows)
    assert "its first frame against exact guidance's" in run.stdout


def test_the_ip_adapter_rows_run_with_parity(tmp_path):
    """``--ip-adapter`` (the GPU session's engine_ip_adapter step): the compiled stream batch without and with a style
    image held, and the eager engine with it; the compiled styled frame is the eager engine's. (Uncompiled here:
    test_ip_adapter.py traces the graphs with the adapter's inputs through Dynamo and counts them.)"""
    run, out = bench(tmp_path, "--ip-adapter", "--steps", "2", "--compile-backend", "none")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["name"] for row in rows] == ["compiled engine (not compiled), stream batch",
                                             "eager engine (TAESD) + IP-Adapter",
                                             "compiled engine (not compiled), stream batch + IP-Adapter"]
    assert rows[-1]["parity_ok"] is True and rows[-1]["parity_rel_error"] <= 1e-4
    assert all(row["fps"] > 0 for row in rows)

"""benchmarks/bench_coherence.py runs its plugin rows: its `run` read PluginManager.before's (output, input) pair as
an output, so every frame counted as skipped and the first plugin row died in cv2.remap (QA 26)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.models import load_pipeline_parts
from sdbridge.engines.tiny import write_tiny_model

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_coherence.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_coherence", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_coherence"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_coherence", None)


def test_the_plugin_rows_run_and_count_what_they_skip(bench, tmp_path):
    model = str(write_tiny_model(tmp_path / "tiny"))
    engine = DiffusionEngine.from_parts(load_pipeline_parts(model, torch.device("cpu"), torch.float32))
    base = {"width": 64, "height": 64, "steps": 1, "strength": 0.6, "guidance": 1.0, "seed": 7}
    moving = bench.sequence(64, 4)
    still = [moving[0]] * 4

    plain, _, skipped = bench.run(engine, moving, {}, base)
    assert skipped == 0 and all(isinstance(o, np.ndarray) and o.shape == (64, 64, 3) for o in plain)
    _, _, skipped = bench.run(engine, still, bench.CONFIGS["similarity"], base)
    assert skipped == 3                                   # a still input: every frame after the first
    _, _, skipped = bench.run(engine, moving, bench.CONFIGS["similarity"], base)
    assert skipped == 0
    warped, _, skipped = bench.run(engine, moving, bench.CONFIGS["flow_warp 0.6"], base)
    assert skipped == 0 and any(not np.array_equal(w, p) for w, p in zip(warped[1:], plain[1:]))
    assert bench.flow_compensated_difference(warped, moving) >= 0.0

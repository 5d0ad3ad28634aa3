"""The engine host: which engine loads, with what, on its own thread (the daemon's tests run it end to end)."""

from __future__ import annotations

import time

from sdbridge.bridge.engine_host import WARM_PARAMS, EngineHost
from sdbridge.config import load_settings
from sdbridge.params import Schema


def test_a_load_is_handed_the_values_the_daemon_runs_for_its_warm_up(tiny_model_dir):
    """The values in force when the daemon asked for the engine (a --set, a preset) reach the compiled engine's
    warm-up: those that decide its graphs, not the rest (an output's settings, a plugin's)."""
    host = EngineHost(load_settings({"model": str(tiny_model_dir)}, env={}))
    params = {**Schema().defaults(), "engine": "compiled", "steps": 4, "strength": 0.75, "width": 96,
              "prompt": "a red fox"}
    host.select(params)
    deadline = time.monotonic() + 120
    while (engine := host.active()) is None and time.monotonic() < deadline:
        assert host.last_error is None, host.last_error
        time.sleep(0.05)
    assert engine is not None and engine.name == "compiled"
    try:
        assert engine.warm_params == {name: params[name] for name in WARM_PARAMS}
        warm = engine.warm_params
        assert warm["steps"] == 4 and warm["width"] == 96 and "engine" not in warm
    finally:
        engine.close()

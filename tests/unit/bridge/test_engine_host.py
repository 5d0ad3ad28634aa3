"""The engine host: which engine loads, with what, on its own thread (the daemon's tests run it end to end)."""

from __future__ import annotations

import logging
import time

import pytest

from sdbridge.bridge.engine_host import WARM_PARAMS, EngineHost
from sdbridge.errors import printable
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


def settle(host: EngineHost, params: dict, timeout: float = 60.0) -> None:
    """Select as the worker does, every turn, until no load runs (and a loaded engine is swapped in)."""
    deadline = time.monotonic() + timeout
    host.select(params)
    while host.status == "loading" and time.monotonic() < deadline:
        time.sleep(0.02)
    host.active()


def test_a_failed_load_sets_the_request_back_to_what_serves(tmp_path):
    """A model that does not load leaves the engine serving and sets the parameters that asked for it back to
    those of the engine serving, so that they say what serves and the next switch starts from there; asked
    for again, it is tried again (and reported again), not silently ignored."""
    host = EngineHost(load_settings({"models_dir": str(tmp_path)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64}
    settle(host, params)
    assert host.active_engine().name == "preview" and host.take_revert() == {}
    asked = {**params, "engine": "diffusion", "model": "nosuch"}
    settle(host, asked)
    assert host.load_failures == 1 and host.failing and "nosuch" in host.last_error
    assert host.active_engine().name == "preview"            # the previous engine keeps serving
    assert host.take_revert() == {"engine": "auto", "model": ""}
    assert not host.failing and host.take_revert() == {}
    settle(host, params)                                      # the worker's next snapshot, set back
    assert host.loads == 1 and host.load_failures == 1
    settle(host, asked)
    assert host.load_failures == 2 and host.take_revert() == {"engine": "auto", "model": ""}
    host.close()


def test_a_broken_model_at_start_is_tried_once_then_the_preview_serves(tmp_path):
    """Engine auto with a model that does not load and nothing serving: the preview engine serves (a stage
    never stays dark), and the broken model is not loaded again behind it at every turn."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    host = EngineHost(load_settings({"model": str(broken)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64}
    for _ in range(4):
        settle(host, params)
    assert host.load_failures == 1 and host.active_engine().name == "preview"
    assert host.take_revert() == {} and host.status == "ready"
    host.close()


# --- client text in the log (QA 3, finding 8) -------------------------------------------------------

FORGED = "x\n20:06:00 ERROR   sdbridge.bridge.server: FAKE: daemon compromised\x1b[31mRED\x00\x85\u2028end"


@pytest.mark.parametrize("model", [FORGED, "/tmp/" + FORGED, "sub/" + FORGED])
def test_a_model_name_cannot_forge_a_log_line(tmp_path, caplog, model):
    """A newline, an ANSI escape, a NUL or a Unicode line separator in a client's model name is escaped in
    every log line that carries it: one record is one line, and a terminal shows no colour change."""
    host = EngineHost(load_settings({"models_dir": str(tmp_path)}, env={}))
    with caplog.at_level(logging.DEBUG, logger="sdbridge"):
        settle(host, {**Schema().defaults(), "width": 64, "height": 64, "engine": "diffusion", "model": model})
    assert host.load_failures == 1
    lines = [record.getMessage() for record in caplog.records if record.name == "sdbridge.bridge.engine_host"]
    assert any("loading engine" in line for line in lines) and any("failed to load" in line for line in lines)
    for line in lines:
        assert not set(line) & {"\n", "\r", "\x1b", "\x00", "\x85", "\u2028"}, line
    assert any("\\n20:06:00 ERROR" in line and "\\x1b[31mRED\\x00" in line for line in lines), lines
    host.close()


def test_printable_escapes_only_what_breaks_a_line():
    assert printable("ünïcode 猫 /models/sd-turbo") == "ünïcode 猫 /models/sd-turbo"
    assert printable("a\nb\rc\td\x1b[0m\x00\x7f\x9b\u2029\ud800") == \
        "a\\nb\\rc\\td\\x1b[0m\\x00\\x7f\\x9b\\u2029\\ud800"


def test_a_hub_id_with_a_trailing_newline_is_not_a_hub_id():
    from sdbridge.bridge.engine_host import _is_hub_id

    assert _is_hub_id("stabilityai/sd-turbo") and not _is_hub_id("stabilityai/sd-turbo\n")

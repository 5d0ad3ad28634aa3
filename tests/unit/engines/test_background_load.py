"""engines/background_load.py: loads on a thread of their own, handed over only when the worker takes them."""

from __future__ import annotations

import threading

from sdbridge.engines.background_load import BackgroundLoads
from sdbridge.errors import ModelError


def test_results_wait_for_the_taker_and_a_failure_is_told_once_with_what_serves():
    events: list[dict] = []
    gate = threading.Event()

    def load(name: str) -> str:
        gate.wait(5)
        if name == "broken":
            raise ModelError("not a ControlNet file", code="bad_model")
        return f"model:{name}"

    loads = BackgroundLoads("controlnet", load, keeps=lambda name: "its slot keeps the ControlNet it had",
                            notify=events.append)
    assert loads.start(["canny", "broken", "canny"]) == ["canny", "broken"]  # once each, in order
    assert loads.start(["canny"]) == []  # already loading
    taken = loads.take()
    assert (taken.ready, taken.failed, taken.loading) == ({}, {}, True)
    gate.set()
    assert loads.wait(5)
    assert loads.peek("canny") == "model:canny" and loads.snapshot().failed == {"broken": "not a ControlNet file"}
    taken = loads.take()
    assert taken.ready == {"canny": "model:canny"} and taken.failed == {"broken": "not a ControlNet file"}
    assert not taken.loading and loads.loads == 1
    again = loads.take()
    assert (again.ready, again.failed) == ({}, {})  # handed over once
    errors = [e for e in events if e["type"] == "error"]
    assert errors == [{"type": "error", "code": "bad_model", "message": "controlnet 'broken' could not be loaded: "
                       "not a ControlNet file; its slot keeps the ControlNet it had"}]
    told = BackgroundLoads("controlnet", load, keeps=lambda name: f"nothing serves for {name}", notify=events.append)
    told.start(["broken"])
    assert told.wait(5) and events[-1]["message"].endswith("not a ControlNet file; nothing serves for broken")
    assert {"type": "controlnet", "status": "ready", "model": "canny"} in events


def test_the_ready_hook_runs_before_the_hand_over_and_its_failure_keeps_the_model():
    seen: list[str] = []

    def compile_it(model: str) -> None:
        seen.append(model)
        raise RuntimeError("no compile")

    loads = BackgroundLoads("ip_adapter", lambda name: name.upper(), keeps=lambda name: "the one serving serves on")
    loads.ready_hook = compile_it
    loads.start(["style"])
    assert loads.wait(5)
    assert seen == ["STYLE"] and loads.take().ready == {"style": "STYLE"}


def test_wait_says_when_a_load_is_still_running():
    release = threading.Event()
    loads = BackgroundLoads("ip_adapter", lambda name: release.wait(5) and name, keeps=lambda name: "-")
    loads.start(["slow"])
    assert not loads.wait(0.05) and loads.loading == ["slow"]
    release.set()
    assert loads.wait(5) and loads.take().ready == {"slow": "slow"}

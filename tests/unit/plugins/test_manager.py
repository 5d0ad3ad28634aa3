"""The plugin manager: discovery through entry points, parameters, order, failures, re-arming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbridge.params import ParamStore, Schema
from sdbridge.plugins.base import Plugin, PluginContext, param
from sdbridge.plugins.manager import PluginManager, discover


class Recorder(Plugin):
    name = "recorder"
    params = (param("recorder", "gain", "float", 1.0, "a gain", minimum=0.0, maximum=2.0),)
    calls: list[str] = []

    def after(self, ctx: PluginContext) -> np.ndarray:
        Recorder.calls.append("recorder")
        return (ctx.output * ctx.params["gain"]).clip(0, 255).astype(np.uint8)


class Broken(Plugin):
    name = "broken"
    default_order = 5

    def after(self, ctx: PluginContext) -> np.ndarray:
        Recorder.calls.append("broken")
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        raise ValueError("boom")


class NaNLatents(Plugin):
    name = "nan"

    def on_latents(self, latents, ctx):
        return latents * float("nan")


@pytest.fixture
def manager():
    Recorder.calls = []
    reports: list = []
    store = ParamStore(Schema())
    manager = PluginManager(store, {"recorder": Recorder, "broken": Broken, "nan": NaNLatents},
                            report=lambda sid, message: reports.append((sid, message)))
    manager.reports = reports
    return manager


def enable(manager, **values):
    manager.store.update(values)
    manager.prepare(manager.store.snapshot()[1])


def test_builtins_are_found_through_entry_points():
    found = discover()
    assert {"similarity", "latent_feedback", "flow_warp"} <= set(found)


def test_parameters_registered_with_enabled_and_order(manager):
    schema = manager.store.schema
    assert "plugin.recorder.gain" in schema and "plugin.recorder.enabled" in schema
    assert schema.osc_path("plugin.recorder.gain") == "plugin/recorder/gain"
    assert manager.store.get("plugin.recorder.enabled") is False


def test_order_and_failure_turns_off_for_the_session_only(manager):
    enable(manager, **{"plugin.recorder.enabled": True, "plugin.broken.enabled": True, "plugin.recorder.gain": 0.5})
    frame = np.full((4, 4, 3), 100, np.uint8)
    state_a: dict = {}
    out = manager.after("a", state_a, frame, frame)
    assert Recorder.calls == ["broken", "recorder"]  # order 5 before 50
    assert (out == 50).all()
    assert manager.reports and manager.reports[0][1]["code"] == "plugin_failed"
    assert "boom" in manager.reports[0][1]["message"]
    manager.after("a", state_a, frame, frame)
    assert Recorder.calls.count("broken") == 1  # off for session a now
    manager.after("b", {}, frame, frame)
    assert Recorder.calls.count("broken") == 2  # session b still runs it


def test_turning_a_plugin_off_and_on_rearms_it(manager):
    enable(manager, **{"plugin.broken.enabled": True})
    state: dict = {}
    frame = np.zeros((2, 2, 3), np.uint8)
    manager.after("a", state, frame, frame)
    enable(manager, **{"plugin.broken.enabled": False})
    enable(manager, **{"plugin.broken.enabled": True})
    manager.after("a", state, frame, frame)
    assert Recorder.calls.count("broken") == 2


def test_nan_latents_turn_the_plugin_off(manager):
    enable(manager, **{"plugin.nan.enabled": True})
    latents = torch.ones(2, 4, 2, 2)
    out = manager.on_latents(latents, ["a", "b"], [{}, {}])
    assert torch.equal(out, latents)
    assert len(manager.reports) == 2 and "NaN" in manager.reports[0][1]["message"]


def test_wrong_shape_from_after_is_a_failure(manager):
    class Shrink(Plugin):
        name = "shrink"

        def after(self, ctx):
            return ctx.output[:1]

    store = ParamStore(Schema())
    reports: list = []
    shrink = PluginManager(store, {"shrink": Shrink}, report=lambda sid, m: reports.append(m))
    store.update({"plugin.shrink.enabled": True})
    shrink.prepare(store.snapshot()[1])
    frame = np.zeros((4, 4, 3), np.uint8)
    assert shrink.after("a", {}, frame, frame).shape == (4, 4, 3)
    assert "shape" in reports[0]["message"]


class Guard(Plugin):
    """Fails closed: once it fails, its fallback (a grey frame) replaces every frame of the session."""

    name = "guard"
    fails_closed = True
    fallback_doc = "every frame goes grey"
    fail_in = "after"

    def on_latents(self, latents, ctx):
        if Guard.fail_in == "on_latents":
            raise RuntimeError("no model")
        return latents

    def after(self, ctx: PluginContext) -> np.ndarray | None:
        if Guard.fail_in == "after":
            raise RuntimeError("no model")
        return None

    def fallback(self, ctx: PluginContext) -> np.ndarray:
        return np.full_like(ctx.output, 128)


@pytest.mark.parametrize("where", ["after", "on_latents"])
def test_a_plugin_that_fails_closed_replaces_every_frame_with_its_fallback(where):
    Guard.fail_in = where
    store = ParamStore(Schema())
    reports: list = []
    guard = PluginManager(store, {"guard": Guard}, report=lambda sid, m: reports.append((sid, m)))
    store.update({"plugin.guard.enabled": True})
    guard.prepare(store.snapshot()[1])
    frame = np.full((4, 4, 3), 7, np.uint8)
    state: dict = {}
    if where == "on_latents":
        guard.on_latents(torch.ones(1, 4, 2, 2), ["a"], [state])
    outs = [guard.after("a", state, frame, frame) for _ in range(3)]
    assert all((out == 128).all() for out in outs)  # the failing frame too: nothing unchecked goes out
    assert len(reports) == 1 and reports[0][1]["code"] == "plugin_failed"
    assert "RuntimeError: no model; it fails closed: every frame goes grey" in reports[0][1]["message"]
    Guard.fail_in = "nowhere"  # turned off and on, working again: frames go through
    for enabled in (False, True):
        store.update({"plugin.guard.enabled": enabled})
        guard.prepare(store.snapshot()[1])
    assert guard.after("a", state, frame, frame) is frame


def test_a_fail_closed_plugins_broken_fallback_gives_black():
    class BadFallback(Guard):
        name = "bad_fallback"

        def fallback(self, ctx):
            return ctx.output[:1]

    Guard.fail_in = "after"
    store = ParamStore(Schema())
    bad = PluginManager(store, {"bad_fallback": BadFallback})
    store.update({"plugin.bad_fallback.enabled": True})
    bad.prepare(store.snapshot()[1])
    frame = np.full((4, 4, 3), 7, np.uint8)
    assert [bad.after("a", {}, frame, frame).any() for _ in range(2)] == [False, False]

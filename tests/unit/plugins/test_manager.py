"""The plugin manager: discovery through entry points, parameters, order, failures, re-arming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbridge.params import ParamSpec, ParamStore, Schema
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


def only(plugin_class) -> tuple[PluginManager, list]:
    """A manager of ``plugin_class`` alone, turned on, and the (session, message) reports it makes."""
    store = ParamStore(Schema())
    reports: list = []
    manager = PluginManager(store, {plugin_class.name: plugin_class}, report=lambda sid, m: reports.append((sid, m)))
    store.update({f"plugin.{plugin_class.name}.enabled": True})
    manager.prepare(store.snapshot()[1])
    return manager, reports


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


def test_a_pause_does_not_rearm_a_failed_plugin(manager):
    """The failure mark lived in the session's plugin state, which a pause clears: the plugin ran again, failed
    again and told the clients again after each pause (QA 26)."""
    from sdbridge.engines.base import StreamState

    enable(manager, **{"plugin.broken.enabled": True})
    stream = StreamState("a")
    frame = np.zeros((2, 2, 3), np.uint8)
    manager.after("a", stream.data, frame, frame)
    for _ in range(2):
        stream.cut()
        manager.cut("a")
        manager.after("a", stream.data, frame, frame)
    assert Recorder.calls.count("broken") == 1 and len(manager.reports) == 1 and manager.failures == 1
    enable(manager, **{"plugin.broken.enabled": False})
    enable(manager, **{"plugin.broken.enabled": True})   # turning it off and on still re-arms it
    manager.after("a", stream.data, frame, frame)
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


class Misbehaving(Plugin):
    """Hands back what is not a frame, as third-party plugins did in QA 15 (each stopped every session's stream)."""

    name = "misbehaving"
    case = ""

    def before(self, ctx):
        if Misbehaving.case == "before_string":
            return "not an image"
        if Misbehaving.case == "before_float":
            return ctx.image.astype(np.float64)
        if Misbehaving.case == "input_list":
            ctx.image = ctx.image.tolist()
        return None

    def after(self, ctx):
        return [1, 2, 3] if Misbehaving.case == "after_list" else 7 if Misbehaving.case == "after_int" else None

    def on_latents(self, latents, ctx):
        return latents[:, :2] if Misbehaving.case == "latents_shape" else latents


@pytest.mark.parametrize("case", ["before_string", "before_float", "input_list", "after_list", "after_int"])
def test_a_plugin_handing_back_what_is_not_a_frame_is_turned_off_for_its_session(case):
    Misbehaving.case = case
    manager, reports = only(Misbehaving)
    frame = np.full((8, 8, 3), 9, np.uint8)
    state: dict = {}
    skipped, image = manager.before("a", state, frame)
    output = manager.after("a", state, image, frame)
    assert skipped is None and image is frame and output is frame  # the frame goes on as it was
    assert len(reports) == 1 and reports[0][0] == "a" and reports[0][1]["code"] == "plugin_failed"
    assert "expected an image of shape (8, 8, 3) uint8" in reports[0][1]["message"]
    manager.before("a", state, frame)
    manager.after("a", state, frame, frame)
    assert len(reports) == 1  # off for that session: not called again


def test_latents_of_another_shape_fail_that_session_only():
    Misbehaving.case = "latents_shape"
    manager, reports = only(Misbehaving)
    latents = torch.randn(2, 4, 3, 3)
    out = manager.on_latents(latents, ["a", "b"], [{}, {}])
    assert torch.equal(out, latents)  # the batch's step goes on (the cat raised before)
    assert [sid for sid, _ in reports] == ["a", "b"]
    assert "expected latents of shape (1, 4, 3, 3)" in reports[0][1]["message"]


def test_a_plugin_failing_after_the_step_is_off_for_every_session_until_turned_on_again(caplog):
    """QA 15: a traceback every frame; QA 19: its after hook still ran on every session and after_step was called
    while the plugin was off. Now: called only for a step it took part in, and a failure turns it off for every
    session (its sessions told), as one in before_step does."""
    class AfterStep(Plugin):
        name = "afterstep"
        calls = 0
        afters = 0

        def after_step(self):
            AfterStep.calls += 1
            raise RuntimeError("boom")

        def after(self, ctx):
            AfterStep.afters += 1
            return None

    store = ParamStore(Schema())
    reports: list = []
    manager = PluginManager(store, {"afterstep": AfterStep}, report=lambda sid, m: reports.append((sid, m)))
    frame = np.zeros((4, 4, 3), np.uint8)

    def frame_through(sessions=("a", "b")):
        manager.before_step(None, list(sessions))
        manager.after_step()
        for session in sessions:
            manager.after(session, {}, frame, frame)

    manager.prepare(store.snapshot()[1])
    frame_through()
    assert AfterStep.calls == 0  # off: not called
    store.update({"plugin.afterstep.enabled": True})
    manager.prepare(store.snapshot()[1])
    for _ in range(5):
        frame_through()
    assert AfterStep.calls == 1 and manager.failures == 1 and AfterStep.afters == 0
    assert [sid for sid, _ in reports] == ["a", "b"] and reports[0][1]["code"] == "plugin_failed"
    assert sum("failed inside the engine" in record.message for record in caplog.records) == 1
    for enabled in (False, True):  # turned off and on: re-armed
        store.update({"plugin.afterstep.enabled": enabled})
        manager.prepare(store.snapshot()[1])
    frame_through()
    assert AfterStep.calls == 2


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
    guard, reports = only(Guard)
    frame = np.full((4, 4, 3), 7, np.uint8)
    state: dict = {}
    if where == "on_latents":
        guard.on_latents(torch.ones(1, 4, 2, 2), ["a"], [state])
    outs = [guard.after("a", state, frame, frame) for _ in range(3)]
    assert all((out == 128).all() for out in outs)  # the failing frame too: nothing unchecked goes out
    assert len(reports) == 1 and reports[0][1]["code"] == "plugin_failed"
    assert "RuntimeError: no model; it fails closed: every frame goes grey" in reports[0][1]["message"]
    # Not "turned off": it keeps replacing every frame (QA 48 F4).
    assert reports[0][1]["message"].startswith("plugin guard failed for this session: ")
    Guard.fail_in = "nowhere"  # turned off and on, working again: frames go through
    for enabled in (False, True):
        guard.store.update({"plugin.guard.enabled": enabled})
        guard.prepare(guard.store.snapshot()[1])
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


def test_a_plugin_whose_parameters_clash_or_that_cannot_be_made_is_left_out(caplog):
    """The daemon starts without it, and the log names it (QA 15: "parameter 'strength' is declared twice", rc 2)."""
    class Core(Plugin):
        name = "core"
        params = (ParamSpec("strength", "float", 0.9, "a core name", minimum=0.0, maximum=1.0),)

    class Twice(Plugin):
        name = "twice"
        params = (param("twice", "x", "float", 0.0, "x"), param("twice", "x", "int", 1, "x again"))

    class Unmade(Plugin):
        name = "unmade"

        def __init__(self):
            raise RuntimeError("no GPU here")

    store = ParamStore(Schema())
    manager = PluginManager(store, {"core": Core, "twice": Twice, "unmade": Unmade, "recorder": Recorder})
    assert manager.names() == ["recorder"] and "plugin.recorder.gain" in store.schema
    assert "plugin.twice.x" not in store.schema and store.schema.get("strength").default == 0.5
    logged = " ".join(record.message for record in caplog.records)
    assert "plugin core left out: ValueError: parameter 'strength' is outside the plugin's own" in logged
    assert "plugin twice left out: ValueError: parameter 'plugin.twice.x' is declared twice" in logged
    assert "plugin unmade left out: RuntimeError: no GPU here" in logged


def test_a_second_plugin_under_a_built_in_name_is_left_out_and_named(tmp_path, monkeypatch, caplog):
    """A third-party package registering "similarity" beside the built-in: one of them was dropped without a word
    (QA 15), and then the built-in, whose parameters presets name, when the other came first on sys.path (QA 19).
    A real distribution first on sys.path, read through importlib.metadata as pip's would be."""
    package = tmp_path / "qa_similarity.py"
    package.write_text("from sdbridge.plugins.base import Plugin\n\n\nclass Similarity(Plugin):\n"
                       "    name = 'similarity'\n")
    info = tmp_path / "qa_similarity-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qa-similarity\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sdbridge.plugins]\nsimilarity = qa_similarity:Similarity\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover()
    assert found["similarity"].__module__ == "sdbridge.plugins.similarity" and "feature_bank" in found
    assert any("plugin similarity is installed twice" in record.message
               and record.message.endswith("qa_similarity.Similarity is left out") for record in caplog.records)
    store = ParamStore(Schema())
    manager = PluginManager(store, report=lambda sid, m: None)
    stats_names = manager.names()
    assert stats_names.count("similarity") == 1 and manager.failures == 0


def test_the_docs_give_each_built_in_plugin_s_order():
    """docs/plugins.md names the order each built-in plugin runs in; it was nowhere but in the code."""
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[3] / "docs" / "plugins.md").read_text(encoding="utf-8")
    line = next(line for line in docs.split("\n\n") if line.startswith("Their default orders"))
    documented = {name: int(order) for name, order in re.findall(r"`(\w+)` (\d+)", line)}
    assert documented == {name: plugin.default_order for name, plugin in discover().items()}


class HookFailing(Plugin):
    """Raises in the one hook named by ``fail_in``: reset, passed_through or turned_on (QA 75 F4)."""

    name = "hookfailing"
    fail_in = ""
    calls: list[str] = []

    def reset(self, state):
        HookFailing.calls.append("reset")
        if HookFailing.fail_in == "reset":
            raise RuntimeError("reset boom")
        state.clear()

    def turned_on(self):
        HookFailing.calls.append("turned_on")
        if HookFailing.fail_in == "turned_on":
            raise RuntimeError("turned_on boom")

    def passed_through(self, ctx):
        HookFailing.calls.append("passed_through")
        if HookFailing.fail_in == "passed_through":
            raise RuntimeError("passed_through boom")

    def before(self, ctx):
        HookFailing.calls.append("before")
        return None

    def after(self, ctx):
        HookFailing.calls.append("after")
        return None

    def before_step(self, engine, session_ids, params):
        HookFailing.calls.append("before_step" if engine is not None else "undo")


def _toggle(manager: PluginManager, name: str) -> None:
    for enabled in (False, True):
        manager.store.update({f"plugin.{name}.enabled": enabled})
        manager.prepare(manager.store.snapshot()[1])


@pytest.mark.parametrize("hook", ["reset", "passed_through"])
def test_a_plugin_raising_in_reset_or_passed_through_is_turned_off_for_its_session(hook):
    """QA 75 F4: these ran outside the guard; the exception lost the whole batch's turn in the worker and, for
    reset, on every frame (never marked as done), with no plugin_failed message."""
    HookFailing.fail_in, HookFailing.calls = hook, []
    manager, reports = only(HookFailing)
    frame = np.full((4, 4, 3), 9, np.uint8)
    state_a: dict = {}
    for _ in range(3):
        skipped, image = manager.before("a", state_a, frame)
        output = manager.after("a", state_a, image, frame, passthrough=True)
        assert skipped is None and image is frame and output is frame  # the stream goes on
    assert HookFailing.calls.count(hook) == 1  # off for session a after the failure
    assert len(reports) == 1 and reports[0][0] == "a" and reports[0][1]["code"] == "plugin_failed"
    assert reports[0][1]["plugin"] == "hookfailing" and manager.failures == 1
    assert reports[0][1]["message"] == (f"plugin hookfailing turned off for this session: RuntimeError: {hook} boom; "
                                        "the stream goes on without it (turn it off and on to retry)")
    state_b: dict = {}
    manager.before("b", state_b, frame)
    manager.after("b", state_b, frame, frame, passthrough=True)
    assert HookFailing.calls.count(hook) == 2 and len(reports) == 2  # another session still runs it
    HookFailing.fail_in = ""
    _toggle(manager, "hookfailing")  # re-armed: it runs again for session a
    HookFailing.calls = []
    manager.before("a", state_a, frame)
    manager.after("a", state_a, frame, frame, passthrough=True)
    assert HookFailing.calls == ["reset", "before", "passed_through", "after"] and len(reports) == 2


def test_a_plugin_raising_in_turned_on_is_off_inside_the_engine_until_turned_on_again():
    """QA 75 F4: turned_on() is a hook of the engine step; it fails as before_step does (off for every session,
    the step's sessions told, its engine changes undone), not through the worker's catch-all."""
    HookFailing.fail_in, HookFailing.calls = "turned_on", []
    manager, reports = only(HookFailing)
    frame = np.zeros((4, 4, 3), np.uint8)
    state_a: dict = {}
    for _ in range(3):
        manager.before_step(object(), ["a", "b"])
        manager.after_step()
        manager.before("a", state_a, frame)
    assert HookFailing.calls == ["turned_on", "undo", "reset", "undo", "undo"]  # never run on the engine, nor on frames
    assert [sid for sid, _ in reports] == ["a", "b"] and reports[0][1]["code"] == "plugin_failed"
    assert reports[0][1]["message"].startswith("plugin hookfailing turned off: RuntimeError: turned_on boom; ")
    HookFailing.fail_in, HookFailing.calls = "", []
    _toggle(manager, "hookfailing")
    manager.before_step(object(), ["a"])
    manager.before("a", state_a, frame)
    assert HookFailing.calls == ["turned_on", "before_step", "reset", "before"] and len(reports) == 2


def test_latents_that_come_from_the_engine_not_finite_skip_the_plugin_for_that_frame_only():
    """QA 75 F6: one NaN frame from the engine (an fp16 overflow) turned latent_feedback off for the session,
    blamed on it, and it stayed off after the engine recovered. The frame's row is left alone and the plugin keeps
    its history; the batch-mate's row is blended as usual."""
    from sdbridge.plugins.latent_feedback import LatentFeedback

    manager, reports = only(LatentFeedback)  # strength 0.3: 0.3 of the previous frame's latents
    states: list[dict] = [{}, {}]
    ones = torch.ones(2, 4, 3, 3)
    for _ in range(2):
        assert torch.equal(manager.on_latents(ones, ["a", "b"], states), ones)
    bad = torch.full((2, 4, 3, 3), 3.0)
    bad[0, 1, 2, 2] = float("nan")
    bad[0, 0, 0, 0] = float("inf")
    out = manager.on_latents(bad, ["a", "b"], states)
    assert torch.equal(out[0].isnan(), bad[0].isnan()) and out[0, 0, 0, 0] == float("inf")  # as it came
    assert torch.allclose(out[1], torch.full((4, 3, 3), 0.3 + 0.7 * 3.0))  # session b: blended
    out = manager.on_latents(torch.full((2, 4, 3, 3), 2.0), ["a", "b"], states)
    assert torch.allclose(out[0], torch.full((4, 3, 3), 0.3 + 0.7 * 2.0))  # a: blended with frame 1's, still on
    assert reports == [] and manager.failures == 0


def test_an_off_and_on_between_two_turns_rearms_a_failed_plugin_and_a_repeated_on_does_not():
    """QA 75 F7: re-arming compared the values the worker samples once a turn; an off and an on that both came
    during one step (a button sending 0 then 1) were never seen, and the plugin stayed off. A controller re-sending
    "on" is no toggle: it must not reset the plugin's state."""
    HookFailing.fail_in, HookFailing.calls = "", []
    manager, reports = only(HookFailing)
    frame = np.zeros((4, 4, 3), np.uint8)
    state: dict = {}
    manager.before("a", state, frame)
    state["plugin.hookfailing"]["kept"] = True
    manager.store.update({"plugin.hookfailing.enabled": True})  # re-sent: no change
    manager.prepare(manager.store.snapshot()[1])
    manager.before("a", state, frame)
    assert HookFailing.calls == ["reset", "before", "before"] and state["plugin.hookfailing"]["kept"]
    manager.store.update({"plugin.hookfailing.enabled": False})
    manager.store.update({"plugin.hookfailing.enabled": True})  # both before the worker's next turn
    manager.prepare(manager.store.snapshot()[1])
    manager.before("a", state, frame)
    assert HookFailing.calls[3:] == ["reset", "before"] and "kept" not in state["plugin.hookfailing"]
    HookFailing.fail_in = "passed_through"
    manager.after("a", state, frame, frame, passthrough=True)
    manager.before("a", state, frame)
    assert HookFailing.calls[5:] == ["passed_through"] and len(reports) == 1  # failed: off for session a
    HookFailing.fail_in = ""  # mended; the artist toggles it as the message says, within one step
    manager.store.update({"plugin.hookfailing.enabled": False})
    manager.store.update({"plugin.hookfailing.enabled": True})
    manager.prepare(manager.store.snapshot()[1])
    manager.before("a", state, frame)
    assert HookFailing.calls[6:] == ["reset", "before"] and len(reports) == 1  # re-armed

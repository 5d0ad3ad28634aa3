"""LFOs, measured: shapes, rates, beat sync at a set BPM, clamping, the stored value untouched."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from sdbridge.modulation import SHAPES, Phases, active, modulate, phase_at, targetable, wave
from sdbridge.params import ParamStore, Schema
from sdbridge.plugins.manager import PluginManager

SCHEMA = Schema()


def params(**lfo) -> dict:
    values = SCHEMA.defaults()
    values.update({"strength": 0.5, **{f"lfo1.{k}": v for k, v in lfo.items()}})
    return values


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_are_bounded_and_periodic(shape):
    samples = [wave(shape, i / 100) for i in range(100)]
    assert max(samples) <= 1.0 and min(samples) >= -1.0
    assert max(samples) > 0.9 and min(samples) < -0.9
    assert all(abs(wave(shape, p) - wave(shape, p + 3)) < 1e-9 for p in (0.1, 0.37, 0.8))


def test_beat_sync_phase_at_a_set_bpm():
    # 120 bpm, one cycle per beat: period 0.5 s. The phase at each frame time is exact.
    values = params(target="strength", sync=True, beats=1.0, depth=0.2, shape="sine")
    values["bpm"] = 120.0
    for t in (0.0, 0.125, 0.25, 0.375, 10.0625):
        expected_phase = t * 120 / 60 / 1.0
        assert abs(phase_at(values, "lfo1", t) - expected_phase) < 1e-12
        expected = 0.5 + 0.2 * math.sin(2 * math.pi * expected_phase)
        assert abs(modulate(values, SCHEMA, t)["strength"] - expected) < 1e-12
    assert modulate(values, SCHEMA, 0.125)["strength"] == pytest.approx(0.7)  # the crest, a quarter beat in


def test_free_running_rate_and_clamping():
    values = params(target="strength", rate_hz=2.0, depth=1.0, shape="square")
    assert modulate(values, SCHEMA, 0.1)["strength"] == 1.0   # 0.5 + 1.0 clamped to the range
    assert modulate(values, SCHEMA, 0.3)["strength"] == 0.0
    assert values["strength"] == 0.5                          # the base is never written


def test_int_targets_and_inactive():
    values = params(target="controlnet_1_low_threshold", depth=0.1, shape="sine")
    values["controlnet_1_low_threshold"] = 100
    out = modulate(values, SCHEMA, 0.5)  # rate 0.25 Hz: phase 0.125, sin = 0.707: 100 + 25.5 * 0.707
    assert out["controlnet_1_low_threshold"] == 118
    assert not active(SCHEMA.defaults())
    assert modulate(params(target="prompt"), SCHEMA, 1.0)["prompt"] == SCHEMA.get("prompt").default


@pytest.mark.parametrize("target", ["nonexistent", "prompt", "lfo1.depth", "lfo2.target", "bpm", "width",
                                    "height", "seed", "steps", "clip_skip", "controlnet_2_channel",
                                    "ip_adapter_channel", "ladder_fps", "strenght", "jpeg_quality", "max_fps"])
def test_a_target_an_lfo_cannot_move_is_refused_in_a_sentence_osc_feedback_keeps_whole(target):
    store = ParamStore()
    applied, errors = store.update({"lfo1.target": target})
    assert applied == {} and store.get("lfo1.target") == ""
    assert len(errors) == 1 and errors[0].code == "bad_param" and errors[0].name == "lfo1.target"
    message = str(errors[0])
    assert message.startswith(f"lfo1.target {target!r} is not a parameter")
    assert message.endswith("(targets: docs/presets.md; '' is off)")
    # One short sentence: the OSC feedback copy (after "/sd/lfo1/target: ") is cut at 200 characters.
    assert len("/sd/lfo1/target: " + message) <= 200
    if target in store.schema:
        assert "an LFO can move: only numbers that move the picture by degrees" in message


def test_a_mistyped_target_is_told_the_closest_names_and_a_long_one_stays_short():
    store = ParamStore()
    _, errors = store.update({"env1.target": "strenght"})
    assert str(errors[0]) == ("env1.target 'strenght' is not a parameter; did you mean strength? "
                              "(targets: docs/presets.md; '' is off)")
    _, errors = store.update({"lfo2.target": "controlnet_3_channel"})  # a parameter: the rule, no guesses
    assert "did you mean" not in str(errors[0]) and "an LFO can move" in str(errors[0])
    _, errors = store.update({"env2.target": "z" * 128})
    assert len("/sd/env2/target: " + str(errors[0])) <= 200 and "'" + "z" * 29 + "...'" in str(errors[0])


def test_docs_presets_lists_every_built_in_target():
    store = ParamStore()
    PluginManager(store)
    text = (Path(__file__).parents[2] / "docs" / "presets.md").read_text()
    for spec in store.schema:
        if targetable(spec):
            short = re.sub(r"^controlnet_\d_", "controlnet_N_", spec.name)
            assert f"`{short}`" in text or f"`.{short.rsplit('.', 1)[-1]}`" in text, spec.name


def test_numeric_targets_plugins_included_and_off_are_accepted():
    store = ParamStore()
    PluginManager(store)
    applied, errors = store.update({"lfo1.target": "plugin.flow_warp.strength", "lfo2.target": "guidance"})
    assert errors == [] and applied == {"lfo1.target": "plugin.flow_warp.strength", "lfo2.target": "guidance"}
    assert store.update({"lfo1.target": ""}) == ({"lfo1.target": ""}, [])
    assert targetable(store.schema.get("strength")) and not targetable(store.schema.get("seed"))


def test_a_plugins_place_in_the_chain_is_no_target_and_an_envelope_is_named_as_one():
    """QA 5: an LFO or an envelope could move plugin.*.order (the chain re-ordered every frame); an envelope's
    refusal said "an LFO"."""
    from sdbridge.plugins.manager import PluginManager
    from sdbridge.plugins.similarity import SimilarityFilter

    store = ParamStore()
    PluginManager(store, {"similarity": SimilarityFilter})
    assert "plugin.similarity.order" in store.schema
    for slot in ("lfo1", "env1"):
        applied, errors = store.update({f"{slot}.target": "plugin.similarity.order"})
        assert applied == {} and len(errors) == 1
        assert ("an envelope" if slot == "env1" else "an LFO") + " can move" in str(errors[0])
    applied, errors = store.update({"env1.target": "plugin.similarity.threshold"})
    assert errors == [] and applied == {"env1.target": "plugin.similarity.threshold"}


def onset_params(**slots) -> dict:
    """The env slots' on_onset settings: ``env1=("preset_next", 2, "a,b,c")``; the other slot off."""
    params = {}
    for slot in ("env1", "env2"):
        kind, every, presets = slots.get(slot, ("none", 1, ""))
        params.update({f"{slot}.on_onset": kind, f"{slot}.onset_every": every, f"{slot}.presets": presets})
    return params


def test_onsets_act_on_every_nth_and_step_through_the_slot_s_presets():
    from sdbridge.modulation import OnsetActions

    actions = OnsetActions()
    params = onset_params(env1=("preset_next", 2, "calm, neon ,watercolor"), env2=("seed_step", 3, ""))
    fed = [actions.feed(1, params, lambda: ["unused"]) for _ in range(8)]
    assert [a.presets for a in fed] == [[], ["calm"], [], ["neon"], [], ["watercolor"], [], ["calm"]]
    assert [a.seed_steps for a in fed] == [0, 0, 1, 0, 0, 1, 0, 0]
    # 5 onsets at every 2nd: neon then watercolor in one block, the last is what shows; one onset counts on.
    assert actions.feed(5, params, list).presets == ["watercolor"]
    assert actions.feed(1, params, list).presets == ["calm"]


def test_preset_random_never_repeats_and_an_empty_list_is_every_preset():
    from sdbridge.modulation import OnsetActions

    actions = OnsetActions(random.Random(5))
    params = onset_params(env1=("preset_random", 1, ""))
    picked = [actions.feed(1, params, lambda: ["a", "b", "c"]).presets[0] for _ in range(30)]
    assert set(picked) == {"a", "b", "c"} and all(x != y for x, y in zip(picked, picked[1:]))
    assert actions.feed(1, params, list).presets == []  # no preset at all: nothing to recall
    off = onset_params(env1=("none", 1, ""))
    assert actions.feed(3, off, lambda: ["a"]).presets == []


def test_a_preset_list_takes_names_a_preset_may_have():
    store = ParamStore()
    assert store.update({"env1.presets": "calm, Neon-2,water colour.v1"})[1] == []
    for bad in ("calm,../etc", "calm,,\u00e9t\u00e9", "x" * 65, "calm, nul.bak"):  # the presets' own rule
        [error] = store.update({"env1.presets": bad})[1]
        assert str(error).startswith("env1.presets: preset name ") and error.name == "env1.presets"
    [error] = store.update({"env1.onset_every": 0})[1]
    assert "env1.onset_every 0 not in [1, 64]" in str(error)


@pytest.mark.parametrize("kind", ["seed_step", "preset_next"])
def test_lowering_onset_every_mid_count_acts_once_on_the_next_onset(kind):
    """15 kicks of a 16-kick phrase, then every kick: the next kick acts once, not for the 15 counted (QA 73 F5)."""
    from sdbridge.modulation import OnsetActions

    def acts(action) -> int:
        return action.seed_steps + len(action.presets)

    actions = OnsetActions()
    params = onset_params(env1=(kind, 16, "a,b,c,d"))
    assert [acts(actions.feed(1, params, list)) for _ in range(15)] == [0] * 15
    params["env1.onset_every"] = 1
    first, second = actions.feed(1, params, list), actions.feed(1, params, list)
    assert (acts(first), acts(second)) == (1, 1)
    if kind == "preset_next":
        assert (first.presets, second.presets) == (["a"], ["b"])  # not 'a' stepped past 15 times
    # Lowered to 4 after 10 of 16: the count is at most one short of the new every, then counts on by 4.
    params["env1.onset_every"] = 16
    assert sum(acts(actions.feed(1, params, list)) for _ in range(10)) == 0
    params["env1.onset_every"] = 4
    assert [acts(actions.feed(1, params, list)) for _ in range(5)] == [1, 0, 0, 0, 1]


def test_a_rate_hz_change_changes_the_speed_not_the_phase():
    """An hour in, rate_hz 0.25 -> 0.2505: the free LFO turns on from where it was (QA 73 F1: 1.8 cycles' jump)."""
    phases = Phases()
    values = params(target="strength", rate_hz=0.25, depth=0.5, shape="sine")
    before = modulate(values, SCHEMA, 3601.0, phases=phases)["strength"]
    assert phase_at(values, "lfo1", 3601.0, phases=phases) == pytest.approx(900.25)   # t * rate until a change
    values["lfo1.rate_hz"] = 0.2505
    assert phase_at(values, "lfo1", 3601.001, phases=phases) == pytest.approx(900.25 + 0.001 * 0.25)
    assert modulate(values, SCHEMA, 3601.001, phases=phases)["strength"] == pytest.approx(before, abs=1e-3)
    assert phase_at(values, "lfo1", 3605.001, phases=phases) == pytest.approx(900.25025 + 4 * 0.2505)
    # Each slot has its own phase; without Phases the phase is t * rate (a set rate's exact phase, as before).
    values.update({"lfo2.target": "guidance", "lfo2.rate_hz": 1.0})
    assert phase_at(values, "lfo2", 3605.001, phases=phases) == pytest.approx(3605.001)
    assert phase_at(values, "lfo1", 3605.001) == pytest.approx(3605.001 * 0.2505)


def test_a_synced_lfo_with_no_beat_given_follows_a_bpm_change_without_a_jump():
    phases = Phases()
    values = params(target="strength", sync=True, beats=4.0)
    values["bpm"] = 120.0
    assert phase_at(values, "lfo1", 600.5, phases=phases) == pytest.approx(1201.0 / 4)
    values["bpm"] = 121.0
    assert phase_at(values, "lfo1", 600.501, phases=phases) == pytest.approx(1201.002 / 4)
    assert phase_at(values, "lfo1", 601.501, phases=phases) == pytest.approx((1201.002 + 121 / 60) / 4)

"""The envelope slots env1/env2 in modulation.modulate: depth, gain, threshold, clamping, depth 0 a no-op."""

from __future__ import annotations

import pytest

from sdbridge.errors import ParamError
from sdbridge.modulation import ENV_SLOTS, active, envelope_amount, modulate
from sdbridge.params import ParamStore, Schema

SCHEMA = Schema()


def params(**env) -> dict:
    values = SCHEMA.defaults()
    values.update({"strength": 0.5, **{f"env1.{k}": v for k, v in env.items()}})
    return values


def test_the_env_params_are_in_the_schema_and_not_lfo_targets():
    for slot in ENV_SLOTS:
        for name in ("target", "band", "depth", "gain", "threshold", "attack_ms", "release_ms", "on_onset"):
            assert f"{slot}.{name}" in SCHEMA
    store = ParamStore(SCHEMA)
    for target in ("env1.depth", "lfo1.depth", "seed", "prompt", "nope"):  # check_target's rules, as for an LFO
        good, errors = SCHEMA.validate({"env1.target": target})
        assert not good and isinstance(errors[0], ParamError) and str(errors[0]).startswith(f"env1.target '{target}'")
    assert store.update({"env1.target": "strength", "env2.target": "guidance"})[1] == []


def test_the_level_moves_the_target_by_depth_times_range():
    values = params(target="strength", depth=0.4, gain=2.0)
    assert modulate(values, SCHEMA, 0.0, envelopes={"env1": 0.25})["strength"] == pytest.approx(0.5 + 0.4 * 0.5)
    assert modulate(values, SCHEMA, 0.0, envelopes={"env1": 0.9})["strength"] == pytest.approx(0.9)  # gain clips
    values["env1.depth"] = -0.4
    assert modulate(values, SCHEMA, 0.0, envelopes={"env1": 0.9})["strength"] == pytest.approx(0.1)
    values["env1.depth"] = 1.0
    assert modulate(values, SCHEMA, 0.0, envelopes={"env1": 0.9})["strength"] == 1.0  # clamped to the range
    assert values["strength"] == 0.5  # the base is never written


def test_threshold_is_subtracted_before_the_gain():
    values = params(target="strength", threshold=0.1, gain=4.0)
    assert envelope_amount(values, "env1", 0.05) == 0.0
    assert envelope_amount(values, "env1", 0.2) == pytest.approx(0.4)


def test_depth_0_silence_or_no_audio_leaves_params_exactly_as_they_are():
    values = params(target="strength", depth=0.0)
    assert modulate(values, SCHEMA, 1.0, envelopes={"env1": 0.8}) == values
    assert not active(values, {"env1": 0.8})
    values["env1.depth"] = 0.5
    assert active(values, {"env1": 0.8}) and not active(values, None)  # no audio input: nothing to do
    assert modulate(values, SCHEMA, 1.0, envelopes=None) == values
    assert modulate(values, SCHEMA, 1.0, envelopes={"env1": 0.0}) == values


def test_int_targets_stay_ints_on_their_grid():
    values = params(target="controlnet_1_low_threshold", depth=0.1, gain=1.0)
    values["controlnet_1_low_threshold"] = 100
    out = modulate(values, SCHEMA, 0.0, envelopes={"env1": 0.5})
    assert out["controlnet_1_low_threshold"] == 113 and isinstance(out["controlnet_1_low_threshold"], int)


def test_envelopes_add_to_the_lfo():
    values = params(target="strength", depth=0.2, gain=1.0)
    values.update({"lfo1.target": "strength", "lfo1.shape": "square", "lfo1.depth": 0.1, "lfo1.rate_hz": 1.0})
    assert modulate(values, SCHEMA, 0.25, envelopes={"env1": 1.0})["strength"] == pytest.approx(0.5 + 0.1 + 0.2)
    assert modulate(values, SCHEMA, 0.25)["strength"] == pytest.approx(0.6)  # the LFO alone, as before


def test_two_slots_on_two_targets():
    values = params(target="strength", depth=0.5, gain=1.0)
    values.update({"env2.target": "guidance", "env2.depth": 0.1, "env2.gain": 1.0, "guidance": 1.0})
    out = modulate(values, SCHEMA, 0.0, envelopes={"env1": 0.5, "env2": 1.0})
    spec = SCHEMA.get("guidance")
    assert out["strength"] == pytest.approx(0.75)
    assert out["guidance"] == pytest.approx(1.0 + 0.1 * (spec.maximum - spec.minimum))

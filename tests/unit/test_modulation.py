"""LFOs, measured: shapes, rates, beat sync at a set BPM, clamping, the stored value untouched."""

from __future__ import annotations

import math

import pytest

from sdbridge.modulation import SHAPES, active, modulate, phase_at, wave
from sdbridge.params import Schema

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
    values = params(target="steps", depth=0.1, shape="sine")
    values["steps"] = 4
    out = modulate(values, SCHEMA, 0.5)  # rate 0.25 Hz: phase 0.125
    assert isinstance(out["steps"], int) and 1 <= out["steps"] <= 50
    assert not active(SCHEMA.defaults())
    assert modulate(params(target="prompt"), SCHEMA, 1.0)["prompt"] == SCHEMA.get("prompt").default

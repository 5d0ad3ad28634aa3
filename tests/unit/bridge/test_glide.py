"""Glides, measured: the curve a glided value follows, against the clock."""

from __future__ import annotations

import asyncio

from sdbridge.bridge.glide import Glider, smoothstep
from sdbridge.params import ParamStore


def test_smoothstep_ends_and_middle():
    assert smoothstep(0) == 0 and smoothstep(1) == 1 and smoothstep(0.5) == 0.5
    assert smoothstep(-1) == 0 and smoothstep(2) == 1


def test_glide_follows_the_curve_and_lands_exactly():
    async def scenario():
        store = ParamStore()
        store.update({"strength": 0.2, "steps": 1})
        glider = Glider(store, rate_hz=100)
        loop = asyncio.get_running_loop()
        samples = []
        store.subscribe(lambda changed: samples.append((loop.time(), dict(changed))))
        started = loop.time()
        glider.start({"strength": 0.8, "steps": 4, "prompt": "now"}, duration_s=0.5)
        await asyncio.sleep(0.8)
        return store, samples, started

    store, samples, started = asyncio.run(scenario())
    assert store.get("strength") == 0.8 and store.get("steps") == 4 and store.get("prompt") == "now"
    assert samples[0][1].get("prompt") == "now"  # text applies at once
    strengths = [(t - started, values["strength"]) for t, values in samples if "strength" in values]
    assert len(strengths) >= 10  # it moved in steps, it did not jump
    values = [v for _, v in strengths]
    assert values == sorted(values)  # monotonic
    for elapsed, value in strengths:
        expected = 0.2 + 0.6 * smoothstep(elapsed / 0.5)
        assert abs(value - expected) < 0.15  # timer jitter on a busy machine; the curve itself is exact
    steps = [values["steps"] for _, values in samples if "steps" in values]
    assert all(isinstance(s, int) for s in steps) and steps[-1] == 4


def test_a_new_glide_replaces_the_one_in_flight():
    async def scenario():
        store = ParamStore()
        glider = Glider(store, rate_hz=100)
        glider.start({"strength": 1.0}, duration_s=1.0)
        await asyncio.sleep(0.1)
        glider.start({"strength": 0.0}, duration_s=0.2)
        await asyncio.sleep(0.4)
        return store.get("strength"), glider.active

    value, active = asyncio.run(scenario())
    assert value == 0.0 and active == []

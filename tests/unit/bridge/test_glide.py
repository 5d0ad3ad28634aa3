"""Glides, measured: the curve a glided value follows, against the clock."""

from __future__ import annotations

import asyncio

import pytest

from sdbridge.bridge.glide import Glider, smoothstep
from sdbridge.params import ParamStore


def test_smoothstep_ends_and_middle():
    assert smoothstep(0) == 0 and smoothstep(1) == 1 and smoothstep(0.5) == 0.5
    assert smoothstep(-1) == 0 and smoothstep(2) == 1


def test_glide_follows_the_curve_and_lands_exactly():
    async def scenario():
        store = ParamStore()
        store.update({"strength": 0.2, "controlnet_1_low_threshold": 10})
        glider = Glider(store, rate_hz=100)
        loop = asyncio.get_running_loop()
        samples = []
        store.subscribe(lambda changed: samples.append((loop.time(), dict(changed))))
        started = loop.time()
        glider.start({"strength": 0.8, "controlnet_1_low_threshold": 40, "effect": "edges"}, duration_s=0.5)
        await asyncio.sleep(0.8)
        return store, samples, started

    store, samples, started = asyncio.run(scenario())
    assert store.get("strength") == 0.8 and store.get("controlnet_1_low_threshold") == 40
    assert store.get("effect") == "edges"
    assert samples[0][1].get("effect") == "edges"  # switches apply at once
    strengths = [(t - started, values["strength"]) for t, values in samples if "strength" in values]
    assert len(strengths) >= 10  # it moved in steps, it did not jump
    values = [v for _, v in strengths]
    assert values == sorted(values)  # monotonic
    for elapsed, value in strengths:
        expected = 0.2 + 0.6 * smoothstep(elapsed / 0.5)
        assert abs(value - expected) < 0.15  # timer jitter on a busy machine; the curve itself is exact
    thresholds = [values["controlnet_1_low_threshold"] for _, values in samples
                  if "controlnet_1_low_threshold" in values]
    assert len(thresholds) >= 10 and all(isinstance(v, int) for v in thresholds)  # whole values, in steps
    assert thresholds == sorted(thresholds) and thresholds[-1] == 40


def test_stepped_integers_change_once_at_the_start():
    # A size gliding was a new engine resolution each step: stepped integers change once, at the start.
    async def scenario():
        store = ParamStore()
        store.update({"seed": 7, "steps": 20, "strength": 0.2})
        glider = Glider(store, rate_hz=100)
        seen = []
        store.subscribe(lambda changed: seen.append(dict(changed)))
        glider.start({"steps": 2, "width": 256, "clip_skip": 2, "strength": 0.8}, duration_s=0.3)
        at_start = store.snapshot()[1]
        await asyncio.sleep(0.5)
        return seen, at_start, glider.active

    seen, at_start, active = asyncio.run(scenario())
    assert (at_start["steps"], at_start["width"], at_start["clip_skip"]) == (2, 256, 2)
    for name in ("steps", "width", "clip_skip"):
        assert sum(name in changed for changed in seen) == 1, name
    assert sum("strength" in changed for changed in seen) >= 5 and active == []


def test_a_new_seed_glides_through_the_seed_blend_and_lands_on_it():
    """A seed gliding 7 -> 1234 by its value would be a new noise at every step: blend_seed takes the new seed,
    seed_blend rises 0 -> 1 (the noise slerps across), and one update lands: the new seed, the blend off."""
    async def scenario():
        store = ParamStore()
        store.update({"seed": 7})
        glider = Glider(store, rate_hz=100)
        seen = []
        store.subscribe(lambda changed: seen.append(dict(changed)))
        glider.start({"seed": 1234}, duration_s=0.3)
        at_start = store.snapshot()[1]
        await asyncio.sleep(0.5)
        return seen, at_start, store.snapshot()[1]

    seen, at_start, at_end = asyncio.run(scenario())
    assert (at_start["seed"], at_start["blend_seed"], at_start["seed_blend"]) == (7, 1234, 0.0)
    weights = [changed["seed_blend"] for changed in seen if "seed_blend" in changed]
    assert len(weights) >= 5 and weights[:-1] == sorted(weights[:-1]) and 0.9 < weights[-2] <= 1.0
    assert (at_end["seed"], at_end["blend_seed"], at_end["seed_blend"]) == (1234, 0, 0.0)
    assert sum("seed" in changed for changed in seen) == 1  # set once, as it lands


def test_a_value_a_client_sets_during_a_glide_wins_and_the_others_glide_on():
    async def scenario():
        store = ParamStore()
        store.update({"strength": 0.2, "guidance": 1.0})
        glider = Glider(store, rate_hz=100)
        glider.start({"strength": 0.35, "guidance": 5.0}, duration_s=0.4)
        await asyncio.sleep(0.12)
        store.update({"strength": 0.99})  # a client's set (WebSocket, HTTP and OSC all end in store.update)
        await asyncio.sleep(0.05)
        middle = (store.get("strength"), glider.active)
        await asyncio.sleep(0.5)
        return store, middle

    store, (strength_after_set, active_after_set) = asyncio.run(scenario())
    assert strength_after_set == 0.99 and active_after_set == ["guidance"]
    assert store.get("strength") == 0.99 and store.get("guidance") == 5.0


@pytest.mark.parametrize("client, expected", [
    ({"prompt": "the sea"}, ("the sea", "", 0.0)),            # a client's prompt ends the blend: it alone
    ({"prompt_blend": 0.25}, ("a forest", "a city", 0.25)),   # a client's blend is left in its hands
])
def test_a_clients_change_during_a_prompt_glide(client, expected):
    async def scenario():
        store = ParamStore()
        store.update({"prompt": "a forest"})
        glider = Glider(store, rate_hz=100)
        glider.start({"prompt": "a city"}, duration_s=0.4)
        await asyncio.sleep(0.1)
        store.update(client)
        await asyncio.sleep(0.5)
        return store.snapshot()[1], glider.active

    values, active = asyncio.run(scenario())
    assert (values["prompt"], values["blend_prompt"], values["prompt_blend"]) == expected
    assert active == []


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


def test_a_new_prompt_glides_through_the_prompt_blend_and_lands_as_the_prompt():
    async def scenario():
        store = ParamStore()
        store.update({"prompt": "a forest"})
        glider = Glider(store, rate_hz=100)
        loop = asyncio.get_running_loop()
        seen = []
        store.subscribe(lambda changed: seen.append((loop.time(), dict(changed))))
        started = loop.time()
        glider.start({"prompt": "a city at night", "strength": 0.9}, duration_s=0.4)
        await asyncio.sleep(0.1)
        middle = store.snapshot()[1]
        await asyncio.sleep(0.5)
        return store, seen, started, middle

    store, seen, started, middle = asyncio.run(scenario())
    # Half way: the old prompt is still the prompt, the new one blended in part of the way.
    assert middle["prompt"] == "a forest" and middle["blend_prompt"] == "a city at night"
    assert 0.0 < middle["prompt_blend"] < 1.0
    blends = [values["prompt_blend"] for _, values in seen if "prompt_blend" in values]
    assert len(blends) >= 5 and blends[:-1] == sorted(blends[:-1])  # 0 -> 1, in steps
    # The landing is one update: the new text becomes the prompt as the blend returns to 0.
    last = [values for _, values in seen if "prompt" in values][-1]
    assert last["prompt"] == "a city at night" and last["prompt_blend"] == 0.0 and last["blend_prompt"] == ""
    assert store.get("prompt") == "a city at night" and store.get("prompt_blend") == 0.0


def test_a_recall_during_a_prompt_glide_lands_the_first_then_glides_on():
    async def scenario():
        store = ParamStore()
        store.update({"prompt": "one"})
        glider = Glider(store, rate_hz=100)
        glider.start({"prompt": "two"}, duration_s=1.0)
        await asyncio.sleep(0.1)
        glider.start({"prompt": "three"}, duration_s=0.2)
        after_second_start = store.snapshot()[1]
        await asyncio.sleep(0.4)
        return store, after_second_start

    store, mid = asyncio.run(scenario())
    assert mid["prompt"] == "two" and mid["blend_prompt"] == "three"
    assert store.get("prompt") == "three" and store.get("prompt_blend") == 0.0


def test_a_value_gliding_beside_a_prompt_glide_leaves_it_gliding():
    """A slewed fader (slew_s > 0: a controller's numbers glide) moved 1 s into a 4 s prompt crossfade landed the
    crossfade at once, the picture jumping to the new prompt (QA 62 F3)."""
    async def scenario():
        store = ParamStore()
        store.update({"prompt": "a forest", "strength": 0.5})
        glider = Glider(store, rate_hz=100)
        glider.start({"prompt": "a city at night"}, duration_s=1.0)
        await asyncio.sleep(0.3)
        before = store.get("prompt_blend")
        glider.start({"strength": 0.6}, duration_s=0.1)
        await asyncio.sleep(0.05)
        during = store.snapshot()[1]
        await asyncio.sleep(1.0)
        glider.close()
        return store, before, during

    store, before, during = asyncio.run(scenario())
    assert 0.0 < before < 1.0
    assert during["prompt"] == "a forest" and during["blend_prompt"] == "a city at night"
    assert during["prompt_blend"] >= before
    assert store.get("prompt") == "a city at night" and store.get("prompt_blend") == 0.0
    assert store.get("strength") == pytest.approx(0.6)


def test_a_look_without_a_blend_lands_with_a_held_blend_off():
    """QA: a saved look leaves an unused blend out; recalled over a blend held on a crossfader, the seed (or prompt)
    jumped and the old blend stayed, so the look was not the saved one. It lands with the blend off."""
    async def scenario():
        store = ParamStore()
        store.update({"seed": 7, "blend_seed": 9, "seed_blend": 0.6, "prompt": "a", "blend_prompt": "b",
                      "prompt_blend": 0.3})
        glider = Glider(store, rate_hz=100)
        glider.start({"seed": 1234, "prompt": "c", "strength": 0.8}, duration_s=0.2)
        await asyncio.sleep(0.4)
        return store.snapshot()[1]

    values = asyncio.run(scenario())
    assert (values["seed"], values["blend_seed"], values["seed_blend"]) == (1234, 0, 0.0)
    assert (values["prompt"], values["blend_prompt"], values["prompt_blend"]) == ("c", "", 0.0)
    assert values["strength"] == 0.8


def test_mixed_prompt_weights_glide_and_a_new_text_comes_in_from_weight_zero():
    """A look that brings in prompt_2: its text applies at once (at weight 0 it is not heard), its weight glides
    up from 0 as any number does, and the prompt's own weight glides too."""
    async def scenario():
        store = ParamStore()
        store.update({"prompt": "a forest", "prompt_2": "old, unheard", "prompt_2_weight": 0.0})
        glider = Glider(store, rate_hz=100)
        seen = []
        store.subscribe(lambda changed: seen.append(dict(changed)))
        glider.start({"prompt_2": "a storm", "prompt_2_weight": 2.0, "prompt_weight": 0.5}, duration_s=0.3)
        at_start = store.snapshot()[1]
        await asyncio.sleep(0.5)
        return store, seen, at_start

    store, seen, at_start = asyncio.run(scenario())
    assert at_start["prompt_2"] == "a storm" and at_start["prompt_2_weight"] == 0.0
    weights = [changed["prompt_2_weight"] for changed in seen if "prompt_2_weight" in changed]
    assert len(weights) >= 5 and weights == sorted(weights) and weights[-1] == 2.0
    assert sum("prompt_weight" in changed for changed in seen) >= 5 and store.get("prompt_weight") == 0.5
    assert store.get("prompt") == "a forest"  # the main prompt did not change: no prompt glide


def test_a_mixed_prompt_fading_out_keeps_its_text_until_its_weight_lands():
    """A saved look with prompt_2 off ('' at weight 0) recalled over a mix that holds one: replaced at once, the
    text would cut the prompt out of the mix; it fades out instead, and the text changes as the weight lands."""
    async def scenario():
        store = ParamStore()
        store.update({"prompt_2": "a storm", "prompt_2_weight": 1.5, "prompt_3": "ice", "prompt_3_weight": 1.0})
        glider = Glider(store, rate_hz=100)
        seen = []
        store.subscribe(lambda changed: seen.append(dict(changed)))
        glider.start({"prompt_2": "", "prompt_2_weight": 0.0, "prompt_3": "fire"}, duration_s=0.3)
        at_start = store.snapshot()[1]
        await asyncio.sleep(0.1)
        middle = store.snapshot()[1]
        await asyncio.sleep(0.4)
        return store, seen, at_start, middle

    store, seen, at_start, middle = asyncio.run(scenario())
    assert middle["prompt_2"] == "a storm" and 0.0 < middle["prompt_2_weight"] < 1.5
    weights = [changed["prompt_2_weight"] for changed in seen if "prompt_2_weight" in changed]
    assert len(weights) >= 5 and weights == sorted(weights, reverse=True)
    last = [changed for changed in seen if "prompt_2" in changed][-1]
    assert last == {"prompt_2": "", "prompt_2_weight": 0.0}  # one update: the text goes as the weight lands
    assert store.get("prompt_2") == "" and store.get("prompt_2_weight") == 0.0
    assert at_start["prompt_3"] == "fire"  # its weight stays above 0: a new text under it is a step, as any text


def test_a_client_text_during_a_fade_out_wins():
    async def scenario():
        store = ParamStore()
        store.update({"prompt_2": "a storm", "prompt_2_weight": 1.0})
        glider = Glider(store, rate_hz=100)
        glider.start({"prompt_2": "", "prompt_2_weight": 0.0}, duration_s=0.4)
        await asyncio.sleep(0.1)
        store.update({"prompt_2": "a bird"})
        await asyncio.sleep(0.5)
        return store, glider.active

    store, active = asyncio.run(scenario())
    assert store.get("prompt_2") == "a bird" and 0.0 < store.get("prompt_2_weight") < 1.0 and active == []


def _fader_sweep(slew_s: float, top_s: float = 1.0, every_s: float = 0.01) -> list[tuple[float, float, float]]:
    """A fader swept 0 -> 1 over ``top_s``, a value every ``every_s``, under a slew of ``slew_s``; the glider stepped
    on its own clock at each value: (time, fader, value)."""
    async def scenario():
        store = ParamStore()
        store.update({"strength": 0.0})
        glider = Glider(store, rate_hz=100)
        trace = []
        for i in range(1, round(top_s / every_s) + 1):
            now, fader = i * every_s, min(1.0, i * every_s / top_s)
            glider.start({"strength": fader}, slew_s, follow=True, now=now)
            glider.step(now + every_s / 2)
            trace.append((now, fader, store.get("strength")))
        glider.step(top_s + slew_s * 1.001)  # just past: the sum of floats may fall short of slew_s
        trace.append((top_s + slew_s, 1.0, store.get("strength")))
        active = glider.active
        glider.close()
        return trace, active

    trace, active = asyncio.run(scenario())
    assert active == []  # landed within slew_s of the last value
    return trace


@pytest.mark.parametrize("slew_s", [0.1, 0.2, 0.5])
def test_a_moving_fader_under_slew_is_followed_not_frozen(slew_s):
    """QA 73 F8: each of a fader's values restarted a smoothstep from standstill, so a 1 s sweep under slew_s 0.5
    moved strength by 0.017 while the hand moved; the value follows the hand about 2/3 slew_s behind now."""
    trace = _fader_sweep(slew_s)
    values = [value for _, _, value in trace]
    assert values == sorted(values) and trace[-1][2] == 1.0
    for now, fader, value in trace:
        assert value <= fader + 1e-9  # never ahead of the hand (no overshoot)
        if now >= 0.5:  # past the start from rest: within slew_s of where the hand was
            assert value >= min(1.0, now - slew_s) - 0.01, (now, fader, value)


def test_one_step_under_slew_arrives_as_the_smoothstep():
    async def scenario():
        store = ParamStore()
        store.update({"strength": 0.2})
        glider = Glider(store, rate_hz=100)
        glider.start({"strength": 0.8}, 0.5, follow=True, now=10.0)
        samples = []
        for k in range(1, 11):
            glider.step(10.0 + k * 0.05)
            samples.append((k * 0.05, store.get("strength")))
        active = glider.active
        glider.close()
        return samples, active

    samples, active = asyncio.run(scenario())
    for elapsed, value in samples:
        assert value == pytest.approx(0.2 + 0.6 * smoothstep(elapsed / 0.5), abs=1e-9)
    assert samples[-1][1] == 0.8 and active == []


def test_a_retargeted_slew_keeps_its_speed_and_stays_between_the_faders_values():
    """A fader swung fast up and down (faster than the slew follows): the value's speed does not jump at a new value
    heading the same way, and it never leaves the range the fader covered (strength's 0 .. 1: none refused)."""
    async def scenario():
        store = ParamStore()
        store.update({"strength": 0.0})
        glider = Glider(store, rate_hz=100)
        glider.start({"strength": 1.0}, 0.5, follow=True, now=0.0)
        before = [(t, glider.step(t) or store.get("strength")) for t in (0.199, 0.2)]
        glider.start({"strength": 0.9}, 0.5, follow=True, now=0.2)
        after = [(t, glider.step(t) or store.get("strength")) for t in (0.2, 0.201)]
        seen = []
        for i in range(1, 200):  # 0 -> 1 -> 0 twice a second, a value every 10 ms
            now = 0.2 + i * 0.01
            fader = abs(((now * 2) % 2.0) - 1.0)
            glider.start({"strength": fader}, 0.5, follow=True, now=now)
            glider.step(now + 0.005)
            seen.append(store.get("strength"))
        glider.close()
        return before, after, seen

    before, after, seen = asyncio.run(scenario())
    speed_before = (before[1][1] - before[0][1]) / 0.001
    speed_after = (after[1][1] - after[0][1]) / 0.001
    assert speed_before > 1.0 and speed_after == pytest.approx(speed_before, rel=0.02)
    assert all(0.0 <= value <= 1.0 for value in seen) and max(seen) - min(seen) > 0.3  # moved, in range


def test_a_recall_over_a_slew_in_flight_glides_from_rest_on_the_smoothstep():
    async def scenario():
        store = ParamStore()
        store.update({"strength": 0.0})
        glider = Glider(store, rate_hz=100)
        glider.start({"strength": 1.0}, 0.5, follow=True, now=0.0)
        glider.step(0.25)
        moving = store.get("strength")
        glider.start({"strength": 0.1}, 0.4, now=0.25)  # a preset's glide_s: its own shape, from the value at rest
        samples = []
        for k in range(1, 5):
            glider.step(0.25 + k * 0.1)
            samples.append((k * 0.1, store.get("strength")))
        glider.close()
        return moving, samples

    moving, samples = asyncio.run(scenario())
    assert 0.0 < moving < 1.0
    for elapsed, value in samples:
        assert value == pytest.approx(moving + (0.1 - moving) * smoothstep(elapsed / 0.4), abs=1e-9)

"""Glides: numeric parameters move to new values over a time instead of jumping.

A preset recall with ``glide_s`` > 0 hands its numeric targets to :class:`Glider`, which steps
them on the event loop at ``rate_hz`` (each step one ParamStore update, so the worker sees a
consistent set at every frame boundary, and OSC feedback echoes the applied values as they move).
Text and switches apply at once, but for the prompt and the seed: each glides through the engine's
blend of two (:data:`BLENDED`: ``blend_prompt`` takes the new text, ``prompt_blend`` glides 0 → 1,
and at the end one update makes the new text the prompt and sets the blend back to 0, which
encodes the same embeddings, so the hand-over shows nothing; ``blend_seed`` and ``seed_blend``
slerp the noise so). A new glide of a parameter replaces the one in flight.

Other stepped integers (``modulation.STEPPED``: width, height, steps, clip_skip, ...) apply at
once, at the start of the glide: the values between are no quantity.

The mixed prompts (:data:`MIXED`: ``prompt_2`` .. ``prompt_4``) are text beside numeric weights: their weights
glide like any number, so a look fades a prompt in or out. A new text applies at once (at weight 0 it is not
heard: the weight then glides up from 0), but a text that a look replaces while its weight glides from above 0 to
0 (a saved look with the slot off) is replaced as the weight lands, so the old prompt fades out. A new text under a
weight that stays above 0 is a step, as any text.

A value someone sets while it glides (a controller over OSC, WebSocket or HTTP, the quality
ladder) wins: at each step the glider checks that the stored value is still the one it last
wrote, and drops the parameter if not; the others glide on. So no transport needs to know about
glides. During a prompt glide, a new ``prompt`` from a client ends the blend at once (the client's
prompt alone); a client's ``blend_prompt`` or ``prompt_blend`` leaves the blend in its hands. The
same holds for a seed glide and ``seed``, ``blend_seed``, ``seed_blend``.

A controller's value under ``slew_s`` (``start(..., follow=True)``) retargets a glide in flight from where it is,
keeping its speed (a cubic Hermite curve to the new value, ending at rest): a fader sends a value every few
milliseconds, and each restarting from standstill (smoothstep) held the value still while the hand moved (QA 73 F8).
A fader moving steadily is followed about two thirds of ``slew_s`` behind; one step from rest is the smoothstep.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

from sdbridge.modulation import stepped
from sdbridge.params import ParamStore


# A parameter that glides through the engine's blend of two values -> (the second value, the blend's weight, the
# second value's resting value once the blend lands).
BLENDED: dict[str, tuple[str, str, Any]] = {"prompt": ("blend_prompt", "prompt_blend", ""),
                                            "seed": ("blend_seed", "seed_blend", 0)}
_BLEND_OF = {weight: (name, other, rest) for name, (other, weight, rest) in BLENDED.items()}
# The prompts mixed beside the prompt by their weights (engines/prompt_encode.mix) -> the weight.
MIXED = {f"prompt_{slot}": f"prompt_{slot}_weight" for slot in (2, 3, 4)}


def smoothstep(t: float) -> float:
    """Ease in and out: no jolt at either end of a glide."""
    t = min(max(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def hermite(start: float, end: float, velocity: float, duration: float, t: float) -> tuple[float, float]:
    """The value and its speed (per second) ``t`` seconds into a glide from ``start`` moving at ``velocity`` to
    ``end``, at rest there after ``duration``: with no velocity, the smoothstep."""
    u = min(max(t / duration, 0.0), 1.0)
    span = end - start
    value = start + span * smoothstep(u) + velocity * duration * (u * u * u - 2.0 * u * u + u)
    speed = span * 6.0 * u * (1.0 - u) / duration + velocity * (3.0 * u * u - 4.0 * u + 1.0)
    return value, speed


def kept_velocity(velocity: float, span: float, duration: float) -> float:
    """The speed a retargeted glide keeps: none when it heads away from its new end (a fader turned back), at most
    three times the span's mean speed (a Hermite curve ending at rest stays between its ends then, so a value never
    overshoots the fader nor leaves the parameter's range)."""
    if span == 0.0 or velocity * span <= 0.0:
        return 0.0
    limit = 3.0 * span / duration
    return min(velocity, limit) if span > 0 else max(velocity, limit)


class Glider:
    def __init__(self, store: ParamStore, rate_hz: float = 60.0) -> None:
        self.store = store
        self.period_s = 1.0 / rate_hz
        # name -> start, end, t0, duration, start velocity (per second; 0 but for a retargeted slew)
        self._targets: dict[str, tuple[float, float, float, float, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._finish: dict[str, dict[str, Any]] = {}  # name -> one update applied when its glide lands
        self._written: dict[str, Any] = {}  # name -> the value the store should hold unless a client set it
        self._watch: dict[str, dict[str, Any]] = {}  # prompt glide: the texts it set, which a client may replace

    def start(self, values: Mapping[str, Any], duration_s: float, follow: bool = False,
              now: float | None = None) -> tuple[dict[str, Any], list]:
        """Apply ``values``: numeric ones glide over ``duration_s``, the rest at once.

        ``follow``: a controller's values (slew), which retarget a number's glide in flight keeping its speed;
        otherwise (a recall) a glide starts at rest. ``now``: the loop's time (a test's clock), else read."""
        good, errors = self.store.schema.validate(values)
        loop = asyncio.get_running_loop()
        now = loop.time() if now is None else now
        immediate: dict[str, Any] = {}
        # A blend glide in flight that these values touch lands at once: the new one starts from its end. One they
        # leave alone glides on: a slewed fader's move landed a preset's prompt crossfade mid-way (QA 62 F3).
        for name, finish in list(self._finish.items()):
            if name in values or not finish.keys().isdisjoint(values):
                self._drop(name)
                self.store.update(finish, counted=False)
        _, current = self.store.snapshot()
        targets = dict(good)
        for name, (other, weight, rest) in BLENDED.items():
            value = targets.get(name)
            if value is None or {other, weight} & targets.keys() or weight not in self.store.schema:
                continue  # not set by this look, or its blend set too: applied as written
            if float(current.get(weight) or 0.0) != 0.0:
                # A look without a blend recalled over one held (a crossfader, an LFO's base): it lands with the
                # blend off, at once (a saved look leaves an unused blend out, so it would stay otherwise).
                immediate.update({other: rest, weight: 0.0})
            elif duration_s > 0 and value != current.get(name):
                del targets[name]
                immediate[other] = value
                self._targets[weight] = (0.0, 1.0, now, duration_s, 0.0)
                self._written[weight] = current.get(weight)
                self._finish[weight] = {name: value, other: rest, weight: 0.0}
                self._watch[weight] = {name: current.get(name), other: value}
        for name, weight in MIXED.items():
            value = targets.get(name)
            if (value is None or duration_s <= 0 or value == current.get(name) or weight not in self.store.schema
                    or not float(current.get(weight) or 0.0) > 0.0 or float(targets.get(weight, 1.0)) != 0.0):
                continue  # not a mixed prompt fading out: its text applies at once (unheard at weight 0)
            # Its weight glides to 0 under the old text, which the look's text replaces as the weight lands.
            del targets[name]
            self._finish[weight] = {name: value, weight: 0.0}
            self._watch[weight] = {name: current.get(name)}
        for name, target in targets.items():
            spec = self.store.schema.get(name)
            if (duration_s > 0 and spec.numeric and not stepped(name)
                    and isinstance(current.get(name), (int, float))):
                start, velocity = float(current[name]), 0.0
                flight = self._targets.get(name)
                if (follow and flight is not None and name not in self._finish
                        and current[name] == self._written.get(name)):
                    # Where the glide is now, not its last step (a period old, rounded for an integer).
                    start, velocity = hermite(flight[0], flight[1], flight[4], flight[3], now - flight[2])
                    velocity = kept_velocity(velocity, float(target) - start, duration_s)
                self._targets[name] = (start, float(target), now, duration_s, velocity)
                self._written[name] = current[name]
            else:
                self._drop(name)
                immediate[name] = target
        if immediate:
            self.store.update(immediate)
        if self._targets and (self._task is None or self._task.done()):
            self._task = loop.create_task(self._run(), name="sdbridge-glide")
        return good, errors

    def cancel(self, names: Any = None) -> None:
        for name in list(self._targets) if names is None else names:
            finish = self._finish.get(name)
            self._drop(name)
            if finish is not None:  # a blend glide stopped half way lands on its new prompt (or seed)
                self.store.update(finish)

    def _drop(self, name: str) -> None:
        for table in (self._targets, self._finish, self._written, self._watch):
            table.pop(name, None)

    def _taken_over(self, current: Mapping[str, Any]) -> dict[str, Any]:
        """Drop each glide whose value a client set since the last step; the update that ends
        a blend whose prompt (or seed) a client replaced."""
        landing: dict[str, Any] = {}
        for name in list(self._targets):
            watch = self._watch.get(name, {})
            if current.get(name) == self._written.get(name) and all(current.get(k) == v for k, v in watch.items()):
                continue
            blended = _BLEND_OF.get(name)
            if (blended is not None and current.get(name) == self._written.get(name)
                    and current.get(blended[0]) != watch.get(blended[0])):
                landing.update({blended[1]: blended[2], name: 0.0})  # the client's prompt (or seed) alone
            self._drop(name)
        return landing

    @property
    def active(self) -> list[str]:
        return sorted(self._targets)

    def destination(self) -> dict[str, Any]:
        """Where the glides in flight land: each value's end, and each blend's landing update (the new prompt or
        seed alone, its blend back at 0)."""
        landing: dict[str, Any] = {}
        for name, (_, end, _, _, _) in self._targets.items():
            landing[name] = self._value(name, end)
            landing.update(self._finish.get(name, {}))
        return landing

    def _value(self, name: str, value: float) -> float | int:
        """A glided value as the parameter holds it: an integer one rounded (to its multiple, where it has one)."""
        spec = self.store.schema.get(name)
        if spec.kind != "int":
            return value
        rounded = int(math.floor(value + 0.5))
        return int(round(rounded / spec.multiple_of) * spec.multiple_of) if spec.multiple_of else rounded

    def step(self, now: float) -> None:
        """Move each glide to where it is at ``now`` (the loop's time): one store update."""
        step = self._taken_over(self.store.snapshot()[1])
        for name, (start, end, t0, duration, velocity) in list(self._targets.items()):
            landed = now - t0 >= duration
            value = self._value(name, end if landed else hermite(start, end, velocity, duration, now - t0)[0])
            step[name] = value
            if landed:
                finish = self._finish.get(name, {})
                self._drop(name)
                step.update(finish)
            else:
                self._written[name] = value
        if step:
            self.store.update(step, counted=False)  # its own motion: set_counts tells what someone set

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._targets:
            self.step(loop.time())
            await asyncio.sleep(self.period_s)

    def close(self) -> None:
        for table in (self._targets, self._finish, self._written, self._watch):
            table.clear()
        if self._task is not None:
            self._task.cancel()

"""LFOs on numeric parameters, free-running or synced to a tempo. Sans-I/O: time is an argument.

Two LFO slots, each a set of ordinary parameters (so OSC, WebSocket, HTTP and presets reach
them): ``lfo1.target`` names a numeric parameter (``strength``, ``guidance``, a plugin's ...),
``lfo1.shape``, ``lfo1.depth`` (a fraction of the target's range), and either ``lfo1.rate_hz``
or, with ``lfo1.sync`` on, ``lfo1.beats`` per cycle at ``bpm``. The LFO moves the value the
engine sees around the stored one (the base), clamped to the range; the stored value stays what
the artist set, so turning the LFO off returns to it.

A target must be a numeric parameter with a range that moves the picture by degrees (see
:func:`check_target`): not a stepped one (:data:`STEPPED`: a seed, a size, a step count, whose
neighbouring values are no nearer to each other than any two), and not a control of the bridge
itself (``bpm``, the LFOs' own settings, ``slew_s``, ``ladder_fps``), which the LFO would not move
anyway: those are read from the store, not from the frame's modulated copy.

The worker applies :func:`modulate` at each frame boundary with the frame's time, so the phase
of every frame is exact for that time (a beat-synced LFO's phase error is only the frame
boundary's own jitter). Phases are integrated (:class:`Phases`, bridge/beat_clock.py for the beat):
a new ``rate_hz`` or ``bpm`` changes how fast an LFO turns from that frame on, never where it is.
A new ``beats`` does move a synced LFO's phase: its cycles stay on the bar (beat 0, 4, 8 ... for 4).

Two envelope slots, ``env1`` and ``env2`` (docs/audio.md), move a target the same way from sound: the
audio input (bridge/audio.py) follows ``envN.band`` of it with ``envN.attack_ms`` / ``release_ms``
(audio_analysis.py) and hands the worker each slot's level; the target moves by
``depth * range * clip((level - threshold) * gain, 0, 1)`` from its base, after the LFOs. A slot at
depth 0, or with no audio input, leaves its target exactly as it is.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdbridge.errors import ParamError
from sdbridge.params import ParamSpec, Schema

SLOTS = ("lfo1", "lfo2")
SHAPES = ("sine", "triangle", "saw", "square")
ENV_SLOTS = ("env1", "env2")
ENV_BANDS = ("rms", "low", "mid", "high", "onset")  # audio_analysis.BANDS (not imported: that one needs numpy)
ON_ONSET = ("none", "seed_step", "preset_next", "preset_random")
ONSET_EVERY_MAX = 64

# Integer parameters whose in-between values are no quantity: seed 43 is as far from 42 as any
# other; a new width or height re-opens the outputs and re-sizes the engine; steps, clip_skip and
# motion_window re-prepare the engine (a new schedule, a new text-encoder layer, a new batch). An
# LFO may not move them (a new one every frame: flicker, and outputs re-opened at every frame), and
# a glide changes them in one step at its start (bridge/glide.py).
STEPPED = frozenset({"seed", "blend_seed", "width", "height", "steps", "clip_skip", "motion_window"})
_STEPPED_PATTERN = re.compile(r"^(controlnet_\d+|ip_adapter)_channel$")  # a source channel, not an amount
NOT_TARGETS_GROUPS = ("modulation", "control")  # bpm, the LFOs' own settings, slew_s, ladder_fps
# Numbers that are no part of the picture: the replies' JPEG quality, txt2img's frame-rate cap, a plugin's place
# in the chain (QA 5: an LFO could move them, re-ordering the plugins every frame).
NOT_TARGETS = frozenset({"jpeg_quality", "max_fps"})
_NOT_TARGET_PATTERN = re.compile(r"^plugin\.[^.]+\.order$")


def stepped(name: str) -> bool:
    return name in STEPPED or bool(_STEPPED_PATTERN.match(name))


def targetable(spec: ParamSpec) -> bool:
    """Whether an LFO or an envelope may move ``spec``: numeric, with a range, by degrees, part of the picture."""
    return (spec.numeric and spec.minimum is not None and spec.maximum is not None
            and not stepped(spec.name) and spec.group not in NOT_TARGETS_GROUPS and spec.name not in NOT_TARGETS
            and not _NOT_TARGET_PATTERN.match(spec.name))


def check_target(spec: ParamSpec, value: Any, schema: Schema) -> None:
    """``lfoN.target`` (``spec``): '' (off) or the name of a parameter :func:`targetable` allows."""
    if value == "" or (value in schema and targetable(schema.get(value))):
        return
    # Short: the OSC feedback copy of an error is cut at 200 characters, and listing all ~50 targets cut it
    # mid-list (QA 5). A typo gets the closest targets; a parameter that is no target gets the rule; docs/presets.md
    # lists them all. Worst case ~190 characters with the OSC address in front.
    shown = value if len(value) <= 32 else value[:29] + "..."
    if value not in schema:
        close = difflib.get_close_matches(value, [other.name for other in schema if targetable(other)], n=2)
        reason = "is not a parameter" + (f"; did you mean {' or '.join(close)}?" if close else "")
    else:
        mover = "an envelope" if spec.name.startswith("env") else "an LFO"
        reason = f"is not a parameter {mover} can move: only numbers that move the picture by degrees"
    raise ParamError(f"{spec.name} {shown!r} {reason} (targets: docs/presets.md; '' is off)",
                     name=spec.name, value=value)


def lfo_params() -> tuple[ParamSpec, ...]:
    specs: list[ParamSpec] = [ParamSpec("bpm", "float", 120.0, "Tempo for beat-synced LFOs and glides.",
                                        minimum=20.0, maximum=300.0, group="modulation")]
    for slot in SLOTS:
        specs += [
            ParamSpec(f"{slot}.target", "str", "", "The numeric parameter this LFO moves ('' for none), "
                      "e.g. strength or plugin.flow_warp.strength; not seed, width, height, steps, clip_skip.",
                      max_length=128, group="modulation", check=check_target),
            ParamSpec(f"{slot}.shape", "enum", "sine", "Wave shape.", choices=SHAPES, group="modulation"),
            ParamSpec(f"{slot}.depth", "float", 0.1, "How far it swings either way, as a fraction of the "
                      "target's range.", minimum=0.0, maximum=1.0, group="modulation"),
            ParamSpec(f"{slot}.rate_hz", "float", 0.25, "Cycles per second when not synced.", minimum=0.001,
                      maximum=20.0, group="modulation"),
            ParamSpec(f"{slot}.sync", "bool", False, "Sync to bpm: one cycle every `beats` beats.",
                      group="modulation"),
            ParamSpec(f"{slot}.beats", "float", 4.0, "Beats per cycle when synced.", minimum=0.125, maximum=64.0,
                      group="modulation"),
        ]
    return tuple(specs)


def envelope_params() -> tuple[ParamSpec, ...]:
    specs: list[ParamSpec] = []
    for slot in ENV_SLOTS:
        specs += [
            ParamSpec(f"{slot}.target", "str", "", "The numeric parameter this audio envelope moves ('' for none); "
                      "the same ones an LFO may move.", max_length=128, group="modulation", check=check_target),
            ParamSpec(f"{slot}.band", "enum", "low", "What it follows in the --audio-in sound: rms (all of it), low "
                      "(20-150 Hz: kicks, bass), mid (150-2000 Hz), high (over 2000 Hz: hats), onset (1 at each "
                      "transient, decaying with release_ms).", choices=ENV_BANDS, group="modulation"),
            ParamSpec(f"{slot}.depth", "float", 0.2, "How far the target moves at full level, as a fraction of its "
                      "range; negative moves it down. 0 leaves it as it is.", minimum=-1.0, maximum=1.0,
                      group="modulation"),
            ParamSpec(f"{slot}.gain", "float", 4.0, "The band's level (RMS, a full-scale sine 0.707) is multiplied by "
                      "this, then clipped to 0-1.", minimum=0.0, maximum=1000.0, group="modulation"),
            ParamSpec(f"{slot}.threshold", "float", 0.0, "Levels up to this count as silence (a room's hum): "
                      "subtracted before the gain.", minimum=0.0, maximum=1.0, group="modulation"),
            ParamSpec(f"{slot}.attack_ms", "float", 10.0, "Rise time: a step in level is followed to 63% in this "
                      "long (0: at once).", minimum=0.0, maximum=5000.0, group="modulation"),
            ParamSpec(f"{slot}.release_ms", "float", 200.0, "Fall time: a drop in level is followed to 63% in this "
                      "long (0: at once).", minimum=0.0, maximum=10000.0, group="modulation"),
            ParamSpec(f"{slot}.on_onset", "enum", "none", "What an onset (transient) in the sound also does: "
                      "none; seed_step (the seed goes up by one: a new picture on every kick); preset_next or "
                      "preset_random (a preset of `presets` is recalled, with its glide).",
                      choices=ON_ONSET, group="modulation"),
            ParamSpec(f"{slot}.onset_every", "int", 1, "on_onset acts on every Nth onset only (4: once a bar of "
                      "four kicks).", minimum=1, maximum=ONSET_EVERY_MAX, group="modulation"),
            ParamSpec(f"{slot}.presets", "str", "", "The presets preset_next steps through and preset_random picks "
                      "from, comma-separated in order; empty: every preset, by name.", max_length=1024,
                      group="modulation", check=check_preset_list),
        ]
    return tuple(specs)


def preset_list(value: str) -> list[str]:
    """``envN.presets`` -> its names, in order (empty: none given)."""
    return [name.strip() for name in value.split(",") if name.strip()]


def check_preset_list(spec: ParamSpec, value: Any, schema: Schema) -> None:
    """Names a preset may have (whether one exists is told at the recall: presets come and go)."""
    from sdbridge.presets import check_name

    for name in preset_list(value):
        try:
            check_name(name)  # the presets' own rule (a Windows device name too)
        except ParamError as exc:
            raise ParamError(f"{spec.name}: {exc}", name=spec.name, value=value) from None


@dataclass
class OnsetAction:
    """What a block's onsets do: steps for the seed, and the presets to recall (in order; usually one)."""

    seed_steps: int = 0
    presets: list[str] = field(default_factory=list)


class OnsetActions:
    """Each envelope slot's ``on_onset``, sans I/O: counts onsets to every ``onset_every``-th, and steps through
    (``preset_next``) or picks from (``preset_random``, never the one it recalled last) the slot's presets."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._counts = dict.fromkeys(ENV_SLOTS, 0)
        self._last: dict[str, str | None] = dict.fromkeys(ENV_SLOTS)
        self._rng = rng or random.Random()

    def feed(self, onsets: int, params: Mapping[str, Any], every_preset: Callable[[], list[str]]) -> OnsetAction:
        """``onsets`` heard in one block; ``every_preset``: the library's names, for a slot that names none."""
        action = OnsetAction()
        for slot in ENV_SLOTS:
            kind = params[f"{slot}.on_onset"]
            if kind == "none":
                self._counts[slot] = 0  # turned on again, it counts from its next onset
                continue
            every = int(params[f"{slot}.onset_every"])
            # A count kept from a larger onset_every is no backlog: lowered mid-count, it would fire all of it on
            # the next onset (QA 73 F5: 15 of 16 kicks, then every 1: the seed stepped by 16 on one kick).
            count = min(self._counts[slot], every - 1)
            fires, self._counts[slot] = divmod(count + onsets, every)
            if not fires:
                continue
            if kind == "seed_step":
                action.seed_steps += fires
                continue
            names = preset_list(params[f"{slot}.presets"]) or every_preset()
            if names:
                for _ in range(fires):
                    name = self._pick(slot, kind, names)
                action.presets.append(name)  # several in one block: the last is what shows
        return action

    def _pick(self, slot: str, kind: str, names: list[str]) -> str:
        last = self._last[slot]
        if kind == "preset_next":
            name = names[(names.index(last) + 1) % len(names)] if last in names else names[0]
        else:
            name = self._rng.choice([other for other in names if other != last] or names)
        self._last[slot] = name
        return name


def envelope_amount(params: Mapping[str, Any], slot: str, level: float) -> float:
    """0..1: how far ``slot``'s ``level`` drives its target, after threshold and gain."""
    driven = (level - float(params[f"{slot}.threshold"])) * float(params[f"{slot}.gain"])
    return min(max(driven, 0.0), 1.0)


def wave(shape: str, phase: float) -> float:
    """-1..1 at ``phase`` in cycles (0 = start of a cycle, rising through 0 for sine and triangle)."""
    phase %= 1.0
    if shape == "sine":
        return math.sin(2 * math.pi * phase)
    if shape == "triangle":
        return 4 * phase if phase < 0.25 else (2 - 4 * phase if phase < 0.75 else 4 * phase - 4)
    if shape == "saw":
        return 2 * phase if phase < 0.5 else 2 * phase - 2  # rises from 0 to 1, wraps to -1 at mid-cycle
    return 1.0 if phase < 0.5 else -1.0


class Phases:
    """Phases that change speed, not place, when their rate changes: each is integrated, re-anchored at the
    first reading with a new rate on the phase it had reached (QA 73 F1: ``t * rate_hz`` an hour in moved by 1.8
    cycles when rate_hz went 0.25 -> 0.2505). The stretch since the last reading counts at that reading's rate.
    The worker keeps one for its frames; without one, :func:`phase_at` is ``t * rate`` (a set rate's exact phase)."""

    def __init__(self) -> None:
        self._anchors: dict[str, tuple[float, float, float]] = {}  # key: (t, phase at t, rate from t on)

    def at(self, key: str, t: float, rate: float) -> float:
        """``key``'s phase (in cycles, or beats) at ``t`` seconds, running at ``rate`` per second from here on."""
        anchor = self._anchors.get(key)
        if anchor is None:
            self._anchors[key] = (t, t * rate, rate)  # the first reading: as if at this rate since t = 0
            return t * rate
        since, phase, old = anchor
        if rate != old:
            since, phase = max(t, since), phase + (max(t, since) - since) * old
            self._anchors[key] = (since, phase, rate)
        return phase + (t - since) * rate

    def set(self, key: str, t: float, phase: float, rate: float) -> None:
        """``key`` is at ``phase`` at ``t``, and runs at ``rate`` from there (a clock handed over mid-run)."""
        self._anchors[key] = (t, phase, rate)


def phase_at(params: Mapping[str, Any], slot: str, t: float, beat: float | None = None,
             phases: Phases | None = None) -> float:
    """The LFO's phase in cycles at time ``t`` seconds (from the modulation clock's origin); synced
    LFOs follow ``beat`` when given (an Ableton Link session's), else ``t`` at ``bpm``. With ``phases``,
    a change of ``rate_hz`` (or of ``bpm`` for a synced LFO with no ``beat``) changes the speed, not the phase."""
    if params[f"{slot}.sync"]:
        if beat is None:
            bps = float(params["bpm"]) / 60.0
            beat = phases.at("bpm", t, bps) if phases is not None else t * bps
        return beat / float(params[f"{slot}.beats"])
    rate = float(params[f"{slot}.rate_hz"])
    return phases.at(slot, t, rate) if phases is not None else t * rate


def active(params: Mapping[str, Any], envelopes: Mapping[str, float] | None = None) -> bool:
    """Whether :func:`modulate` may change anything; envelope slots count only with ``envelopes`` (an audio input)."""
    if any(params.get(f"{slot}.target") for slot in SLOTS):
        return True
    return envelopes is not None and any(params.get(f"{slot}.target") and params.get(f"{slot}.depth")
                                         for slot in ENV_SLOTS)


def _target_spec(schema: Schema, target: Any) -> ParamSpec | None:
    if not target or target not in schema or not targetable(schema.get(target)):
        return None  # the store refuses these (check_target); a plugin's parameter may be gone
    return schema.get(target)


def _moved(spec: ParamSpec, value: float) -> float | int:
    """``value`` clamped to ``spec``'s range, and on its grid for an int."""
    assert spec.minimum is not None and spec.maximum is not None
    value = min(max(value, spec.minimum), spec.maximum)
    if spec.kind == "int":
        step = spec.multiple_of or 1
        return int(min(max(round(value / step) * step, spec.minimum), spec.maximum))
    return value


def modulate(params: Mapping[str, Any], schema: Schema, t: float, beat: float | None = None,
             envelopes: Mapping[str, float] | None = None, phases: Phases | None = None) -> dict[str, Any]:
    """The parameters the engine should use at time ``t`` (and ``beat`` and ``phases``, see :func:`phase_at`):
    each LFO's target moved around its base, then each envelope slot's by its level in ``envelopes``
    ({slot: level}, from the audio input; None: no audio input)."""
    out = dict(params)
    for slot in SLOTS:
        spec = _target_spec(schema, params.get(f"{slot}.target"))
        if spec is None:
            continue
        assert spec.minimum is not None and spec.maximum is not None
        swing = float(params[f"{slot}.depth"]) * (spec.maximum - spec.minimum)
        phase = phase_at(params, slot, t, beat, phases)
        out[spec.name] = _moved(spec, float(out[spec.name]) + swing * wave(params[f"{slot}.shape"], phase))
    for slot in ENV_SLOTS:
        spec = _target_spec(schema, params.get(f"{slot}.target"))
        level = envelopes.get(slot) if envelopes is not None else None
        depth = float(params.get(f"{slot}.depth", 0.0))
        if spec is None or level is None or depth == 0.0:
            continue
        assert spec.minimum is not None and spec.maximum is not None
        amount = envelope_amount(params, slot, level)
        if amount == 0.0:
            continue  # silence: the value stays exactly the base (or the LFO's), type and all
        out[spec.name] = _moved(spec, float(out[spec.name]) + depth * (spec.maximum - spec.minimum) * amount)
    return out

"""The control plane on the event loop: how values from controllers are applied (slew), presets
recalled and saved, and OSC commands (``/sd/preset``, ``/sd/get/<param>``) answered.

Kept out of the daemon's wiring (server.py) so that each reads on its own; everything here runs
on the loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from sdbridge.bridge.glide import Glider
from sdbridge.bridge.osc_parse import encode_message
from sdbridge.errors import ParamError, SdbridgeError
from sdbridge.params import Schema, shown_value
from sdbridge.presets import MAX_GLIDE_S, Preset, PresetLibrary, glide_problem

if TYPE_CHECKING:
    from sdbridge.bridge.server import Daemon

log = logging.getLogger(__name__)

# 600 s at the fastest tempo bpm allows (300): checked before the beats are turned into seconds, so that
# a huge integer from JSON is refused by comparison instead of overflowing float().
MAX_GLIDE_BEATS = 3000
# The LoRAs left out that a recall names, then a count of the rest: each error goes to a WebSocket client as a message
# of its own (its queue holds 64) and into one log line (QA 53 F4). schema.validate bounds its own errors likewise.
MAX_MISSING_SHOWN = 20


class Control:
    def __init__(self, daemon: Daemon, presets: PresetLibrary) -> None:
        self.daemon = daemon
        self.presets = presets
        self.glider = Glider(daemon.store)
        self._on_beat: asyncio.TimerHandle | None = None  # a recall waiting for the next beat

    def close(self) -> None:
        self._cancel_on_beat()
        self.glider.close()

    def _cancel_on_beat(self) -> None:
        if self._on_beat is not None:
            self._on_beat.cancel()
            self._on_beat = None

    def _land_on_beat(self, values: dict[str, Any], duration: float, sets: dict[str, int]) -> None:
        """An on-beat recall at its beat: its values but those someone set while it waited, which win, as a value
        set during a glide wins over the glide (a fader moved after the recall was undone at the beat: QA 62 F2)."""
        self._on_beat = None
        now = self.daemon.store.set_counts(values)
        kept = {name: value for name, value in values.items() if now.get(name) == sets.get(name)}
        if kept:
            self.glider.start(kept, duration)

    def apply_live(self, updates: dict[str, Any]) -> tuple[dict[str, Any], list]:
        """Loop thread: a controller's values, slewed when ``slew_s`` is set (numeric ones glide, a moving fader's
        values each retargeting the glide in flight at its speed, so the value follows the hand: QA 73 F8)."""
        slew = float(self.daemon.store.get("slew_s"))
        if slew <= 0 or "slew_s" in updates:
            return self.daemon.store.update(updates)
        return self.glider.start(updates, slew, follow=True)

    def recall_preset(self, name: str, glide_s: float | None = None, glide_beats: float | None = None,
                      on_beat: bool = False, announce: bool = True,
                      preset: Preset | None = None) -> tuple[dict[str, Any], list[SdbridgeError]]:
        """Loop thread: apply a preset, gliding its numeric values over its (or the given) time.

        ``glide_beats`` gives the time in beats at the current ``bpm``; ``on_beat`` starts the
        recall on the next beat of the worker's clock (the one the LFOs follow), so a preset lands
        with the music. ``announce`` False logs the recall at debug level (audio onsets: twice a second).
        ``preset``: the file already read (HTTP reads it in a thread), else it is read here.
        """
        if preset is None:
            preset = self.presets.get(name)
        schema = self.daemon.store.schema
        if len(preset.params) > len(schema):
            # Each parameter once at most: more keys is no preset, and validating them all stalled the loop (QA 53 F4).
            raise ParamError(f"preset {name!r} has {len(preset.params)} values under [params], more than the "
                             f"{len(schema)} parameters there are", name="preset", value=name, code="bad_preset")
        bpm = float(self.daemon.store.get("bpm"))
        if glide_beats is not None:
            # "not 0 <= x <= max" also refuses nan; the comparisons never convert a huge int to float.
            if isinstance(glide_beats, bool) or not isinstance(glide_beats, (int, float)) \
                    or not 0 <= glide_beats <= MAX_GLIDE_BEATS:
                raise ParamError(f"glide_beats {shown_value(glide_beats)} is not a number of beats in "
                                 f"[0, {MAX_GLIDE_BEATS}]", name="glide_beats", value=glide_beats)
            glide_s = glide_beats * 60.0 / bpm
            if glide_s > MAX_GLIDE_S:
                raise ParamError(f"glide_beats {shown_value(glide_beats)} at {bpm:g} bpm is {glide_s:.0f} s, more "
                                 f"than {MAX_GLIDE_S} s", name="glide_beats", value=glide_beats)
        duration = preset.glide_s if glide_s is None else glide_s
        if (problem := glide_problem(duration)) is not None:
            raise ParamError(problem, name="glide_s", value=duration)
        values, missing = self.daemon.without_missing_loras(preset.params)  # deleted since it was saved (QA 22)
        good, errors = schema.validate(values)
        told = [ParamError(f"preset {name!r} names {what}, left out: {why}", name="loras", value=what,
                           code="unknown_lora") for what, why in missing[:MAX_MISSING_SHOWN]]
        if len(missing) > MAX_MISSING_SHOWN:
            told.append(ParamError(f"preset {name!r} names {len(missing) - MAX_MISSING_SHOWN} more LoRA(s) that are "
                                   f"not there, left out too (the first {MAX_MISSING_SHOWN} are told)", name="loras",
                                   value=name, code="unknown_lora"))
        errors = [*told, *errors]
        # A newer recall wins over one still waiting for its beat, which landed over it at the beat (QA 62 F2).
        self._cancel_on_beat()
        if on_beat:
            delay = self.daemon.worker.clock.until_next_beat(time.monotonic(), bpm)
            self._on_beat = asyncio.get_running_loop().call_later(delay, self._land_on_beat, values, float(duration),
                                                                  self.daemon.store.set_counts(values))
        else:
            self.glider.start(values, float(duration))
        level = logging.WARNING if errors else logging.INFO if announce else logging.DEBUG
        log.log(level, "preset %s recalled (glide %.2f s%s)%s", name, duration,
                ", on the next beat" if on_beat else "",
                # each with why: an OSC or MIDI recall has no client to tell (QA 36)
                f"; {len(errors)} value(s) refused: " + "; ".join(str(error) for error in errors) if errors else "")
        return good, list(errors)

    def save_preset(self, name: Any, description: Any = "", glide_s: Any = 0.0) -> Any:
        """Loop thread: save the current look (not the model or the stream's size) as a user preset.

        While the quality ladder is stepped down, the store holds its reduced steps; the preset gets
        the artist's values it will give back instead."""
        if not isinstance(description, str) or len(description) > 500:
            raise ParamError("description must be a string of at most 500 characters", name="description")
        return self.presets.save(name, self.daemon.look(), description, glide_s)  # which checks glide_s

    def osc_command(self, call: Any, source: Any) -> None:
        prefix = self.daemon.settings.osc_prefix
        if call.address.startswith(f"{prefix}/get/"):
            self._osc_get(call, source, call.address[len(f"{prefix}/get/"):])
            return
        if call.address == f"{prefix}/preset/save":
            self._osc_save(call, source)
            return
        if call.address != f"{prefix}/preset":
            if call.address.startswith(f"{prefix}/preset/"):  # took silently, as if done (QA 46 F6)
                self.daemon.report_osc_error(ParamError(
                    f"OSC address {shown_value(call.address, 120)} is no preset command: {prefix}/preset s NAME "
                    f"recalls one, {prefix}/preset/save s NAME saves the current look", name="osc_address",
                    value=call.address, code="unknown_address"), source)
            return
        try:
            if not call.args or not isinstance(call.args[0], str):
                raise ParamError(f"{call.address} needs a preset name (s), then an optional glide time (f)",
                                 name="preset", value=list(call.args))
            glide = call.args[1] if len(call.args) > 1 else None
            if glide is not None and (isinstance(glide, bool) or not isinstance(glide, (int, float))):
                raise ParamError(f"{call.address} glide time {glide!r} is not a number", name="glide_s", value=glide)
            _, errors = self.recall_preset(call.args[0], glide)
        except SdbridgeError as exc:
            errors = [exc]
        for exc in errors:
            self.daemon.report_osc_error(exc, source)

    def _osc_save(self, call: Any, source: Any) -> None:
        """``/sd/preset/save s NAME [s DESCRIPTION] [f GLIDE_S]``: a controller's button keeps the look the faders
        found; the saved name goes to the feedback target on ``/sd/status/preset_saved``."""
        args = list(call.args)
        try:
            if not args or not isinstance(args[0], str) or len(args) > 3:
                raise ParamError(f"{call.address} needs a preset name (s), then an optional description (s) and "
                                 f"glide time (f)", name="preset", value=args)
            description = args[1] if len(args) > 1 else ""
            glide = args[2] if len(args) > 2 else 0.0
            preset = self.save_preset(args[0], description, glide)
        except SdbridgeError as exc:
            self.daemon.report_osc_error(exc, source)
            return
        log.info("preset %s saved over OSC", preset.name)
        if self.daemon.feedback is not None:
            self.daemon.feedback.send(f"{self.daemon.settings.osc_prefix}/status/preset_saved", preset.name)

    def _osc_get(self, call: Any, source: Any, path: str) -> None:
        """A query: the current value goes back to the sender's address and port, on the
        parameter's own address (OSC has no replies; this is the usual convention)."""
        daemon = self.daemon
        name = Schema.name_from_osc_path(path)
        if name not in daemon.store.schema:
            daemon.report_osc_error(ParamError(f"{call.address}: unknown parameter {name!r}", name=name,
                                               code="unknown_param"), source)
            return
        if daemon.osc is not None and daemon.osc.transport is not None:
            message = encode_message(f"{daemon.settings.osc_prefix}/{path}", daemon.store.get(name))
            daemon.osc.transport.sendto(message, source)

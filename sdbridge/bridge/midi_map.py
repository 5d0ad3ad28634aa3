"""MIDI messages to parameter updates and preset recalls (docs/midi.md). Sans-I/O.

A mapping file is TOML::

    clock = true                                  # follow MIDI clock (tempo and beat) when Link is off

    [[cc]]
    channel = 1                                   # 1-16; left out: any channel
    control = 1
    param = "strength"                            # 0-127 over the parameter's range, as OSC's /sd/norm/<param>

    [[cc]]
    control = 2                                   # a 14-bit pair: MSB on CC 2, LSB on CC 34 (lsb = 34 also works)
    bits = 14
    param = "guidance"

    [[note]]
    note = 36
    preset = "neon"                               # optional glide_s, glide_beats, on_beat as over WebSocket

    [[note]]
    note = 37
    param = "seed"
    step = 1                                      # or toggle = true (a bool), or value = X (momentary = true)

:func:`parse_map` checks every entry against the parameter schema and raises :class:`ConfigError`
naming the file, the entry and its line. :class:`MidiMapper` takes ``mido.Message`` objects (only
their ``type``, ``channel``, ``control``, ``value``, ``note`` and ``velocity``: no port, no loop)
and returns :class:`MidiActions`; MIDI clock is :mod:`sdbridge.bridge.midi_clock`'s.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdbridge.errors import ConfigError, ParamError
from sdbridge.params import Schema, ParamSpec, shown_value
from sdbridge.presets import check_name as check_preset_name, toml_value

MAX_FILE_BYTES = 1024 * 1024
FOURTEEN_BIT_MAX = 16383  # (127 << 7) | 127
CC_KEYS = {"channel", "control", "param", "lsb", "bits"}
NOTE_KEYS = {"channel", "note", "preset", "glide_s", "glide_beats", "on_beat", "param", "step", "toggle", "value",
             "momentary"}
TOP_KEYS = {"clock", "cc", "note"}

# Shipped when neither --midi-map nor ~/.config/sdbridge/midi.toml is there: the mod wheel and the CCs that
# General MIDI leaves undefined (3, 9, 14-15, 20-23: nothing a synth on the same cable reacts to), and
# the first pads of a pad controller (36 = C1, General MIDI's kick). docs/midi.md lists it.
DEFAULT_MAP_TOML = """\
clock = true

[[cc]]
control = 1
param = "strength"

[[cc]]
control = 3
param = "prompt_blend"

[[cc]]
control = 9
param = "seed_blend"

[[cc]]
control = 14
param = "guidance"

[[cc]]
control = 15
param = "controlnet_1_scale"

[[cc]]
control = 20
param = "ip_adapter_scale"

[[cc]]
control = 21
param = "lfo1.depth"

[[cc]]
control = 22
param = "slew_s"

[[note]]
note = 36
param = "seed"
step = 1

[[note]]
note = 37
param = "seed"
step = -1

[[note]]
note = 38
param = "strength"
value = 0.0
momentary = true

[[note]]
note = 40
preset = "calm"

[[note]]
note = 41
preset = "neon"

[[note]]
note = 42
preset = "watercolor"
"""


@dataclass(frozen=True)
class CcBinding:
    """A controller (or a 14-bit MSB/LSB pair) onto a parameter's range."""

    control: int
    param: str
    channel: int | None = None  # 1-16; None: any channel
    lsb: int | None = None      # the LSB's controller number of a 14-bit pair

    def matches(self, channel: int) -> bool:
        return self.channel is None or self.channel == channel + 1

    def to_toml(self) -> str:
        lines = ["[[cc]]"] + ([f"channel = {self.channel}"] if self.channel is not None else [])
        lines += [f"control = {self.control}"] + ([f"lsb = {self.lsb}"] if self.lsb is not None else [])
        return "\n".join(lines + [f"param = {json.dumps(self.param)}"]) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"channel": self.channel, "control": self.control, "lsb": self.lsb, "param": self.param}


@dataclass(frozen=True)
class NoteBinding:
    """A note: a preset recall, or a parameter stepped, toggled or set (momentarily: back on its release)."""

    note: int
    channel: int | None = None
    preset: str | None = None
    glide_s: float | None = None
    glide_beats: float | None = None
    on_beat: bool = False
    param: str | None = None
    step: float | None = None
    toggle: bool = False
    value: Any = None
    momentary: bool = False

    def matches(self, channel: int) -> bool:
        return self.channel is None or self.channel == channel + 1

    def to_json(self) -> dict[str, Any]:
        keys = ("channel", "note", "preset", "glide_s", "glide_beats", "on_beat", "param", "step", "toggle", "value",
                "momentary")
        flags = ("on_beat", "toggle", "momentary")
        return {key: getattr(self, key) for key in keys
                if getattr(self, key) is not None and not (key in flags and getattr(self, key) is False)}

    def to_toml(self) -> str:
        out = ["[[note]]"]
        for key, value in self.to_json().items():
            out.append(f"{key} = {toml_value(value)}")
        return "\n".join(out) + "\n"


@dataclass(frozen=True)
class PresetRecall:
    name: str
    glide_s: float | None = None
    glide_beats: float | None = None
    on_beat: bool = False


@dataclass
class MidiActions:
    """What one message asks for: values to apply (``updates`` as a controller's, slewed; ``jumps`` at once),
    presets to recall, and a binding made by learn mode."""

    updates: dict[str, Any] = field(default_factory=dict)
    jumps: dict[str, Any] = field(default_factory=dict)
    presets: list[PresetRecall] = field(default_factory=list)
    learned: CcBinding | None = None
    errors: list[ParamError] = field(default_factory=list)


@dataclass
class MidiMap:
    cc: list[CcBinding] = field(default_factory=list)
    notes: list[NoteBinding] = field(default_factory=list)
    clock: bool = True

    def to_toml(self) -> str:
        parts = [f"clock = {toml_value(self.clock)}\n"]
        parts += [binding.to_toml() for binding in self.cc]
        parts += [binding.to_toml() for binding in self.notes]
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"clock": self.clock, "cc": [b.to_json() for b in self.cc], "note": [b.to_json() for b in self.notes]}




# --- the file -------------------------------------------------------------------------------------


def _entry_lines(text: str, table: str) -> list[int]:
    """Line numbers (1-based) of each ``[[table]]`` header in order: tomllib keeps no positions."""
    header = re.compile(rf"^\s*\[\[\s*{table}\s*\]\]")
    return [number for number, line in enumerate(text.splitlines(), 1) if header.match(line)]


def _integer(entry: Mapping[str, Any], key: str, low: int, high: int, where: str, required: bool = True) -> int | None:
    if key not in entry:
        if required:
            raise ConfigError(f"{where}: needs {key} ({low}-{high})")
        return None
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: {key} {shown_value(value)} is not an integer in [{low}, {high}]")
    return value


def _spec(schema: Schema, entry: Mapping[str, Any], where: str) -> ParamSpec:
    name = entry.get("param")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: param {shown_value(name)} is not a parameter name")
    try:
        return schema.get(name)
    except ParamError as exc:
        raise ConfigError(f"{where}: {exc} (see GET /params for the names)") from None


def _cc_binding(entry: Mapping[str, Any], schema: Schema, where: str) -> CcBinding:
    channel = _integer(entry, "channel", 1, 16, where, required=False)
    control = _integer(entry, "control", 0, 127, where)
    assert control is not None
    spec = _spec(schema, entry, where)
    try:
        spec.denormalize(0.0)  # a text parameter has no range for a fader
    except ParamError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    lsb = _integer(entry, "lsb", 0, 127, where, required=False)
    bits = entry.get("bits", 7)
    if bits not in (7, 14) or isinstance(bits, bool):
        raise ConfigError(f"{where}: bits {shown_value(bits)} is not 7 or 14")
    if bits == 14 and lsb is None:
        if control > 31:
            raise ConfigError(f"{where}: bits = 14 pairs control {control} with control {control + 32}, which does "
                              "not exist: a 14-bit MSB is 0-31, or give its LSB with lsb = N")
        lsb = control + 32
    if lsb is not None and lsb == control:
        raise ConfigError(f"{where}: lsb {lsb} is the same controller as control")
    return CcBinding(control, spec.name, channel, lsb)


def _note_binding(entry: Mapping[str, Any], schema: Schema, where: str) -> NoteBinding:
    channel = _integer(entry, "channel", 1, 16, where, required=False)
    note = _integer(entry, "note", 0, 127, where)
    assert note is not None
    has_preset, has_param = "preset" in entry, "param" in entry
    if has_preset == has_param:
        raise ConfigError(f"{where}: needs either preset = NAME or param = NAME (with step, toggle or value)")
    if has_preset:
        name = entry["preset"]
        try:
            check_preset_name(name)  # the presets' own rule: a MIDI map took CON, which no preset may be called
        except ParamError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        extra = set(entry) & {"step", "toggle", "value", "momentary"}
        if extra:
            raise ConfigError(f"{where}: {', '.join(sorted(extra))} belong to a param entry, not a preset's")
        glide = {}
        for key in ("glide_s", "glide_beats"):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"{where}: {key} {shown_value(value)} is not a number >= 0")
            glide[key] = None if value is None else float(value)
        on_beat = entry.get("on_beat", False)
        if not isinstance(on_beat, bool):
            raise ConfigError(f"{where}: on_beat {shown_value(on_beat)} is not true or false")
        return NoteBinding(note, channel, preset=name, on_beat=on_beat, **glide)
    spec = _spec(schema, entry, where)
    actions = [key for key in ("step", "toggle", "value") if key in entry]
    if len(actions) != 1:
        raise ConfigError(f"{where}: param {spec.name} needs exactly one of step = N, toggle = true, value = X")
    momentary = entry.get("momentary", False)
    if not isinstance(momentary, bool) or (momentary and actions[0] != "value"):
        raise ConfigError(f"{where}: momentary {shown_value(momentary)} must be true or false, and goes with value")
    if actions[0] == "step":
        step = entry["step"]
        if not spec.numeric or isinstance(step, bool) or not isinstance(step, (int, float)) \
                or (spec.kind == "int" and not float(step).is_integer()):
            raise ConfigError(f"{where}: step {shown_value(step)} does not fit {spec.name} ({spec.kind})")
        if spec.multiple_of and step % spec.multiple_of:  # else every press lands off the grid and is refused
            raise ConfigError(f"{where}: step {shown_value(step)} is not a multiple of {spec.multiple_of}, as every "
                              f"value of {spec.name} is")
        return NoteBinding(note, channel, param=spec.name, step=step)
    if actions[0] == "toggle":
        if entry["toggle"] is not True or spec.kind != "bool":
            raise ConfigError(f"{where}: toggle = true needs a true/false parameter; {spec.name} is {spec.kind}")
        return NoteBinding(note, channel, param=spec.name, toggle=True)
    try:
        value = spec.validate(entry["value"])
    except ParamError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return NoteBinding(note, channel, param=spec.name, value=value, momentary=momentary)


def parse_map(text: str, schema: Schema, source: str = "midi map") -> MidiMap:
    """A mapping file's text -> a :class:`MidiMap`; ConfigError naming ``source``, the entry and its line."""
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{source} is not valid TOML: {shown_value(str(exc), 200)[1:-1]}") from None
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} (allowed: clock, [[cc]], [[note]])")
    clock = data.get("clock", True)
    if not isinstance(clock, bool):
        raise ConfigError(f"{source}: clock {shown_value(clock)} is not true or false")
    result = MidiMap(clock=clock)
    cc_lines: list[int] = []
    for table, allowed, build, into in (("cc", CC_KEYS, _cc_binding, result.cc),
                                        ("note", NOTE_KEYS, _note_binding, result.notes)):
        entries = data.get(table, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{source}: {table} must be an array of tables, [[{table}]]")
        lines = _entry_lines(text, table)
        if len(lines) != len(entries):  # an inline array (cc = [{...}]) has no [[cc]] headers to count
            lines = []
        if table == "cc":
            cc_lines = lines
        for index, entry in enumerate(entries):
            where = f"{source}, {_entry_name(table, index, lines)}"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: is not a table")
            if "session" in entry:
                raise ConfigError(f"{where}: session is not supported: parameters are the daemon's, shared by every "
                                  "session (docs/midi.md)")
            extra = set(entry) - allowed
            if extra:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))} "
                                  f"(allowed: {', '.join(sorted(allowed))})")
            into.append(build(entry, schema, where))
    _check_duplicates(result, source, cc_lines)
    return result


def _entry_name(table: str, index: int, lines: list[int]) -> str:
    """``[[cc]] #2 (line 5)``: the entry as a person finds it in the file (no line where it cannot be told)."""
    return f"[[{table}]] #{index + 1}" + (f" (line {lines[index]})" if lines else "")


def _check_duplicates(midi_map: MidiMap, source: str, lines: list[int]) -> None:
    seen: dict[tuple[int | None, int], int] = {}  # (channel, None: any; controller) -> the entry's index
    for index, binding in enumerate(midi_map.cc):
        for control in (binding.control, binding.lsb):
            if control is None:
                continue
            # An any-channel binding overlaps the same controller on every channel: one CC would move both.
            if binding.channel is None:
                clash = next((key for key in seen if key[1] == control), None)
            else:
                clash = next((key for key in ((binding.channel, control), (None, control)) if key in seen), None)
            if clash is not None:
                other = "" if clash[0] == binding.channel else f" on {_channel_words(clash[0])}"
                raise ConfigError(f"{source}, {_entry_name('cc', index, lines)}: uses controller {control}"
                                  f"{'' if binding.channel is None else f' on channel {binding.channel}'}, "
                                  f"already bound{other} by {_entry_name('cc', seen[clash], lines)}")
            seen[(binding.channel, control)] = index


def _channel_words(channel: int | None) -> str:
    return "any channel" if channel is None else f"channel {channel}"


def load_map(path: Path, schema: Schema) -> MidiMap:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"midi map {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"midi map {str(path)!r} is larger than {MAX_FILE_BYTES // 2**20} MB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"midi map {str(path)!r} is not UTF-8 text: {exc}") from None
    return parse_map(text, schema, f"midi map {str(path)!r}")


def save_map(midi_map: MidiMap, path: Path) -> None:
    """Atomically, as presets are saved: a crash never leaves half a map."""
    data = midi_map.to_toml().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    try:
        temporary.write_bytes(data)
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ConfigError(f"midi map could not be saved to {str(path)!r}: {exc.strerror or exc}") from exc


# --- messages -------------------------------------------------------------------------------------


_NOT_HELD = object()


class MidiMapper:
    """Messages in, :class:`MidiActions` out. ``get(name)`` reads a parameter's current value (steps, toggles)."""

    def __init__(self, midi_map: MidiMap, schema: Schema) -> None:
        self.map = midi_map
        self.schema = schema
        self.learning: str | None = None  # the parameter the next CC moved is bound to
        self._msb: dict[tuple[int, int], int] = {}        # (channel, MSB controller) -> its last value
        # A parameter momentary pads hold -> its value before the first of them, and each pad's value, in the order
        # pressed: released, a parameter goes back to the last pad still held, or to rest once none is. One value
        # per note restored two pads on a parameter to the first pad's value, and a note bound twice only its first
        # parameter (QA 71 F3).
        self._held: dict[str, tuple[Any, dict[tuple[int, int], Any]]] = {}

    def learn(self, param: str | None) -> None:
        """Bind the next CC moved to ``param`` (None: stop learning). ParamError for a name without a range."""
        if param is not None:
            if not isinstance(param, str):
                raise ParamError(f"midi_learn param {shown_value(param)} is not a parameter name", name="param",
                                 value=param)
            self.schema.get(param).denormalize(0.0)  # unknown, or no range: the client hears why now
        self.learning = param

    def feed(self, message: Any, get: Callable[[str], Any]) -> MidiActions:
        actions = MidiActions()
        kind = message.type
        try:
            if kind == "control_change":
                self._control_change(message, actions)
            elif kind == "note_on" and message.velocity > 0:
                self._note_on(message, get, actions)
            elif kind in ("note_off", "note_on"):  # note_on at velocity 0 is a note off (running status)
                self._release((message.channel, message.note), actions)
        except ParamError as exc:
            actions.errors.append(exc)
        return actions

    def _control_change(self, message: Any, actions: MidiActions) -> None:
        channel, control, value = message.channel, message.control, message.value
        if self.learning is not None:
            binding = CcBinding(control, self.learning, channel + 1)
            self.map.cc = [b for b in self.map.cc
                           if not (b.matches(channel) and control in (b.control, b.lsb)) and b.param != binding.param]
            self.map.cc.append(binding)
            self.learning = None
            actions.learned = binding
        for binding in self.map.cc:
            if not binding.matches(channel):
                continue
            if control == binding.control:
                spec = self.schema.get(binding.param)
                if binding.lsb is None:
                    fraction = value / 127
                else:
                    # MIDI 1.0: a new MSB resets the LSB to 0; its LSB, sent right after, fills in the low bits.
                    self._msb[(channel, control)] = value
                    fraction = (value << 7) / FOURTEEN_BIT_MAX
                actions.updates[binding.param] = spec.validate(spec.denormalize(fraction))  # as /sd/norm/<param>
            elif control == binding.lsb:
                msb = self._msb.get((channel, binding.control))
                if msb is None:
                    continue  # an LSB before any MSB: no value to fill in
                spec = self.schema.get(binding.param)
                fraction = ((msb << 7) | value) / FOURTEEN_BIT_MAX
                actions.updates[binding.param] = spec.validate(spec.denormalize(fraction))

    def _release(self, pad: tuple[int, int], actions: MidiActions) -> None:
        for param, (rest, pads) in list(self._held.items()):
            if pads.pop(pad, _NOT_HELD) is _NOT_HELD:
                continue
            if pads:
                actions.jumps[param] = next(reversed(pads.values()))  # the last pad still held
            else:
                del self._held[param]
                actions.jumps[param] = rest

    def _note_on(self, message: Any, get: Callable[[str], Any], actions: MidiActions) -> None:
        for binding in self.map.notes:
            if binding.note != message.note or not binding.matches(message.channel):
                continue
            if binding.preset is not None:
                actions.presets.append(PresetRecall(binding.preset, binding.glide_s, binding.glide_beats,
                                                    binding.on_beat))
                continue
            assert binding.param is not None
            spec = self.schema.get(binding.param)
            if binding.step is not None:
                stepped = get(binding.param) + binding.step
                low, high = spec.minimum, spec.maximum
                if low is not None:
                    stepped = max(stepped, low)
                if high is not None:
                    stepped = min(stepped, high)
                actions.jumps[binding.param] = spec.validate(int(stepped) if spec.kind == "int" else stepped)
            elif binding.toggle:
                actions.jumps[binding.param] = not bool(get(binding.param))
            else:
                if binding.momentary:
                    rest, pads = self._held.setdefault(binding.param, (get(binding.param), {}))
                    pads.pop((message.channel, message.note), None)  # pressed again: the last pressed
                    pads[(message.channel, message.note)] = binding.value
                actions.jumps[binding.param] = binding.value

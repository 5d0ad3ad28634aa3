"""Presets: named sets of parameter values in TOML files, shipped and the user's own.

A preset file (docs/presets.md)::

    description = "Soft watercolour, slow and steady"
    glide_s = 2.0                 # a recall glides numeric values over this long (0: jump)
    [params]
    prompt = "a watercolor painting, soft edges"
    strength = 0.55
    "plugin.flow_warp.enabled" = true

Shipped presets live in the package (``sdbridge/data/presets``); the user's in
``~/.config/sdbridge/presets`` (or ``$SDBRIDGE_PRESETS_DIR``), which wins on a name clash and is
where saves go. A name a client sends is confined to those folders.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sdbridge.errors import ParamError, quoted
from sdbridge.params import check_text, shown_value
from sdbridge.paths import PathError, confine

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")  # matched whole (fullmatch): "$" lets "abc\n" through
# A preset is a few hundred bytes (every text parameter at its longest, about 36,000 characters: 36 kB in ASCII,
# 144 kB in emoji, which 64 KiB refused: QA 56 F4); a larger file is refused unread: a recall parses it on the event
# loop, and a 1 MB file of 80k keys stalled every client for 2.2 s (QA 53 F4; the keys are bounded apart).
# save() refuses to write one, so that what saves, recalls.
MAX_FILE_BYTES = 256 * 1024
# The names an unknown-name error shows: 10,000 of them made a 109 kB answer (QA 53 F3).
MAX_KNOWN_SHOWN = 20
TOP_LEVEL = ("description", "glide_s", "params")  # what a preset file holds outside its [params] table
MAX_GLIDE_S = 600


def glide_problem(glide_s: Any) -> str | None:
    """Why ``glide_s`` is no glide time (a number of seconds in [0, MAX_GLIDE_S]), or None. One rule for a preset's
    file, its save and a recall's own time: a file's glide_s of 900 read, listed, and then failed every recall."""
    # "not 0 <= x <= max" refuses nan too; the comparison never converts a huge int to float.
    if isinstance(glide_s, bool) or not isinstance(glide_s, (int, float)) or not 0 <= glide_s <= MAX_GLIDE_S:
        return f"glide_s {shown_value(glide_s)} is not a number of seconds in [0, {MAX_GLIDE_S}]"
    return None


# Windows' device names: there, CON.toml (and CON.toml.tmp, the name a save writes first) opens the console, and
# COM1.toml perhaps a rig's serial DMX box. Refused on every platform, so that a presets folder copies anywhere.
WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT") for n in range(10))})


def check_name(name: Any) -> str:
    """``name`` as a preset may be called (ParamError bad_preset naming why not): here, in MIDI maps and envelopes."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ParamError(f"preset name {shown_value(name)} is not 1-64 of letters, digits, space, _ . -",
                         name="preset", value=name, code="bad_preset")
    # Windows reads the part before the first dot, less trailing spaces, in any case ("nul .bak" is NUL).
    if name.partition(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        raise ParamError(f"preset name {shown_value(name)} is a Windows device name (CON, PRN, AUX, NUL, COM0-9, "
                         "LPT0-9 in any case, before the first dot): pick another, so the presets folder works on "
                         "every system", name="preset", value=name, code="bad_preset")
    return name


def callable_name(name: str) -> bool:
    """Whether a client may call a preset ``name`` (check_name passes)."""
    try:
        check_name(name)
    except ParamError:
        return False
    return True


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What tells a file changed: the link's time, and the file's times, size and inode (None: unreadable)."""
    try:
        link, target = path.lstat(), path.stat()
    except OSError:
        return None
    return link.st_mtime_ns, target.st_mtime_ns, target.st_ctime_ns, target.st_size, target.st_ino


def default_user_dir() -> Path:
    env = os.environ.get("SDBRIDGE_PRESETS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".config" / "sdbridge" / "presets"


def shipped_dir() -> Path:
    return Path(str(resources.files("sdbridge").joinpath("data/presets")))


@dataclass(frozen=True)
class Preset:
    name: str
    params: dict[str, Any]
    glide_s: float = 0.0
    description: str = ""
    path: str = ""
    shipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "glide_s": self.glide_s,
                "params": self.params, "shipped": self.shipped}


def toml_value(value: Any) -> str:
    """A TOML value for a bool, a number or a string (the presets' and the MIDI map's files)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def dump(preset: Preset) -> str:
    lines = [f"description = {toml_value(preset.description)}", f"glide_s = {toml_value(float(preset.glide_s))}",
             "", "[params]"]
    for key, value in preset.params.items():
        lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


class PresetLibrary:
    def __init__(self, user_dir: Path | None = None, shipped: Path | None = None) -> None:
        self.user_dir = user_dir or default_user_dir()
        self.shipped = shipped or shipped_dir()
        # Broken files already warned about, with their modification time: a client that polls the list
        # gets one warning per file, and another once the file changes.
        self._warned: dict[Path, float | None] = {}
        self._warned_twins: set[tuple[str, ...]] = set()
        # readable_names(): whether each file read, with the stat it had then.
        self._readable: dict[Path, tuple[tuple[int, ...] | None, bool]] = {}

    def _folders(self) -> list[tuple[Path, bool]]:
        return [(self.user_dir, False), (self.shipped, True)]

    def names(self) -> list[str]:
        found: set[str] = set()
        for folder, _ in self._folders():
            if folder.is_dir():
                found.update(path.stem for path in folder.glob("*.toml"))
        return sorted(found)

    def list(self) -> list[Preset]:
        """Every preset that reads; a broken file is left out (one warning naming it) and reported with its
        reason when it is asked for by name: one bad file must not hide all the others."""
        out = []
        names = self.names()
        self._warn_twins(names)
        for name in names:
            try:
                out.append(self.get(name))
            except (ParamError, PathError) as exc:
                self._warn_skipped(name, exc)
        return out

    def readable_names(self) -> list[str]:
        """The names of :meth:`list`'s presets, those that read, parsing only the files changed since the last
        call (by their times, size and inode): an audio onset asks at each beat, and list() parsed every file
        there each time (45 ms at 200 presets)."""
        names = self.names()
        self._warn_twins(names)
        out, readable = [], {}
        for name in filter(callable_name, names):
            path = next(path for folder, _ in self._folders() if (path := folder / f"{name}.toml").exists()
                        or folder == self.shipped)  # names() found it in one of them
            stamp = _stamp(path)
            known = self._readable.get(path)
            if stamp is not None and known is not None and known[0] == stamp:
                ok = known[1]
            else:
                try:
                    self.get(name)
                    ok = True
                except (ParamError, PathError) as exc:
                    self._warn_skipped(name, exc)
                    ok = False
            readable[path] = (stamp, ok)
            if ok:
                out.append(name)
        self._readable = readable  # only the files there now: one removed is forgotten
        return out

    def _warn_twins(self, names: list[str]) -> None:
        """Names that differ only by case are one file on Windows and macOS (save refuses them), but a folder
        may hold them from before, or copied by hand: both are listed, with one warning (QA 46 F7)."""
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(name.casefold(), []).append(name)
        for group in groups.values():
            twins = tuple(group)
            if len(twins) > 1 and twins not in self._warned_twins:
                self._warned_twins.add(twins)
                log.warning("presets %s differ only by case: on Windows and macOS they would be one file (rename "
                            "one of them to keep both there)", " and ".join(quoted(name) for name in twins))

    def _warn_skipped(self, name: str, exc: Exception) -> None:
        for folder, _ in self._folders():
            path = folder / f"{name}.toml"
            try:
                stamp: float | None = path.lstat().st_mtime
            except OSError:
                continue
            if self._warned.get(path, -1.0) != stamp:
                self._warned[path] = stamp
                # %r: a file name is not ours to trust in a log line (a newline would forge one).
                log.warning("preset file %r left out of the list: %s", str(path), shown_value(str(exc), 300))
            return

    def get(self, name: str) -> Preset:
        check_name(name)
        for folder, shipped in self._folders():
            path = confine(f"{name}.toml", [folder], what="preset")
            if path.is_file():
                return self._read(name, path, shipped)
        # Known: the files' names, not list()'s presets that read: that parsed every file on the event loop, 1.5 s
        # at 10,000 presets for each unknown name any client sent (QA 53 F3). A broken file named here says why
        # when it is recalled. Names no client could call (list() leaves them out too) are not offered.
        known = [other for other in self.names() if callable_name(other)]
        shown = ", ".join(known[:MAX_KNOWN_SHOWN]) or "none"
        if len(known) > MAX_KNOWN_SHOWN:
            shown += f" and {len(known) - MAX_KNOWN_SHOWN} more"
        raise ParamError(f"no preset called {name!r} (known: {shown})", name="preset", value=name,
                         code="unknown_preset")

    @staticmethod
    def _read(name: str, path: Path, shipped: bool) -> Preset:
        def bad(what: str) -> ParamError:
            return ParamError(f"preset {name!r} ({path}) {what}", name="preset", value=name, code="bad_preset")

        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)  # read no more than the limit, whatever stat said
            if len(raw) > MAX_FILE_BYTES:
                raise bad(f"is larger than {MAX_FILE_BYTES // 1024} KiB; a preset is a few hundred bytes")
            # ValueError covers TOMLDecodeError, UnicodeDecodeError and an integer past 4300 digits;
            # RecursionError: tomllib recurses once per level of nested arrays or tables.
            data = tomllib.loads(raw.decode("utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise bad(f"is not valid TOML: {shown_value(str(exc), 200)[1:-1]}") from exc
        # A value outside [params] was read as nothing: a recall answered "applied: {}" with no word (QA 5).
        stray = [key for key in data if key not in TOP_LEVEL]
        if stray:
            keys = ", ".join(shown_value(key, 40) for key in stray[:5]) + (", ..." if len(stray) > 5 else "")
            raise bad(f"has {keys} at the top level: parameter values belong under a [params] table (the top "
                      f"level holds only description and glide_s; docs/presets.md)")
        if "params" not in data:
            raise bad("has no [params] table: a preset's values go under [params] (docs/presets.md)")
        params = data["params"]
        if not isinstance(params, dict):
            raise bad("needs a [params] table")
        glide = data.get("glide_s", 0.0)
        if (problem := glide_problem(glide)) is not None:
            raise bad(problem)
        description = data.get("description", "")
        if not isinstance(description, str):
            raise bad(f"description {shown_value(description)} is not a string")
        for key, value in params.items():
            # Only what a parameter can hold: a date, a table or nan would break the JSON of every listing.
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f"[params] {key} {value} is not a finite number")
            if not isinstance(value, (str, int, float, bool)):
                raise bad(f"[params] {key} {shown_value(value)} is a {type(value).__name__}, "
                          "not a string, a number or a boolean")
        return Preset(name, dict(params), float(glide), description, str(path), shipped)

    def save(self, name: str, params: Mapping[str, Any], description: str = "", glide_s: float = 0.0) -> Preset:
        check_name(name)
        # Windows' and macOS's file systems ignore case: there NEON.toml overwrites neon.toml, and a user's Neon
        # hides the shipped neon. Refused everywhere, so that a presets folder means the same on each (QA 44 F8).
        twin = next((other for other in self.names() if other != name and other.casefold() == name.casefold()), None)
        if twin is not None:
            raise ParamError(f"preset name {name!r} differs from the preset {twin!r} only by case, and on Windows and "
                             f"macOS they would be one file: save as {twin!r} to replace it, or pick another name",
                             name="preset", value=name, code="bad_preset")
        if not isinstance(description, str):
            raise ParamError(f"description {shown_value(description)} is not a string", name="description",
                             value=description)
        check_text(description, "description")
        for key, value in params.items():
            check_text(str(key), f"parameter name {shown_value(str(key))}", name=str(key))
            if isinstance(value, str):
                check_text(value, str(key))
        if (problem := glide_problem(glide_s)) is not None:
            raise ParamError(problem, name="glide_s", value=glide_s)
        try:
            # A synced folder unmounted (a dangling link) or a file in the folder's place: told, not a traceback
            # that closed the client's connection (QA 22).
            self.user_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = (f"it is a link to {os.readlink(self.user_dir)}, which is not there" if self.user_dir.is_symlink()
                   else exc.strerror or str(exc))  # "File exists" said nothing of a dangling link (QA 23)
            raise ParamError(f"preset {name!r} could not be saved: the presets folder {self.user_dir} cannot be "
                             f"made ({why})", name="preset", value=name, code="bad_preset") from exc
        path = confine(f"{name}.toml", [self.user_dir], what="preset")
        preset = Preset(name, dict(params), float(glide_s), description, str(path))
        data = dump(preset).encode("utf-8")  # encoded before any file is opened: the checks above make it safe
        if len(data) > MAX_FILE_BYTES:  # a file that would be refused at every recall and left out of the list
            raise ParamError(f"preset {name!r} would be {len(data)} bytes, more than the {MAX_FILE_BYTES // 1024} "
                             "KiB a preset file may hold", name="preset", value=name, code="bad_preset")
        temporary = path.with_suffix(".toml.tmp")
        try:
            temporary.write_bytes(data)
            temporary.replace(path)  # atomic: a crash never leaves half a preset
        except OSError as exc:
            try:
                temporary.unlink(missing_ok=True)  # a full disk leaves no .tmp behind
            except OSError:
                # A read-only folder refuses the clean-up too (EROFS; missing_ok covers only ENOENT): its error hid
                # the save's own, and the client got a 500 traceback instead of bad_preset (QA 87 F2).
                pass
            raise ParamError(f"preset {name!r} could not be saved to {self.user_dir}: {exc.strerror or exc}",
                             name="preset", value=name, code="bad_preset") from exc
        return preset


# What a preset saves of the current state: the look, not where the model comes from, how the
# stream is sized and encoded, or the rig's tempo, frame-rate target and fader smoothing (a recalled bpm would
# glide the tempo, and with Ableton Link on, move the whole Link session's; ladder_fps is the machine's; slew_s
# is the controller's: a recall set it back to the value saved, and a stepping MIDI fader stepped again).
NOT_SAVED = ("model", "engine", "width", "height", "jpeg_quality", "max_fps", "output_size", "mode", "bpm",
             "ladder_fps", "slew_s")


# The live blends (the prompt's, the seed's), each saved only while it is in use (a crossfader held between two
# prompts is part of the look): a preset that holds one is applied as written, so one saved with the blend off
# would cut its prompt (or seed) on recall instead of gliding it.
BLENDS = (("blend_prompt", "prompt_blend"), ("blend_seed", "seed_blend"))


def savable(values: Mapping[str, Any]) -> dict[str, Any]:
    left_out = set(NOT_SAVED)
    for other, weight in BLENDS:
        if not float(values.get(weight) or 0.0) > 0.0 or (other == "blend_prompt" and not values.get(other)):
            left_out.update((other, weight))
    return {key: value for key, value in values.items() if key not in left_out}

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
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sdbridge.errors import ParamError
from sdbridge.paths import confine

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def dump(preset: Preset) -> str:
    lines = [f"description = {_toml_value(preset.description)}", f"glide_s = {_toml_value(float(preset.glide_s))}",
             "", "[params]"]
    for key, value in preset.params.items():
        lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


class PresetLibrary:
    def __init__(self, user_dir: Path | None = None, shipped: Path | None = None) -> None:
        self.user_dir = user_dir or default_user_dir()
        self.shipped = shipped or shipped_dir()

    def _folders(self) -> list[tuple[Path, bool]]:
        return [(self.user_dir, False), (self.shipped, True)]

    def names(self) -> list[str]:
        found: set[str] = set()
        for folder, _ in self._folders():
            if folder.is_dir():
                found.update(path.stem for path in folder.glob("*.toml"))
        return sorted(found)

    def list(self) -> list[Preset]:
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except ParamError:
                continue  # a broken file is reported when it is recalled
        return out

    def get(self, name: str) -> Preset:
        if not isinstance(name, str) or not NAME.match(name):
            raise ParamError(f"preset name {name!r} is not 1-64 of letters, digits, space, _ . -", name="preset",
                             value=name, code="bad_preset")
        for folder, shipped in self._folders():
            path = confine(f"{name}.toml", [folder], what="preset")
            if path.is_file():
                return self._read(name, path, shipped)
        raise ParamError(f"no preset called {name!r} (known: {', '.join(self.names()) or 'none'})", name="preset",
                         value=name, code="unknown_preset")

    @staticmethod
    def _read(name: str, path: Path, shipped: bool) -> Preset:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ParamError(f"preset {name!r} ({path}) is not valid TOML: {exc}", name="preset", value=name,
                             code="bad_preset") from exc
        params = data.get("params", {})
        glide = data.get("glide_s", 0.0)
        if not isinstance(params, dict) or not isinstance(glide, (int, float)) or glide < 0:
            raise ParamError(f"preset {name!r} ({path}) needs a [params] table and glide_s >= 0", name="preset",
                             value=name, code="bad_preset")
        return Preset(name, dict(params), float(glide), str(data.get("description", "")), str(path), shipped)

    def save(self, name: str, params: Mapping[str, Any], description: str = "", glide_s: float = 0.0) -> Preset:
        if not isinstance(name, str) or not NAME.match(name):
            raise ParamError(f"preset name {name!r} is not 1-64 of letters, digits, space, _ . -", name="preset",
                             value=name, code="bad_preset")
        self.user_dir.mkdir(parents=True, exist_ok=True)
        path = confine(f"{name}.toml", [self.user_dir], what="preset")
        preset = Preset(name, dict(params), float(glide_s), description, str(path))
        temporary = path.with_suffix(".toml.tmp")
        temporary.write_text(dump(preset), encoding="utf-8")
        temporary.replace(path)  # atomic: a crash never leaves half a preset
        return preset


# What a preset saves of the current state: the look, not where the model comes from, how the
# stream is sized and encoded, or the rig's tempo and frame-rate target (a recalled bpm would glide
# the tempo, and with Ableton Link on, move the whole Link session's; ladder_fps is the machine's).
NOT_SAVED = ("model", "engine", "width", "height", "jpeg_quality", "max_fps", "output_size", "mode", "bpm",
             "ladder_fps")


def savable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if key not in NOT_SAVED}

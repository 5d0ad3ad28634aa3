"""Resume: the artist's look survives a restart (a crash, a reboot, a stop to change a setting).

A controller sends a value when a fader moves, not again, so a daemon restarted mid-show would run on the config's
values until every fader had been touched. With ``resume`` on (``--resume``, config ``resume = true``) the daemon
keeps what a preset would save (:func:`sdbridge.presets.savable`: the look, not the model, the stream's size or the
tempo; the artist's values while the quality ladder is stepped down) in a JSON file, written at start, at most a
second after a change (a fader moving for a minute is saved every second of it) and at stop, and applies them at
the next start over the config file's ``[params]``. A ``--set`` given on the command line wins over them: it is
what the operator asked for this time, and from then on the running look. A value the daemon no longer takes (a
LoRA since deleted, whose name would pass every frame through unstyled; a plugin not installed) is logged and
skipped; the file never stops a start. The file is per port, so two daemons on one machine keep their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sdbridge.params import ParamStore, Schema

log = logging.getLogger(__name__)

SAVE_AFTER_S = 1.0  # changes are written at most this long after the first one not yet saved
RETRY_S = 5.0  # a save the disk refused is tried again this often, until it takes it
FORMAT = 1
# The values whose <lora:...> tags load LoRAs. A negative or blend prompt's tags are taken out unrun (as the
# prompt's are in A1111's negative prompt), so a missing one there is nothing to leave out: a preset recall
# stripped it and told "left out" for a LoRA that was never to load (QA 32 low).
LORA_PROMPTS = ("prompt",)


def drop_missing_loras(values: Mapping[str, Any], folder: Path,
                       schema: Schema | None = None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``values`` without the LoRAs that are not in ``folder`` or will not load (in ``loras`` and in the prompts'
    ``<lora:>`` tags), and what was dropped with why (QA 32: "not in the folder or does not load" left the artist
    to guess which). Set live, a missing name is told to the client that set it; restored at
    start, nobody is there to see it, and the engine would pass every frame through unstyled (QA 14). A DoRA,
    corrupt or pickled one is dropped too, as a missing one is: kept, it refused the whole value (QA 30).
    With ``schema``, a value longer than its parameter takes is left whole, for the schema to refuse by its length:
    its names were reported missing instead (QA 49 F4)."""
    from sdbridge.engines.lora import lora_file_problem
    from sdbridge.engines.prompt_syntax import LORA_KINDS, RE_EXTRA_NETWORK, LoraWeights

    def problem(name: str) -> str | None:
        found = lora_file_problem(folder, name)
        return None if found is None else found[1]

    def readable(key: str) -> bool:
        text = out.get(key)
        return isinstance(text, str) and (schema is None or key not in schema
                                           or len(text) <= schema.get(key).max_length)

    out: dict[str, Any] = dict(values)
    dropped: list[tuple[str, str]] = []
    if readable("loras"):
        try:
            weights = LoraWeights.parse(out["loras"]).weights
        except ValueError:
            weights = {}  # malformed: the schema refuses it, named, with the rest
        missing = {name: why for name in weights if (why := problem(name)) is not None}
        if missing:
            out["loras"] = ", ".join(f"{name}:{weight:g}" for name, weight in weights.items() if name not in missing)
            dropped += [(f"loras {name!r}", why) for name, why in missing.items()]
    for key in LORA_PROMPTS:
        text = out.get(key)
        if not readable(key) or "<" not in text:
            continue

        def keep(match: re.Match[str], key: str = key) -> str:
            name = match.group(2).split(":")[0].strip()
            why = problem(name) if match.group(1).lower() in LORA_KINDS and name else None
            if why is not None:
                dropped.append((f"{key}'s {match.group(0)}", why))
                return ""
            return match.group(0)

        out[key] = RE_EXTRA_NETWORK.sub(keep, text)
    return out, dropped


def default_path(port: int) -> Path:
    """``$XDG_STATE_HOME/sdbridge/resume-PORT.json`` (``~/.local/state`` without it; ``%LOCALAPPDATA%`` on Windows)."""
    base = os.environ.get("XDG_STATE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    root = Path(base) if base else Path.home() / ".local" / "state"
    return root / "sdbridge" / f"resume-{port}.json"


def resume_path(settings: Any) -> Path:
    """The file ``settings`` name (``resume_file``), or the default for its port."""
    return Path(settings.resume_file).expanduser() if settings.resume_file else default_path(settings.port)


class ResumeFile:
    """The file: read whole or not at all, written whole (a crash mid-write leaves the previous one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_error: str | None = None

    def load(self) -> dict[str, Any]:
        """The file's object, its ``params`` an object; FileNotFoundError without a file, ValueError naming why one
        cannot be read (``sdbridge doctor`` says the same before a show)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{self.path} cannot be read ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
            raise ValueError(f"{self.path} holds no 'params' object")
        return data

    def read(self) -> dict[str, Any]:
        """The saved values; {} (and a warning) when there are none that can be read."""
        try:
            data = self.load()
        except FileNotFoundError:
            log.info("resume: no saved look yet at %s; starting from the configured values", self.path)
            return {}
        except ValueError as exc:
            log.warning("resume: %s; starting from the configured values", exc)
            return {}
        if data.get("format") != FORMAT:
            log.warning("resume: %s is of format %r, not %d (another sdbridge version wrote it): applying the values "
                        "this version takes", self.path, data.get("format"), FORMAT)
        return data["params"]

    @property
    def last_error(self) -> str | None:
        """Why the last write failed; None once one works."""
        return self._last_error

    def write(self, values: Mapping[str, Any]) -> bool:
        """Write ``values``; False (and one warning per distinct error) when the disk refuses."""
        data = json.dumps({"format": FORMAT, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "params": dict(values)}, indent=1, sort_keys=True, ensure_ascii=False)
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(data, encoding="utf-8")
            temporary.replace(self.path)
        except OSError as exc:
            try:
                temporary.unlink(missing_ok=True)
            except OSError:  # no folder to hold it either
                pass
            error = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")  # which path
            if error != self._last_error:  # a full disk would otherwise log at every change
                log.warning("resume: the look cannot be saved to %s: %s", self.path, error)
            self._last_error = error
            return False
        if self._last_error is not None:
            log.info("resume: saving to %s works again", self.path)
        self._last_error = None
        return True


class Resume:
    """Restores the saved look at start, then saves it a moment after every change and at stop."""

    def __init__(self, file: ResumeFile, look: Callable[[], dict[str, Any]]) -> None:
        self.file = file
        self._look = look  # the values to save, read on the event loop (the store and the ladder's originals)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[bool] | None = None
        self._dirty = False
        self.restored: list[str] = []
        self.skipped: list[str] = []
        self.saves = 0

    def restore(self, store: ParamStore, keep: Iterable[str] = (),
                vet: Callable[[dict[str, Any]], tuple[dict[str, Any], list[tuple[str, str]]]] | None = None,
                ) -> dict[str, Any]:
        """Apply the saved values but those named in ``keep`` (this command line's --set); ``vet`` takes out what
        the engine would refuse later (:func:`drop_missing_loras`). What was applied; a bad value is logged, never
        raised."""
        kept = set(keep)
        saved = self.file.read()
        overridden = sorted(name for name in saved if name in kept)
        saved = {name: value for name, value in saved.items() if name not in kept}
        if not saved:
            return {}
        dropped: list[tuple[str, str]] = []
        if vet is not None:
            saved, dropped = vet(saved)
        for item, why in dropped:
            log.warning("resume: %s not restored: %s", item, why)
        applied, errors = store.update(saved)
        self.restored = sorted(applied)
        self.skipped = sorted([str(error.name or "?") for error in errors] + [item for item, _ in dropped])
        for error in errors:
            log.warning("resume: %s not restored: %s", error.name, error)
        log.info("resume: restored %d values from %s%s%s", len(applied), self.file.path,
                 f" ({len(self.skipped)} skipped)" if self.skipped else "",
                 f"; --set kept {', '.join(overridden)}" if overridden else "")
        return applied

    def start(self, store: ParamStore) -> None:
        self._loop = asyncio.get_running_loop()
        store.subscribe(self._changed)
        self._schedule()  # the look this run starts with (a --set, the config's values over a missing file)

    def _changed(self, changed: Mapping[str, Any]) -> None:
        # Any thread (the worker, the loop): the save is scheduled on the loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        self._dirty = True
        if self._timer is not None:
            return  # a save is already due: a fader that keeps moving is saved every SAVE_AFTER_S, not never
        assert self._loop is not None
        self._timer = self._loop.call_later(SAVE_AFTER_S, self._save_soon)

    def _save_soon(self) -> None:
        self._timer = None
        if self._writing is not None and not self._writing.done():
            self._timer = self._loop.call_later(SAVE_AFTER_S, self._save_soon)  # one write at a time, in order
            return
        self._dirty = False
        values = self._look()  # read here, on the loop; the disk is written off it (a slow disk never stalls it)
        self._writing = self._loop.run_in_executor(None, self._write, values)
        self._writing.add_done_callback(self._after_write)

    def _after_write(self, future: asyncio.Future[bool]) -> None:
        """The loop, after a write: one the disk refused is tried again, so that the change made while it refused
        is saved once it takes it, not only at the next change (QA 22: a kill -9 then brought back an older look)."""
        if future.cancelled() or future.exception() is not None or future.result():
            return
        self._dirty = True
        if self._timer is None and self._loop is not None and not self._loop.is_closed():
            self._timer = self._loop.call_later(RETRY_S, self._save_soon)

    def _write(self, values: Mapping[str, Any]) -> bool:
        written = self.file.write(values)
        self.saves += written
        return written

    async def close(self, store: ParamStore) -> None:
        """Stop listening and save what changed since the last write."""
        store.unsubscribe(self._changed)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        if self._dirty:
            self._dirty = False
            self._write(self._look())

    def describe(self) -> dict[str, Any]:
        return {"enabled": True, "file": str(self.file.path), "restored": len(self.restored),
                "skipped": self.skipped, "saves": self.saves, "save_error": self.file.last_error}

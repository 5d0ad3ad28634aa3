"""The quality ladder: hold a target frame rate by trading steps, resolution and skipped frames.

With ``ladder_fps`` set, the ladder watches what the engine can do (the worker's step time,
smoothed) and, when it falls short of the target, steps down one rung at a time; when there is
clear headroom again it steps back up. Each rung is a set of parameter values derived from
what the artist had set (rung 0):

1. fewer denoising steps (half, at least 1);
2. and the resolution at 3/4;
3. and the resolution at 1/2;
4. and the similarity filter on (unchanged input skips the engine).

Every change is an ordinary parameter update (the engine re-prepares at a frame boundary, OSC
feedback echoes it), and the current rung goes out in telemetry (``/sd/status/ladder``).

Rung 0 is read from the store at the moment the ladder first steps down from it, never before:
what the artist changes while the ladder is on but on rung 0 is theirs. While stepped down, a
laddered value set since the ladder wrote it (to another value or the same) was set by someone else (a
controller, a preset): it stays as set and becomes the value given back at rung 0, and the next rung is derived
from it. Back on rung 0 (climbing up, or ``ladder_fps`` set to 0) the store holds exactly the
artist's values again, and the ladder forgets them. :meth:`QualityLadder.originals` gives those
values while stepped down, so a preset saved then saves the artist's look, not the reduced one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sdbridge.params import ParamSpec, ParamStore

log = logging.getLogger(__name__)

LADDERED = ("steps", "width", "height", "plugin.similarity.enabled")
LADDER_PARAMS = (
    ParamSpec("ladder_fps", "float", 0.0, "Frame rate the quality ladder holds by lowering steps, resolution and "
              "skipping still frames (0: off).", minimum=0.0, maximum=240.0, group="control"),
)
DOWN_BELOW = 0.9   # step down when capacity < 90 % of the target ...
UP_ABOVE = 1.6     # ... and back up when it exceeds 160 % (the rung above costs more)
PATIENCE = 2       # checks in a row before moving, so one slow frame moves nothing


def _scaled(value: int, factor: float) -> int:
    return max(64, int(value * factor) // 8 * 8)


def rungs(base: dict[str, Any]) -> list[dict[str, Any]]:
    """Rung 0 is what the artist set; each next rung is cheaper. Every rung sets all of
    :data:`LADDERED`, so climbing from rung 4 to 3 turns the similarity filter back to the artist's."""
    steps = max(1, int(base["steps"]) // 2)
    width, height = int(base["width"]), int(base["height"])
    similarity = base.get("plugin.similarity.enabled", False)
    return [
        {"steps": base["steps"], "width": width, "height": height, "plugin.similarity.enabled": similarity},
        {"steps": steps, "width": width, "height": height, "plugin.similarity.enabled": similarity},
        {"steps": steps, "width": _scaled(width, 0.75), "height": _scaled(height, 0.75),
         "plugin.similarity.enabled": similarity},
        {"steps": steps, "width": _scaled(width, 0.5), "height": _scaled(height, 0.5),
         "plugin.similarity.enabled": similarity},
        {"steps": steps, "width": _scaled(width, 0.5), "height": _scaled(height, 0.5),
         "plugin.similarity.enabled": True},
    ]


class QualityLadder:
    def __init__(self, store: ParamStore, capacity_fps: Callable[[], float | None],
                 report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.store = store
        self.capacity_fps = capacity_fps
        self.report = report or (lambda event: None)
        self.rung = 0
        self.direction = "none"  # the way it last moved: "down", "up" ("none" before it has)
        self.base: dict[str, Any] | None = None  # the artist's values (rung 0), kept only while stepped down
        self._written: dict[str, Any] = {}  # what the ladder last wrote, to tell a client's change from its own
        self._sets: dict[str, int] = {}     # the store's set counts just after that write
        self._low = self._high = 0

    def describe(self) -> dict[str, Any]:
        return {"rung": self.rung, "direction": self.direction, "target_fps": self.store.get("ladder_fps"),
                "changed": rungs(self.base)[self.rung] if self.base and self.rung else {}}

    def originals(self) -> dict[str, Any]:
        """The artist's values of the laddered parameters the ladder has replaced ({} on rung 0)."""
        if not self.rung:
            return {}
        self._adopt_changes()
        assert self.base is not None
        return {key: value for key, value in self.base.items() if key in self._written}

    def _adopt_changes(self) -> None:
        """While stepped down: a laddered value someone else set becomes the artist's value."""
        if not self.rung or self.base is None:
            return
        _, values = self.store.snapshot()
        sets = self.store.set_counts(self._written)
        for key, written in self._written.items():
            # Set since the ladder wrote it, to another value or to the same one (QA 8: a controller that set the
            # laddered value itself lost it at rung 0).
            if key in values and (values[key] != written or sets[key] != self._sets.get(key)):
                log.info("quality ladder: %s set to %r on rung %d; it is given back at rung 0", key, values[key],
                         self.rung)
                self.base[key] = self._written[key] = values[key]
        self._sets = sets

    def check(self) -> None:
        """Called periodically on the loop."""
        self._adopt_changes()
        target = float(self.store.get("ladder_fps"))
        if target <= 0:
            if self.rung:
                self._move(0)
            return
        capacity = self.capacity_fps()
        if capacity is None:
            return
        if self.rung == 0:  # rung 0 is the store as it is now
            _, values = self.store.snapshot()
            self.base = {key: values.get(key) for key in LADDERED}
        assert self.base is not None
        self._low = self._low + 1 if capacity < target * DOWN_BELOW else 0
        self._high = self._high + 1 if capacity > target * UP_ABOVE else 0
        last = len(rungs(self.base)) - 1
        if self._low >= PATIENCE and self.rung < last:
            self._move(self.rung + 1, capacity, target)
        elif self._low >= PATIENCE and self.rung == last and self._undone():
            # A client's values (a preset recalled: steps, the filter off) have undone the last rung's savings, and
            # there is no rung below to derive from them: the last rung again, from the values now given back. It
            # stayed undone for good, while /stats said the rung still held (QA 47 F6).
            self._move(last, capacity, target)
        elif self._high >= PATIENCE and self.rung > 0:
            self._move(self.rung - 1, capacity, target)

    def _undone(self) -> bool:
        """Whether the store no longer holds what this rung sets (a client set one of its values since)."""
        assert self.base is not None
        _, values = self.store.snapshot()
        return any(values.get(key) != value for key, value in rungs(self.base)[self.rung].items()
                   if key in self.store.schema)

    def _move(self, rung: int, capacity: float | None = None, target: float | None = None) -> None:
        assert self.base is not None
        self.direction = direction = "down" if rung >= self.rung and rung else "up"
        values = {key: value for key, value in rungs(self.base)[rung].items() if key in self.store.schema}
        self.store.update(values)
        self.rung = rung
        self._written = values if rung else {}
        self._sets = self.store.set_counts(self._written)
        self._low = self._high = 0
        log.info("quality ladder %s to rung %d (engine %.1f fps, target %s): %s", direction, rung, capacity or 0.0,
                 target, values)
        self.report({"type": "ladder", **self.describe()})
        if not rung:
            self.base = None  # given back: the next step down reads the store afresh

"""Ableton Link: the daemon joins the rig's Link session, so LFOs and preset recalls land on its beat.

On with ``--link`` (off by default, and in tests: Link announces itself by multicast). A task on
the event loop samples the session's beat and tempo every 10 ms into the worker's
:class:`~sdbridge.bridge.beat_clock.BeatClock`. Tempo goes both ways: a tempo change from any
peer becomes the ``bpm`` parameter (echoed over OSC feedback like any other value), and ``bpm``
set over OSC, WebSocket or HTTP becomes the session's tempo.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sdbridge.bridge.beat_clock import BeatClock
from sdbridge.errors import ConfigError
from sdbridge.params import ParamStore

log = logging.getLogger(__name__)

SAMPLE_S = 0.01
TEMPO_EPSILON = 0.01


class LinkSync:
    def __init__(self, store: ParamStore, clock: BeatClock) -> None:
        self.store = store
        self.clock = clock
        self.link: Any = None
        self._task: asyncio.Task[None] | None = None
        self._agreed: float | None = None  # the tempo bpm and Link last agreed on

    async def start(self) -> None:
        try:
            from aalink import Link
        except ImportError as exc:
            raise ConfigError("--link needs the aalink package: pip install \"sdbridge[link]\"") from exc
        bpm = float(self.store.get("bpm"))
        self.link = Link(bpm)
        self.link.quantum = 4
        self.link.enabled = True
        self._task = asyncio.create_task(self._follow(), name="sdbridge-link")
        log.info("Ableton Link on at %.1f bpm", bpm)

    async def _follow(self) -> None:
        link = self.link
        while True:
            try:
                beat, at, tempo = link.beat, time.monotonic(), float(link.tempo)
                self.clock.follow(beat, at, tempo)
                bpm = float(self.store.get("bpm"))
                if abs(tempo - bpm) <= TEMPO_EPSILON:
                    self._agreed = bpm
                elif self._agreed is not None and abs(bpm - self._agreed) > TEMPO_EPSILON:
                    link.tempo = bpm              # bpm set here (OSC, WebSocket, HTTP): the peers follow
                    self._agreed = bpm
                else:
                    self._take_tempo(tempo)       # tempo set by a peer: bpm follows
            except Exception:  # Link must never take the daemon down
                log.exception("Ableton Link sampling failed")
            await asyncio.sleep(SAMPLE_S)

    def _take_tempo(self, tempo: float) -> None:
        spec = self.store.schema.get("bpm")
        clamped = min(max(tempo, spec.minimum), spec.maximum)
        # A peer beyond bpm's range (Link goes to 999) stays off it at every sample: setting the same clamped bpm
        # again each 10 ms counted as someone's set and made on-beat recalls drop their bpm (QA 73 F9).
        if abs(clamped - float(self.store.get("bpm"))) > TEMPO_EPSILON:
            self.store.update({"bpm": clamped})
        self._agreed = clamped

    def describe(self) -> dict[str, Any]:
        if self.link is None:
            return {"enabled": False}
        return {"enabled": True, "peers": int(self.link.num_peers), "tempo": round(float(self.link.tempo), 3),
                "beat": round(float(self.link.beat), 3)}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.link is not None:
            self.link.enabled = False
            self.link = None
        self.clock.unfollow()

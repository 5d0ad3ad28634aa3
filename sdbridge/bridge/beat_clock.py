"""The beat the LFOs and on-beat preset recalls follow: the daemon's own, or an Ableton Link session's.

Without Link, beat 0 is the worker's start and beats tick at ``bpm``. With Link on
(sdbridge/bridge/link.py), the Link task samples the session's beat a hundred times a second
and the clock extrapolates between samples at the session's tempo, so a frame boundary reads
the shared beat with no call into Link from the worker thread. Sans-I/O: time is an argument.
"""

from __future__ import annotations

import math
import threading


class BeatClock:
    def __init__(self, origin: float) -> None:
        self.origin = origin           # monotonic seconds at beat 0 of the free-running clock
        self._lock = threading.Lock()
        self._sample: tuple[float, float, float] | None = None  # (beat, monotonic s, tempo) from Link

    def follow(self, beat: float, at: float, tempo: float) -> None:
        """A Link sample: the session was at ``beat`` at monotonic time ``at``, at ``tempo`` bpm."""
        with self._lock:
            self._sample = (beat, at, tempo)

    def unfollow(self) -> None:
        with self._lock:
            self._sample = None

    @property
    def linked(self) -> bool:
        return self._sample is not None

    def _beat_and_tempo(self, now: float, bpm: float) -> tuple[float, float]:
        with self._lock:
            sample = self._sample
        if sample is not None:
            beat, at, tempo = sample
            return beat + (now - at) * tempo / 60.0, tempo
        return (now - self.origin) * bpm / 60.0, bpm

    def beat(self, now: float, bpm: float) -> float:
        """The beat at monotonic time ``now``."""
        return self._beat_and_tempo(now, bpm)[0]

    def until_next_beat(self, now: float, bpm: float) -> float:
        """Seconds from ``now`` to the next whole beat (0 when ``now`` is on one)."""
        beat, tempo = self._beat_and_tempo(now, bpm)  # one sample: a new one may land meanwhile
        return (math.ceil(beat) - beat) * 60.0 / tempo

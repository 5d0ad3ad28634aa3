"""The beat the LFOs and on-beat preset recalls follow: the daemon's own, or an Ableton Link session's.

Without Link, beat 0 is the worker's start and beats tick at ``bpm``. The beat is integrated (as a free LFO's phase
is, :class:`sdbridge.modulation.Phases`), not
``(now - origin) * bpm / 60``: when a reading brings a new ``bpm``, the clock re-anchors at that moment
on the beat it had reached, so a tempo change changes the speed only (QA 73 F1: at 120 -> 121 bpm ten
minutes in, the product jumped 10 beats, and a gliding bpm ran at bpm + t * dbpm/dt). The stretch since
the last reading is counted at the tempo that reading had (within a frame of when the change came).

With Link on (sdbridge/bridge/link.py), or MIDI clock (bridge/midi.py), the task samples the session's
beat and the clock extrapolates between samples at the session's tempo, so a frame boundary reads the
shared beat with no call into Link from the worker thread. Following starts on the session's beat;
after :meth:`BeatClock.unfollow`, the free clock goes on from the last sample's beat at ``bpm``.
Sans-I/O: time is an argument.
"""

from __future__ import annotations

import math
import threading

from sdbridge.modulation import Phases


class BeatClock:
    def __init__(self, origin: float) -> None:
        self.origin = origin           # monotonic seconds at beat 0 of the free-running clock
        self._lock = threading.Lock()
        self._sample: tuple[float, float, float] | None = None  # (beat, monotonic s, tempo) from Link
        self._left: tuple[float, float, float] | None = None    # the last sample, till the free clock takes over
        # The free clock, beats since the origin integrated as an LFO's phase is (one "beat" phase, in beats a second).
        self._free = Phases()

    def follow(self, beat: float, at: float, tempo: float) -> None:
        """A Link sample: the session was at ``beat`` at monotonic time ``at``, at ``tempo`` bpm."""
        with self._lock:
            self._sample = (beat, at, tempo)
            self._left = None

    def unfollow(self) -> None:
        with self._lock:
            self._left, self._sample = self._sample or self._left, None

    @property
    def linked(self) -> bool:
        return self._sample is not None

    def _beat_and_tempo(self, now: float, bpm: float) -> tuple[float, float]:
        # Under the lock throughout: the worker reads at each frame and the event loop for on-beat recalls, and
        # either may re-anchor.
        with self._lock:
            sample = self._sample
            if sample is not None:
                beat, at, tempo = sample
                return beat + (now - at) * tempo / 60.0, tempo
            t = now - self.origin
            if self._left is not None:  # just unfollowed: on from where the session's beat had got to
                beat, at, tempo = self._left
                self._left = None
                self._free.set("beat", t, beat + (now - at) * tempo / 60.0, bpm / 60.0)
            return self._free.at("beat", t, bpm / 60.0), bpm

    def beat(self, now: float, bpm: float) -> float:
        """The beat at monotonic time ``now``; ``bpm``: the tempo from now on (a change re-anchors here)."""
        return self._beat_and_tempo(now, bpm)[0]

    def until_next_beat(self, now: float, bpm: float) -> float:
        """Seconds from ``now`` to the next whole beat (0 when ``now`` is on one)."""
        beat, tempo = self._beat_and_tempo(now, bpm)  # one sample: a new one may land meanwhile
        return (math.ceil(beat) - beat) * 60.0 / tempo

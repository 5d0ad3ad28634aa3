"""MIDI clock (24 timing messages per quarter note, start, stop, continue, song position) to a tempo
and a beat, the way Ableton Link gives them (bridge/link.py). Sans-I/O: each message comes with the
monotonic time it arrived.

Tick times jitter (a USB stack, a DAW's MIDI thread: ±2 ms is common, a tenth of a tick at 128 bpm),
so the tempo is a least-squares line through the last :data:`WINDOW_TICKS` tick times, not the last
interval: at 128 bpm and ±2 ms over 192 ticks its slope is within 0.05 bpm (five seeds measured), where one
interval's would be off by up to 25 bpm. The same line gives the beat, so the phase jitters no more than
the tempo. A tempo change restarts the line once :data:`CHANGE_TICKS` ticks in a row drift off it.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

PPQN = 24
WINDOW_TICKS = 192         # eight beats: at 128 bpm and ±2 ms jitter, within 0.05 bpm (96 ticks: 0.08)
MIN_TICKS = 12             # half a beat before a tempo is told
GAP_S = 1.0                # no tick for this long (20 bpm's tick is 0.125 s): the clock stopped; start afresh
CHANGE_S = 0.006           # a tick this far off the line (3x the usual jitter) ...
CHANGE_FRACTION = 0.25     # ... or a quarter of a tick, whichever is more, is off it
CHANGE_TICKS = 3           # this many in a row, all early or all late: the tempo changed


@dataclass(frozen=True)
class ClockSample:
    """The beat at a moment, and the tempo: what :meth:`BeatClock.follow` takes. ``running`` False: the
    transport is stopped, so only the tempo means anything (the beat stands still)."""

    beat: float
    at: float
    tempo: float
    running: bool = True


class MidiClock:
    def __init__(self) -> None:
        self.running = False    # until a Start, a Continue or a first tick: /stats must not say so before
        self._transport_seen = False  # a Start, Stop or Continue came: from then on only they set running
        self.ticks = 0          # the song position in ticks: advances only while running (Start: 0)
        self.tempo: float | None = None
        self.ticks_seen = 0
        self._index = 0         # every tick, running or not: the x of the tempo line
        self._times: deque[tuple[int, float]] = deque(maxlen=WINDOW_TICKS)  # (index, arrival time)
        self._off_line: list[tuple[int, float]] = []
        self._off_sign = 0
        self._last_at: float | None = None
        self._pending_start = False

    # --- messages ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start: the next tick is beat 0 (MIDI 1.0: the first clock after Start is the downbeat)."""
        self.running = True
        self._transport_seen = True
        self._pending_start = True

    def stop(self) -> None:
        self.running = False
        self._transport_seen = True

    def resume(self) -> None:
        """Continue: ticks advance the beat again from where Stop left it."""
        self.running = True
        self._transport_seen = True

    def song_position(self, sixteenths: int) -> None:
        """Song position pointer: in MIDI beats (sixteenth notes, 6 ticks each); the next tick plays it."""
        self.ticks = sixteenths * 6 - 1

    def tick(self, at: float) -> ClockSample | None:
        """A timing message at monotonic ``at``: the beat and tempo once the tempo is known, else None."""
        self.ticks_seen += 1
        if not self._transport_seen:  # a device that sends clock without Start runs from its first tick
            self.running = True
        self.expire(at)
        self._last_at = at
        if self._pending_start:
            self._pending_start = False
            self.ticks = 0
        elif self.running:
            self.ticks += 1
        self._index += 1
        self._check_change(self._index, at)
        self._times.append((self._index, at))
        if len(self._times) < MIN_TICKS:
            return None
        slope, intercept = _fit(self._times)
        if slope <= 0:
            return None
        self.tempo = 60.0 / (slope * PPQN)
        # The line's time for this tick, not its arrival: arrival jitter moves neither tempo nor phase.
        return ClockSample(self.ticks / PPQN, intercept + slope * self._index, self.tempo, self.running)

    def expire(self, now: float) -> bool:
        """True where no tick came for :data:`GAP_S` up to ``now`` (the cable pulled, the device off): the tempo,
        its line and the ticks off it are forgotten, so a clock that comes back is timed afresh. Once per gap: the
        daemon asks it between ticks too, so a gap is noticed without waiting for a next tick."""
        if self._last_at is None or now - self._last_at <= GAP_S:
            return False
        self._last_at = None
        self._times.clear()
        # Off-line ticks from before the gap would complete a "tempo change" with the first hiccup after it and
        # restart the line from ticks seconds old: 9.6 bpm from a 128 bpm clock (QA 73 F2).
        self._off_line.clear()
        self._off_sign = 0
        self.tempo = None
        return True

    def _check_change(self, index: int, at: float) -> None:
        """A tempo change shows as ticks drifting off the line, further each tick, all one way; jitter
        does neither. After :data:`CHANGE_TICKS` such ticks the line starts again from them."""
        if len(self._times) < MIN_TICKS:
            return
        slope, intercept = _fit(self._times)
        residual = at - (intercept + slope * index)
        if abs(residual) > max(CHANGE_S, CHANGE_FRACTION * slope) and residual * self._off_sign >= 0:
            self._off_sign = 1 if residual > 0 else -1
            self._off_line.append((index, at))
            if len(self._off_line) >= CHANGE_TICKS:
                self._times.clear()
                self._times.extend(self._off_line[:-1])  # this tick is appended by the caller
                self._off_line.clear()
                self.tempo = None
        else:
            self._off_line.clear()
            self._off_sign = 0


def _fit(points: deque[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``at = intercept + slope * tick``: the seconds per tick and the time of tick 0."""
    xs = [float(x) for x, _ in points]
    ys = [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0, mean_y
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    return slope, mean_y - slope * mean_x

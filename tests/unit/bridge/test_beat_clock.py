"""The beat LFOs and on-beat recalls follow: free-running at bpm, or extrapolated from Link samples."""

from __future__ import annotations

import pytest

from sdbridge.bridge.beat_clock import BeatClock


def test_free_running_beats_at_bpm_from_the_origin() -> None:
    clock = BeatClock(origin=100.0)
    assert clock.beat(100.0, 120) == 0.0
    assert clock.beat(101.0, 120) == pytest.approx(2.0)
    assert clock.until_next_beat(100.0, 120) == pytest.approx(0.0)
    assert clock.until_next_beat(100.1, 120) == pytest.approx(0.4)     # beats every 0.5 s
    assert clock.until_next_beat(110.49, 120) == pytest.approx(0.01)
    assert not clock.linked


def test_link_samples_are_extrapolated_at_the_sessions_tempo() -> None:
    clock = BeatClock(origin=0.0)
    clock.follow(beat=33.75, at=50.0, tempo=90.0)  # the session's tempo, not the bpm passed in
    assert clock.linked
    assert clock.beat(50.0, 120) == pytest.approx(33.75)
    assert clock.beat(51.0, 120) == pytest.approx(35.25)                # 1.5 beats a second at 90
    assert clock.until_next_beat(50.0, 120) == pytest.approx(0.25 * 60 / 90)
    clock.unfollow()
    assert clock.beat(1.0, 120) == pytest.approx(2.0)                   # back on the free clock

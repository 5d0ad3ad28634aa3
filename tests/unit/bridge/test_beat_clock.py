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
    assert not clock.linked
    # Back on the free clock, from where the session's beat had got to, at bpm: no jump back to the free beat.
    assert clock.beat(52.0, 120) == pytest.approx(36.75)                # the last sample extrapolated to 52 s
    assert clock.beat(53.0, 120) == pytest.approx(38.75)                # then 2 beats a second at 120
    clock.unfollow()                                                    # twice: still on the free clock
    assert clock.beat(54.0, 120) == pytest.approx(40.75)
    clock.follow(beat=7.0, at=60.0, tempo=90.0)                         # following again: the session's beat
    assert clock.beat(60.0, 120) == pytest.approx(7.0)


def test_a_bpm_change_changes_the_speed_not_the_beat():
    """Ten minutes in, 120 -> 121 bpm: the beat goes on from where it was (QA 73 F1: it jumped 10 beats)."""
    clock = BeatClock(origin=0.0)
    assert clock.beat(600.5, 120.0) == pytest.approx(1201.0)
    assert clock.beat(600.501, 121.0) == pytest.approx(1201.002)        # the last millisecond at the old tempo
    assert clock.beat(601.501, 121.0) == pytest.approx(1201.002 + 121 / 60)
    assert clock.until_next_beat(601.501, 121.0) == pytest.approx((1204 - (1201.002 + 121 / 60)) * 60 / 121)
    assert clock.beat(602.501, 120.0) == pytest.approx(1201.002 + 2 * 121 / 60)  # down again: on from there
    assert clock.beat(603.501, 120.0) == pytest.approx(1201.002 + 2 * 121 / 60 + 2.0)


def test_a_reading_a_moment_older_than_the_anchor_stays_on_the_line():
    """The worker and the event loop both read: a new bpm may come with a time just before the last anchor."""
    clock = BeatClock(origin=0.0)
    assert clock.beat(10.0, 120.0) == pytest.approx(20.0)
    assert clock.beat(10.5, 90.0) == pytest.approx(21.0)
    assert clock.beat(10.4, 60.0) == pytest.approx(20.9)   # anchored at 10.5 on beat 21, at 60 bpm from there
    assert clock.beat(11.5, 60.0) == pytest.approx(22.0)


def test_a_gliding_bpm_advances_the_beat_at_the_tempo_of_the_moment():
    """120 -> 130 bpm over 4 s, ten minutes in, read at 30 frames a second: 4 s at 125 bpm on average is 8.33
    beats (QA 73 F1: bpm * t / 60 ran 27 beats a second during the glide, 108 beats in all)."""
    clock = BeatClock(origin=0.0)
    start = 600.0
    before = clock.beat(start, 120.0)
    frames = [start + n / 30 for n in range(121)]
    beats = [clock.beat(t, 120.0 + 10.0 * (t - start) / 4.0) for t in frames]
    assert beats[-1] - before == pytest.approx(4 * 125 / 60, abs=0.02)
    steps = [b - a for a, b in zip(beats, beats[1:])]
    assert min(steps) == pytest.approx(120 / 60 / 30, rel=0.01) and max(steps) == pytest.approx(130 / 60 / 30, rel=0.01)

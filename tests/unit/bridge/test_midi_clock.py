"""midi_clock: synthetic 24-ppqn ticks, with jitter, to tempo and beat; start, stop, continue, song position."""

from __future__ import annotations

import random

import pytest

from sdbridge.bridge.beat_clock import BeatClock
from sdbridge.bridge.midi_clock import PPQN, MidiClock


def ticks(bpm: float, count: int, start_s: float = 100.0, jitter_s: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    period = 60.0 / bpm / PPQN
    for n in range(count):
        yield start_s + n * period + rng.uniform(-jitter_s, jitter_s)


@pytest.mark.parametrize("seed", range(5))
def test_128_bpm_with_2_ms_jitter_is_told_within_a_tenth_of_a_bpm(seed):
    clock = MidiClock()
    samples = [clock.tick(at) for at in ticks(128.0, PPQN * 16, jitter_s=0.002, seed=seed)]
    told = [s.tempo for s in samples[PPQN * 8:]]  # once the line spans its eight beats
    assert all(abs(tempo - 128.0) < 0.1 for tempo in told), max(abs(t - 128.0) for t in told)


@pytest.mark.parametrize("bpm", [20.0, 60.0, 174.0, 300.0])
def test_steady_ticks_give_the_exact_tempo(bpm):
    clock = MidiClock()
    sample = None
    for at in ticks(bpm, PPQN * 4):
        sample = clock.tick(at)
    assert sample is not None and sample.tempo == pytest.approx(bpm, rel=1e-9)


def test_no_tempo_before_half_a_beat_of_ticks():
    clock = MidiClock()
    assert all(clock.tick(at) is None for at in ticks(120.0, 11))
    assert clock.tempo is None


def test_a_tempo_change_is_followed_within_a_beat():
    clock = MidiClock()
    times = list(ticks(120.0, PPQN * 8, jitter_s=0.002, seed=1))
    for at in times:
        clock.tick(at)
    sample = None
    for at in ticks(140.0, PPQN, start_s=times[-1] + 60 / 140 / PPQN, jitter_s=0.002, seed=2):
        sample = clock.tick(at)
    assert sample is not None and sample.tempo == pytest.approx(140.0, abs=1.0)


def test_start_puts_beat_0_on_the_next_tick_and_the_beat_counts_ticks():
    clock = MidiClock()
    times = list(ticks(120.0, PPQN * 3))
    for at in times[:PPQN]:
        clock.tick(at)  # clock before Start: a DAW sends it while stopped
    clock.start()
    samples = [clock.tick(at) for at in times[PPQN:]]
    assert samples[0].beat == 0.0 and samples[0].at == pytest.approx(times[PPQN])
    assert samples[PPQN].beat == 1.0 and samples[-1].beat == pytest.approx((PPQN * 2 - 1) / PPQN)


def test_stop_holds_the_beat_and_continue_resumes_it_while_the_tempo_keeps_being_timed():
    clock = MidiClock()
    times = list(ticks(100.0, PPQN * 4))
    clock.start()
    for at in times[:PPQN * 2]:
        clock.tick(at)
    clock.stop()
    stopped = [clock.tick(at) for at in times[PPQN * 2:PPQN * 3]]
    assert all(not s.running and s.beat == pytest.approx((PPQN * 2 - 1) / PPQN) for s in stopped)
    assert stopped[-1].tempo == pytest.approx(100.0)
    clock.resume()
    assert clock.tick(times[PPQN * 3]).beat == pytest.approx(2.0)


def test_the_clock_runs_only_once_a_start_or_a_tick_says_so():
    # /stats midi.clock_running: false on a daemon that never heard a clock, not true by default.
    assert not MidiClock().running
    started = MidiClock()
    started.start()
    assert started.running
    free = MidiClock()  # a device that sends clock without Start runs from its first tick
    free.tick(0.0)
    assert free.running
    stopped = MidiClock()
    stopped.stop()  # a DAW that sends Stop, then clock while stopped: the ticks do not start it
    for n in range(PPQN):
        stopped.tick(n * 0.02)
    assert not stopped.running


def test_song_position_sets_the_beat_of_the_next_tick():
    clock = MidiClock()
    times = list(ticks(120.0, PPQN))
    for at in times[:-1]:
        clock.tick(at)
    clock.song_position(16)  # 16 sixteenths: bar 2, beat 4
    assert clock.tick(times[-1]).beat == 4.0


def test_a_gap_forgets_the_tempo():
    clock = MidiClock()
    for at in ticks(120.0, PPQN):
        clock.tick(at)
    assert clock.tempo is not None
    assert clock.tick(200.0) is None and clock.tempo is None


def test_a_gap_forgets_the_ticks_off_the_line_so_the_clock_after_it_is_timed_afresh():
    # QA 73 F2: two late ticks (the DAW slowing), the cable pulled for 5 s, then 128 bpm again with one 7 ms hiccup.
    clock = MidiClock()
    times = list(ticks(128.0, PPQN * 2))
    for at in times:
        clock.tick(at)
    period = 60.0 / 128.0 / PPQN
    at = times[-1]
    for late in (0.008, 0.016):
        at += period + late
        clock.tick(at)
    told = []
    for n, tick_at in enumerate(ticks(128.0, 40, start_s=at + 5.0)):
        sample = clock.tick(tick_at + (0.007 if n == 12 else 0.0))
        if sample is not None:
            told.append(sample.tempo)
    assert told and all(abs(tempo - 128.0) < 5.0 for tempo in told), told


def test_expire_notices_a_gap_without_a_tick_once():
    clock = MidiClock()
    times = list(ticks(120.0, PPQN))
    for at in times:
        clock.tick(at)
    assert not clock.expire(times[-1] + 0.5) and clock.tempo is not None
    assert clock.expire(times[-1] + 1.5) and clock.tempo is None
    assert not clock.expire(times[-1] + 3.0)  # the same gap: told once


def test_samples_drive_a_beat_clock_as_link_does():
    """The worker's BeatClock, fed each sample, reads the MIDI beat between ticks."""
    midi, beats = MidiClock(), BeatClock(origin=0.0)
    midi.start()
    times = list(ticks(128.0, PPQN * 4, jitter_s=0.002, seed=3))
    for at in times:
        sample = midi.tick(at)
        if sample is not None:
            beats.follow(sample.beat, sample.at, sample.tempo)
    ideal_last = 100.0 + (len(times) - 1) * 60 / 128 / PPQN
    assert beats.beat(ideal_last, 120.0) == pytest.approx((len(times) - 1) / PPQN, abs=0.01)
    half_beat_later = ideal_last + 30 / 128
    assert beats.beat(half_beat_later, 120.0) == pytest.approx((len(times) - 1) / PPQN + 0.5, abs=0.01)

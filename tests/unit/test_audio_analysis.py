"""The audio analyser and envelope followers, on synthetic blocks: bands, attack/release times, onsets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdbridge.audio_analysis import AudioAnalyser, EnvelopeBank, Follower, SlotSetting, smoothing
from sdbridge.errors import ConfigError

RATE = 48000


def sine(freq_hz: float, seconds: float, amplitude: float = 0.5, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def feed_in_blocks(analyser: AudioAnalyser, samples: np.ndarray, block: int = 480) -> list:
    out = []
    for start in range(0, len(samples), block):
        out += analyser.feed(samples[start:start + block])
    return out


def clicks(bpm: float, beats: int, rate: int = RATE) -> np.ndarray:
    """A kick-like click on every beat: a 60 Hz burst decaying in 15 ms."""
    samples = np.zeros(int(beats * 60 / bpm * rate), dtype=np.float32)
    n = int(0.05 * rate)
    burst = 0.8 * np.sin(2 * np.pi * 60 * np.arange(n) / rate) * np.exp(-np.arange(n) / (0.015 * rate))
    for beat in range(beats):
        start = int(beat * 60 / bpm * rate)
        samples[start:start + n] += burst[:len(samples) - start].astype(np.float32)
    return samples


def test_a_60_hz_burst_moves_the_low_band_and_not_the_high_one():
    analyser = AudioAnalyser(RATE)
    quiet = feed_in_blocks(analyser, np.zeros(RATE // 10, dtype=np.float32))
    assert max(a.low for a in quiet) == 0.0 and max(a.high for a in quiet) == 0.0
    burst = feed_in_blocks(analyser, sine(60, 0.3, amplitude=0.5))
    steady = burst[-1]
    assert steady.low == pytest.approx(0.5 / math.sqrt(2), rel=0.1)  # a sine in the band reads as its RMS there
    assert steady.high < 1e-3 and steady.mid < 0.02 * steady.low
    assert steady.rms > 0.1


@pytest.mark.parametrize(("freq_hz", "band"), [(800, "mid"), (5000, "high"), (100, "low")])
def test_each_band_reads_a_sine_inside_it_as_its_rms(freq_hz, band):
    analysis = AudioAnalyser(RATE).feed(sine(freq_hz, 0.2, amplitude=0.4))[-1]
    assert analysis.level(band) == pytest.approx(0.4 / math.sqrt(2), rel=0.1)
    others = [other for other in ("low", "mid", "high") if other != band]
    assert all(analysis.level(other) < 0.05 * analysis.level(band) for other in others)


def test_stereo_blocks_are_mixed_to_mono():
    mono = sine(800, 0.1)
    stereo = np.stack([mono, mono], axis=1)  # [N, 2]
    a, b = AudioAnalyser(RATE).feed(mono)[-1], AudioAnalyser(RATE).feed(stereo)[-1]
    assert b.mid == pytest.approx(a.mid, rel=1e-5)


def test_blocks_of_any_length_give_the_same_hops():
    samples = sine(300, 0.25)
    whole = AudioAnalyser(RATE).feed(samples)
    pieces = feed_in_blocks(AudioAnalyser(RATE), samples, block=97)
    assert len(whole) == len(pieces) == len(samples) // 512
    assert [a.mid for a in whole] == pytest.approx([a.mid for a in pieces], rel=1e-5)


def test_the_follower_matches_the_one_pole_formula():
    # A step from 0 to 1: after attack_ms the follower is at 1 - 1/e (63 %), whatever the hop length.
    for dt_s in (0.001, 0.0107, 0.05):
        follower = Follower(attack_ms=50.0, release_ms=400.0)
        steps = round(0.05 / dt_s)
        for _ in range(steps):
            follower.update(1.0, dt_s)
        assert follower.value == pytest.approx(1 - math.exp(-steps * dt_s / 0.05), abs=1e-12)
        assert follower.value == pytest.approx(1 - 1 / math.e, abs=0.03)
        # Release: from there down to 0 follows release_ms.
        start = follower.value
        for _ in range(round(0.4 / dt_s)):
            follower.update(0.0, dt_s)
        assert follower.value == pytest.approx(start / math.e, rel=0.05)
    assert smoothing(0.01, 0.0) == 1.0  # 0 ms: at once


def test_attack_time_through_the_analyser_reaches_63_percent_in_attack_ms():
    analyser = AudioAnalyser(RATE)
    bank = EnvelopeBank(("env1",))
    settings = {"env1": SlotSetting("rms", attack_ms=53.333, release_ms=500.0)}  # five hops of 512 at 48 kHz
    bank.update(analyser.feed(np.zeros(512 * 10, dtype=np.float32)), settings, analyser.hop_s)
    assert bank.levels()["env1"] == 0.0
    step = np.full(512 * 5, 0.5, dtype=np.float32)  # a DC step: the hop's RMS is 0.5 from the first hop on
    bank.update(analyser.feed(step), settings, analyser.hop_s)
    assert bank.levels()["env1"] == pytest.approx(0.5 * (1 - 1 / math.e), rel=1e-3)
    bank.update(analyser.feed(np.zeros(512 * 47, dtype=np.float32)), settings, analyser.hop_s)  # ~500 ms
    assert bank.levels()["env1"] == pytest.approx(0.5 * (1 - 1 / math.e) / math.e, rel=0.02)


def test_onsets_at_120_bpm_fire_once_per_beat():
    analyser = AudioAnalyser(RATE)
    analyses = feed_in_blocks(analyser, clicks(120, 8))
    times = [a.t_s for a in analyses if a.onset]
    assert len(times) == 8
    for beat, t in enumerate(times):
        assert abs(t - beat * 0.5) < 0.05  # within a hop or two of the click (10x loose)


def test_onsets_over_a_steady_tone_fire_on_the_clicks_only():
    samples = clicks(120, 6) + sine(400, 3.0, amplitude=0.2)
    times = [a.t_s for a in feed_in_blocks(AudioAnalyser(RATE), samples) if a.onset]
    assert len(times) == 6


@pytest.mark.parametrize("signal", ["sine60", "noise"])
def test_a_steady_sound_is_one_onset_where_it_starts(signal):
    rng = np.random.default_rng(0)
    samples = sine(60, 3.0) if signal == "sine60" else (0.1 * rng.standard_normal(3 * RATE)).astype(np.float32)
    times = [a.t_s for a in AudioAnalyser(RATE).feed(samples) if a.onset]
    assert len(times) == 1 and times[0] < 0.05


def test_the_refractory_period_keeps_close_clicks_to_one():
    analyser = AudioAnalyser(RATE, refractory_ms=300.0)
    times = [a.t_s for a in feed_in_blocks(analyser, clicks(480, 8)) if a.onset]  # 125 ms apart
    assert len(times) == 3  # at 0, 375 and 750 ms


def test_onset_band_jumps_to_one_and_decays_with_release():
    analyser = AudioAnalyser(RATE)
    bank = EnvelopeBank(("env1",))
    settings = {"env1": SlotSetting("onset", attack_ms=1000.0, release_ms=100.0)}
    values = []
    for start in range(0, RATE, 512):
        block = clicks(120, 2)[start:start + 512]
        analyses = analyser.feed(block)
        bank.update(analyses, settings, analyser.hop_s)
        if any(a.onset for a in analyses):
            values.append(bank.levels()["env1"])
    assert values and all(v > 0.85 for v in values)  # the attack of a moment is the moment
    assert bank.levels()["env1"] < 0.05  # 0.5 s after the last click, release 100 ms


def test_bad_rate_and_shape_are_refused():
    with pytest.raises(ConfigError, match="sample rate 100 Hz"):
        AudioAnalyser(100)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
        AudioAnalyser(RATE).feed(np.zeros((2, 2, 2), dtype=np.float32))


def test_nan_samples_do_not_poison_the_levels():
    analyser = AudioAnalyser(RATE)
    block = sine(800, 0.05)
    block[10] = np.nan
    analyser.feed(block)
    assert all(math.isfinite(v) for v in (analyser.last.rms, analyser.last.mid, analyser.last.flux))


@pytest.mark.parametrize("glitch", [1.0e35, 3.0e38, -3.0e38])
def test_a_huge_finite_sample_leaves_the_envelopes_finite_and_they_recover(glitch):
    """One block of a glitch far beyond full scale, then music: the levels read the music again (QA 73 F7)."""
    analyser, fresh = AudioAnalyser(RATE), AudioAnalyser(RATE)
    bank, fresh_bank = EnvelopeBank(("env1", "env2")), EnvelopeBank(("env1", "env2"))
    settings = {"env1": SlotSetting("low", 10.0, 200.0), "env2": SlotSetting("rms", 10.0, 200.0)}
    bank.update(analyser.feed(np.full(512, glitch, dtype=np.float32)), settings, analyser.hop_s)
    assert all(math.isfinite(v) for v in (*bank.levels().values(), *bank.meter_levels().values()))
    music = sine(60, 5.0, amplitude=0.3)
    bank.update(feed_in_blocks(analyser, music), settings, analyser.hop_s)
    fresh_bank.update(feed_in_blocks(fresh, music), settings, fresh.hop_s)
    assert bank.levels() == pytest.approx(fresh_bank.levels(), rel=1e-3)
    assert bank.meter_levels() == pytest.approx(fresh_bank.meter_levels(), rel=1e-3, abs=1e-4)  # meters decay
    assert bank.levels()["env1"] == pytest.approx(0.3 / math.sqrt(2), rel=0.05)  # the 60 Hz sine's RMS


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_follower_never_keeps_a_value_that_is_not_finite(bad):
    follower = Follower(attack_ms=10.0, release_ms=100.0)
    follower.update(0.5, 0.01)
    before = follower.value
    assert follower.update(bad, 0.01) == before
    follower.value = bad  # set from outside (an onset sets 1.0 directly): the next level starts it over
    assert follower.update(0.25, 0.01) == 0.25

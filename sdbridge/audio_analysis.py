"""Audio analysis for the envelope slots (docs/audio.md). Sans-I/O: fed float32 blocks, it returns numbers.

:class:`AudioAnalyser` takes blocks of any length (mono ``[N]`` or interleaved ``[N, C]``, mixed down to
mono), cuts them into fixed hops of about 10 ms and, for each hop, measures:

- ``rms``: the RMS of the hop's samples (a full-scale sine is 0.707);
- ``low`` / ``mid`` / ``high``: the RMS of the signal in each band (20-150 Hz, 150-2000 Hz, above 2000 Hz),
  from a Hann-windowed FFT of the last four hops, scaled so that a sine inside a band reads as its RMS there;
- ``flux``: the half-wave-rectified spectral flux (how much the spectrum rose since the last hop, in the same
  units), and ``onset``: whether this hop starts a transient (a kick, a clap).

An onset is a hop whose flux is above :data:`ONSET_FLOOR`, above ``sensitivity`` times the median flux of
the last second and above :data:`ONSET_RISE` times the last hop's whole level (so a loud steady pad or bass
note is not a string of onsets), at least ``refractory_ms`` after the last onset (so one kick, whose rise
spans the window's few hops, fires once).

:class:`Follower` is the one-pole attack/release smoother every envelope uses (the standard envelope follower
of compressors and VU meters): at each hop of ``dt`` seconds,

    y += (1 - exp(-dt / tau)) * (x - y),   tau = attack_ms when x > y, else release_ms (in seconds)

so a step in ``x`` is followed to 1 - 1/e = 63 % in ``attack_ms`` (rising) or ``release_ms`` (falling), and
to 95 % in three times that; 0 ms jumps at once. :class:`EnvelopeBank` runs one follower per envelope slot
(each with its slot's band, attack and release) and one meter per band for /stats.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sdbridge.errors import ConfigError

BANDS = ("rms", "low", "mid", "high", "onset")
LOW_HZ = (20.0, 150.0)    # below 20 Hz is a microphone's DC offset and rumble, not a kick
MID_HZ = (150.0, 2000.0)
HIGH_HZ = 2000.0          # to Nyquist
HOP_S = 0.01              # about: a power of two of samples (512 at 44.1 and 48 kHz)
WINDOW_HOPS = 4           # the FFT window: 2048 samples at 48 kHz, 23 Hz a bin (six bins under 150 Hz)
ONSET_FLOOR = 0.01        # flux below -40 dBFS is never an onset (a quiet room's noise)
ONSET_HISTORY_S = 1.0     # the median flux over this long sets the adaptive threshold
ONSET_RISE = 0.2          # and the rise must be this fraction of the level before it: a steady 60 Hz sine's
                          # window-phase wobble is 3 % of its level (measured), a kick from silence is all of it
METER_ATTACK_MS = 5.0     # the /stats meters: fast up, slow down, like a peak meter
METER_RELEASE_MS = 300.0
MIN_RATE, MAX_RATE = 4000, 384000
SAMPLE_LIMIT = 1000.0     # +60 dBFS: beyond any real float stream's headroom, and far enough under float32's
                          # 3.4e38 that a window's FFT and its squares stay finite (a 1e35 glitch overflowed them)


def smoothing(dt_s: float, time_ms: float) -> float:
    """The one-pole coefficient for a step of ``dt_s`` at time constant ``time_ms``: 1 - exp(-dt/tau)."""
    if time_ms <= 0.0:
        return 1.0
    return 1.0 - math.exp(-dt_s * 1000.0 / time_ms)


class Follower:
    """An attack/release envelope follower (see the module's docstring for the formula)."""

    def __init__(self, attack_ms: float = 10.0, release_ms: float = 200.0) -> None:
        self.attack_ms = attack_ms
        self.release_ms = release_ms
        self.value = 0.0

    def update(self, x: float, dt_s: float) -> float:
        if not math.isfinite(x):
            return self.value  # an overflowed measure is no level: kept, one NaN would hold the follower for good
        time_ms = self.attack_ms if x > self.value else self.release_ms
        value = self.value + smoothing(dt_s, time_ms) * (x - self.value)
        self.value = value if math.isfinite(value) else x  # from an infinite value set from outside: start over at x
        return self.value


@dataclass(frozen=True)
class Analysis:
    """One hop's measures (see the module's docstring); ``t_s``: the stream time at the hop's end."""

    t_s: float
    rms: float
    low: float
    mid: float
    high: float
    flux: float
    onset: bool

    def level(self, band: str) -> float:
        """The band's level for an envelope; ``onset`` is 1 on an onset's hop, else 0."""
        if band == "onset":
            return 1.0 if self.onset else 0.0
        return float(getattr(self, band))


class AudioAnalyser:
    def __init__(self, sample_rate: int, *, refractory_ms: float = 100.0, sensitivity: float = 3.0) -> None:
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise ConfigError(f"audio sample rate {sample_rate} Hz not in [{MIN_RATE}, {MAX_RATE}]")
        self.sample_rate = sample_rate
        self.hop = 1 << max(6, round(math.log2(sample_rate * HOP_S)))  # 512 at 44.1/48 kHz, 1024 at 96 kHz
        self.window_size = self.hop * WINDOW_HOPS
        self.hop_s = self.hop / sample_rate
        self.refractory_s = refractory_ms / 1000.0
        self.sensitivity = sensitivity
        self._window = np.hanning(self.window_size).astype(np.float32)
        # Level = sqrt(2 * sum |X_k|^2 / (N * sum w^2)) over a band's bins of the one-sided spectrum:
        # Parseval with the window's energy, so a sine of amplitude A inside the band reads A / sqrt(2).
        self._scale = 2.0 / (self.window_size * float(np.sum(self._window.astype(np.float64) ** 2)))
        freqs = np.fft.rfftfreq(self.window_size, 1.0 / sample_rate)
        self._bands = ((freqs >= LOW_HZ[0]) & (freqs < LOW_HZ[1]),
                       (freqs >= MID_HZ[0]) & (freqs < MID_HZ[1]),
                       freqs >= HIGH_HZ)
        self._history = np.zeros(self.window_size, dtype=np.float32)  # the last window of samples
        self._pending = np.zeros(0, dtype=np.float32)                  # samples short of a hop
        self._magnitude = np.zeros(len(freqs), dtype=np.float64)       # the last hop's spectrum
        self._level = 0.0                                               # and its whole level
        self._fluxes: deque[float] = deque(maxlen=max(8, round(ONSET_HISTORY_S / self.hop_s)))
        self._last_onset_s = -math.inf
        self.samples = 0  # mono samples fed
        self.hops = 0
        self.onsets = 0
        self.last: Analysis | None = None

    def feed(self, block: np.ndarray) -> list[Analysis]:
        """Analyse ``block`` (float samples in [-1, 1]: ``[N]`` mono or ``[N, C]``): one Analysis per whole hop."""
        samples = np.asarray(block, dtype=np.float32)
        if samples.ndim == 2:
            samples = samples.mean(axis=1)  # [N, C] -> [N]
        elif samples.ndim != 1:
            raise ValueError(f"audio block of shape {samples.shape}: expected [N] or [N, channels]")
        samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
        # A driver's or plugin's glitch can be finite and still huge (1e35): its FFT overflowed to inf, inf - inf
        # made the bands NaN, and the followers kept it (QA 73 F7).
        samples = np.clip(samples, -SAMPLE_LIMIT, SAMPLE_LIMIT)
        self.samples += len(samples)
        data = np.concatenate((self._pending, samples)) if len(self._pending) else samples
        out = []
        start = 0
        while len(data) - start >= self.hop:
            out.append(self._analyse(data[start:start + self.hop]))
            start += self.hop
        self._pending = data[start:].copy()
        return out

    def _analyse(self, hop: np.ndarray) -> Analysis:
        self._history = np.concatenate((self._history[self.hop:], hop))
        spectrum = np.fft.rfft(self._history * self._window)
        power = spectrum.real.astype(np.float64) ** 2 + spectrum.imag.astype(np.float64) ** 2
        low, mid, high = (math.sqrt(self._scale * float(power[band].sum())) for band in self._bands)
        magnitude = np.sqrt(power)
        rise = np.maximum(magnitude - self._magnitude, 0.0)
        flux = math.sqrt(self._scale * float(np.sum(rise * rise)))
        level_before = self._level
        self._level = math.sqrt(self._scale * float(power.sum()))
        self._magnitude = magnitude
        self.hops += 1
        t_s = self.hops * self.hop_s
        onset = False
        if flux > max(ONSET_FLOOR, ONSET_RISE * level_before) and t_s - self._last_onset_s >= self.refractory_s:
            median = float(np.median(self._fluxes)) if self._fluxes else 0.0
            onset = flux > self.sensitivity * median
        self._fluxes.append(flux)
        if onset:
            self._last_onset_s = t_s
            self.onsets += 1
        rms = math.sqrt(float(np.mean(hop.astype(np.float64) ** 2)))
        self.last = Analysis(t_s, rms, low, mid, high, flux, onset)
        return self.last


@dataclass(frozen=True)
class SlotSetting:
    """What an envelope slot follows: a band of :data:`BANDS`, its attack and release in ms."""

    band: str
    attack_ms: float
    release_ms: float


class EnvelopeBank:
    """One follower per envelope slot and one meter per band, updated with each hop's analysis."""

    def __init__(self, slots: tuple[str, ...]) -> None:
        self.followers = {slot: Follower() for slot in slots}
        self.meters = {band: Follower(METER_ATTACK_MS, METER_RELEASE_MS) for band in BANDS}

    def update(self, analyses: list[Analysis], settings: Mapping[str, SlotSetting], hop_s: float) -> None:
        for analysis in analyses:
            for band, meter in self.meters.items():
                level = analysis.level(band)
                if band == "onset" and level:
                    meter.value = 1.0  # an onset is a moment: it jumps to 1 and decays
                meter.update(level, hop_s)
            for slot, follower in self.followers.items():
                setting = settings.get(slot)
                if setting is None:
                    continue
                follower.attack_ms, follower.release_ms = setting.attack_ms, setting.release_ms
                level = analysis.level(setting.band)
                if setting.band == "onset" and level:
                    follower.value = 1.0  # the attack of a moment is the moment: only the release shapes it
                follower.update(level, hop_s)

    def levels(self) -> dict[str, float]:
        """{slot: its smoothed band level}, for modulation.modulate."""
        return {slot: follower.value for slot, follower in self.followers.items()}

    def meter_levels(self) -> dict[str, float]:
        return {band: meter.value for band, meter in self.meters.items()}

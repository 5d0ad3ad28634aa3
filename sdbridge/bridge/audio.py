"""Audio in: a microphone or a WAV file drives the envelope slots env1/env2 (docs/audio.md).

``--audio-in DEVICE`` opens an input device through sounddevice (``pip install "sdbridge[audio]"``; it needs the
PortAudio library); DEVICE is a device's index, a substring of its name, or ``default``. ``--audio-in
file:PATH.wav`` plays a WAV file (PCM, read with the stdlib's ``wave``) in a loop, paced in real time: for
rehearsal without a microphone, and for tests. ``--audio-in list`` prints the input devices.

This module is the thin I/O shell: one thread takes blocks (from the file, or from the queue PortAudio's
callback fills) and hands them to the sans-I/O :class:`~sdbridge.audio_analysis.AudioAnalyser` and
:class:`~sdbridge.audio_analysis.EnvelopeBank`, with each slot's band, attack and release read from the
parameter store. The worker reads :meth:`AudioInput.levels` at each frame boundary (modulation.modulate);
an onset acts as ``envN.on_onset`` says (modulation.OnsetActions): it steps the stored seed, or recalls a preset
through :attr:`AudioInput.recall`, which the daemon points at its loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdbridge.audio_analysis import AudioAnalyser, EnvelopeBank, SlotSetting
from sdbridge.errors import ConfigError
from sdbridge.modulation import ENV_SLOTS, OnsetActions, envelope_amount
from sdbridge.params import ParamStore

log = logging.getLogger(__name__)

LIST = "list"
FILE_PREFIX = "file:"
FILE_BLOCK_S = 0.02      # the file source's block: 20 ms, like a sound card's
DEVICE_BLOCK = 512       # frames a PortAudio callback delivers
QUEUE_BLOCKS = 64        # about 0.7 s of device blocks waiting; beyond that the oldest are dropped (counted)
SILENCE_AFTER_S = 0.1    # a device silent this long is fed silence of this length, so the envelopes fall
SEED_MAX = 2**32 - 1
PORTAUDIO_FIX = ("install PortAudio (Debian/Ubuntu: sudo apt install libportaudio2; macOS: brew install portaudio; "
                 "the Windows wheel includes it)")


def _sounddevice() -> Any:
    try:
        import sounddevice
    except ImportError as exc:
        raise ConfigError("audio input from a device needs sounddevice: pip install \"sdbridge[audio]\"") from exc
    except OSError as exc:  # sounddevice raises OSError("PortAudio library not found") at import
        raise ConfigError(f"audio input from a device needs the PortAudio library, which is missing ({exc}): "
                          f"{PORTAUDIO_FIX}") from exc
    return sounddevice


def list_devices() -> list[str]:
    """The input devices, one line each (index, name, channels, default rate); ConfigError without PortAudio."""
    sd = _sounddevice()
    lines = []
    for index, device in enumerate(sd.query_devices()):
        if device["max_input_channels"] > 0:
            lines.append(f"{index}: {device['name']} ({device['max_input_channels']} ch, "
                         f"{device['default_samplerate']:g} Hz)")
    return lines


def wav_path(spec: str) -> Path:
    """The file a ``file:PATH`` spec names; ConfigError for an empty path, which ``Path('')`` would read as the
    current folder ("cannot be read: Is a directory", a riddle for a typo)."""
    text = spec[len(FILE_PREFIX):]
    if not text.strip():
        raise ConfigError(f"--audio-in {spec!r}: the path after 'file:' is empty (file:PATH.wav)")
    return Path(text).expanduser()


def read_wav(path: Path, spec: str | None = None) -> tuple[np.ndarray, int]:
    """A PCM WAV file as float32 ``[N, C]`` in [-1, 1] and its sample rate; ConfigError naming the problem and
    quoting ``spec``, the ``--audio-in`` argument as typed (default ``file:PATH``)."""
    label = spec if spec is not None else f"{FILE_PREFIX}{path}"
    try:
        with wave.open(str(path), "rb") as handle:
            rate, channels, width = handle.getframerate(), handle.getnchannels(), handle.getsampwidth()
            raw = handle.readframes(handle.getnframes())
    except FileNotFoundError:
        raise ConfigError(f"--audio-in {label}: no such file") from None
    except OSError as exc:  # a folder, no permission
        raise ConfigError(f"--audio-in {label}: cannot be read: {exc.strerror or exc}") from None
    except (wave.Error, EOFError) as exc:  # not RIFF/WAVE, or a float or compressed WAV the wave module refuses
        raise ConfigError(f"--audio-in {label}: not a PCM WAV file ({exc}); convert it, e.g. "
                          f"sox IN -b 16 OUT.wav") from None
    except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:  # a chunk size that lies (a corrupt file)
        raise ConfigError(f"--audio-in {label}: a damaged WAV file ({type(exc).__name__}: {str(exc)[:100]})") \
            from None
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit: little-endian triplets, widened to int32
        triplets = np.frombuffer(raw[:len(raw) - len(raw) % 3], dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = triplets[:, 0] | (triplets[:, 1] << 8) | (triplets[:, 2] << 16)
        samples = (np.where(values >= 1 << 23, values - (1 << 24), values) / float(1 << 23)).astype(np.float32)
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        whole = raw[:len(raw) - len(raw) % width]  # a data chunk cut inside a sample: the last one dropped
        samples = (np.frombuffer(whole, dtype=f"<i{width}").astype(np.float64) / -float(np.iinfo(dtype).min)).astype(
            np.float32)
    else:
        raise ConfigError(f"--audio-in {label}: {8 * width}-bit samples are not supported (8, 16, 24, 32)")
    frames = len(samples) // channels
    if frames == 0:
        raise ConfigError(f"--audio-in {label}: has no samples")
    return samples[:frames * channels].reshape(frames, channels), rate


def query_device(spec: str) -> tuple[Any, int | str | None, dict[str, Any]]:
    """sounddevice, the device argument for ``spec`` (an index, part of a name, or default) and the device's
    info; ConfigError when sounddevice or PortAudio is missing, or no input device matches."""
    sd = _sounddevice()
    device: int | str | None = None if spec == "default" else (int(spec) if spec.isdigit() else spec)
    try:
        return sd, device, dict(sd.query_devices(device, kind="input"))
    except (ValueError, sd.PortAudioError) as exc:  # no such device, several match, no input channels
        raise ConfigError(f"--audio-in {spec!r}: no usable input device: {exc} (`sdbridge serve --audio-in list` "
                          f"lists them)") from None


def check_source(spec: str) -> str:
    """What ``--audio-in spec`` would open, in words (for doctor); ConfigError as serve would raise it."""
    if spec == LIST:
        return f"{len(list_devices())} input device(s)"
    if spec.startswith(FILE_PREFIX):
        samples, rate = read_wav(wav_path(spec), spec)
        AudioAnalyser(rate)  # the rate's own check
        return f"{spec}: {len(samples) / rate:.1f} s at {rate} Hz, {samples.shape[1]} channel(s), looped"
    _, _, info = query_device(spec)
    return f"{spec}: {info['name']} at {info['default_samplerate']:g} Hz"


class AudioInput:
    """The audio source's thread, the analyser and the envelopes; ``levels()`` for the worker."""

    def __init__(self, spec: str, store: ParamStore) -> None:
        self.spec = spec
        self.store = store
        self.bank = EnvelopeBank(ENV_SLOTS)
        self.analyser: AudioAnalyser | None = None
        self.blocks = 0
        self.dropped = 0       # device blocks dropped because the analysis thread fell behind
        self.silent_blocks = 0  # blocks of silence put in while the device delivered nothing
        self.seed_steps = 0
        self.preset_recalls = 0
        self.last_preset: str | None = None
        self.errors = 0
        self.onset_actions = OnsetActions()
        # Set by the daemon: the preset library's names, and a recall that runs on its loop (this thread must not
        # glide parameters itself). Without them an onset recalls nothing.
        self.preset_names: Callable[[], list[str]] = list
        self.recall: Callable[[str], None] | None = None
        self._file: tuple[np.ndarray, int] | None = None
        self._stream: Any = None
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._levels: dict[str, float] = {}
        if spec.startswith(FILE_PREFIX):
            self._file = read_wav(wav_path(spec), spec)  # checked at start-up: a bad file stops it with the reason
            self.analyser = AudioAnalyser(self._file[1])
        elif not spec or spec == LIST:
            raise ConfigError(f"--audio-in {spec!r} is not a device (an index, part of a name, or default) or "
                              f"file:PATH.wav")

    @property
    def is_file(self) -> bool:
        return self._file is not None

    # --- start and stop -----------------------------------------------------------------------

    def start(self) -> None:
        """Open the device (ConfigError naming what is missing) and start the analysis thread."""
        if self._file is None:
            self._open_device()
        self._thread = threading.Thread(target=self._run, name="sdbridge-audio", daemon=True)
        self._thread.start()

    def _open_device(self) -> None:
        sd, device, info = query_device(self.spec)
        try:
            rate = int(info["default_samplerate"])
            channels = min(2, int(info["max_input_channels"])) or 1
            self.analyser = AudioAnalyser(rate)
            self._stream = sd.InputStream(device=device, channels=channels, samplerate=rate, dtype="float32",
                                          blocksize=DEVICE_BLOCK, callback=self._callback)
            self._stream.start()
        except (ValueError, sd.PortAudioError) as exc:  # busy, or a rate or channel count it refuses
            raise ConfigError(f"--audio-in {self.spec!r}: cannot open the input device {info['name']!r}: "
                              f"{exc}") from None
        log.info("audio in: %s at %d Hz, %d channel(s)", info["name"], rate, channels)

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's thread: only copy the block out (the analysis runs on our thread)."""
        try:
            self._queue.put_nowait(indata.copy())
        except queue.Full:
            self.dropped += 1

    def stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            try:
                self._stream.stop()
                self._stream.close()
            except Exception as exc:  # a device unplugged while serving: stopping is all that is left to do
                log.warning("audio in: closing %s: %s", self.spec, exc)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the analysis thread ------------------------------------------------------------------

    def _file_blocks(self) -> Iterator[np.ndarray]:
        """The file's blocks in a loop, each at the wall-clock time it would play (no drift: paced from the start)."""
        assert self._file is not None
        samples, rate = self._file
        block = max(1, int(rate * FILE_BLOCK_S))
        start = time.monotonic()
        sent = 0
        position = 0
        while not self._stop.is_set():
            chunk = samples[position:position + block]
            if len(chunk) < block:  # the loop's seam: the end joined to the start
                chunk = np.concatenate((chunk, samples[:block - len(chunk)]))
            position = (position + block) % len(samples)
            wait = start + sent / rate - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            sent += block
            yield chunk

    def _device_blocks(self) -> Iterator[np.ndarray]:
        shape: tuple[int, ...] | None = None  # a block's shape past its frames (its channels), once one came
        while not self._stop.is_set():
            try:
                block = self._queue.get(timeout=SILENCE_AFTER_S)
            except queue.Empty:
                if shape is not None and self.analyser is not None:
                    # A device that stops delivering (unplugged, a stalled driver) is heard as silence: the
                    # envelopes fall by their release, where they stayed at their last level, pushing their
                    # targets until a restart (QA 71 F4).
                    self.silent_blocks += 1
                    yield np.zeros((int(self.analyser.sample_rate * SILENCE_AFTER_S), *shape), np.float32)
                continue
            shape = block.shape[1:]
            yield block

    def _run(self) -> None:
        blocks = self._file_blocks() if self._file is not None else self._device_blocks()
        for block in blocks:
            try:
                self.process(block)
            except Exception:  # the audio must never take the daemon down: log, count, go on
                self.errors += 1
                log.exception("audio in: a block failed")

    def process(self, block: np.ndarray) -> None:
        """Analyse one block and update the envelopes (the thread's step; tests call it too)."""
        assert self.analyser is not None
        params = self.store.snapshot()[1]
        settings = {slot: SlotSetting(params[f"{slot}.band"], float(params[f"{slot}.attack_ms"]),
                                      float(params[f"{slot}.release_ms"])) for slot in ENV_SLOTS}
        analyses = self.analyser.feed(block)
        self.bank.update(analyses, settings, self.analyser.hop_s)
        self._levels = self.bank.levels()  # one assignment: the worker reads a whole dict
        self.blocks += 1
        onsets = sum(1 for analysis in analyses if analysis.onset)
        if onsets:
            action = self.onset_actions.feed(onsets, params, self.preset_names)
            if action.seed_steps:
                self.seed_steps += action.seed_steps
                with self.store.transaction():  # read and written at once: a client's seed set between is kept
                    self.store.update({"seed": (int(self.store.get("seed")) + action.seed_steps) % (SEED_MAX + 1)})
            for name in action.presets:
                if self.recall is not None:
                    self.recall(name)  # counted by recalled() once it has been recalled

    def recalled(self, name: str) -> None:
        """The daemon's loop: an onset's preset was recalled (one that failed is not counted)."""
        self.preset_recalls += 1
        self.last_preset = name

    def levels(self) -> dict[str, float]:
        """{slot: smoothed band level}: the worker's envelopes for modulation.modulate."""
        return self._levels

    def describe(self) -> dict[str, Any]:
        params = self.store.snapshot()[1]
        analyser = self.analyser
        levels = self._levels
        return {
            "enabled": True,
            "source": self.spec,
            "sample_rate": analyser.sample_rate if analyser is not None else None,
            "running": self._thread is not None and self._thread.is_alive(),
            "blocks": self.blocks,
            "dropped": self.dropped,
            "silent_blocks": self.silent_blocks,  # silence put in while the device delivered nothing
            "errors": self.errors,
            "onsets": analyser.onsets if analyser is not None else 0,
            "seed_steps": self.seed_steps,
            "preset_recalls": self.preset_recalls,
            "last_preset": self.last_preset,
            "bands": {band: round(value, 4) for band, value in self.bank.meter_levels().items()},
            "envelopes": {slot: {"target": params[f"{slot}.target"], "band": params[f"{slot}.band"],
                                 "level": round(levels.get(slot, 0.0), 4),
                                 "amount": round(envelope_amount(params, slot, levels.get(slot, 0.0)), 4)}
                          for slot in ENV_SLOTS},
        }

"""bridge/audio.py: WAV files written with the stdlib's wave module, the file source's pacing and loop, onsets
stepping the seed, and the device path (sounddevice) where PortAudio and a device exist, else its clear error."""

from __future__ import annotations

import math
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from sdbridge.bridge.audio import AudioInput, check_source, list_devices, read_wav
from sdbridge.config import Settings
from sdbridge.doctor import ERROR, OK, check_audio
from sdbridge.errors import ConfigError
from sdbridge.params import ParamStore

RATE = 48000


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE, width: int = 2) -> Path:
    """``samples`` float [N] or [N, C] in [-1, 1] as a PCM WAV of ``width`` bytes a sample."""
    frames = samples.reshape(len(samples), -1) if samples.ndim == 2 else samples.reshape(-1, 1)
    scaled = np.clip(frames, -1.0, 1.0 - 1e-9)
    if width == 1:
        raw = (scaled * 128 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        ints = (scaled * (1 << 23)).astype("<i4").reshape(-1, 1).view(np.uint8).reshape(-1, 4)[:, :3]
        raw = ints.tobytes()
    else:
        raw = (scaled * (1 << (8 * width - 1))).astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(frames.shape[1])
        handle.setsampwidth(width)
        handle.setframerate(rate)
        handle.writeframes(raw)
    return path


def kicks_wav(path: Path, bpm: float = 120.0, seconds: float = 2.0) -> Path:
    samples = np.zeros(int(seconds * RATE), dtype=np.float32)
    n = int(0.1 * RATE)
    burst = 0.8 * np.sin(2 * np.pi * 60 * np.arange(n) / RATE) * np.exp(-np.arange(n) / (0.03 * RATE))
    for start in range(0, len(samples), int(60 / bpm * RATE)):
        samples[start:start + n] += burst[:len(samples) - start]
    return write_wav(path, samples)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_every_pcm_width_mono_and_stereo(tmp_path, width):
    t = np.arange(4800) / RATE
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), -0.25 * np.ones_like(t)
    samples, rate = read_wav(write_wav(tmp_path / "a.wav", np.stack([left, right], axis=1), width=width))
    assert rate == RATE and samples.shape == (4800, 2) and samples.dtype == np.float32
    tolerance = max(2.0 / (1 << (8 * width - 1)), 1e-7)  # float32 holds 24 bits
    assert np.max(np.abs(samples[:, 0] - left)) < tolerance and np.max(np.abs(samples[:, 1] - right)) < tolerance


def test_bad_files_are_refused_naming_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("not a wav")
    with pytest.raises(ConfigError, match="not a PCM WAV file"):
        read_wav(tmp_path / "text.wav")
    with pytest.raises(ConfigError, match="has no samples"):
        read_wav(write_wav(tmp_path / "empty.wav", np.zeros(0)))
    with pytest.raises(ConfigError, match="cannot be read"):
        read_wav(tmp_path)
    store = ParamStore()
    with pytest.raises(ConfigError, match="no such file"):
        AudioInput(f"file:{tmp_path / 'missing.wav'}", store)


def test_the_file_source_is_paced_in_real_time_and_loops(tmp_path):
    store = ParamStore()
    store.update({"env1.band": "rms", "env1.attack_ms": 0.0, "env1.release_ms": 0.0})
    path = write_wav(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 300 * np.arange(RATE // 10) / RATE))  # 0.1 s
    audio = AudioInput(f"file:{path}", store)
    audio.start()
    try:
        time.sleep(1.0)
        blocks = audio.blocks
        levels = audio.levels()
    finally:
        audio.stop()
    # 20 ms blocks: 50 in a second of wall-clock time, looping over a 0.1 s file (loose: 2 cores, shared).
    assert 25 <= blocks <= 55
    assert levels["env1"] == pytest.approx(0.5 / math.sqrt(2), rel=0.1)
    assert audio.describe()["running"] is False and audio.describe()["sample_rate"] == RATE


def test_onsets_step_the_seed_when_asked(tmp_path):
    store = ParamStore()
    store.update({"seed": 7, "env1.on_onset": "seed_step"})
    audio = AudioInput(f"file:{kicks_wav(tmp_path / 'kicks.wav')}", store)
    samples, _ = read_wav(Path(audio.spec[len("file:"):]))
    for start in range(0, len(samples), 960):
        audio.process(samples[start:start + 960])
    assert audio.analyser.onsets == 4 and audio.seed_steps == 4  # 2 s at 120 bpm
    assert store.get("seed") == 11
    assert audio.describe()["bands"]["low"] > 0  # the meters saw the kicks


def test_check_source_and_doctor_on_files(tmp_path):
    path = kicks_wav(tmp_path / "kicks.wav")
    assert check_source(f"file:{path}").endswith("2.0 s at 48000 Hz, 1 channel(s), looped")
    assert [f.level for f in check_audio(Settings(audio_in=f"file:{path}"))] == [OK]
    finding, = check_audio(Settings(audio_in=f"file:{tmp_path / 'gone.wav'}"))
    assert finding.level == ERROR and "no such file" in finding.message
    assert check_audio(Settings()) == []


def _portaudio_problem() -> str | None:
    try:
        list_devices()
    except ConfigError as exc:
        return str(exc)
    return None


def test_a_device_without_sounddevice_or_portaudio_is_a_clear_error_at_start_and_in_doctor():
    problem = _portaudio_problem()
    if problem is None:
        pytest.skip("sounddevice and PortAudio are here: the missing-library error cannot be seen")
    assert "sounddevice" in problem or "PortAudio" in problem
    audio = AudioInput("default", ParamStore())
    with pytest.raises(ConfigError) as caught:
        audio.start()
    assert str(caught.value) == problem
    finding, = check_audio(Settings(audio_in="default"))
    assert finding.level == ERROR and finding.message == problem


def test_a_real_input_device_through_sounddevice():
    problem = _portaudio_problem()
    if problem is not None:
        pytest.skip(f"no PortAudio here: {problem}")
    if not list_devices():
        pytest.skip("PortAudio is here but this machine has no audio input device")
    audio = AudioInput("default", ParamStore())
    audio.start()
    try:
        assert audio.analyser is not None and audio.analyser.sample_rate > 0
        time.sleep(0.5)
        assert audio.blocks > 0
    finally:
        audio.stop()


def test_damaged_wav_files_are_a_sentence_not_a_traceback(tmp_path):
    """QA 5: a chunk size that lies raised RuntimeError from the wave module, a data chunk cut inside a 16-bit sample
    ValueError from numpy: start-up and doctor ended in a traceback."""
    good = write_wav(tmp_path / "good.wav", 0.5 * np.sin(np.arange(RATE // 10) / 7.0))
    data = bytearray(good.read_bytes())
    lying = tmp_path / "lying.wav"
    lying.write_bytes(bytes(data[:4]) + (0x7FFFFFFF).to_bytes(4, "little") + bytes(data[8:16])
                      + (0x7FFFFFFF).to_bytes(4, "little") + bytes(data[20:]))
    with pytest.raises(ConfigError, match="lying.wav"):
        read_wav(lying)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(bytes(data[:-1]))  # the header still says the whole data chunk
    samples, rate = read_wav(cut)
    assert rate == RATE and len(samples) == RATE // 10 - 1
    [finding] = check_audio(Settings(audio_in=f"file:{lying}"))
    assert finding.level == ERROR and "lying.wav" in finding.message


@pytest.mark.parametrize("spec", ["file:", "file:  "])
def test_an_empty_file_path_is_said_to_be_empty(spec):
    # Path("") is the current folder: the old sentence was "file:.: cannot be read: Is a directory".
    message = f"--audio-in {spec!r}: the path after 'file:' is empty (file:PATH.wav)"
    with pytest.raises(ConfigError) as error:
        AudioInput(spec, ParamStore())
    assert str(error.value) == message
    with pytest.raises(ConfigError) as error:
        check_source(spec)
    assert str(error.value) == message


def test_file_errors_quote_the_argument_as_typed(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        AudioInput("file:~/missing.wav", ParamStore())
    assert str(error.value) == "--audio-in file:~/missing.wav: no such file"  # not the expanded path
    (tmp_path / "text.wav").write_text("not a wav")
    with pytest.raises(ConfigError, match=r"^--audio-in file:~/text\.wav: not a PCM WAV file"):
        check_source("file:~/text.wav")


def test_a_three_channel_wav_plays_mixed_to_mono_as_docs_audio_says(tmp_path):
    """QA 5: 3-channel WAVs play where docs/audio.md said "mono or stereo"."""
    tone = np.sin(np.arange(RATE) * 2 * math.pi * 440 / RATE).astype(np.float32) * 0.5
    path = write_wav(tmp_path / "ch3.wav", np.stack([tone, tone, np.zeros_like(tone)], axis=1))
    assert check_source(f"file:{path}").endswith("1.0 s at 48000 Hz, 3 channel(s), looped")
    store = ParamStore()
    store.update({"env1.band": "rms"})
    audio = AudioInput(f"file:{path}", store)
    samples, _ = read_wav(path)
    assert samples.shape == (RATE, 3)
    audio.process(samples[:4096])
    assert audio.levels()["env1"] > 0.1  # the tone is heard: the channels' mean, 2/3 of its amplitude
    docs = (Path(__file__).resolve().parents[3] / "docs" / "audio.md").read_text(encoding="utf-8")
    assert "mono or stereo" not in docs and "any number of channels, mixed to mono" in docs


def test_a_device_that_stops_delivering_is_heard_as_silence():
    """The envelopes stayed at their last level when a device stopped delivering (unplugged, a stalled driver),
    pushing their targets until a restart (QA 71 F4: env1 0.566 still 5 s after, its release 200 ms)."""
    import threading

    from sdbridge.audio_analysis import AudioAnalyser

    store = ParamStore()
    store.update({"env1.target": "strength", "env1.band": "low", "env1.depth": 0.5, "env1.release_ms": 200.0})
    audio = AudioInput("a device", store)          # nothing opened until start(): its thread is run by hand here
    audio.analyser = AudioAnalyser(48000)
    audio._thread = threading.Thread(target=audio._run, daemon=True)
    audio._thread.start()
    try:
        t = np.arange(512) / 48000
        for index in range(100):                    # 1 s of a loud 60 Hz bass, as PortAudio's callback queues it
            wave_block = 0.8 * np.sin(2 * np.pi * 60 * (t + index * 512 / 48000))
            audio._callback(np.stack([wave_block] * 2, axis=1).astype(np.float32), 512, None, None)
        deadline = time.monotonic() + 10
        while audio.blocks + audio.dropped < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        playing = audio.levels()["env1"]
        assert playing > 0.2
        time.sleep(1.5)                             # the device delivers nothing from here on
        assert audio.levels()["env1"] < playing * 0.1 and audio.describe()["silent_blocks"] >= 5
    finally:
        audio.stop()

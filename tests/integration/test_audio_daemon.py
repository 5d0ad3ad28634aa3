"""--audio-in file:X.wav through the real daemon: env1 on strength moves what the engine sees with the sound,
the stored value stays; /stats and the OSC feedback show the envelopes; a bad --audio-in stops the start."""

from __future__ import annotations

import time
import wave

import httpx
import numpy as np
import pytest

from sdbridge.errors import ConfigError
from tests.clients import UdpReceiver, recv_json, wait_for, ws_connect

pytestmark = pytest.mark.timeout(120)

RATE = 48000


def pulse_wav(path, loud_s: float = 0.4, quiet_s: float = 0.4):
    """A 60 Hz tone for ``loud_s``, then silence for ``quiet_s``: one loop of the file."""
    t = np.arange(int(loud_s * RATE)) / RATE
    samples = np.concatenate([0.5 * np.sin(2 * np.pi * 60 * t), np.zeros(int(quiet_s * RATE))])
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(RATE)
        handle.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def test_env1_on_strength_follows_the_audio_file(start_daemon, tmp_path):
    receiver = UdpReceiver()
    try:
        daemon = start_daemon(
            params={"engine": "identity", "strength": 0.5, "env1.target": "strength", "env1.band": "low",
                    "env1.depth": 0.4, "env1.gain": 4.0, "env1.attack_ms": 5.0, "env1.release_ms": 30.0},
            audio_in=f"file:{pulse_wav(tmp_path / 'pulse.wav')}", feedback_port=receiver.port, telemetry_hz=20.0)
        seen = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # the idle worker takes the parameters every 0.25 s
            daemon.registry.wake.set()      # and at once when woken: sample the live value often
            time.sleep(0.02)
            seen.append(daemon.worker.params["strength"])
        assert max(seen) > 0.85            # the tone: level 0.35 * gain 4 clips to 1: 0.5 + 0.4
        assert min(seen) < 0.52            # the silence: back to the base within the release
        assert daemon.store.get("strength") == 0.5  # the stored value is never written
        stats = httpx.get(f"http://127.0.0.1:{daemon.port}/stats", trust_env=False).json()["audio"]
        assert stats["enabled"] and stats["running"] and stats["sample_rate"] == RATE and stats["blocks"] > 50
        assert stats["envelopes"]["env1"]["target"] == "strength" and stats["envelopes"]["env2"]["target"] == ""
        assert set(stats["bands"]) == {"rms", "low", "mid", "high", "onset"}
        assert stats["onsets"] >= 2        # each loop's tone starts with a transient
        messages = receiver.messages(1.0)
        lows = [args[0] for address, args in messages if address == "/sd/status/env/low"]
        assert lows and max(lows) > 0.1 and any(address == "/sd/status/env/env1" for address, _ in messages)
    finally:
        receiver.close()


def test_depth_0_leaves_the_live_params_as_stored(start_daemon, tmp_path):
    daemon = start_daemon(params={"engine": "identity", "strength": 0.5, "env1.target": "strength",
                                  "env1.depth": 0.0, "env1.gain": 100.0},
                          audio_in=f"file:{pulse_wav(tmp_path / 'pulse.wav')}")
    assert wait_for(lambda: daemon.audio.blocks > 40)
    for _ in range(20):
        daemon.registry.wake.set()
        time.sleep(0.02)
        assert daemon.worker.params["strength"] == 0.5


def test_env_target_may_be_a_plugins_parameter(start_daemon, tmp_path):
    """--set env2.target=plugin.flow_warp.strength: checked once the plugins have registered their parameters."""
    daemon = start_daemon(params={"engine": "identity", "env2.target": "plugin.flow_warp.strength"})
    assert daemon.store.get("env2.target") == "plugin.flow_warp.strength"
    stats = httpx.get(f"http://127.0.0.1:{daemon.port}/stats", trust_env=False).json()["audio"]
    assert stats == {"enabled": False}


def test_a_bad_audio_in_stops_the_start_naming_it(start_daemon, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        start_daemon(params={"engine": "identity"}, audio_in=f"file:{tmp_path / 'gone.wav'}")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(ConfigError, match="not a PCM WAV file"):
        start_daemon(params={"engine": "identity"}, audio_in=f"file:{tmp_path / 'bad.wav'}")


def test_every_second_onset_recalls_the_next_preset(start_daemon, tmp_path):
    """env1.on_onset preset_next, every 2nd onset, through two presets: the pulse file's tones step the stored
    prompt through them in order, with their glide, while the stream runs; a missing name is told on OSC and to
    each WebSocket client, and not counted as a recall (QA 7)."""
    presets = tmp_path / "presets"
    presets.mkdir()
    for name in ("dawn", "dusk"):
        (presets / f"{name}.toml").write_text(f'glide_s = 0.0\n\n[params]\nprompt = "a {name} sky"\n')
    receiver = UdpReceiver()
    try:
        daemon = start_daemon(params={"engine": "identity", "env1.on_onset": "preset_next", "env1.onset_every": 2,
                                      "env1.presets": "dawn, gone, dusk"},
                              audio_in=f"file:{pulse_wav(tmp_path / 'pulse.wav', 0.2, 0.2)}", presets_dir=str(presets),
                              feedback_port=receiver.port)
        prompts: list[str] = []

        def seen_all() -> bool:
            prompt = daemon.store.get("prompt")
            if not prompts or prompts[-1] != prompt:
                prompts.append(prompt)
            return {"a dawn sky", "a dusk sky"} <= set(prompts) and daemon.audio.preset_recalls >= 4

        with ws_connect(daemon) as ws:
            assert wait_for(seen_all, timeout=20, interval=0.01), (prompts, daemon.audio.describe())
            told = recv_json(ws, "error")
        assert told["code"] == "unknown_preset" and told["message"].startswith("audio onset: preset 'gone'")
        recalled = [p for p in prompts if p in ("a dawn sky", "a dusk sky")]  # not the starting prompt
        # In the list's order, 'gone' skipped with an error; the file plays from the daemon's start, so a loaded
        # machine may first look after the first recall (the clean run at 5a42e88 first saw dusk): then the order is
        # not seen from its start.
        assert recalled[:2] == ["a dawn sky", "a dusk sky"] or prompts[0] in ("a dawn sky", "a dusk sky"), prompts
        errors = [args for address, args in receiver.messages(1.0) if address == "/sd/status/error"]
        assert any("gone" in str(args) for args in errors), errors
        stats = httpx.get(f"http://127.0.0.1:{daemon.port}/stats", trust_env=False).json()["audio"]
        assert stats["preset_recalls"] >= 4 and stats["last_preset"] in ("dawn", "dusk")  # 'gone' never counted
        assert stats["onsets"] >= 2 * 3  # every 2nd onset acted, a third of them on 'gone'
    finally:
        receiver.close()


def test_every_preset_means_every_preset_that_reads(start_daemon, tmp_path):
    """An empty env1.presets steps through the presets GET /presets lists: a broken file is no turn (QA 7)."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "a-good.toml").write_text('[params]\nprompt = "a good one"\n')
    (presets / "b-broken.toml").write_text('glide_s = "x"\n[params]\nprompt = "never"\n')
    daemon = start_daemon(params={"engine": "identity", "env1.on_onset": "preset_next"},
                          audio_in=f"file:{pulse_wav(tmp_path / 'pulse.wav', 0.2, 0.2)}", presets_dir=str(presets))
    listed = [preset["name"] for preset in httpx.get(f"http://127.0.0.1:{daemon.port}/presets",
                                                     trust_env=False).json()["presets"]]
    assert "a-good" in listed and "b-broken" not in listed  # the shipped ones are there too
    seen: list[str] = []

    def went_round() -> bool:
        if daemon.audio.last_preset and (not seen or seen[-1] != daemon.audio.last_preset):
            seen.append(daemon.audio.last_preset)
        return len(seen) > len(listed)

    assert wait_for(went_round, timeout=30, interval=0.01), seen
    assert set(seen) == set(listed) and "b-broken" not in seen  # the broken file has no turn
    assert all(listed[(listed.index(a) + 1) % len(listed)] == b for a, b in zip(seen, seen[1:]))  # in name order

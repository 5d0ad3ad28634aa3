"""MIDI through the real daemon: a mapping file, messages fed through MidiBridge.receive (the entry point the
port thread uses: no MIDI port can open here, there is no ALSA sequencer), learn mode over the WebSocket, clock
as the tempo, and a virtual port where the system has one."""

from __future__ import annotations

import json
import sys
import time

import httpx
import pytest

mido = pytest.importorskip("mido", reason="the midi extra (mido) is not installed")

from sdbridge.bridge.midi_clock import PPQN  # noqa: E402
from sdbridge.bridge.midi_map import MidiMap, load_map  # noqa: E402
from sdbridge.config import Settings  # noqa: E402
from sdbridge.errors import ConfigError  # noqa: E402
from tests.clients import recv_json, wait_for, ws_connect  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MAP = """\
[[cc]]
channel = 1
control = 1
param = "strength"

[[cc]]
control = 2
bits = 14
param = "guidance"

[[note]]
note = 36
preset = "look"

[[note]]
note = 37
param = "seed"
step = 1
"""


@pytest.fixture
def midi_daemon(start_daemon, tmp_path):
    path = tmp_path / "midi.toml"
    path.write_text(MAP)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "look.toml").write_text('glide_s = 0.0\n[params]\nprompt = "a neon city"\nsteps = 3\n')
    return start_daemon(params={"engine": "identity"}, midi_map=str(path), presets_dir=str(presets))


def test_a_cc_a_14_bit_pair_and_notes_change_the_live_params(midi_daemon):
    daemon = midi_daemon
    before = httpx.get(f"http://127.0.0.1:{daemon.port}/stats", trust_env=False).json()["midi"]
    assert before["clock_running"] is False and before["clock_ticks"] == 0  # no clock heard: not running
    daemon.midi.receive(mido.Message("control_change", channel=0, control=1, value=64))
    assert wait_for(lambda: daemon.store.get("strength") == pytest.approx(64 / 127))
    daemon.midi.receive(mido.Message("control_change", channel=5, control=2, value=0x40))
    daemon.midi.receive(mido.Message("control_change", channel=5, control=34, value=0x01))
    assert wait_for(lambda: daemon.store.get("guidance") == pytest.approx(30.0 * 8193 / 16383))
    seed = daemon.store.get("seed")
    daemon.midi.receive(mido.Message("note_on", note=37, velocity=100))
    assert wait_for(lambda: daemon.store.get("seed") == seed + 1)
    daemon.midi.receive(mido.Message("note_on", note=36, velocity=100))
    assert wait_for(lambda: daemon.store.get("prompt") == "a neon city" and daemon.store.get("steps") == 3)
    daemon.midi.receive(mido.Message("note_on", note=99, velocity=100))  # unmapped: counted
    stats = httpx.get(f"http://127.0.0.1:{daemon.port}/stats", trust_env=False).json()["midi"]
    assert stats["enabled"] and stats["applied"] == 5 and stats["unmapped"] == 1 and stats["errors"] == 0


def test_clock_at_128_bpm_sets_bpm_and_drives_the_worker_beat(midi_daemon):
    daemon = midi_daemon
    period = 60 / 128 / PPQN
    daemon.midi.receive(mido.Message("start"))
    t0 = time.monotonic()
    for n in range(PPQN * 8):  # eight beats, with the times they "arrived" at: ±2 ms of jitter
        daemon.midi.receive(mido.Message("clock"), t0 + n * period + (0.002 if n % 2 else -0.002))
    assert wait_for(lambda: abs(daemon.store.get("bpm") - 128.0) < 0.1)
    beat = daemon.worker.clock.beat(t0 + (PPQN * 8 - 1) * period, 120.0)
    assert beat == pytest.approx((PPQN * 8 - 1) / PPQN, abs=0.02)
    assert daemon.midi.describe()["following_clock"] and daemon.midi.describe()["clock_running"]


def test_a_clock_gone_silent_is_noticed_without_a_tick_and_bpm_drives_the_beat_again(midi_daemon):
    # QA 73 F6 (a): ticks that arrived 3 s to 2 s ago, then none: the daemon's own timer must notice the gap.
    daemon = midi_daemon
    period = 60 / 100 / PPQN
    daemon.midi.receive(mido.Message("start"))
    t0 = time.monotonic() - 3.0
    for n in range(PPQN * 2):
        daemon.midi.receive(mido.Message("clock"), t0 + n * period)
    assert wait_for(lambda: daemon.store.get("bpm") == 100.0)
    assert wait_for(lambda: not daemon.midi.following and not daemon.worker.clock.linked)
    stats = httpx.get(f"http://127.0.0.1:{daemon.port}/stats", trust_env=False).json()["midi"]
    assert stats["following_clock"] is False and stats["clock_tempo"] is None
    daemon.store.update({"bpm": 140.0})
    now = time.monotonic()
    assert daemon.worker.clock.beat(now + 1.0, 140.0) - daemon.worker.clock.beat(now, 140.0) == pytest.approx(
        140.0 / 60.0)


def test_learn_over_the_websocket_binds_the_next_cc_and_saves_the_map(midi_daemon):
    daemon = midi_daemon
    with ws_connect(daemon) as ws:
        ws.send(json.dumps({"type": "midi_learn", "id": 1, "param": "prompt_blend"}))
        assert recv_json(ws, "midi_learn")["param"] == "prompt_blend"
        daemon.midi.receive(mido.Message("control_change", channel=2, control=20, value=127))
        learned = recv_json(ws, "midi_learned")
        assert learned == {"type": "midi_learned", "channel": 3, "control": 20, "lsb": None,
                           "param": "prompt_blend", "id": 1}
        assert wait_for(lambda: daemon.store.get("prompt_blend") == 1.0)
        daemon.midi.receive(mido.Message("control_change", channel=2, control=20, value=0))
        assert wait_for(lambda: daemon.store.get("prompt_blend") == 0.0)
        for request_id, save in ((10, "yes"), (11, 1), (12, None)):  # not a boolean: an error, not a silent no
            ws.send(json.dumps({"type": "midi_map", "id": request_id, "save": save}))
            error = recv_json(ws, "error")
            assert error["code"] == "bad_param" and error["id"] == request_id
            assert f"midi_map save {save!r} is not true or false" in error["message"]
        assert daemon.midi.map_path.read_text(encoding="utf-8") == MAP  # nothing was written
        ws.send(json.dumps({"type": "midi_map", "save": True}))
        reply = recv_json(ws, "midi_map")
        assert {"channel": 3, "control": 20, "lsb": None, "param": "prompt_blend"} in reply["cc"]
        assert reply["saved"] == reply["path"]
        ws.send(json.dumps({"type": "midi_learn", "param": "prompt"}))
        error = recv_json(ws, "error")
        assert error["code"] == "bad_param" and "prompt has no range" in error["message"]
        ws.send(json.dumps({"type": "midi_learn", "param": "strenght"}))  # docs/midi.md: the protocol's own code
        error = recv_json(ws, "error")
        assert error["code"] == "unknown_param" and "'strenght'" in error["message"]
    saved = open(reply["path"], encoding="utf-8").read()
    assert 'control = 20\nparam = "prompt_blend"' in saved and "bits" not in saved and "lsb = 34" in saved


def test_learn_when_midi_is_off_is_an_error(start_daemon):
    daemon = start_daemon(params={"engine": "identity"})
    with ws_connect(daemon) as ws:
        ws.send(json.dumps({"type": "midi_map"}))
        assert recv_json(ws, "error")["code"] == "midi_off"
    stats = httpx.get(f"http://127.0.0.1:{daemon.port}/stats", trust_env=False).json()
    assert stats["midi"] == {"enabled": False}


def test_a_bad_map_stops_the_start_naming_the_entry(tmp_path):
    from sdbridge.bridge.server import Daemon

    path = tmp_path / "bad.toml"
    path.write_text('[[cc]]\ncontrol = 1\nparam = "strength"\n\n[[cc]]\ncontrol = 2\nparam = "strenght"\n')
    with pytest.raises(ConfigError, match=r"\[\[cc\]\] #2 \(line 5\): unknown parameter 'strenght'"):
        Daemon(Settings(port=0, osc=False, feedback_port=0, oscquery_port=-1, midi_map=str(path)))


def test_a_virtual_port_carries_a_cc_into_the_daemon(start_daemon, tmp_path):
    """Where the system has a MIDI sequencer (ALSA's /dev/snd/seq, CoreMIDI), a real port end to end."""
    try:
        out = mido.open_output("sdbridge-test-out", virtual=True)
    except Exception as exc:  # rtmidi's SystemError without ALSA; OSError; NotImplementedError on Windows
        pytest.skip(f"cannot open a virtual MIDI port here: {exc}")
    try:
        path = tmp_path / "midi.toml"
        path.write_text(MAP)
        daemon = start_daemon(params={"engine": "identity"}, midi_map=str(path), midi_in=["sdbridge-test-out"])
        out.send(mido.Message("control_change", channel=0, control=1, value=127))
        assert wait_for(lambda: daemon.store.get("strength") == 1.0)
        assert daemon.midi.describe()["ports"]
    finally:
        out.close()


def test_no_port_matching_is_a_clear_error():
    from sdbridge.bridge.midi import match_port

    assert match_port("nano", ["Midi Through:0", "nanoKONTROL2:nanoKONTROL2 MIDI 1 20:0"]).startswith("nanoKONTROL2")
    with pytest.raises(ConfigError, match=r"no MIDI input port matches 'launch' \(ports: 'Midi Through:0'"):
        match_port("launch", ["Midi Through:0"])


def test_link_wins_over_midi_clock(midi_daemon):
    """With Link on (a LinkSync, not started here: Link announces itself by multicast), ticks are only counted."""
    from sdbridge.bridge.link import LinkSync

    daemon = midi_daemon
    daemon.link = LinkSync(daemon.store, daemon.worker.clock)
    t0 = time.monotonic()
    for n in range(PPQN * 2):
        daemon.midi.receive(mido.Message("clock"), t0 + n * 60 / 90 / PPQN)
    assert wait_for(lambda: daemon.midi.stats.clock_ticks == PPQN * 2)
    assert daemon.midi.stats.clock_ignored == PPQN * 2 - 11  # every tick once the tempo is known
    assert daemon.store.get("bpm") == 120.0 and not daemon.worker.clock.linked


def test_midi_in_list_prints_the_ports_or_why_there_are_none(capfd):
    from sdbridge.bridge.midi import ALSA_SEQUENCER
    from sdbridge.cli import main

    code = main(["serve", "--midi-in", "list"])
    out, err = capfd.readouterr()  # the file descriptors: ALSA's C library writes to fd 2 itself
    if code == 0:
        assert out.strip()  # the ports, or "no MIDI input ports"
    else:
        assert code == 2 and "cannot list MIDI ports" in err and not out
        assert "ALSA lib" not in err and "MidiInAlsa" not in err  # our sentence, not rtmidi's or ALSA's
        if sys.platform.startswith("linux") and not ALSA_SEQUENCER.exists():
            assert err.strip().splitlines() == [
                f"sdbridge: cannot list MIDI ports: this machine has no ALSA sequencer ({ALSA_SEQUENCER} does not "
                "exist), so it has no MIDI ports; load it with `sudo modprobe snd-seq` (in a container, also pass "
                "the host's /dev/snd to it)"]


def test_a_port_that_is_not_there_stops_the_start_before_anything_listens(tmp_path):
    import asyncio

    from sdbridge.bridge.server import Daemon

    daemon = Daemon(Settings(port=0, osc_port=0, feedback_port=0, oscquery_port=-1, midi_in=["no-such-box"],
                             presets_dir=str(tmp_path)))
    # No ALSA sequencer here: "cannot list MIDI ports"; where there is one: "no MIDI input port matches".
    with pytest.raises(ConfigError, match=r"cannot list MIDI ports|no MIDI input port matches 'no-such-box'"):
        asyncio.run(daemon.start())
    assert daemon.port is None and daemon.osc is None and not daemon.worker.is_alive()


def test_a_midi_map_file_that_does_not_exist_yet_starts_empty_and_save_creates_it(start_daemon, tmp_path, caplog):
    """QA 5: docs/midi.md has `save` write --midi-map's file, "then loaded at the next start"; a missing file
    stopped the start, so the first learn-and-save session needed the file made by hand."""
    path = tmp_path / "show" / "midi.toml"  # its folder does not exist either: save makes it
    with caplog.at_level("WARNING", logger="sdbridge.bridge.midi"):
        daemon = start_daemon(params={"engine": "identity"}, midi_map=str(path))
    assert any("does not exist: starting with an empty map" in record.getMessage() for record in caplog.records)
    assert daemon.midi.mapper.map == MidiMap() and not path.exists()
    with ws_connect(daemon) as ws:
        ws.send(json.dumps({"type": "midi_learn", "param": "strength"}))
        recv_json(ws, "midi_learn")
        daemon.midi.receive(mido.Message("control_change", channel=0, control=7, value=127))
        recv_json(ws, "midi_learned")
        ws.send(json.dumps({"type": "midi_map", "save": True}))
        assert recv_json(ws, "midi_map")["saved"] == str(path)
    again = load_map(path, daemon.store.schema)
    assert [(binding.control, binding.param) for binding in again.cc] == [(7, "strength")]


@pytest.mark.parametrize("make", ["folder", "dangling link", "not toml"])
def test_a_midi_map_that_exists_but_cannot_be_read_still_stops_the_start(tmp_path, make):
    from sdbridge.bridge.server import Daemon

    path = tmp_path / "midi.toml"
    if make == "folder":
        path.mkdir()
    elif make == "dangling link":
        path.symlink_to(tmp_path / "gone.toml")
    else:
        path.write_text("[[cc]\n")
    with pytest.raises(ConfigError, match=f"midi map {str(path)!r} (cannot be read|is not valid TOML)"):
        Daemon(Settings(port=0, osc=False, feedback_port=0, oscquery_port=-1, midi_map=str(path)))

"""bridge/midi.py's parts that need no MIDI port: why a machine has no MIDI, in words; the clock path of MidiBridge."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sdbridge.bridge.midi import midi_system_missing
from sdbridge.bridge.midi_clock import GAP_S, PPQN

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ALSA sequencer is Linux's")


@linux_only
def test_no_sequencer_device_is_said_in_words_with_the_fix(tmp_path: Path) -> None:
    reason = midi_system_missing(tmp_path / "seq")
    assert reason is not None and f"({tmp_path / 'seq'} does not exist)" in reason
    assert "sudo modprobe snd-seq" in reason


@linux_only
def test_a_sequencer_device_this_user_may_open_is_no_reason(tmp_path: Path) -> None:
    device = tmp_path / "seq"  # a file stands in for the device: only its presence and access are asked
    device.write_bytes(b"")
    assert midi_system_missing(device) is None


@linux_only
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may open any file")
def test_a_sequencer_device_this_user_may_not_open_names_the_group(tmp_path: Path) -> None:
    device = tmp_path / "seq"
    device.write_bytes(b"")
    device.chmod(0)
    reason = midi_system_missing(device)
    assert reason is not None and "usermod -aG audio" in reason


# --- MidiBridge's clock, fed as the loop feeds it (_handle), into the real store and BeatClock ---------------------


@pytest.fixture
def mido():
    return pytest.importorskip("mido", reason="the midi extra (mido) is not installed")


def _bridge(tmp_path: Path) -> Any:
    from sdbridge.bridge.beat_clock import BeatClock
    from sdbridge.bridge.midi import MidiBridge
    from sdbridge.bridge.midi_map import DEFAULT_MAP_TOML, parse_map
    from sdbridge.params import ParamStore

    store = ParamStore()
    # The parts of the Daemon the clock path uses, real ones: its store and its worker's BeatClock; no Link.
    daemon = SimpleNamespace(store=store, worker=SimpleNamespace(clock=BeatClock(0.0)), link=None)
    return MidiBridge(daemon, parse_map(DEFAULT_MAP_TOML, store.schema), tmp_path / "midi.toml")  # type: ignore[arg-type]


def _clock(bridge: Any, mido: Any, bpm: float, count: int, at: float) -> float:
    for _ in range(count):
        at += 60.0 / bpm / PPQN
        bridge._handle(mido.Message("clock"), at)
    return at


def test_a_clock_gone_silent_hands_the_beat_back_to_bpm_without_waiting_for_a_tick(tmp_path, mido):
    # QA 73 F6 (a): a drum machine at 100 bpm unplugged; bpm set to 140 afterwards must drive the beat.
    bridge = _bridge(tmp_path)
    daemon = bridge.daemon
    bridge._handle(mido.Message("start"), 10.0)
    last = _clock(bridge, mido, 100.0, PPQN * 4, 10.0)
    assert bridge.describe()["following_clock"] and daemon.worker.clock.linked
    daemon.store.update({"bpm": 140.0})
    assert not bridge.check_gap(last + GAP_S / 2) and bridge.following  # a slow tick is not a gap
    assert bridge.check_gap(last + GAP_S * 2)
    stats = bridge.describe()
    assert not stats["following_clock"] and stats["clock_tempo"] is None and not daemon.worker.clock.linked
    now = last + 60.0
    beats = daemon.worker.clock.beat(now + 1.0, 140.0) - daemon.worker.clock.beat(now, 140.0)
    assert beats == pytest.approx(140.0 / 60.0)
    # plugged back in: followed again once its tempo is timed
    _clock(bridge, mido, 100.0, PPQN, now)
    assert bridge.following and daemon.worker.clock.linked


def test_a_tempo_turned_while_stopped_moves_the_beat_from_where_it_is(tmp_path, mido):
    # QA 73 F6 (b): Stop holds the song position and the beat runs on at the tempo; turned to 140 meanwhile, the
    # beat runs on at 140, with no jump.
    bridge = _bridge(tmp_path)
    clock = bridge.daemon.worker.clock
    bridge._handle(mido.Message("start"), 10.0)
    at = _clock(bridge, mido, 100.0, PPQN * 4, 10.0)
    bridge._handle(mido.Message("stop"), at)
    at = _clock(bridge, mido, 100.0, PPQN, at)
    before = clock.beat(at, 100.0)
    assert before == pytest.approx((PPQN * 5 - 1) / PPQN, abs=0.01)  # running on at 100 through the Stop
    at = _clock(bridge, mido, 140.0, PPQN * 10, at)
    assert bridge.daemon.store.get("bpm") == pytest.approx(140.0, abs=0.1)
    assert clock.beat(at + 1.0, 140.0) - clock.beat(at, 140.0) == pytest.approx(140.0 / 60.0, abs=0.01)
    # no jump: ten beats at 140, less what the line's first half beat ran at 100 (the old code: 7.1, all at 100)
    assert 9.5 < clock.beat(at, 140.0) - before < 10.0


def test_clock_on_two_ports_follows_the_first_and_counts_the_other(tmp_path, mido, caplog):
    # QA 73 F10: a DAW's 120 bpm clock, and the same clock 3 ms later through a controller's MIDI thru.
    bridge = _bridge(tmp_path)
    at = 10.0
    for port in ("daw", "thru"):
        bridge._handle(mido.Message("start"), at, port)
    with caplog.at_level("WARNING", logger="sdbridge.bridge.midi"):
        for _ in range(PPQN * 4):
            at += 60.0 / 120.0 / PPQN
            bridge._handle(mido.Message("clock"), at, "daw")
            bridge._handle(mido.Message("clock"), at + 0.003, "thru")
        bridge._handle(mido.Message("stop"), at + 0.004, "thru")  # the other port's transport is not the clock's
    stats = bridge.describe()
    assert stats["clock_tempo"] == pytest.approx(120.0) and bridge.daemon.store.get("bpm") == 120.0
    assert bridge.clock.ticks == PPQN * 4 - 1 and stats["clock_running"]
    assert stats["clock_port"] == "daw" and stats["clock_ticks"] == PPQN * 4
    assert stats["clock_other_port"] == PPQN * 4 + 1  # its ticks and its Stop (its Start came before any tick)
    assert [r.getMessage() for r in caplog.records].count("MIDI clock also comes from 'thru': ignored, the clock from "
                                                          "'daw' is followed (clock_other_port in /stats counts the "
                                                          "rest)") == 1
    # the DAW unplugged: once its clock has gone silent, the other port's is followed
    at += 60.0 / 120.0 / PPQN + 2 * GAP_S
    for _ in range(PPQN):
        at += 60.0 / 90.0 / PPQN
        bridge._handle(mido.Message("clock"), at, "thru")
    assert bridge.describe()["clock_port"] == "thru" and bridge.daemon.store.get("bpm") == pytest.approx(90.0)

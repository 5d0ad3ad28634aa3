"""bridge/midi.py's parts that need no MIDI port: why a machine has no MIDI, in words."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from sdbridge.bridge.midi import midi_system_missing

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

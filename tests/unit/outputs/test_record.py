"""sdbridge/outputs/record.py on real folders: the start-up check, a full disk, and numbering on after it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from sdbridge.config import Settings
from sdbridge.doctor import ERROR, OK, check_outputs
from sdbridge.outputs import hub as hub_module
from sdbridge.outputs.base import OutputError
from sdbridge.outputs.hub import OutputHub
from sdbridge.outputs.record import RecordOutput
from tests.clients import wait_for


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A record folder this process cannot write, and the OS's reason. A read-only folder for a
    normal user; root writes into one anyway, so there a folder under a regular file, which no one
    can create."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        yield locked, "Permission denied"
        locked.chmod(0o700)  # so that pytest can remove it
    else:
        (tmp_path / "afile").write_text("a file, not a folder")
        yield tmp_path / "afile" / "sub", "Not a directory"


def red(value: int, size: int = 16) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = value
    return image


def test_an_unwritable_folder_stops_the_hub_before_it_starts(unwritable: tuple[Path, str]) -> None:
    folder, reason = unwritable
    with pytest.raises(OutputError) as error:
        OutputHub([f"record:{folder}"])
    assert str(error.value) == f"cannot record into {folder}: {reason}"
    assert error.value.code == "output_failed"  # the code clients get when it fails mid-show (docs/outputs.md)


def test_the_check_creates_a_missing_folder_and_leaves_nothing_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "shows" / "tonight"
    RecordOutput(str(folder)).check()
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone


def test_doctor_names_the_folder_and_the_reason(unwritable: tuple[Path, str], tmp_path: Path) -> None:
    folder, reason = unwritable
    fine = tmp_path / "fine" / "rec"
    findings = check_outputs(Settings(outputs=[f"record:{folder}", f"record:{fine}"]))
    assert [f.level for f in findings] == [ERROR, OK]
    assert findings[0].message == f"record:{folder}: cannot record into {folder}: {reason}"
    assert findings[1].message == f"record:{fine}: its folder is writable" and fine.is_dir()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, whose writes fail with ENOSPC")
def test_a_full_disk_says_so_and_the_recording_resumes_numbered_on(tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.setattr(hub_module, "RETRY_S", 0.3)
    events: list[dict] = []
    hub = OutputHub([f"record:{tmp_path}"], notify=events.append)
    hub.start()
    try:
        hub.publish("s", red(10))
        assert wait_for(lambda: hub.stats()[0]["sent"] == 1)
        # The next frame's file leads to /dev/full: the kernel answers its write with ENOSPC, as a full disk does.
        (tmp_path / "000001.png").symlink_to("/dev/full")
        hub.publish("s", red(20))
        assert wait_for(lambda: hub.stats()[0]["failures"] == 1)
        error = hub.stats()[0]["last_error"]
        assert error.startswith(f"could not write {tmp_path / '000001.png'}: No space left on device (")
        assert "MB free there)" in error
        assert events and events[0]["code"] == "output_failed" and "No space left on device" in events[0]["message"]
        assert not (tmp_path / "000001.png").is_symlink()  # the partial file removed: no broken frame
        # Space freed; after the retry pause the recording goes on at the number that failed. Frames
        # published within the pause are dropped, so one is published per poll until one is sent.

        def resumed() -> bool:
            hub.publish("s", red(30))
            return hub.stats()[0]["sent"] == 2

        assert wait_for(resumed, timeout=10, interval=0.05)
    finally:
        hub.stop()
    # Numbered on from the one that failed; a frame published as the hub stopped is written too (a stop drains).
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names[:2] == ["000000.png", "000001.png"] and names == [f"{n:06d}.png" for n in range(len(names))]
    assert len(names) <= 3
    assert int(cv2.imread(str(tmp_path / "000001.png"))[0, 0, 2]) == 30  # BGR on disk
    assert "libpng" not in capfd.readouterr().err


def test_a_write_whose_clean_up_fails_too_still_says_why_it_failed(tmp_path: Path) -> None:
    """QA 75 F5: on a read-only disk removing the partial file fails as well (EROFS), and that raw OSError
    hid the OutputError. A directory where the frame's file goes refuses both the same way, for any user."""
    recorder = RecordOutput(str(tmp_path))
    recorder.open(16, 16, 30)
    (tmp_path / "000000.png").mkdir()
    with pytest.raises(OutputError, match=r"could not write .*000000\.png: Is a directory \(.* MB free there\)"):
        recorder.send(red(10))
    assert recorder.count == 0


def test_numbering_goes_on_from_ascii_numbered_files_only(tmp_path: Path) -> None:
    """QA 75 F8: a file such as '².png' (str.isdigit() is true, int() refuses it) kept the recorder from
    opening, retried every 5 s for good."""
    for name in ("².png", "٣.png", "000004.png", "take2.png", "0x10.png"):
        (tmp_path / name).write_bytes(b"")
    recorder = RecordOutput(str(tmp_path))
    recorder.open(16, 16, 30)
    assert recorder.count == 5

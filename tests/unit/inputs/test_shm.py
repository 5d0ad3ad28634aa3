"""Shared-memory input: the header's literal bytes, its round trip and errors, and a writer in another process."""

from __future__ import annotations

import os
import subprocess
import sys
import struct
import textwrap
import threading
import time
import uuid
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from sdbridge.inputs.base import InputError, parse_spec
from sdbridge.inputs.shm import HEADER_SIZE, ShmHeader, ShmInput, ShmWriter

ROOT = Path(__file__).resolve().parents[3]

# version 1, 4 channels, BOTTOM_UP, 640x480, capacity 1228800, sequence 6 (frame 3), timestamp 1000 µs
GOLDEN = bytes.fromhex("5344424d 01 04 01 00 8002 e001 00c01200 0600000000000000 e803000000000000".replace(" ", ""))


def test_the_header_is_the_documented_32_bytes() -> None:
    header = ShmHeader(1, 4, 1, 640, 480, 640 * 480 * 4, 6, 1000)
    assert HEADER_SIZE == 32
    assert header.serialize() == GOLDEN
    assert ShmHeader.parse(GOLDEN + bytes(header.capacity)) == header
    assert header.bottom_up and header.frame_bytes == 640 * 480 * 4


def test_a_zero_header_is_a_writer_not_started_and_bad_ones_say_why() -> None:
    assert ShmHeader.parse(bytes(64)) is None
    with pytest.raises(InputError, match=r"starts with b'JUNK'"):
        ShmHeader.parse(b"JUNK" + GOLDEN[4:])
    with pytest.raises(InputError, match="version 2"):
        ShmHeader.parse(GOLDEN[:4] + b"\x02" + GOLDEN[5:])
    with pytest.raises(InputError, match="5 channels"):
        ShmHeader(1, 5, 0, 8, 8, 1000, 2).check()
    with pytest.raises(InputError, match="needs 192 bytes but the header says the segment holds 100"):
        ShmHeader(1, 3, 0, 8, 8, 100, 2).check()
    with pytest.raises(InputError, match="segment has 16"):
        ShmHeader.parse(GOLDEN + bytes(16))


def test_a_missing_segment_is_an_input_that_waits_for_its_writer() -> None:
    reader = ShmInput(parse_spec(f"shm:sdb-missing-{uuid.uuid4().hex[:8]}"))
    with pytest.raises(InputError, match="is the writer running") as error:
        reader.open()
    assert error.value.code == "input_unavailable"


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from sdbridge.inputs.shm import ShmWriter
    name, count = sys.argv[1], int(sys.argv[2])
    with ShmWriter(name, 32, 24, channels=4, bottom_up=True) as writer:
        print("READY", flush=True)
        sys.stdin.readline()  # the reader has attached
        for n in range(1, count + 1):
            frame = np.zeros((24, 32, 4), np.uint8)
            frame[..., 0] = n           # red: the frame's number
            frame[0, :, 1] = 200        # green on the first row written: the bottom row, as bottom_up says
            writer.write(frame)
            time.sleep(0.03)
        sys.stdin.readline()  # hold the segment until the reader is done
""")


def test_a_writer_in_another_process_feeds_frames_in_order_right_side_up() -> None:
    name = f"sdb-test-{uuid.uuid4().hex[:8]}"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, name, "20"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    reader = ShmInput(parse_spec(f"shm:{name}"))
    try:
        assert writer.stdout.readline().strip() == "READY"
        reader.open()
        writer.stdin.write("go\n")
        writer.stdin.flush()
        stop, numbers = threading.Event(), []
        deadline = time.monotonic() + 30
        while (not numbers or numbers[-1] < 20) and time.monotonic() < deadline:
            image = reader.read(stop)
            assert image.shape == (24, 32, 4)
            assert (image[-1, :, 1] == 200).all() and (image[:-1, :, 1] == 0).all()  # flipped to top row first
            numbers.append(int(image[0, 0, 0]))
        assert numbers == sorted(set(numbers)), numbers  # in order, none twice
        assert numbers[-1] == 20 and len(numbers) >= 10, numbers  # 30 ms apart, polled every 2 ms: few missed
    finally:
        reader.close()
        writer.stdin.write("done\n")
        writer.stdin.flush()
        assert writer.wait(timeout=30) == 0
    # The reader's exit must not have removed the writer's segment (Python's resource tracker would, unasked):
    # the writer removed it itself, so it is gone now, and a new writer can take the name again.
    with ShmWriter(name, 4, 4) as again:
        assert again.write(np.zeros((4, 4, 3), np.uint8)) == 1


@pytest.mark.parametrize("through", ["file", "mapping"])
def test_a_frame_being_written_is_not_read_until_it_is_whole(through: str) -> None:
    """``through``: read with pread where the platform allows it, or from the mapping (Windows, macOS)."""
    name = f"sdb-torn-{uuid.uuid4().hex[:8]}"
    with ShmWriter(name, 4, 4) as writer:
        reader = ShmInput(parse_spec(f"shm:{name}"))
        reader.open()
        assert (reader._fd >= 0) == (sys.platform == "linux")
        if through == "mapping":
            reader._fd = -1
        try:
            writer.write(np.full((4, 4, 3), 9, np.uint8))
            # A writer caught mid-frame: its sequence odd. Nothing is read until it is whole again.
            writer.segment.buf[16] = writer.sequence + 1
            assert reader._try_read() is None
            writer.segment.buf[16] = writer.sequence
            assert int(reader._try_read()[0, 0, 0]) == 9
            assert reader._try_read() is None  # the same frame is not read twice
        finally:
            reader.close()


@pytest.mark.parametrize("gap", [False, True])
def test_a_restarted_writers_first_frame_is_read_though_its_sequence_is_the_old_last(monkeypatch, gap: bool) -> None:
    """QA 67 F3: a new writer counts from frame 1 again; its one still frame (sequence 2) was taken for the
    old writer's last (sequence 2) and never read. ``gap``: the reader saw the segment gone in between."""
    monkeypatch.setattr("sdbridge.inputs.shm.REATTACH_S", 0.1)
    name = f"sdb-restart-{uuid.uuid4().hex[:8]}"
    reader = ShmInput(parse_spec(f"shm:{name}"))
    stop = threading.Event()
    old = ShmWriter(name, 8, 8)
    try:
        old.write(np.full((8, 8, 3), 100, np.uint8))
        reader.open()
        assert int(reader.read(stop)[0, 0, 0]) == 100
    finally:
        old.close()
    if gap:
        reader.close()
        with pytest.raises(InputError):
            reader.open()
    with ShmWriter(name, 8, 8) as new:
        new.write(np.full((8, 8, 3), 200, np.uint8))
        if gap:
            reader.open()
        timer = threading.Timer(2.0, stop.set)
        timer.start()
        try:
            image = reader.read(stop)
        finally:
            timer.cancel()
            reader.close()
    assert image is not None and int(image[0, 0, 0]) == 200


def test_a_segment_shorter_than_the_header_says_so() -> None:
    """QA 75 F2: a 20-byte segment under the name failed with struct.error, not the header's sentence."""
    name = f"sdb-small-{uuid.uuid4().hex[:8]}"
    segment = shared_memory.SharedMemory(name=name, create=True, size=20)
    reader = ShmInput(parse_spec(f"shm:{name}"))
    try:
        reader.open()
        with pytest.raises(InputError, match="segment of 20 bytes is shorter than the 32-byte header"):
            reader.read(threading.Event())
    finally:
        reader.close()
        segment.close()
        segment.unlink()


def _put(fd: int, sequence: int, width: int, height: int, value: int) -> None:
    """A writer that resizes its block in place for each frame, through the file (as a C writer's ftruncate
    does): the sequence odd first, then the size, header and pixels, then the sequence even."""
    size = width * height * 3
    os.pwrite(fd, struct.pack("<Q", sequence - 1), 16)
    os.ftruncate(fd, HEADER_SIZE + size)
    os.pwrite(fd, ShmHeader(1, 3, 0, width, height, size, sequence - 1).serialize()[:16], 0)
    os.pwrite(fd, bytes([value]) * size, HEADER_SIZE)
    os.pwrite(fd, struct.pack("<Q", sequence), 16)


# Run in a process of its own: on the old code a read past the block's end was SIGBUS, which kills pytest.
IN_PLACE = textwrap.dedent("""
    import os, sys, threading
    from multiprocessing import resource_tracker, shared_memory
    from sdbridge.inputs.base import InputError, parse_spec
    from sdbridge.inputs.shm import ShmInput
    from tests.unit.inputs.test_shm import _put
    stop = threading.Event()
    block = shared_memory.SharedMemory(name=sys.argv[1], create=True, size=32 + 64 * 64 * 3)
    reader = ShmInput(parse_spec(f"shm:{sys.argv[1]}"))
    try:
        fd = block._fd
        _put(fd, 2, 64, 64, 7)
        reader.open()
        # The reader's attach unregistered the name (a reader must not remove a writer's block); here both are
        # one process, whose block the tracker must still remove.
        resource_tracker.register(block._name, "shared_memory")
        print("big", reader.read(stop).shape, flush=True)
        _put(fd, 4, 8, 8, 9)                       # shrunk for a smaller frame: read on, no reattach
        image = reader.read(stop)
        print("small", image.shape, int(image.min()), int(image.max()), flush=True)
        _put(fd, 6, 100, 80, 11)                   # grown past the size it had when the reader attached
        image = reader.read(stop)
        print("grown", image.shape, int(image.min()), int(image.max()), flush=True)
        os.pwrite(fd, (8).to_bytes(8, "little"), 16)  # a new frame whose header asks more than the block holds
        os.ftruncate(fd, 32 + 100)
        for size in (100 + 32, 16, 0):
            os.ftruncate(fd, size)
            try:
                reader.read(stop)
                print("no error", flush=True)
            except InputError as exc:
                print("error", exc, flush=True)
    finally:
        reader.close()
        block.close()
        block.unlink()
""")


@pytest.mark.skipif(sys.platform != "linux", reason="resizing a block in place: Linux (macOS sizes one only once)")
def test_a_block_resized_in_place_is_read_on_and_never_past_its_end() -> None:
    """QA 75 F1: a writer that shrank its block with ftruncate made the reader touch the mapping past the
    file's end: SIGBUS, the whole daemon gone. Now a smaller or larger frame is read on, and a block too
    short for its header is an InputError (the input is reopened)."""
    name = f"sdb-resize-{uuid.uuid4().hex[:8]}"
    run = subprocess.run([sys.executable, "-c", IN_PLACE, name], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and not run.stderr, (run.returncode, run.stdout, run.stderr)
    assert run.stdout.splitlines() == [
        "big (64, 64, 3)",
        "small (8, 8, 3) 9 9",
        "grown (80, 100, 3) 11 11",
        "error shared memory header says 24000 pixel bytes but the segment has 100",
        "error shared memory segment of 16 bytes is shorter than the 32-byte header",
        "error shared memory segment of 0 bytes is shorter than the 32-byte header",
    ], run.stderr


RACING_READER = textwrap.dedent("""
    import sys, threading, time
    from sdbridge.inputs.base import InputError, parse_spec
    from sdbridge.inputs.shm import ShmInput
    reader, stop = ShmInput(parse_spec(f"shm:{sys.argv[1]}")), threading.Event()
    reader.open()
    print("READY", flush=True)
    frames = bad = errors = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            image = reader._try_read()
        except InputError:
            errors += 1
            continue
        if image is not None:
            frames += 1
            # a whole frame: big ones are all 1, small ones all 2
            expected = 1 if image.shape == (256, 256, 3) else 2 if image.shape == (8, 8, 3) else -1
            bad += not (image == expected).all()
    reader.close()
    print(frames, bad, errors, reader.torn)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="resizing a block in place: Linux (macOS sizes one only once)")
def test_a_block_resized_while_a_frame_is_copied_is_a_skipped_frame_not_a_crash() -> None:
    """QA 75 F1: a writer shrinking its block while the reader copies the frame before: the copy comes back
    short and is skipped as written over, never read past the block's end (SIGBUS on the old code)."""
    name = f"sdb-race-{uuid.uuid4().hex[:8]}"
    block = shared_memory.SharedMemory(name=name, create=True, size=HEADER_SIZE + 256 * 256 * 3)
    try:
        _put(block._fd, 2, 256, 256, 1)
        reader = subprocess.Popen([sys.executable, "-c", RACING_READER, name], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert reader.stdout.readline().strip() == "READY"  # attached: opening is not what is tested here
        sequence = 2
        while reader.poll() is None:  # big and small frames, each resizing the block, as fast as it goes
            sequence += 2
            big = sequence % 4 == 0
            _put(block._fd, sequence, 256 if big else 8, 256 if big else 8, 1 if big else 2)
            time.sleep(0.0003)  # room for whole frames too; the old code faulted within a few hundred
        out, err = reader.communicate(timeout=30)
    finally:
        block.close()
        block.unlink()
    assert reader.returncode == 0, (reader.returncode, err)
    frames, bad, errors, torn = map(int, out.split())
    assert frames > 100 and bad == 0 and errors == 0, (frames, bad, errors, torn)

"""File input: a clip written with cv2.VideoWriter and an image folder, read in order, looping, paced."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from sdbridge.bridge.protocol import PixelFormat
from sdbridge.inputs.base import InputError, create_input, parse_spec
from sdbridge.inputs.hub import input_frame

LEVELS = [10 + 20 * i for i in range(8)]  # each frame one grey level, 20 apart: told apart after MJPEG


def write_clip(path: Path, fps: float = 25.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for level in LEVELS:
        frame = np.full((48, 64, 3), level, np.uint8)
        frame[:, :, 2] = 255 - level  # red (BGR's last) differs from blue: the reader must give RGB
        writer.write(frame)
    writer.release()
    return path


def levels(source, count: int) -> tuple[list[int], float]:
    stop = threading.Event()
    started = time.monotonic()
    out = []
    for _ in range(count):
        image = source.read(stop)
        assert image.shape == (48, 64, 3)
        assert abs(int(image[5, 5, 0]) - (255 - int(image[5, 5, 2]))) <= 6  # R = 255 - B: RGB, not BGR
        out.append(min(LEVELS, key=lambda level: abs(level - int(image[5, 5, 2]))))
    return out, time.monotonic() - started


def test_a_clip_loops_in_order_at_its_own_frame_rate(tmp_path: Path) -> None:
    source = create_input(parse_spec(f"file:{write_clip(tmp_path / 'clip.avi')}"))
    source.check()
    source.open()
    try:
        assert source.fps == pytest.approx(25.0)
        seen, elapsed_s = levels(source, 20)
    finally:
        source.close()
    assert seen == (LEVELS * 3)[:20]  # to the end, then from the start again
    # 19 frame times at 25 fps = 0.76 s; the bound is 10x looser above, and below it never runs early.
    assert 0.7 <= elapsed_s <= 7.6, elapsed_s


def test_fps_in_the_spec_wins_and_loop_false_ends(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi")
    source = create_input(parse_spec(f"file:{clip}?fps=100&loop=false"))
    source.open()
    try:
        seen, elapsed_s = levels(source, len(LEVELS))
        assert seen == LEVELS and elapsed_s <= 0.07 * 10
        assert source.read(threading.Event()) is None  # the end, no loop
    finally:
        source.close()


def test_an_image_folder_plays_in_name_order_losslessly(tmp_path: Path) -> None:
    images = [np.random.default_rng(i).integers(0, 255, (20, 30, 3), np.uint8) for i in range(3)]
    for i, image in enumerate(images):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (tmp_path / "notes.txt").write_text("not an image")
    source = create_input(parse_spec(f"file:{tmp_path}?fps=200"))
    source.check()
    source.open()
    stop = threading.Event()
    got = [source.read(stop).copy() for _ in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(got, images + images[:1]))


@pytest.mark.parametrize("name", ["%03d.png", "000.png"])
def test_an_image_sequence_or_a_still_plays_at_the_default_rate(tmp_path: Path, name: str) -> None:
    """FFmpeg's image reader says 25 fps for images, which state no rate: they played at 25 where a folder plays at
    30, the documented rate of a file that states none (QA 67 F7)."""
    from sdbridge.inputs.file import DEFAULT_FPS

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    source = create_input(parse_spec(f"file:{tmp_path / name}"))
    source.check()
    source.open()
    try:
        assert source.fps == DEFAULT_FPS == 30
    finally:
        source.close()


def test_a_file_that_is_no_video_fails_at_open_with_its_name(tmp_path: Path) -> None:
    bogus = tmp_path / "clip.mp4"
    bogus.write_bytes(b"not a video at all" * 100)
    source = create_input(parse_spec(f"file:{bogus}"))
    source.check()  # it exists: the set-up check passes, opening says what is wrong
    with pytest.raises(InputError, match="clip.mp4"):
        source.open()
        source.read(threading.Event())


def test_a_missing_file_is_told_with_the_argument_as_typed(tmp_path: Path) -> None:
    typed = f"file:{tmp_path}/gone.mp4@live?loop=FALSE"   # options after the session: normalised by the parse
    source = create_input(parse_spec(typed))
    with pytest.raises(InputError) as error:
        source.check()
    assert str(error.value).startswith(f"input {typed!r}: ") and "does not exist" in str(error.value)


def test_a_looping_clip_tells_its_open_once_not_at_every_loop(tmp_path: Path, caplog) -> None:
    """QA 67 F2: a short clip or a still logged an INFO line per loop (35 lines a second)."""
    source = create_input(parse_spec(f"file:{write_clip(tmp_path / 'clip.avi')}?fps=1000"))
    caplog.set_level("DEBUG", logger="sdbridge.inputs.file")
    source.open()
    try:
        stop = threading.Event()
        for _ in range(3 * len(LEVELS) + 1):  # three loops
            assert source.read(stop) is not None
    finally:
        source.close()
    told = [r for r in caplog.records if r.name == "sdbridge.inputs.file"]
    assert [r.levelname for r in told] == ["INFO", "DEBUG", "DEBUG", "DEBUG"]


def test_an_unreadable_image_in_a_folder_is_skipped_and_told_once_by_name(tmp_path: Path, caplog) -> None:
    """QA 67 F6: one bad image froze a folder input 5 s per loop and the images after it never played."""
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((8, 8, 3), 10 * i, np.uint8))
    (tmp_path / "002.png").write_bytes(b"")  # still being copied: OpenCV raises cv2.error
    (tmp_path / "004.png").write_text("no image")  # imdecode gives None
    source = create_input(parse_spec(f"file:{tmp_path}?fps=1000"))
    source.open()
    stop = threading.Event()
    seen = [int(source.read(stop)[0, 0, 0]) // 10 for _ in range(9)]
    assert seen == [0, 1, 3, 5, 0, 1, 3, 5, 0]
    told = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(told) == 2 and "002.png" in told[0] and "004.png" in told[1]
    for i in (0, 1, 3, 5):
        (tmp_path / f"{i:03d}.png").write_bytes(b"")
    with pytest.raises(InputError, match="no image in folder"):
        for _ in range(5):
            source.read(stop)


def test_an_image_over_8192_a_side_is_scaled_down_to_fit_and_told_once(tmp_path: Path, caplog) -> None:
    """QA 75 F3: an image too large for a v1 frame failed the input at the hub: 5 s frozen, the folder
    restarted at its first image, the images after it never played."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((8, 8, 3), 10, np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.full((90, 9000, 3), 100, np.uint8))
    cv2.imwrite(str(tmp_path / "c.png"), np.full((8, 8, 3), 200, np.uint8))
    source = create_input(parse_spec(f"file:{tmp_path}?fps=1000"))
    source.open()
    stop = threading.Event()
    seen = []
    for frame_id in range(1, 7):
        image = source.read(stop)
        input_frame(image, frame_id, 0, PixelFormat.JPEG)  # what the hub does with it: must not raise
        seen.append((image.shape, int(image[0, 0, 0])))
    big = ((82, 8192, 3), 100)  # 9000x90 to 8192 wide: 81.92 high, its shape kept
    assert seen == [((8, 8, 3), 10), big, ((8, 8, 3), 200)] * 2
    told = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(told) == 1 and "b.png is 9000x90" in told[0] and "8192x82" in told[0], told


def test_a_clip_over_8192_wide_is_scaled_down_to_fit(tmp_path: Path) -> None:
    """QA 75 F3, a clip's frames: every one failed at the hub, the input restarted every 5 s."""
    path = tmp_path / "wide.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (9000, 16))
    assert writer.isOpened()
    for level in (50, 150):
        writer.write(np.full((16, 9000, 3), level, np.uint8))
    writer.release()
    source = create_input(parse_spec(f"file:{path}?fps=1000"))
    source.open()
    stop = threading.Event()
    images = [source.read(stop) for _ in range(3)]
    for frame_id, image in enumerate(images, 1):
        input_frame(image, frame_id, 0, PixelFormat.JPEG)  # what the hub does with it: must not raise
    assert [image.shape for image in images] == [(15, 8192, 3)] * 3  # 16 * 8192 / 9000 = 14.56
    assert [min((50, 150), key=lambda v: abs(v - int(image[5, 5, 0]))) for image in images] == [50, 150, 50]

"""benchmarks/bench_webrtc.py's frame-number stamp: it reads back what it wrote, through a real aiortc VP8 (and
H.264) encode and decode, and refuses what it did not write."""

from __future__ import annotations

import fractions
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the stamp's codec round trip needs aiortc (pip install \"sdbridge[webrtc]\")")

import av  # noqa: E402
from aiortc.codecs.h264 import H264Decoder, H264Encoder, h264_depayload  # noqa: E402
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder, vp8_depayload  # noqa: E402
from aiortc.jitterbuffer import JitterFrame  # noqa: E402

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_webrtc.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_webrtc", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_webrtc"] = module  # its dataclass looks its module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_webrtc", None)


@pytest.mark.parametrize("codec", ["VP8", "H264"])
@pytest.mark.parametrize("size", [256, 512])
def test_numbers_survive_a_real_aiortc_encode_and_decode(bench, codec, size) -> None:
    encoder, decoder, depayload = ((Vp8Encoder(), Vp8Decoder(), vp8_depayload) if codec == "VP8"
                                   else (H264Encoder(), H264Decoder(), h264_depayload))
    camera = bench.Camera(size)
    # A keyframe, inter frames, and numbers whose bits differ from their neighbours' in many cells.
    numbers = [0, 1, 2, 3, 255, 256, 4095, 4096, 12345, 65534]
    read = []
    for index, number in enumerate(numbers):
        frame = av.VideoFrame.from_ndarray(camera.frame(number), format="rgb24")
        frame.pts, frame.time_base = index * 3000, fractions.Fraction(1, 90_000)
        payloads, timestamp = encoder.encode(frame)
        data = b"".join(depayload(payload) for payload in payloads)
        [decoded] = decoder.decode(JitterFrame(data, timestamp))
        image = decoded.to_ndarray(format="rgb24")
        assert image.shape == (size, size, 3)
        read.append(bench.read_stamp(image))
    assert read == numbers


def test_what_was_not_stamped_does_not_read(bench) -> None:
    image = bench.Camera(256).frame(0)
    for level in (0, 255, 128):  # all black or all white fails the check bits; grey is ambiguous
        image[:] = level
        assert bench.read_stamp(image) is None
    bench.stamp(image, 777)
    assert bench.read_stamp(image) == 777
    cell = image[:256 // 8, :256 // 10]
    cell[:] = 255 - cell  # one bit flipped: the check bits no longer agree
    assert bench.read_stamp(image) is None
    image = bench.Camera(256).frame(70000)  # numbers wrap at 2**16
    assert bench.read_stamp(image) == 70000 % 65536


def test_the_camera_moves_under_the_stamp(bench) -> None:
    camera = bench.Camera(256)
    first, second = camera.frame(5), camera.frame(6)
    assert not np.array_equal(first[128:], second[128:])  # the texture pans: the encoder has work each frame
    assert (bench.read_stamp(first), bench.read_stamp(second)) == (5, 6)

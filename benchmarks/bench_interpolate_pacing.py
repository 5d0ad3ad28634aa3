"""How evenly an interpolating output sends its frames: one output thread, real flow and in-betweens.

An engine frame is offered every 1/fps seconds (a textured square moving across a gradient); the output,
at ``--factor`` (2x by default), sends the in-betweens and the engine frames to a sink that notes when each
came. Printed per frame size: frames sent, and the gaps between sends (median, p10, p90, standard
deviation) against the even step, period / factor. An even pacer's gaps sit at the step; one whose
in-betweens go out late by their own making shows short and long gaps around it (QA 67 F11).

    python benchmarks/bench_interpolate_pacing.py [--sizes 256 384 512] [--fps 30] [--factor 2] [--seconds 2]

CPU only; the flow and the in-betweens cost more than a period at 512² on 2 cores, where no pacing can be even.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from sdbridge.outputs.base import parse_spec
from sdbridge.outputs.hub import OutputThread


class _Sink:
    def __init__(self) -> None:
        self.times: list[float] = []

    def open(self, width: int, height: int, fps: float) -> None:
        pass

    def send(self, frame: np.ndarray) -> None:
        self.times.append(time.monotonic())

    def close(self) -> None:
        pass


def scene(left: int, size: int) -> np.ndarray:
    """A textured square at x = ``left`` over a colour gradient, as tests/unit/outputs/test_interpolate.py draws."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 60)], axis=-1).astype(np.uint8)
    square = size // 4
    top = size // 3
    texture = np.random.default_rng(1).integers(0, 256, (square, square, 3), dtype=np.uint8)
    image[top:top + square, left:left + square] = texture
    return image


def measure(size: int, fps: float, factor: int, seconds: float) -> dict[str, float]:
    sink = _Sink()
    thread = OutputThread(parse_spec(f"record:/tmp/unused?interpolate={factor}x"), sink, fps, lambda event: None)
    thread.start()
    count = int(seconds * fps)
    frames = [scene(size // 8 + (i % 20) * max(1, size // 128), size) for i in range(count)]
    start = time.monotonic()
    try:
        for index, frame in enumerate(frames):
            while time.monotonic() < start + index / fps:
                time.sleep(0.0005)
            thread.offer(frame, "s")
        time.sleep(3 / fps)
    finally:
        thread.stop()
        thread.join(5)
    gaps = np.diff(sink.times[factor * 4:]) * 1000  # after the first frames, whose costs are not measured yet
    return {"size": size, "sent": len(sink.times), "offered": count, "step_ms": round(1000 / fps / factor, 2),
            "median_ms": round(float(np.median(gaps)), 2), "p10_ms": round(float(np.percentile(gaps, 10)), 2),
            "p90_ms": round(float(np.percentile(gaps, 90)), 2), "std_ms": round(float(gaps.std()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--factor", type=int, default=2, choices=[2, 3, 4])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = [measure(size, args.fps, args.factor, args.seconds) for size in args.sizes]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.factor}x at {args.fps:g} fps, {args.seconds:g} s per size")
    print("| size | sent / offered | step ms | median ms | p10 ms | p90 ms | std ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['size']}² | {row['sent']} / {row['offered']} | {row['step_ms']} | {row['median_ms']} | "
              f"{row['p10_ms']} | {row['p90_ms']} | {row['std_ms']} |")


if __name__ == "__main__":
    main()

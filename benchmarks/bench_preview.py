"""Preview engine effects at 512×512 on this machine's CPU: frames/s per effect.

    python benchmarks/bench_preview.py [--size 512] [--frames 100]

The target is ≥ 30 frames/s for every effect on 2 cores, with OpenCV's default thread count
(the daemon's codec threads share the cores; the figure is per frame, one frame at a time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from sdbridge.engines.preview import EFFECTS, PreviewEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:args.size, 0:args.size]
    image = np.stack([x % 256, y % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 2) + rng.integers(0, 16, image.shape, dtype=np.uint8)
    engine = PreviewEngine()
    print(f"| effect ({args.size}×{args.size}, strength 0.8) | frames/s | ms/frame (median) |")
    print("|---|---|---|")
    for name in EFFECTS:
        engine.prepare({"width": args.size, "height": args.size, "effect": name, "strength": 0.8})
        for _ in range(5):
            engine.apply(image)
        times = []
        for _ in range(args.frames):
            started = time.perf_counter()
            engine.apply(image)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(f"| {name} | {1 / median:.0f} | {median * 1000:.2f} |")


if __name__ == "__main__":
    main()

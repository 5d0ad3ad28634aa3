"""Preview engine effects on this machine's CPU: frames/s per effect, through ``PreviewEngine.step``.

    .venv/bin/python benchmarks/bench_preview.py [--size 512] [--frames 100] [--runs 5] [--threads N]

Prints a markdown table: the median over ``--runs`` runs of each run's median frame time. The target
is >= 30 frames/s for every effect at 512×512 on 2 cores. ``--threads`` calls cv2.setNumThreads
first; without it OpenCV's default is kept (what the daemon uses: the setting is process-wide and
the daemon's codec threads share the cores). CPU figures vary 30-50 % from run to run on shared
machines: compare numbers from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch

from sdbridge.engines.base import StreamState
from sdbridge.engines.preview import EFFECTS, PreviewEngine


def webcam_like(size: int) -> np.ndarray:
    """Smooth shapes, edges and a little sensor noise: filters do real work on it, unlike flat colour."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, (x * y) % 256], axis=-1).astype(np.uint8)
    for _ in range(12):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(image, centre, int(rng.integers(size // 20, size // 5)), colour, -1)
    image = cv2.GaussianBlur(image, (0, 0), 2)
    return cv2.add(image, rng.integers(0, 12, image.shape, dtype=np.uint8))


def time_step(engine: PreviewEngine, frames: torch.Tensor | None, states: list[StreamState], count: int) -> float:
    """The median seconds of one ``step``, after a warm-up that is not timed."""
    for _ in range(5):
        engine.step(frames, states)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        engine.step(frames, states)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=100, help="timed frames per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=None, help="cv2.setNumThreads (default: OpenCV's own)")
    args = parser.parse_args()
    if args.threads is not None:
        cv2.setNumThreads(args.threads)
    frames = torch.from_numpy(webcam_like(args.size)[None])  # [1, H, W, 3] uint8
    states = [StreamState("bench")]
    engine = PreviewEngine()
    rows = [(name, frames) for name in EFFECTS] + [("txt2img pattern", None)]
    print(f"{args.size}×{args.size}, batch 1, strength {args.strength}, cv2 threads {cv2.getNumThreads()}, "
          f"median of {args.runs} runs × {args.frames} frames\n")
    print("| effect | frames/s | ms/frame |")
    print("|---|---|---|")
    for name, batch in rows:
        effect = name if name in EFFECTS else "cartoon"
        engine.prepare({"width": args.size, "height": args.size, "effect": effect, "strength": args.strength})
        median = statistics.median(time_step(engine, batch, states, args.frames) for _ in range(args.runs))
        print(f"| {name} | {1 / median:.0f} | {median * 1000:.2f} |")


if __name__ == "__main__":
    main()

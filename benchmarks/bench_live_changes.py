"""What a parameter moved live costs a frame: the compiled engine's stream batch under an LFO, against the same
stream with nothing moving, timed side by side on one engine (issue 4; docs/speed.md).

    python benchmarks/bench_live_changes.py --device cuda [--json out.json] [--write]
    python benchmarks/bench_live_changes.py --tiny      # CPU: the tiny random model, seconds

Under an LFO the worker prepares the engine again before every frame. Each row runs its own session on the
same engine (the same graphs) and prepares before every call as the worker does, with the value given:

- steady: the same parameters every frame;
- strength LFO: strength swept across values that select the same timesteps (8 steps × 0.5 to 0.62: 4 steps,
  as diffusers' img2img takes ``int(steps × strength)``);
- strength LFO across step counts: strength 0.5, 0.5, 0.25, 0.25, ... (4 steps, then 2: one more set of graphs,
  for 2 rows, compiled in the warm-up), a crossing every other frame. Its calls average 3 rows where the steady
  row's have 4, so with nothing else to pay it runs faster than steady; the cost to look at is its worst frames
  (p99, max). Until 2026-11-29 each crossing refilled the stream: N - 1 more UNet calls inside its frame;
- a new seed every 8 frames (a beat at 240 BPM and 30 frames/s): until 2026-11-29 a refill each time too;
- guidance LFO: guidance swept from 2 to 3;
- ControlNet scale LFO (``--controlnet``): slot 1 on, its scale swept, and the steady row with it on.

The ratio of each row's frames/s to the steady row's is the cost of that change: 1.00 is nothing. Before
2026-11-29 an LFO on strength refilled each stream on every frame (N - 1 extra UNet calls a frame), and on
CUDA a new guidance value or scale was a host-to-device copy that waited for the work queued before it.
The rows are timed interleaved, in rounds, so that a load spike lands on every row alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_daemon import commit  # noqa: E402
from bench_engine import build_parts, device_label, engine_params, summarise, sync  # noqa: E402

STEPS, STRENGTH = 8, 0.5  # 4 denoising steps: a stream batch of 4 rows
STRENGTHS = (0.5, 0.53, 0.56, 0.59, 0.62)  # every one of them int(8 × s) = 4
CROSSING = (0.5, 0.5, 0.25, 0.25)  # 4 steps, then 2: a crossing every other frame


class LiveRow:
    """One session on the shared engine, prepared before each call with ``values(k)`` for call k."""

    frames_per_call = 1  # bench_engine.summarise's row

    def __init__(self, name: str, engine: Any, values: Any, inputs: list[np.ndarray]) -> None:
        from sdbridge.engines.base import StreamState

        self.name, self.engine, self.values, self.inputs = name, engine, values, inputs
        self.state = StreamState(name)
        self.calls = 0
        self.times: list[float] = []
        self.seconds = 0.0

    def run(self) -> None:
        image = self.inputs[self.calls % len(self.inputs)]
        with torch.inference_mode():
            self.engine.prepare(self.values(self.calls))
            if self.engine.controlnets is not None:  # the slots' condition images (the worker's CPU pool does this)
                self.engine.controlnets.condition(self.state.data, image)
            self.engine.step(torch.from_numpy(image[None]), [self.state]).cpu()  # the worker's one wait
        self.calls += 1

    def timed(self, calls: int, device: torch.device) -> None:
        started = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            self.run()
            sync(device)
            self.times.append((time.perf_counter() - t0) * 1000)
        self.seconds += time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (CPU)")
    parser.add_argument("--size", type=int, default=None, help="frame size (default 512; 64 with --tiny)")
    parser.add_argument("--calls", type=int, default=60, help="timed calls per row, over all rounds")
    parser.add_argument("--warmup", type=int, default=6, help="untimed calls per row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile-backend", default=None,
                        help="inductor (default on CUDA), aot_eager, or none (default on CPU: the data path eagerly)")
    parser.add_argument("--controlnet", action="store_true", help="slot 1 on (a random ControlNet), its scale swept")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    from sdbridge.engines.compiled import CompiledEngine, configure_compile_cache

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "none")
    backend = None if backend == "none" else backend
    size = args.size or (64 if args.tiny else 512)
    parts = build_parts(args.tiny, device, dtype)
    engine = CompiledEngine.from_parts(parts)
    engine.compile_backend = backend
    engine.compile = backend is not None
    if backend is not None:
        configure_compile_cache()
    base = {**engine_params(size, STEPS, STRENGTH), "guidance": 2.0}
    if args.controlnet:
        from sdbridge.engines.tiny import random_controlnet

        engine.prepare(base)  # makes the slots
        engine.controlnets.models["bench"] = random_controlnet(parts.unet, seed=1).to(device, dtype)
        base.update(controlnet_1_model="bench", controlnet_1_scale=0.8)
    engine.prepare(base)
    assert engine._schedule is not None and engine._schedule.steps == 4, "8 steps at strength 0.5: 4 rows"

    def lfo(k: int, low: float, high: float) -> float:
        return low + (high - low) * (0.5 + 0.5 * math.sin(k * 0.7))

    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    rows = [("steady", lambda k: base),
            ("strength LFO (one step count)", lambda k: {**base, "strength": STRENGTHS[k % len(STRENGTHS)]}),
            ("strength LFO across step counts", lambda k: {**base, "strength": CROSSING[k % len(CROSSING)]}),
            ("a new seed every 8 frames", lambda k: {**base, "seed": 1000 + k // 8}),
            ("guidance LFO", lambda k: {**base, "guidance": lfo(k, 2.0, 3.0)})]
    if args.controlnet:
        rows.append(("ControlNet scale LFO", lambda k: {**base, "controlnet_1_scale": lfo(k, 0.5, 1.2)}))
    live = [LiveRow(name, engine, values, inputs) for name, values in rows]
    started = time.perf_counter()
    for row in live:  # the first frames run uncompiled while their graphs compile in the background
        for _ in range(args.warmup):
            row.run()
    engine.wait_compiled()
    for row in live:
        for _ in range(3):
            row.run()
    sync(device)
    warm_s = time.perf_counter() - started
    per_round = max(1, args.calls // args.rounds)
    for _ in range(args.rounds):
        for row in live:
            row.timed(per_round, device)

    results = []
    for row in live:
        results.append({"name": row.name, **summarise(row, row.times, row.seconds, len(row.times), device),
                        "ms_max": max(row.times)})
    steady = results[0]["fps"]
    for result in results:
        result["vs_steady"] = result["fps"] / steady
    label = device_label(device)
    lines = [f"### bench_live_changes.py — {datetime.date.today()}, commit {commit()}, {label}, "
             f"torch {torch.__version__}",
             f"{'tiny random model' if args.tiny else 'sd-turbo architecture, random weights'}, {size}×{size}, "
             f"{str(dtype).replace('torch.', '')}, {STEPS} steps × strength {STRENGTH} (a stream batch of 4), "
             f"guidance 2{' + ControlNet slot 1' if args.controlnet else ''}, compile backend {backend}; "
             f"{per_round * args.rounds} timed frames per row in {args.rounds} interleaved rounds after "
             f"{warm_s:.1f} s of warm-up; a prepare before every frame, as under an LFO", "",
             "| row | frames/s | p50 ms | p99 ms | max ms | vs steady |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['fps']:.1f} | {r['ms_p50']:.2f} | {r['ms_p99']:.2f} | {r['ms_max']:.2f} "
              f"| {r['vs_steady']:.2f}× |" for r in results]
    table = "\n".join(lines) + "\n"
    print(table)
    report = {"benchmark": "bench_live_changes", "date": str(datetime.date.today()), "commit": commit(),
              "device": label, "size": size, "dtype": str(dtype), "compile_backend": backend,
              "controlnet": args.controlnet, "warm_s": warm_s, "rows": results}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as out:
            out.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

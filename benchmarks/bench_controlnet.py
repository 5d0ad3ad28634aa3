"""What ControlNet slots add to a live frame (issue 7): ms per frame with 0, 1 and 2 slots.

    python benchmarks/bench_controlnet.py --tiny                 # CPU: the test suite's tiny model
    python benchmarks/bench_controlnet.py --device cuda [--size 512] [--dtype fp16]

Random weights built in code (bench_engine.build_parts: sd-turbo's architecture, or the tiny model),
ControlNets made from its UNet (``ControlNetModel.from_unet``, the real architecture of a ControlNet
for that family) with random weights. Each row times ``DiffusionEngine.step`` on one session, frame
on the device -> frame on the device, with a device sync after each frame (benchmarks may sync),
median over ``--frames`` after a warm-up; the preprocessing (the decode pool's share, on the CPU)
is timed on its own. A slot at scale 0 must cost nothing: its row is checked to give the same
bytes as the row without ControlNet.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import build_parts, commit, engine_params, sync  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (CPU smoke check)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--size", type=int, default=None, help="frame side (default 64 tiny, 512 full)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=10, help="timed frames per row and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from sdbridge.engines.base import StreamState
    from sdbridge.engines.diffusion import DiffusionEngine
    from sdbridge.engines.tiny import random_controlnet

    device = torch.device(args.device)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    size = args.size or (64 if args.tiny else 512)
    parts = build_parts(args.tiny, device, dtype)
    engine = DiffusionEngine.from_parts(parts)
    folder = Path(tempfile.mkdtemp(prefix="sdbridge-bench-controlnet-"))
    for seed, name in ((1, "a"), (2, "b")):  # through the real loader
        random_controlnet(parts.unet, seed, std=0.02).save_pretrained(folder / name, safe_serialization=True)
    engine.controlnet_dir = str(folder)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    frames = torch.from_numpy(image[None]).to(device)
    rows = {
        "no ControlNet": {},
        "1 slot at scale 0": {"controlnet_1_model": "a", "controlnet_1_scale": 0.0},
        "1 slot, input frame as is": {"controlnet_1_model": "a"},
        "1 slot, canny": {"controlnet_1_model": "a", "controlnet_1_preprocessor": "canny"},
        "1 slot, half the steps (end 0.5)": {"controlnet_1_model": "a", "controlnet_1_end": 0.5},
        "2 slots": {"controlnet_1_model": "a", "controlnet_2_model": "b"},
    }
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"### bench_controlnet.py — {datetime.date.today()}, commit {commit()}, {platform.machine()}{load}, "
          f"{device.type}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"{'tiny random model' if args.tiny else 'sd-turbo architecture, random weights'}, {size}×{size}, "
          f"{args.steps} steps, {args.dtype}; rows interleaved, {args.rounds} rounds × {args.frames} frames, "
          f"median\n")
    times: dict[str, list[float]] = {name: [] for name in rows}
    prep: dict[str, list[float]] = {name: [] for name in rows}
    outputs: dict[str, torch.Tensor] = {}
    state = StreamState("bench")
    # Round 0 warms up untimed. A row without a model frees the ControlNets (nothing names them), so each
    # round loads them again, untimed: the stream's own behaviour, not hidden.
    for round_no in range(args.rounds + 1):
        for name, extra in rows.items():
            engine.prepare({**engine_params(size, args.steps, 0.8), **extra})
            engine.controlnets.wait()
            with torch.inference_mode():
                # One untimed frame each time a row starts: the first after a load pays for allocations.
                for frame_no in range(args.frames + 1 if round_no else 2):
                    started = time.perf_counter()
                    engine.controlnets.condition(state.data, image)
                    prepared = time.perf_counter()
                    out = engine.step(frames, [state])
                    sync(device)
                    if round_no and frame_no:
                        times[name].append(time.perf_counter() - prepared)
                        prep[name].append(prepared - started)
            outputs[name] = out.cpu()
    assert torch.equal(outputs["1 slot at scale 0"], outputs["no ControlNet"]), "a slot at scale 0 changed the frame"
    assert not torch.equal(outputs["1 slot, input frame as is"], outputs["no ControlNet"]), "the slot did nothing"
    baseline = statistics.median(times["no ControlNet"]) * 1000
    print("| slots | ms/frame (engine step) | added vs none | preprocessing ms (CPU pool) |")
    print("|---|---|---|---|")
    for name in rows:
        median = statistics.median(times[name]) * 1000
        print(f"| {name} | {median:.2f} | {median - baseline:+.2f} ms ({median / baseline:.2f}×) | "
              f"{statistics.median(prep[name]) * 1000:.2f} |")

if __name__ == "__main__":
    main()

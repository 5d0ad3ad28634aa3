"""What AnimateDiff's rolling window adds to a live frame (issue 7): ms per frame, plain vs windows.

    python benchmarks/bench_animatediff.py --tiny                  # CPU smoke: the test suite's tiny model
    python benchmarks/bench_animatediff.py --device cuda           # SD 1.5-size UNet + v1.5-size MotionAdapter

No network, no weights on disk: random weights built in code. Full size is SD 1.5's UNet (the
shipped sd15 config), TAESD as the autoencoder (the engines' fast path), a CLIP ViT-L-size text
encoder, and a MotionAdapter with the v1.5 (v2/v3) configuration (diffusers' defaults: 4 blocks,
2 layers, 8 heads, 32 positions, a mid block): the compute of the real models. Tiny is
engines/tiny.py's model and a MotionAdapter that fits it.

Each row times ``engine.step`` for its own session, uint8 frame on the device in and out, all rows in
one run, taking turns frame by frame: the plain diffusion engine and the animatediff engine at each
``--windows`` size (``--overlap``
does not change the work: every window frame is denoised either way), then the same with one
ControlNet slot on (a random ControlNet of the model's family, ``ControlNetModel.from_unet``, written
to a temporary folder and loaded as a slot loads it; the condition is the input frame; ``--no-controlnet``
leaves these rows out). A device sync after each frame (benchmarks may sync); the median over
``--frames`` after ``--warmup`` frames, which also fill the window. The added ms is the row's median
minus the plain engine's; a ControlNet row's "ControlNet ms" is its median minus the same row's
without the slot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_daemon import commit  # noqa: E402
from sdbridge.engines.animatediff import AnimateDiffEngine  # noqa: E402
from sdbridge.engines.base import StreamState  # noqa: E402
from sdbridge.engines.diffusion import DiffusionEngine  # noqa: E402
from sdbridge.params import Schema  # noqa: E402

PROMPT = "a watercolor painting of a fox running through snow"


def build_parts(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """PipelineParts with random weights: SD 1.5's architecture (trailing timesteps, as few-step
    motion models are run), or the tiny test model."""
    from diffusers import EulerDiscreteScheduler

    from sdbridge.engines.random_model import random_parts

    parts = random_parts("tiny" if tiny else "sd15", device, dtype)
    if not tiny:
        parts.scheduler = EulerDiscreteScheduler.from_config(parts.scheduler.config, timestep_spacing="trailing")
    return parts


def build_adapter(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import MotionAdapter

    torch.manual_seed(1)
    with torch.device(device):
        if tiny:
            adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                    motion_num_attention_heads=2, motion_norm_num_groups=32, motion_max_seq_length=32)
        else:
            adapter = MotionAdapter()   # v1.5 v2/v3: (320, 640, 1280, 1280), 2 layers, 8 heads, 32 positions
    return adapter.to(device, dtype).eval().requires_grad_(False)


def write_controlnet(parts: Any, dtype: torch.dtype) -> Path:
    """A random ControlNet for the model's UNet in a temporary ControlNet folder, as ``<folder>/random``."""
    import tempfile

    from sdbridge.engines.tiny import random_controlnet

    folder = Path(tempfile.mkdtemp(prefix="sdbridge-bench-controlnet-"))
    random_controlnet(parts.unet, seed=1).to(dtype).save_pretrained(folder / "random", safe_serialization=True)
    return folder


def with_controlnet(engine: Any, folder: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Slot 1 on ``random`` from ``folder`` (loaded now, off the timings); the row's values."""
    engine.controlnet_dir = str(folder)
    values = {**values, "controlnet_1_model": "random", "controlnet_1_scale": 1.0, "controlnet_1_channel": 0}
    engine.prepare(values)
    engine.controlnets.wait(timeout_s=600)
    assert engine.controlnets.serving[0] == "random", engine.controlnets.describe()
    return values


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: list[tuple[str, Any, dict[str, Any]]], frames: torch.Tensor, warmup: int, count: int,
              device: torch.device) -> dict[str, list[float]]:
    """ms of each frame per row, the rows taking turns frame by frame (a load that drifts during the run,
    as on shared machines, then weighs on every row alike); each row keeps its own session."""
    states = {name: StreamState(name) for name, _, _ in rows}
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    images = frames.cpu().numpy()    # the ControlNet condition comes from the CPU pool in the daemon
    for index in range(warmup + count):
        frame = frames[index % len(frames)][None]
        for name, engine, values in rows:
            engine.prepare(values)     # between frames, untimed; cheap (cached prompt)
            if engine.controlnets is not None:   # the worker's CPU-pool step: this frame's condition images
                engine.controlnets.condition(states[name].data, images[index % len(frames)])
            sync(device)
            started = time.perf_counter()
            engine.step(frame, [states[name]])
            sync(device)
            if index >= warmup:
                times[name].append((time.perf_counter() - started) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (CPU smoke check)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16"), help="default fp16 on CUDA, else fp32")
    parser.add_argument("--size", type=int, default=None, help="frame side (default 64 tiny, 512 full)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--strength", type=float, default=1.0, help="1.0: every step runs")
    parser.add_argument("--windows", default="4,8,16")
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--no-controlnet", action="store_true", help="leave out the rows with one ControlNet slot")
    parser.add_argument("--frames", type=int, default=20, help="timed frames per row")
    parser.add_argument("--warmup", type=int, default=None, help="untimed frames per row (default: largest window)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on the CPU: shared "
                        "machines thrash with more)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    size = args.size or (64 if args.tiny else 512)
    windows = [int(item) for item in args.windows.split(",")]
    warmup = args.warmup if args.warmup is not None else max(windows)

    built = time.perf_counter()
    parts = build_parts(args.tiny, device, dtype)
    adapter = build_adapter(args.tiny, device, dtype)
    built_s = time.perf_counter() - built
    values = Schema().defaults()
    values.update(width=size, height=size, steps=args.steps, strength=args.strength, guidance=1.0, seed=7,
                  prompt=PROMPT, motion_adapter="random", motion_overlap=args.overlap)
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)).to(device)

    plain = DiffusionEngine.from_parts(parts)
    motion = AnimateDiffEngine.from_parts(parts)
    motion.attach_motion("random", adapter)
    configs = [("diffusion (no motion)", plain, values)]
    configs += [(f"animatediff window {window}", motion, {**values, "motion_window": window}) for window in windows]
    if not args.no_controlnet:   # engines of their own: a slot's model stays loaded only while a slot names it
        folder = write_controlnet(parts, dtype)
        plain_cn = DiffusionEngine.from_parts(parts)
        motion_cn = AnimateDiffEngine.from_parts(parts)
        motion_cn.attach_motion("random", adapter)
        configs += [(f"{name} + ControlNet", engine, with_controlnet(engine, folder, config))
                    for name, engine, config in [(configs[0][0], plain_cn, values), *[
                        (f"animatediff window {window}", motion_cn, {**values, "motion_window": window})
                        for window in windows]]]
    times = time_rows(configs, frames, warmup, args.frames, device)
    rows: list[dict[str, Any]] = [{"row": name, "ms": statistics.median(times[name]),
                                   "p90_ms": float(np.percentile(times[name], 90))} for name, _, _ in configs]
    base = rows[0]["ms"]
    by_name = {row["row"]: row["ms"] for row in rows}
    for row in rows:
        row["fps"] = 1000.0 / row["ms"]
        row["added_ms"] = row["ms"] - base
        row["ratio"] = row["ms"] / base
        controlled = row["row"].endswith(" + ControlNet")
        without = by_name.get(row["row"].removesuffix(" + ControlNet")) if controlled else None
        row["controlnet_ms"] = row["ms"] - without if without is not None else None

    kind = "tiny random model" if args.tiny else "SD 1.5-size UNet + MotionAdapter v1.5-size, random weights"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"### bench_animatediff.py — {datetime.date.today()}, commit {commit()}, {name}{threads}")
    print(f"{kind}; {size}×{size}, {str(dtype).replace('torch.', '')}, {args.steps} steps at strength "
          f"{args.strength}, TAESD; overlap {args.overlap}; median of {args.frames} frames after {warmup} "
          f"(models built in {built_s:.1f} s)\n")
    print("| engine | ms/frame (median) | p90 ms | frames/s | added ms/frame | × plain | ControlNet ms/frame |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        controlnet = f"{row['controlnet_ms']:+.1f}" if row["controlnet_ms"] is not None else ""
        print(f"| {row['row']} | {row['ms']:.1f} | {row['p90_ms']:.1f} | {row['fps']:.1f} | "
              f"{row['added_ms']:+.1f} | {row['ratio']:.2f} | {controlnet} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "size": size, "dtype": str(dtype), "steps": args.steps,
                                               "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

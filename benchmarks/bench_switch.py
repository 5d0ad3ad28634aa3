"""Live changes against a compiled engine: the longest frame, with compiles in the frame or off it (issues 4, 7).

    python benchmarks/bench_switch.py                     # CPU: tiny random model, aot_eager graphs
    python benchmarks/bench_switch.py --device cuda       # GPU: sd-turbo's architecture, Inductor + CUDA graphs
    python benchmarks/bench_switch.py ... --json out.json --write

A performer changes things mid-show: the output size, a second camera joining (two sessions), a
ControlNet turned on, then swapped for one of another architecture. Each change needs graphs the
compiled engine has not built. This runs the same stream of changes twice on the same weights, one
engine after the other:

- ``inline``: ``background_compile = False``: the frame that meets the change compiles its graphs
  (what torch.compile does by itself);
- ``background``: the default: that frame runs uncompiled while the graphs compile in a thread
  (a new ControlNet architecture compiles on its loader's thread before it serves).

For each change it reports the longest frame after it and the steady frame time before it, so the
"freeze" is a ratio measured side by side. Inductor's caches are off for the run (both modes compile
from nothing). The weights are random (no network); the compute is the real architecture's.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                       # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_daemon import commit, publish  # noqa: E402

CHANGES = ("resolution", "second session", "controlnet on", "controlnet of another architecture")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def controlnets(parts: Any, folder: Path) -> None:
    """Two random ControlNets of the UNet's family: "edges", and "slim" with another conditioning
    embedding (another architecture: another graph)."""
    from sdbridge.engines.tiny import random_controlnet

    first = list(random_controlnet(parts.unet, seed=1).config["conditioning_embedding_out_channels"])
    random_controlnet(parts.unet, seed=1).to(parts.unet.dtype).save_pretrained(folder / "edges",
                                                                               safe_serialization=True)
    slim = [max(8, channels // 2) for channels in first]
    random_controlnet(parts.unet, seed=2, conditioning_embedding_out_channels=tuple(slim)).to(
        parts.unet.dtype).save_pretrained(folder / "slim", safe_serialization=True)


def run_mode(parts: Any, background: bool, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    from sdbridge.engines.base import StreamState
    from sdbridge.engines.compiled import CompiledEngine
    from sdbridge.params import Schema

    torch._dynamo.reset()
    device = parts.unet.device
    engine = CompiledEngine.from_parts(parts)
    engine.compile_backend = args.compile_backend
    engine.background_compile = background
    engine.controlnet_dir = str(folder)
    base = Schema().defaults()
    base.update(width=args.size, height=args.size, steps=2, strength=0.7, guidance=1.0, seed=1, prompt="a fox")
    engine.warmup(base, runs=2)
    rng = np.random.default_rng(0)
    sessions = [StreamState("a")]
    values = dict(base)

    def frame(count: int, size: tuple[int, int]) -> torch.Tensor:
        width, height = size
        return torch.from_numpy(rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8))

    next_tick = [time.perf_counter()]

    def one() -> float:
        # Frames arrive as from a camera, every 1 / fps s (or at once when the engine is behind).
        next_tick[0] += 1.0 / args.fps
        wait = next_tick[0] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        else:
            next_tick[0] = time.perf_counter()
        size = (values["width"], values["height"])
        frames = frame(len(sessions), size)
        engine.prepare(values)
        for index, state in enumerate(sessions):
            engine.controlnets.condition(state.data, frames[index].numpy())
        started = time.perf_counter()
        engine.step(frames, sessions)
        sync(device)
        return time.perf_counter() - started

    def settle() -> list[float]:
        """Frames until no compile is running or due, and a few more: the frame times of the change."""
        times = []
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            times.append(one())
            busy = engine.describe()["compiling"] or engine.controlnets.describe()["loading"]
            if not busy and len(times) >= args.after:
                break
        return times

    results = []
    for change in CHANGES:
        steady = [one() for _ in range(args.steady)]
        if change == "resolution":
            values["width"] = args.size + args.grow
        elif change == "second session":
            sessions.append(StreamState("b"))
        elif change == "controlnet on":
            values.update(controlnet_1_model="edges", controlnet_1_scale=0.8)
        else:
            values.update(controlnet_1_model="slim")
        started = time.perf_counter()
        times = settle()
        served = engine.controlnets.serving[0] if change.startswith("controlnet") else None
        results.append({"change": change, "mode": "background" if background else "inline",
                        "steady_ms": statistics.median(steady) * 1e3, "longest_ms": max(times) * 1e3,
                        "frames": len(times), "settled_s": time.perf_counter() - started, "serving": served})
        print(f"{results[-1]['mode']:>10}  {change:<36} steady {results[-1]['steady_ms']:8.1f} ms  "
              f"longest {results[-1]['longest_ms']:9.1f} ms  over {len(times)} frames", flush=True)
    engine.close()
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| change | steady frame | compiled in the frame: longest frame | compiled off it: longest frame | "
             "ratio | off it: until compiled |", "|---|---|---|---|---|---|"]
    for change in CHANGES:
        inline = next(r for r in results if r["change"] == change and r["mode"] == "inline")
        background = next(r for r in results if r["change"] == change and r["mode"] == "background")
        lines.append(f"| {change} | {background['steady_ms']:.1f} ms | {inline['longest_ms']:.0f} ms | "
                     f"{background['longest_ms']:.0f} ms | {inline['longest_ms'] / background['longest_ms']:.1f}× | "
                     f"{background['settled_s']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (tiny model) or cuda (sd-turbo's architecture)")
    parser.add_argument("--size", type=int, default=None, help="frame size (64 tiny, 512 on CUDA)")
    parser.add_argument("--grow", type=int, default=None, help="pixels added to the width at the resolution change")
    parser.add_argument("--compile-backend", default=None, help="aot_eager on CPU, inductor on CUDA")
    parser.add_argument("--fps", type=float, default=30.0, help="the input's frame rate (a camera's)")
    parser.add_argument("--steady", type=int, default=5, help="frames timed before each change")
    parser.add_argument("--after", type=int, default=5, help="frames at least after each change")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds at most per change")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.size = args.size or (512 if cuda else 64)
    args.grow = args.grow or (128 if cuda else 32)
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True  # both modes compile from nothing
    from sdbridge.engines.random_model import random_parts

    parts = random_parts("sd21" if cuda else "tiny", device, torch.float16 if cuda else torch.float32)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        controlnets(parts, Path(folder))
        for background in (False, True):
            results.extend(run_mode(parts, background, args, Path(folder)))
    name = torch.cuda.get_device_name(device) if cuda else f"{platform.machine()} CPU"
    heading = (f"### bench_switch.py — {datetime.date.today()}, commit {commit()}, {name}, "
               f"{'sd-turbo architecture' if cuda else 'tiny random model'}, {args.size}² → "
               f"{args.size + args.grow}×{args.size}, input at {args.fps:g} fps, {args.compile_backend}, "
               f"torch {torch.__version__}")
    publish(f"{heading}\n\n{table(results)}\n", write=args.write, json_path=args.json,
            record={"device": name, "commit": commit(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

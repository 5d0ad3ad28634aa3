"""What moving a LoRA's weight costs: one LoraStack.set_weights, the change a fader sends, on a model's real layers.

    python benchmarks/bench_lora.py --arch sd21 --device cuda [--json out.json] [--write]
    python benchmarks/bench_lora.py --arch tiny                # CPU: the tiny random model, seconds

A rank-16 LoRA (random, in kohya's layout) on every Linear and Conv2d of the UNet and the text encoder, as a full
LoCon touches them; the model has random weights of the real architecture (engines/random_model.py). Each change
rewrites every touched layer from its kept original (engines/lora.py), so the figure is a frame's worth of time
that a fader moving at the frame rate adds to each frame. Side by side in the same run: one LoRA, two LoRAs on the
same layers (a cross-fade between styles), and each touched weight copied back from its kept original with no
update at all: one read and one write a weight, the floor any rewrite from originals stays above. Median and p95
over --changes changes, each synchronised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdbridge.engines.lora import LoraFile, LoraLayer, LoraStack, fusable_layers  # noqa: E402
from sdbridge.engines.random_model import random_parts  # noqa: E402

RANK = 16


def random_lora(components: dict, seed: int) -> LoraFile:
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for component, module in components.items():
        for name, layer in fusable_layers(module).items():
            weight = layer.weight
            down = torch.randn(RANK, *weight.shape[1:], generator=generator) * 0.01
            up = torch.randn(weight.shape[0], RANK, *([1, 1] if weight.dim() == 4 else []), generator=generator) * 0.01
            layers.append(LoraLayer(component, name, "lora", {"down": down.to(weight.dtype),
                                                              "up": up.to(weight.dtype)}, 1.0))
    return LoraFile(f"random{seed}", Path(f"random{seed}.safetensors"), "kohya", tuple(layers))


def timed(action, device: torch.device, changes: int) -> list[float]:
    for index in range(3):  # warm-up: the allocator's first blocks, CUDA's first kernels
        action(index)
    times = []
    for index in range(changes):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        action(index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", help="tiny, sd15, sd21 or sdxl (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    parts = random_parts(args.arch, device, dtype)
    components = {"unet": parts.unet, "text_encoder": parts.text_encoder}
    if parts.text_encoder_2 is not None:
        components["text_encoder_2"] = parts.text_encoder_2
    first, second = random_lora(components, 1), random_lora(components, 2)
    stack = LoraStack(components)
    stack.add("a", first, 0.5)
    one = timed(lambda i: stack.set_weights({"a": 0.3 + 0.05 * (i % 8)}), device, args.changes)
    stack.add("b", second, 0.5)
    two = timed(lambda i: stack.set_weights({"a": 0.3 + 0.05 * (i % 8), "b": 0.7 - 0.05 * (i % 8)}), device,
                args.changes)
    # The floor: each touched weight written from its kept original, as any rewrite from originals must (one read
    # and one write a weight), with no update at all.
    pairs = [(fusable_layers(components[component])[module].weight, original)
             for (component, module), original in stack._originals.items()]

    def copy_back(_: int) -> None:
        with torch.inference_mode():
            for weight, original in pairs:
                weight.copy_(original)

    floor = timed(copy_back, device, args.changes)
    stack.clear()
    touched = sum(fusable_layers(module)[name].weight.numel() for module in components.values()
                  for name in fusable_layers(module))
    rows = {"one LoRA": one, "two LoRAs, cross-fade": two, "the weights copied back alone (floor)": floor}
    figures = {name: {"median_ms": statistics.median(times), "p95_ms": sorted(times)[int(0.95 * (len(times) - 1))]}
               for name, times in rows.items()}
    lines = [f"### bench_lora.py — {datetime.date.today()}, {args.device}, {args.arch} (random weights), "
             f"{len(first.layers)} layers, {touched / 1e6:.0f}M weights touched, rank {RANK}, {dtype}", "",
             "| change | median ms | p95 ms | vs the floor |", "|---|---|---|---|"]
    least = figures["the weights copied back alone (floor)"]["median_ms"]
    for name, figure in figures.items():
        lines.append(f"| {name} | {figure['median_ms']:.1f} | {figure['p95_ms']:.1f} | "
                     f"{figure['median_ms'] / max(least, 1e-6):.2f}× |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "device": args.device, "layers": len(first.layers),
                                               "weights_touched": touched, "rows": figures}, indent=2))
    if args.write:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as handle:
            handle.write("\n" + table)


if __name__ == "__main__":
    main()

"""The feature bank's per-call bookkeeping in the compiled engine: what the frame path spends on the
bank's entries around one UNet graph call, apart from the graph itself.

    python benchmarks/bench_bank_feed.py [--device cuda] [--size 512] [--rows 4] [--calls 200]

Each call does what ``CompiledEngine._banked_step`` does around its graph: ``FeatureBank.feed`` (the
rows' stored keys and values per self-attention layer, as graph inputs) and ``put_fresh`` (the graph's
new keys and values, copied into the bank). The graph's outputs are stood in for by fixed tensors of
the right shapes, so only the bookkeeping is timed. Shapes: sd-turbo's UNet (SD 2.1: 16 self-attention
layers, head dim 64) at ``--size``, ``--rows`` rows (stream batch: the steps of a session's frames in
flight). Two rows of the table: "stacked", each call stacking the per-row entries (the first call of
a set of rows, or every call before the chained inputs), and "chained", a steady stream whose next
call takes the last call's outputs as they are.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdbridge.engines.feature_bank import FeatureBank  # noqa: E402

# sd-turbo's (SD 2.1's) UNet: (channels, spatial downscale from the latent) of each self-attention
# layer, down blocks, mid block, up blocks.
SD21_ATTN1 = [(320, 1)] * 2 + [(640, 2)] * 2 + [(1280, 4)] * 2 + [(1280, 8)] + \
    [(1280, 4)] * 3 + [(640, 2)] * 3 + [(320, 1)] * 3


def layer_shapes(size: int) -> dict[str, torch.Size]:
    latent = size // 8
    return {f"layer{i}.attn1": torch.Size([channels // 64, (latent // down) ** 2, 64])
            for i, (channels, down) in enumerate(SD21_ATTN1)}


def time_calls(bank: FeatureBank, rows: list[str], shapes: dict[str, torch.Size], outputs: tuple,
               device: torch.device, dtype: torch.dtype, calls: int, chained: bool) -> list[float]:
    times = []
    for _ in range(calls):
        if not chained:
            bank._flush()   # what a stacked call meets: per-row entries, no chain for its rows
        bank.begin_frame(rows)
        bank.begin_call(len(rows))
        t0 = time.perf_counter()
        past, bias = bank.feed(rows, shapes, dtype, device)
        bank.put_fresh(rows, list(shapes), outputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
        bank.end_frame()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = layer_shapes(args.size)
    rows = [f"s0/back{i}" if i else "s0" for i in range(args.rows)]
    outputs = tuple((torch.randn(args.rows, *shape, dtype=dtype, device=device).transpose(1, 2).contiguous()
                     .transpose(1, 2), torch.randn(args.rows, *shape, dtype=dtype, device=device))
                    for shape in shapes.values())   # keys as the layer makes them: a transposed view
    megabytes = sum(2 * args.rows * shape.numel() for shape in shapes.values()) * outputs[0][0].element_size() / 2**20
    print(f"### bench_bank_feed.py — {args.device}, sd-turbo's {len(shapes)} self-attention layers at "
          f"{args.size}×{args.size}, {args.rows} rows, {str(dtype).replace('torch.', '')}, "
          f"{megabytes:.0f} MB of keys and values a call, {args.calls} calls a row\n")
    print("| inputs | p50 ms a call | p95 ms |")
    print("|---|---|---|")
    for name, chained in (("stacked", False), ("chained", True)):
        bank = FeatureBank(strength=0.7)
        time_calls(bank, rows, shapes, outputs, device, dtype, 3, chained)   # entries in place, caches warm
        times = sorted(time_calls(bank, rows, shapes, outputs, device, dtype, args.calls, chained))
        print(f"| {name} | {statistics.median(times):.3f} | {times[int(0.95 * (len(times) - 1))]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

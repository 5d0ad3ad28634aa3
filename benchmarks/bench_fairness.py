"""One client's huge frames beside another client's stream: does the heavy one slow only itself?

    python benchmarks/bench_fairness.py [--seconds 8] [--heavy 6000] [--engine identity] [--output-size input]
                                        [--write]

The daemon in its own process (bench_daemon.py's), two sessions: a "good" client streaming 512² JPEGs one
frame in flight, and a "heavy" client sending a legal but huge PNG (``--heavy`` pixels a side, under the
8192 limit) one in flight; with ``--output-size input`` its replies are that size too (a huge encode besides
the huge decode). Measured side by side in one run: the good client alone, then beside the heavy one.
The figure that carries across machines is the good client's frames/s beside the heavy one over alone: the
design promises a slow client loses its own frames and never slows another (docs/protocol.md, "Sessions").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_daemon  # noqa: E402  (a sibling script, not a package)


def make_png(side: int) -> bytes:
    """A huge frame that inflates slowly but travels small: sparse texture on black (2.4 MB at 6000²)."""
    image = np.zeros((side, side, 3), np.uint8)
    image[::7, ::5] = 255
    ok, png = cv2.imencode(".png", image)
    assert ok
    return png.tobytes()


async def heavy_client(port: int, png: bytes, seconds: float) -> int:
    """Sends the PNG, waits for its reply, again; -> replies received in ``seconds``."""
    replies = 0
    async with connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_size=None, proxy=None) as ws:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            await ws.send(png)
            while not isinstance(await asyncio.wait_for(ws.recv(), 120), bytes):
                pass
            replies += 1
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--heavy", type=int, default=6000, help="the heavy client's PNG, pixels a side")
    parser.add_argument("--engine", default="identity")
    parser.add_argument("--output-size", choices=["engine", "input"], default="engine",
                        help="the daemon's output_size: input makes the heavy client's replies huge too")
    parser.add_argument("--ws-impl", default="wsproto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    jpeg, png = bench_daemon.make_frame(args.size), make_png(args.heavy)
    port = bench_daemon.free_port()
    process = bench_daemon.start_daemon(port, args.engine, args.size, args.ws_impl, device=args.device, sessions=2,
                                        extra=("--set", f"output_size={args.output_size}"))
    try:
        bench_daemon.wait_listening(port, process)
        time.sleep(1.0)
        alone = bench_daemon.summarise(asyncio.run(bench_daemon.client(port, jpeg, args.seconds, args.warmup)),
                                       args.seconds)

        async def both() -> tuple[list[float], int]:
            heavy = asyncio.create_task(heavy_client(port, png, args.warmup + args.seconds))
            times = await bench_daemon.client(port, jpeg, args.seconds, args.warmup)
            return times, await heavy

        times, heavy_replies = asyncio.run(both())
        beside = bench_daemon.summarise(times, args.seconds)
    finally:
        bench_daemon.stop(process)
    ratio = beside["fps"] / alone["fps"] if alone["fps"] else 0.0
    text = "\n".join([
        f"### bench_fairness.py — {time.strftime('%Y-%m-%d')}, commit {bench_daemon.commit()}, "
        f"{bench_daemon.platform.machine()}, {bench_daemon.os.cpu_count()} cores, {args.engine} engine",
        f"A {args.size}² JPEG client, one frame in flight, {args.seconds:g} s after {args.warmup:g} s; beside it a "
        f"client sending a {args.heavy}×{args.heavy} PNG ({len(png) // 1024} KB) one in flight, "
        f"output_size={args.output_size}" + (" (its replies are that size too)." if args.output_size == "input"
                                              else "."),
        "",
        "| good client | frames/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| alone | {alone['fps']:.1f} | {alone['p50']:.2f} | {alone['p99']:.2f} |",
        f"| beside the heavy client | {beside['fps']:.1f} | {beside['p50']:.2f} | {beside['p99']:.2f} |",
        "",
        f"beside / alone: **{ratio:.2f}×** frames/s; the heavy client got "
        f"{heavy_replies / (args.warmup + args.seconds):.2f} replies/s",
    ])
    bench_daemon.publish(text, write=args.write)


if __name__ == "__main__":
    main()

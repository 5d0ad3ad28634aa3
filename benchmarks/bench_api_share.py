"""One-shot A1111 requests sharing the engine with a live stream: does the stream stall?

    python benchmarks/bench_api_share.py [--seconds 10] [--size 128] [--steps 20] [--model PATH] [--write]

One daemon process on the diffusion engine (the tiny random model written in code unless
``--model`` names a real one). This process is a stream client with one frame in flight, first
alone, then while a second thread posts ``/sdapi/v1/txt2img`` requests back to back. The worker
runs a request's UNet steps between stream frames (sdbridge/bridge/worker.py), so a frame should
wait at most about one request step. Reported side by side in one run: the stream's round-trip
p50/p99 alone and with requests running, their ratio (target: p99 with requests ≤ 2× alone), and
how many requests finished meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import client, commit, free_port, make_frame, start_daemon, summarise, wait_listening  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class RequestLoop(threading.Thread):
    """Posts txt2img requests back to back until stopped; records each one's duration."""

    def __init__(self, port: int, size: int, steps: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
        self.body = {"prompt": "a lighthouse at dusk", "steps": steps, "width": size, "height": size,
                     "sampler_name": "Euler a", "cfg_scale": 7.0, "seed": 1}
        self.stop = threading.Event()
        self.durations: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(timeout=600) as http:
            while not self.stop.is_set():
                started = time.perf_counter()
                response = http.post(self.url, json=self.body)
                if response.status_code != 200:
                    self.errors.append(f"{response.status_code} {response.text[:200]}")
                    return
                self.durations.append(time.perf_counter() - started)


def measure(args: argparse.Namespace, model: str) -> dict[str, object]:
    port = free_port()
    process = start_daemon(port, "diffusion", args.size, "wsproto", model)
    jpeg = make_frame(args.size)
    try:
        wait_listening(port, process)
        deadline = time.monotonic() + 300
        while httpx.get(f"http://127.0.0.1:{port}/health").json()["engine"]["status"] != "ready":
            if time.monotonic() > deadline:
                raise TimeoutError("the engine did not load in 300 s")
            time.sleep(0.2)
        # One request first, outside the measurement: the scheduler and prompt caches warm up.
        httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", timeout=600,
                   json={"prompt": "warm", "steps": 2, "width": args.size, "height": args.size})
        alone = summarise(asyncio.run(client(port, jpeg, args.seconds, args.warmup)), args.seconds)
        loop = RequestLoop(port, args.size, args.steps)
        loop.start()
        time.sleep(0.5)
        shared = summarise(asyncio.run(client(port, jpeg, args.seconds, args.warmup)), args.seconds)
        loop.stop.set()
        loop.join(timeout=600)
        if loop.errors:
            raise RuntimeError(f"txt2img failed: {loop.errors[0]}")
        return {"alone": alone, "shared": shared, "requests": len(loop.durations),
                "request_s": sum(loop.durations) / max(1, len(loop.durations))}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except Exception:
            process.kill()


def report(result: dict[str, object], args: argparse.Namespace, device: str) -> str:
    alone, shared = result["alone"], result["shared"]
    ratio = shared["p99"] / alone["p99"]
    verdict = "within" if ratio <= 2.0 else "OVER"
    lines = [
        f"### bench_api_share.py — {datetime.date.today()}, commit {commit()}, {device}",
        f"stream {args.size}×{args.size}, 1 step; txt2img {args.size}×{args.size}, {args.steps} steps Euler a, "
        f"CFG 7, back to back; {args.seconds:g} s per row after {args.warmup:g} s warm-up.",
        "",
        "| stream | frames/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| alone | {alone['fps']:.1f} | {alone['p50']:.1f} | {alone['p99']:.1f} |",
        f"| with txt2img running | {shared['fps']:.1f} | {shared['p50']:.1f} | {shared['p99']:.1f} |",
        "",
        f"p99 with requests / alone: **{ratio:.2f}×** ({verdict} the 2× target); "
        f"{result['requests']} txt2img requests finished meanwhile, {result['request_s']:.2f} s each on average.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", help="a model folder or file; default: the tiny random model, written in code")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import torch

    device = (f"{torch.cuda.get_device_name()}" if torch.cuda.is_available()
              else f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, no GPU")
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            from sdbridge.engines.tiny import write_tiny_model

            model = str(write_tiny_model(Path(folder) / "tiny"))
            device += ", tiny random model"
        result = measure(args, model)
    text = report(result, args, device)
    print(text)
    if args.write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as out:
            out.write("\n" + text + "\n")


if __name__ == "__main__":
    main()

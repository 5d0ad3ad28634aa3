"""Cold start: from launching the daemon to the first frame the engine makes (issue 4: ≤ 20 s on an
H100 with the compile cache warm).

    python benchmarks/bench_cold_start.py                                   # CPU: the tiny random model
    sdbridge models random /tmp/sd21 && \\
    python benchmarks/bench_cold_start.py --device cuda --model /tmp/sd21   # GPU: sd-turbo's architecture

Each run launches ``sdbridge serve --engine compiled`` in a fresh process with its compile cache in one
temporary folder (``SDBRIDGE_CACHE_DIR``), sends a JPEG frame every 50 ms over WebSocket from the
moment the port listens, and times three moments from the launch: the port listening, ``/health``
saying the engine is ready (loaded and warmed up: compiled, on CUDA), and the first reply after that,
which the engine made. The first run fills the cache (a cold cache: the full compile); the runs after
it start with the cache warm, which is the figure the target names. Needs no network.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                       # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_daemon import _engine_status, commit, free_port, make_frame, publish, stop  # noqa: E402


async def first_engine_frame(port: int, jpeg: bytes, launched: float, process: subprocess.Popen,
                             timeout: float) -> dict[str, float]:
    from websockets.asyncio.client import connect

    deadline = launched + timeout
    while True:  # until the port listens
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited with {process.returncode}")
        if time.perf_counter() > deadline:
            raise TimeoutError("the daemon did not listen")
        try:
            ws = await connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_size=None, proxy=None,
                               open_timeout=2)
            break
        except OSError:
            await asyncio.sleep(0.05)
    listening = time.perf_counter() - launched
    ready = None
    async with ws:
        while time.perf_counter() < deadline:
            if ready is None:
                status = await asyncio.to_thread(_engine_status, port)
                if status == "ready":
                    ready = time.perf_counter() - launched
                elif status == "failed":  # the load failed (the daemon's log says why): no frame will come
                    raise RuntimeError("the daemon's engine failed to load")
            sent = time.perf_counter()
            await ws.send(jpeg)
            while True:
                reply = await ws.recv()
                if isinstance(reply, bytes):
                    break
            if ready is not None and sent - launched >= ready:
                return {"listening_s": listening, "ready_s": ready, "first_frame_s": time.perf_counter() - launched}
            await asyncio.sleep(0.05)
    raise TimeoutError(f"no engine frame within {timeout} s")


def one_run(args: argparse.Namespace, model: str, cache: Path, jpeg: bytes) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, SDBRIDGE_CACHE_DIR=str(cache))
    command = [sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(port), "--no-osc", "--device",
               args.device, "--model", model, "--log-level", "warning", "--feedback", "127.0.0.1:0",
               "--set", "engine=compiled", "--set", f"width={args.size}", "--set", f"height={args.size}",
               "--set", "steps=1"]
    launched = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        return asyncio.run(first_engine_frame(port, jpeg, launched, process, args.timeout))
    finally:
        stop(process, timeout_s=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a model folder (default: the tiny random model, written to a temp folder)")
    parser.add_argument("--size", type=int, default=None, help="frame size (512 on CUDA, 64 on CPU)")
    parser.add_argument("--runs", type=int, default=3, help="runs; the first fills the compile cache")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds at most per run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.size = args.size or (512 if cuda else 64)
    jpeg = make_frame(args.size)
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            from sdbridge.engines.tiny import write_tiny_model

            model = str(write_tiny_model(Path(folder) / "tiny"))
        cache = Path(folder) / "cache"
        runs = []
        for index in range(args.runs):
            result = one_run(args, model, cache, jpeg)
            result["cache"] = "cold" if index == 0 else "warm"
            runs.append(result)
            print(f"run {index + 1} ({result['cache']} cache): listening {result['listening_s']:.1f} s, engine ready "
                  f"{result['ready_s']:.1f} s, first engine frame {result['first_frame_s']:.1f} s", flush=True)
    name = platform.machine() + " CPU"
    if cuda:
        import torch

        name = torch.cuda.get_device_name(0)
    rows = ["| run | compile cache | port listening | engine ready | first engine frame |", "|---|---|---|---|---|"]
    rows += [f"| {i + 1} | {r['cache']} | {r['listening_s']:.1f} s | {r['ready_s']:.1f} s "
             f"| {r['first_frame_s']:.1f} s |" for i, r in enumerate(runs)]
    heading = (f"### bench_cold_start.py — {datetime.date.today()}, commit {commit()}, {name}, "
               f"{'--model ' + Path(args.model).name if args.model else 'tiny random model'}, {args.size}², "
               f"engine compiled")
    publish(heading + "\n\n" + "\n".join(rows) + "\n", write=args.write, json_path=args.json,
            record={"device": name, "commit": commit(), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())

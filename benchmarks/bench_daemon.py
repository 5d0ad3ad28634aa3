"""The bridge's own cost: the whole daemon over loopback WebSocket, against a bare echo server.

    python benchmarks/bench_daemon.py [--seconds 10] [--size 512] [--raw] [--device cuda] [--model PATH] [--json F]
                                      [--write]

Each server runs in its own process; this process is the client: one frame in flight (or, in the
rows that say so, two: a source that sends without waiting, which the worker's pipeline serves by
encoding one reply while the next frame runs), a 512×512 JPEG sent, the reply received but not
decoded. Measured side by side in one run:

- echo: the same WebSocket stack (FastAPI on uvicorn, deflate off) with an OpenCV JPEG decode +
  encode per frame and nothing else: what any bridge must pay;
- the daemon with the identity engine (decode, slot, worker, encode, send), the preview engine,
  the diffusion and compiled engines on the tiny random model (or ``--model`` with ``--device
  cuda`` on a GPU machine: no network needed), and the compiled engine with four clients whose
  frames it batches;
- four clients at once on the identity engine: each one's share of the frames.

The figure that holds across machines is the ratio identity / echo.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent

ECHO_SERVER = textwrap.dedent("""
    import sys, cv2, numpy as np, uvicorn
    from fastapi import FastAPI, WebSocket, WebSocketDisconnect
    app = FastAPI()
    @app.websocket("/ws")
    async def echo(ws: WebSocket):
        await ws.accept()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                continue
            if data[:4] == b"SDBF":  # --raw: header and pixels back as they came, what any bridge pays (recv + send)
                try:
                    await ws.send_bytes(data)
                except WebSocketDisconnect:
                    return
                continue
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85,
                                                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])
            try:
                await ws.send_bytes(jpeg.tobytes())
            except WebSocketDisconnect:  # the client closed with a frame in flight (rows of 2): not an error
                return
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", ws=sys.argv[2],
                ws_per_message_deflate=False, ws_max_size=64 * 1024 * 1024, lifespan="off")
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


def start_echo(port: int, ws_impl: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port), ws_impl])


def start_daemon(port: int, engine: str, size: int, ws_impl: str, model: str | None = None,
                 device: str = "auto", sessions: int = 1, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    # --warm-sessions: the compiled engine's graphs for every batch the clients make are compiled before
    # the clock starts (otherwise batches of 2 to 4 would run uncompiled while they compile, in the timed rows).
    command = [sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(port), "--no-osc", "--ws-impl", ws_impl,
               "--device", device, "--warm-sessions", str(sessions),
               "--feedback", "127.0.0.1:0", "--log-level", "warning", "--set", f"width={size}",
               "--set", f"height={size}", "--set", f"engine={engine}", "--set", "steps=1"]
    if model:
        command += ["--model", model]
    return subprocess.Popen([*command, *extra], cwd=ROOT)


def make_frame(size: int, raw: bool = False) -> bytes:
    """A webcam-like frame: smooth shapes plus sensor noise, about 50-70 KB at 512² and quality 85; with ``raw``,
    its RGBA8 rows bottom-up, as TouchDesigner's TOPs give them (1 MB at 512²)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 100 * np.sin(5 * y), 128 + 90 * np.cos(4 * (x - y))],
                     axis=-1)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    if raw:
        return cv2.cvtColor(image, cv2.COLOR_RGB2RGBA)[::-1].tobytes()
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return jpeg.tobytes()


async def client(port: int, jpeg: bytes, seconds: float, warmup_s: float, in_flight: int = 1,
                 ids: bool = False, raw_size: int = 0) -> list[float]:
    """Keeps ``in_flight`` frames ahead of the replies (1: send, wait for the reply, send again; 2 or
    more: a source that does not wait, as a camera feeding a busy daemon); returns the round-trip times
    (s) after warm-up. With more than one in flight each frame carries a v1 header whose frame id the
    reply echoes: the daemon may drop a frame for a newer one (its newest-frame slot) and never answer
    it, so a reply to frame k settles every frame up to k (``ids``). The echo server answers every bare
    JPEG in order. ``raw_size``: ``jpeg`` is RGBA8 rows of that square size, sent with a header asking for RGBA8
    rows back (every frame carries a header then)."""
    from sdbridge.bridge.protocol import Flags, FrameHeader, PixelFormat, pack_frame

    times: list[float] = []
    sent_at: dict[int, float] = {}
    next_id, settled = 0, -1
    async with connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_size=None, proxy=None) as ws:
        started = time.perf_counter()
        while time.perf_counter() - started < warmup_s + seconds:
            while next_id - 1 - settled < in_flight:
                message = jpeg
                if ids or raw_size:
                    kind = PixelFormat.RGBA8 if raw_size else PixelFormat.JPEG
                    header = FrameHeader(version=1, pixel_format=kind, flags=Flags.BOTTOM_UP if raw_size else 0,
                                         channel=0, reply_format=kind, frame_id=next_id, client_ts_us=0,
                                         width=raw_size, height=raw_size, payload_length=len(jpeg))
                    message = pack_frame(header, jpeg)
                sent_at[next_id] = time.perf_counter()
                await ws.send(message)
                next_id += 1
            reply = await asyncio.wait_for(ws.recv(), 60)
            if not isinstance(reply, bytes):
                continue
            now = time.perf_counter()
            frame_id = FrameHeader.parse(reply)[0].frame_id if ids else settled + 1
            for dropped in range(settled + 1, frame_id):
                sent_at.pop(dropped, None)
            settled = frame_id
            if now - started >= warmup_s:
                times.append(now - sent_at.pop(frame_id))
    return times


def summarise(times: list[float], seconds: float) -> dict[str, float]:
    if not times:
        return {"fps": 0.0, "p50": float("nan"), "p99": float("nan"), "frames": 0}
    ordered = sorted(times)
    return {"fps": len(times) / seconds, "p50": statistics.median(ordered) * 1000,
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, "frames": len(times)}


def run_server(kind: str, args: argparse.Namespace, jpeg: bytes, model: str | None = None,
               clients: int = 1, in_flight: int = 1) -> list[dict[str, float]]:
    port = free_port()
    process = start_echo(port, args.ws_impl) if kind == "echo" else start_daemon(port, kind, args.size, args.ws_impl,
                                                                               model, args.device, clients)
    try:
        wait_listening(port, process)
        if model:  # the engine loads (and the compiled one compiles) before the clock starts
            deadline = time.monotonic() + 900
            while (status := _engine_status(port)) != "ready" and time.monotonic() < deadline:
                if status == "failed":  # told at once, not after the whole wait
                    raise RuntimeError(f"the {kind} engine could not load {model} (the daemon's log says why)")
                time.sleep(0.5)
        time.sleep(1.0)

        async def run_all() -> list[list[float]]:
            return await asyncio.gather(*(client(port, jpeg, args.seconds, args.warmup, in_flight,
                                                 ids=in_flight > 1 and kind != "echo",
                                                 raw_size=args.size if args.raw else 0)
                                          for _ in range(clients)))

        return [summarise(times, args.seconds) for times in asyncio.run(run_all())]
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM (the daemon drains and exits), then SIGKILL if it has not after ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()


def _engine_status(port: int) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return json.load(response)["engine"]["status"]
    except (OSError, ValueError, KeyError):
        return None


def publish(text: str, *, write: bool, json_path: Path | None = None, record: object = None) -> None:
    """Print a result table; append it to benchmarks/RESULTS.md with ``write``; ``record`` as JSON to ``json_path``."""
    print("\n" + text)
    if json_path is not None:
        json_path.write_text(json.dumps(record, indent=2))
    if write:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)


@functools.cache
def commit() -> str:
    """HEAD when first asked, which a benchmark does as it starts: read once, as other commits may land
    while a long run goes on."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--skip-diffusion", action="store_true")
    parser.add_argument("--device", default="auto", help="the daemon's device (cuda on a GPU machine)")
    parser.add_argument("--model", help="a model folder or file (default: the tiny random model, written in code)")
    parser.add_argument("--ws-impl", default="wsproto", help="uvicorn's WebSocket implementation, for both servers")
    parser.add_argument("--in-flight", type=int, default=2,
                        help="rows with this many frames ahead of the replies as well (1: none)")
    parser.add_argument("--raw", action="store_true", help="RGBA8 rows in and out (bottom-up, TouchDesigner's TOPs) "
                        "rather than JPEG; the echo server sends them back as they came")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    jpeg = make_frame(args.size, args.raw)

    rows: list[tuple[str, dict[str, float]]] = []
    ahead = args.in_flight
    echo = run_server("echo", args, jpeg)[0]
    rows.append(("bare echo (WebSocket + JPEG decode/encode)" if not args.raw else "bare echo (WebSocket, raw frames "
                 "sent back)", echo))
    identity = run_server("identity", args, jpeg)[0]
    rows.append(("daemon, identity engine", identity))
    rows.append(("daemon, preview engine (cartoon)", run_server("preview", args, jpeg)[0]))
    if ahead > 1:
        rows.append((f"bare echo, {ahead} frames in flight", run_server("echo", args, jpeg, in_flight=ahead)[0]))
        rows.append((f"daemon, identity engine, {ahead} frames in flight",
                     run_server("identity", args, jpeg, in_flight=ahead)[0]))
        rows.append((f"daemon, preview engine, {ahead} frames in flight",
                     run_server("preview", args, jpeg, in_flight=ahead)[0]))
    if not args.skip_diffusion:
        with tempfile.TemporaryDirectory() as folder:
            from sdbridge.engines.tiny import write_tiny_model

            model = args.model or str(write_tiny_model(Path(folder) / "tiny"))
            label = "model" if args.model else "tiny random model"
            rows.append((f"daemon, diffusion engine, {label} (1 step)",
                         run_server("diffusion", args, jpeg, model=model)[0]))
            rows.append((f"daemon, compiled engine, {label} (1 step)",
                         run_server("compiled", args, jpeg, model=model)[0]))
            if ahead > 1:
                rows.append((f"daemon, compiled engine, {label} (1 step), {ahead} frames in flight",
                             run_server("compiled", args, jpeg, model=model, in_flight=ahead)[0]))
            together = run_server("compiled", args, jpeg, model=model, clients=4)
            rows.append((f"daemon, compiled engine, {label}, 4 clients batched (sum)",
                         {"fps": sum(r["fps"] for r in together), "p50": max(r["p50"] for r in together),
                          "p99": max(r["p99"] for r in together)}))
    shares = run_server("identity", args, jpeg, clients=4)

    import torch

    device = (torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available()
              else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU")
    lines = [f"### bench_daemon.py — {datetime.date.today()}, commit {commit()}, {device}",
             f"{args.size}×{args.size} {'RGBA8 rows' if args.raw else 'JPEG'} ({len(jpeg) // 1024} KB) in and out, "
             "one frame in flight unless a row "
             f"says more (a source that sends without waiting), {args.seconds:g} s per row after {args.warmup:g} s "
             f"warm-up, WebSocket implementation {args.ws_impl}.", "",
             "| server | frames/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for name, row in rows:
        lines.append(f"| {name} | {row['fps']:.1f} | {row['p50']:.2f} | {row['p99']:.2f} |")
    total = sum(s["frames"] for s in shares) or 1
    lines += ["", f"identity / echo: **{identity['fps'] / echo['fps']:.2f}×** frames/s", "",
              "four clients at once (identity): " + ", ".join(f"{s['frames'] / total:.0%} ({s['fps']:.0f} fps)"
                                                              for s in shares)]
    record = {"benchmark": "bench_daemon", "date": str(datetime.date.today()), "commit": commit(), "device": device,
              "size": args.size, "raw": args.raw, "frame_bytes": len(jpeg), "seconds": args.seconds,
              "rows": [{"name": name, **row} for name, row in rows],
              "identity_over_echo": identity["fps"] / echo["fps"],
              "four_client_shares": [s["frames"] / total for s in shares]}
    publish("\n".join(lines) + "\n", write=args.write, json_path=args.json, record=record)

if __name__ == "__main__":
    main()

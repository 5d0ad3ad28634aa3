"""Reliability under load, faults and hostile input (issue 5), measured against a real daemon.

    python benchmarks/bench_reliability.py osc-fuzz [--count 1000000]
    python benchmarks/bench_reliability.py flow
    python benchmarks/bench_reliability.py sigterm [--model DIR]
    python benchmarks/bench_reliability.py soak [--minutes 60]
    python benchmarks/bench_reliability.py all [--write]

Each runs ``sdbridge serve`` in its own process on free loopback ports and drives it from this
one. ``--json`` prints the figures as JSON (the test suite runs short versions this way).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdbridge.bridge.osc_parse import encode_message  # noqa: E402
from sdbridge.bridge.protocol import FrameHeader, PixelFormat  # noqa: E402


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    """``sdbridge serve`` in a subprocess, with its ports and process id."""

    def __init__(self, *extra: str, engine: str = "identity", size: int = 256) -> None:
        self.port, self.osc_port = free_port(), free_port(socket.SOCK_DGRAM)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(self.port), "--osc-port",
             str(self.osc_port), "--feedback", "127.0.0.1:0", "--log-level", "warning", "--engine", engine,
             "--set", f"width={size}", "--set", f"height={size}", *extra], cwd=ROOT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/health").json()["engine"]["status"] == "ready":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.1)

    def stats(self) -> dict[str, Any]:
        return self.http.get("/stats").json()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/task"))

    def udp_socket(self) -> tuple[int, int]:
        """Bytes waiting in the daemon's OSC socket and the kernel's drop counter (Linux /proc/net/udp)."""
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == self.osc_port:
                return int(fields[4].split(":")[1], 16), int(fields[-1])
        return -1, -1

    def udp_drops(self) -> int:
        return self.udp_socket()[1]

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def webcam_jpeg(size: int = 256, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([128 + 100 * np.sin(6 * x + seed), 128 + 100 * np.sin(5 * y), 128 + 90 * np.cos(4 * (x - y))], -1)
    image += rng.normal(0, 10, image.shape)
    return cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def ws(daemon: Daemon, query: str = ""):
    return connect(f"ws://127.0.0.1:{daemon.port}/ws{query}", compression=None, proxy=None, max_size=None)


class Streamer(threading.Thread):
    """A client sending frames at a steady rate, one in flight, until stopped (keeps the worker busy)."""

    def __init__(self, daemon: Daemon, fps: float = 30.0, query: str = "") -> None:
        super().__init__(daemon=True)
        self.daemon_ref, self.fps, self.query = daemon, fps, query
        self.stop_event = threading.Event()
        self.frames = 0

    def run(self) -> None:
        jpeg = webcam_jpeg()
        try:
            with ws(self.daemon_ref, self.query) as conn:
                while not self.stop_event.is_set():
                    started = time.monotonic()
                    conn.send(jpeg)
                    while isinstance(conn.recv(timeout=30), str):
                        pass
                    self.frames += 1
                    time.sleep(max(0.0, 1 / self.fps - (time.monotonic() - started)))
        except (ConnectionClosed, TimeoutError, OSError):
            pass  # the daemon went away (the SIGTERM run stops it under the client on purpose)


# --- 1. OSC fuzz -----------------------------------------------------------------------------------


def _bundle(*elements: bytes, timetag: int = 1) -> bytes:
    data = b"#bundle\x00" + struct.pack(">Q", timetag)
    for element in elements:
        data += struct.pack(">i", len(element)) + element
    return data


def osc_corpus(rng: random.Random, size: int = 5000) -> list[bytes]:
    """Valid messages and bundles, and their mutations: truncated, wrong type tags, bad UTF-8,
    500-deep nested bundles, huge sizes, time tags far in the future."""
    valid = [encode_message("/sd/strength", 0.4), encode_message("/sd/prompt", "a neon heron"),
             encode_message("/sd/steps", 2), encode_message("/sd/seed", 4294967295),
             encode_message("/sd/norm/guidance", 0.1), _bundle(encode_message("/sd/seed", 3), encode_message(
                 "/sd/strength", 0.6))]
    deep = encode_message("/sd/steps", 2)
    for _ in range(500):
        deep = _bundle(deep)
    corpus: list[bytes] = []
    for _ in range(size):
        base = bytearray(rng.choice(valid))
        kind = rng.randrange(8)
        if kind == 0:
            corpus.append(bytes(base))                                            # valid
        elif kind == 1:
            corpus.append(bytes(base[: rng.randrange(1, len(base))]))             # truncated
        elif kind == 2:
            index = base.find(b",") + 1 if b"," in base else 0
            base[index] = rng.choice(b"qwxyzQ\x00\xff")                           # wrong type tag
            corpus.append(bytes(base))
        elif kind == 3:
            base[rng.randrange(1, 4)] = rng.choice((0xFF, 0xFE, 0xC3))           # bad UTF-8 in the address
            corpus.append(bytes(base))
        elif kind == 4:
            corpus.append(deep)                                                   # 500-deep bundles
        elif kind == 5 and rng.random() < 0.2:
            corpus.append(encode_message("/sd/prompt", "x" * rng.randrange(4000, 60000)))  # huge sizes
        elif kind == 5:
            corpus.append(bytes(base) + bytes(rng.randrange(4, 400)))                 # trailing garbage
        elif kind == 6:
            corpus.append(_bundle(bytes(base), timetag=0xFFFFFFFF_00000000))       # far-future time tag
        else:
            for _ in range(rng.randrange(1, 6)):
                base[rng.randrange(len(base))] = rng.randrange(256)               # random flips
            corpus.append(bytes(base))
    return corpus


def osc_fuzz(count: int) -> dict[str, Any]:
    daemon = Daemon(engine="preview")
    streamer = Streamer(daemon, fps=30)
    streamer.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    corpus = osc_corpus(random.Random(0))
    started = time.monotonic()

    try:
        sent_bytes = 0
        for index in range(count):
            packet = corpus[index % len(corpus)]
            sock.sendto(packet, ("127.0.0.1", daemon.osc_port))
            sent_bytes += len(packet)
            # Pace so that the kernel drops none: its buffer for the socket holds ~200 KB (with
            # accounting overhead); wait while more than 64 KB sit unread in it.
            if sent_bytes > 16 * 1024:
                sent_bytes = 0
                while daemon.udp_socket()[0] > 64 * 1024:
                    time.sleep(0.0005)
        deadline = time.monotonic() + 120
        while daemon.stats()["osc"]["datagrams"] + max(0, daemon.udp_drops()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        sock.sendto(encode_message("/sd/strength", 0.125), ("127.0.0.1", daemon.osc_port))
        time.sleep(0.5)
        applied = daemon.http.get("/params").json()["values"]["strength"] == 0.125
        stats = daemon.stats()
        drops = daemon.udp_drops()
    finally:
        streamer.stop_event.set()
        streamer.join(timeout=10)
        sock.close()
        daemon.stop()
    osc = stats["osc"]
    return {"sent": count + 1, "datagrams": osc["datagrams"], "good": osc["good"], "malformed": osc["malformed"],
            "rejected": osc["rejected_source"], "internal_errors": osc["internal_errors"], "kernel_drops": drops,
            "valid_after_flood": applied, "loop_lag_ms_p99": stats["loop_lag_ms_p99"],
            "loop_lag_ms_p50": stats["loop_lag_ms_p50"], "datagrams_per_s": round(count / elapsed),
            "frames_during": streamer.frames, "exit_code": daemon.process.returncode}


# --- 4. Flow control -------------------------------------------------------------------------------


def _round_trips(daemon: Daemon, frames: int, query: str) -> list[float]:
    jpeg = webcam_jpeg()
    times = []
    with ws(daemon, query) as conn:
        for _ in range(frames):
            started = time.perf_counter()
            conn.send(jpeg)
            while isinstance(conn.recv(timeout=30), str):
                pass
            times.append((time.perf_counter() - started) * 1000)
    return times


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 2)


def flow(frames: int = 400) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.clients import StalledViewer

    daemon = Daemon(engine="identity")
    try:
        alone = _round_trips(daemon, frames, "?session=a")
        stalled = StalledViewer(daemon.port, "?session=a")
        with_stalled = _round_trips(daemon, frames, "?session=a")
        session = next(s for s in daemon.stats()["sessions"] if s["id"] == "a")
        stalled.close()

        # A sender at 1,000 frames/s: one sending thread paced to 1 ms, one reading thread.
        jpeg = webcam_jpeg()
        sent_at: dict[int, float] = {}
        latencies: list[float] = []
        with ws(daemon, "?session=flood") as conn:
            done = threading.Event()

            def reader() -> None:
                while not done.is_set():
                    try:
                        message = conn.recv(timeout=1)
                    except TimeoutError:
                        continue
                    if isinstance(message, bytes):
                        header, _ = FrameHeader.parse(message)
                        latencies.append((time.perf_counter() - sent_at[header.frame_id]) * 1000)

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            started = time.perf_counter()
            for frame_id in range(3000):
                sent_at[frame_id] = time.perf_counter()
                conn.send(FrameHeader(1, PixelFormat.JPEG, 0, 0, PixelFormat.JPEG, frame_id, 0, 0, 0,
                                      len(jpeg)).serialize() + jpeg)
                time.sleep(max(0.0, started + (frame_id + 1) / 1000 - time.perf_counter()))
            send_s = time.perf_counter() - started
            time.sleep(1.0)
            done.set()
            thread.join()
            flood_session = daemon.stats()["sessions"]  # before the session closes with the connection
    finally:
        daemon.stop()
    flooded = next((s for s in flood_session if s["id"] == "flood"), None)
    return {"p50_alone_ms": _p(alone, 50), "p99_alone_ms": _p(alone, 99), "p50_with_stalled_ms": _p(with_stalled, 50),
            "p99_with_stalled_ms": _p(with_stalled, 99),
            "p99_ratio": round(_p(with_stalled, 99) / max(_p(alone, 99), 1e-6), 2),
            "stalled_viewer_dropped": session["viewer_frames_dropped"],
            "flood_rate_fps": round(3000 / send_s), "flood_replies": len(latencies),
            "flood_latency_p50_ms": _p(latencies, 50), "flood_latency_p99_ms": _p(latencies, 99),
            "flood_dropped": flooded["frames_dropped"] if flooded else None}


# --- 6. SIGTERM ------------------------------------------------------------------------------------


def sigterm(model: str | None = None) -> dict[str, Any]:
    """SIGTERM while a client streams: the preview engine, or ``model`` on the diffusion engine (a model's
    process has more to tear down: torch's modules, the weights)."""
    daemon = Daemon(*(("--model", model) if model else ()), engine="diffusion" if model else "preview",
                    size=64 if model else 256)
    streamer = Streamer(daemon, fps=60)
    streamer.start()
    time.sleep(2)
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=60)
    elapsed = time.monotonic() - started
    streamer.stop_event.set()
    daemon.http.close()
    return {"engine": "diffusion" if model else "preview", "exit_s": round(elapsed, 3), "exit_code": code,
            "frames_before": streamer.frames}


# --- 5. Soak ---------------------------------------------------------------------------------------


def soak(minutes: float, warmup_s: float = 20.0, reconnect_s: float = 5.0) -> dict[str, Any]:
    """A steady stream with parameter changes and a reconnection every ``reconnect_s``; memory, descriptors
    and threads."""
    daemon = Daemon(engine="preview")
    osc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rng = random.Random(1)
    jpegs = [webcam_jpeg(seed=seed) for seed in range(4)]
    deadline = time.monotonic() + warmup_s + minutes * 60
    baseline: dict[str, float] | None = None
    frames = reconnects = changes = 0
    try:
        while time.monotonic() < deadline:
            if baseline is None and time.monotonic() > deadline - minutes * 60:
                time.sleep(0.5)  # between connections: nothing of a client's is held
                baseline = {"rss": daemon.rss_mb(), "fds": daemon.fds(), "threads": daemon.threads()}
            with ws(daemon, f"?session=soak{reconnects % 3}") as conn:
                reconnects += 1
                until = time.monotonic() + reconnect_s
                while time.monotonic() < min(until, deadline):
                    conn.send(jpegs[frames % len(jpegs)])
                    while isinstance(conn.recv(timeout=30), str):
                        pass
                    frames += 1
                    if frames % 10 == 0:
                        changes += 1
                        osc.sendto(encode_message("/sd/strength", rng.random()), ("127.0.0.1", daemon.osc_port))
                        conn.send(json.dumps({"type": "set", "params": {
                            "effect": rng.choice(["cartoon", "grade", "edges", "sketch", "stylize"]),
                            "prompt": f"prompt {rng.randrange(1000)}"}}))
                    time.sleep(1 / 30)
        time.sleep(0.5)
        final = {"rss": daemon.rss_mb(), "fds": daemon.fds(), "threads": daemon.threads()}
    finally:
        osc.close()
        daemon.stop()
    assert baseline is not None
    return {"minutes": minutes, "frames": frames, "reconnections": reconnects, "param_changes": changes,
            "rss_start_mb": round(baseline["rss"], 1), "rss_end_mb": round(final["rss"], 1),
            "rss_growth_mb": round(final["rss"] - baseline["rss"], 1), "fds_start": baseline["fds"],
            "fds_end": final["fds"], "threads_start": baseline["threads"], "threads_end": final["threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["osc-fuzz", "flow", "sigterm", "soak", "all"])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--model", help="sigterm: on the diffusion engine with this model (sdbridge models tiny DIR)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    if args.what in ("osc-fuzz", "all"):
        results["osc-fuzz"] = osc_fuzz(args.count)
    if args.what in ("flow", "all"):
        results["flow"] = flow()
    if args.what in ("sigterm", "all"):
        results["sigterm"] = sigterm(args.model)
    if args.what in ("soak", "all"):
        results["soak"] = soak(args.minutes)
    if args.json:
        print(json.dumps(results))
        return
    lines = [f"### bench_reliability.py {args.what} — {datetime.date.today()}, {os.cpu_count()} cores, no GPU", ""]
    for name, figures in results.items():
        lines.append(f"**{name}**: " + ", ".join(f"{key} {value}" for key, value in figures.items()))
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()

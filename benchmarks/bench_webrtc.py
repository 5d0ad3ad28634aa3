"""What WebRTC costs against the WebSocket path: WHIP in, WHEP out, beside JPEG over /ws, in one run.

    python benchmarks/bench_webrtc.py [--seconds 10] [--sizes 512 256] [--fps 30] [--codecs VP8 H264]
                                      [--json F] [--write]

The daemon runs in its own process with the identity engine; this process is the client. A synthetic camera
sends frames at a fixed rate (``--fps``), each with its number stamped into its pixels: a band of 20 large
black or white cells (16 bits of the number, 4 check bits) over a panning, noisy texture, so the encoders
have real work and the number survives VP8, H.264 and JPEG. Per row, side by side:

- WebRTC: a WHIP sender (aiortc, the codec forced through the transceiver's codec preferences) and a WHEP
  viewer of the same session, reading the numbers back from the decoded frames;
- WebSocket: the same frames as JPEG over /ws with the v1 header (the reply echoes the frame id), decoded
  on arrival.

Latency is camera frame in hand -> output frame decoded in hand (both paths encode and decode in this
process). Frames lost: sent in the window and never seen back (the daemon keeps the newest frame, so a
late frame is dropped, not queued). CPU ms per frame: the daemon's process (user + system) over the
window, divided by the frames delivered. The figures that hold across machines are the ratios WebRTC /
WebSocket. WebRTC's media goes over the first non-loopback interface (aioice leaves 127.0.0.1 out): no
network beyond this machine is used.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import fractions
import os
import platform
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import ROOT, commit, free_port, publish, start_daemon, stop, wait_listening  # noqa: E402

sys.path.insert(0, str(ROOT))

VIDEO_CLOCK_HZ = 90_000
STAMP_COLUMNS, STAMP_ROWS = 10, 2   # 20 cells: 16 bits of the frame number, then 4 check bits
NUMBER_BITS = 16
CHECK_KEY = 0b1010                  # XOR-ed into the check nibble: an all-black or all-white band never reads
BLACK, WHITE = 16, 235              # video range: what yuv420p round-trips without clipping
AMBIGUOUS = (64, 192)               # a cell whose mean falls in here is unreadable (a half-decoded frame)
PAN_PX = 3                          # the texture moves this far per frame: inter frames have work to do
# The camera runs this long past each window: aiortc's jitter buffer hands a video frame on only when the next
# frame's first packet arrives (jitterbuffer.py, _remove_frame), so a window's last frames would read as lost.
TAIL_S = 1.0


# --- the stamp (sans-I/O: numpy only) --------------------------------------------------------------

def check_nibble(number: int) -> int:
    nibbles = [(number >> shift) & 0xF for shift in range(0, NUMBER_BITS, 4)]
    return nibbles[0] ^ nibbles[1] ^ nibbles[2] ^ nibbles[3] ^ CHECK_KEY


def _cells(height: int, width: int) -> list[tuple[slice, slice]]:
    """Each cell's central half (row, column slices), in bit order: edges blur under 4:2:0 and the DCT."""
    cell_h, cell_w = height // (4 * STAMP_ROWS), width // STAMP_COLUMNS  # the band is the top quarter
    cells = []
    for row in range(STAMP_ROWS):
        for column in range(STAMP_COLUMNS):
            top, left = row * cell_h, column * cell_w
            cells.append((slice(top + cell_h // 4, top + 3 * cell_h // 4),
                          slice(left + cell_w // 4, left + 3 * cell_w // 4)))
    return cells


def stamp(image: np.ndarray, number: int) -> None:
    """Write ``number`` (mod 2**16) into the top quarter of ``image`` ([H, W, 3] uint8, H and W >= 64), in place."""
    height, width = image.shape[:2]
    assert height >= 64 and width >= 64, (height, width)
    number %= 1 << NUMBER_BITS
    bits = [(number >> i) & 1 for i in range(NUMBER_BITS)] + [(check_nibble(number) >> i) & 1 for i in range(4)]
    cell_h, cell_w = height // (4 * STAMP_ROWS), width // STAMP_COLUMNS
    for index, bit in enumerate(bits):
        row, column = divmod(index, STAMP_COLUMNS)
        image[row * cell_h:(row + 1) * cell_h, column * cell_w:(column + 1) * cell_w] = WHITE if bit else BLACK


def read_stamp(image: np.ndarray) -> int | None:
    """The number :func:`stamp` wrote, or None when a cell is ambiguous or the check bits disagree."""
    height, width = image.shape[:2]
    bits = []
    for rows, columns in _cells(height, width):
        level = float(image[rows, columns].mean())
        if AMBIGUOUS[0] < level < AMBIGUOUS[1]:
            return None
        bits.append(1 if level >= AMBIGUOUS[1] else 0)
    number = sum(bit << i for i, bit in enumerate(bits[:NUMBER_BITS]))
    check = sum(bit << i for i, bit in enumerate(bits[NUMBER_BITS:]))
    return number if check == check_nibble(number) else None


class Camera:
    """Frames ``[size, size, 3]`` uint8 RGB: a noisy texture panning sideways, the frame number stamped on top."""

    def __init__(self, size: int, period: int = 64) -> None:
        rng = np.random.default_rng(0)
        self.size, self.period = size, period
        width = size + PAN_PX * period
        y, x = np.mgrid[0:size, 0:width].astype(np.float32) / size
        texture = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 100 * np.sin(5 * y),
                            128 + 90 * np.cos(4 * (x - y))], axis=-1)
        texture += rng.normal(0, 12, texture.shape)
        self.texture = np.clip(texture, 0, 255).astype(np.uint8)

    def frame(self, number: int) -> np.ndarray:
        offset = PAN_PX * (number % self.period)
        image = self.texture[:, offset:offset + self.size].copy()
        stamp(image, number)
        return image


# --- one row's record -----------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    path: str          # "webrtc" or "websocket"
    codec: str
    size: int
    sent_at: dict[int, float] = field(default_factory=dict)      # number -> perf_counter when sent
    latency_s: dict[int, float] = field(default_factory=dict)    # number -> round trip, first arrival only
    unreadable: int = 0
    window: tuple[float, float] = (0.0, 0.0)
    daemon_cpu_s: float | None = None
    client_cpu_s: float | None = None

    def arrived(self, number: int | None, now: float) -> None:
        if number is None or number not in self.sent_at:
            self.unreadable += number is None
            return
        self.latency_s.setdefault(number, now - self.sent_at[number])

    def summary(self, seconds: float) -> dict[str, object]:
        start, end = self.window
        sent = [n for n, t in self.sent_at.items() if start <= t < end]
        times = sorted(self.latency_s[n] for n in sent if n in self.latency_s)
        delivered = len(times)

        def quantile(q: float) -> float:
            return times[min(len(times) - 1, int(q * len(times)))] * 1000 if times else float("nan")

        def per_frame(cpu_s: float | None) -> float | None:
            return cpu_s * 1000 / delivered if cpu_s is not None and delivered else None

        return {"name": self.name, "path": self.path, "codec": self.codec, "size": self.size,
                "sent": len(sent), "delivered": delivered, "lost": len(sent) - delivered,
                "fps": delivered / seconds, "p50": statistics.median(times) * 1000 if times else float("nan"),
                "p95": quantile(0.95), "p99": quantile(0.99), "unreadable": self.unreadable,
                "daemon_cpu_ms_per_frame": per_frame(self.daemon_cpu_s),
                "client_cpu_ms_per_frame": per_frame(self.client_cpu_s)}


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (psutil where installed, else Linux's /proc), None elsewhere."""
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except ImportError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Window:
    """Samples both processes' CPU time as the warm-up ends and as the window ends."""

    def __init__(self, row: Row, daemon_pid: int, warmup_s: float, seconds: float) -> None:
        self.row, self.pid, self.warmup_s, self.seconds = row, daemon_pid, warmup_s, seconds

    async def run(self, started: float) -> None:
        await asyncio.sleep(max(0.0, started + self.warmup_s - time.perf_counter()))
        begin = time.perf_counter(), process_cpu_s(self.pid), process_cpu_s(os.getpid())
        await asyncio.sleep(max(0.0, begin[0] + self.seconds - time.perf_counter()))
        end = time.perf_counter(), process_cpu_s(self.pid), process_cpu_s(os.getpid())
        self.row.window = (begin[0], end[0])
        if begin[1] is not None and end[1] is not None:
            self.row.daemon_cpu_s = end[1] - begin[1]
        if begin[2] is not None and end[2] is not None:
            self.row.client_cpu_s = end[2] - begin[2]


class Pacer:
    """Frame numbers at ``fps`` for ``duration_s`` from the first one asked for; a camera that falls behind
    skips, it never bursts."""

    def __init__(self, fps: float, duration_s: float) -> None:
        self.interval_s, self.duration_s = 1.0 / fps, duration_s
        self.start_s: float | None = None
        self.started = asyncio.Event()
        self._number, self._due = 0, 0.0

    @property
    def until(self) -> float:
        assert self.start_s is not None
        return self.start_s + self.duration_s

    async def next(self) -> int | None:
        """The next frame's number when it is due, or None once the time is up."""
        if self.start_s is None:
            self.start_s = self._due = time.perf_counter()
            self.started.set()
        if self._due >= self.until:
            return None
        delay = self._due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        number, self._number = self._number, self._number + 1
        self._due = max(self._due + self.interval_s, time.perf_counter() - self.interval_s)
        return number


# --- WebRTC -----------------------------------------------------------------------------------------

def _codec_preferences(codec: str) -> list:
    from aiortc.rtcrtpsender import RTCRtpSender

    chosen = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() == f"video/{codec}".lower()]
    if not chosen:
        raise SystemExit(f"aiortc here has no {codec} codec")
    return chosen


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/sdp"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read().decode("utf-8"), response.headers.get("Location", "")


async def _negotiate(pc, port: int, path: str) -> str:
    from aiortc import RTCSessionDescription

    await pc.setLocalDescription(await pc.createOffer())
    status, answer, location = await asyncio.to_thread(_http, "POST", f"http://127.0.0.1:{port}{path}",
                                                       pc.localDescription.sdp.encode())
    assert status == 201, (status, answer[:300])
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return location


async def webrtc_row(row: Row, port: int, daemon_pid: int, fps: float, warmup_s: float, seconds: float) -> None:
    import av
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    camera = Camera(row.size)
    pacer = Pacer(fps, warmup_s + seconds + TAIL_S)

    class StampedTrack(MediaStreamTrack):
        kind = "video"

        async def recv(self) -> av.VideoFrame:
            number = await pacer.next()
            if number is None:
                self.stop()
                raise MediaStreamError
            frame = av.VideoFrame.from_ndarray(camera.frame(number), format="rgb24")
            frame.pts, frame.time_base = int(number * VIDEO_CLOCK_HZ / fps), fractions.Fraction(1, VIDEO_CLOCK_HZ)
            row.sent_at[number] = time.perf_counter()  # handed to aiortc's encoder now
            return frame

    session = f"bench-{row.codec.lower()}-{row.size}"
    viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: host candidates on this machine only
    sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        viewer.addTransceiver("video", direction="recvonly").setCodecPreferences(_codec_preferences(row.codec))
        tracks: asyncio.Future = asyncio.get_running_loop().create_future()
        viewer.on("track", lambda t: tracks.done() or tracks.set_result(t))
        whep = await _negotiate(viewer, port, f"/whep/{session}")
        sender.addTransceiver(StampedTrack(), direction="sendonly").setCodecPreferences(
            _codec_preferences(row.codec))
        whip = await _negotiate(sender, port, f"/whip/{session}")
        remote = await asyncio.wait_for(tracks, 15)
        await asyncio.wait_for(pacer.started.wait(), 15)  # the sender's first recv, once DTLS is up
        window = asyncio.create_task(Window(row, daemon_pid, warmup_s, seconds).run(pacer.start_s))
        while True:
            try:  # a second past the camera's end, what has not come back is lost
                frame = await asyncio.wait_for(remote.recv(), max(0.1, pacer.until + 1.0 - time.perf_counter()))
            except (asyncio.TimeoutError, MediaStreamError):
                break
            image = frame.to_ndarray(format="rgb24")
            row.arrived(read_stamp(image), time.perf_counter())
        await window
        for location in (whip, whep):
            await asyncio.to_thread(_http, "DELETE", f"http://127.0.0.1:{port}{location}")
    finally:
        await asyncio.gather(sender.close(), viewer.close())


# --- WebSocket --------------------------------------------------------------------------------------

async def websocket_row(row: Row, port: int, daemon_pid: int, fps: float, warmup_s: float, seconds: float) -> None:
    from websockets.asyncio.client import connect

    from sdbridge.bridge.protocol import FrameHeader, PixelFormat, pack_frame

    camera = Camera(row.size)
    jpeg_options = [cv2.IMWRITE_JPEG_QUALITY, 85, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
    async with connect(f"ws://127.0.0.1:{port}/ws?session=bench-ws-{row.size}", compression=None, max_size=None,
                       proxy=None) as ws:
        pacer = Pacer(fps, warmup_s + seconds + TAIL_S)

        async def send() -> None:
            while (number := await pacer.next()) is not None:
                sent = time.perf_counter()  # the camera frame in hand: the JPEG encode is the client's cost
                ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(camera.frame(number), cv2.COLOR_RGB2BGR), jpeg_options)
                header = FrameHeader(version=1, pixel_format=PixelFormat.JPEG, flags=0, channel=0,
                                     reply_format=PixelFormat.JPEG, frame_id=number, client_ts_us=0, width=0,
                                     height=0, payload_length=len(jpeg))
                row.sent_at[number] = sent
                await ws.send(pack_frame(header, jpeg.tobytes()))

        async def receive() -> None:
            await pacer.started.wait()
            while True:
                try:
                    reply = await asyncio.wait_for(ws.recv(), max(0.1, pacer.until + 1.0 - time.perf_counter()))
                except asyncio.TimeoutError:
                    return
                if not isinstance(reply, bytes):
                    continue  # hello, stats
                header, payload = FrameHeader.parse(reply)
                image = cv2.cvtColor(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR),
                                     cv2.COLOR_BGR2RGB)
                now = time.perf_counter()
                number = read_stamp(image)
                # The pixels must say what the header says: a mismatch would be a frame sent back for another.
                row.arrived(number if number == header.frame_id else None, now)

        async def measure() -> None:
            await pacer.started.wait()
            await Window(row, daemon_pid, warmup_s, seconds).run(pacer.start_s)

        await asyncio.gather(send(), receive(), measure())


# --- the run ----------------------------------------------------------------------------------------

def run_size(size: int, args: argparse.Namespace) -> list[dict[str, object]]:
    port = free_port()
    process = start_daemon(port, "identity", size, args.ws_impl)
    rows: list[dict[str, object]] = []
    try:
        wait_listening(port, process)
        time.sleep(1.0)
        for path, codec in [("websocket", "JPEG")] + [("webrtc", codec) for codec in args.codecs]:
            row = Row(f"{'WebSocket' if path == 'websocket' else 'WebRTC'} {codec}, {size}²", path, codec, size)
            runner = websocket_row if path == "websocket" else webrtc_row
            asyncio.run(runner(row, port, process.pid, args.fps, args.warmup, args.seconds))
            rows.append(row.summary(args.seconds))
            print(f"  {row.name}: {rows[-1]['fps']:.1f} frames/s, p50 {rows[-1]['p50']:.1f} ms, "
                  f"lost {rows[-1]['lost']}", file=sys.stderr)
            time.sleep(1.0)  # the peers' ends settle before the next row
    finally:
        stop(process)
    return rows


def _ms(value: object) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each row's window (ICE, keyframe)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--fps", type=float, default=30.0, help="the camera's fixed rate")
    parser.add_argument("--codecs", nargs="+", default=["VP8", "H264"], choices=["VP8", "H264"])
    parser.add_argument("--ws-impl", default="wsproto", help="uvicorn's WebSocket implementation")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    from aioice.ice import get_host_addresses

    if not get_host_addresses(use_ipv4=True, use_ipv6=False):
        raise SystemExit("no non-loopback IPv4 interface: aioice gathers no candidate on 127.0.0.1, so the "
                         "WebRTC rows cannot connect")
    commit()  # HEAD as the run starts
    load = f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load average unknown"
    rows = [row for size in args.sizes for row in run_size(size, args)]

    ratios = []
    for size in args.sizes:
        [ws] = [r for r in rows if r["size"] == size and r["path"] == "websocket"]
        for rtc in [r for r in rows if r["size"] == size and r["path"] == "webrtc"]:
            cpu = (rtc["daemon_cpu_ms_per_frame"] / ws["daemon_cpu_ms_per_frame"]
                   if rtc["daemon_cpu_ms_per_frame"] and ws["daemon_cpu_ms_per_frame"] else None)
            ratios.append({"size": size, "codec": rtc["codec"], "p50": rtc["p50"] / ws["p50"],
                           "p95": rtc["p95"] / ws["p95"], "added_p50_ms": rtc["p50"] - ws["p50"],
                           "daemon_cpu": cpu})

    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"
    lines = [f"### bench_webrtc.py — {datetime.date.today()}, commit {commit()}, {device}, {load}",
             f"Identity engine; a camera at {args.fps:g} fps with its frame number stamped in the pixels, "
             f"{args.seconds:g} s per row after {args.warmup:g} s warm-up; WebRTC = WHIP sender + WHEP viewer "
             f"(aiortc, codec forced), WebSocket = JPEG q85 4:2:0 over /ws, v1 header. Latency: camera frame in "
             f"hand → output frame decoded in hand. CPU: ms per delivered frame.", "",
             "| path | frames/s | lost / sent | p50 ms | p95 ms | p99 ms | daemon CPU ms/frame | client CPU ms/frame |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['fps']:.1f} | {row['lost']} / {row['sent']} | {row['p50']:.1f} | "
                     f"{row['p95']:.1f} | {row['p99']:.1f} | {_ms(row['daemon_cpu_ms_per_frame'])} | "
                     f"{_ms(row['client_cpu_ms_per_frame'])} |")
    lines += ["", "| WebRTC / WebSocket | p50 latency | p95 latency | added p50 ms | daemon CPU per frame |",
              "|---|---|---|---|---|"]
    for ratio in ratios:
        lines.append(f"| {ratio['codec']}, {ratio['size']}² | **{ratio['p50']:.2f}×** | {ratio['p95']:.2f}× | "
                     f"{ratio['added_p50_ms']:+.1f} | "
                     f"{'-' if ratio['daemon_cpu'] is None else format(ratio['daemon_cpu'], '.2f') + '×'} |")
    record = {"benchmark": "bench_webrtc", "date": str(datetime.date.today()), "commit": commit(), "device": device,
              "load": load, "fps": args.fps, "seconds": args.seconds, "warmup": args.warmup, "rows": rows,
              "ratios": ratios}
    publish("\n".join(lines) + "\n", write=args.write, json_path=args.json, record=record)


if __name__ == "__main__":
    main()

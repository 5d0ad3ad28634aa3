"""Live webcam stylisation: OpenCV capture -> sdbridge -> a window (or a virtual camera).

    python examples/webcam.py                       # camera 0, window; q to quit
    python examples/webcam.py --source clip.mp4     # a video file instead of a camera
    python examples/webcam.py --virtual-camera      # to OBS/Zoom through pyvirtualcam, when installed
    python examples/webcam.py --frames 100 --no-window   # headless: print frames/s and latency

One frame in flight: the next frame is sent when the reply to the last one arrives, so latency
stays at one frame time whatever the engine's speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import cv2
import numpy as np
from websockets.sync.client import connect


# A frame the daemon refuses gets this error and no reply: waiting on would stall until the timeout.
REFUSED_FRAME_CODES = ("bad_frame", "bad_image")


def fit_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The reply (at the engine's size) at the size a window or camera was opened with."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def report_message(text: str) -> str | None:
    """A JSON message from the daemon: an error is printed to stderr as it comes; returns its code."""
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "error":
        return None  # hello, stats, engine news
    code = message.get("code", "error")
    print(f"sdbridge: {code}: {message.get('message', '')}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:7860/ws",
                        help="the daemon's WebSocket (default %(default)s; ?session=NAME for a session of its own)")
    parser.add_argument("--source", default="0", help="a camera index or a video file")
    parser.add_argument("--size", type=int, default=512, help="the side of the square sent")
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: until q)")
    parser.add_argument("--no-window", action="store_true", help="show no window (headless: only the figures)")
    parser.add_argument("--virtual-camera", action="store_true",
                        help="also send the output to a virtual camera at --size (pip install pyvirtualcam; "
                        "on Linux the v4l2loopback module)")
    args = parser.parse_args(argv)

    capture = cv2.VideoCapture(int(args.source) if args.source.isdigit() else args.source)
    if not capture.isOpened():
        raise SystemExit(f"cannot open video source {args.source!r}")
    camera = None
    if args.virtual_camera:
        import pyvirtualcam  # optional: pip install pyvirtualcam

        camera = pyvirtualcam.Camera(width=args.size, height=args.size, fps=30)
    latencies: list[float] = []
    started = time.perf_counter()
    with connect(args.url, compression=None, max_size=None, proxy=None) as ws:
        while not args.frames or len(latencies) < args.frames:
            ok, frame = capture.read()
            if not ok:
                if args.source.isdigit():
                    break
                capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # loop a file
                continue
            side = min(frame.shape[:2])
            top, left = (frame.shape[0] - side) // 2, (frame.shape[1] - side) // 2
            square = cv2.resize(frame[top:top + side, left:left + side], (args.size, args.size))
            sent = time.perf_counter()
            ws.send(cv2.imencode(".jpg", square, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
            while isinstance(reply := ws.recv(timeout=30), str):  # JSON: hello, stats, errors
                if report_message(reply) in REFUSED_FRAME_CODES:
                    break
            if isinstance(reply, str):
                continue  # refused: no reply comes for this frame, so send the next
            latencies.append((time.perf_counter() - sent) * 1000)
            output = cv2.imdecode(np.frombuffer(reply, np.uint8), cv2.IMREAD_COLOR)
            if camera is not None:  # opened at --size; the reply comes at the engine's size
                camera.send(cv2.cvtColor(fit_to(output, camera.width, camera.height), cv2.COLOR_BGR2RGB))
            if not args.no_window:
                cv2.imshow("sdbridge", np.hstack([square, fit_to(output, args.size, args.size)]))
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
    elapsed = time.perf_counter() - started
    figures = {"frames": len(latencies), "fps": len(latencies) / elapsed,
               "latency_ms_p50": statistics.median(latencies) if latencies else float("nan")}
    print(f"{figures['frames']} frames, {figures['fps']:.1f} frames/s, median round trip "
          f"{figures['latency_ms_p50']:.1f} ms")
    return figures


if __name__ == "__main__":
    main()

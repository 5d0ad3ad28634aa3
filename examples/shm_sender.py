"""Send frames to sdbridge through shared memory: no encoding, no socket (docs/inputs.md).

    sdbridge serve --input shm:sdbridge@live              # the daemon reads segment "sdbridge" into session "live"
    python examples/shm_sender.py                          # a moving test pattern, 512x512 at 30 fps
    python examples/shm_sender.py --source clip.mp4        # a video file (or a camera number) relayed
    python examples/shm_sender.py --frames 100 --size 640x360 --name td_out

Watch the result at ws://127.0.0.1:7860/ws?session=live, or with --output ndi:sdbridge@live.
The segment is removed when this script ends (Ctrl-C, SIGINT or SIGTERM too).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import numpy as np

from sdbridge.inputs.shm import ShmWriter


def pattern(n: int, width: int, height: int) -> np.ndarray:
    """Frame ``n`` of the test pattern: a gradient scrolling 3 levels a frame; blue is 5n mod 256."""
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // max(width - 1, 1) + 3 * n) % 256
    green = y * 255 // max(height - 1, 1)
    blue = np.full_like(x, (5 * n) % 256)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGINT and SIGTERM end the loop the same way, so the segment is removed: a shell starts a background job with
    # SIGINT ignored (this test's sender, under `make test &`, never stopped), and a process manager sends SIGTERM.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="sdbridge", help="the segment's name (--input shm:NAME)")
    parser.add_argument("--size", default="512x512", help="WIDTHxHEIGHT of the test pattern")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--frames", type=int, default=0, help="stop after this many (0: until Ctrl-C)")
    parser.add_argument("--source", help="a video file or camera number to relay instead of the pattern")
    args = parser.parse_args(argv)
    width, _, height = args.size.partition("x")
    width, height = int(width), int(height or width)

    capture = None
    if args.source is not None:
        import cv2

        capture = cv2.VideoCapture(int(args.source) if args.source.isdigit() else args.source)
        if not capture.isOpened():
            print(f"cannot open {args.source}", file=sys.stderr)
            return 1
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) or width
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) or height

    with ShmWriter(args.name, width, height, 3) as writer:
        print(f"writing {width}x{height} frames to shared memory {writer.name!r} at {args.fps:g} fps", flush=True)
        period, next_at, n = 1.0 / args.fps, time.monotonic(), 0
        try:
            while not args.frames or n < args.frames:
                n += 1
                if capture is not None:
                    ok, bgr = capture.read()
                    if not ok:
                        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # a file: loop
                        continue
                    frame = cv2.cvtColor(cv2.resize(bgr, (width, height)), cv2.COLOR_BGR2RGB)
                else:
                    frame = pattern(n, width, height)
                writer.write(frame)
                next_at += period
                time.sleep(max(0.0, next_at - time.monotonic()))
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

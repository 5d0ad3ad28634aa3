"""What examples/touchdesigner/sdbridge_td.py costs TouchDesigner's main thread per frame.

    python benchmarks/bench_td_helper.py [--against OLD_sdbridge_td.py] [--rounds 15] [--json F]

TouchDesigner runs the WebSocket DAT's callbacks and the Execute DAT that packs each frame in its
main thread, so every ms here is a ms of the show's frame (16.7 at 60 fps). Times ``pack_top`` on
a float32 RGBA TOP (``TOP.numpyArray()``'s layout) and ``unpack_reply`` on the raw RGBA8 reply, at
512², 1024×576 and 1920×1080, median of ``--rounds``. With ``--against`` another copy of the helper
(an older commit's, from ``git show REV:examples/touchdesigner/sdbridge_td.py``) is timed in the
same run, rounds alternating, and both must give the same bytes: the figure that carries across
machines is the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

HELPER = Path(__file__).resolve().parents[1] / "examples" / "touchdesigner" / "sdbridge_td.py"
SIZES = ((512, 512), (576, 1024), (1080, 1920))


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000.0


def measure(helpers: dict[str, ModuleType], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for height, width in SIZES:
        top = np.random.default_rng(0).random((height, width, 4), dtype=np.float32)
        messages = {name: helper.pack_top(top, 1, 2) for name, helper in helpers.items()}
        if len(set(messages.values())) != 1:
            raise SystemExit(f"the helpers pack {height}x{width} differently: not the same frame")
        times: dict[str, dict[str, list[float]]] = {name: {"pack": [], "unpack": []} for name in helpers}
        for _ in range(rounds):  # alternating, so that a noisy moment falls on both
            for name, helper in helpers.items():
                times[name]["pack"].append(timed(lambda: helper.pack_top(top, 1, 2)))
                times[name]["unpack"].append(timed(lambda: helper.unpack_reply(messages[name])))
        for name in helpers:
            rows.append({"helper": name, "size": f"{width}x{height}",
                         "pack_ms": statistics.median(times[name]["pack"]),
                         "unpack_ms": statistics.median(times[name]["unpack"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another sdbridge_td.py to time beside this tree's")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    helpers = {"this tree": load(HELPER, "sdbridge_td_now")}
    if args.against is not None:
        helpers = {"against": load(args.against, "sdbridge_td_against"), **helpers}
    rows = measure(helpers, args.rounds)
    print(f"sdbridge_td.py per frame, {platform.machine()}, numpy {np.__version__}, median of {args.rounds}")
    print(f"{'helper':<10} {'size':>10} {'pack ms':>8} {'unpack ms':>10}")
    for row in rows:
        print(f"{row['helper']:<10} {row['size']:>10} {row['pack_ms']:8.2f} {row['unpack_ms']:10.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

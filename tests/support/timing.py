"""Growth checks for parsers: the best of a few runs, so a test can compare n with 16n as a ratio, not a time."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any


def best_time(function: Callable[[Any], Any], argument: Any, repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls, in seconds, with the garbage collector off while they run."""
    best = math.inf
    collecting = gc.isenabled()
    gc.disable()   # the collector's passes depend on what else is alive, not on this function's growth
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            function(argument)
            best = min(best, time.perf_counter() - start)
    finally:
        if collecting:
            gc.enable()
    return best

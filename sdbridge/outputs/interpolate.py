"""Output frame interpolation: in-between frames along optical flow, and the clock that shows them.

Sans-I/O: no threads or sockets here, and the clock that paces is the caller's (times are passed in; a timer only
measures what making an in-between costs). :class:`FlowInterpolator` takes two engine frames
(uint8 RGB ``[H, W, 3]``) and makes the frames between them; :class:`Pacer` takes engine frames
with the time they arrived and says which frame to show when. ``sdbridge/outputs/hub.py`` drives
both from each output's thread (docs/outputs.md, "Frame interpolation").

The method is the classic two-sided warp: dense flow both ways (OpenCV's DIS, on the CPU, at a
reduced size and upsampled, as ``plugins/flow_warp.py`` does), the flow from the in-between time to
each frame approximated from those two (Super SloMo, Jiang et al. 2018, eq. 4), both frames warped
there, and blended by time with each side's weight cut where forward and backward flow disagree
(the pixel is hidden in the other frame), so a moving edge is taken from the side that sees it.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

MAX_FACTOR = 4
FLOW_MAX_SIDE = 320          # flow is computed with the longer side at most this (DIS at 320²: ~2 ms on 2 cores)
THUMB_SIDE = 32              # the scene-cut test compares frames this small
CUT_SIMILARITY = 0.5         # below this flow-compensated correlation, two frames are a cut: never blended
CONSISTENCY_PX = 1.5         # forward/backward flow disagreeing by this many (flow-size) pixels: a hidden pixel
STALL_PERIODS = 2.0          # a gap longer than this many engine periods is a stall: no in-betweens across it
MAX_PERIOD_S = 1.0           # engines slower than 1 fps are never interpolated (an in-between would last seconds)
PERIOD_SAMPLES = 8           # engine periods kept for the median that paces the in-betweens
COST_SAMPLES = 8             # costs of a flow pair and of an in-between kept for the medians that lead the slots


FACTOR_FORMS = "off, 1-4 or 2x-4x"  # every documented form (docs/outputs.md), for the error that lists them
_FACTORS = {"off": 1, **{str(n): n for n in range(1, MAX_FACTOR + 1)}, **{f"{n}x": n for n in range(2, MAX_FACTOR + 1)}}


def parse_factor(text: str | int) -> int:
    """``off``, ``1``..``4`` or ``2x``..``4x`` → the number of frames shown per engine frame (1 = off).

    Only those forms (any case): not ``0``, ``1x`` or a full-width ``２x``, which a looser parse would take
    for something the docs never promised. ValueError naming the value (the callers wrap it in their own error)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"interpolate {text!r} is not {FACTOR_FORMS}")
    value = str(text)  # spaces around it are refused, as around any option's value
    factor = _FACTORS.get(value.lower()) if value.isascii() else None
    if factor is None:
        raise ValueError(f"interpolate {text!r} is not {FACTOR_FORMS}")
    return factor


def format_factor(factor: int) -> str:
    return "off" if factor <= 1 else f"{factor}x"


def _grid(width: int, height: int) -> np.ndarray:
    """[H, W, 2] float32: each pixel's own (x, y)."""
    x, y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return np.dstack([x, y])


def _warp(image: np.ndarray, flow: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Backward warp: out(x) = image(x + flow(x)), edges replicated. One two-channel map: at 1024² a
    remap costs 11 ms so, 16 ms with separate x and y maps."""
    return cv2.remap(image, grid + flow, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two float images; 1.0 when either is flat and they match."""
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if denominator < 1e-6:
        return 1.0 if float(np.abs(a - b).max()) < 1e-3 else 0.0
    return float((a * b).sum()) / denominator


@dataclass
class Pair:
    """Two engine frames and the flow between them at the flow size; made by :meth:`FlowInterpolator.pair`."""

    start: np.ndarray            # [H, W, 3] uint8
    end: np.ndarray              # [H, W, 3] uint8
    flow_forward: np.ndarray     # [h, w, 2] float32: where each pixel of start is in end (flow pixels)
    flow_backward: np.ndarray    # [h, w, 2]: where each pixel of end is in start
    hidden_start: np.ndarray     # [h, w] float32 in [0, 1]: 1 where a pixel of start is not seen in end
    hidden_end: np.ndarray       # [h, w]
    similarity: float            # flow-compensated correlation of the two frames' thumbnails, in [-1, 1]

    @property
    def is_cut(self) -> bool:
        return self.similarity < CUT_SIMILARITY


class FlowInterpolator:
    """Frames between two engine frames, by flow. One per output thread (DIS keeps buffers: not thread-safe)."""

    def __init__(self, flow_max_side: int = FLOW_MAX_SIDE) -> None:
        self.flow_max_side = flow_max_side
        # FAST, not ULTRAFAST as flow_warp uses: an in-between shows the flow's errors directly (a torn
        # edge), where flow_warp only blends them in. At 320², 2 cores: ULTRAFAST 1.5 ms, FAST 3.2, MEDIUM 15.
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
        self._grids: dict[tuple[int, int], np.ndarray] = {}

    def _grid(self, width: int, height: int) -> np.ndarray:
        if (width, height) not in self._grids:
            if len(self._grids) >= 4:  # the frame size and the flow size; more only after resizes
                self._grids.clear()
            self._grids[(width, height)] = _grid(width, height)
        return self._grids[(width, height)]

    def flow_size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(1.0, self.flow_max_side / max(width, height))
        return max(8, round(width * scale)), max(8, round(height * scale))

    def pair(self, start: np.ndarray, end: np.ndarray) -> Pair | None:
        """The flow both ways between two frames; None when they differ in size (nothing to blend)."""
        if start.shape != end.shape:
            return None
        start, end = np.ascontiguousarray(start), np.ascontiguousarray(end)  # OpenCV refuses negative strides
        height, width = start.shape[:2]
        small_size = self.flow_size(width, height)
        # Grey first, then down: resizing one channel instead of three.
        grey_start = cv2.resize(cv2.cvtColor(start, cv2.COLOR_RGB2GRAY), small_size, interpolation=cv2.INTER_AREA)
        grey_end = cv2.resize(cv2.cvtColor(end, cv2.COLOR_RGB2GRAY), small_size, interpolation=cv2.INTER_AREA)
        forward = self._dis.calc(grey_start, grey_end, None)
        backward = self._dis.calc(grey_end, grey_start, None)
        grid = self._grid(*small_size)
        # Forward then back should return to the start; where it does not, the pixel is hidden on the other side.
        hidden_start = self._hidden(forward, _warp(backward, forward, grid))
        hidden_end = self._hidden(backward, _warp(forward, backward, grid))
        # Similarity: the end warped back onto the start, compared as blurred thumbnails, so texture
        # flicker (a diffusion model re-rolls fine detail every frame) does not count, structure does.
        aligned_end = _warp(grey_end, forward, grid)
        thumb = (THUMB_SIDE, THUMB_SIDE)
        similarity = _correlation(cv2.resize(grey_start, thumb, interpolation=cv2.INTER_AREA).astype(np.float32),
                                  cv2.resize(aligned_end, thumb, interpolation=cv2.INTER_AREA).astype(np.float32))
        return Pair(start, end, forward, backward, hidden_start, hidden_end, similarity)

    @staticmethod
    def _hidden(flow: np.ndarray, returned: np.ndarray) -> np.ndarray:
        error = np.linalg.norm(flow + returned, axis=2)
        return np.clip((error - CONSISTENCY_PX) / CONSISTENCY_PX, 0.0, 1.0).astype(np.float32)

    def frame(self, pair: Pair, t: float) -> np.ndarray:
        """The frame at time ``t`` in (0, 1) between the pair's start (0) and end (1), uint8 ``[H, W, 3]``."""
        assert 0.0 < t < 1.0, t
        height, width = pair.start.shape[:2]
        small_height, small_width = pair.flow_forward.shape[:2]
        # 1. Flow from time t to each side, at the flow size (Super SloMo's linear approximation).
        to_start = -(1.0 - t) * t * pair.flow_forward + t * t * pair.flow_backward
        to_end = (1.0 - t) ** 2 * pair.flow_forward - t * (1.0 - t) * pair.flow_backward
        # 2. Each side's weight: its time weight, cut where the pixel it would give is hidden on the other side.
        small_grid = self._grid(small_width, small_height)
        weight_start = (1.0 - t) * (1.0 - _warp(pair.hidden_start, to_start, small_grid)) + 1e-3
        weight_end = t * (1.0 - _warp(pair.hidden_end, to_end, small_grid)) + 1e-3
        share_start = weight_start / (weight_start + weight_end)
        # 3. Up to the frame size (flow in full-size pixels), warp both frames there and blend.
        scale_x, scale_y = width / small_width, height / small_height
        size = (width, height)
        to_start = cv2.resize(to_start, size, interpolation=cv2.INTER_LINEAR) * np.float32((scale_x, scale_y))
        to_end = cv2.resize(to_end, size, interpolation=cv2.INTER_LINEAR) * np.float32((scale_x, scale_y))
        share_start = cv2.resize(share_start, size, interpolation=cv2.INTER_LINEAR)
        grid = self._grid(width, height)
        # blendLinear on the uint8 frames: 7 ms at 1024², where the same sum in numpy floats takes 34.
        return cv2.blendLinear(_warp(pair.start, to_start, grid), _warp(pair.end, to_end, grid),
                               share_start, 1.0 - share_start)


class RateMeter:
    """Events per second over the last ``window_s``; 0 once nothing has happened for a second."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=512)

    def add(self, now_s: float) -> None:
        self._times.append(now_s)

    def rate(self, now_s: float) -> float:
        times = [t for t in self._times if t > now_s - self.window_s]
        if len(times) < 2 or now_s - times[-1] > 1.0:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-6)


def _median(samples: deque[float]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[len(ordered) // 2]


@dataclass
class _Slot:
    due_s: float                 # when to take it: an in-between is made then, to be ready at its show time
    t: float                     # 0 < t < 1: an in-between of ``pair``; 1.0: the engine frame itself
    frame: np.ndarray | None     # set for engine frames and held frames; made on time for in-betweens


class Pacer:
    """Which frame to show when, for one output showing ``factor`` frames per engine frame.

    Engine frame B arriving at time T after A: when B came within ``STALL_PERIODS`` engine periods
    of A and is the same size and scene, the frames between A and B are shown at T, T + P/factor,
    ... and B itself at T + (factor-1)·P/factor, P the median engine period, all of them later by
    the lead L, what the flow pair and one in-between take to make (medians, measured with ``timer``).
    An in-between's slot falls due as long before its time as making it takes, and B waits out L, so
    the frames go out evenly, not in-betweens late by their own making and B on time (gaps of 6 and
    27 ms at 30 fps 2x, QA 67 F11). A cut (or a new size, or another session's frame) holds A in the
    in-between slots and shows B at the same time, so the rate stays even and nothing blends two
    unrelated frames.
    After a stall B is shown at once. A frame arriving before the last one's slots are all shown
    drops the in-betweens left (counted in ``skipped``) and B, if not shown yet, is shown at once
    (:meth:`take_pending`): in-betweens never queue, and a real frame is never dropped for them.
    With ``factor`` 1 every frame is due when it arrives, unchanged.
    """

    def __init__(self, factor: int, interpolator: FlowInterpolator | None = None,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        assert 1 <= factor <= MAX_FACTOR, factor
        self.factor = factor
        self.interpolator = interpolator if interpolator is not None or factor == 1 else FlowInterpolator()
        self._timer = timer
        self._pair_costs: deque[float] = deque(maxlen=COST_SAMPLES)
        self._frame_costs: deque[float] = deque(maxlen=COST_SAMPLES)
        self._slots: list[_Slot] = []
        self._pair: Pair | None = None
        self._last: np.ndarray | None = None         # the newest engine frame
        self._last_at: float | None = None
        self._last_source: str | None = None         # the session that made it
        self._periods: deque[float] = deque(maxlen=PERIOD_SAMPLES)
        self.engine_frames = self.synthesised = self.cuts = self.stalls = self.skipped = 0

    @property
    def period_s(self) -> float | None:
        """The median of the recent engine periods (None before two frames)."""
        return _median(self._periods)

    def reset(self) -> None:
        """Forget the pending slots and the previous frame (an output that failed starts afresh)."""
        self._slots, self._pair, self._last, self._last_at = [], None, None, None

    def push(self, frame: np.ndarray, now_s: float, source: str | None = None) -> None:
        """An engine frame arrived at ``now_s`` from session ``source``: plan its slots."""
        self.engine_frames += 1
        self.skipped += len(self._slots)
        self._slots, self._pair = [], None
        previous, previous_at, previous_source = self._last, self._last_at, self._last_source
        self._last, self._last_at, self._last_source = frame, now_s, source
        if self.factor == 1 or previous is None or previous_at is None:
            self._slots = [_Slot(now_s, 1.0, frame)]
            return
        gap_s = now_s - previous_at
        period_s = self.period_s
        if gap_s <= MAX_PERIOD_S:
            self._periods.append(gap_s)
        if gap_s > MAX_PERIOD_S or (period_s is not None and gap_s > STALL_PERIODS * period_s):
            self.stalls += 1
            self._slots = [_Slot(now_s, 1.0, frame)]
            return
        step_s = (period_s if period_s is not None else gap_s) / self.factor
        assert self.interpolator is not None
        # An output that shows whichever session made the latest frame never morphs one session into another.
        pair = None
        if source == previous_source:
            started = self._timer()
            pair = self.interpolator.pair(previous, frame)
            self._pair_costs.append(self._timer() - started)
        if pair is None or pair.is_cut:
            self.cuts += 1
        else:
            self._pair = pair
        # The lead stays the same across a cut, whose held frames cost nothing, so the rate does not jump there;
        # at most a step, so B stays due before the next engine frame: a machine too slow for the in-betweens
        # shows them late rather than lagging further.
        frame_cost = _median(self._frame_costs) or 0.0
        lead_s = min((_median(self._pair_costs) or 0.0) + frame_cost, step_s)
        make_s = frame_cost if self._pair else 0.0
        self._slots = [_Slot(now_s + lead_s + i * step_s - make_s, (i + 1) / self.factor,
                             None if self._pair else previous) for i in range(self.factor - 1)]
        self._slots.append(_Slot(now_s + lead_s + (self.factor - 1) * step_s, 1.0, frame))

    def take_pending(self) -> np.ndarray | None:
        """The engine frame whose slot has not come yet, taken to be shown now (its in-betweens left count as
        skipped); None when it was shown. The caller shows it before it pushes the next engine frame, which
        would otherwise drop it: one that comes a little early (jitter, a faster engine) must not cost a real
        frame, only in-betweens."""
        if not self._slots:
            return None
        self.skipped += len(self._slots) - 1
        frame, self._slots = self._slots[-1].frame, []
        return frame

    def next_due(self) -> float | None:
        return self._slots[0].due_s if self._slots else None

    def pop_due(self, now_s: float) -> np.ndarray | None:
        """The frame to show now, or None. When several are due (the sink was slow) only the newest
        is made and shown; the older ones count as skipped, as a slow output's drops do."""
        index = bisect.bisect_right([slot.due_s for slot in self._slots], now_s)
        if index == 0:
            return None
        slot = self._slots[index - 1]
        self.skipped += index - 1
        del self._slots[:index]
        if slot.frame is not None:
            return slot.frame
        assert self._pair is not None and self.interpolator is not None
        self.synthesised += 1
        started = self._timer()
        made = self.interpolator.frame(self._pair, slot.t)
        self._frame_costs.append(self._timer() - started)
        return made

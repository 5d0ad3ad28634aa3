"""A dissolve across an engine swap, so that a new model (or LoRA set, or ControlNet set) fades in
instead of cutting.

When the worker swaps in a freshly loaded engine, each session's last output of the old one is
held and dissolved into the new engine's frames over ``crossfade_s`` seconds. Holding a frame,
rather than running both engines through the fade, keeps the frame time flat: a second engine
in the loop would halve the frame rate exactly when the audience is watching the change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class _Fade:
    source: np.ndarray     # the old engine's last frame for this session, uint8 [H, W, 3]
    started: float         # monotonic time of the swap
    duration: float


class Crossfade:
    """Per session: the last output, and a fade in progress after an engine swap."""

    def __init__(self) -> None:
        self._look: object | None = None
        self._last: dict[str, np.ndarray] = {}
        self._fades: dict[str, _Fade] = {}

    def swap(self, look: object | None, now: float, duration: float) -> None:
        """Tell what made this turn's frames (the engine, and what it loaded: its LoRA set, its
        ControlNets); a change starts a fade for every session. None: frames passed through."""
        if look == self._look:
            return
        previous, self._look = self._look, look
        self._fades.clear()
        if previous is None or look is None or duration <= 0:
            return  # from nothing (start-up, pass-through) there is nothing to fade from
        for session_id, frame in self._last.items():
            self._fades[session_id] = _Fade(frame, now, duration)

    def apply(self, session_id: str, frame: np.ndarray, now: float) -> np.ndarray:
        """This session's frame, dissolved from the held one while a fade runs; remembered as its last."""
        fade = self._fades.get(session_id)
        if fade is not None:
            alpha = (now - fade.started) / fade.duration
            if alpha >= 1.0 or fade.source.shape != frame.shape:
                del self._fades[session_id]
            else:
                alpha = max(alpha, 0.0)
                mixed = fade.source.astype(np.float32) * (1.0 - alpha) + frame.astype(np.float32) * alpha
                frame = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        self._last[session_id] = frame
        return frame

    def fading(self, session_id: str) -> bool:
        return session_id in self._fades

    def held(self) -> int:
        """How many sessions' last frames are held."""
        return len(self._last)

    def forget_one(self, session_id: str) -> None:
        """A new session under this name: nothing of an earlier one's frames may fade into its own."""
        self._last.pop(session_id, None)
        self._fades.pop(session_id, None)

    def forget(self, session_ids: set[str]) -> None:
        """Drop sessions that have gone, so their last frames do not pile up."""
        for session_id in list(self._last):
            if session_id not in session_ids:
                self._last.pop(session_id, None)
                self._fades.pop(session_id, None)

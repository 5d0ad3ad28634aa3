"""An image sequence on disk: every frame an output gets, numbered, to keep or cut a show."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from sdbridge.outputs.base import Output, OutputError


class RecordOutput(Output):
    kind = "record"

    def __init__(self, target: str | None) -> None:
        super().__init__(target)
        self.folder = Path(target or "recordings").expanduser()
        self.count = 0

    def open(self, width: int, height: int, fps: float) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot record into {self.folder}: {exc.strerror or exc}") from exc
        # Numbered on from what is there, so a restart never overwrites the first half of a show.
        existing = [int(p.stem) for p in self.folder.glob("*.png") if p.stem.isdigit()]
        self.count = max(existing, default=-1) + 1

    def send(self, frame: np.ndarray) -> None:
        path = self.folder / f"{self.count:06d}.png"
        # Fast PNG (level 1): at 512² about 4 ms a frame, lossless.
        if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OutputError(f"could not write {path}")
        self.count += 1

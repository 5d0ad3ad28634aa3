"""An image sequence on disk: every frame an output gets, numbered, to keep or cut a show."""

from __future__ import annotations

import shutil
import tempfile
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

    def check(self) -> None:
        """Create the folder and write (then remove) a probe file in it: OutputError naming the
        folder and the OS's reason when it cannot hold a recording. Called at start-up (serve,
        doctor) so that a folder nobody can write is found before the show, not at its first frame."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # A hidden name that is no *.png: a probe left by a crash never shifts the numbering.
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".sdbridge-probe-") as probe:
                probe.write(b"sdbridge")
                probe.flush()
        except OSError as exc:
            raise OutputError(f"cannot record into {self.folder}: {exc.strerror or exc}") from exc

    def open(self, width: int, height: int, fps: float) -> None:
        self.check()
        # Numbered on from what is there, so a restart never overwrites the first half of a show.
        # ASCII digits only: isdigit() also takes "²" and other digits int() refuses (QA 75 F8).
        existing = [int(p.stem) for p in self.folder.glob("*.png") if p.stem.isascii() and p.stem.isdigit()]
        self.count = max(existing, default=-1) + 1

    def send(self, frame: np.ndarray) -> None:
        path = self.folder / f"{self.count:06d}.png"
        # Fast PNG (level 1): at 512² about 4 ms a frame, lossless.
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise OutputError(f"could not encode frame {self.count} ({frame.shape}, {frame.dtype}) as PNG")
        # Written by Python, not cv2.imwrite: a failed write then says why (ENOSPC: "No space left on
        # device") where libpng only returns False and prints "Write Error" to stderr.
        try:
            with open(path, "wb") as file:
                file.write(encoded.data)
        except OSError as exc:
            # A partial file would be a broken frame and would push the numbering on at the retry.
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only disk refuses even this (EROFS, not ENOENT): the write's error is the news
                pass
            raise OutputError(f"could not write {path}: {exc.strerror or exc}{_free_space(self.folder)}") from exc
        self.count += 1


def _free_space(folder: Path) -> str:
    """'; N MB free there' for the error message: a full disk shows as what it is."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 1e6:.1f} MB free there)"

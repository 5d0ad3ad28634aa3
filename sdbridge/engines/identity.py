"""The identity engine: frames pass through untouched, so a benchmark measures the bridge alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdbridge.engines.base import Engine, StreamState


class IdentityEngine(Engine):
    name = "identity"

    def step(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        if frames is None:
            # txt2img on the identity engine: a mid-grey frame, so viewers see the stream is alive.
            width, height = self.resolution
            return torch.full((len(states), height, width, 3), 128, dtype=torch.uint8, device=self.device)
        return frames

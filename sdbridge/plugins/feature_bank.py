"""Feature bank: self-attention also attends to the previous frame's keys and values (StreamV2V).

Works inside the engine: it puts :mod:`sdbridge.engines.feature_bank`'s processors into the
diffusion UNet's self-attention layers while it is on, and takes them out when it is turned off
or the engine changes. The animatediff engine's motion UNet shares those layers (and the time
embedding the bank counts steps on), so it runs with the bank too, one entry per window place.
Costs one extra set of keys and values per self-attention layer, so attention time roughly doubles
at the UNet's highest resolution; memory per session is the keys and values of one frame per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdbridge.engines import feature_bank as bank_ops
from sdbridge.plugins.base import Plugin, param

FORGET_AFTER_FRAMES = 300  # a session unseen this long (gone, or skipping) loses its bank


class FeatureBankPlugin(Plugin):
    name = "feature_bank"
    doc = "Each frame's self-attention also attends to the previous frame's keys and values."
    default_order = 30
    params = (
        param("feature_bank", "strength", "float", 0.7,
              "Weight of the previous frame's tokens in self-attention: 0 off, 1 as much as the frame's own.",
              minimum=0.0, maximum=1.0),
    )

    def __init__(self) -> None:
        self.bank = bank_ops.FeatureBank()
        self.unet: Any = None
        self._frames = 0
        self._seen: dict[str, int] = {}

    def before_step(self, engine: Any | None, session_ids: list[str], params: Mapping[str, Any]) -> None:
        parts = getattr(engine, "parts", None) if engine is not None else None
        unet = getattr(parts, "unet", None)
        if unet is not self.unet:
            if self.unet is not None:
                bank_ops.detach(self.unet)
            self.bank.forget()
            self.unet = unet
            if unet is not None:
                bank_ops.attach(unet, self.bank)
        if unet is None:
            return
        self.bank.strength = float(params["strength"])
        self._frames += 1
        for session_id in session_ids:
            self._seen[session_id] = self._frames
        stale = {s for s, seen in self._seen.items() if self._frames - seen > FORGET_AFTER_FRAMES}
        if stale:
            for session_id in stale:
                del self._seen[session_id]
            self.bank.forget(keep=set(self._seen))
        self.bank.begin_frame(session_ids)

    def after_step(self) -> None:
        self.bank.end_frame()

    def cut(self, session_id: str) -> None:
        # Back after a pause: its first frame attends to no features from before it.
        self._seen.pop(session_id, None)
        self.bank.forget(keep=set(self._seen))

    def turned_on(self) -> None:
        self.bank.forget()

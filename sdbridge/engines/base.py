"""The engine interface: what the worker calls once per frame.

An engine owns a model (or none) on one device. The worker calls, in order:

1. ``load(source, device, dtype)`` once, off the frame path (slow: weights, compile);
2. ``prepare(params)`` at each frame boundary where parameters changed (encode the prompt,
   set timesteps); cheap when nothing that matters to this engine changed;
3. ``step(frames, states)`` per batch: ``frames`` is uint8 ``[B, H, W, 3]`` on ``self.device``
   at ``self.resolution`` (or ``None`` in txt2img), ``states`` one :class:`StreamState` per
   session in the batch; it returns uint8 ``[B, H, W, 3]`` on the device.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sdbridge.errors import ModelError


#: Session-state keys (``StreamState.data``) that hold a session's inputs rather than its past frames.
CONDITIONS = "conditions"                 # channel -> latest condition frame, uint8 [H, W, 3]
SLOT_IMAGES = "controlnet.images"         # ControlNet slot -> this frame's condition image, uint8 [H, W, 3]
INPUT_KEYS = frozenset({CONDITIONS, SLOT_IMAGES})
#: The session's last output, uint8 [H, W, 3]: a past frame (a pause drops it), which a ControlNet slot reads
#: as its source when its channel is OUTPUT_CHANNEL (TemporalNet-style feedback).
LAST_OUTPUT = "output.last"
OUTPUT_CHANNEL = -1
#: Marks inside a key's dict that outlive a pause: a plugin turned off for this session after a failure
#: (plugins/manager.py) stays off, rather than fail again, and again tell the clients, after each pause (QA 26).
KEPT_MARKS = ("_failed", "_generation")


@dataclass
class StreamState:
    """What one session's stream keeps between frames: engines and plugins own keys in ``data``."""

    session_id: str
    data: dict[str, Any] = field(default_factory=dict)

    def cut(self) -> None:
        """The stream resumed after a pause: drop what the engine and plugins keep of its earlier frames
        (the frames in flight, a motion window, a feedback frame), so that nothing from before the pause
        shows after it, as for a session that has just joined. Its inputs stay: a condition frame sent once
        still holds, and so does a plugin's failure mark (KEPT_MARKS)."""
        for key in [key for key in self.data if key not in INPUT_KEYS]:
            value = self.data[key]
            if isinstance(value, dict) and value.get(KEPT_MARKS[0]):
                self.data[key] = {mark: value[mark] for mark in KEPT_MARKS if mark in value}
            else:
                del self.data[key]


class Engine(abc.ABC):
    """A pipeline backend. Subclasses set ``name`` and implement the three calls."""

    name: ClassVar[str]
    #: whether the engine needs loaded weights (the preview and identity engines do not)
    needs_model: ClassVar[bool] = False

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.resolution: tuple[int, int] = (512, 512)  # (width, height)
        self.source: str | None = None
        # The operator's models folder (--models-dir; None: the default), set by the host on every engine: plugins
        # find their models there whatever engine runs (the safety filter's checker with the identity engine too).
        self.models_dir: str | None = None
        # Set by the worker while plugins with an on_latents hook are on: (latents, states) -> latents,
        # called on the denoised latents [B, 4, h, w] just before decoding.
        self.latent_hook: Callable[[torch.Tensor, Sequence[StreamState]], torch.Tensor] | None = None

    def load(self, source: str | None, device: torch.device, dtype: torch.dtype) -> None:
        """Load weights (if any) onto ``device``; raise ModelError with the reason on failure."""
        self.device = device
        self.dtype = dtype
        self.source = source

    def prepare(self, params: Mapping[str, Any]) -> None:
        """Take the parameters for the next frames; keep this cheap when nothing changed."""
        self.resolution = (int(params["width"]), int(params["height"]))

    @abc.abstractmethod
    def step(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` in (or None for txt2img), uint8 ``[B, H, W, 3]`` out."""

    def close(self) -> None:
        """Free the model; the engine is not used again."""

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "model": self.source, "resolution": list(self.resolution)}


# Lazy: importing the diffusion engine pulls diffusers and transformers (seconds), which the
# preview engine does not need.
_ENGINES: dict[str, str] = {
    "identity": "sdbridge.engines.identity:IdentityEngine",
    "preview": "sdbridge.engines.preview:PreviewEngine",
    "diffusion": "sdbridge.engines.diffusion:DiffusionEngine",
    "animatediff": "sdbridge.engines.animatediff:AnimateDiffEngine",
    "compiled": "sdbridge.engines.compiled:CompiledEngine",
}


def engine_names() -> list[str]:
    return list(_ENGINES)


def create_engine(name: str) -> Engine:
    try:
        target = _ENGINES[name]
    except KeyError:
        raise ModelError(f"unknown engine {name!r} (known: {', '.join(_ENGINES)})", code="unknown_engine") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls()

"""ControlNet: loading ControlNetModels, live slots, and the residuals added to each UNet call.

A ControlNet comes from the ControlNet folder (``Settings.controlnet_dir``, by default
``<models_dir>/controlnet``): a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
or a single ``.safetensors`` file, in diffusers' key layout or the original (LDM, ``control_model.``)
one that A1111 users download. A single file without a ``<name>.json`` config beside it takes its
architecture from the loaded model's UNet, as every ControlNet of a family shares it
(``ControlNetModel.from_unet``). Pickle files (``.pth``) only with ``allow_pickle``, through
``torch.load(weights_only=True)``.

Live use (docs/protocol.md, "ControlNet and condition streams"): :data:`SLOTS` fixed slots, each
with its own model, conditioning scale, guidance start/end (fractions of this frame's steps),
preprocessor and condition source (0: the input frame; 1..255: the latest frame the client sent
on that channel).
Scale 0, an empty model or a start >= end turn a slot off and cost nothing. A model named in a
slot loads in a background thread while the slot keeps serving the model it had; a model that
fails to load is reported and the old one serves on.

The residuals follow diffusers' ``StableDiffusionControlNetImg2ImgPipeline``: the condition image
in [0, 1], doubled with classifier-free guidance; the step kept when
``not (i / n < start or (i + 1) / n > end)``; several ControlNets' residuals summed in slot order.
The eager engine applies them through :class:`ControlStack`; the compiled engine takes the slots'
:meth:`ControlNets.units` and runs each ControlNet as a graph of its own with a per-row scale tensor
(engines/compiled.py, docs/speed.md "ControlNet slots").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdbridge.bridge import codec
from sdbridge.engines.background_load import BackgroundLoads
from sdbridge.engines.base import CONDITIONS, LAST_OUTPUT, OUTPUT_CHANNEL, SLOT_IMAGES
from sdbridge.engines.models import list_add_on_models, resolve_add_on_model, serialized_load
from sdbridge.engines.preprocessors import Options, Preprocessors
from sdbridge.errors import ModelError, SdbridgeError
from sdbridge.params import CONTROLNET_SLOTS as SLOTS

log = logging.getLogger(__name__)

CONTROL_MODES = ("balanced", "prompt", "controlnet")  # A1111: Balanced, My prompt / ControlNet is more important
SOFT_WEIGHT = 0.825  # sd-webui-controlnet's soft injection: residual i of 13 weighs SOFT_WEIGHT ** (12 - i)
HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")
#: In a session's data: ControlNet slot -> (source, (size, resize mode, preprocessor, options), its condition image)
PREPARED = "controlnet.prepared"


# --- loading ---------------------------------------------------------------------------------------


def list_controlnets(folder: Path | None) -> list[str]:
    """The names clients may use: folders with a config.json and single weight files, sorted."""
    return list_add_on_models(folder)


def resolve_controlnet(name: str, folder: Path | None) -> Path:
    """A name (``canny``, ``canny.safetensors``, A1111's ``canny [abcd1234]``) -> a path inside ``folder``."""
    name = HASH_SUFFIX.sub("", name.strip())
    return resolve_add_on_model(name, folder, what="controlnet", setting="controlnet_dir")


@serialized_load
def load_controlnet(path: Path, unet: Any, device: torch.device, dtype: torch.dtype, *,
                    allow_pickle: bool = False) -> Any:
    """A ControlNetModel for ``unet``'s family, on ``device`` in ``dtype``; ModelError says what is wrong."""
    from diffusers import ControlNetModel

    from sdbridge.engines.footprint import check_fits, free_device_bytes, model_bytes
    from sdbridge.engines.models import load_pretrained_folder

    free = free_device_bytes(device)  # the running model serves on: the ControlNet must fit beside it
    needed = model_bytes(path, dtype) if free is not None else None
    if free is not None and needed is not None:
        check_fits(needed, free, what=f"controlnet {path.name}", device=str(device))
    try:
        if path.is_dir():
            model = load_pretrained_folder(path, ControlNetModel, dtype, "ControlNet", device=device)
        else:
            model = _load_single_file(path, unet, dtype, allow_pickle)
        _check_family(path, model, unet)
        return model.to(device).eval().requires_grad_(False)
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelError(f"out of device memory loading controlnet {path.name}: {exc}", code="out_of_memory") from exc


def _load_single_file(path: Path, unet: Any, dtype: torch.dtype, allow_pickle: bool) -> Any:
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from sdbridge.engines.models import load_weight_file

    state = load_weight_file(path, "ControlNet", allow_pickle=allow_pickle)
    sidecar = path.with_suffix(".json")
    try:
        if sidecar.is_file():
            config = dict(ControlNetModel.load_config(sidecar))
        else:
            config = dict(ControlNetModel.from_unet(unet, load_weights_from_unet=False).config)
        if "time_embedding.linear_1.weight" not in state:  # the original LDM layout
            state = convert_controlnet_checkpoint(state, config)
        model = ControlNetModel.from_config(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{path}: not a ControlNet for this model ({type(exc).__name__}: {str(exc)[:300]})") from exc
    if missing or unexpected:
        raise ModelError(f"{path}: not a ControlNet for this model: {len(missing)} weights missing "
                         f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    return model.to(dtype)


def _family(config: Any) -> str:
    return "SDXL" if config.get("addition_embed_type") == "text_time" else "SD 1.x/2.x"


def _check_family(path: Path, model: Any, unet: Any) -> None:
    ours, theirs = _family(unet.config), _family(model.config)
    if ours != theirs:
        raise ModelError(f"{path}: an {theirs} ControlNet cannot run on the loaded {ours} model",
                         code="model_mismatch")
    ours, theirs = unet.config.cross_attention_dim, model.config.cross_attention_dim
    if ours != theirs or list(unet.config.block_out_channels) != list(model.config.block_out_channels):
        raise ModelError(f"{path}: a ControlNet for another model family (text width {theirs}, blocks "
                         f"{list(model.config.block_out_channels)}; the loaded model has {ours}, "
                         f"{list(unet.config.block_out_channels)})", code="model_mismatch")


# --- the residuals ---------------------------------------------------------------------------------


@dataclass
class ControlUnit:
    """One ControlNet applied to a batch: its model, condition image and schedule."""

    model: Any
    image: torch.Tensor                  # [B, 3, H, W] in [0, 1], the model's dtype, on its device
    scale: float | torch.Tensor          # a float, or per image [B, 1, 1, 1] (0 where a session has no condition)
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    slot: int = 0                        # the live slot it serves (0-based); the compiled engine keys graphs by it

    def keeps(self, index: int, count: int) -> bool:
        return not (index / count < self.start or (index + 1) / count > self.end)


class ControlStack:
    """The UNet's extra arguments for one step: ``stack(model_input, t, embeddings, index, count, added_cond)``.

    ``added_cond`` is SDXL's ``{"text_embeds", "time_ids"}`` with the batch's rows (None for SD 1.x/2.x):
    an SDXL ControlNet takes the same added conditioning as its UNet.

    Guided, the batch is ``copies`` groups of rows, the unconditional group first: two for plain
    guidance, one more for each further part of a composable (``AND``) prompt.
    """

    def __init__(self, units: Sequence[ControlUnit], guided: bool, copies: int = 2) -> None:
        self.units = list(units)
        self.guided = guided
        self.copies = copies if guided else 1
        self._images = [torch.cat([unit.image] * self.copies) for unit in self.units]

    def __call__(self, model_input: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, index: int,
                 count: int, added_cond: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        extra = {"added_cond_kwargs": added_cond} if added_cond is not None else {}
        for unit, image in zip(self.units, self._images):
            if not unit.keeps(index, count):
                continue
            scale = unit.scale if isinstance(unit.scale, float) else 1.0
            unit_down, unit_mid = unit.model(model_input, t, encoder_hidden_states=embeddings, controlnet_cond=image,
                                             conditioning_scale=scale, guess_mode=False, return_dict=False,
                                             **extra)
            unit_down, unit_mid = self._weigh(unit, list(unit_down), unit_mid)
            if down is None or mid is None:
                down, mid = unit_down, unit_mid
            else:
                down = [before + after for before, after in zip(down, unit_down)]
                mid = mid + unit_mid
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _weigh(self, unit: ControlUnit, down: list[torch.Tensor],
               mid: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        weight: torch.Tensor | None = None
        if isinstance(unit.scale, torch.Tensor):
            weight = torch.cat([unit.scale] * self.copies)
        if unit.mode == "controlnet" and self.guided:
            # sd-webui-controlnet's "ControlNet is more important": the control acts on the conditional rows only.
            group = mid.shape[0] // self.copies
            mask = torch.cat([torch.zeros(group), torch.ones(mid.shape[0] - group)])
            mask = mask.to(mid.device, mid.dtype)[:, None, None, None]
            weight = mask if weight is None else weight * mask
        if weight is not None:
            down = [sample * weight for sample in down]
            mid = mid * weight
        if unit.mode != "balanced":
            # sd-webui-controlnet's soft injection, in both of its other modes (soft_injection = mode != Balanced;
            # "ControlNet is more important" has it beside the mask, QA 86 F2): the residuals in order, the
            # middle block's last, weigh 0.825 ** (12 - i). SD 1.x/2.x's 13 end at 1 on the middle block; the
            # extension takes the first 10 of the 13 weights for SDXL's 10, so there they end at 0.825 ** 3.
            down = [sample * SOFT_WEIGHT ** (12 - i) for i, sample in enumerate(down)]
            mid = mid * SOFT_WEIGHT ** (12 - len(down))
        return down, mid


@dataclass
class RequestUnit:
    """One ControlNet unit of a one-shot request (A1111's alwayson_scripts.controlnet), condition ready."""

    model: Any
    image: np.ndarray                    # the condition, RGB uint8 [H, W, 3] at the request's size
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    name: str = ""
    module: str = "none"
    save_detected_map: bool = True      # the A1111 API returns the condition beside the images, as the extension


def request_stack(units: Sequence[RequestUnit], batch: int, height: int, width: int, device: torch.device,
                  dtype: torch.dtype, guided: bool, copies: int = 2) -> ControlStack | None:
    """The residual hook of a one-shot pass at ``width`` x ``height`` pixels (hires passes are larger);
    ``copies``: the guided batch's groups of rows (see :class:`ControlStack`)."""
    import cv2

    built = []
    for unit in units:
        if unit.weight <= 0 or unit.end <= unit.start:
            continue
        image = unit.image
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].to(dtype) / 255.0
        built.append(ControlUnit(unit.model, tensor.expand(batch, -1, -1, -1), float(unit.weight), unit.start,
                                 unit.end, unit.mode))
    return ControlStack(built, guided, copies) if built else None


# --- live slots ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One slot's live parameters (``controlnet_<n>_*``)."""

    model: str = ""
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    channel: int = 0
    low_threshold: int = 100
    high_threshold: int = 200

    @property
    def active(self) -> bool:
        return bool(self.model) and self.scale > 0 and self.end > self.start

    @property
    def options(self) -> Options:
        return Options(self.low_threshold, self.high_threshold)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], number: int) -> Slot:
        prefix = f"controlnet_{number}_"
        return cls(model=str(params.get(prefix + "model", "")).strip(), scale=float(params.get(prefix + "scale", 1.0)),
                   start=float(params.get(prefix + "start", 0.0)), end=float(params.get(prefix + "end", 1.0)),
                   preprocessor=str(params.get(prefix + "preprocessor", "none")),
                   channel=int(params.get(prefix + "channel", 0)),
                   low_threshold=int(params.get(prefix + "low_threshold", 100)),
                   high_threshold=int(params.get(prefix + "high_threshold", 200)))


Notify = Callable[[dict[str, Any]], None]


class ControlNets:
    """The engine's ControlNet slots: live parameters, models loaded in the background, residuals per batch.

    The worker thread calls :meth:`prepare` (parameters), :meth:`condition` (per session, in the CPU
    pool: the condition images) and :meth:`for_batch` (inside the engine step). Models load in the
    background (engines/background_load.py) and are taken at a frame boundary.
    """

    def __init__(self, unet: Any, device: torch.device, dtype: torch.dtype, folder: Path | None, *,
                 allow_pickle: bool = False, notify: Notify | None = None) -> None:
        self.unet = unet
        self.device = device
        self.dtype = dtype
        self.folder = folder
        self.allow_pickle = allow_pickle
        self.notify = notify or (lambda event: None)
        self.preprocessors = Preprocessors(folder / "annotators" if folder else None, device)
        self.slots: tuple[Slot, ...] = tuple(Slot() for _ in range(SLOTS))
        self.models: dict[str, Any] = {}           # name -> ControlNetModel, written by the worker thread only
        self.serving: list[str | None] = [None] * SLOTS   # the model each slot runs now (the old one while loading)
        self.failed: dict[str, str] = {}           # name -> why it did not load; not retried until renamed
        self.errors: dict[int, str] = {}           # slot -> a preprocessing error already reported
        self.loader: BackgroundLoads[Any] = BackgroundLoads("controlnet", self.model, notify=self.notify,
                                                             keeps=self._what_serves)
        # uint8 host frames onto the device (the compiled engine's: a pinned buffer, no wait for the stream);
        # None: a plain copy, which on CUDA waits for the work queued before it.
        self.upload: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._present_masks: dict[tuple[bool, ...], torch.Tensor] = {}
        # The engine's resolution (width, height) and the stream's resize mode, from the parameters: each slot's
        # source is fitted to them, in txt2img too, where no input frame gives the size (QA 63 F5).
        self.size: tuple[int, int] | None = None
        self.resize_mode = "crop"

    def _what_serves(self, name: str) -> str:
        """The end of a failed load's sentence: what the slots asking for ``name`` run meanwhile. On a new engine (a
        model switch: an SD 1.5 ControlNet on SDXL) they had none, and "keeps the ControlNet it had" was untrue
        (QA 47)."""
        kept = sorted({self.serving[index] for index, slot in enumerate(self.slots)
                       if slot.model == name and self.serving[index]})
        if kept:
            return f"its slot keeps the ControlNet it had ({', '.join(kept)})"
        return "its slot runs without a ControlNet"

    # --- parameters and models (worker thread) ---

    def prepare(self, params: Mapping[str, Any]) -> None:
        slots = tuple(Slot.from_params(params, number) for number in range(1, SLOTS + 1))
        if "width" in params and "height" in params:
            self.size = (int(params["width"]), int(params["height"]))
        self.resize_mode = str(params.get("resize_mode", "crop"))
        if slots != self.slots:  # LFOs prepare every frame: a preprocessing error is told once per real change
            self.errors.clear()
        self.slots = slots
        wanted = {slot.model for slot in self.slots if slot.model}
        self.failed = {name: why for name, why in self.failed.items() if name in wanted}
        self.loader.start(sorted(wanted - set(self.models) - set(self.failed)))
        self.refresh()  # after the loads are registered: slots whose model is here wait for the rest of the set

    def refresh(self) -> None:
        """Take finished loads; once none is running, point the slots at their models together (a set changes
        at once, never half old, half new), each keeping its old model if its new one failed."""
        taken = self.loader.take()
        self.models.update(taken.ready)
        self.failed.update(taken.failed)
        if taken.loading:
            return
        for index, slot in enumerate(self.slots):
            if not slot.model:
                self.serving[index] = None
            elif slot.model in self.models:
                self.serving[index] = slot.model
        keep = set(self.serving) | {slot.model for slot in self.slots}
        for name in [name for name in self.models if name not in keep]:
            del self.models[name]

    @property
    def warm(self) -> Callable[[Any], None] | None:
        """Called on the loader thread with each new model before it is handed over (the compiled engine
        compiles its graphs there, so the old set serves until the new one is ready to run fast)."""
        return self.loader.ready_hook

    @warm.setter
    def warm(self, hook: Callable[[Any], None] | None) -> None:
        self.loader.ready_hook = hook

    @property
    def loads(self) -> int:
        return self.loader.loads

    def wait(self, timeout_s: float = 60.0) -> None:
        """Until no load is running, then take the results (tests, one-shot requests)."""
        self.loader.wait(timeout_s)
        self.refresh()

    def model(self, name: str) -> Any:
        """A model by name, loaded now on the calling thread when it is not loaded (one-shot requests)."""
        # The slots key models by the bare name: A1111's "edges [hash]" (as /controlnet/model_list gives it) missed
        # the live copy and loaded a second one into device memory (QA 86 F1).
        name = HASH_SUFFIX.sub("", name.strip())
        loaded = self.models.get(name) or self.loader.peek(name)
        if loaded is not None:
            return loaded
        return load_controlnet(resolve_controlnet(name, self.folder), self.unet, self.device, self.dtype,
                               allow_pickle=self.allow_pickle)

    # --- condition images (CPU pool, per session) ---

    def channels(self) -> frozenset[int]:
        """The condition channels (> 0) that active slots read: the worker decodes only those."""
        return frozenset(slot.channel for slot in self.slots if slot.active and slot.channel > 0)

    def condition(self, data: dict[str, Any], image: np.ndarray | None) -> None:
        """This frame's condition image for each active slot, into ``data[SLOT_IMAGES]``.

        ``image`` is the input frame at the engine's resolution (None in txt2img); ``data[CONDITIONS]`` holds the
        latest frame of each condition channel, ``data[LAST_OUTPUT]`` the session's last output (channel -1).
        A slot whose source has no frame yet gets none, and adds nothing for this session.

        Each source is fitted to the engine's resolution (the input frame's size, else the one :meth:`prepare`
        took) with the stream's resize mode: the last output, or a condition frame decoded before a resolution
        change, has the old size, and in txt2img nothing fitted it (QA 63 F5: every frame failed, for good).
        A condition channel's frame is prepared once (fitted and preprocessed) and kept in ``data[PREPARED]``
        while it, the size, the mode, the preprocessor and its options stay: a condition frame sent once ran its
        preprocessor again at every input frame (QA 63 F4: canny 70 ms at 1024²). The input frame and the last
        output (a plugin may hand back a buffer it reuses) are new at every frame and prepared each time.
        """
        images: dict[int, np.ndarray] = {}
        kept: dict[int, tuple[Any, ...]] = data.get(PREPARED, {})
        prepared: dict[int, tuple[Any, ...]] = {}  # one entry per slot at most, for the slots that act now
        streams = data.get(CONDITIONS, {})
        size = (image.shape[1], image.shape[0]) if image is not None else self.size
        for index, slot in enumerate(self.slots):
            if not slot.active:
                continue
            source = (image if slot.channel == 0 else data.get(LAST_OUTPUT) if slot.channel == OUTPUT_CHANNEL
                      else streams.get(slot.channel))
            if source is None:
                continue
            key = (size, self.resize_mode, slot.preprocessor, slot.options)
            entry = kept.get(index)
            if entry is not None and entry[0] is source and entry[1] == key:  # the source itself, held: no id reuse
                prepared[index], images[index] = entry, entry[2]
                continue
            try:
                fitted = source
                if size is not None and (source.shape[1], source.shape[0]) != size:
                    fitted = codec.fit(source, size[0], size[1], self.resize_mode)
                images[index] = self.preprocessors.run(slot.preprocessor, fitted, slot.options)
            except Exception as exc:  # a failing preprocessor costs its slot, never the frame
                if index not in self.errors:  # once per parameter change, not per frame
                    self.errors[index] = str(exc)
                    if isinstance(exc, SdbridgeError):
                        code, reason = exc.code, str(exc)
                    else:
                        log.exception("preprocessor %s failed", slot.preprocessor)
                        code, reason = "preprocessor_failed", f"{type(exc).__name__}: {exc}"
                    self.notify({"type": "error", "code": code, "message": f"controlnet slot {index + 1}: "
                                                                           f"{reason}; the slot adds nothing until "
                                                                           f"this is fixed"})
                continue
            if slot.channel > 0:  # the input frame and the last output are new at every frame: nothing to keep
                prepared[index] = (source, key, images[index])
        data[SLOT_IMAGES] = images
        if prepared:
            data[PREPARED] = prepared
        else:
            data.pop(PREPARED, None)

    # --- the batch (engine step) ---

    def for_batch(self, states: Sequence[Any], guided: bool) -> ControlStack | None:
        """The residual hook for this batch, or None when no slot is active (no work at all)."""
        units = self.units(states)
        return ControlStack(units, guided) if units else None

    def units(self, states: Sequence[Any]) -> list[ControlUnit]:
        """This batch's active slots in slot order, each with its condition images [B, 3, H, W] and scale
        (a float, or [B, 1, 1, 1] with 0 for a session that has no condition image); the compiled engine
        runs them itself (engines/compiled.py), the eager one through :meth:`for_batch`."""
        self.refresh()
        units = []
        for index, slot in enumerate(self.slots):
            name = self.serving[index]
            if not slot.active or name is None:
                continue
            images = [state.data.get(SLOT_IMAGES, {}).get(index) for state in states]
            present = [item is not None for item in images]
            if not any(present):
                continue
            shape = next(item for item in images if item is not None).shape
            stacked = torch.from_numpy(np.stack([item if item is not None else np.zeros(shape, np.uint8)
                                                 for item in images]))
            on_device = self.upload(stacked) if self.upload is not None else stacked.to(self.device)
            tensor = on_device.permute(0, 3, 1, 2).to(self.dtype) / 255.0
            scale: float | torch.Tensor = slot.scale
            if not all(present):
                scale = self._present_mask(tuple(present)) * slot.scale
            units.append(ControlUnit(self.models[name], tensor, scale, slot.start, slot.end, slot=index))
        return units

    def _present_mask(self, present: tuple[bool, ...]) -> torch.Tensor:
        """[B, 1, 1, 1]: 1 for a session with its condition image, 0 without; copied to the device once per
        pattern, so that a scale moved live (an LFO) is a multiply on the device, not a copy from the host."""
        mask = self._present_masks.get(present)
        if mask is None:
            if len(self._present_masks) > 64:
                self._present_masks.clear()
            mask = torch.tensor(present, dtype=self.dtype, device=self.device)[:, None, None, None]
            self._present_masks[present] = mask
        return mask

    def describe(self) -> dict[str, Any]:
        """For /health and /stats (any thread): what each slot runs from its next frame on."""
        pending = self.loader.snapshot()
        loaded = set(self.models) | set(pending.ready)
        loading = sorted(self.loader.loading)
        failed = {**self.failed, **pending.failed}
        serving = list(self.serving)
        if not loading:
            serving = [slot.model if slot.model in loaded else name for slot, name in zip(self.slots, serving)]
        return {"slots": [{"model": slot.model, "serving": name or None, "scale": slot.scale, "active": slot.active}
                          for slot, name in zip(self.slots, serving)],
                "loading": loading, "failed": failed, "loads": self.loads}

"""Safety filter: Stable Diffusion's NSFW checker on the output; a flagged frame is blurred, blacked out or held.

For public installations (museums, festivals, kiosks). It runs diffusers' ``StableDiffusionSafetyChecker``
(a CLIP ViT-L/14 image encoder and 17 + 3 concept embeddings with thresholds, the
``CompVis/stable-diffusion-safety-checker`` model) on each output frame, or on every ``every``-th one, the frames
between reusing the last verdict. It is a coarse filter: it misses things and flags harmless frames. See
docs/plugins.md.

The model lives in ``<models dir>/safety_checker/`` (config.json, model.safetensors, preprocessor_config.json) and
loads through safetensors only, on a background thread: until it is there, every frame gets the action (the filter
fails closed while it loads). A missing or broken folder raises on the frame; the plugin manager tells the session
why, and since the class ``fails_closed``, applies :meth:`SafetyFilter.fallback` (the action) to every later frame of
that session instead of dropping the plugin: nothing unchecked goes out, until the plugin is turned off and on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from sdbridge.errors import ModelError
from sdbridge.plugins.base import Plugin, PluginContext, param

log = logging.getLogger(__name__)

FOLDER = "safety_checker"  # under the models dir
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
WHAT_TO_PUT = ("put the CompVis/stable-diffusion-safety-checker model there: config.json and model.safetensors "
               "(the safety_checker/ folder of a Stable Diffusion 1.5 download) and preprocessor_config.json (from "
               "the same download's feature_extractor/ folder)")
ACTIONS = ("blur", "black", "hold")
SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' checker: a special-care concept found makes every concept threshold lower
BLUR_CELLS = 32  # a blurred frame keeps 1/32 of its width and height: colours, no shapes


def checker_folder(models_dir: str | Path | None) -> Path:
    """``<models dir>/safety_checker``: the given folder, else the default (``SDBRIDGE_MODELS_DIR`` or the cache)."""
    from sdbridge.engines.models import models_subfolder

    return models_subfolder(models_dir, FOLDER)


def folder_problem(folder: Path) -> str | None:
    """What is missing from the checker's folder, as a sentence naming it and what to put there; None when whole."""
    if not folder.is_dir():
        return f"safety checker folder {folder} does not exist: {WHAT_TO_PUT}"
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        return f"safety checker folder {folder} has no {', '.join(missing)}: {WHAT_TO_PUT}"
    return None


@dataclass
class Checker:
    """The loaded checker, its preprocessing, and where it runs (CUDA in fp16, else the CPU in fp32)."""

    model: Any       # StableDiffusionSafetyChecker
    processor: Any   # CLIPImageProcessor: the checker's mean and std
    device: torch.device
    dtype: torch.dtype

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)  # 224 for the real checker

    def flagged(self, image: np.ndarray, sensitivity: float) -> bool:
        """Whether the checker flags ``image`` (uint8 [H, W, 3]); one CLIP forward pass, batch 1."""
        # 1. The whole frame squashed to the encoder's square (pixel_values): a centre crop, as the processor would
        #    do, would leave a wide frame's sides unchecked. OpenCV's INTER_AREA and the processor's scaling take
        #    2.5-4 ms at 512² on this project's 2 cores; the processor resizing (PIL, bicubic) as well, 9 ms.
        # 2. Scale and normalise with the checker's preprocessing config.
        pixel_values = self.pixel_values(image)
        # 3. The checker's verdict; its one host sync.
        with torch.inference_mode():
            return bool(nsfw_concepts(self.model, pixel_values, sensitivity)[0])

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """The checker's input for ``image``: ``[1, 3, size, size]`` on its device, in its dtype."""
        size = self.image_size
        small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        pixels = self.processor(images=small, return_tensors="pt", do_resize=False, do_center_crop=False)
        return pixels["pixel_values"].to(self.device, self.dtype)


def nsfw_concepts(model: Any, pixel_values: torch.Tensor, sensitivity: float = 0.0) -> torch.Tensor:
    """Per image, whether any concept's score is above 0: ``StableDiffusionSafetyChecker.forward``'s verdict
    (scores rounded to 3 decimals as it does), with ``sensitivity`` as the base of its ``adjustment`` (0 there),
    which it raises by 0.01 once a special-care concept is found. That forward also blacks the images out and has
    no way to set the adjustment, so the scoring is done here on its own modules. ``[B]`` bool."""
    pooled = model.vision_model(pixel_values)[1]                      # [B, hidden]
    embeds = model.visual_projection(pooled).float()                  # [B, projection_dim]; fp32 as diffusers does
    embeds = torch.nn.functional.normalize(embeds)

    def scores(concepts: torch.Tensor, thresholds: torch.Tensor, adjustment: torch.Tensor | float) -> torch.Tensor:
        cosine = embeds @ torch.nn.functional.normalize(concepts.float()).t()  # [B, concepts]
        return torch.round(cosine - thresholds.float() + adjustment, decimals=3)

    special = scores(model.special_care_embeds, model.special_care_embeds_weights, sensitivity)
    adjustment = sensitivity + SPECIAL_CARE_ADJUSTMENT * (special > 0).any(dim=1, keepdim=True)  # [B, 1]
    return (scores(model.concept_embeds, model.concept_embeds_weights, adjustment) > 0).any(dim=1)


def load_checker(folder: Path, device: torch.device) -> Checker:
    """The checker from ``folder`` (safetensors only) on ``device`` if it is CUDA (fp16), else on the CPU (fp32);
    ModelError naming the folder and what to put there."""
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from sdbridge.engines.models import load_pretrained_folder

    problem = folder_problem(folder)
    if problem is not None:
        raise ModelError(problem, code="model_not_found")
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar would cut into the daemon's log
    device, dtype = (device, torch.float16) if device.type == "cuda" else (torch.device("cpu"), torch.float32)
    model = load_pretrained_folder(folder, StableDiffusionSafetyChecker, dtype, "safety checker", device=device)
    # transformers 5 names the numpy/PIL processor CLIPImageProcessorPil (CLIPImageProcessor then wants
    # torchvision, and warns when falling back); 4.x has only CLIPImageProcessor. Same config, same numbers.
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    try:
        processor = processor_class.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(f"{folder}/preprocessor_config.json is not a CLIP image processor config "
                         f"({type(exc).__name__}: {str(exc)[:200]}): {WHAT_TO_PUT}") from exc
    model.to(device).eval().requires_grad_(False)
    return Checker(model, processor, device, dtype)


def obscure(image: np.ndarray, action: str, held: np.ndarray | None) -> np.ndarray:
    """What a flagged (or not yet checked) frame shows instead: a heavy blur, black, or the last safe frame held
    (black while there is none)."""
    if action == "blur":
        height, width = image.shape[:2]
        small = cv2.resize(image, (max(1, width // BLUR_CELLS), max(1, height // BLUR_CELLS)),
                           interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    if action == "hold" and held is not None and held.shape == image.shape:
        return held.copy()  # a later stage may write into the frame it is given; ours stays as it was
    return np.zeros_like(image)


class SafetyFilter(Plugin):
    name = "safety_filter"
    doc = "Stable Diffusion's NSFW checker on every output (or every Nth); a flagged frame is blurred, blacked or held."
    default_order = 100  # last: it judges the frame that is sent, after every other plugin changed it
    # A kiosk without its checker must show the action, not the raw stream (docs/plugins.md, "Safety filter").
    fails_closed = True
    fallback_doc = "every frame gets the action (blur, black; hold shows black) until the checker works"
    params = (
        param("safety_filter", "action", "enum", "blur",
              "What a flagged frame shows: blur (heavily), black, or hold (the last frame checked safe).",
              choices=ACTIONS),
        param("safety_filter", "every", "int", 1,
              "Check every Nth frame (a CLIP ViT-L forward pass each); the frames between reuse the last verdict.",
              minimum=1, maximum=300),
        param("safety_filter", "sensitivity", "float", 0.0,
              "Added to every concept's score before the threshold (the checker's adjustment): above 0 flags more "
              "frames, below 0 fewer.", minimum=-0.2, maximum=0.2),
    )

    def __init__(self) -> None:
        # Worker thread only, but for the load itself, which runs on a thread of its own into ``_pending``.
        self._where: tuple[Path, torch.device] | None = None  # from the engine serving; None: defaults
        self._checker: Checker | None = None
        self._checker_key: tuple[Path, torch.device] | None = None
        self._pending: tuple[tuple[Path, torch.device], Future[Checker]] | None = None

    # --- the model: where it is, loading it in the background ----------------------------------

    def before_step(self, engine: Any | None, session_ids: list[str], params: Mapping[str, Any]) -> None:
        """Learn the models dir and the device from the engine about to run; off: free the checker."""
        if engine is None:
            self._checker = self._checker_key = self._pending = None  # turned on again: loads afresh
            return
        device = getattr(engine, "device", None)
        device = device if isinstance(device, torch.device) and device.type == "cuda" else torch.device("cpu")
        self._where = (checker_folder(getattr(engine, "models_dir", None)), device)

    @property
    def checker(self) -> Checker | None:
        """The loaded checker, or None while it loads."""
        return self._checker

    def wait_loaded(self, timeout_s: float) -> None:
        """Block until a load in progress has ended (for tests and tools; the worker never waits)."""
        if self._pending is not None:
            wait([self._pending[1]], timeout=timeout_s)

    def _current(self) -> Checker | None:
        """The checker for where the engine is (or the one before, while that loads), None while the first loads;
        raises when it cannot load."""
        key = self._where or (checker_folder(None), torch.device("cpu"))
        if self._checker is not None and self._checker_key == key:
            return self._checker
        if self._pending is None or self._pending[0] != key:
            problem = folder_problem(key[0])  # told on this frame, not after a thread's round trip
            if problem is not None:
                raise ModelError(problem, code="model_not_found")
            self._pending = (key, self._start_load(*key))
        future = self._pending[1]
        if not future.done():
            return self._checker  # the engine moved (another device or models dir): the old checker serves meanwhile
        # A failed load stays failed (each session is told, once) until the plugin is turned off and on.
        checker = future.result()
        self._checker, self._checker_key, self._pending = checker, key, None
        return checker

    @staticmethod
    def _start_load(folder: Path, device: torch.device) -> Future[Checker]:
        future: Future[Checker] = Future()

        def load() -> None:
            started = time.perf_counter()
            try:
                checker = load_checker(folder, device)
            except BaseException as exc:  # handed to the worker, which turns the plugin off for the session
                log.error("safety checker at %s failed to load: %s", folder, exc)
                future.set_exception(exc)
                return
            log.info("safety checker loaded from %s on %s (%s) in %.1f s", folder, checker.device,
                     str(checker.dtype).replace("torch.", ""), time.perf_counter() - started)
            future.set_result(checker)

        threading.Thread(target=load, name="safety-checker-load", daemon=True).start()
        return future

    # --- the frame ---------------------------------------------------------------------------------

    def fallback(self, ctx: PluginContext) -> np.ndarray:
        """The frame once the filter failed for the session: the action, with no frame checked safe to hold."""
        assert ctx.output is not None
        return obscure(ctx.output, str(ctx.params.get("action", "black")), None)

    def after(self, ctx: PluginContext) -> np.ndarray | None:
        assert ctx.output is not None
        state, action = ctx.state, ctx.params["action"]
        checker = self._current()
        if checker is None:  # still loading: nothing unchecked goes out
            return obscure(ctx.output, action, state.get("safe"))
        since = state.get("since")
        if since is None or since + 1 >= int(ctx.params["every"]):
            state["flagged"] = checker.flagged(ctx.output, float(ctx.params["sensitivity"]))
            state["checks"] = state.get("checks", 0) + 1
            state["since"] = 0
            if not state["flagged"]:
                safe = state.get("safe")
                if safe is None or safe.shape != ctx.output.shape:
                    state["safe"] = ctx.output.copy()
                else:
                    np.copyto(safe, ctx.output)
        else:
            state["since"] = since + 1
        if state["flagged"]:
            state["flagged_frames"] = state.get("flagged_frames", 0) + 1
            return obscure(ctx.output, action, state.get("safe"))
        return None

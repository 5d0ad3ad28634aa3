"""ControlNet preprocessors: an image in, the condition image a ControlNet expects out.

Every preprocessor takes and returns RGB uint8 ``[H, W, 3]`` (numpy) at the same size. The
built-ins:

- ``none``: the image as it is (a depth or edge pass rendered elsewhere, TouchDesigner's usual way);
- ``invert``: 255 - image (white-background line art to the black-background lines ControlNets want);
- ``canny``: OpenCV's Canny edges, thresholds ``low_threshold`` / ``high_threshold`` (A1111's threshold_a/b),
  in either order as OpenCV takes them;
- ``softedge``: a soft edge map, the Sobel gradient magnitude of a blurred grey image, normalised;
- ``lineart``: thin lines from a difference of Gaussians, soft-thresholded as XDoG does, white on black;
- ``depth``: a depth model loaded from local weights (any transformers depth-estimation model in a
  folder, e.g. Intel/dpt-hybrid-midas or a Depth Anything, safetensors only), near is bright;
- ``pose``: body keypoints from a ViTPose model in a local folder (transformers' VitPoseForPoseEstimation,
  e.g. usyd-community/vitpose-base-simple), drawn as OpenPose draws its 18 points; body only (no hands, face).

Others are added through the entry-point group ``sdbridge.preprocessors`` (a callable class taking
``(image, options)``), like plugins: never from a name or a path that a client sends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sdbridge.errors import ModelError, ParamError

log = logging.getLogger(__name__)

GROUP = "sdbridge.preprocessors"
MAX_SIDE = 4096


@dataclass(frozen=True)
class Options:
    low_threshold: int = 100
    high_threshold: int = 200
    resolution: int = 0   # run at this short side, then back to the image's size (A1111's processor_res); 0: as is


Preprocess = Callable[[np.ndarray, Options], np.ndarray]


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))


def none(image: np.ndarray, options: Options) -> np.ndarray:
    return image


def invert(image: np.ndarray, options: Options) -> np.ndarray:
    return 255 - image


def canny(image: np.ndarray, options: Options) -> np.ndarray:
    # Either order: OpenCV swaps a low threshold above the high one (same map), and the extension passes
    # threshold_a/b to it as sent; refusing it was a 422 over A1111 and a slot switched off live (QA 86 F6).
    low, high = sorted((options.low_threshold, options.high_threshold))
    if low < 0:
        raise ParamError(f"canny thresholds {options.low_threshold}, {options.high_threshold}: both must be >= 0",
                         name="low_threshold", value=low)
    return _rgb(cv2.Canny(_grey(image), low, high))


def softedge(image: np.ndarray, options: Options) -> np.ndarray:
    grey = cv2.GaussianBlur(_grey(image).astype(np.float32), (0, 0), 1.5)
    magnitude = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
    peak = float(magnitude.max())
    if peak <= 0:
        return np.zeros_like(image)
    return _rgb(np.clip(magnitude * (255.0 / peak), 0, 255).astype(np.uint8))


def lineart(image: np.ndarray, options: Options) -> np.ndarray:
    """Thin lines from a difference of Gaussians, soft-thresholded as XDoG does (Winnemöller et al. 2012)."""
    grey = _grey(image).astype(np.float32) / 255.0
    sigma, k, phi = 0.8, 1.6, 20.0
    dog = np.abs(cv2.GaussianBlur(grey, (0, 0), sigma) - cv2.GaussianBlur(grey, (0, 0), sigma * k))
    lines = np.tanh(phi * np.maximum(dog - 0.01, 0.0))  # flat areas (dog ~ 0) stay black
    return _rgb(np.clip(lines * 255.0, 0, 255).astype(np.uint8))  # white lines on black


class ModelPreprocessor:
    """A preprocessor whose model lives in ``<folder>`` (config.json + *.safetensors), loaded on first use."""

    kind = ""
    model_class = ""       # the transformers class that loads the folder
    example = ""           # a model a user can put there

    def __init__(self, folder: Path | None, device: Any = "cpu") -> None:
        self.folder = folder
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> Any:
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def _load(self) -> Any:
        import torch
        import transformers

        from sdbridge.engines.models import LOAD_LOCK, check_safetensors_folder

        folder = self.folder
        if folder is None or not (folder / "config.json").is_file():
            raise ModelError(f"the {self.kind} preprocessor needs its model in {folder}: a folder with config.json "
                             f"and model.safetensors ({self.example})", code="model_not_found")
        check_safetensors_folder(folder, f"{self.kind} preprocessor")
        try:
            with LOAD_LOCK:
                model = getattr(transformers, self.model_class).from_pretrained(folder, use_safetensors=True,
                                                                                dtype=torch.float32)
        except Exception as exc:
            raise ModelError(f"{self.kind} model at {folder}: {type(exc).__name__}: {str(exc)[:300]}") from exc
        return model.to(self.device).eval().requires_grad_(False)


class DepthPreprocessor(ModelPreprocessor):
    """Depth, near is bright, from any transformers depth-estimation model (DPT, Depth Anything, ...)."""

    kind = "depth"
    model_class = "AutoModelForDepthEstimation"
    example = "a transformers depth-estimation model such as Intel/dpt-hybrid-midas"

    def __call__(self, image: np.ndarray, options: Options) -> np.ndarray:
        import torch

        model = self.load()
        height, width = image.shape[:2]
        size = int(getattr(model.config, "image_size", 0) or 384)
        patch = int(getattr(model.config, "patch_size", 0) or 16)
        size = max(patch, size // patch * patch)
        # The DPT/MiDaS normalisation (mean = std = 0.5); models trained otherwise still rank depth.
        pixels = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 127.5 - 1.0
        batch = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(self.device)
        with torch.inference_mode():
            depth = model(pixel_values=batch).predicted_depth  # [1, h, w]
        depth = depth[0].float().cpu().numpy()
        low, high = float(depth.min()), float(depth.max())
        depth = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
        return _rgb(cv2.resize((depth * 255).round().astype(np.uint8), (width, height),
                               interpolation=cv2.INTER_LINEAR))


# OpenPose's 18 body points from COCO's 17 (the neck is the shoulders' midpoint), and its drawing: the
# limbs (1-based pairs) and colours of controlnet_aux's draw_bodypose, which OpenPose ControlNets were
# trained on. OpenPose order: nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right
# hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear, left ear.
COCO_TO_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
OPENPOSE_LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
                  (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
OPENPOSE_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))


class PosePreprocessor(ModelPreprocessor):
    """Body pose drawn as OpenPose draws it, from a ViTPose model. Top-down on the whole frame: one
    performer filling the frame, the stage's usual case (no person detector runs first)."""

    kind = "pose"
    model_class = "VitPoseForPoseEstimation"
    example = "a ViTPose model such as usyd-community/vitpose-base-simple"
    threshold = 0.3  # a keypoint whose heatmap peak is lower is not drawn

    def keypoints(self, image: np.ndarray) -> list[tuple[float, float] | None]:
        """The 18 OpenPose points in pixels of ``image`` (None where not found)."""
        import torch

        model = self.load()
        height, width = image.shape[:2]
        model_h, model_w = (int(v) for v in model.config.backbone_config.image_size)
        # ViTPose's ImageNet normalisation.
        pixels = cv2.resize(image, (model_w, model_h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        pixels = (pixels - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        batch = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(self.device)
        with torch.inference_mode():
            heatmaps = model(pixel_values=batch).heatmaps[0].float().cpu().numpy()  # [17, h, w]
        count, map_h, map_w = heatmaps.shape
        flat = heatmaps.reshape(count, -1)
        peaks = flat.max(axis=1)
        ys, xs = np.unravel_index(flat.argmax(axis=1), (map_h, map_w))
        coco = [((x + 0.5) * width / map_w, (y + 0.5) * height / map_h) if peak >= self.threshold else None
                for x, y, peak in zip(xs, ys, peaks)]
        points: list[tuple[float, float] | None] = []
        for index in COCO_TO_OPENPOSE:
            if index is not None:
                points.append(coco[index] if index < len(coco) else None)
            elif coco[5] is not None and coco[6] is not None:
                points.append(((coco[5][0] + coco[6][0]) / 2, (coco[5][1] + coco[6][1]) / 2))
            else:
                points.append(None)
        return points

    def __call__(self, image: np.ndarray, options: Options) -> np.ndarray:
        points = self.keypoints(image)
        canvas = np.zeros_like(image)
        stick = max(2, round(4 * min(image.shape[:2]) / 512))
        for (first, second), colour in zip(OPENPOSE_LIMBS, OPENPOSE_COLOURS):
            a, b = points[first - 1], points[second - 1]
            if a is not None and b is not None:
                limb = np.zeros_like(image)
                cv2.line(limb, (round(a[0]), round(a[1])), (round(b[0]), round(b[1])), colour, stick * 2)
                canvas = cv2.addWeighted(canvas, 1.0, limb, 0.6, 0)
        for point, colour in zip(points, OPENPOSE_COLOURS):
            if point is not None:
                cv2.circle(canvas, (round(point[0]), round(point[1])), stick, colour, -1)
        return canvas


BUILTIN: dict[str, Preprocess] = {"none": none, "invert": invert, "canny": canny, "softedge": softedge,
                                  "lineart": lineart}


class Preprocessors:
    """The built-ins, ``depth`` from ``annotators_dir/depth``, and those installed as entry points."""

    def __init__(self, annotators_dir: Path | None = None, device: Any = "cpu") -> None:
        self.table: dict[str, Preprocess] = dict(BUILTIN)
        for kind, cls in (("depth", DepthPreprocessor), ("pose", PosePreprocessor)):
            self.table[kind] = cls(annotators_dir / kind if annotators_dir else None, device)
        for entry in entry_points(group=GROUP):
            if entry.name in self.table:
                continue
            try:
                self.table[entry.name] = entry.load()()
            except Exception:  # a broken third-party package must not stop the daemon
                log.exception("preprocessor entry point %s (%s) failed to load; left out", entry.name, entry.value)

    def names(self) -> list[str]:
        return list(self.table)

    def get(self, name: str) -> Preprocess:
        try:
            return self.table[name]
        except KeyError:
            raise ParamError(f"unknown preprocessor {name!r} (known: {', '.join(self.table)})", name="preprocessor",
                             value=name, code="unknown_preprocessor") from None

    def run(self, name: str, image: np.ndarray, options: Options | None = None) -> np.ndarray:
        """RGB uint8 [H, W, 3] in, the condition image RGB uint8 [H, W, 3] out, same size."""
        options = options or Options()
        preprocess = self.get(name)
        if name == "none":
            return image
        height, width = image.shape[:2]
        work = image
        if options.resolution and options.resolution != min(height, width):
            # The short side at the resolution asked, the long side never past MAX_SIDE (a 64x1 strip at 4096 ...).
            scale = min(options.resolution / min(height, width), MAX_SIDE / max(height, width))
            work = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                              interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        out = preprocess(work, options)
        if out.shape[:2] != (height, width):
            out = cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
        if out.shape != image.shape or out.dtype != np.uint8:
            raise ModelError(f"preprocessor {name} returned {out.shape} {out.dtype}, expected {image.shape} uint8",
                             code="preprocessor_failed")
        return out

"""Model upscalers (ESRGAN, Real-ESRGAN, 4x-UltraSharp, SwinIR, ...) found where AUTOMATIC1111 keeps them and run
through spandrel, which recognises the network from the weights alone. See docs/a1111-api.md, Extras.

Files: ``<models dir>/ESRGAN/``, ``<models dir>/RealESRGAN/`` and ``<models dir>/SwinIR/`` (A1111's folders), each
model named by its file's stem as A1111 lists it; Real-ESRGAN's own files also answer to A1111's names for them
(``RealESRGAN_x4plus.pth`` is ``R-ESRGAN 4x+``). ``.safetensors`` load through safetensors; ``.pth``/``.pt`` only
with ``--allow-pickle``, through ``torch.load(weights_only=True)`` (:func:`models.load_weight_file`).

Running: fp16 on CUDA where the architecture allows it, fp32 elsewhere, in tiles (A1111's ``ESRGAN_tile`` 192 and
``ESRGAN_tile_overlap`` 8) so that a large image never needs the whole network's activations at once. Each tile is
the network's input window: the part of the output it keeps is its centre, and the ``overlap`` pixels around it on
every inner side are context only, so a tile's seam is exact wherever the network sees no further than ``overlap``
pixels (and every output pixel sees at least that much). :meth:`Upscaler.upscale_to` runs the network as often as
A1111 does (until the image covers the target, at most 3 times) and then Lanczos to the exact size.

Stopping: an upscale checks its ``stop`` event before each tile, and :meth:`UpscalerCache.interrupt`
(``/sdapi/v1/interrupt``) sets the running one's, so that an abandoned upscale ends within one tile instead of
holding the one-at-a-time lock for minutes (QA5: a 16x16 Extras waited 68 s behind a 1024px x8 one).

The hires fix runs on the worker thread between live stream frames: it takes the generator forms
(:meth:`UpscalerCache.hires_steps`), which yield before each tile and, instead of waiting, while an Extras upscale
holds the lock (QA 68 F5, F6).
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import math
import re
import sys
import threading
import types
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdbridge.engines.models import load_weight_file, serialized_load
from sdbridge.errors import ModelError, printable

log = logging.getLogger(__name__)

FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR")  # A1111's models/ sub-folders, searched in this order
SUFFIXES = (".safetensors", ".pth", ".pt")
TILE_SIZE = 192     # A1111's ESRGAN_tile default
TILE_OVERLAP = 8    # A1111's ESRGAN_tile_overlap default
LOCK_TRY_S = 0.005  # how long a caller that must not block waits for the lock at a time, between its yields
MAX_PASSES = 3      # A1111's Upscaler.upscale: the model runs until the image covers the target, at most 3 times
# The largest side one pass may produce: a pass runs only while the image is below the target (at most 8192 a
# side), so 4x of just under that; its uint8 result is at most 16384 x 16384 x 3 = 805 MB.
MAX_OUTPUT_SIDE = 16384
INSTALL_HINT = "pip install \"sdbridge[upscale]\""

# A1111's names for the Real-ESRGAN models it downloads into models/RealESRGAN (modules/realesrgan_model.py).
REALESRGAN_NAMES = {
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
}
_SCALE_IN_NAME = re.compile(r"^([1-8])x|(?<![0-9a-z])([1-8])x(?![0-9])|x([1-8])(?![0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class UpscalerFile:
    """One model file as A1111 lists it."""

    name: str     # A1111's name: the file's stem, or its R-ESRGAN name
    path: Path
    folder: str   # which of FOLDERS

    @property
    def named_scale(self) -> int:
        """The scale its name says ("4x-UltraSharp", "RealESRGAN_x2plus"); A1111 lists 4 when it cannot tell."""
        match = _SCALE_IN_NAME.search(self.path.stem)
        return int(next(group for group in match.groups() if group)) if match else 4


def find_upscalers(models_dir: Path) -> list[UpscalerFile]:
    """The model upscalers in ``models_dir``'s A1111 folders, in folder then name order; a name already taken by an
    earlier file is skipped (A1111 would show both and run the first)."""
    found: dict[str, UpscalerFile] = {}
    for folder in FOLDERS:
        path = models_dir / folder
        if not path.is_dir():
            continue
        for file in sorted(path.iterdir()):
            if not file.is_file() or file.suffix not in SUFFIXES:  # the loader's suffixes, in its case
                continue
            name = REALESRGAN_NAMES.get(file.stem, file.stem) if folder == "RealESRGAN" else file.stem
            if name in found:
                log.warning("upscaler %s: %s has the same name as %s; using the first", printable(name),
                            printable(file), printable(found[name].path))
                continue
            found[name] = UpscalerFile(name, file, folder)
    return list(found.values())


def find_upscaler(models_dir: Path, name: str) -> UpscalerFile | None:
    """The model named ``name`` (its A1111 name, or its file's stem), or None."""
    files = find_upscalers(models_dir)
    return next((file for file in files if file.name == name), None) or \
        next((file for file in files if file.path.stem == name), None)


# --- spandrel ------------------------------------------------------------------------------------


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class UpscaleInterrupted(ModelError):
    """A model upscale stopped between tiles: ``/sdapi/v1/interrupt``, or its client gone."""

    code = "interrupted"


def _not_here(*args: Any, **kwargs: Any) -> Any:
    raise ModelError("this model needs torchvision, which is not installed (sdbridge runs only upscalers, which "
                     "do not)", code="missing_dependency")


def _import_spandrel() -> Any:
    """spandrel, imported without torchvision where there is none.

    spandrel imports torchvision for two architectures (LaMa inpainting and RestoreFormer face restoration) that we
    never run, and torchvision from PyPI is built for PyPI's CUDA torch: beside the CPU build it fails to import
    ("operator torchvision::nms does not exist"), and installing it with its dependencies replaces torch. So where
    torchvision is absent, spandrel is imported with a stand-in for the three names it takes, removed again at once
    so that transformers and diffusers still find no torchvision.
    """
    if "spandrel" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return _plain_import()
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = _InterpolationMode  # type: ignore[attr-defined]
    functional.rotate = functional.normalize = _not_here  # type: ignore[attr-defined]
    stand_ins = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.transforms": types.ModuleType("torchvision.transforms"),
                 "torchvision.transforms.functional": functional}
    sys.modules.update(stand_ins)
    try:
        return _plain_import()
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def _plain_import() -> Any:
    try:
        import spandrel
    except ImportError as exc:
        raise ModelError(f"model upscalers need spandrel ({exc}); install it: {INSTALL_HINT}",
                         code="missing_dependency") from exc
    return spandrel


def spandrel_available() -> bool:
    return importlib.util.find_spec("spandrel") is not None


# --- loading and running -------------------------------------------------------------------------


@serialized_load  # building modules while another load runs is not thread-safe (models.LOAD_LOCK)
def _build(path: Path, state: dict[str, torch.Tensor]) -> Any:
    spandrel = _import_spandrel()
    try:
        return spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise ModelError(f"{path}: not a model architecture spandrel knows ({len(state)} tensors, first "
                         f"{printable(next(iter(state)))!r})", code="unsupported_model") from None
    except Exception as exc:  # a known architecture whose tensors do not fit it (a damaged or edited file)
        raise ModelError(f"{path}: its weights do not build a network ({type(exc).__name__}: "
                         f"{printable(str(exc)[:300])})") from exc


def load_upscaler(file: UpscalerFile, device: torch.device, *, allow_pickle: bool = False) -> Upscaler:
    """``file`` as a runnable upscaler on ``device``; ModelError (a code and a sentence naming the file) for a
    refused pickle, a corrupt or truncated file, or weights that are no image-to-image network."""
    state = load_weight_file(file.path, "upscaler model", allow_pickle=allow_pickle)
    descriptor = _build(file.path, state)
    spandrel = _import_spandrel()
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
        raise ModelError(f"{file.path}: a {descriptor.architecture.name} {descriptor.purpose} model, not an "
                         f"upscaler", code="unsupported_model")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ModelError(f"{file.path}: takes {descriptor.input_channels} and gives {descriptor.output_channels} "
                         f"channels; only RGB (3 to 3) models upscale here", code="unsupported_model")
    dtype = torch.float16 if device.type == "cuda" and descriptor.supports_half else torch.float32
    try:
        descriptor.to(device=device, dtype=dtype).eval()
    except torch.OutOfMemoryError as exc:
        raise ModelError(f"out of device memory loading upscaler {file.path}: {exc}", code="out_of_memory") from exc
    log.info("upscaler %s: %s %dx on %s (%s)", printable(file.name), descriptor.architecture.name, descriptor.scale,
             device, dtype)
    return Upscaler(file, descriptor, device, dtype)


class Upscaler:
    """A loaded model upscaler: uint8 RGB in, uint8 RGB out."""

    def __init__(self, file: UpscalerFile, descriptor: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.file = file
        self.descriptor = descriptor
        self.device = device
        self.dtype = dtype
        self.stamp = _stamp(file.path)  # what the file was when it loaded: a file replaced loads again

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @property
    def architecture(self) -> str:
        return str(self.descriptor.architecture.name)

    def upscale(self, image: np.ndarray, tile: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
                stop: threading.Event | None = None) -> np.ndarray:
        """One pass of the network: [H, W, 3] uint8 -> [H * scale, W * scale, 3] uint8. ``tile`` 0 runs the whole
        image at once; so does a model that tiles inside itself. ``stop`` set: UpscaleInterrupted before the next
        tile."""
        return run_steps(self.upscale_steps(image, tile, overlap, stop))

    def upscale_steps(self, image: np.ndarray, tile: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
                      stop: threading.Event | None = None) -> Generator[None, None, np.ndarray]:
        """:meth:`upscale` as a generator that yields before each tile and returns the image: a caller on the
        worker thread (the hires fix) lets a stream frame run between two tiles (QA 68 F6)."""
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, image.shape
        height, width = image.shape[:2]
        scale = self.scale
        if max(height, width) * scale > MAX_OUTPUT_SIDE:
            raise ModelError(f"a {width}x{height} image through {self.name!r} ({scale}x) would be "
                             f"{width * scale}x{height * scale}, over {MAX_OUTPUT_SIDE} a side", code="bad_param")
        spandrel = _import_spandrel()
        if tile <= 0 or self.descriptor.tiling == spandrel.ModelTiling.INTERNAL:
            tile = max(height, width) + 2 * overlap
        source = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None]  # [1, 3, H, W]
        out = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
        tiles = list(_tiles(height, width, tile, overlap))
        for done, ((y0, y1, wy0, wy1), (x0, x1, wx0, wx1)) in enumerate(tiles):
            yield  # never inside inference_mode (a thread-wide mode the caller's other work would run in)
            if stop is not None and stop.is_set():
                raise UpscaleInterrupted(f"upscaler {self.name!r}: interrupted after {done} of {len(tiles)} "
                                         f"tiles of a {width}x{height} image")
            try:
                with torch.inference_mode():
                    window = source[..., wy0:wy1, wx0:wx1].to(self.device, non_blocking=True).to(self.dtype) / 255
                    result = self.descriptor(window)  # [1, 3, (wy1 - wy0) * scale, (wx1 - wx0) * scale], in [0, 1]
                    kept = result[0, :, (y0 - wy0) * scale:(y1 - wy0) * scale, (x0 - wx0) * scale:(x1 - wx0) * scale]
                    pixels = (kept.float() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
                    out[y0 * scale:y1 * scale, x0 * scale:x1 * scale] = pixels.cpu().numpy()
            except torch.OutOfMemoryError as exc:
                raise ModelError(f"upscaler {self.name!r}: out of device memory on {tile}-pixel tiles of a "
                                 f"{width}x{height} image", code="out_of_memory") from exc
            except RuntimeError as exc:  # a network that its own weights load into but that cannot run this input
                raise ModelError(f"upscaler {self.file.path}: the network failed on a {width}x{height} image "
                                 f"({printable(str(exc)[:300])})") from exc
        return out

    def upscale_to(self, image: np.ndarray, width: int, height: int, tile: int = TILE_SIZE,
                   overlap: int = TILE_OVERLAP, stop: threading.Event | None = None) -> np.ndarray:
        """A1111's Upscaler.upscale: the network until the image covers ``width`` x ``height`` (once at least,
        at most 3 times), then Lanczos to exactly that size."""
        return run_steps(self.upscale_to_steps(image, width, height, tile, overlap, stop))

    def upscale_to_steps(self, image: np.ndarray, width: int, height: int, tile: int = TILE_SIZE,
                         overlap: int = TILE_OVERLAP,
                         stop: threading.Event | None = None) -> Generator[None, None, np.ndarray]:
        """:meth:`upscale_to` as a generator that yields before each tile (:meth:`upscale_steps`)."""
        result = image
        for index in range(MAX_PASSES):
            if result.shape[1] >= width and result.shape[0] >= height and (index > 0 or self.scale != 1):
                break
            result = yield from self.upscale_steps(result, tile, overlap, stop)
            if self.scale == 1:  # a 1x model (a restorer) runs once: another pass would not grow it
                break
        if result.shape[:2] != (height, width):
            result = np.asarray(Image.fromarray(result).resize((width, height), Image.Resampling.LANCZOS))
        return result


def run_steps(steps: Generator[None, None, Any]) -> Any:
    """A step generator run to its end, nothing between its steps: its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _spans(length: int, core: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(kept start, kept end, window start, window end) along one side: the kept parts tile ``length`` in equal
    parts of at most ``core``; each window adds ``overlap`` of context where the image goes on."""
    count = math.ceil(length / core)
    size = math.ceil(length / count)
    spans = []
    for start in range(0, length, size):
        end = min(start + size, length)
        spans.append((start, end, max(start - overlap, 0), min(end + overlap, length)))
    return spans


def _tiles(height: int, width: int, tile: int, overlap: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    if tile <= 2 * overlap:
        raise ModelError(f"tile size {tile} leaves nothing inside its overlap {overlap} on each side "
                         f"(use more than {2 * overlap}, or 0 for no tiles)", code="bad_param")
    core = tile - 2 * overlap
    for rows in _spans(height, core, overlap):
        for columns in _spans(width, core, overlap):
            yield rows, columns


class UpscalerCache:
    """The model upscalers of one models folder, loaded on first use. One model at a time stays loaded (the
    next name replaces it), and one upscale runs at a time: together they bound memory."""

    def __init__(self, models_dir: Path, device: torch.device, *, allow_pickle: bool = False) -> None:
        self.models_dir = models_dir
        self.device = device
        self.allow_pickle = allow_pickle
        self._lock = threading.Lock()  # held by the running upscale
        self._loaded: Upscaler | None = None
        self._scales: dict[Path, int] = {}  # the real scale of each model loaded so far
        self._running: threading.Event | None = None  # the stop event of the upscale holding the lock

    def files(self) -> list[UpscalerFile]:
        return find_upscalers(self.models_dir)

    def names(self) -> list[str]:
        return [file.name for file in self.files()]

    def find(self, name: str) -> UpscalerFile | None:
        return find_upscaler(self.models_dir, name)

    def scale_of(self, file: UpscalerFile) -> int:
        return self._scales.get(file.path, file.named_scale)

    def get(self, name: str) -> Upscaler:
        """The loaded upscaler called ``name``; ModelError (model_not_found) naming the known ones."""
        file = self._file(name)
        with self._lock:
            return self._load(file)

    def _file(self, name: str) -> UpscalerFile:
        file = self.find(name)
        if file is None:
            known = ", ".join(self.names()) or "none"
            raise ModelError(f"upscaler {name!r} not found in {self.models_dir}/{{{','.join(FOLDERS)}}} "
                             f"(known: {known})", code="model_not_found")
        return file

    def _load(self, file: UpscalerFile) -> Upscaler:
        """``file`` loaded, the lock held."""
        loaded = self._loaded
        if loaded is None or loaded.file != file or _changed(loaded):
            self._loaded = None  # the old one goes before the new one loads
            loaded = load_upscaler(file, self.device, allow_pickle=self.allow_pickle)
            self._loaded = loaded
            self._scales[file.path] = loaded.scale
        return loaded

    def upscale_to(self, name: str, image: np.ndarray, width: int, height: int,
                   stop: threading.Event | None = None) -> np.ndarray:
        """``image`` through the model called ``name`` to exactly ``width`` x ``height``. ``stop`` (the caller's,
        set when its client goes away) or :meth:`interrupt` ends it before its next tile: UpscaleInterrupted.
        Waits for the lock while another upscale runs (the Extras, in their own thread)."""
        return run_steps(self._upscale_steps(name, image, width, height, stop, wait=True))

    def _upscale_steps(self, name: str, image: np.ndarray, width: int, height: int, stop: threading.Event | None,
                       wait: bool) -> Generator[None, None, np.ndarray]:
        """:meth:`upscale_to` as a generator that yields before each tile (QA 68 F6) and, without ``wait``, while
        another thread's upscale holds the lock (each try waits ``LOCK_TRY_S`` at most; F5: the stream froze
        4.2-4.6 s behind an Extras upscale), and returns the image. The lock stays held across its yields, so that
        no other upscale swaps the model meanwhile."""
        stop = stop if stop is not None else threading.Event()
        if wait:
            self._lock.acquire()
        else:
            while not self._lock.acquire(timeout=LOCK_TRY_S):
                yield
        try:  # a plain Lock, not an RLock: a generator dropped unfinished may be closed from another thread
            if stop.is_set():  # given up while it waited for the lock: no load, no tile
                raise UpscaleInterrupted(f"upscaler {name!r}: interrupted before it started")
            previous, self._running = self._running, stop
            try:
                upscaler = self._load(self._file(name))
                return (yield from upscaler.upscale_to_steps(image, width, height, stop=stop))
            finally:
                self._running = previous
        finally:
            self._lock.release()

    def hires_upscale(self, name: str, image: np.ndarray, width: int, height: int) -> np.ndarray:
        """:meth:`upscale_to` for the hires fix. Interrupted, the image is Lanczos-resized instead: the
        interrupted generation then stops its second pass at once and returns its images, as A1111 does for a
        job interrupted in its hires pass. Waits for the lock: for a thread that may (see :meth:`hires_steps`)."""
        return run_steps(self._hires_steps(name, image, width, height, wait=True))

    def hires_steps(self, name: str, image: np.ndarray, width: int,
                    height: int) -> Generator[None, None, np.ndarray]:
        """:meth:`hires_upscale` as steps, for the hires fix on the worker thread to run between stream frames: a
        generator that yields before each tile and while another upscale (an Extras call) holds the lock, and
        returns the image (QA 68 F5: waiting on the lock froze the stream 4.2-4.6 s; F6: the tiles in one call)."""
        return self._hires_steps(name, image, width, height, wait=False)

    def _hires_steps(self, name: str, image: np.ndarray, width: int, height: int,
                     wait: bool) -> Generator[None, None, np.ndarray]:
        try:
            return (yield from self._upscale_steps(name, image, width, height, None, wait))
        except UpscaleInterrupted as exc:
            log.info("%s; the hires pass goes on from a Lanczos resize", exc)
            return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))

    def interrupt(self) -> bool:
        """Stop the running upscale before its next tile (``/sdapi/v1/interrupt``); those waiting for the lock
        run as usual. True when one was running."""
        running = self._running
        if running is None:
            return False
        running.set()
        return True


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _changed(loaded: Upscaler) -> bool:
    try:
        return loaded.stamp != _stamp(loaded.file.path)
    except OSError:
        return True

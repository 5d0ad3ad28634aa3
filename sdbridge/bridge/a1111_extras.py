"""AUTOMATIC1111's Extras tab over its API: ``/sdapi/v1/extra-single-image`` and ``/extra-batch-images``, and the
listings its clients read before they send a request (``/cmd-flags``, ``/scripts``, ``/script-info``,
``/memory``, ``/face-restorers``, ``/realesrgan-models``, ``/hypernetworks``).

Extras upscale with the upscalers that exist here, those ``/sdapi/v1/upscalers`` lists: ``None`` (A1111 leaves
the image as it is), ``Lanczos`` and ``Nearest``, through PIL as A1111's own (``modules/upscaler.py``):
``do_upscale`` to the scaled size, then Lanczos to that size rounded down to a multiple of 8; and the model
upscalers (ESRGAN, Real-ESRGAN, SwinIR, ...) found in the models folder's ``ESRGAN/``, ``RealESRGAN/`` and
``SwinIR/`` (engines/upscalers.py), run until the image covers that size and then Lanczos to it. ``Scale to``
(``resize_mode`` 1) scales to cover the target and, with ``upscaling_crop``, crops it centred
(``scripts/postprocessing_upscale.py``). No face restorer (GFPGAN, CodeFormer) is shipped: a visibility above 0
for one answers 422 rather than an image without it.

The output PNG keeps the input's generation parameters (its ``parameters`` chunk) and adds A1111's
``postprocessing`` chunk (``Postprocess upscale by: 2, Postprocess upscaler: Lanczos``), which ``html_info``
also carries.

A model upscale stops before its next tile when ``/sdapi/v1/interrupt`` is called or its client goes away (the
route polls for the disconnect while the upscale runs in a thread). The interrupted request answers 422 with
code ``interrupted`` (as a generation interrupted before it started does here); a batch answers with the images
finished before it, as A1111's postprocessing loop breaks on an interrupt, or 422 when none was.
"""

from __future__ import annotations

import asyncio
import base64
import html
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdbridge.bridge import pnginfo
from sdbridge.bridge.a1111 import UPSCALERS, A1111Route, FiniteBody, b64_bytes, decode_image_bytes, while_connected
from sdbridge.bridge.protocol import MAX_DIMENSION
from sdbridge.config import LOOPBACK_NAMES
from sdbridge.errors import ModelError, SdbridgeError

if TYPE_CHECKING:
    from sdbridge.bridge.server import Daemon
    from sdbridge.engines.upscalers import UpscalerCache

log = logging.getLogger(__name__)

MAX_BATCH = 16
_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
_UPSCALER_NAMES = [upscaler["name"] for upscaler in UPSCALERS]


class ExtrasOptions(FiniteBody):
    """The fields of A1111's ExtrasBaseRequest (its defaults); the image fields come with each route's body."""

    model_config = ConfigDict(extra="ignore")

    resize_mode: int = Field(0, ge=0, le=1, description="0 scale by upscaling_resize, 1 scale to upscaling_resize_w/h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, ge=0, le=1, description="no face restorer is shipped: above 0 is a 422")
    codeformer_visibility: float = Field(0.0, ge=0, le=1, description="no face restorer is shipped: above 0 is a 422")
    codeformer_weight: float = Field(0.0, ge=0, le=1)
    upscaling_resize: float = Field(2.0, ge=1.0, le=8.0)
    upscaling_resize_w: int = Field(512, ge=1, le=MAX_DIMENSION)
    upscaling_resize_h: int = Field(512, ge=1, le=MAX_DIMENSION)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasOptions):
    image: str = Field("", description="a base64 image (data: URLs accepted)")


class FileData(BaseModel):
    data: str = Field(..., description="a base64 image")
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasOptions):
    imageList: list[FileData] = Field(..., max_length=MAX_BATCH)  # noqa: N815 (A1111's field name)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class UpscaleError(SdbridgeError):
    code = "bad_param"


class Interrupted(UpscaleError):
    """A model upscale stopped by /sdapi/v1/interrupt or its client gone (engines' UpscaleInterrupted)."""

    code = "interrupted"


def upscale(image: np.ndarray, options: ExtrasOptions, models: UpscalerCache | None = None,
            stop: threading.Event | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One image through A1111's upscale step: the result and its ``Postprocess ...`` infotext items. ``models``:
    the model upscalers that names other than PIL's may pick; ``stop`` set ends a model's upscale (Interrupted)."""
    _check(options, models)
    info: dict[str, Any] = {}
    first = options.upscaler_1
    if first == "None":  # A1111: no first upscaler, no upscaling at all (the second is not run alone)
        return image, info
    picture = Image.fromarray(image)
    result = _scaled(picture, first, options, info, models, stop)
    info["Postprocess upscaler"] = first
    second = options.upscaler_2
    if second != "None" and options.extras_upscaler_2_visibility > 0:
        other = _scaled(picture, second, options, {}, models, stop)
        result = Image.blend(result, other, options.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = second
    return np.asarray(result), info


def _check(options: ExtrasOptions, models: UpscalerCache | None) -> None:
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(options, field)
        if name in _UPSCALER_NAMES or (models is not None and models.find(name) is not None):
            continue
        model_names = models.names() if models is not None else []
        where = (f"model upscalers go in {models.models_dir}'s ESRGAN, RealESRGAN or SwinIR folder" if models
                 is not None else "no model upscalers here")
        raise UpscaleError(f"{field}: unknown upscaler {name!r} (known: {', '.join(_UPSCALER_NAMES + model_names)}; "
                           f"{where})")
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(options, field) > 0:
            raise UpscaleError(f"{field} {getattr(options, field):g}: no face restorer is shipped; send 0")


def _scaled(picture: Image.Image, upscaler: str, options: ExtrasOptions, info: dict[str, Any],
            models: UpscalerCache | None = None, stop: threading.Event | None = None) -> Image.Image:
    """A1111's ScriptPostprocessingUpscale.upscale with Upscaler.upscale for a PIL resampling upscaler or a model."""
    width, height = options.upscaling_resize_w, options.upscaling_resize_h
    if options.resize_mode == 1:
        scale = max(width / picture.width, height / picture.height)
        info["Postprocess upscale to"] = f"{width}x{height}"
    else:
        scale = options.upscaling_resize
        info["Postprocess upscale by"] = options.upscaling_resize
    target = (int(picture.width * scale) // 8 * 8, int(picture.height * scale) // 8 * 8)
    if max(target) > MAX_DIMENSION or min(target) < 8:
        raise UpscaleError(f"a {picture.width}x{picture.height} image scaled by {scale:g} would be "
                           f"{target[0]}x{target[1]}: each side must be within 8..{MAX_DIMENSION}")
    result = picture
    if upscaler not in _RESAMPLE and upscaler != "None":  # a model: _check found it
        assert models is not None
        from sdbridge.engines.upscalers import UpscaleInterrupted

        try:
            result = Image.fromarray(models.upscale_to(upscaler, np.asarray(picture), *target, stop=stop))
        except UpscaleInterrupted as exc:
            raise Interrupted(str(exc)) from exc
        except ModelError as exc:
            raise UpscaleError(str(exc), code=exc.code) from exc
    elif scale != 1:  # A1111's loop runs do_upscale once for a resampler: it lands on the scaled size at once
        result = picture.resize((int(picture.width * scale), int(picture.height * scale)), _RESAMPLE[upscaler])
    if result.size != target:
        result = result.resize(target, Image.Resampling.LANCZOS)
    if options.resize_mode == 1 and options.upscaling_crop:
        cropped = Image.new("RGB", (width, height))
        cropped.paste(result, box=(width // 2 - result.width // 2, height // 2 - result.height // 2))
        result = cropped
        info["Postprocess crop to"] = f"{width}x{height}"
    return result


def _postprocessing_text(info: dict[str, Any]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in info.items())


def _html_info(text: str) -> str:
    """A1111's plaintext_to_html of the postprocessing infotext."""
    return f"<div class='infotext'>\n<p>{html.escape(text) or '<br>'}</p>\n</div>" if text else ""


def _process(data: str, what: str, options: ExtrasOptions, models: UpscalerCache | None = None,
             stop: threading.Event | None = None) -> tuple[str, str]:
    """base64 in -> (base64 PNG out, postprocessing infotext); Interrupted passes through to the route."""
    raw = b64_bytes(data, what)
    image = decode_image_bytes(raw, what)
    try:
        parameters, _ = pnginfo.read_info(raw)
    except SdbridgeError:
        parameters = None
    try:
        result, info = upscale(image, options, models, stop)
    except Interrupted:
        raise
    except UpscaleError as exc:
        raise HTTPException(422, str(exc)) from None
    text = _postprocessing_text(info)
    png = pnginfo.encode_png(np.ascontiguousarray(result), parameters or None, postprocessing=text or None)
    return base64.b64encode(png).decode("ascii"), text


def _ram() -> dict[str, Any]:
    """As A1111 reports it (psutil there): ``used`` is this process's resident memory, ``free`` the rest of RAM."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm", encoding="ascii") as statm:
            used = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError) as exc:  # no /proc (macOS, Windows)
        return {"error": f"resident memory is not readable here: {exc}"}
    return {"free": total - used, "used": used, "total": total}


def _cuda() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}


def _model_entry(models: UpscalerCache, file: Any) -> dict[str, Any]:
    return {"name": file.name, "model_name": file.path.stem, "model_path": str(file.path), "model_url": None,
            "scale": models.scale_of(file)}


def upscaler_cache(daemon: Daemon) -> UpscalerCache:
    """The models folder's model upscalers, for the Extras and the hires fix: made on first use, on the daemon's
    device, with its --allow-pickle."""
    api = daemon.a1111
    if api.upscalers is None:
        from sdbridge.engines.device import pick_device
        from sdbridge.engines.upscalers import UpscalerCache

        settings = daemon.settings
        api.upscalers = UpscalerCache(api.models_dir(), pick_device(settings.device),
                                      allow_pickle=settings.allow_pickle)
    return api.upscalers


_T = TypeVar("_T")


async def _while_connected(request: Request, stop: threading.Event, function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` in a thread, ``stop`` set once the client is gone (or this route is cancelled), so that
    a model upscale nobody waits for ends before its next tile instead of holding the one-at-a-time lock."""
    return await while_connected(request, asyncio.to_thread(function, *args), stop.set,
                                 "its upscale stops before its next tile")


def _interrupted(exc: Interrupted) -> HTTPException:
    return HTTPException(422, f"interrupted: {exc} (/sdapi/v1/interrupt, or the client went away)")


def create_extras_router(daemon: Daemon) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"], route_class=A1111Route)

    def models() -> UpscalerCache:
        return upscaler_cache(daemon)

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(body: ExtrasSingleImageRequest, request: Request) -> dict[str, Any]:
        """Upscale one image as A1111's Extras tab does (off the event loop). Interrupted: 422."""
        if not body.image:
            raise HTTPException(422, "image: empty (no image data)")
        stop = threading.Event()
        try:
            image, text = await _while_connected(request, stop, _process, body.image, "image", body, models(), stop)
        except Interrupted as exc:
            raise _interrupted(exc) from None
        return {"html_info": _html_info(text), "image": image}

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
    async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request) -> dict[str, Any]:
        """Upscale each image of ``imageList`` as A1111's Extras tab does. Interrupted: the images finished before
        (A1111's loop breaks), or 422 when there are none."""
        images, texts = [], []
        stop = threading.Event()
        for index, item in enumerate(body.imageList):
            try:
                image, text = await _while_connected(request, stop, _process, item.data, f"imageList[{index}]", body,
                                                     models(), stop)
            except Interrupted as exc:
                if not images:
                    raise _interrupted(exc) from None
                log.info("extra-batch-images: %s; answering with the %d image(s) finished", exc, len(images))
                break
            images.append(image)
            texts.append(text)
        return {"html_info": _html_info(texts[0] if texts else ""), "images": images}

    @router.get("/cmd-flags")
    async def cmd_flags() -> dict[str, Any]:
        """A1111's command-line flags that have a meaning here, from the daemon's settings."""
        settings, api = daemon.settings, daemon.a1111
        return {"api": True, "nowebui": False, "listen": settings.host not in LOOPBACK_NAMES,
                "port": settings.port, "ckpt_dir": str(api.models_dir()), "lora_dir": str(api.lora_dir()),
                "embeddings_dir": str(api.embeddings_dir()), "styles_file": [str(api.styles_path())],
                "api_auth": None, "gradio_auth": None}

    @router.get("/scripts")
    async def scripts() -> dict[str, list[str]]:
        """Scripts by name, as A1111 with sd-webui-controlnet lists them: ControlNet's units run as its always-on
        ``controlnet`` script does. Its selectable ``controlnet m2m`` (not run here, as no ``script_name`` is) is
        what clients look for: webuiapi, not finding it, keeps sending the last request's units with every
        later request, where it would send an empty list."""
        return {"txt2img": ["controlnet m2m", "controlnet"], "img2img": ["controlnet m2m", "controlnet"]}

    @router.get("/script-info")
    async def script_info() -> list[dict[str, Any]]:
        return [{"name": "controlnet", "is_alwayson": True, "is_img2img": is_img2img, "args": []}
                for is_img2img in (False, True)]

    @router.get("/memory")
    async def memory() -> dict[str, Any]:
        """A1111's memory report: the process's resident memory against the machine's, and CUDA's allocator."""
        return {"ram": _ram(), "cuda": _cuda()}

    @router.get("/face-restorers")
    async def face_restorers() -> list[dict[str, Any]]:
        return []

    @router.get("/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        """PIL's upscalers (what the hires fix takes too), then the model upscalers of the models folder."""
        cache = models()
        files = await asyncio.to_thread(cache.files)
        return UPSCALERS + [_model_entry(cache, file) for file in files]

    @router.get("/realesrgan-models")
    async def realesrgan_models() -> list[dict[str, Any]]:
        """The model upscalers in the models folder's RealESRGAN/, as A1111 lists its Real-ESRGAN models."""
        cache = models()
        files = await asyncio.to_thread(cache.files)
        return [{"name": file.name, "path": str(file.path), "scale": cache.scale_of(file)}
                for file in files if file.folder == "RealESRGAN"]

    @router.get("/hypernetworks")
    async def hypernetworks() -> list[dict[str, Any]]:
        return []

    return router

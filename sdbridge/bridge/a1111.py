"""AUTOMATIC1111's HTTP API (``/sdapi/v1/...``), so the tools that drive its web UI drive us.

Field names, defaults and response shapes follow A1111's ``modules/api/models.py`` as its
clients (Krita and Photoshop plugins, TouchDesigner workshop tools, chat front ends) send and
read them. Requests run on the model that already serves the live stream: the route queues a
:class:`~sdbridge.bridge.worker.GenerationTask` and the worker runs it between stream frames.

What differs from A1111, on purpose (docs/a1111-api.md): noise is drawn on the CPU (A1111's
"RNG source: CPU"), so a seed gives the same image on every device; ``restore_faces`` and
``tiling`` are accepted and ignored; the model hash is A1111's legacy 8-digit quick hash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import datetime as dt
import hashlib
import json
import logging
import math
import re
import reprlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sdbridge import __version__
from sdbridge.bridge import a1111_body, codec, pnginfo
from sdbridge.bridge.engine_host import MODEL_ENGINES
from sdbridge.bridge.worker import GenerationTask
from sdbridge.engines import samplers
from sdbridge.engines.generate import HIRES_UPSCALERS, Generation, GenerationError, GenerationRequest, hires_upscaler
from sdbridge.errors import CodecError, ModelError, SdbridgeError, printable

if TYPE_CHECKING:
    from fastapi._compat import ModelField  # FastAPI's own (private) type: only named, never imported at run time

    from sdbridge.bridge.server import Daemon

log = logging.getLogger(__name__)

MAX_SIDE = 2048
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
MODEL_LOAD_WAIT_S = 600.0


# --- JSON that is not JSON: NaN and Infinity --------------------------------------------------------
# Python's json reads the tokens NaN, Infinity and -Infinity, so a client may send them; no A1111 field
# takes them, and the 422's own body would fail to encode them (a 500), as FastAPI echoes the input.


def _json_number(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number in a parsed JSON value, with its path (``a.b[2]``); None if none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict):
        items = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for where, item in items:
        found = non_finite(item, where)
        if found is not None:
            return found
    return None


def _text_safe(value: str) -> str:
    """``value`` with each lone surrogate (JSON's "\\ud800", which UTF-8 cannot carry) as that escape."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def json_safe(value: Any) -> Any:
    """``value`` with each non-finite float as its JSON token in a string ("NaN") and each lone surrogate
    escaped, so it encodes as JSON (pydantic refuses such a string, and its 422 echoes it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return _json_number(value)
    if isinstance(value, str):
        return _text_safe(value)
    if isinstance(value, dict):
        return {_text_safe(key) if isinstance(key, str) else key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class FiniteBody(BaseModel):
    """A request body whose numbers, free-form dicts (override_settings, alwayson_scripts) included, are
    finite: one sentence naming the field and the value, before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        kept = data
        if isinstance(data, dict) and cls.model_config.get("extra") == "ignore":
            # Fields dropped unread may hold anything, as A1111 clients send many we do not take.
            kept = {key: value for key, value in data.items() if key in cls.model_fields}
        found = non_finite(kept)
        if found is not None:
            raise ValueError(f"{found[0] or 'body'} {_json_number(found[1])} is not a finite number")
        return data


# A 422 names the bad field's input; echoed whole, a 5 MB body came back as a 5 MB 422 (QA 3).
MAX_ECHOED_INPUT = 200
_INPUT_REPR = reprlib.Repr()
_INPUT_REPR.maxlevel, _INPUT_REPR.maxstring, _INPUT_REPR.maxother = 3, MAX_ECHOED_INPUT, MAX_ECHOED_INPUT
_INPUT_REPR.maxlist = _INPUT_REPR.maxdict = 8


def short_input(value: Any) -> Any:
    """A validation error's ``input``: itself (JSON-safe) when a number or a short string, else a repr of at most
    MAX_ECHOED_INPUT characters. reprlib bounds the work on a huge or deep value, not only the result."""
    if value is None or isinstance(value, (bool, float)) or isinstance(value, str) and len(value) <= MAX_ECHOED_INPUT:
        return json_safe(value)
    if isinstance(value, int) and abs(value) < 10 ** MAX_ECHOED_INPUT:
        return value
    text = _INPUT_REPR.repr(value)
    return text if len(text) <= MAX_ECHOED_INPUT else text[:MAX_ECHOED_INPUT - 3] + "..."


def _short_errors(errors: Sequence[Any]) -> list[Any]:
    return [{**error, "input": short_input(error["input"])} if isinstance(error, dict) and "input" in error
            else json_safe(error) for error in errors]


class _ShapedValidationError(RequestValidationError):
    """A 422 whose errors are already short and JSON-safe (made off the loop): answered as it is."""


def _is_json(content_type: str | None) -> bool:
    """FastAPI's test for a JSON body: ``application/json`` or ``application/*+json``, parameters aside; or no
    Content-Type at all, which A1111's FastAPI (0.94) reads as JSON: ``requests.post(url,
    data=json.dumps(payload))`` sends none, and such clients got a 422 for every request (QA 52 F1)."""
    if not content_type:
        return True
    mime = content_type.partition(";")[0].strip().lower()
    maintype, _, subtype = mime.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def _parse_body(chunks: list[bytes], body_field: ModelField | None) -> tuple[bytes, Any]:
    """Off the loop: the body joined, and parsed and validated as FastAPI would on the loop (its errors, its
    400), into the model that FastAPI then takes as it is. A 33 MB body held every WebSocket and OSC client for
    1-1.5 s on the loop (QA 9); here the loop runs on between pieces (a1111_body.loads)."""
    raw = b"".join(chunks)
    if body_field is None or not raw:
        return raw, None
    try:
        data = a1111_body.loads(raw)
    except json.JSONDecodeError as exc:
        errors = [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {},
                   "ctx": {"error": exc.msg}}]
        raise _ShapedValidationError(_short_errors(errors), body=None) from None
    except (ValueError, RecursionError):  # not UTF-8, nested too deep, an integer too long: FastAPI's answer
        raise HTTPException(400, "There was an error parsing the body") from None
    value, errors = body_field.validate(data, {}, loc=("body",))
    if errors:
        raise _ShapedValidationError(_short_errors(errors), body=json_safe(data))
    return raw, value


class A1111Route(APIRoute):
    """FastAPI's route, with the input a validation error echoes made JSON-safe (see json_safe) and short, and a
    POST body read within MAX_BODY_BYTES and parsed off the event loop."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        if hasattr(self, "strict_content_type"):  # FastAPI >= 0.122: no Content-Type is no JSON unless this
            self.strict_content_type = False
        handler = super().get_route_handler()
        # One model as the whole body (every A1111 route's shape); anything else FastAPI parses as it does.
        body_field = None if getattr(self, "_embed_body_fields", True) else self.body_field

        async def route(request: Request) -> Response:
            try:
                if request.method == "POST":
                    chunks = await a1111_body.read(request)
                    parsed = body_field if _is_json(request.headers.get("content-type")) else None
                    request._body, value = await asyncio.to_thread(_parse_body, chunks, parsed)
                    if value is not None:
                        request._json = value  # FastAPI reads it as the body and takes the model as it is
                return await handler(request)
            except _ShapedValidationError:
                raise
            except RequestValidationError as exc:  # the app's handler answers it, now encodable
                raise RequestValidationError(_short_errors(exc.errors()), body=json_safe(exc.body)) from None

        return route


DISCONNECT_POLL_S = 0.25  # how often a route that waits on long work asks whether its client is still there
_T = TypeVar("_T")


async def while_connected(request: Request, work: Awaitable[_T], stop: Callable[[], None], what: str) -> _T:
    """``work`` awaited; ``stop`` called once the client is gone, or this route is cancelled, so that work nobody
    waits for ends (a generation at its next step, an upscale before its next tile). Called again at each poll
    while the work runs: a request the worker was starting at the first call may have missed it."""
    future = asyncio.ensure_future(work)
    gone = False
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                return future.result()
            if gone or await request.is_disconnected():
                if not gone:
                    log.info("%s: the client went away; %s", request.url.path, what)
                gone = True
                stop()
    except asyncio.CancelledError:
        stop()
        raise


def _multiple_of_8(value: int) -> int:
    """A side rounded down to a multiple of 8, as A1111 makes it: its latents are ``size // 8`` a side, so a 500
    wide request comes back 496 wide (QA 18: a 422 here refused canvas-sized clients)."""
    return value // 8 * 8


# A1111's samplers that diffusers builds no scheduler for. A request naming one runs SAMPLER_FALLBACK, A1111 1.10's
# own stand-in for a sampler it does not have (sd_samplers.get_sampler_and_scheduler), with the schedule it names,
# and its info says so (QA 18: bots hard-code "DPM++ 2S a Karras"). A name neither knows is still a 422.
A1111_ONLY_SAMPLERS = ("DPM++ 2S a", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++")
SAMPLER_FALLBACK = "DPM++ 2M"


def _schedule_label(sampler: str, schedule: str) -> str | None:
    """The infotext's "Schedule type": the schedule that ran, "Automatic" resolved as A1111 1.10 does (DPM++ 2M's
    is Karras); None for the uniform one an Automatic runs, which A1111 does not write; the one a request named where
    its sampler reads none (samplers.ignored_schedule), as A1111 writes it."""
    resolved, named = samplers.resolve(sampler, schedule, a1111=True)
    if samplers.ignored_schedule(resolved, named):
        return named.label  # A1111 writes the one it was sent, which its DDIM or PLMS never read
    ran = samplers.a1111_schedule(sampler, schedule)
    return None if schedule == "automatic" and ran.name in ("automatic", "uniform") else ran.label


# The samplers whose step takes a request's eta: the infotext field A1111 writes it under (its timestep samplers'
# "Eta DDIM", k-diffusion's "Eta") and the value the step takes when a request names none (DDIM's 0, A1111's eta_ddim
# default too; TCD's gamma 0.3). Written when it differs, as A1111 writes it: webuiapi sends eta 1 with every request,
# and a DDIM image pasted back from its infotext without it came out another (QA 42: up to 143 levels apart).
_ETA_FIELDS = {"DDIMScheduler": ("Eta DDIM", 0.0), "TCDScheduler": ("Eta", 0.3)}


def _eta_field(sampler: str, eta: float | None) -> dict[str, Any]:
    field = _ETA_FIELDS.get(samplers.resolve(runnable_sampler(sampler), a1111=True)[0].scheduler)
    return {} if field is None or eta is None or eta == field[1] else {field[0]: _num(eta)}


def runnable_sampler(name: str) -> str:
    """``name``, or for a sampler only A1111 has the fallback with the same schedule ("DPM++ 2S a Karras" ->
    "DPM++ 2M Karras")."""
    stripped = name.strip()
    for only in A1111_ONLY_SAMPLERS:
        if stripped.lower() == only.lower() or stripped.lower().startswith(only.lower() + " "):
            return SAMPLER_FALLBACK + stripped[len(only):]
    return name


# What a response's images are encoded as (A1111's samples_format option, per request in override_settings), and
# the override_settings a request honours; the others are named in its info's "warnings".
SAMPLE_FORMATS = ("png", "jpg", "jpeg", "webp")
# A1111's options that say where its files go and how they are named: kept and echoed, never used here
WHERE_FILES_GO = ("outdir_", "directories_", "samples_filename_pattern", "grid_save", "save_to_dirs")
HONOURED_OVERRIDES = ("CLIP_stop_at_last_layers", "sd_model_checkpoint", "samples_format", "jpeg_quality",
                      "samples_save", "control_net_no_detectmap")


def _sample_format(value: Any, field: str) -> str:
    if not isinstance(value, str) or value.lower() not in SAMPLE_FORMATS:
        raise HTTPException(422, f"{field} {value!r} is not one of {', '.join(SAMPLE_FORMATS)}")
    return value.lower()


def _jpeg_quality(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 100:
        raise HTTPException(422, f"{field} {value!r} is not a quality in 1..100")
    return int(value)


def checkpoint_name(checkpoint: str) -> str:
    """A checkpoint as clients name it: its title without the " [hash]" that sd-models' titles carry."""
    return checkpoint.rsplit(" [", 1)[0] if checkpoint.endswith("]") else checkpoint


class _Request(FiniteBody):
    """What txt2img and img2img share, with A1111's names and defaults."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        # A1111's request models make every field optional and read null as its default (processing's __post_init__:
        # styles [], override_settings {}; get_fixed_seed: seed -1). OpenAPI-generated clients send null for each
        # field they leave unset (QA 18). Every field here that takes None defaults to it, so dropping is the same.
        if isinstance(data, dict):
            kept = {key: value for key, value in data.items() if value is not None}
            if isinstance(kept.get("override_settings"), dict):  # a null setting is not set, as in /options
                kept["override_settings"] = {key: value for key, value in kept["override_settings"].items()
                                             if value is not None and value != ""}
            return kept
        return data

    prompt: str = Field("", max_length=20000)
    negative_prompt: str = Field("", max_length=20000)
    styles: list[str] = Field(default_factory=list, max_length=32)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = Field(-1, ge=-1, le=MAX_SIDE * 2, description="with _w: the seed's noise at that size")
    seed_resize_from_w: int = Field(-1, ge=-1, le=MAX_SIDE * 2)
    sampler_name: str | None = Field(None, description="an A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M Karras'")
    sampler_index: str | None = Field(None, description="the older name of sampler_name")
    scheduler: str | None = Field(None, description="schedule type: Automatic, Uniform, Karras, Exponential")
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=100)
    steps: int = Field(50, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64, le=MAX_SIDE)
    height: int = Field(512, ge=64, le=MAX_SIDE)
    restore_faces: bool | None = Field(None, description="accepted and ignored (no face restorer is shipped)")
    tiling: bool | None = Field(None, description="accepted and ignored")
    eta: float | None = Field(None, ge=0.0, le=1.0)
    # A1111's sigma churn options; each sampler takes those A1111 passes it (engines/samplers.py A1111_OPTIONS).
    s_churn: float | None = Field(None, ge=0.0, le=100.0)
    s_tmin: float | None = Field(None, ge=0.0)
    s_tmax: float | None = Field(None, ge=0.0, description="0: no limit")
    s_noise: float | None = Field(None, ge=0.0, le=10.0)
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    script_name: str | None = Field(None, description="none is run: a name is a 422, as A1111 answers one it lacks")

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int) -> int:
        return _multiple_of_8(value)

    @field_validator("sampler_name", "sampler_index")
    @classmethod
    def _sampler(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                samplers.resolve(runnable_sampler(value), a1111=True)
            except SdbridgeError as exc:
                if runnable_sampler(value) == value:
                    raise ValueError(str(exc)) from None
                # Named as sent: its stand-in's name is not one the client wrote (QA 19).
                raise ValueError(f"sampler {value!r} runs here as {runnable_sampler(value)!r}, A1111's own stand-in "
                                 f"for it, which fails: {exc}") from None
        return value

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                samplers.resolve("Euler", value, a1111=True)
            except SdbridgeError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _sampler_takes_the_schedule(self) -> _Request:
        """Each name may be known and the pair still not run (Euler a takes no Karras; LCM no schedule type)."""
        if self.scheduler is not None:
            try:
                samplers.resolve(self.sampler(), self.scheduler, a1111=True)
            except SdbridgeError as exc:
                raise ValueError(str(exc)) from None
        return self

    def sampler(self) -> str:
        """The sampler to run: A1111's API default (sampler_index) is Euler."""
        return runnable_sampler(self.sampler_name or self.sampler_index or "Euler")


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=4.0)
    hr_upscaler: str | None = Field(None, description="one of /upscalers or /latent-upscale-modes "
                                    f"({', '.join(HIRES_UPSCALERS)}); default Latent")
    hr_second_pass_steps: int = Field(0, ge=0, le=150)
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE * 2)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE * 2)
    firstphase_width: int = 0
    firstphase_height: int = 0
    # The prompt's bound (and with it pydantic's refusal of a lone surrogate, which the tokenizer fails on): the
    # hires pass encodes these as it does the prompt (QA 72 F11: a surrogate was a 500, and the length unbounded).
    hr_prompt: str = Field("", max_length=20000, description="the second pass's prompt; empty: the prompt")
    hr_negative_prompt: str = Field("", max_length=20000, description="the second pass's negative prompt; empty: "
                                    "the negative prompt")
    hr_sampler_name: str | None = Field(None, description="the second pass's sampler; empty or 'Use same "
                                        "sampler': the sampler")
    hr_scheduler: str | None = Field(None, description="the second pass's schedule type; empty or 'Use same "
                                     "scheduler': the scheduler's")
    hr_checkpoint_name: str | None = Field(None, description="accepted and ignored: the second pass runs on the "
                                           "loaded model")

    @field_validator("hr_sampler_name", "hr_scheduler")
    @classmethod
    def _same(cls, value: str | None) -> str | None:
        # A1111's UI sends its "Use same sampler" / "Use same scheduler" choices by name.
        return None if not value or value.strip().lower().startswith("use same") else value

    @model_validator(mode="after")
    def _upscaler(self) -> Txt2ImgRequest:
        # Checked only with enable_hr, as A1111 reads it only then: clients send their default
        # ("R-ESRGAN 4x+") in requests without the hires fix. Another name may be a model upscaler: A1111Api.build
        # looks for it in the models folder.
        if self.enable_hr and self.hr_upscaler is not None:
            try:
                self.hr_upscaler = hires_upscaler(self.hr_upscaler)
            except GenerationError:
                pass
        return self

    @model_validator(mode="after")
    def _hires_sampler(self) -> Txt2ImgRequest:
        if self.enable_hr and (self.hr_sampler_name or self.hr_scheduler):
            try:
                samplers.resolve(runnable_sampler(self.hr_sampler_name or self.sampler()), self.hr_scheduler,
                                 a1111=True)
            except SdbridgeError as exc:
                raise ValueError(f"hires pass: {exc}") from None
        return self


class Img2ImgRequest(_Request):
    init_images: list[str] = Field(default_factory=list, max_length=8,
                                   description="base64 images (PNG, JPEG or WebP; data: URLs accepted)")
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, "
                             "3 just resize (latent upscale)")
    mask: str | None = Field(None, description="base64 mask image: white is repainted")
    mask_blur: int | None = Field(None, ge=0, le=64)
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="inpaint the masked area only, at full resolution")
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False,
                                                   description="the starting noise scaled by this (A1111's "
                                                   "'Noise multiplier for img2img'; 1 by default)")
    include_init_images: bool = False


class OptionsUpdate(FiniteBody):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(None, max_length=1024)
    samples_save: bool | None = None
    # Read by clip_skip(), as override_settings' is: a field typed int took "2" and true (as 1) where a request's
    # override_settings refused them (QA 49 F2).
    CLIP_stop_at_last_layers: Any = Field(None, description="A1111's clip skip, an integer (1: the last layer); "
                                          "sets the live clip_skip parameter to one less",
                                          json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1},
                                                                       {"type": "null"}]})


class PngInfoRequest(FiniteBody):
    image: str = Field(..., description="a base64 image (data: URLs accepted)")


class GenerationResponse(BaseModel):
    images: list[str] | None
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False  # A1111 1.8+; clients that validate the state require it
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


# --- images --------------------------------------------------------------------------------------


def always_on_script(scripts: dict[str, Any], name: str) -> Any:
    """An ``alwayson_scripts`` entry by its script's name in any case, as A1111 finds it (``controlNet``, as some
    clients send it, is the ControlNet extension too); None when absent."""
    return next((value for key, value in scripts.items() if key.lower() == name), None)


def decode_b64_image(data: str, what: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """A base64 (or data: URL) PNG/JPEG/WebP -> RGB uint8 (or grey with IMREAD_GRAYSCALE); 422 when bad."""
    return decode_image_bytes(b64_bytes(data, what), what, flags)


def decode_image_bytes(raw: bytes, what: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> RGB uint8 (as :func:`decode_b64_image`); 422 when bad."""
    image = _decoded(raw, what, flags)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _decoded(raw: bytes, what: str, flags: int) -> np.ndarray:
    """OpenCV's decode of an image, refused (422) past the frames' size limit: before decoding where the header
    tells the size, since a few hundred KB of PNG can hold hundreds of MB of pixels."""
    try:
        size = codec.encoded_size(raw)
        if size is not None:
            codec.check_size(size[0], size[1], f"{what}: the image")
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), flags)
        if image is None or image.size == 0:
            raise HTTPException(422, f"{what}: not a decodable PNG, JPEG or WebP image ({len(raw)} bytes)")
        codec.check_size(image.shape[1], image.shape[0], f"{what}: the image")  # a WebP: no header read above
    except CodecError as exc:
        raise HTTPException(422, str(exc)) from None
    return image


# Base64 is decoded in pieces of this many characters: one call on a 33 MB string holds the GIL for 200 ms, and
# with it the event loop, even from a thread; a piece is 6 ms, and the loop runs between them.
B64_PIECE = 1024 * 1024
_B64_SPACES = " \n\r\t\f\v"  # ASCII whitespace, skipped as A1111's decode skips it


def b64_bytes(data: str, what: str) -> bytes:
    """Base64 as A1111 reads it: a ``data:`` URL's prefix dropped, whitespace ignored (line breaks every 76
    characters from ``base64.encodebytes`` or GNU ``base64``, a trailing newline, a space after the comma: each
    was "not valid base64" here, QA 52 F9); any other stray character is refused, where A1111 skips it."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if data[:8].lower().startswith(("http://", "https://")):
        raise HTTPException(422, f"{what}: an image URL ({reprlib.repr(data)}); sdbridge fetches no URLs: send the "
                                 f"image itself, in base64")
    # Decoded in pieces of B64_PIECE characters, ASCII whitespace removed from each (str.replace: C speed) and what
    # is left past a multiple of 4 carried to the next. Padding is refused before the end, as a whole-string decode
    # refuses it (validate=True: no data after the padding), also where it falls at a piece's end (QA 56 F2).
    out: list[bytes] = []
    carry = ""
    try:
        for start in range(0, len(data), B64_PIECE):
            piece = carry + data[start:start + B64_PIECE]
            for space in _B64_SPACES:  # ASCII only, as A1111's decode: a U+00A0 is refused in any piece (QA 56 F3)
                if space in piece:
                    piece = piece.replace(space, "")
            last = start + B64_PIECE >= len(data)
            if not last and "=" in piece:
                # Padding that a piece's end splits ("A==" | " ="): the rest may hold more of it and whitespace, no
                # data. A copy of the rest, only where padding comes early.
                rest = data[start + B64_PIECE:]
                if rest.strip("=" + _B64_SPACES):
                    raise binascii.Error("padding before the end")
                piece += "=" * rest.count("=")
                last = True
            if last and not piece.strip("="):
                break  # padding past the data's end, which a whole-string decode lets pass
            usable = len(piece) if last else len(piece) - len(piece) % 4
            out.append(base64.b64decode(piece[:usable], validate=True))
            carry = piece[usable:]
            if last:
                break
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{what}: not valid base64") from None
    raw = b"".join(out)
    if not raw:  # OpenCV asserts on an empty buffer (a 500): say what it is
        raise HTTPException(422, f"{what}: empty (no image data)")
    return raw


def _mask(data: str) -> np.ndarray:
    """A1111 masks: white repaints; an RGBA mask whose colour is empty uses its alpha (as Krita sends)."""
    image = _decoded(b64_bytes(data, "mask"), "mask", cv2.IMREAD_UNCHANGED)
    if image.ndim == 2:
        return image.astype(np.uint8) if image.dtype == np.uint8 else (image / 257).astype(np.uint8)
    if image.shape[2] == 4 and not image[..., :3].any():
        return image[..., 3]
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)


def quick_hash(source: str | None) -> str | None:
    """A1111's legacy model hash: sha256 of 64 KiB at 1 MiB into the weights file, 8 hex digits."""
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        candidates = sorted(path.glob("unet/*.safetensors")) or sorted(path.glob("*.safetensors"))
        if not candidates:
            return None
        path = candidates[0]
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        handle.seek(0x100000)
        chunk = handle.read(0x10000)
        if not chunk:  # a small (tiny) file: hash what there is
            handle.seek(0)
            chunk = handle.read(0x10000)
    return hashlib.sha256(chunk).hexdigest()[:8]


def model_title(source: str | None) -> str | None:
    if not source:
        return None
    name = Path(source).name
    return name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".ckpt")) else name


# --- styles --------------------------------------------------------------------------------------


def load_styles(path: Path | None) -> dict[str, tuple[str, str]]:
    """A1111's styles.csv: name, prompt, negative_prompt."""
    if path is None or not path.is_file():
        return {}
    styles: dict[str, tuple[str, str]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            name = (row.get("name") or "").strip()
            if name:
                styles[name] = ((row.get("prompt") or "").strip(), (row.get("negative_prompt") or "").strip())
    return styles


def apply_style(text: str, style: str) -> str:
    """A1111: a style with ``{prompt}`` wraps the prompt; any other is appended after a comma."""
    if not style:
        return text
    if "{prompt}" in style:
        return style.replace("{prompt}", text)
    return f"{text}, {style}" if text else style


# --- the router ----------------------------------------------------------------------------------


class A1111Api:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.options: dict[str, Any] = {}
        self._save_counter: dict[Path, int] = {}
        self._hash_cache: dict[str, str | None] = {}
        self._listed_cache: dict[str, str] = {}
        self.upscalers: Any = None  # the model upscalers (an UpscalerCache), made by a1111_extras.upscaler_cache
        # The last preview and its PNG in base64: a client polling /progress faster than the steps gets the same
        # picture, encoded once (250 ms at 1024x1024). The lock: polls run in threads, one encodes.
        self._preview_png: tuple[np.ndarray, str] | None = None
        self._preview_lock = threading.Lock()

    # --- settings ---

    @property
    def settings(self) -> Any:
        return self.daemon.settings

    def lora_dir(self) -> Path:
        return self.daemon.lora_dir()

    def embeddings_dir(self) -> Path:
        from sdbridge.engines.models import models_subfolder

        return models_subfolder(self.settings.models_dir, "embeddings", self.settings.embeddings_dir)

    def styles_path(self) -> Path:
        if self.settings.styles_file:
            return Path(self.settings.styles_file).expanduser()
        return Path.home() / ".config" / "sdbridge" / "styles.csv"

    def models_dir(self) -> Path:
        from sdbridge.engines.models import default_models_dir

        return Path(self.settings.models_dir).expanduser() if self.settings.models_dir else default_models_dir()

    def current_model(self) -> str | None:
        engine = self.daemon.engines.active_engine()
        return engine.source if engine is not None and getattr(engine, "parts", None) is not None else None

    def loaded_model(self) -> str | None:
        """The serving model as sd-models lists it: a pulled model loaded by its name (the ``model``
        parameter may be ``good``) is its folder, so that it has one entry, one title and its hash."""
        source = self.current_model()
        return self.listed_model(source) if source is not None else None

    def listed_model(self, source: str) -> str:
        """``source`` (an engine's) as sd-models lists it (loaded_model)."""
        if source not in self._listed_cache:
            self._listed_cache[source] = self._listed_path(source)
        return self._listed_cache[source]

    def _listed_path(self, source: str) -> str:
        from sdbridge.engines.models import resolve_source

        path = source
        if not Path(source).expanduser().exists():
            try:
                path = str(resolve_source(source, models_dir=self.models_dir()).path)
            except SdbridgeError:
                return source
        # A hub id resolved into the hub cache is listed nowhere: it keeps its name as its title.
        return next((listed for listed in self._listed_sources() if _same_file(listed, path)), source)

    def _listed_sources(self) -> list[str]:
        """The models folder's models, then the operator's own (``--model``, which may lie anywhere): listed
        whether or not it serves, so that a client that switched away can switch back to it by its title."""
        from sdbridge.engines import models

        sources = [info.path for info in models.list_models(self.models_dir()) if info.pulled
                   and info.kind in ("diffusers", "single_file")]
        for trusted in sorted(self.daemon.engines.trusted_models()):
            if Path(trusted).exists() and all(not _same_file(trusted, source) for source in sources):
                sources.append(trusted)
        return sources

    def model_hash(self, source: str | None) -> str | None:
        if source not in self._hash_cache:
            self._hash_cache[source or ""] = quick_hash(source)
        return self._hash_cache.get(source or "")

    # --- requests ---

    def build(self, body: _Request, kind: str) -> GenerationRequest:
        if body.script_name:
            # A1111 answers a script it lacks so (api.script_name_to_index); sdbridge runs none, not even the
            # `controlnet m2m` that /scripts lists for webuiapi's sake.
            raise HTTPException(422, f"Script '{body.script_name}' not found: sdbridge runs no scripts (ControlNet "
                                     f"units run from alwayson_scripts)")
        self.check_overrides(body.override_settings)
        prompt, negative = body.prompt, body.negative_prompt
        if body.styles:
            styles = load_styles(self.styles_path())
            for name in body.styles:
                if not name:  # no style, as in A1111: Swagger's "Try it out" body sends [""] (QA 52 F4)
                    continue
                if name not in styles:
                    path = self.styles_path()
                    known = ", ".join(sorted(styles)) or (f"none: {path} has none" if path.is_file()
                                                          else f"none: {path} does not exist")
                    raise HTTPException(422, f"unknown style {name!r} (known: {known})")
                prompt = apply_style(prompt, styles[name][0])
                negative = apply_style(negative, styles[name][1])
        self.check_loras(prompt, kind)
        hires = isinstance(body, Txt2ImgRequest) and body.enable_hr
        # A1111: an empty hires prompt is the prompt, styles and all; a set one gets the styles too.
        hr_prompt, hr_negative = (body.hr_prompt, body.hr_negative_prompt) if hires else ("", "")
        for name in body.styles if hires else ():
            hr_prompt = apply_style(hr_prompt, styles[name][0]) if hr_prompt else ""
            hr_negative = apply_style(hr_negative, styles[name][1]) if hr_negative else ""
        if hr_prompt:
            self.check_loras(hr_prompt, kind, "hr_prompt")
        self.check_texts(kind, body.steps, prompt, negative)
        if hires:
            self.check_texts(kind, body.steps, hr_prompt, hr_negative, body.hr_second_pass_steps or body.steps,
                             (prompt, negative))
        # "DPM++ 2M Karras" becomes "DPM++ 2M" with the Karras schedule, as A1111 1.9+ records it.
        sampler, schedule = samplers.resolve(body.sampler(), body.scheduler, a1111=True)
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative, seed=body.seed, subseed=body.subseed,
            subseed_strength=body.subseed_strength, sampler_name=sampler.name, scheduler=schedule.name,
            steps=body.steps, cfg_scale=body.cfg_scale, width=body.width, height=body.height,
            batch_size=body.batch_size, n_iter=body.n_iter, eta=body.eta,
            **{name: getattr(body, name) for name in ("s_churn", "s_tmin", "s_tmax", "s_noise")
               if getattr(body, name) is not None},
            seed_resize_from_w=max(body.seed_resize_from_w, 0), seed_resize_from_h=max(body.seed_resize_from_h, 0))
        clip_stop = body.override_settings.get("CLIP_stop_at_last_layers")
        if clip_stop is not None:  # this request only, as A1111 restores it afterwards
            request.clip_skip = self.clip_skip(clip_stop, "override_settings.CLIP_stop_at_last_layers")
        if isinstance(body, Txt2ImgRequest):
            request.enable_hr = body.enable_hr
            request.hr_scale = body.hr_scale
            request.hr_upscaler = body.hr_upscaler or "Latent"
            request.hr_second_pass_steps = body.hr_second_pass_steps
            request.hr_resize_x, request.hr_resize_y = body.hr_resize_x, body.hr_resize_y
            request.hr_prompt, request.hr_negative_prompt = hr_prompt, hr_negative
            if body.enable_hr and (body.hr_sampler_name or body.hr_scheduler):
                hr_sampler, hr_schedule = samplers.resolve(runnable_sampler(body.hr_sampler_name or body.sampler()),
                                                           body.hr_scheduler, a1111=True)
                request.hr_sampler_name = hr_sampler.name if body.hr_sampler_name else None
                # "DPM++ 2M Karras" names its schedule; a bare name leaves it to hires_sampler (the first pass's).
                named = bool(body.hr_scheduler) or hr_schedule.name != "automatic"
                request.hr_scheduler = hr_schedule.name if named else None
            # 0.75 is the API's default (StableDiffusionProcessingTxt2Img); 0.7 only the web UI slider's.
            request.denoising_strength = body.denoising_strength if body.denoising_strength is not None else 0.75
            if body.enable_hr and request.hr_upscaler not in HIRES_UPSCALERS:
                request.hr_model = self.hires_model(request.hr_upscaler)
            if body.enable_hr:
                width, height = request.hires_size()
                if not (64 <= width <= MAX_SIDE * 2 and 64 <= height <= MAX_SIDE * 2):
                    raise HTTPException(422, f"hires size {width}x{height} is outside 64..{MAX_SIDE * 2}")
        elif isinstance(body, Img2ImgRequest):
            if not body.init_images:  # A1111's status for it (api.img2imgapi: "Init image not found")
                raise HTTPException(404, "Init image not found: img2img needs init_images, a list of base64 images")
            request.init_images = [decode_b64_image(image, f"init_images[{index}]")
                                   for index, image in enumerate(body.init_images)]
            request.denoising_strength = body.denoising_strength if body.denoising_strength is not None else 0.75
            request.resize_mode = body.resize_mode
            if body.initial_noise_multiplier is not None:
                request.initial_noise_multiplier = body.initial_noise_multiplier
            if body.mask:
                request.mask = _mask(body.mask)
                request.mask_blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x,
                                                                                          body.mask_blur_y)
                request.inpainting_fill = body.inpainting_fill
                request.inpaint_full_res = body.inpaint_full_res
                request.inpaint_full_res_padding = body.inpaint_full_res_padding
                request.inpainting_mask_invert = bool(body.inpainting_mask_invert)
        return request

    def check_overrides(self, overrides: dict[str, Any]) -> None:
        """The override_settings a request honours, checked before it queues (422 naming the bad one)."""
        if "samples_format" in overrides:
            _sample_format(overrides["samples_format"], "override_settings.samples_format")
        if "jpeg_quality" in overrides:
            _jpeg_quality(overrides["jpeg_quality"], "override_settings.jpeg_quality")
        checkpoint = overrides.get("sd_model_checkpoint")
        if checkpoint:
            # A1111 loads it for the request; here a request runs on the model serving the live stream, and taking
            # that away for one request would cut the show. Silently running another model was worse (QA 18).
            source = self.checkpoint_source(checkpoint_name(str(checkpoint)))
            if source not in (self.current_model(), self.loaded_model()):
                raise HTTPException(422, f"override_settings.sd_model_checkpoint {checkpoint!r} is not the loaded "
                                         f"model ({model_title(self.loaded_model())}): a request runs on the model "
                                         f"of the live stream; switch it with POST /sdapi/v1/options first")

    def warnings(self, body: _Request) -> list[str]:
        """What the request asked that it does not get, for its info (A1111 would have done these)."""
        out = []
        asked = [("sampler_name", body.sampler_name or body.sampler_index)]
        if isinstance(body, Txt2ImgRequest) and body.enable_hr:
            asked.append(("hr_sampler_name", body.hr_sampler_name))
        for field, name in asked:
            if name and runnable_sampler(name) != name:
                out.append(f"{field} {name!r} has no diffusers scheduler: {runnable_sampler(name)!r} ran in its place, "
                           f"as A1111 1.10 runs {SAMPLER_FALLBACK} for a sampler it lacks")
        if isinstance(body, Txt2ImgRequest) and body.enable_hr and body.hr_checkpoint_name \
                and body.hr_checkpoint_name.strip().lower() not in ("", "use same checkpoint"):
            out.append(f"hr_checkpoint_name {body.hr_checkpoint_name!r} ignored: the second pass runs on the loaded "
                       f"model")
        ignored = sorted(key for key, value in body.override_settings.items() if key not in HONOURED_OVERRIDES
                         and not (key == "sd_vae" and self.vae_unchanged(value)))
        if ignored:
            out.append(f"override_settings {', '.join(ignored)} ignored: a request applies "
                       f"{', '.join(HONOURED_OVERRIDES)}")
        # ADetailer & co. are sent by default by many clients, whose users got a 200 and no hint (QA 52 F8)
        scripts = sorted(printable(key)[:60] for key in body.alwayson_scripts if key.lower() != "controlnet")
        if scripts:
            out.append(f"alwayson_scripts {', '.join(scripts)} ignored: only ControlNet's units run")
        return out

    def hires_model(self, name: str) -> Callable[[np.ndarray, int, int], np.ndarray]:
        """A model upscaler's name as ``hr_upscaler`` -> the function the hires fix calls. An unknown name is a 422
        as the field's own validation error (as it always was), naming every upscaler there is; a file that does not
        load, a 422 naming the file."""
        from sdbridge.bridge.a1111_extras import upscaler_cache

        models = upscaler_cache(self.daemon)
        if models.find(name) is None:
            known = ", ".join([*HIRES_UPSCALERS, *models.names()])
            raise RequestValidationError([{"type": "value_error", "loc": ("body", "hr_upscaler"), "input": name,
                                           "msg": f"Value error, unknown hr_upscaler {name!r} (known: {known})"}])
        try:
            models.get(name)  # loaded here, off the worker, so that the stream does not wait on the disk
        except ModelError as exc:
            raise HTTPException(422, f"hr_upscaler: {exc}") from None
        return lambda image, width, height: models.hires_steps(name, image, width, height)

    @staticmethod
    def check_texts(kind: str, steps: int, prompt: str, negative: str, hires_steps: int | None = None,
                    first: tuple[str, str] = ("", "")) -> None:
        """A pass's prompts checked before the request queues, naming the field, as the worker will encode them:
        the AND parts (their count and weights), then the attention weights of each text the schedules give
        each part and the negative prompt (QA 27: the request queued, then failed naming no field). Not the raw
        prompt's: there a ``[from:to:when]`` reads as ``[...]`` with ``:`` as text, which refused texts never
        encoded and passed weights that then failed in the worker (QA 72 F9). ``hires_steps``: the hires pass,
        whose empty prompts are ``first``'s (the prompt, the negative prompt)."""
        from sdbridge.engines.generate import prompt_texts
        from sdbridge.engines.prompt_syntax import parse_prompt
        from sdbridge.errors import ParamError

        prompt_name, negative_name = ("prompt", "negative_prompt") if hires_steps is None else \
            ("hr_prompt" if prompt else "prompt", "hr_negative_prompt" if negative else "negative_prompt")
        if hires_steps is not None:
            prompt, negative = prompt or first[0], negative or first[1]
        problem = None
        try:
            texts = prompt_texts(prompt, negative, steps, hires_steps, prompt_name)
        except ParamError as exc:
            problem = str(exc)  # it names the field
        else:
            named = [(prompt_name, text) for part in texts.parts for _, text in part]
            named += [(negative_name, text) for _, text in texts.negative]
            for name, text in dict.fromkeys(named):  # each distinct text once
                error = parse_prompt(text).weight_error if text else None
                if error is not None:
                    problem = f"{name}: {error}"
                    break
        if problem is not None:
            log.warning("%s refused: %s", kind, problem)
            raise HTTPException(422, problem)

    def check_loras(self, prompt: str, kind: str, field: str = "prompt") -> None:
        """The prompt's ``<lora:...>`` tags checked before the request queues: a client's typo answers
        422 naming ``field``, with one warning line, where the worker would log a failed request with its
        traceback."""
        from sdbridge.engines.lora import lora_file_problem
        from sdbridge.engines.prompt_syntax import parse_prompt

        parsed = parse_prompt(prompt)
        # The weights are check_texts' to check, on the texts the schedule encodes (QA 72 F9).
        problem = parsed.errors[0] if parsed.errors else None
        folder = self.lora_dir()
        for name in parsed.lora_weights() if problem is None else ():
            if not folder.is_dir():
                problem = (f"LoRA {name!r} not found: no LoRA folder {str(folder)!r} "
                           f"(set --lora-dir, or lora_dir in sdbridge.toml)")
                break
            found = lora_file_problem(folder, name)  # as the stream's set checks it (QA 30: a pickle 'not found')
            if found is not None:
                problem = found[1]
                break
        if problem is not None:
            log.warning("%s refused: %s: %s", kind, field, problem)
            raise HTTPException(422, f"{field}: {problem}")

    def clip_skip(self, value: Any, field: str) -> int:
        """A1111's CLIP_stop_at_last_layers (1: the last layer, 2: the one before) -> the live
        ``clip_skip`` parameter's count (layers skipped: 0, 1); 422 outside that parameter's range. One rule for
        /options and override_settings: a whole number, as a number or as digits in a string (a form field's)."""
        top = int(self.daemon.store.schema.get("clip_skip").maximum or 0) + 1
        if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,4}\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                or not 1 <= value <= top:
            raise HTTPException(422, f"{field} {value!r} is not an integer in 1..{top} (1: the last layer)")
        return int(value) - 1

    async def _wait_for_a_model(self) -> None:
        """A request sent while no model serves yet but one is on its way (the daemon's start, a switch from the
        preview engine) waits for it, as A1111's wait for a checkpoint loading; it was a 503 that said to start
        the daemon with --model, which it had been."""
        engines = self.daemon.engines
        deadline = time.monotonic() + MODEL_LOAD_WAIT_S
        while self.current_model() is None and engines.settling and time.monotonic() < deadline:
            if self.daemon.worker.stopping:  # answered now: the server waits for every open request (QA 15)
                raise HTTPException(503, "the daemon is stopping: the request was not run")
            await asyncio.sleep(0.1)

    async def run(self, body: _Request, kind: str, http: Request | None = None) -> dict[str, Any]:
        """Run the request on the worker; with ``http``, interrupted at its next step once that client is gone."""
        request = await asyncio.to_thread(self.build, body, kind)
        await self._wait_for_a_model()  # before the ControlNet units, which need one too
        if always_on_script(body.alwayson_scripts, "controlnet"):
            # sd-webui-controlnet's units (bridge/a1111_controlnet.py): models loaded, conditions made, off the loop.
            request.controlnet = await asyncio.to_thread(self.daemon.controlnet_api.units, body.alwayson_scripts,
                                                         request)
        task = GenerationTask(request, kind)
        if body.override_settings.get("sd_model_checkpoint"):
            # build() checked it is the serving model: it runs on that one or not at all (QA 68 F4: one queued
            # behind another ran on the model a switch meanwhile brought, and was labelled with it).
            task.model = self.current_model()
        started = time.perf_counter()
        try:
            pending = asyncio.wrap_future(self.daemon.worker.submit(task))
            generation = await (pending if http is None else
                                while_connected(http, pending, task.interrupt, "its generation ends at its next step"))
        except SdbridgeError as exc:
            status = 503 if exc.code in ("no_model", "stopping") else 409 if exc.code == "model_changed" else 422
            message = str(exc)
            if getattr(exc, "name", None) == "clip_skip":  # in the client's own terms, not only the stream's (QA 23)
                message = f"CLIP_stop_at_last_layers {int(getattr(exc, 'value', 0) or 0) + 1}: {message}"
            raise HTTPException(status, message) from None
        except Exception as exc:  # a bug, not the client's fault: say what failed, keep serving
            raise HTTPException(500, f"{kind} failed: {type(exc).__name__}: {exc}") from None
        finally:
            with self._preview_lock:  # the last preview and its PNG (megabytes at 1024²) were held till the next
                self._preview_png = None  # poll with no request, or the next request's first preview (QA 68 F10)
        log.info("%s: %d image(s) %dx%d, %d steps, in %.2f s", kind, len(generation.images), request.width,
                 request.height, request.steps, time.perf_counter() - started)
        return await asyncio.to_thread(self.respond, body, kind, generation)

    def generation_model(self, generation: Generation) -> str | None:
        """The model a request ran on, as sd-models lists it: the engine it held, which a switch of the stream's
        model meanwhile does not change (the label named the model serving when it ended: QA 47 F1)."""
        source = generation.engine.source
        return self.listed_model(source) if source else self.loaded_model()

    def infotexts(self, generation: Generation, kind: str) -> list[str]:
        from sdbridge.bridge.a1111_controlnet import infotext_params  # it imports this module

        request = generation.request
        model = self.generation_model(generation)
        texts = []
        for index, seed in enumerate(generation.used_seeds):
            params: dict[str, Any] = {
                "Steps": request.steps, "Sampler": request.sampler_name,
                "Schedule type": _schedule_label(request.sampler_name, request.scheduler),
                "CFG scale": _num(request.cfg_scale), "Seed": seed, "Size": f"{request.width}x{request.height}",
                "Model hash": self.model_hash(model), "Model": model_title(model),
                "Denoising strength": _num(request.denoising_strength)
                if kind == "img2img" or request.enable_hr else None,
                "Variation seed": generation.subseeds[index] if request.subseed_strength > 0 else None,
                "Variation seed strength": _num(request.subseed_strength) if request.subseed_strength > 0 else None,
                "Seed resize from": "{}x{}".format(*request.seed_resize) if request.seed_resize else None,
                "Clip skip": generation.clip_skip + 1 if generation.clip_skip > 0 else None,  # A1111 omits 1
                # A1111 reads a missing RNG as GPU: without it, its PNG Info would regenerate with other noise.
                "RNG": "CPU",
                "Pad conds": "True" if generation.padded_conds else None,
                "Noise multiplier": _num(request.initial_noise_multiplier)
                if kind == "img2img" and request.initial_noise_multiplier != 1.0 else None,
                **_eta_field(request.sampler_name, request.eta),
            }
            if kind == "txt2img" and request.enable_hr:
                resize = request.hr_resize_x or request.hr_resize_y
                params.update({"Hires resize" if resize else "Hires upscale":
                               f"{request.hr_resize_x}x{request.hr_resize_y}" if resize else _num(request.hr_scale),
                               "Hires steps": request.hr_second_pass_steps or None,
                               "Hires upscaler": request.hr_upscaler})
                params.update(self.hires_infotext(request))
            if request.mask is not None:
                params["Mask blur"] = request.mask_blur
            params.update(infotext_params(request.controlnet, request.image_prompt))
            params["Version"] = f"sdbridge {__version__}"
            texts.append(pnginfo.infotext(request.prompt, request.negative_prompt, params))
        return texts

    @staticmethod
    def hires_infotext(request: GenerationRequest) -> dict[str, Any]:
        """The second pass's own settings, each only where it differs from the first's (as A1111 writes them)."""
        sampler, schedule = request.hires_sampler()
        schedule_label = _schedule_label(sampler, schedule) or "Automatic"
        return {
            "Hires prompt": request.hr_prompt if request.hr_prompt not in ("", request.prompt) else None,
            "Hires negative prompt": request.hr_negative_prompt
            if request.hr_negative_prompt not in ("", request.negative_prompt) else None,
            "Hires sampler": sampler if sampler != request.sampler_name else None,
            "Hires schedule type": schedule_label
            if schedule_label != (_schedule_label(request.sampler_name, request.scheduler) or "Automatic") else None,
        }

    def respond(self, body: _Request, kind: str, generation: Generation) -> dict[str, Any]:
        request = generation.request
        texts = self.infotexts(generation, kind)
        options = {**self.options, **body.override_settings}
        save = body.save_images or bool(options.get("samples_save", self.settings.save_outputs))
        # A1111 encodes them as its samples_format says, a JPEG's or WebP's parameters in the EXIF UserComment.
        form = str(options.get("samples_format", "png")).lower()
        quality = int(options.get("jpeg_quality", 80))
        images = []
        for index, (image, text) in enumerate(zip(generation.images, texts)):
            data = pnginfo.encode_sample(image, text, form, quality)
            if save:
                self.save(data, kind, generation.used_seeds[index], "jpg" if form == "jpeg" else form)
            if body.send_images:
                images.append(base64.b64encode(data).decode("ascii"))
        # Each ControlNet unit's condition follows the images, as the extension appends its detected maps (clients
        # take them from the end), unless its control_net_no_detectmap option or the unit's save_detected_map says
        # not to (QA 21).
        if body.send_images and not options.get("control_net_no_detectmap", False):
            images += [base64.b64encode(pnginfo.encode_png(unit.image)).decode("ascii")
                       for unit in request.controlnet if unit.save_detected_map]
        warnings = self.warnings(body) + request.warnings
        for warning in warnings:
            log.warning("%s: %s", kind, warning)
        model = self.generation_model(generation)
        info = {
            "prompt": request.prompt, "all_prompts": [request.prompt] * len(texts),
            "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * len(texts),
            "seed": request.seed, "all_seeds": generation.used_seeds, "subseed": request.subseed,
            "all_subseeds": generation.subseeds[: len(texts)], "subseed_strength": request.subseed_strength,
            "width": request.width, "height": request.height, "sampler_name": request.sampler_name,
            "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_title(model),
            "sd_model_hash": self.model_hash(model), "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": request.seed_resize_from_w or -1,
            "seed_resize_from_h": request.seed_resize_from_h or -1, "denoising_strength": request.denoising_strength,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": body.styles,
            "job_timestamp": generation.job_timestamp, "clip_skip": generation.clip_skip + 1,
            "is_using_inpainting_conditioning": False, "version": f"sdbridge {__version__}",
            "interrupted": generation.progress.interrupted,
        }
        if warnings:
            info["warnings"] = warnings
        parameters = body.model_dump()
        if isinstance(body, Img2ImgRequest) and not body.include_init_images:  # A1111 echoes them when asked (QA 52)
            parameters["init_images"] = None
            parameters["mask"] = None
        if body.send_images is False:
            images = []
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    def save(self, data: bytes, kind: str, seed: int, extension: str = "png") -> Path:
        """outputs/<kind>-images/YYYY-MM-DD/NNNNN-SEED.png (or .jpg, .webp), numbered on from what is there (A1111's
        layout)."""
        folder = Path(self.settings.outputs_dir).expanduser() / f"{kind}-images" / dt.date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        number = self._save_counter.get(folder)
        if number is None:
            existing = [int(p.name.split("-", 1)[0]) for p in folder.glob("*.*") if p.name.split("-", 1)[0].isdigit()]
            number = max(existing, default=-1) + 1
        path = folder / f"{number:05d}-{seed}.{extension}"
        path.write_bytes(data)
        self._save_counter[folder] = number + 1
        return path

    # --- progress ---

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        """A1111's /progress. Off the event loop (it may encode a PNG)."""
        worker = self.daemon.worker
        task = worker.task
        state = ProgressState()
        if task is None or task.generation is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state.model_dump(), "current_image": None,
                    "textinfo": None}
        progress = task.generation.progress
        state = ProgressState(skipped=progress.skipped, interrupted=progress.interrupted, job=task.kind,
                              job_count=progress.job_count, job_no=progress.job_no,
                              job_timestamp=task.generation.job_timestamp,
                              sampling_step=progress.sampling_step, sampling_steps=progress.sampling_steps)
        fraction = progress.fraction
        elapsed = time.monotonic() - progress.started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        current = None
        if not skip_current_image:
            task.generation.request_preview()
            current = self._preview_b64(progress.preview)
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state.model_dump(),
                "current_image": current, "textinfo": None}

    def _preview_b64(self, preview: np.ndarray | None) -> str | None:
        if preview is None:
            return None
        with self._preview_lock:
            # By identity: the generation puts a new array in place of the last, never writes into it.
            if self._preview_png is None or self._preview_png[0] is not preview:
                self._preview_png = (preview, base64.b64encode(pnginfo.encode_png(preview)).decode("ascii"))
            return self._preview_png[1]

    def queue_status(self) -> dict[str, Any]:
        """Gradio 3's ``GET /queue/status``, which A1111's web UI answers beside its API: the Cyanic SD-Krita plugin
        takes its answer as "connected" and read nothing else while it was a 404 here (QA 52 F3). The queue is
        the one-shot requests waiting and running."""
        worker = self.daemon.worker
        waiting = worker.tasks.qsize() + int(worker.task is not None)
        return {"msg": "estimation", "rank": None, "queue_size": waiting, "avg_event_process_time": None,
                "avg_event_concurrent_process_time": None, "rank_eta": None, "queue_eta": 0}

    # --- options and models ---

    def get_options(self) -> dict[str, Any]:
        model = self.loaded_model()
        title = model_title(model)
        hash_ = self.model_hash(model)
        out = {
            "sd_model_checkpoint": f"{title} [{hash_}]" if title and hash_ else title,
            "sd_checkpoint_hash": hash_, "sd_vae": self.vae_option(),
            "CLIP_stop_at_last_layers": int(self.daemon.store.get("clip_skip")) + 1,
            "samples_save": bool(self.settings.save_outputs), "samples_format": "png", "jpeg_quality": 80,
            "outdir_samples": "", "outdir_txt2img_samples": str(Path(self.settings.outputs_dir) / "txt2img-images"),
            "outdir_img2img_samples": str(Path(self.settings.outputs_dir) / "img2img-images"),
            "live_previews_enable": True, "show_progress_every_n_steps": 1, "randn_source": "CPU",
            "sdbridge_version": __version__,
        }
        out.update(self.options)
        return out

    def vae_option(self) -> str:
        """A1111's ``sd_vae``: the --vae file's name as /sd-vae lists it ('myvae' given, 'myvae.safetensors'
        listed: QA 28), or "Automatic" (each model's own, or one beside it)."""
        from sdbridge.engines.vae_file import resolve_vae

        if not self.settings.vae:
            return "Automatic"
        try:
            return resolve_vae(self.settings.vae, self.settings.models_dir).name
        except ModelError:
            return Path(self.settings.vae).name

    def vae_unchanged(self, value: Any) -> bool:
        """An ``sd_vae`` that asks for the VAE in use: its name, nothing, or without --vae "Automatic" or "None" (A1111:
        each checkpoint's own). /options refused "None", which override_settings took (QA 52 F5)."""
        return value in (None, "", self.vae_option()) or (value in ("Automatic", "None") and not self.settings.vae)

    async def set_options(self, body: OptionsUpdate) -> None:
        values = body.model_dump(exclude_none=True)
        vae = values.pop("sd_vae", None)
        if not self.vae_unchanged(vae):
            raise HTTPException(422, f"sd_vae {vae!r}: the VAE is chosen when the daemon starts (--vae, or vae in "
                                     f"sdbridge.toml); it is {self.vae_option()!r}")
        if "samples_format" in values:
            values["samples_format"] = _sample_format(values["samples_format"], "samples_format")
        if "jpeg_quality" in values:
            values["jpeg_quality"] = _jpeg_quality(values["jpeg_quality"], "jpeg_quality")
        where = sorted(key for key in values if key.startswith(WHERE_FILES_GO))
        current = self.get_options() if where else {}
        for key in where:
            # kept and echoed as A1111 does, but files go where the daemon's settings say: a client that moved them
            # believed its images were there (QA 34)
            if values[key] != current.get(key):
                log.warning("option %s=%r is kept but not used: images are saved under %s (--outputs-dir)", key,
                            printable(str(values[key])), self.settings.outputs_dir)
        checkpoint = values.pop("sd_model_checkpoint", None)
        clip_stop = values.pop("CLIP_stop_at_last_layers", None)
        # Every value checked, and the checkpoint switched, before the others apply: a checkpoint that failed was a
        # 422 that had changed the live stream's clip skip and the other options already (QA 68 F3).
        clip_skip = self.clip_skip(clip_stop, "CLIP_stop_at_last_layers") if clip_stop is not None else None
        if checkpoint is not None:
            await self._switch_checkpoint(checkpoint)
        if clip_skip is not None:  # the live parameter: the stream and later requests use it
            _, errors = self.daemon.store.update({"clip_skip": clip_skip})
            if errors:
                raise HTTPException(422, f"CLIP_stop_at_last_layers: {errors[0]}")
        self.options.update(values)

    async def _switch_checkpoint(self, checkpoint: Any) -> None:
        """Make ``checkpoint`` serve; answers once it does, as A1111 does (422 where it cannot load)."""
        name = checkpoint_name(checkpoint)
        if not name.strip():
            raise HTTPException(422, "sd_model_checkpoint is empty: name a model from /sdapi/v1/sd-models")
        name = await asyncio.to_thread(self.checkpoint_source, name)
        engines = self.daemon.engines
        serving = name in (self.current_model(), await asyncio.to_thread(self.loaded_model))
        if serving and not engines.settling:
            return
        failures = engines.load_failures
        # Back to the model serving while another loads: the store asks for it again, so that load is let go (QA 68
        # F7: answered 200 at once, and the daemon ended on the other). A model engine stays the one it is: the
        # compiled engine became plain diffusion at every A1111 switch (QA 68 F8).
        engine = self.daemon.store.get("engine")
        back = engines.serving_request if serving else None
        applied, errors = self.daemon.store.update(
            {"model": back.get("model"), "engine": back.get("engine")} if back is not None else
            {"model": name, "engine": engine if engine in MODEL_ENGINES else "diffusion"})
        if errors:
            raise HTTPException(422, str(errors[0]))
        if serving:
            return
        # A1111 answers once the checkpoint is loaded; so do we (the stream keeps serving meanwhile).
        # The worker starts the load at its next turn (< 0.25 s); after `settle` with no load
        # running, this choice is one that failed before and is not retried until it changes.
        started = time.monotonic()
        settle = started + 2.0
        while time.monotonic() < started + MODEL_LOAD_WAIT_S:
            await asyncio.sleep(0.05)
            if self.current_model() == name:  # swapped in by the worker: it serves now
                return
            if engines.settling:  # loading, loaded for the worker's next turn, or after another load
                continue
            if engines.load_failures != failures or time.monotonic() > settle:
                reason = engines.last_error or "it did not load"
                raise HTTPException(422, f"sd_model_checkpoint {checkpoint!r} could not be loaded: {reason}; "
                                         f"the previous model keeps serving")
        raise HTTPException(504, f"sd_model_checkpoint {checkpoint!r} is still loading")

    def checkpoint_source(self, name: str) -> str:
        """A title from sd-models, a pulled model's name, or a path (confined like any client path)."""
        for item in self.sd_models():
            if name in (item["title"], item["model_name"], item["filename"]):
                return item["filename"]
        try:
            return self.daemon.engines.client_model_path(name)
        except SdbridgeError as exc:
            raise HTTPException(422, f"sd_model_checkpoint: {exc}") from None

    def sd_models(self) -> list[dict[str, Any]]:
        out = []
        sources = self._listed_sources()
        current = self.loaded_model()
        # One entry per model: the loaded one is the listed one it resolves to (a relative path, a link).
        if current and all(not _same_file(current, source) for source in sources):
            sources.insert(0, current)
        for source in sources:
            title, hash_ = model_title(source), self.model_hash(source)
            out.append({"title": f"{title} [{hash_}]" if hash_ else title, "model_name": title, "hash": hash_,
                        "sha256": None, "filename": source, "config": None})
        return out

    def loras(self) -> list[dict[str, Any]]:
        """The LoRA folder as A1111 lists it; the names are what ``<lora:name:w>`` takes."""
        from sdbridge.engines.lora import list_loras

        return list_loras(self.lora_dir())

    def rescan_embeddings(self) -> list[str]:
        """Run on the worker thread (which owns the engine): new and changed files in the embeddings
        folder are read; returns their names. With no diffusion model there is nothing to rescan:
        the next model reads the folder when it loads."""
        engine = self.daemon.engines.active_engine()
        if engine is None or getattr(engine, "parts", None) is None:
            return []
        names: list[str] = engine.rescan_embeddings()  # type: ignore[attr-defined]
        return names

    def embeddings(self) -> dict[str, Any]:
        engine = self.daemon.engines.active_engine()
        inversions = getattr(engine, "textual_inversions", None)
        if inversions is not None and hasattr(inversions, "a1111_listing"):
            return inversions.a1111_listing()
        return {"loaded": {}, "skipped": {}}


def _same_file(first: str, second: str) -> bool:
    try:
        return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()
    except OSError:  # a link loop: not the same as anything listed
        return False


def _num(value: float | None) -> float | int | None:
    if value is None:
        return None
    return int(value) if float(value).is_integer() else round(float(value), 4)


# What hr_upscaler takes, listed where A1111 lists it: pixel upscalers here (served with the model upscalers by
# a1111_extras.py's /upscalers), latent modes apart.
UPSCALERS = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
             for name, (space, _, _) in HIRES_UPSCALERS.items() if space == "pixel"]
LATENT_UPSCALE_MODES = [{"name": name} for name, (space, _, _) in HIRES_UPSCALERS.items() if space == "latent"]


def create_router(daemon: Daemon) -> APIRouter:
    api = A1111Api(daemon)
    daemon.a1111 = api
    router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"], route_class=A1111Route)

    @router.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> dict[str, Any]:
        """Text to image, as A1111's web UI does it, on the model serving the live stream."""
        return await api.run(body, "txt2img", request)

    @router.post("/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request) -> dict[str, Any]:
        """Image to image and inpainting (``mask``), as A1111's web UI does it."""
        return await api.run(body, "img2img", request)

    @router.get("/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = Query(False)) -> dict[str, Any]:
        """The running request's progress, with a preview of its current image."""
        # The preview's PNG took 250-290 ms at 1024x1024 on the loop, at every poll, stalling every client (QA 51).
        return await asyncio.to_thread(api.progress, skip_current_image)

    @router.post("/interrupt")
    async def interrupt() -> dict[str, Any]:
        """Stop the running request (its finished images are returned); queued ones run, as in A1111."""
        task = daemon.worker.task  # read once: the worker thread sets it to None when the request ends (QA 51 F3)
        if task is not None:
            task.interrupt()
        if api.upscalers is not None:  # a model upscale (Extras, hires fix) ends before its next tile
            api.upscalers.interrupt()
        return {}  # A1111's answer (api.interruptapi)

    @router.post("/skip")
    async def skip() -> None:
        """Skip the current batch of the running request."""
        task = daemon.worker.task  # read once, as /interrupt does
        if task is not None:
            task.skip()

    @router.get("/options")
    async def get_options() -> dict[str, Any]:
        return await asyncio.to_thread(api.get_options)  # the first call for a model lists the models folder

    @router.post("/options")
    async def set_options(body: OptionsUpdate) -> None:
        """Set options; ``sd_model_checkpoint`` loads that model (answering once it serves)."""
        await api.set_options(body)

    @router.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return await asyncio.to_thread(api.sd_models)

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        """Models are listed fresh on every call; kept for clients that call it."""
        api._hash_cache.clear()
        api._listed_cache.clear()

    @router.get("/samplers")
    async def list_samplers() -> list[dict[str, Any]]:
        return samplers.a1111_samplers()

    @router.get("/schedulers")
    async def list_schedulers() -> list[dict[str, Any]]:
        return samplers.a1111_schedulers()

    @router.get("/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict[str, Any]]:
        return LATENT_UPSCALE_MODES

    @router.get("/sd-vae")
    async def sd_vae() -> list[dict[str, Any]]:
        from sdbridge.engines.vae_file import list_vaes

        entries = await asyncio.to_thread(list_vaes, api.settings.models_dir)
        if api.settings.vae and api.vae_option() not in {entry.name for entry in entries}:
            entries.append(Path(api.settings.vae).expanduser())  # a --vae outside the folder is a VAE there is
        return [{"model_name": entry.name, "filename": str(entry)} for entry in entries]

    @router.get("/loras")
    async def loras() -> list[dict[str, Any]]:
        return await asyncio.to_thread(api.loras)

    @router.post("/refresh-loras")
    async def refresh_loras() -> None:
        return None

    @router.get("/embeddings")
    async def embeddings() -> dict[str, Any]:
        return api.embeddings()

    @router.post("/refresh-embeddings")
    async def refresh_embeddings() -> None:
        """Read the embeddings folder again (new and changed files); answers once they are in use."""
        await asyncio.wrap_future(daemon.worker.call(api.rescan_embeddings))

    @router.get("/prompt-styles")
    async def prompt_styles() -> list[dict[str, Any]]:
        styles = await asyncio.to_thread(load_styles, api.styles_path())
        return [{"name": name, "prompt": prompt, "negative_prompt": negative}
                for name, (prompt, negative) in styles.items()]

    @router.post("/png-info", response_model=PngInfoResponse)
    async def png_info(body: PngInfoRequest) -> dict[str, Any]:
        """The generation parameters a PNG carries, as text and parsed."""
        raw = await asyncio.to_thread(b64_bytes, body.image, "image")  # 33 MB of base64: 50 ms, off the loop
        try:
            text, items = await asyncio.to_thread(pnginfo.read_info, raw)
        except SdbridgeError as exc:
            # PIL names the file it could not identify by its repr, here "<_io.BytesIO object at 0x7f...>":
            # an address in our memory, and no help to the client.
            raise HTTPException(422, f"image: {_OBJECT_REPR.sub('', str(exc))}") from None
        parameters = await asyncio.to_thread(pnginfo.parse_infotext, text) if text else {}
        return {"info": text or "", "items": items, "parameters": parameters}

    return router


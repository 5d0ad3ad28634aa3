"""sd-webui-controlnet's API, as A1111 clients send it: units in ``alwayson_scripts.controlnet.args``
of txt2img/img2img, and ``/controlnet/version``, ``model_list``, ``module_list``, ``detect``.

A unit's fields and defaults follow the extension's ``ControlNetUnit`` (its API, 1.1.4xx):
``input_image`` (or ``image``, a base64 string or ``{"image": ..., "mask": ...}``), ``module``,
``model``, ``weight``, ``guidance_start``, ``guidance_end``, ``control_mode`` (0/"Balanced",
1/"My prompt is more important", 2/"ControlNet is more important"), ``resize_mode`` (0/"Just
Resize", 1/"Crop and Resize", 2/"Resize and Fill"), ``pixel_perfect``, ``processor_res``,
``threshold_a``/``threshold_b`` (canny's low/high thresholds), ``enabled``. A unit without an
image uses the img2img init image, as the extension does. Modules map onto sdbridge's
preprocessors (engines/preprocessors.py): the extension's names for the same kind of map
(``depth_midas``, ``softedge_pidinet``, ``lineart_realistic``, ...) are accepted as aliases.

IP-Adapter units (module ``ip-adapter_clip_sd15``, ``ip-adapter_clip_h``, ``ip-adapter-auto``, ...; model an
adapter's name in ``<models>/ip_adapter``, listed by ``model_list`` with the ControlNets) give the request a
style image (engines/ip_adapter.py): the unit's image through the adapter's CLIP image encoder, its weight as
the scale. One per request.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdbridge.bridge import codec, pnginfo
from sdbridge.bridge.a1111 import A1111Route, FiniteBody, always_on_script, decode_b64_image, quick_hash
from sdbridge.engines.controlnet import (HASH_SUFFIX, RequestUnit, list_controlnets, load_controlnet,
                                         resolve_controlnet)
from sdbridge.engines.ip_adapter import list_ip_adapters, resolve_ip_adapter
from sdbridge.engines.preprocessors import Options, Preprocessors
from sdbridge.errors import ModelError, SdbridgeError, printable
from sdbridge.params import CONTROLNET_SLOTS

if TYPE_CHECKING:
    from sdbridge.bridge.server import Daemon
    from sdbridge.engines.generate import GenerationRequest

API_VERSION = 2
REQUEST_CACHE_SIZE = 2
# The extension's module names -> sdbridge's preprocessors.
MODULES: dict[str, str] = {
    "none": "none", "canny": "canny", "invert": "invert", "invert (from white bg & black line)": "invert",
    "softedge": "softedge", "softedge_hed": "softedge", "softedge_hedsafe": "softedge", "softedge_pidinet": "softedge",
    "softedge_pidisafe": "softedge", "lineart": "lineart", "lineart_realistic": "lineart",
    "lineart_coarse": "lineart", "lineart_standard (from white bg & black line)": "lineart", "depth": "depth",
    "depth_midas": "depth", "depth_leres": "depth", "depth_zoe": "depth", "depth_anything": "depth",
    "openpose": "pose", "dw_openpose": "pose",
    # The preprocessors' internal names, which the extension takes beside their labels and its module_list
    # gives (QA 21: clients send "hed").
    "hed": "softedge", "hed_safe": "softedge", "pidinet": "softedge", "pidinet_safe": "softedge",
    "lineart_standard": "lineart",
}
# control_types: the extension's type names for ours, the word its models' names carry, and the module it offers.
CONTROL_TYPES = {"canny": ("Canny", "canny", "canny"), "depth": ("Depth", "depth", "depth_midas"),
                 "lineart": ("Lineart", "lineart", "lineart_realistic"),
                 "softedge": ("SoftEdge", "softedge", "softedge_pidinet"),
                 "pose": ("OpenPose", "openpose", "openpose"),
                 "invert": ("Scribble/Sketch", "scribble", "invert (from white bg & black line)")}
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "controlnet", "balanced": "balanced",
                 "my prompt is more important": "prompt", "controlnet is more important": "controlnet"}
RESIZE_MODES = {0: "stretch", 1: "crop", 2: "fit", "just resize": "stretch", "crop and resize": "crop",
                "resize and fill": "fit", "envelope (outer fit)": "fit", "inner fit (scale to fit)": "crop",
                "scale to fit (inner fit)": "crop", "outer fit (shrink to fit)": "fit"}  # all four old names
THRESHOLDED = {"canny": ("Low Threshold", "High Threshold", 100, 200)}
# The extension's Resolution slider default, which its bound_check_params gives a unit sent with processor_res < 0
# (webuiapi's default -1): the same for every module it maps onto ours. module_detail advertises it.
PROCESSOR_RES = 512
# The extension's IP-Adapter modules (its CLIP image encoders): the adapter's own encoder runs whichever is named.
IP_MODULES = ("ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_sdxl",
              "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_g", "ip-adapter_clip_bigg")


class ControlNetUnitArgs(BaseModel):
    """One unit of ``alwayson_scripts.controlnet.args``; unknown fields (lowvram, guessmode, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = True
    # A list too (QA 21): [image, mask] or [{"image": ...}, ...], as the extension takes; the first image is used.
    input_image: str | dict[str, Any] | list[Any] | None = None
    image: str | dict[str, Any] | list[Any] | None = None
    save_detected_map: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    control_mode: int | str = 0
    resize_mode: int | str = 1
    pixel_perfect: bool = False
    processor_res: int = Field(-1, ge=-1, le=4096)
    threshold_a: float = Field(-1, ge=-1, le=4096, allow_inf_nan=False)
    threshold_b: float = Field(-1, ge=-1, le=4096, allow_inf_nan=False)

    @model_validator(mode="after")
    def _guidance_in_order(self) -> ControlNetUnitArgs:
        # The extension refuses it (guidance_check); run here, it changed the image on no step's account (QA 21).
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start {self.guidance_start:g} is after guidance_end {self.guidance_end:g}")
        return self


class DetectRequest(FiniteBody):
    controlnet_module: str = "none"
    # webuiapi's controlnet_detect sends controlnet_images: taken too.
    controlnet_input_images: list[str] = Field(default_factory=list, max_length=8,
                                               validation_alias=AliasChoices("controlnet_input_images",
                                                                             "controlnet_images"))
    controlnet_processor_res: int = Field(PROCESSOR_RES, ge=-1, le=4096)
    controlnet_threshold_a: float = Field(-1, ge=-1, le=4096, allow_inf_nan=False)
    controlnet_threshold_b: float = Field(-1, ge=-1, le=4096, allow_inf_nan=False)


def _with_hash(name: str, path: Path) -> str:
    hash_ = quick_hash(str(path))
    return f"{name} [{hash_}]" if hash_ else name


def unit_image(unit: ControlNetUnitArgs, where: str, request: GenerationRequest, why: str) -> Any:
    """A unit's image (uint8 RGB): its own, else img2img's init image; 422 with ``why`` when it has none."""
    data = unit.input_image if unit.input_image is not None else unit.image
    if isinstance(data, list):
        data = data[0] if data else None
    if isinstance(data, dict):
        data = data.get("image")
    if data:
        return decode_b64_image(str(data), f"{where}.input_image")
    if request.init_images:
        return request.init_images[0]
    raise HTTPException(422, f"{where} has no input_image: {why}")


def module_name(module: str, where: str = "controlnet module") -> str:
    """The preprocessor for an extension module name; 422 naming ``where`` and the known ones otherwise."""
    key = module.strip().lower()
    if key in IP_MODULES:
        raise HTTPException(422, f"{where} {module!r} is an IP-Adapter's image encoder, not a preprocessor: send "
                                 f"it in a generation's unit")
    if key not in MODULES:
        raise HTTPException(422, f"{where} {module!r} is not known (known: {', '.join([*MODULES, *IP_MODULES])})")
    return MODULES[key]


def _choice(table: dict[Any, str], value: int | str, what: str) -> str:
    key = value.strip().lower() if isinstance(value, str) else value
    if what == "resize_mode" and isinstance(key, int) and not isinstance(key, bool) and key >= 3:
        key = 0  # the extension's resize_mode_from_value: 3 and above are Just Resize
    if key not in table:
        shown = ", ".join(str(item) for item in table)
        raise HTTPException(422, f"controlnet {what} {value!r} is not one of {shown}")
    return table[key]


def _options(module: str, threshold_a: float, threshold_b: float, resolution: int) -> Options:
    """The preprocessor's options; thresholds matter (and are checked) only for the modules that take them,
    since the extension sends its sliders' values for every module (depth_leres' 0-100, tile's 1-8, ...).
    A resolution < 0 is the extension's default, :data:`PROCESSOR_RES`: a generation unit without processor_res ran
    at the request's full size, a map other than the extension's and /controlnet/detect's (QA 86 F8)."""
    if resolution < 0:
        resolution = PROCESSOR_RES
    defaults = THRESHOLDED.get(module)
    if defaults is None:
        return Options(resolution=resolution)
    low = int(threshold_a) if threshold_a >= 0 else defaults[2]
    high = int(threshold_b) if threshold_b >= 0 else defaults[3]
    if not (0 <= low <= 255 and 0 <= high <= 255):
        raise HTTPException(422, f"controlnet thresholds {threshold_a}, {threshold_b} not in [0, 255] for {module}")
    return Options(low, high, resolution)


class ControlNetApi:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._preprocessors: Preprocessors | None = None
        # ControlNets a request loaded that no live slot holds, for the next requests (a client sends the
        # same units again and again): (engine id, name) -> (the engine, weakly, model), the most recent
        # REQUEST_CACHE_SIZE; a model swap leaves them behind with their engine.
        self._cache: collections.OrderedDict[tuple[int, str], tuple[weakref.ref, Any]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()

    def folder(self) -> Path:
        return self.daemon.engines.controlnet_dir()

    def preprocessors(self) -> Preprocessors:
        controlnets = getattr(self.daemon.engines.active_engine(), "controlnets", None)
        if controlnets is not None:
            return controlnets.preprocessors
        if self._preprocessors is None:
            self._preprocessors = Preprocessors(self.folder() / "annotators")
        return self._preprocessors

    def ip_folder(self) -> Path:
        return self.daemon.engines.ip_adapter_dir()

    def model_list(self) -> list[str]:
        """ControlNets, then IP-Adapters (the extension lists both), as ``name [hash]``."""
        return self.controlnet_list() + self.ip_model_list()

    def controlnet_list(self) -> list[str]:
        return [_with_hash(name, resolve_controlnet(name, self.folder())) for name in list_controlnets(self.folder())]

    def ip_model_list(self) -> list[str]:
        return [_with_hash(name, resolve_ip_adapter(name, self.ip_folder()))
                for name in list_ip_adapters(self.ip_folder())]

    def module_detail(self) -> dict[str, Any]:
        detail = {}
        for module in MODULES:
            sliders: list[dict[str, Any]] = [{"name": "Resolution", "value": PROCESSOR_RES, "min": 64,
                                              "max": 2048}]
            thresholds = THRESHOLDED.get(MODULES[module])
            if thresholds:
                sliders += [{"name": thresholds[0], "value": thresholds[2], "min": 1, "max": 255},
                            {"name": thresholds[1], "value": thresholds[3], "min": 1, "max": 255}]
            detail[module] = {"model_free": False, "sliders": sliders}
        for module in IP_MODULES:  # the image encoder runs at its own size: no slider
            detail[module] = {"model_free": False, "sliders": []}
        return detail

    def detect(self, body: DetectRequest) -> dict[str, Any]:
        name = module_name(body.controlnet_module)
        if not body.controlnet_input_images:
            raise HTTPException(422, "controlnet_input_images is empty: send at least one base64 image")
        options = _options(name, body.controlnet_threshold_a, body.controlnet_threshold_b,
                           body.controlnet_processor_res)
        images = []
        for index, data in enumerate(body.controlnet_input_images):
            image = decode_b64_image(data, f"controlnet_input_images[{index}]")
            try:
                out = self.preprocessors().run(name, image, options)
            except SdbridgeError as exc:
                raise HTTPException(422, f"controlnet module {body.controlnet_module!r}: {exc}") from None
            images.append(base64.b64encode(pnginfo.encode_png(out)).decode("ascii"))
        return {"images": images, "info": "Success"}

    # --- units of a generation request ---

    def units(self, scripts: dict[str, Any], request: GenerationRequest) -> list[RequestUnit]:
        """``alwayson_scripts.controlnet`` -> loaded models and condition images at the request's size."""
        script = always_on_script(scripts, "controlnet") or {}
        args = script.get("args") if isinstance(script, dict) else script
        if not isinstance(args, list):
            raise HTTPException(422, "alwayson_scripts.controlnet must be {\"args\": [unit, ...]}")
        units = []
        for index, raw in enumerate(args):
            where = f"alwayson_scripts.controlnet.args[{index}]"
            if not isinstance(raw, dict):
                raise HTTPException(422, f"{where} is not an object with the unit's fields")
            try:
                unit = ControlNetUnitArgs.model_validate(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(part) for part in first["loc"])
                if not field:  # a rule across fields (guidance in order): its sentence names them (QA 23)
                    raise HTTPException(422, f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
                raise HTTPException(422, f"{where}.{field} = {printable(repr(first.get('input')))[:80]}: "
                                         f"{first['msg']}") from None
            if not unit.enabled:
                continue
            image_prompt = unit.module.strip().lower() in IP_MODULES
            # The module first: a reference unit names no model, and was skipped as one naming none, with a 200,
            # where an unknown module answers 422 (QA 52 F2).
            module = "" if image_prompt else module_name(unit.module, f"{where}.module")
            if unit.model.strip() in ("", "None", "none"):
                # The extension fails such a unit ("You have not selected any ControlNet Model"); skipped here, and
                # the info says so (QA 21: it was silent).
                request.warnings.append(f"{where} is enabled but names no model (model {unit.model!r}): skipped")
                continue
            if image_prompt:
                if request.image_prompt is not None:
                    raise HTTPException(422, f"{where}: a second IP-Adapter unit; one per request is supported")
                request.image_prompt = self.image_prompt(unit, where, request)
                continue
            mode = _choice(CONTROL_MODES, unit.control_mode, "control_mode")
            fit = _choice(RESIZE_MODES, unit.resize_mode, "resize_mode")
            image = codec.fit(unit_image(unit, where, request, "txt2img needs one for each unit"), request.width,
                              request.height, fit)
            resolution = min(request.width, request.height) if unit.pixel_perfect else unit.processor_res
            options = _options(module, unit.threshold_a, unit.threshold_b, resolution)
            try:
                condition = self.preprocessors().run(module, image, options)
                name = self.closest_model(unit.model)
                model = self.model(name)
            except SdbridgeError as exc:
                raise HTTPException(422, f"{where}: {exc}") from None
            units.append(RequestUnit(model, condition, unit.weight, unit.guidance_start, unit.guidance_end, mode,
                                     name=name, module=unit.module, save_detected_map=unit.save_detected_map))
        return units

    def image_prompt(self, unit: ControlNetUnitArgs, where: str, request: GenerationRequest) -> Any:
        """An IP-Adapter unit -> the request's RequestImagePrompt: the adapter (the stream's when it serves that
        one, else loaded now, on this request's thread) and the unit's image's tokens."""
        from sdbridge.engines.ip_adapter import AdapterHolder, IPAdapters, RequestImagePrompt, install

        engine = self.daemon.engines.active_engine()
        if engine is None or getattr(engine, "parts", None) is None:
            raise HTTPException(503, "no diffusion model is loaded: an IP-Adapter needs one (start the daemon with "
                                     "--model PATH)")
        image = unit_image(unit, where, request, "an IP-Adapter unit needs its style image")
        name = HASH_SUFFIX.sub("", unit.model.strip())
        adapters: IPAdapters | None = getattr(engine, "ip_adapters", None)
        try:
            if adapters is not None:
                adapter = adapters.load_now(name)
            else:
                from sdbridge.engines.ip_adapter import load_ip_adapter

                adapter = load_ip_adapter(resolve_ip_adapter(name, self.ip_folder()), engine.parts.unet,
                                          engine.device, engine.dtype, allow_pickle=self.daemon.settings.allow_pickle)
        except SdbridgeError as exc:
            raise HTTPException(422, f"{where}: {exc}") from None
        install(engine.parts.unet, adapters.holder if adapters is not None else AdapterHolder())
        return RequestImagePrompt.make(adapter, image, unit.weight, engine.device, start=unit.guidance_start,
                                       end=unit.guidance_end, name=unit.model, module=unit.module)

    def closest_model(self, name: str) -> str:
        """``name``, or the one ControlNet whose name holds it ("canny" for control_v11p_sd15_canny [hash]), as the
        extension finds a model (QA 21); ``name`` again where none does (the load then says so), ModelError where
        several do."""
        base = HASH_SUFFIX.sub("", name.strip())
        names = list_controlnets(self.folder())
        if base in names:
            return name
        found = [candidate for candidate in names if base.strip().lower() in candidate.lower()]
        if len(found) > 1:  # said, rather than "not found" (QA 23)
            raise ModelError(f"ControlNet {name!r} is part of several names ({', '.join(found)}): name one of them",
                             code="model_not_found")
        return found[0] if found else name

    def model(self, name: str) -> Any:
        """The live slots' copy when loaded there, else loaded now (on this request's thread)."""
        engine = self.daemon.engines.active_engine()
        if engine is None or getattr(engine, "parts", None) is None:
            raise HTTPException(503, "no diffusion model is loaded: ControlNet needs one (start the daemon with "
                                     "--model PATH)")
        # Keyed by the bare name: "edges" and "edges [hash]" are one model, cached once.
        key = (id(engine), HASH_SUFFIX.sub("", name.strip()))
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0]() is engine:  # not another engine that took a freed id
                self._cache.move_to_end(key)
                return cached[1]
        controlnets = getattr(engine, "controlnets", None)
        if controlnets is not None:
            model = controlnets.model(name)
        else:
            model = load_controlnet(resolve_controlnet(name, self.folder()), engine.parts.unet, engine.device,
                                    engine.dtype, allow_pickle=self.daemon.settings.allow_pickle)
        with self._cache_lock:
            self._cache = collections.OrderedDict((k, v) for k, v in self._cache.items() if v[0]() is engine)
            self._cache[key] = (weakref.ref(engine), model)
            while len(self._cache) > REQUEST_CACHE_SIZE:
                self._cache.popitem(last=False)
        return model


def infotext_params(units: list[RequestUnit], image_prompt: Any = None) -> dict[str, str]:
    """The extension's ``ControlNet N`` entries of the PNG infotext, an IP-Adapter unit after the ControlNets."""
    entries = [*units, image_prompt] if image_prompt is not None else units
    return {f"ControlNet {index}": f"Module: {unit.module}, Model: {unit.name}, "
                                   f"Weight: {unit.weight:g}, "
                                   f"Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}"
            for index, unit in enumerate(entries)}


def create_controlnet_router(daemon: Daemon) -> APIRouter:
    api = ControlNetApi(daemon)
    daemon.controlnet_api = api
    router = APIRouter(prefix="/controlnet", tags=["ControlNet (sd-webui-controlnet API)"], route_class=A1111Route)

    @router.get("/version")
    async def version() -> dict[str, int]:
        return {"version": API_VERSION}

    @router.get("/model_list")
    async def model_list(update: bool = Query(True)) -> dict[str, list[str]]:
        """ControlNets in the ControlNet folder, as ``name [hash]``."""
        return {"model_list": await asyncio.to_thread(api.model_list)}

    @router.get("/module_list")
    async def module_list(alias_names: bool = Query(False)) -> dict[str, Any]:
        """The preprocessors, by the extension's module names."""
        return {"module_list": [*MODULES, *IP_MODULES], "module_detail": api.module_detail()}

    @router.get("/control_types")
    async def control_types() -> dict[str, Any]:
        """As the extension's: "All", then a type per preprocessor kind, each with the models whose names carry
        its word ("None" first) and a module and model a client may send as they are (QA 21: every type had no
        model, and Pose's default module was one a unit refused)."""
        models = await asyncio.to_thread(api.controlnet_list)
        adapters = await asyncio.to_thread(api.ip_model_list)
        types = {"All": {"module_list": [*MODULES, *IP_MODULES], "model_list": ["None", *models, *adapters],
                         "default_option": "none", "default_model": "None"}}
        for kind, (title, word, module) in CONTROL_TYPES.items():
            matching = [model for model in models if word in model.lower()]
            types[title] = {"module_list": [m for m, k in MODULES.items() if k == kind],
                            "model_list": ["None", *matching], "default_option": module,
                            "default_model": matching[0] if matching else "None"}
        types["IP-Adapter"] = {"module_list": list(IP_MODULES), "model_list": ["None", *adapters],
                               "default_option": IP_MODULES[0], "default_model": adapters[0] if adapters else "None"}
        return {"control_types": types}

    @router.get("/settings")
    async def settings() -> dict[str, int]:
        """The extension's unit count (clients size their unit lists by it): the stream's ControlNet slots."""
        return {"control_net_unit_count": CONTROLNET_SLOTS}

    @router.post("/detect")
    async def detect(body: DetectRequest) -> dict[str, Any]:
        """Run a preprocessor on images: the condition images, base64 PNG."""
        return await asyncio.to_thread(api.detect, body)

    return router

"""Which engine serves, and loading the next one in the background while the current one serves.

The worker thread calls :meth:`EngineHost.select` with the parameters at every frame boundary
and :meth:`EngineHost.active` for the engine to run. A model that fails to load is reported and
leaves the previous engine serving; the parameters that asked for it go back to those of the engine
serving (:meth:`EngineHost.take_revert`), so that they say what serves and the next switch (of engine,
say) starts from a model that loads. Where nothing serves, the same failing choice is not retried until
it changes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdbridge.config import Settings
from sdbridge.engines.base import Engine, create_engine
from sdbridge.engines.device import pick_device, pick_dtype, return_freed_memory
from sdbridge.engines.footprint import check_fits, free_device_bytes, model_bytes
from sdbridge.engines.models import loaded_weight_files
from sdbridge.errors import ModelError, ParamError, SdbridgeError, printable, quoted
from sdbridge.paths import confine

log = logging.getLogger(__name__)

HOW_TO_GET_A_MODEL = ("no model configured: serving the CPU preview engine. For diffusion, run "
                      "`sdbridge models pull sd-turbo` on a machine with internet, or pass --model PATH "
                      "(a diffusers folder or a .safetensors checkpoint; `sdbridge models tiny DIR` writes a tiny "
                      "random one to try the pipeline)")


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    model: str | None

    def __str__(self) -> str:
        return self.engine if not self.model else f"{self.engine} ({self.model})"


Notify = Callable[[dict[str, Any]], None]
MODEL_ENGINES = ("diffusion", "compiled", "animatediff")  # engines that load the model parameter
FP8_ENGINES = ("compiled",)  # --fp8 applies to these (sdbridge/engines/fp8.py)
# The values a load's warm-up runs at (CompiledEngine.warm_params): those that decide which graphs a frame
# runs (its size, the stream's number of steps, guidance's rows, the sampler's inputs, the prompt's length)
# and the LoRAs it prepares, taken from the daemon's values when it asked for the engine.
REQUEST_PARAMS = ("engine", "model")  # the parameters that choose the engine (EngineHost.choose)
WARM_PARAMS = ("width", "height", "mode", "steps", "strength", "schedule", "guidance", "guidance_mode", "sampler",
               "seed", "prompt", "negative_prompt", "blend_prompt", "prompt_blend", "prompt_weight", "prompt_2",
               "prompt_2_weight", "prompt_3", "prompt_3_weight", "prompt_4", "prompt_4_weight",
               "prompt_interpolation", "loras", "clip_skip")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch: "$" allows "\n"


def _exists(model: str) -> bool:
    """Whether a file or folder ``model`` is there; a name the file system cannot hold (past 255 bytes) is a
    ``model_not_found`` where it is set: Path.exists raised "File name too long" out of the set (QA 49 F1)."""
    try:
        return Path(model).exists()
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {quoted(model[:80])}{'...' if len(model) > 80 else ''} cannot be a model here: "
                         f"{getattr(exc, 'strerror', None) or exc}", code="model_not_found") from None


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def module_bytes(engine: Engine) -> int:
    """Bytes of the weights an engine holds on its device (parameters and buffers)."""
    parts = getattr(engine, "parts", None)
    if parts is None:
        return 0
    total = 0
    for module in parts.modules().values():
        total += sum(t.numel() * t.element_size() for t in module.parameters())
        total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total


def _load_failure(choice: EngineChoice, exc: BaseException) -> str:
    """errors.load_failure with the client's text escaped in the log line; the sentence returned for
    clients (sent as JSON, where it is safe) keeps it as it is. Our own errors in one line, anything
    else with its traceback (a bug to find)."""
    if isinstance(exc, SdbridgeError):
        message = str(exc)
        log.error("engine %s failed to load: %s", printable(choice), printable(message))
    else:
        message = f"{type(exc).__name__}: {exc}"
        log.error("engine %s failed to load: %s", printable(choice), printable(message), exc_info=exc)
    return message


class EngineHost:
    def __init__(self, settings: Settings, notify: Notify | None = None) -> None:
        self.settings = settings
        self._notify = notify or (lambda event: None)
        self._lock = threading.Lock()
        self._current: Engine | None = None
        self._current_choice: EngineChoice | None = None
        # Loaded, waiting for the worker to swap it in, with the REQUEST_PARAMS that asked for it.
        self._ready: tuple[EngineChoice, Engine, dict[str, Any] | None] | None = None
        self._loading: EngineChoice | None = None
        # Engines a one-shot request runs on (worker thread only): one swapped out meanwhile waits in _retiring and
        # closes when the last request on it ends; closing it at the swap pulled its parts from under the request.
        self._holds: dict[int, int] = {}
        self._retiring: list[Engine] = []
        self._closed = False  # the daemon stopped: a load that ends after it closes what it made (QA 51 F6)
        # Any thread: a load ended, its engine waits to be swapped in at the worker's next turn (the worker wakes).
        self.on_loaded: Callable[[], None] | None = None
        # The last choice the parameters asked for. One load runs at a time (two checkpoints loading at once could
        # not both fit): a choice asked for meanwhile loads after it, and a load no longer wanted when it ends is
        # closed, never swapped in (an artist who clicks a model and back at once sees no cut).
        self._wanted: EngineChoice | None = None
        self._failed: EngineChoice | None = None
        self._auto_failed: str | None = None  # the model that failed under engine "auto" with nothing serving
        self._auto_failed_error = ""          # and why: /health says the preview serves in its place
        self._serving_request: dict[str, Any] | None = None  # REQUEST_PARAMS of the engine serving (swapped in)
        self._revert: dict[str, Any] = {}  # REQUEST_PARAMS to set back after a failed load (take_revert)
        self._revert_expect: dict[str, Any] = {}  # the failed load's REQUEST_PARAMS, which they would undo
        self._unannounced: Engine | None = None  # swapped in, its "ready" news not yet sent (announce)
        self.last_error: str | None = None
        self.last_error_code = "bad_model"
        self.loads = 0
        self.load_failures = 0
        self._told_about_models = False
        self._fp8_reports: weakref.WeakKeyDictionary[Engine, Any] = weakref.WeakKeyDictionary()

    # --- called by the worker thread ----------------------------------------------------------

    def trusted_models(self) -> set[str]:
        """Models the operator named (flags, env, config file): loaded from anywhere."""
        return {m for m in (self.settings.model, self.settings.params.get("model")) if m}

    def model_roots(self) -> list[Path]:
        from sdbridge.engines.models import default_models_dir

        models_dir = Path(self.settings.models_dir) if self.settings.models_dir else default_models_dir()
        return [models_dir, *(Path(root) for root in self.settings.model_roots)]

    def controlnet_dir(self) -> Path:
        from sdbridge.engines.models import models_subfolder

        return models_subfolder(self.settings.models_dir, "controlnet", self.settings.controlnet_dir)

    def motion_dir(self) -> Path:
        from sdbridge.engines.models import models_subfolder

        return models_subfolder(self.settings.models_dir, "motion", self.settings.motion_dir)

    def name_checks(self) -> dict[str, Callable[[str], object]]:
        """What resolves each kind of file name a client sets, where clients may load from (params.check_file_name):
        it raises, naming what is there, for a name that is not there or leaves its folder."""
        from sdbridge.engines.animatediff import resolve_motion_adapter
        from sdbridge.engines.controlnet import resolve_controlnet
        from sdbridge.engines.ip_adapter import resolve_ip_adapter

        return {
            "model": self.client_model_path,
            "controlnet": lambda name: resolve_controlnet(name, self.controlnet_dir()),
            "ip_adapter": lambda name: resolve_ip_adapter(name, self.ip_adapter_dir()),
            "motion_adapter": lambda name: resolve_motion_adapter(name, self.motion_dir(),
                                                                  trusted=name == self.settings.motion_adapter),
        }

    def ip_adapter_dir(self) -> Path:
        """Where IP-Adapters are (engines/ip_adapter.py): the engines look in the same place."""
        from sdbridge.engines.models import models_subfolder

        return models_subfolder(self.settings.models_dir, "ip_adapter")

    def client_model_path(self, model: str) -> str:
        """What to load for a model a client named: a plain name (a pulled model, a hub id) as it is,
        anything path-like only inside the model folders (PathError otherwise)."""
        if model in self.trusted_models():
            return model
        path_like = any(sep in model for sep in ("/", "\\")) or model.startswith((".", "~")) or "%" in model
        if (path_like and not _is_hub_id(model)) or _exists(model):
            return str(confine(model, self.model_roots(), what="model"))
        return model

    def vet(self, updates: Mapping[str, Any], held: Mapping[str, Any]) -> list[ParamError]:
        """A live set that would leave an engine that loads a model with none to load is refused where it is set
        (ParamStore.vet): it was acked, then set back once the load failed (QA 49 F7)."""
        if "engine" not in updates and "model" not in updates:
            return []
        engine = updates.get("engine", held.get("engine"))
        if engine not in MODEL_ENGINES or updates.get("model", held.get("model")) or self.settings.model:
            return []
        name = "engine" if "engine" in updates else "model"
        return [ParamError(f"{name} {quoted(updates[name])}: the {engine} engine needs a model; set model (GET "
                           f"/models lists them) or start the daemon with --model", name=name, value=updates[name],
                           code="no_model")]

    def choose(self, params: Mapping[str, Any]) -> EngineChoice:
        model = params.get("model") or self.settings.model or None
        engine = params.get("engine", "auto")
        if engine == "auto":
            engine = "diffusion" if model else "preview"
            if engine == "preview" and not self._told_about_models:
                self._told_about_models = True
                log.info(HOW_TO_GET_A_MODEL)
            if engine == "diffusion" and model == self._auto_failed:
                # Auto falls back so that a stage never stays dark behind a broken model; once, not after
                # every load of the preview engine.
                engine = "preview"
        return EngineChoice(engine, model if engine in MODEL_ENGINES else None)

    def select(self, params: Mapping[str, Any]) -> None:
        """Worker thread, each turn: start loading the engine the parameters ask for, unless it serves, is
        loaded, failed, or waits for the load that runs now to end."""
        choice = self.choose(params)
        stale: Engine | None = None
        with self._lock:
            self._wanted = choice
            if self._ready is not None and self._ready[0] != choice:  # loaded, then asked away from
                stale, self._ready = self._ready[1], None
            start = (self._loading is None and self._ready is None
                     and choice not in (self._current_choice, self._failed))
            if start:
                self._loading = choice
        if stale is not None:
            self._discard(stale)
        if not start:
            return
        warm = {name: params[name] for name in WARM_PARAMS if name in params}
        request = {name: params.get(name) for name in REQUEST_PARAMS}
        thread = threading.Thread(target=self._load, args=(choice, warm, request),
                                  name=f"sdbridge-load-{choice.engine}", daemon=True)
        thread.start()

    def take_revert(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """After a failed load while another engine serves: the request parameters to set back to the
        serving engine's (empty when there are none), and the failed load's own, which the store must still
        hold for them to apply (``ParamStore.update(revert, expect=...)``): a client's pick made since stands.
        The failed choice may be tried again then."""
        with self._lock:
            revert, self._revert = self._revert, {}
            expect, self._revert_expect = self._revert_expect, {}
            if revert:
                self._failed = None
        return revert, expect

    def active(self) -> Engine | None:
        """The engine to run now; swaps in a freshly loaded one (on the worker's thread)."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None and self._wanted not in (None, ready[0]):  # asked away from since it loaded
            self._discard(ready[1])
            ready = None
        if ready is not None:
            choice, engine, request = ready
            old = self._current
            self._current, self._current_choice = engine, choice
            self._serving_request = request
            self._unannounced = engine
            log.info("engine %s serving on %s", printable(choice), engine.device)
            if old is not None and old is not engine:
                if self._holds.get(id(old)):
                    log.info("engine %s closes when the request running on it ends", old.name)
                    self._retiring.append(old)
                else:
                    _close_quietly(old)
        return self._current

    def hold(self, engine: Engine) -> None:
        """Keep ``engine`` open while a one-shot request runs on it, even if a swap retires it (worker thread)."""
        self._holds[id(engine)] = self._holds.get(id(engine), 0) + 1

    def release(self, engine: Engine) -> None:
        """The request that held ``engine`` ended: a retired engine closes with its last one (worker thread)."""
        count = self._holds.pop(id(engine), 0) - 1
        if count > 0:
            self._holds[id(engine)] = count
            return
        for index, retiring in enumerate(self._retiring):
            if retiring is engine:
                del self._retiring[index]
                _close_quietly(engine)
                return

    def announce(self, engine: Engine | None) -> None:
        """Tell the clients a newly swapped-in engine serves, once the worker has prepared it for the
        parameters: before that its ``describe()`` holds its defaults (a resolution of 512x512)."""
        if engine is not None and self._unannounced is engine:
            self._unannounced = None
            self._notify({"type": "engine", "status": "ready", **engine.describe()})

    @property
    def serving_request(self) -> dict[str, Any] | None:
        """The request parameters (engine, model) that chose the engine serving, as they were set."""
        request = self._serving_request
        return dict(request) if request is not None else None

    def active_engine(self) -> Engine | None:
        """The engine serving now, without swapping (for readers off the worker thread)."""
        return self._current

    def loaded_source(self) -> str | None:
        """The source of the engine serving now or about to be swapped in."""
        with self._lock:
            engine = self._ready[1] if self._ready is not None else self._current
        return engine.source if engine is not None else None

    @property
    def failing(self) -> bool:
        """Whether the engine the parameters ask for failed to load and does not serve (not once they were
        set back to what serves: ``last_error`` still tells of it)."""
        return self._failed is not None

    @property
    def settling(self) -> bool:
        """Whether the engine asked for is still on its way: loading, loaded and waiting for the worker's next
        turn to be swapped in, or waiting for another load to end."""
        with self._lock:
            wanted = self._wanted
            return (self._loading is not None or self._ready is not None
                    or (wanted is not None and wanted not in (self._current_choice, self._failed)))

    def _discard(self, engine: Engine) -> None:
        log.info("engine %s loaded but no longer asked for: closed without serving", engine.name)
        _close_quietly(engine)

    @property
    def status(self) -> str:
        if self._loading is not None:
            return "loading"
        if self._current is None:
            return "failed" if self._failed is not None else "starting"
        return "ready"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "loads": self.loads, "load_failures": self.load_failures}
        if self._current is not None:
            out.update(self._current.describe())
        if self._loading is not None:
            out["loading"] = str(self._loading)
        fp8 = self._fp8_reports.get(self._current) if self._current is not None else None
        if fp8 is not None:
            out["fp8"] = fp8.to_json()
        if self.last_error:
            out["last_error"] = self.last_error
        current = self._current
        if self._auto_failed is not None and current is not None and current.name == "preview":
            # Not what was asked for: the preview engine keeps the stage lit behind a model that failed (QA 8).
            out["fallback"] = {"model": self._auto_failed, "error": self._auto_failed_error,
                               "serving": "preview"}
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            engine, self._current = self._current, None
            ready, self._ready = self._ready, None
        retiring, self._retiring = self._retiring, []
        for item in (engine, ready[1] if ready else None, *retiring):
            if item is not None:
                item.close()

    # --- the loader thread --------------------------------------------------------------------

    def _apply_fp8(self, engine: Any, prompt: str | None = None) -> Any:
        """--fp8 on a loaded compiled engine: quantise its UNet, probed with the embeddings of ``prompt``, the one
        in force when the load was asked (else the starting one): real CLIP outputs, whose outliers are what a
        per-tensor fp8 scale can miss; a model loaded live was probed with the starting prompt (QA 88 S4). Then
        the warm-up compile that load skipped. Returns the Fp8Report; Fp8Unavailable (the engine closed) where
        fp8 cannot run."""
        from sdbridge.engines.fp8 import apply_fp8
        from sdbridge.params import Schema

        prompt = prompt or self.settings.params.get("prompt") or Schema().defaults()["prompt"]
        try:
            cond, added = engine.unet_conditioning(str(prompt))
            report = apply_fp8(engine.parts.unet, engine.device, encoder_hidden_states=cond, added_cond=added)
        except Exception:
            engine.close()
            raise
        if engine.compile_active:
            engine.warmup_for_start()
        return report

    def _model_bytes(self, source: str, dtype: torch.dtype) -> int | None:
        """The weights' bytes in ``dtype`` of the files the loader will read for ``source`` (None: not known);
        ModelError for a file that cannot be read. Not every .safetensors under the folder: a stray one never
        loaded was counted, and a malformed one failed the load (QA 85 F6)."""
        models_dir = Path(self.settings.models_dir) if self.settings.models_dir else None
        files = loaded_weight_files(source, models_dir=models_dir)
        if not files:
            return None
        return sum(model_bytes(file, dtype) or 0 for file in files)

    def _load(self, choice: EngineChoice, warm: Mapping[str, Any] | None = None,
              request: Mapping[str, Any] | None = None) -> None:
        started = time.perf_counter()
        log.info("loading engine %s", printable(choice))  # the model's name is a client's text
        self._notify({"type": "engine", "status": "loading", "engine": choice.engine, "model": choice.model})
        try:
            source = self.client_model_path(choice.model) if choice.model else None
            engine = create_engine(choice.engine)
            for name in ("allow_pickle", "taesd", "vae", "models_dir", "model_config", "lora_dir", "embeddings_dir",
                         "motion_dir", "motion_adapter", "compile", "warm_sessions", "warm_steps"):
                if hasattr(engine, name):
                    setattr(engine, name, getattr(self.settings, name))
            if hasattr(engine, "warm_params"):
                engine.warm_params = warm
            if hasattr(engine, "controlnet_dir"):
                engine.controlnet_dir = str(self.controlnet_dir())
                engine.notify = self._notify
            device = pick_device(self.settings.device) if engine.needs_model else pick_device("cpu")
            dtype = pick_dtype(device, self.settings.dtype)
            if source and engine.needs_model:
                # The old engine serves on while this one loads: both must fit at once.
                free = free_device_bytes(device)
                try:
                    needed = self._model_bytes(source, dtype) if free is not None else None
                except ModelError:  # a broken file: the loader reports it in its own words
                    needed = None
                if free is not None and needed is not None:
                    check_fits(needed, free, what=str(choice.model), device=str(device))
            fp8 = self.settings.fp8 and choice.engine in FP8_ENGINES
            if fp8:
                engine.warmup_on_load = False  # compiled after quantising (below): the graphs capture the weights
            elif self.settings.fp8 and engine.needs_model:
                log.warning("--fp8 applies to the %s engine only; %s runs unquantised", "/".join(FP8_ENGINES),
                            choice.engine)
            try:
                engine.load(source, device, dtype)
            except torch.cuda.OutOfMemoryError as exc:
                raise ModelError(f"out of device memory loading {choice.model}: {exc}", code="out_of_memory") from exc
            if fp8:
                self._fp8_reports[engine] = self._apply_fp8(engine, (warm or {}).get("prompt"))
            budget = self.settings.vram_budget_mb * 1024 * 1024
            needed = module_bytes(engine)
            if budget and needed > budget:
                engine.close()
                what = choice.model or f"the {choice.engine} engine"  # a model-less engine has no model to name
                raise ModelError(f"{what} needs {needed / 2**20:.1f} MB of device memory, more than the "
                                 f"{self.settings.vram_budget_mb} MB budget", code="out_of_memory")
        except Exception as exc:  # any failure: report it, keep the previous engine serving
            message = _load_failure(choice, exc)
            code = getattr(exc, "code", "bad_model")
            # One section: the worker's select must never find this choice neither loading nor failed (it would
            # load it again), and asked away from while it loaded, there is nothing to set back.
            with self._lock:
                self._loading = None
                superseded = self._wanted not in (None, choice)
                if not superseded:
                    self._failed = choice
                    self.last_error = message
                    self.last_error_code = code
                    self.load_failures += 1
                    serving = self._ready[2] if self._ready is not None else \
                        self._serving_request if self._current is not None else None
                    if serving is not None and request is not None:
                        self._revert = {name: value for name, value in serving.items()
                                        if request.get(name) != value}
                        self._revert_expect = dict(request)
                    elif choice.engine == "diffusion":
                        self._auto_failed, self._auto_failed_error = choice.model, message
            tail = (" (it was no longer asked for)" if superseded
                    else "; the previous engine keeps serving" if self._current else "")
            self._notify({"type": "error", "code": code, "message": f"loading {choice} failed: {message}{tail}"})
            return
        with self._lock:
            self._loading = None
            self.loads += 1
            # None: loaded without a select (a direct load). Closed: the daemon stopped while it loaded, and nothing
            # would ever close the engine it made (its memory held until the process ended).
            wanted = self._wanted in (None, choice) and not self._closed
            if wanted:
                self._failed = None
                self.last_error = None
                if choice.engine in MODEL_ENGINES:
                    # The fallback ends once another model loads: coming back to the broken one tries it again.
                    # Not before: a client's model that fails sets the parameters back to auto, which tried the
                    # broken model again (QA 20: two loads, two errors to every client).
                    self._auto_failed = None
                self._ready = (choice, engine, dict(request) if request is not None else None)
        log.info("engine %s loaded in %.1f s", printable(choice), time.perf_counter() - started)
        if not wanted:
            self._discard(engine)
        elif self.on_loaded is not None:
            self.on_loaded()


def _close_quietly(engine: Engine) -> None:
    try:
        engine.close()
    except Exception:  # a failing close must not stop the engine serving
        log.exception("closing engine %s failed", engine.name)
    return_freed_memory()

"""AnimateDiff per frame: the UNet run over a rolling window of each session's last frames.

A motion adapter (diffusers ``MotionAdapter``: AnimateDiff v1.5 v2/v3, AnimateLCM, AnimateDiff-Lightning,
...) adds temporal attention to the model's UNet (``UNetMotionModel``). Each new frame is denoised
together with the session's previous ``motion_window - 1`` frames, so the temporal attention sees
where the image came from and motion context carries from frame to frame (docs/animatediff.md).

The window, oldest frame first, newest last, for one session and one frame:

- the newest frame's latents are its encoded input (the autoencoder's mode, as the diffusion engine
  encodes), noised to this frame's first timestep with the session's fixed noise: exactly the
  plain img2img start;
- each previous frame starts from its latents noised to the same timestep with the fixed noise of
  its place in the window. ``motion_overlap`` = K says from which latents: the K most recent previous
  frames (at most ``motion_window - 1``) start from the **denoised latents they got in the last call**
  (what was shown, or what the last window made of them), the older ones from their **input latents**
  (re-noised from the input, as if seen for the first time). K = 0 is AnimateDiff video-to-video over
  the last N input frames; a larger K feeds the outputs back and holds the look steadier;
- all N frames are denoised jointly (one UNet call per step, ``[B, 4, N, h, w]``); only the newest is
  decoded and sent; every frame's denoised latents are kept for the next call;
- warm start: before a session has N frames, its oldest frame (the first one at the start) fills
  the missing places, so output begins with the first frame. A previous frame with no denoised latents
  yet (the first frame's copies) starts from its input latents.

Noise: the newest place uses the diffusion engine's session noise (seed), the older places the
draws that follow it from the same generator, so ``motion_window`` 1 starts exactly where plain img2img
starts. Window 1 still differs from the plain engine's output: the temporal attention over one frame
is not the identity (its value and output projections act), unless the adapter's output projections
are zero (tests/unit/engines/test_animatediff.py checks both). With ``seed_blend`` every place's noise
is on its way to ``blend_seed``'s, each as the plain engine blends its one.

The motion UNet shares every spatial module with the model's UNet (no copy of its weights: LoRAs
reweighted in place reach it too, and so do the feature bank's attention processors, one entry per
window place: engines/feature_bank.py) and takes the adapter's temporal modules. A new adapter loads in a
background thread while the old one keeps serving; a missing or broken one is reported and the old
one serves on. Until an adapter is loaded the engine serves plain img2img frames.

ControlNet slots apply to the whole window, laid out as diffusers' ``AnimateDiffVideoToVideoControlNetPipeline``
lays them out: the ControlNet runs over the window's frames flattened ``[B * N, 4, h, w]`` (session-major,
oldest first; doubled with guidance as ``[uncond..., cond...]``), each frame with **the condition image it
came in with** (kept in the session's history per slot), and its residuals go into the motion UNet. A
previous frame with no image for a slot (the slot was just turned on, or the session's condition stream
started later) uses the newest frame's. A session without a condition for a slot this frame gets scale 0
over its whole window, as the diffusion engine gives it for its one frame.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdbridge.engines.base import StreamState
from sdbridge.engines.controlnet import SLOT_IMAGES, ControlStack, ControlUnit
from sdbridge.engines.diffusion import DiffusionEngine, blend_noise
from sdbridge.engines.models import find_add_on_model, list_add_on_models, resolve_add_on_model, serialized_load
from sdbridge.errors import ModelError, load_failure, quoted
from sdbridge.params import MOTION_WINDOW_MAX  # frames kept per session; adapters hold 24 or 32
from sdbridge.paths import PathError

log = logging.getLogger(__name__)

HISTORY = "animatediff.history"   # session state: _History
NOISE = "animatediff.noise"       # session state: (key, noise of the places before the newest [MAX-1, 4, h, w])


@functools.lru_cache(maxsize=4)
def older_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """[MOTION_WINDOW_MAX - 1, 4, h, w], 1 frame back first: a seed's noise for the window places before the newest,
    the draws after the newest place's (float32, CPU). Cached: while a seed_blend sweep runs, each frame blends
    the same two."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    torch.randn(shape, generator=generator)        # the newest place's draw, as _noise makes it
    return torch.randn((MOTION_WINDOW_MAX - 1, *shape[1:]), generator=generator)


# --- loading ---------------------------------------------------------------------------------------


def list_motion_adapters(folder: Path | None) -> list[str]:
    """Names clients may use: folders with a config.json and single weight files, sorted."""
    return list_add_on_models(folder)


def resolve_motion_adapter(name: str, folder: Path | None, *, trusted: bool = False) -> Path:
    """A name -> a path. Client names stay inside ``folder`` (PathError otherwise); a ``trusted`` name
    (the operator's, from the settings) may be any existing path."""
    name = name.strip()
    if not trusted:
        return resolve_add_on_model(name, folder, what="motion adapter", setting="motion_dir")
    found = find_add_on_model(Path(name).expanduser())
    if found is not None:
        return found
    try:
        return resolve_add_on_model(name, folder, what="motion adapter", setting="motion_dir")
    except PathError:   # the operator gave a path, not a name in the folder: it is not there, nothing is forbidden
        raise ModelError(f"motion adapter {quoted(name)} does not exist", code="model_not_found") from None


@serialized_load
def load_motion_adapter(path: Path, unet_config: Mapping[str, Any], dtype: torch.dtype, *,
                        allow_pickle: bool = False) -> Any:
    """A MotionAdapter from a diffusers folder (config.json + safetensors) or a single weight file.

    A single file takes its config from ``<name>.json`` beside it, else from the model's UNet and the
    file's keys (block channels, layers, mid block, positions; 8 heads and 32 groups, as every released
    SD 1.5 adapter has). Original (AnimateDiff repository) key names are converted. ModelError says
    what is wrong.
    """
    from diffusers import MotionAdapter

    from sdbridge.engines.models import load_pretrained_folder

    if not path.exists():
        raise ModelError(f"motion adapter {path} does not exist", code="model_not_found")
    if path.is_dir():
        adapter = load_pretrained_folder(path, MotionAdapter, dtype, "motion adapter")
    else:
        adapter = _load_single_file(path, unet_config, dtype, allow_pickle)
    _check_family(path, adapter.config, unet_config)
    return adapter.eval().requires_grad_(False)


def _load_single_file(path: Path, unet_config: Mapping[str, Any], dtype: torch.dtype, allow_pickle: bool) -> Any:
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    from sdbridge.engines.models import load_weight_file

    state = load_weight_file(path, "motion adapter", allow_pickle=allow_pickle)
    if any(".temporal_transformer." in key or ".attention_blocks." in key for key in state):
        state = convert_animatediff_checkpoint_to_diffusers(state)   # the AnimateDiff repository's names
    state = {key.removeprefix("module."): value for key, value in state.items()}
    sidecar = path.with_suffix(".json")
    try:
        config = dict(MotionAdapter.load_config(sidecar)) if sidecar.is_file() else _infer_config(state, unet_config)
        adapter = MotionAdapter.from_config(config)
    except Exception as exc:
        raise ModelError(f"{path}: no usable motion-adapter config ({type(exc).__name__}: {str(exc)[:300]})") from exc
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("pos_embed.pe")]   # computed, not learnt
    if missing or unexpected:
        raise ModelError(f"{path}: does not fit a motion adapter for this model ({len(missing)} missing keys, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    return adapter.to(dtype)


def _infer_config(state: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict[str, Any]:
    layers = {int(key.split(".")[3]) for key in state if key.startswith("down_blocks.0.motion_modules.")}
    positions = next((value.shape[1] for key, value in state.items() if key.endswith("pos_embed.pe")), 32)
    return {"block_out_channels": list(unet_config["block_out_channels"]),
            "motion_layers_per_block": max(layers) + 1 if layers else unet_config["layers_per_block"],
            "use_motion_mid_block": any(key.startswith("mid_block.") for key in state),
            "motion_max_seq_length": int(positions)}


def _check_family(path: Path, adapter_config: Mapping[str, Any], unet_config: Mapping[str, Any]) -> None:
    ours, theirs = list(adapter_config["block_out_channels"]), list(unet_config["block_out_channels"])
    if ours != theirs:
        raise ModelError(f"{path}: motion adapter for UNet channels {ours}, the model's are {theirs} (an adapter "
                         f"of another model family)", code="incompatible_model")
    if adapter_config.get("conv_in_channels"):
        raise ModelError(f"{path}: PIA-style adapters (conv_in_channels) are not supported", code="incompatible_model")


@serialized_load
def motion_unet(unet: Any, adapter: Any) -> Any:
    """A UNetMotionModel made of ``unet``'s own spatial modules (shared, not copied) and ``adapter``'s
    temporal modules. It computes what ``UNetMotionModel.from_unet2d(unet, adapter)`` computes."""
    from diffusers import UNetMotionModel

    adapter.to(unet.device)
    try:
        with torch.device("meta"):  # the skeleton only: every tensor is replaced below
            model = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    except ValueError as exc:   # layers per block or block count differ
        raise ModelError(f"motion adapter does not fit the model's UNet: {exc}", code="incompatible_model") from exc
    for name in ("conv_in", "time_proj", "time_embedding", "conv_norm_out", "conv_act", "conv_out"):
        setattr(model, name, getattr(unet, name))
    for ours, theirs, motion in ((model.down_blocks, unet.down_blocks, adapter.down_blocks),
                                 (model.up_blocks, unet.up_blocks, adapter.up_blocks)):
        for index, block in enumerate(ours):
            for part in ("resnets", "attentions", "downsamplers", "upsamplers"):
                if getattr(block, part, None) is not None:
                    setattr(block, part, getattr(theirs[index], part))
            block.motion_modules = motion[index].motion_modules
    model.mid_block.resnets = unet.mid_block.resnets
    model.mid_block.attentions = unet.mid_block.attentions
    if hasattr(model.mid_block, "motion_modules"):
        model.mid_block.motion_modules = adapter.mid_block.motion_modules
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    assert not left, f"motion UNet tensors not taken from the UNet or adapter: {left[:4]}"
    return model.eval().requires_grad_(False)


# --- per-session history ------------------------------------------------------------------------


@dataclass
class _Frame:
    inputs: torch.Tensor                  # [4, h, w] encoded input, scaled
    denoised: torch.Tensor | None = None  # [4, h, w] what the last window made of it
    # ControlNet slot -> the condition image this frame came in with, [3, H, W] in [0, 1]
    conditions: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _History:
    key: tuple
    frames: deque[_Frame]                 # previous frames, oldest first, at most MOTION_WINDOW_MAX - 1


@dataclass
class _Motion:
    name: str
    path: Path
    adapter: Any
    unet: Any                             # UNetMotionModel sharing the model's spatial modules

    @property
    def max_window(self) -> int:
        return int(self.adapter.config["motion_max_seq_length"])


def _conditions(units: Sequence[ControlUnit], state: StreamState, index: int) -> dict[int, torch.Tensor]:
    """The condition images session ``index`` came in with this frame, by slot; a slot with no image
    for it (a zero placeholder in the unit) is left out, so the window later uses the newest one."""
    present = state.data.get(SLOT_IMAGES, {})
    return {unit.slot: unit.image[index].clone() for unit in units if unit.slot in present}


class AnimateDiffEngine(DiffusionEngine):
    name = "animatediff"
    # The motion UNet's calls carry no SDXL added conditioning (and SDXL motion adapters are another
    # family): an SDXL model is refused at load, with the reason, instead of failing at its first frame.
    supports_sdxl = False

    def __init__(self) -> None:
        super().__init__()
        # Set by the host from the settings: the operator's adapter (any path) and the folder
        # clients name adapters in (None: <models_dir>/motion).
        self.motion_adapter: str | None = None
        self.motion_dir: str | None = None
        self.motion: _Motion | None = None
        self._window = 8
        self._overlap = 0
        self._motion_lock = threading.Lock()
        self._motion_wanted = ""
        self._motion_loading: str | None = None
        self._motion_ready: _Motion | None = None
        self._motion_failed: tuple[str, str] | None = None  # (name, message)
        self.motion_error: str | None = None
        self.motion_loads = 0

    # --- loading --------------------------------------------------------------------------------

    def motion_folder(self) -> Path | None:
        from sdbridge.engines.models import models_subfolder

        return models_subfolder(self.models_dir, "motion", self.motion_dir)

    def load(self, source: str | None, device: torch.device, dtype: torch.dtype) -> None:
        super().load(source, device, dtype)
        if not self.motion_adapter:
            return
        # The operator's adapter loads before the first frame, so the stream starts with motion. One that is
        # missing or broken is reported and plain img2img serves, as for a client's adapter: failing the engine
        # left frames passing through undiffused (QA 48 F1). A client's motion_adapter may name another.
        self._motion_wanted = self.motion_adapter
        try:
            self.motion = self.load_motion(self.motion_adapter)
        except Exception as exc:
            message = load_failure(log, f"motion adapter {self.motion_adapter}", exc)
            self._motion_failed = (self.motion_adapter, message)
            self.motion_error = message
            if self.notify is not None:
                self.notify({"type": "error", "code": getattr(exc, "code", "bad_model"),
                             "message": f"loading motion adapter {self.motion_adapter!r} failed: {message}; "
                                        f"plain img2img serves until an adapter loads"})

    def load_motion(self, name: str) -> _Motion:
        """Resolve, load and attach an adapter (slow: call it off the frame path); ModelError on failure."""
        assert self.parts is not None, "load() before load_motion()"
        trusted = name == self.motion_adapter
        path = resolve_motion_adapter(name, self.motion_folder(), trusted=trusted)
        adapter = load_motion_adapter(path, self.parts.unet.config, self.dtype, allow_pickle=self.allow_pickle)
        unet = motion_unet(self.parts.unet, adapter)
        log.info("motion adapter %s loaded from %s (%d positions)", name, path,
                 adapter.config["motion_max_seq_length"])
        return _Motion(name, path, adapter, unet)

    def attach_motion(self, name: str, adapter: Any) -> None:
        """Serve an adapter built in code (benchmarks); a ``motion_adapter`` parameter of ``name`` keeps it."""
        assert self.parts is not None, "load() before attach_motion()"
        _check_family(Path(name), adapter.config, self.parts.unet.config)
        with self._motion_lock:
            self.motion = _Motion(name, Path(name), adapter, motion_unet(self.parts.unet, adapter))
            self._motion_wanted = name

    def _want_motion(self, name: str) -> None:
        """Start loading ``name`` in the background unless it serves, loads or failed already."""
        with self._motion_lock:
            if self._motion_failed is not None and self._motion_failed[0] != name:
                self._motion_failed = None   # asked for another: the failed one may be retried later
            self._motion_wanted = name
            if self._motion_ready is not None and self._motion_ready.name != name:
                # Loaded for a wish taken back before a frame came (A -> B -> A): never swapped in (QA 7).
                self._motion_ready = None
            serving = self.motion.name if self.motion is not None else ""
            if name == serving or name == self._motion_loading:
                return
            if self._motion_ready is not None and self._motion_ready.name == name:
                return
            if self._motion_failed is not None and self._motion_failed[0] == name:
                return
            if not name:    # back to no adapter: plain img2img from the next frame
                self._motion_ready = None
                self.motion = None
                return
            self._motion_loading = name
        threading.Thread(target=self._load_motion_thread, args=(name,), name="sdbridge-load-motion",
                         daemon=True).start()

    def _load_motion_thread(self, name: str) -> None:
        try:
            motion = self.load_motion(name)
        except Exception as exc:  # reported; the adapter serving now serves on
            message = load_failure(log, f"motion adapter {name}", exc)
            with self._motion_lock:
                self._motion_loading = None
                self._motion_failed = (name, message)
                self.motion_error = message
            if self.notify is not None:
                keeps = f"; {self.motion.name} keeps serving" if self.motion is not None else ""
                self.notify({"type": "error", "code": getattr(exc, "code", "bad_model"),
                             "message": f"loading motion adapter {name!r} failed: {message}{keeps}"})
            return
        with self._motion_lock:
            self._motion_loading = None
            self._motion_failed = None
            self.motion_error = None
            if self._motion_wanted == name:
                self._motion_ready = motion
            self.motion_loads += 1

    def _refresh_motion(self) -> None:
        """At a frame boundary: swap in an adapter that finished loading."""
        with self._motion_lock:
            ready, self._motion_ready = self._motion_ready, None
        if ready is not None:
            self.motion = ready
            if self.notify is not None:
                self.notify({"type": "engine", "status": "ready", "motion_adapter": ready.name})

    def wait_for_motion(self, timeout_s: float = 60.0) -> None:
        """Block until no adapter is loading (tests, benchmarks; never the frame path)."""
        import time

        deadline = time.monotonic() + timeout_s
        while self._motion_loading is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._refresh_motion()

    def close(self) -> None:
        self.motion = self._motion_ready = None
        super().close()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        motion = self.motion
        window = min(self._window, motion.max_window) if motion is not None else self._window
        out["motion"] = {"adapter": motion.name if motion is not None else None,
                         "window": window, "window_asked": self._window,
                         "positions": motion.max_window if motion is not None else None,
                         "overlap": min(self._overlap, window - 1),
                         "loading": self._motion_loading, "error": self.motion_error}
        return out

    # --- parameters -----------------------------------------------------------------------------

    def prepare(self, params: Mapping[str, Any]) -> None:
        super().prepare(params)
        # A window beyond the adapter's positions runs at its positions (step_float), whichever came first, the
        # window or the adapter: refusing it stopped the stream (frames passed through undiffused) in one order
        # and not the other (QA 7). /health shows the window that runs.
        self._window = int(params.get("motion_window", self._window))
        self._overlap = int(params.get("motion_overlap", self._overlap))
        self._want_motion(str(params.get("motion_adapter") or self.motion_adapter or ""))

    # --- ControlNet over the window ---------------------------------------------------------------

    def _window_controls(self, units: Sequence[ControlUnit], padded_frames: Sequence[Sequence[_Frame]],
                         window: int) -> ControlStack | None:
        """The slots' residual hook for the windows: per slot, each frame's condition image
        [B * N, 3, H, W] (session-major, oldest first: the frames' layout in the motion UNet) and the
        session's scale repeated over its window. None when no slot is active (no work at all)."""
        if not units:
            return None
        window_units = []
        for unit in units:
            images = []
            for index, padded in enumerate(padded_frames):
                newest = unit.image[index]                                   # [3, H, W]
                images.extend(frame.conditions.get(unit.slot, newest) for frame in padded)
                images.append(newest)
            scale = unit.scale
            if isinstance(scale, torch.Tensor):                               # [B, 1, 1, 1] -> [B * N, 1, 1, 1]
                scale = scale.repeat_interleave(window, dim=0)
            window_units.append(replace(unit, image=torch.stack(images), scale=scale))
        return ControlStack(window_units, self._guided)

    # --- per-session noise and history ----------------------------------------------------------

    def _window_noise(self, state: StreamState, shape: tuple[int, ...], window: int) -> torch.Tensor:
        """[window, 4, h, w], oldest place first; the newest place is the diffusion engine's session noise."""
        newest = self._noise(state, shape)                 # [1, 4, h, w]
        weight = self._seed_blend
        key = (self._seed, shape, self.device, self.dtype) + ((self._blend_seed, weight) if weight > 0 else ())
        cached = state.data.get(NOISE)
        if cached is None or cached[0] != key:
            older = older_noise(self._seed, shape).clone()  # the cache's own tensor stays as drawn
            if weight > 0:
                # Each place on its way to blend_seed's as the newest is (_noise): only the newest was, and at
                # seed_blend 1 the window mixed two seeds' noise, 16% off the blend_seed stream (QA 86 F9).
                other = older_noise(self._blend_seed, shape)
                older = torch.stack([blend_noise(weight, older[place], other[place]) for place in range(len(older))])
            cached = (key, older.to(self.device, self.dtype))   # [MAX-1, 4, h, w], 1 frame back first
            state.data[NOISE] = cached
        return torch.cat([cached[1][:window - 1].flip(0), newest])

    def _history(self, state: StreamState, key: tuple) -> _History:
        history = state.data.get(HISTORY)
        if history is None or history.key != key:   # a new session, resolution or dtype: start over
            history = _History(key, deque(maxlen=MOTION_WINDOW_MAX - 1))
            state.data[HISTORY] = history
        return history

    def _step_generators(self, states: Sequence[StreamState], shape: tuple[int, ...]) -> list[torch.Generator]:
        """A window's step noise, alike at every frame, from the seed (its entry noise is drawn per window
        place, so no pipeline's draw order applies): one generator per session, the whole window from it."""
        return [torch.Generator(device=self.device).manual_seed(self._seed + 1) for _ in states]

    # --- the frame ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step_float(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        self._refresh_motion()
        motion = self.motion
        if motion is None:   # no adapter yet: plain img2img
            return super().step_float(frames, states)
        if self._passes_through():  # strength 0 keeps the input, as the plain engine does (no window, no step)
            return self._kept(frames, len(states))
        assert self.parts is not None and self._embeddings is not None, "prepare() before step()"
        # An adapter swapped in with fewer positions than the window asks for serves its most.
        window = min(self._window, motion.max_window)
        batch, overlap = len(states), min(self._overlap, window - 1)
        units = self.controlnets.units(states) if self.controlnets is not None else []
        width, height = self.resolution
        latent_shape = (1, self.parts.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        timesteps, _ = self._timesteps()
        txt2img = self._txt2img or frames is None

        # 1.-2. The new frames: uint8 [B, H, W, 3] -> [-1, 1] [B, 3, H, W] -> latents [B, 4, h, w]
        if txt2img:
            new_inputs = torch.zeros((batch, *latent_shape[1:]), device=self.device, dtype=self.dtype)
        else:
            new_inputs = self.encode(frames.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0)

        # 3. Each session's window, oldest first: previous frames (padded with the oldest: warm start),
        #    each from its denoised latents (the K most recent) or its inputs, then the new frame.
        key = (latent_shape, self.device, self.dtype)
        starts, noises, previous_frames, padded_frames = [], [], [], []
        for index, state in enumerate(states):
            history = self._history(state, key)
            previous = list(history.frames)[-(window - 1):] if window > 1 else []
            previous_frames.append(previous)
            filler = previous[0] if previous else _Frame(new_inputs[index])
            padded = [filler] * (window - 1 - len(previous)) + previous
            padded_frames.append(padded)
            keep_from = window - 1 - overlap
            for place, frame in enumerate(padded):
                use_denoised = place >= keep_from and frame.denoised is not None
                starts.append(frame.denoised if use_denoised else frame.inputs)
            starts.append(new_inputs[index])
            noises.append(self._window_noise(state, latent_shape, window))
        noise = torch.cat(noises)                                      # [B * N, 4, h, w]
        if self._txt2img:
            latents = noise * self.scheduler.init_noise_sigma
        # No input frame in img2img: the new place's zero latent noised at t_0 as the others are, as the plain
        # engine starts (init_noise_sigma is the schedule's first timestep's noise only, QA 88 F1).
        else:
            clean = torch.stack(starts)                                # [B * N, 4, h, w]
            latents = self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(batch * window))
        # [B * N, 4, h, w] -> [B, 4, N, h, w], the motion UNet's layout
        latents = latents.reshape(batch, window, *latent_shape[1:]).permute(0, 2, 1, 3, 4)

        # 4. Denoise the windows together; embeddings repeated per frame, batch-major as the UNet flattens.
        embeddings = self._embeddings
        if self._guided:
            uncond, cond = embeddings.chunk(2)
            embeddings = torch.cat([uncond.expand(batch * window, -1, -1), cond.expand(batch * window, -1, -1)])
        else:
            embeddings = embeddings.expand(batch * window, -1, -1)
        step_kwargs = self._step_kwargs(states, latent_shape)
        controls = self._window_controls(units, padded_frames, window)
        # The style image (engines/ip_adapter.py): a session's tokens and scale over every frame of its window, as
        # diffusers' motion UNet repeats one image's embeds over the frames. The motion UNet's spatial attention
        # layers are the model's own, so the processors installed there serve it too.
        image_prompt = self.ip_adapters.rows(states, self._guided) if self.ip_adapters is not None else None
        hidden: Any = embeddings
        if image_prompt is not None:
            hidden = (embeddings, *(rows.repeat_interleave(window, dim=0) for rows in image_prompt))
        for step_index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if self._guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            extra: dict[str, Any] = {}
            if controls is not None:   # the ControlNet sees frames: [B_cfg, 4, N, h, w] -> [B_cfg * N, 4, h, w]
                extra = controls(model_input.transpose(1, 2).flatten(0, 1), t, embeddings, step_index, len(timesteps))
            noise_pred = motion.unet(model_input, t, encoder_hidden_states=hidden, return_dict=False, **extra)[0]
            if self._guided:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + self._guidance * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]

        # 5. Keep what each frame became; the new frame joins the history.
        for index, state in enumerate(states):
            previous = previous_frames[index]
            first = window - 1 - len(previous)    # the place of the oldest real previous frame
            for offset, frame in enumerate(previous):
                frame.denoised = latents[index, :, first + offset].clone()
            if not txt2img:
                state.data[HISTORY].frames.append(_Frame(new_inputs[index].clone(), latents[index, :, -1].clone(),
                                                         _conditions(units, state, index)))
        newest = latents[:, :, -1]                                     # [B, 4, h, w]

        # 6. Latent plugins, then decode the newest frame only.
        if self.latent_hook is not None:
            newest = self.latent_hook(newest, states)
        return self.decode(newest)

"""The compiled engine: the diffusion engine's maths on a device-resident, batched, compiled path.

Same weights, same noise, same timesteps as :class:`DiffusionEngine` (and so as diffusers'
img2img pipeline: tests/unit/engines/test_compiled.py); what changes is how a frame travels:

- uint8 frames go to the device once, through pinned host buffers and non-blocking copies
  when they come from the host; resize, normalise, encode, denoise, decode and quantise all
  run there, and nothing inside a frame waits for the host (the NaN flag is read a frame late);
- the scheduler is reduced in ``prepare`` to per-step coefficients (StreamDiffusion's recipe):
  for a memoryless first-order scheduler (Euler, DDIM) one step is
  ``x_next = sample_coef * x + eps_coef * eps``, found by probing the scheduler itself, so the
  maths stay diffusers' own;
- stream batch: with N denoising steps a rolling latent buffer per session holds the frames in
  flight, so one UNet call denoises N consecutive frames, each at its own timestep; a frame
  comes out N - 1 frames after it went in (see "Warm start" below);
- residual (self-negative) guidance: the uncond prediction is replaced by the noise the latent
  is known to carry, so guidance does not double the UNet batch (see :func:`residual_cfg_bound`);
  under LCM that noise is followed through the fixed re-noise, StreamDiffusion's RCFG (:func:`carried_noise`);
- torch.compile (Inductor; CUDA graphs on CUDA), channels_last, SDPA; static shapes, one
  compiled callable per (part, resolution, batch, guidance mode), and Inductor's on-disk cache
  under the user cache folder so that a restart skips most of the compile.

Warm start (issue 6, item 5): StreamDiffusion starts the buffer from zeros, so the first N - 1
outputs are brown and the first real frame arrives N - 1 frames late. Here the first frame of a
session (or the first after a change of sampler, number of steps or resolution) fills the
pipeline: the stream call runs N - 1 extra times on that frame, so that on return every slot
holds that frame at its own stage and the very first output is that frame fully denoised. The
steady-state delay of N - 1 frames is what batching the steps costs; ``stream_batch = False``
runs the N steps of each frame in sequence instead (no delay, N UNet calls a frame). A strength moved
across a multiple of 1 / steps changes N but not the schedule the timesteps are cut from: the frames in
flight are then carried over to their places in the new schedule (``_reslot``), with no extra UNet call;
so are they on a new seed (each keeps the noise it entered with): a fader or a beat never stalls a frame.

ControlNet (issue 7): the ControlNet slots run on this path too. The UNet graph always takes
ControlNet residuals as inputs, zeros while no slot acts, so a slot turning on or off is new
input to the same graph; each slot's ControlNet runs as its own compiled graph (one per model
and shape) whose conditioning scale is a per-row tensor, so a new scale is new input too, and
a row outside its slot's start/end window gets scale 0 (in stream batch each row is at its own
step). Windows are settled outside the graphs; a step where no row of a slot is inside its
window does not run that ControlNet. In stream batch each frame in flight keeps the condition
image it entered with, so each frame comes out as the eager engine makes it (the scale, window
and prompt in force are the current ones, as for the rest of the stream).

Batch buckets: the worker batches whichever sessions have a frame waiting, so with several sessions the
batch changes from one frame to the next (1, 3, 2, 4, ...), and each size would be its own set of graphs:
compiled for tens of seconds each on a GPU, each with its CUDA graphs' memory. A batch is padded up to the
next bucket (1, 2, 4, 8, then multiples of 8: :func:`batch_bucket`) with copies of its last session's
rows, which are computed and thrown away; 3 sessions run the graphs of 4. vLLM pads its CUDA graph
batches the same way. The real rows are the rows an unpadded call gives (tests: test_compiled.py).

Compiling off the frame path (engines/background_compile.py): the load's warm-up compiles the
default resolution's graphs in the call (the cold start, with a progress bar); after that, a call
that no ready graph fits (a new resolution, another number of sessions, a longer prompt) runs the
same function uncompiled while its graph compiles in a worker thread, and a ControlNet of an
architecture without a graph is compiled on its loader's thread before it serves, so the old set
serves until then. ControlNets of one architecture share a graph (their weights are its inputs).
The feature bank runs inside the UNet's graph: the keys and values it keeps between calls are that
graph's inputs and outputs, stacked in and stored back by the engine (``_banked_step``).

Schedulers whose step is affine and memoryless run compiled: Euler and DDIM (``x_next = a·x + b·eps``),
and the samplers that draw noise at each step, LCM and Euler a, whose draw the eager engine seeds the
same at every frame (``DiffusionEngine._step_generators``), so that each step adds a fixed term
(``x_next = a·x + b·eps + k_i``, ``k_i`` a graph input). The others (multistep solvers, which keep a
history; DPM++ SDE, whose noise is a Brownian tree) run the eager engine's exact path: nothing is faked.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import os
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdbridge.engines.background_compile import BackgroundCompiler, materialize
from sdbridge.engines.base import SLOT_IMAGES, StreamState
from sdbridge.engines.controlnet import ControlUnit
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.feature_bank import BankFeed, FeatureBank, attached_bank, window_key
from sdbridge.engines.ip_adapter import ImagePrompt
from sdbridge.engines.parts import PipelineParts

log = logging.getLogger(__name__)

# Schedulers whose step is x_next = a * x + b * eps (+ a drawn noise term, the same at every frame:
# module docstring) with no history kept (checked again numerically by probe_linear_schedule).
LINEAR_SCHEDULERS = ("EulerDiscreteScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler")
STREAM_KEY = "compiled.stream"
# The feature bank's key of a padded call's extra rows (batch buckets, module docstring): "~" is in no
# session name (bridge/protocol.py, SESSION_NAME), so a pad row never reads or writes a session's entries.
PAD_ROW = "~pad"
# Dynamo keeps one cache per code object, capped at its recompile limit (default 8; with fullgraph=True a hit is
# FailOnRecompileLimitHit). Each compiled (part, resolution, batch) has a code object of its own (own_code), so the
# cap counts the few signatures of one graph (prompt lengths, layouts, ControlNet architectures), not every shape a
# part ever ran at: one shared cache ended at 64 shapes, the 65th and later uncompiled for good (QA 88 F3).
RECOMPILE_LIMIT = 64


def own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a function or bound method) over a copy of its code object: Dynamo keeps compiled graphs and counts
    its recompile limit per code object, so a torch.compile of the copy has a cache of its own, which goes when
    the copy goes (an engine's graphs with the engine: a module-level part such as ``_quantize`` had one cache for
    every engine of the process). Anything else is returned as it is."""
    func = getattr(fn, "__func__", fn)
    if not isinstance(func, types.FunctionType):
        return fn
    clone = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                               func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    clone.__qualname__ = func.__qualname__
    clone.__module__ = func.__module__
    clone.__dict__.update(func.__dict__)
    return types.MethodType(clone, fn.__self__) if isinstance(fn, types.MethodType) else clone


def warm_step_counts(spec: str, steps: int) -> list[int]:
    """The stream lengths ``--warm-steps`` names at ``steps`` steps: "" none, "all" 1 to ``steps``, or a list
    such as "1,2,4" (config.check_warm_steps has read it), those above ``steps`` left out."""
    spec = spec.strip()
    if not spec:
        return []
    counts = range(1, steps + 1) if spec == "all" else (int(part) for part in spec.split(","))
    return sorted({count for count in counts if 1 <= count <= steps})


def batch_bucket(sessions: int) -> int:
    """The batch a compiled call over ``sessions`` sessions runs at: the next power of two up to 8, then the
    next multiple of 8 (9 sessions run at 16 rows' cost otherwise)."""
    if sessions < 1:
        raise ValueError(f"a batch of {sessions} sessions")
    if sessions <= 8:
        return 1 << (sessions - 1).bit_length()
    return -(-sessions // 8) * 8


def compile_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels between runs: ``$SDBRIDGE_CACHE_DIR/inductor``."""
    base = os.environ.get("SDBRIDGE_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "sdbridge") / "inductor"


def configure_compile_cache(folder: Path | None = None) -> Path:
    """Point Inductor's caches at ``folder`` (unless the user set TORCHINDUCTOR_CACHE_DIR) and turn them on.

    Called at load, never at import: importing sdbridge must not change torch's global settings.
    """
    folder = folder or compile_cache_dir()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), RECOMPILE_LIMIT))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


@dataclass(frozen=True)
class LinearSchedule:
    """One frame's denoising as per-step coefficients, found once in ``prepare``.

    The frame enters at ``x_0 = entry_coef * latents + noise_coef * noise`` (add_noise at t_0;
    ``entry_coef`` is 0 in txt2img), then for each step i::

        eps_i      = unet(input_scale[i] * x_i, timesteps[i])
        x_{i + 1}  = sample_coef[i] * x_i + eps_coef[i] * eps_i  (+ step_noise[i])

    ``step_noise`` [N, C, h, w] (model dtype) is the term a sampler that draws noise adds at each step
    (LCM's re-noising, Euler a's ancestral noise), drawn as the eager engine draws it; None for Euler
    and DDIM. ``noisy`` says the scheduler draws (the probe saw a term), before the term is drawn
    for a seed and resolution (:func:`draw_step_noise`).

    ``noise_level`` [N] float32, LCM's only: sqrt(1 - alphas_cumprod[t_i]), the weight of the noise in
    ``x_i``. Residual guidance carries the noise a latent holds through LCM's re-noising with it
    (:func:`carried_noise`).
    """

    timesteps: torch.Tensor     # [N], the scheduler's dtype
    input_scale: torch.Tensor   # [N] float32
    sample_coef: torch.Tensor   # [N] float32
    eps_coef: torch.Tensor      # [N] float32
    entry_coef: torch.Tensor    # [] model dtype
    noise_coef: torch.Tensor    # [] model dtype
    noisy: bool = False
    step_noise: torch.Tensor | None = None
    timestep_values: tuple[float, ...] = ()   # ``timesteps`` on the host, read once in the probe
    noise_level: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def tiled(self, sessions: int) -> tuple[torch.Tensor, ...]:
        """(timesteps, input_scale, sample_coef, eps_coef) for a stream batch: [sessions * N], step-minor."""
        return tuple(t.repeat(sessions) for t in (self.timesteps, self.input_scale, self.sample_coef, self.eps_coef))

    def at(self, step: int, sessions: int) -> tuple[torch.Tensor, ...]:
        """(timesteps, input_scale, sample_coef, eps_coef) of one step for ``sessions`` rows: [sessions],
        laid out as :meth:`tiled`'s. One step over 4 sessions and a stream batch of 4 steps are then the
        same graph (with a broadcast [1] or a stride-0 expand the first would be a second graph, compiled
        for minutes on a CPU, tens of seconds on a GPU)."""
        return tuple(t[step:step + 1].repeat(sessions)
                     for t in (self.timesteps, self.input_scale, self.sample_coef, self.eps_coef))

    def noise_at(self, step: int, sessions: int) -> torch.Tensor | None:
        """``step_noise`` of one step for ``sessions`` rows, laid out as :meth:`noise_rows`'s."""
        return None if self.step_noise is None else self.step_noise[step:step + 1].repeat(sessions, 1, 1, 1)

    def noise_rows(self, sessions: int) -> torch.Tensor | None:
        """``step_noise`` for a stream batch: [sessions * N, C, h, w], step-minor like :meth:`tiled`."""
        return None if self.step_noise is None else self.step_noise.repeat(sessions, 1, 1, 1)

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``noise_level``, the next step's) [N] each; after the last step 1, as StreamDiffusion's
        ``beta_next`` (a frame's last carried noise is thrown away; 1 keeps it finite)."""
        assert self.noise_level is not None
        return self.noise_level, torch.cat([self.noise_level[1:], torch.ones_like(self.noise_level[:1])])

    def levels_rows(self, sessions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`levels` for a stream batch: [sessions * N] each, laid out as :meth:`tiled`."""
        return tuple(level.repeat(sessions) for level in self.levels())

    def levels_at(self, step: int, sessions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`levels` of one step for ``sessions`` rows, laid out as :meth:`at`."""
        return tuple(level[step:step + 1].repeat(sessions) for level in self.levels())


def probe_linear_schedule(scheduler: Any, timesteps: torch.Tensor, txt2img: bool,
                          dtype: torch.dtype) -> LinearSchedule | None:
    """Reduce the scheduler's steps over ``timesteps`` to coefficients, or None where it is not linear.

    ``scheduler`` is as the eager engine left it after ``_timesteps()`` (timesteps set, begin
    index set); a copy is probed, so the engine's own scheduler is untouched. Each step is probed
    with one batch of four rows, each drawing the same noise (if the scheduler draws any): (x=0,
    eps=0) gives the drawn term, (x=1, eps=0) and (x=0, eps=1) less that term the sample and eps
    coefficients, and a random pair checks that the step really is that affine map.
    """
    if type(scheduler).__name__ not in LINEAR_SCHEDULERS or getattr(scheduler, "order", 1) != 1:
        return None
    if scheduler.config.get("thresholding") or (type(scheduler).__name__ == "LCMScheduler"
                                                and scheduler.config.get("clip_sample")):
        return None  # the denoised sample is clipped: not affine (a probe near 0 may not show it)
    probe = copy.deepcopy(scheduler)
    device = timesteps.device
    one = torch.ones((1, 1, 1, 1), device=device, dtype=dtype)
    if txt2img:
        entry_coef = torch.zeros((), device=device, dtype=dtype)
        noise_coef = (one * probe.init_noise_sigma).reshape(())
    else:
        start = timesteps[:1]
        entry_coef = probe.add_noise(one, torch.zeros_like(one), start).reshape(())
        noise_coef = probe.add_noise(torch.zeros_like(one), one, start).reshape(())
    generator = torch.Generator(device="cpu").manual_seed(0)
    check_x, check_eps = torch.randn(2, generator=generator).tolist()
    scales, sample_coefs, eps_coefs = [], [], []
    noisy = False
    noise_level = None
    if type(scheduler).__name__ == "LCMScheduler":
        # The noise's weight at each timestep, as add_noise applies it (StreamDiffusion's beta_prod_t_sqrt).
        ones = torch.ones((1, 1, 1, 1), device=device)
        noise_level = torch.stack([probe.add_noise(torch.zeros_like(ones), ones, t.reshape(1)).reshape(())
                                   for t in timesteps]).float()
    for t in timesteps:
        scales.append(probe.scale_model_input(torch.ones((1, 1, 1, 1), device=device), t).reshape(()))
        sample = torch.tensor([0.0, 1.0, 0.0, check_x], device=device).view(4, 1, 1, 1)
        model_output = torch.tensor([0.0, 0.0, 1.0, check_eps], device=device).view(4, 1, 1, 1)
        # One generator per row, all seeded alike: every row draws the same noise, which row 0 shows.
        rows = [torch.Generator(device=device).manual_seed(0) for _ in range(4)]
        out = probe.step(model_output, t, sample, generator=rows, return_dict=False)[0].flatten().float()
        drawn = out[0]
        expected = (out[1] - drawn) * check_x + (out[2] - drawn) * check_eps + drawn
        if not torch.allclose(out[3], expected, rtol=1e-5, atol=1e-6):
            log.info("%s is not linear at t=%s: the exact eager path runs", type(scheduler).__name__, float(t))
            return None
        noisy = noisy or bool(drawn != 0)
        sample_coefs.append(out[1] - drawn)
        eps_coefs.append(out[2] - drawn)
    return LinearSchedule(timesteps=timesteps.clone(), input_scale=torch.stack(scales).float(),
                          sample_coef=torch.stack(sample_coefs), eps_coef=torch.stack(eps_coefs),
                          entry_coef=entry_coef, noise_coef=noise_coef, noisy=noisy,
                          timestep_values=tuple(float(t) for t in timesteps.tolist()), noise_level=noise_level)


def draw_step_noise(scheduler: Any, timesteps: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                    generators: list[torch.Generator]) -> torch.Tensor:
    """[N, C, h, w]: what each step of a noise-drawing scheduler adds, drawn from ``generators`` (one,
    made as the eager engine makes a session's) exactly as its step draws it: stepping x = 0, eps = 0
    leaves only that term. ``scheduler`` as for :func:`probe_linear_schedule` (copied, untouched)."""
    probe = copy.deepcopy(scheduler)
    zeros = torch.zeros(shape, device=timesteps.device, dtype=dtype)
    return torch.cat([probe.step(zeros, t, zeros, generator=generators, return_dict=False)[0].to(dtype)
                      for t in timesteps])


def residual_cfg_bound(guidance: float, eps_coef: float, residual_gap: float) -> float:
    """The largest change residual guidance makes to a latent in one step, against exact CFG.

    Exact CFG takes ``eps = g * eps_cond + (1 - g) * eps_uncond``; residual CFG puts the known
    residual noise ``r`` in place of ``eps_uncond``. The step being linear, the two latents
    differ by exactly ``eps_coef * (1 - g) * (r - eps_uncond)``, so per element at most
    ``|eps_coef| * |g - 1| * max|r - eps_uncond|``: zero at g = 1, growing linearly in g - 1.
    """
    return abs(eps_coef) * abs(guidance - 1.0) * residual_gap


def carried_noise(residual: torch.Tensor, eps: torch.Tensor, drawn: torch.Tensor | None, sample_coef: torch.Tensor,
                  eps_coef: torch.Tensor, level: torch.Tensor, next_level: torch.Tensor) -> torch.Tensor:
    """The noise a latent carries after an LCM step, from the noise ``residual`` it carried before (float32).

    StreamDiffusion's RCFG stock noise (pipeline.py:343-365): the latent holds ``level * residual`` of noise;
    the step maps that part as it maps the latent, with the guided prediction ``eps``, and re-noises it
    with the step's own draw (``drawn = next_level * n``), so that the next step's latent holds
    ``next_level * carried``::

        carried = (sample_coef * level * residual + eps_coef * eps + drawn) / next_level

    which is StreamDiffusion's ``init_noise[i + 1] + alpha_next * step(eps, beta * stock) / beta_next`` with
    the LCM step written as sdbridge's coefficients (``sample_coef = alpha_next (c_out / alpha + c_skip)``,
    ``eps_coef = -alpha_next c_out beta / alpha``). Coefficients are [M]; tensors [M, C, h, w]."""
    def view(coef: torch.Tensor) -> torch.Tensor:
        return coef.view(-1, 1, 1, 1)

    out = view(sample_coef * level) * residual.float() + view(eps_coef) * eps.float()
    if drawn is not None:
        out = out + drawn.float()
    return out / view(next_level)


def residual_shapes(unet_config: Any, latent_height: int,
                    latent_width: int) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """The shapes (per batch row) of the ControlNet residuals ``unet`` takes at this latent size:
    (down: conv_in's output, each resnet's and each downsampler's, in order; mid), as
    ``ControlNetModel`` makes them. Used for the zeros that stand for "no slot acts"."""
    channels = list(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    height, width = latent_height, latent_width
    down = [(channels[0], height, width)]
    for index, (width_c, count) in enumerate(zip(channels, layers)):
        down.extend([(width_c, height, width)] * count)
        if index < len(channels) - 1:
            # A stride-2 convolution with padding 1: ceil(n / 2).
            height, width = (height + 1) // 2, (width + 1) // 2
            down.append((width_c, height, width))
    return down, (channels[-1], height, width)


@dataclass
class _StreamSlot:
    """One session's frames in flight: slot j holds a frame with j + 1 steps done."""

    key: tuple
    latents: torch.Tensor              # [N - 1, 4, h, w] model dtype
    residual: torch.Tensor | None      # [N - 1, 4, h, w] the noise each slot carries (residual CFG)
    # ControlNet slot -> [N - 1, 3, H, W]: the condition image each frame in flight entered with
    conditions: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    timesteps: tuple[float, ...] = ()  # the schedule's (LinearSchedule.timestep_values): slot j is at [j + 1]

    @property
    def steps(self) -> int:
        """The stream's length N (its schedule's steps)."""
        return self.latents.shape[0] + 1


class CompiledEngine(DiffusionEngine):
    """The fast engine: see the module docstring. Settings are attributes, set before ``load``."""

    name = "compiled"

    def __init__(self) -> None:
        super().__init__()
        self.compile = True                      # Settings.compile: torch.compile where it pays (CUDA)
        self.compile_backend: str | None = None  # None: inductor on CUDA, no compile elsewhere; set to force
        self.compile_mode: str | None = None     # None: "reduce-overhead" (CUDA graphs) on CUDA, default elsewhere
        self.stream_batch = True                 # batch the N steps of N consecutive frames in one UNet call
        self.residual_cfg = False                # self-negative guidance: one UNet pass, not two (guidance_mode)
        self.channels_last: bool | None = None   # None: on CUDA only
        self.warmup_on_load = True
        self.warm_sessions = 1                   # Settings.warm_sessions: the load's warm-up covers 1..this many
        self.warm_params: Mapping[str, Any] | None = None  # the load's warm-up runs these over the defaults
        self.warm_steps = ""                     # Settings.warm_steps: more stream lengths to warm ("all", "1,2,4")
        self.warmed_for: dict[str, Any] | None = None       # what the last warm-up compiled (describe)
        self.pad_batches = True                  # compiled: a batch runs at its bucket (batch_bucket), padded
        self.background_compile = True           # new shapes and ControlNets compile off the frame path
        self.nan_frames = 0
        self.compile_s = 0.0
        self._compiled: dict[tuple, Callable[..., Any]] = {}   # (part, resolution, batch) -> torch.compile'd
        self._dispatch: dict[tuple, Callable[..., Any]] = {}
        self._compiler = BackgroundCompiler()
        self._bank_shapes: dict[tuple[int, int], dict[str, torch.Size]] = {}  # resolution -> layer -> [H, T, D]
        self._schedule: LinearSchedule | None = None
        self._schedule_key: tuple | None = None
        self._step_noise_key: tuple | None = None
        # Schedules probed for this scheduler object (held: its id is in the keys), by schedule key and, for a
        # sampler that draws noise, seed and resolution: a strength moved back and forth across a multiple of
        # 1 / steps probes each schedule once (a probe is a copy of the scheduler and a step per timestep,
        # about 2 ms of host work on the CPU, each read back from the device on a GPU).
        self._probed: dict[tuple, LinearSchedule | None] = {}
        self._probed_for: Any = None
        self._scheduler_serial = 0  # this engine's scheduler object, numbered across the process (see prepare)
        self._cfg = "none"                       # none | exact | residual, settled in prepare
        self._guidance_tensor: torch.Tensor | None = None
        self._guidance_value: float | None = None
        # Residual guidance under LCM: the carried noise is tracked through its re-noising (carried_noise)
        self._carry = False
        self._delta_tensor: torch.Tensor | None = None
        self._delta_value: float | None = None
        self._pinned: dict[tuple, list[tuple[torch.Tensor, Any]]] = {}
        self._pinned_turn = 0
        self._nan_pending: tuple[torch.Tensor, list[StreamState]] | None = None
        self._zero_residuals: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._window_masks: dict[tuple, torch.Tensor] = {}

    # --- loading --------------------------------------------------------------------------------

    @property
    def compile_active(self) -> bool:
        return self.compile and (self.compile_backend is not None or self.device.type == "cuda")

    def load(self, source: str | None, device: torch.device, dtype: torch.dtype) -> None:
        super().load(source, device, dtype)
        if self.compile_active and self.warmup_on_load:
            self.warmup_for_start()

    def warmup_for_start(self) -> float:
        """The load's warm-up, at the parameters the first frames will run (``warm_params``: the daemon's
        values when it asked for this engine, its starting ``--set`` values or a preset's): a stream of
        4 steps, a long prompt or another size are other graphs than the defaults'. Where those values
        cannot be prepared (a prompt naming a LoRA that is gone, say), the schema's defaults: the frames
        then say what is wrong, and the load still serves."""
        from sdbridge.params import Schema

        defaults = Schema().defaults()
        start = {**defaults, **(self.warm_params or {})}
        try:
            seconds = self.warmup(start)
        except Exception as exc:  # noqa: BLE001 - any failure of a value; the defaults' warm-up says its own
            if not self.warm_params:
                raise
            log.warning("warm-up at the starting parameters failed (%s: %s); warming up at the defaults",
                        type(exc).__name__, exc)
            start = defaults
            seconds = self.warmup(start)
        # --warm-steps: the stream at other lengths too, so that a strength moved live across a multiple of
        # 1 / steps runs compiled graphs from the first crossing (each length is its own set: the rows).
        warmed = self.warmed_for
        assert warmed is not None
        steps = int(start["steps"])
        streamed = self._schedule is not None and self.stream_batch and not self._txt2img  # (in sequence: one set)
        more = [count for count in warm_step_counts(self.warm_steps, steps) if streamed
                and count not in warmed["stream_steps"]]
        lengths = list(warmed["stream_steps"])
        for count in more:
            # Without an explicit schedule (it would ignore the strength): a length's graphs serve any schedule.
            seconds += self.warmup({**start, "strength": min(1.0, (count + 0.5) / steps), "schedule": ""})
            lengths += self.warmed_for["stream_steps"]
        if more:
            self.prepare(start)
            self.warmed_for = {**warmed, "stream_steps": sorted(lengths)}
        self.compile_s = seconds
        return seconds

    def _adopt(self, parts: PipelineParts) -> None:
        super()._adopt(parts)
        self._bank_shapes.clear()  # another UNet's layers
        from diffusers.models.attention_processor import AttnProcessor2_0

        # SDPA (flash / memory-efficient kernels on CUDA). diffusers picks it by default on
        # torch 2; a model loaded with another processor is switched, LoRA weights are fused in
        # place and do not depend on the processor. A UNet that holds the feature bank keeps its
        # processors (SDPA too): switching them would take the bank out behind the plugin's back.
        for module in (parts.unet, self.autoencoder):
            processors = getattr(module, "attn_processors", None)
            if module is parts.unet and attached_bank(module) is not None:
                continue
            if processors and not all(isinstance(p, AttnProcessor2_0) for p in processors.values()):
                module.set_attn_processor(AttnProcessor2_0())
        channels_last = self.channels_last if self.channels_last is not None else self.device.type == "cuda"
        if channels_last:
            for module in (parts.unet, self.autoencoder):
                module.to(memory_format=torch.channels_last)
        self._compiled.clear()
        self._dispatch.clear()
        self._compiler.clear()
        self._zero_residuals.clear()
        self._window_masks.clear()
        self._schedule_key = None
        self._probed.clear()
        self._guidance_tensor = None  # made again on this model's device
        self._delta_tensor = None
        if self.compile_active:
            configure_compile_cache()

    def close(self) -> None:
        self._compiled.clear()
        self._dispatch.clear()
        self._compiler.close()
        self._pinned.clear()
        self._zero_residuals.clear()
        super().close()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(compiled=self.compile_active, graphs=len(self._compiled), cfg=self._cfg,
                   batch_sizes=self.batch_sizes(self.warm_sessions),
                   compiling=self._compiler.pending, compile_failed=len(self._compiler.failed),
                   path=self._path_name(), stream_steps=self._schedule.steps if self._schedule else None,
                   nan_frames=self.nan_frames, warmed_for=self.warmed_for)
        return out

    def _path_name(self) -> str:
        if self._passes_through():
            return "passthrough"
        if self._schedule is None:
            return "eager"
        return "stream" if self.stream_batch and self._schedule.steps > 1 else "sequential"

    def bucket(self, sessions: int) -> int:
        """The batch that ``sessions`` sessions run at: their bucket where graphs are compiled and padded."""
        return batch_bucket(sessions) if self.pad_batches and self.compile_active else sessions

    def batch_sizes(self, sessions: int) -> list[int]:
        """The batches that 1 to ``sessions`` sessions run at: the graphs a warm-up for them compiles."""
        return sorted({self.bucket(count) for count in range(1, sessions + 1)})

    def warmup(self, params: Mapping[str, Any], sessions: Sequence[int] | None = None, runs: int = 3) -> float:
        """Compile (or load from the disk cache) the graphs for ``params`` and these session counts
        (default: the batches of 1 to ``warm_sessions`` sessions).

        Three runs: the first compiles, CUDA graphs record on the next ones. Returns seconds.
        """
        import time

        from tqdm import tqdm

        started = time.perf_counter()
        sessions = list(sessions) if sessions is not None else self.batch_sizes(self.warm_sessions)
        self.prepare(params)
        width, height = self.resolution
        stream = self._schedule.steps if self._schedule else None
        desc = f"compiling {width}x{height}" + (f", {stream} steps" if stream else "")
        with tqdm(total=len(sessions) * runs, desc=desc, unit="run", leave=False) as bar, self._compiler.inline():
            for count in sessions:
                frames = torch.zeros((count, height, width, 3), dtype=torch.uint8, device=self.device)
                states = [StreamState(f"warmup-{i}") for i in range(count)]
                for _ in range(runs):
                    self.step(frames, states)
                    bar.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # warm-up is timed apart from frames: a sync is fine here
        self.compile_s = time.perf_counter() - started
        self._nan_pending = None
        self.warmed_for = {"width": width, "height": height, "sessions": list(sessions),
                           "stream_steps": [stream] if stream else [], "cfg": self._cfg}
        log.info("compiled engine warm for %dx%d, sessions %s, in %.1f s", width, height, list(sessions),
                 self.compile_s)
        return self.compile_s

    # --- parameters -----------------------------------------------------------------------------

    def prepare(self, params: Mapping[str, Any]) -> None:
        super().prepare(params)
        # The timesteps, not the strength: a strength moved live (an LFO, a fader) between two multiples of
        # 1 / steps runs the same schedule, under the same key, and the streams go on untouched. An explicit
        # ``schedule`` keys on its N and indices instead (steps and strength are then ignored): a moved one is
        # a new probe, and its frames in flight carry over where N is the same (_carries_over: each frame goes
        # on from its own timestep). Its coefficients are graph inputs, so the same number of indices is the
        # same graphs.
        # Below 1 / steps the schedule's length follows the strength (DiffusionEngine._schedule_length): the key
        # holds that length, so two such strengths are two schedules. At strength 0 no step runs (the input passes
        # through): nothing is probed, and the schedule in force stays for when the strength comes back.
        if self._explicit is not None:
            length, cut = ("schedule", self._explicit[1]), self._explicit[0]
        else:
            length, cut = self._schedule_length(), self._denoising_steps()
        if self._probed_for is not self.scheduler or len(self._probed) > 64:
            if self._probed_for is not self.scheduler:
                self._scheduler_serial = next(_SCHEDULER_SERIALS)
            self._probed = {}
            self._probed_for = self.scheduler
        # The scheduler by a serial, not its address: a session's stream slot outlives an engine swap, and a new
        # engine's scheduler at a freed one's address matched its key and carried the old frames on (QA 88 S2).
        key = (length, cut, self._txt2img, self._scheduler_serial, type(self.scheduler).__name__, self.dtype,
               str(self.device))
        if key != self._schedule_key and not self._passes_through():
            if key not in self._probed:
                timesteps, _ = self._timesteps()
                self._probed[key] = probe_linear_schedule(self.scheduler, timesteps, self._txt2img, self.dtype)
            self._schedule = self._probed[key]
            self._schedule_key = key
            self._step_noise_key = None
        schedule = self._schedule
        if (schedule is not None and schedule.noisy and self._step_noise_key != (self._seed, self.resolution)
                and not self._passes_through()):
            noised_key = (key, self._seed, self.resolution)
            if noised_key not in self._probed:
                # The eager engine seeds each session's draw alike at every frame: one term per step, for all.
                assert self.parts is not None
                width, height = self.resolution
                shape = (1, self.parts.unet.config.in_channels, height // self.vae_scale_factor,
                         width // self.vae_scale_factor)
                self._timesteps()  # the scheduler as the eager engine steps it (begin index set)
                self._probed[noised_key] = dataclasses.replace(schedule, step_noise=draw_step_noise(
                    self.scheduler, schedule.timesteps, shape, self.dtype,
                    self._step_generators([StreamState("")], shape)))
            self._schedule = self._probed[noised_key]
            self._step_noise_key = (self._seed, self.resolution)
        self.residual_cfg = params.get("guidance_mode", "exact") == "residual"
        if not self._guided:
            self._cfg = "none"
        elif (self.residual_cfg and self.scheduler.config.get("prediction_type", "epsilon") == "epsilon"
              and schedule is not None and (not schedule.noisy or schedule.noise_level is not None)):
            # Residual guidance stands on the noise the latent carries. LCM's re-noise is a fixed term per step
            # (a graph input), so the carried noise is followed through it (carried_noise, StreamDiffusion's
            # RCFG); Euler a's ancestral step has no such form here, and guides exactly. A sampler off the fast
            # path (no schedule: the eager engine's steps) guides exactly.
            self._cfg = "residual"
        else:
            self._cfg = "exact"
        self._carry = self._cfg == "residual" and schedule is not None and schedule.noise_level is not None
        delta = float(params.get("delta", 1.0))
        if self._delta_tensor is None or self._delta_value != delta:
            self._delta_tensor = torch.full((), delta, device=self.device, dtype=torch.float32)  # as guidance's
            self._delta_value = delta
        if self._guidance_tensor is None or self._guidance_value != self._guidance:
            # A graph input (never a constant baked into a graph): a new value is no recompile. Filled on the
            # device: torch.tensor(value, device=...) copies from the host and, on CUDA, waits for the work
            # queued before it, on every frame of an LFO on guidance.
            self._guidance_tensor = torch.full((), self._guidance, device=self.device, dtype=torch.float32)
            self._guidance_value = self._guidance

    # --- the frame ------------------------------------------------------------------------------

    def step(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        # Inference mode whoever calls (the worker does; a warm-up, a benchmark or a test may not): a graph
        # guards the grad mode it was traced in, so the warm-up's graphs are the frames' graphs.
        with self._compiler.frame(), torch.inference_mode():   # a background compile yields the CPU meanwhile
            return self._step(frames, states)

    def _step(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        # 0. The previous frame's NaN flag, a frame late: it finished when its output was copied out.
        self._read_previous_nan()
        self._new_frame()
        frames = _inference(self.fit(self.upload(frames))) if frames is not None else None
        image = self.step_float(frames, states)  # [B, 3, H, W] in [0, 1]
        width, height = self.resolution
        fallback = frames if frames is not None else torch.zeros(
            (len(states), height, width, 3), dtype=torch.uint8, device=self.device)
        # 6. uint8 out; a frame with a NaN is replaced by its input on the device (no host sync).
        out, nan = self._padded("quantize", len(states), _quantize)(image, fallback)
        self.last_nan = nan.any()
        # A copy: under CUDA graphs ``nan`` lives in the graph's pool, which the next frame reuses.
        self._nan_pending = (nan.clone(), list(states))
        return out

    @torch.inference_mode()
    def step_float(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        """The frame leaving the pipeline before quantisation: [B, 3, H, W] in [0, 1]."""
        schedule = self._schedule
        if self._passes_through():
            # Strength 0: the input is the output (DiffusionEngine._passes_through). The frames in flight are
            # dropped: they would come out stale when the strength comes back.
            self._drop_streams(states)
            if frames is not None:
                frames = _inference(self.fit(self.upload(frames)))
            return self._kept(frames, len(states))
        if schedule is None:
            # A scheduler that is not linear: the eager engine's exact path.
            self._drop_streams(states)
            return super().step_float(frames, states)
        assert self._embeddings is not None, "prepare() before step()"
        self._new_frame()
        batch = len(states)
        width, height = self.resolution
        latent_shape = (1, self.parts.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)

        # 1. uint8 [B, H, W, 3] on the device at the engine's resolution.
        if frames is not None and not self._txt2img:
            frames = _inference(self.fit(self.upload(frames)))
        # 2. Encode and noise at t_0: the entry latents [B, 4, h, w].
        noise = torch.cat([self._noise(state, latent_shape) for state in states])
        if self._txt2img or frames is None:
            entry = (noise * schedule.noise_coef).to(self.dtype)
        else:
            entry = self._padded("entry", batch, self._entry)(frames, noise, schedule.entry_coef, schedule.noise_coef)

        # 3. This batch's active ControlNet slots (condition images [B, 3, H, W], scales).
        controls = self.controlnets.units(states) if self.controlnets is not None else []
        # The IP-Adapter's tokens and scale per session (engines/ip_adapter.py), graph inputs while one serves.
        prompt = self.ip_adapters.prompts(states) if self.ip_adapters is not None else None

        # 4. Denoise: one UNet call over [B * N] (stream) or N calls over [B] (sequential).
        if self.stream_batch and schedule.steps > 1:
            latents = self._denoise_stream(entry, noise, states, schedule, controls, prompt)
        else:
            self._drop_streams(states)
            latents = self._denoise_sequential(entry, noise, schedule, controls, prompt)

        # 5. Latent plugins, then decode.
        if self.latent_hook is not None:
            latents = self.latent_hook(latents, states)
        # The stream batch's latents are a strided view of its output: one layout for one decode graph.
        return self._padded("decode", batch, self.decode)(_one_layout(latents))

    def _denoise_sequential(self, x: torch.Tensor, noise: torch.Tensor, schedule: LinearSchedule,
                            controls: Sequence[ControlUnit], prompt: ImagePrompt | None = None) -> torch.Tensor:
        batch = x.shape[0]
        residual = noise if self._cfg == "residual" else None
        for i in range(schedule.steps):
            levels = schedule.levels_at(i, batch) if self._carry else None
            x, eps = self._unet_step(x, *schedule.at(i, batch), schedule.noise_at(i, batch), residual, controls, (i,),
                                     schedule.steps, prompt, levels)
            residual = eps if residual is not None else None  # with levels: the carried noise (_denoise)
        return x

    def _denoise_stream(self, entry: torch.Tensor, noise: torch.Tensor, states: Sequence[StreamState],
                        schedule: LinearSchedule, controls: Sequence[ControlUnit],
                        prompt: ImagePrompt | None = None) -> torch.Tensor:
        steps, batch = schedule.steps, len(states)
        slots: list[_StreamSlot | None] = [
            self._stream_slot(state, entry[i:i + 1], noise[i:i + 1], schedule, _session_controls(controls, [i]))
            for i, state in enumerate(states)]
        empty = [i for i, slot in enumerate(slots) if slot is None]
        if empty:  # sessions whose stream starts here (a new one, or a change that refills): filled together
            filled = self._fill([states[i] for i in empty], _take(entry, empty), _take(noise, empty), schedule,
                                _session_controls(controls, empty), _prompt_rows(prompt, empty))
            for i, slot in zip(empty, filled):
                slots[i] = slot
        # [B * N, 4, h, w]: session-major, step-minor; element (s, i) is at timesteps[i].
        x = torch.cat([torch.cat([entry[i:i + 1], slot.latents]) for i, slot in enumerate(slots)])
        residual = None
        if self._cfg == "residual":
            residual = torch.cat([torch.cat([noise[i:i + 1], slot.residual]) for i, slot in enumerate(slots)])
        controls = _in_flight_conditions(controls, slots, steps)  # images [B * N, 3, H, W], like x
        with self._bank_rows([state.session_id for state in states], steps):
            y, eps = self._stream_call(x, residual, batch, schedule, controls, prompt)
        y = y.view(batch, steps, *y.shape[1:])
        eps = eps.view(batch, steps, *eps.shape[1:])
        for i, slot in enumerate(slots):
            # Clone: under CUDA graphs the outputs live in the graph's pool and the next replay overwrites them.
            slot.latents = y[i, :-1].clone()
            slot.residual = eps[i, :-1].clone() if residual is not None else None
            slot.conditions = _held_conditions(controls, i, steps, states[i])
        return y[:, -1]  # [B, 4, h, w], the frames that entered N - 1 calls ago, fully denoised

    @contextlib.contextmanager
    def _bank_rows(self, session_ids: Sequence[str], steps: int) -> Iterator[None]:
        """The feature bank's rows for one stream call: a session's row j holds the frame that entered
        j calls ago, at step j, so it keys as that window place (``window_key``); next call the same row
        holds the next frame at the same step: "the previous frame's features", as in the other engines.
        Each stream call is the bank's step 0 (the fill's calls too: its frame then counts as repeated)."""
        bank = attached_bank(self.parts.unet) if self.parts is not None else None
        if bank is None or not bank.sessions:
            yield
            return
        saved = bank.sessions
        bank.sessions = [window_key(session, back) for session in session_ids for back in range(steps)]
        bank.step = -1
        try:
            yield
        finally:
            bank.sessions = saved

    def _stream_call(self, x: torch.Tensor, residual: torch.Tensor | None, batch: int, schedule: LinearSchedule,
                     controls: Sequence[ControlUnit],
                     prompt: ImagePrompt | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        levels = schedule.levels_rows(batch) if self._carry else None
        return self._unet_step(x, *schedule.tiled(batch), schedule.noise_rows(batch), residual, controls,
                               range(schedule.steps), schedule.steps, prompt, levels)

    def _unet_step(self, x: torch.Tensor, timesteps: torch.Tensor, input_scale: torch.Tensor,
                   sample_coef: torch.Tensor, eps_coef: torch.Tensor, drawn: torch.Tensor | None,
                   residual: torch.Tensor | None, controls: Sequence[ControlUnit], row_steps: Sequence[int],
                   steps: int, prompt: ImagePrompt | None = None,
                   levels: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call over x [M, 4, h, w], M = sessions * len(row_steps); ``row_steps`` is the step
        index of each of a session's rows (its N steps in stream batch, this step in sequence); ``prompt``
        the IP-Adapter's per session; ``levels`` the rows' noise levels where residual guidance carries
        the noise through LCM's re-noise (LinearSchedule.levels), else None.

        The call runs at the sessions' bucket (:meth:`bucket`): every per-row input gets the last session's
        rows again up to it, and the outputs are cut back to M rows."""
        rows = x.shape[0]
        sessions = rows // len(row_steps)
        padded = self.bucket(sessions)
        if padded == sessions:
            return self._unet_call(x, timesteps, input_scale, sample_coef, eps_coef, drawn, residual, controls,
                                   row_steps, steps, prompt, levels)

        def pad(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return _pad_sessions(tensor, sessions, padded)

        controls = [dataclasses.replace(unit, image=pad(unit.image), scale=pad(unit.scale)
                                        if isinstance(unit.scale, torch.Tensor) else unit.scale) for unit in controls]
        if prompt is not None:
            prompt = dataclasses.replace(prompt, tokens=_pad_sessions(prompt.tokens, sessions, padded),
                                         scale=_pad_sessions(prompt.scale, sessions, padded))
        with self._bank_padded(rows, padded * len(row_steps)):
            levels = None if levels is None else (pad(levels[0]), pad(levels[1]))
            x_next, eps = self._unet_call(pad(x), pad(timesteps), pad(input_scale), pad(sample_coef), pad(eps_coef),
                                          pad(drawn), pad(residual), controls, row_steps, steps, prompt, levels)
        return x_next[:rows], eps[:rows]

    @contextlib.contextmanager
    def _bank_padded(self, rows: int, padded: int) -> Iterator[None]:
        """The feature bank's rows for a padded call: the pad rows keyed apart (``PAD_ROW``), so that they
        never read or overwrite a session's entries. Their own entries go with the next ``forget``."""
        bank = attached_bank(self.parts.unet) if self.parts is not None else None
        if bank is None or len(bank.sessions) != rows:  # off, or not one key per row: rows() keys them apart
            yield
            return
        saved = bank.sessions
        bank.sessions = saved + [f"{PAD_ROW}{i}" for i in range(padded - rows)]
        try:
            yield
        finally:
            bank.sessions = saved

    def _unet_call(self, x: torch.Tensor, timesteps: torch.Tensor, input_scale: torch.Tensor,
                   sample_coef: torch.Tensor, eps_coef: torch.Tensor, drawn: torch.Tensor | None,
                   residual: torch.Tensor | None, controls: Sequence[ControlUnit], row_steps: Sequence[int],
                   steps: int, prompt: ImagePrompt | None = None,
                   levels: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_unet_step` at the batch it runs at."""
        assert self._embeddings is not None and self._guidance_tensor is not None and self._delta_tensor is not None
        # The stream's torch.cat of entry and in-flight latents, or the entry graph's output: one layout.
        x = _one_layout(x)
        residual = _one_layout(residual) if residual is not None else None
        if self._guided:
            uncond, cond = self._embeddings.chunk(2)
        else:
            uncond, cond = None, self._embeddings
        uncond = uncond if self._cfg == "exact" else None
        added = self._added_for_call()
        down, mid = self._control_residuals(x, timesteps, input_scale, cond, uncond, added, controls, row_steps,
                                            steps)
        # A session's rows share its image prompt: [M, T, D] tokens and [M, 1, 1] scales, session-major as x.
        ip = None if prompt is None else (prompt.tokens.repeat_interleave(len(row_steps), dim=0), prompt.negative,
                                          prompt.scale.repeat_interleave(len(row_steps), dim=0))
        # The carried noise's inputs: None, or (level, next level, delta); delta scales the residual only where
        # it is StreamDiffusion's stock noise (Euler's and DDIM's residual graphs stay as they were).
        carry = None if levels is None or residual is None else (*levels, self._delta_tensor)
        args = (x, timesteps, input_scale, sample_coef, eps_coef, drawn, residual, carry, cond, uncond, added,
                self._guidance_tensor, self._cfg, down, mid, ip)
        bank = attached_bank(self.parts.unet) if self.compile_active else None
        if bank is not None and bank.sessions:
            return self._banked_step(bank, args)
        return self._part(f"denoise-{self._cfg}{_carry_suffix(carry)}{_ip_suffix(ip)}", x.shape[0],
                          self._denoise)(*args)

    def _banked_step(self, bank: FeatureBank, args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call with the feature bank on, compiled: the rows' stored keys and values go into the
        graph as inputs and the new ones come out (engines/feature_bank.py), the same entries the eager
        path reads and writes. The first call at a resolution runs the eager path, which learns each
        layer's shape there (so that an entry from another resolution counts as missing, as it does eagerly)."""
        x = args[0]
        call_rows = x.shape[0] * (2 if self._cfg == "exact" else 1)  # exact guidance: [uncond rows, cond rows]
        shapes = self._bank_shapes.get(self.resolution)
        if shapes is None:
            out = self._denoise(*args)
            rows = bank.rows(call_rows)
            learned = bank.shapes(rows[0]) if rows else {}
            if learned:
                self._bank_shapes[self.resolution] = learned
            return out
        bank.begin_call(call_rows)
        rows = bank.rows(call_rows)
        assert rows is not None
        layers = tuple(shapes)
        past, bias = bank.feed(rows, shapes, self.dtype, self.device)
        with bank.graph_call():
            banked = self._part(f"denoise-{self._cfg}{_carry_suffix(args[7])}-bank{_ip_suffix(args[-1])}", x.shape[0],
                                self._denoise_banked, self._bank_on)
            x_next, eps, fresh = banked(*args, layers, past, bias)
        bank.put_fresh(rows, layers, fresh)
        return x_next, eps

    def _bank_on(self) -> bool:
        """The bank's processors are in the UNet: a banked graph traced now has them (a plugin turned off
        while its graph waited to compile would otherwise leave a failed compile behind)."""
        return self.parts is not None and attached_bank(self.parts.unet) is not None

    def _denoise_banked(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]:
        """:meth:`_denoise` with the bank's entries as inputs and outputs: ``args`` are its arguments, then
        the bank's layer names, their (keys, values) and the rows' bias (FeatureBank.feed). Returns
        (x_next, eps, each layer's new (keys, values))."""
        *denoise_args, layers, past, bias = args
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        x_next, eps = self._denoise(*denoise_args, feed=BankFeed(dict(zip(layers, past)), bias, fresh))
        return x_next, eps, tuple(fresh[layer] for layer in layers)

    def _added_for_call(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """SDXL's added conditioning for this guidance mode: (text_embeds [R, D], time_ids [R, 6]), R = 2
        (uncond, cond) with exact guidance, else 1 (cond); None for SD 1.x/2.x."""
        added = self._added_cond
        if not added:
            return None
        text_embeds, time_ids = added["text_embeds"], added["time_ids"]
        if self._cfg != "exact" and text_embeds.shape[0] == 2:
            text_embeds, time_ids = text_embeds[1:], time_ids[1:]
        return text_embeds, time_ids

    def _control_residuals(self, x: torch.Tensor, timesteps: torch.Tensor, input_scale: torch.Tensor,
                           cond: torch.Tensor, uncond: torch.Tensor | None,
                           added: tuple[torch.Tensor, torch.Tensor] | None, controls: Sequence[ControlUnit],
                           row_steps: Sequence[int], steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ControlNet residuals for one UNet call, summed over slots in slot order; zeros when no
        slot acts on any row. Each [M, C, h', w'], or [2M, ...] with exact guidance (uncond, cond)."""
        rows = x.shape[0]
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for unit in controls:
            assert unit.mode == "balanced", unit.mode  # live slots have no control mode (one-shot requests do)
            scale = self._row_scales(unit, row_steps, steps, rows)
            if scale is None:
                continue  # no row inside this slot's window: the ControlNet does not run
            control = self._part(f"control{unit.slot + 1}-{self._cfg}", rows, self._control)
            unit_down, unit_mid = control(unit.model, x, timesteps, input_scale, cond, uncond, added, unit.image,
                                          scale, self._cfg)
            if down is None or mid is None:
                down, mid = list(unit_down), unit_mid
            else:
                down = [before + after for before, after in zip(down, unit_down)]
                mid = mid + unit_mid
        if down is None or mid is None:
            return self._zeros_for(rows * (2 if self._cfg == "exact" else 1))
        return down, mid

    def _row_scales(self, unit: ControlUnit, row_steps: Sequence[int], steps: int,
                    rows: int) -> torch.Tensor | None:
        """[M] float32: the slot's scale for each row, 0 for a row whose step is outside the slot's
        start/end window or whose session has no condition image; None when no row is inside.

        The window is settled here on the host (a tuple of bools per session's rows, a mask made once
        per pattern); the scale multiplies that mask on the device, so a new scale, even every frame
        from an LFO, is a new tensor to the same graph and never a host-to-device copy."""
        keep = tuple(unit.keeps(step, steps) for step in row_steps)
        if not any(keep):
            return None
        sessions = rows // len(keep)
        mask = self._window_masks.get((keep, sessions))
        if mask is None:
            mask = torch.tensor(keep * sessions, dtype=torch.float32, device=self.device)  # session-major
            self._window_masks[(keep, sessions)] = mask
        if isinstance(unit.scale, torch.Tensor):  # [B, 1, 1, 1]: 0 for a session without its condition
            return mask * unit.scale.reshape(-1).float().repeat_interleave(len(keep))
        return mask * float(unit.scale)

    def _zeros_for(self, rows: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Zero residuals for a UNet batch of ``rows``: x + 0 is x, so the UNet's output is bit for bit the
        output without residuals (tests: scale 0 equals the base).

        One set is kept, for the current resolution, sized for the most rows run at it; a call of fewer rows
        takes its first ``rows`` (a [:rows] slice of a contiguous tensor has a contiguous tensor's strides
        and storage offset 0, so the same graph takes it; under CUDA graphs such an input is copied into the
        graph's own buffer at replay, as any input that is not a parameter, so its address does not matter).
        A set per (rows, resolution) kept for good held GiBs of zeros on a GPU (QA 63 F3: 7.3 GiB for SD 1.5
        across 512/768/1024 and 1-4 sessions); a new resolution lets the old one's set go."""
        found = self._zero_residuals.get(self.resolution)
        if found is None or found[1].shape[0] < rows:
            assert self.parts is not None
            self._zero_residuals.clear()
            width, height = self.resolution
            shapes, mid_shape = residual_shapes(self.parts.unet.config, height // self.vae_scale_factor,
                                                width // self.vae_scale_factor)
            found = ([torch.zeros((rows, *shape), device=self.device, dtype=self.dtype) for shape in shapes],
                     torch.zeros((rows, *mid_shape), device=self.device, dtype=self.dtype))
            self._zero_residuals[self.resolution] = found
        down, mid = found
        if mid.shape[0] == rows:
            return list(down), mid
        return [sample[:rows] for sample in down], mid[:rows]

    def _stream_slot(self, state: StreamState, entry: torch.Tensor, noise: torch.Tensor,
                     schedule: LinearSchedule, controls: Sequence[ControlUnit]) -> _StreamSlot | None:
        """This session's buffer, or None where a new one is to be filled from this frame (:meth:`_fill`); it is
        carried over from the old one where only the number of steps or the seed changed (:meth:`_reslot`)."""
        key = self._slot_key()
        slot = state.data.get(STREAM_KEY)
        if slot is not None and slot.key == key:
            return slot
        if slot is not None:
            self._forget_places(state.session_id, schedule.steps, slot.steps)
        if slot is not None and _carries_over(slot.key, key):
            slot = self._reslot(slot, key, entry, noise, schedule, controls)
            if slot is not None:
                state.data[STREAM_KEY] = slot
                return slot
        return None

    def _slot_key(self) -> tuple:
        return (self._seed, self._schedule_key, self.resolution, self._cfg == "residual")

    def _fill(self, states: Sequence[StreamState], entry: torch.Tensor, noise: torch.Tensor,
              schedule: LinearSchedule, controls: Sequence[ControlUnit],
              prompt: ImagePrompt | None = None) -> list[_StreamSlot]:
        """New buffers for these sessions, filled from this frame (warm start, module docstring): N - 1 stream
        calls over all of them together, each as a steady call over as many sessions. After a change that
        refills every session (resolution, steps, sampler) that is N - 1 calls of the batch, not N - 1 calls
        of one session per session, one after the other (QA 63 F7: 24 calls of 4 rows for 8 sessions at 4
        steps, where 3 calls of 32 do)."""
        steps, count = schedule.steps, len(states)
        key = self._slot_key()
        # Placeholders [count, N - 1, ...], pushed out by the fill.
        latents = entry[:, None].expand(-1, steps - 1, -1, -1, -1)
        residual = noise[:, None].expand(-1, steps - 1, -1, -1, -1) if self._cfg == "residual" else None
        # Every row of a session's fill is this frame, and so is its condition image: [count * N, 3, H, W]
        # (contiguous, the same layout as a steady call's, so the ControlNet graph is the same one).
        controls = [dataclasses.replace(unit, image=unit.image.repeat_interleave(steps, dim=0)) for unit in controls]
        session_ids = [state.session_id for state in states]
        for _ in range(steps - 1):
            # [count * N, ...], session-major like a steady call; a copy of the last call's outputs, taken before
            # the next call (under CUDA graphs its replay overwrites them).
            x = torch.cat([entry[:, None], latents], dim=1).flatten(0, 1)
            res = torch.cat([noise[:, None], residual], dim=1).flatten(0, 1) if residual is not None else None
            with self._bank_rows(session_ids, steps):
                y, eps = self._stream_call(x, res, count, schedule, controls, prompt)
            latents = y.view(count, steps, *y.shape[1:])[:, :-1]
            residual = eps.view(count, steps, *eps.shape[1:])[:, :-1] if residual is not None else None
        slots = []
        for j, state in enumerate(states):
            slot = _StreamSlot(key=key, latents=latents[j].clone(),
                               residual=residual[j].clone() if residual is not None else None,
                               conditions=_held_conditions(controls, j, steps, state),
                               timesteps=schedule.timestep_values)
            state.data[STREAM_KEY] = slot
            slots.append(slot)
        return slots

    def _drop_streams(self, states: Sequence[StreamState]) -> None:
        """These sessions' frames in flight, dropped where a frame of theirs runs another path (one step, the
        exact path): they would be stale when the stream runs again (the same key after 0.5 -> 0.1 -> 0.5
        on strength), and its first outputs frames from that long ago. So would the feature bank's entries
        of their window places past the newest."""
        for state in states:
            slot = state.data.pop(STREAM_KEY, None)
            if slot is not None:
                self._forget_places(state.session_id, 1, slot.steps)

    def _forget_places(self, session_id: str, start: int, stop: int) -> None:
        """The feature bank's entries of a session's window places ``start`` to ``stop`` - 1, which a stream
        cut shorter no longer writes: when it grows again they would hold features from that long ago."""
        bank = attached_bank(self.parts.unet) if self.parts is not None else None
        if bank is not None and start < stop:
            bank.forget_rows({window_key(session_id, back) for back in range(start, stop)})

    def _reslot(self, old: _StreamSlot, key: tuple, entry: torch.Tensor, noise: torch.Tensor,
                schedule: LinearSchedule, controls: Sequence[ControlUnit]) -> _StreamSlot | None:
        """The frames in flight carried over to a schedule of another length (or another seed: :func:`_carries_over`),
        with no UNet call.

        A strength moved across a multiple of 1 / steps (a fader, an LFO) changes how many steps a frame runs,
        and img2img takes its timesteps as a tail of the same schedule: each frame in flight whose next
        timestep is still in the schedule goes on from it, at its new place; the others (the new schedule
        is shorter) are dropped, and the output skips ahead by as many frames as the delay shrank. Where the
        new schedule is longer, its first places have no frame at their timesteps: they take this frame,
        advanced to each by the schedule's own steps with the noise it carries as the prediction (exact for
        an epsilon-predicting model: a deterministic step then lands on the same frame at the next noise
        level), so each comes out with at least as many steps as the old schedule ran. A refill
        instead costs N - 1 UNet calls at a batch of one session, inside one frame: a stall on every crossing.

        None where a place has no frame and the model does not predict the noise (the fill then runs)."""
        where = {t: j for j, t in enumerate(old.timesteps[1:])}
        rows = [where.get(t) for t in schedule.timestep_values[1:]]
        missing = [j for j, row in enumerate(rows) if row is None]
        if missing and self.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            return None
        ahead: list[torch.Tensor] = []
        carried: list[torch.Tensor] = []   # the noise each advanced frame carries, where LCM's is followed
        x, r = entry.float(), noise.float()
        for j in range(max(missing, default=-1) + 1):
            step = schedule.step_noise[j:j + 1] if schedule.step_noise is not None else None
            if self._carry:
                r = carried_noise(r, noise, step, *(t[j:j + 1] for t in (schedule.sample_coef, schedule.eps_coef,
                                                                           *schedule.levels())))
                carried.append(r.to(noise.dtype))
            x = schedule.sample_coef[j] * x + schedule.eps_coef[j] * noise.float()
            if step is not None:
                x = x + step.float()
            ahead.append(x.to(old.latents.dtype))
        latents = _like(_carried(old.latents, rows, ahead.__getitem__), old.latents)
        residual = None
        if key[3]:  # residual guidance: each frame's noise where it carries none (a place added, guidance just on)
            def stand_in(j: int) -> torch.Tensor:
                return carried[j] if carried and rows[j] is None else noise

            residual = _like(_carried(old.residual, rows, stand_in),
                             old.residual if old.residual is not None else old.latents)
        conditions = {}
        for unit in controls:
            held = old.conditions.get(unit.slot)
            if held is not None and held.shape[1:] == unit.image.shape[1:]:
                conditions[unit.slot] = _carried(held, rows, lambda j, image=unit.image: image)
        log.debug("stream of %d steps carried over to %d (%d frames advanced from this one)",
                  old.steps, schedule.steps, len(missing))
        return _StreamSlot(key=key, latents=latents, residual=residual, conditions=conditions,
                           timesteps=schedule.timestep_values)

    # --- the parts that are compiled --------------------------------------------------------------

    def _part(self, part: str, batch: int, fn: Callable[..., Any],
              wanted: Callable[[], bool] | None = None) -> Callable[..., Any]:
        """The callable for one part at this resolution and batch.

        Uncompiled: ``fn``. Compiled: a torch.compile'd ``fn`` behind the background compiler
        (engines/background_compile.py), so that a call whose graph is not ready yet runs ``fn`` while
        the graph compiles off the frame path (with ``background_compile`` off: compiled in the call).
        ``wanted``: BackgroundCompiler.call's."""
        key = (part, self.resolution, batch)
        found = self._dispatch.get(key)
        if found is None:
            found = fn
            if self.compile_active:
                backend = self.compile_backend or "inductor"
                mode = self.compile_mode
                if mode is None and backend == "inductor" and self.device.type == "cuda":
                    mode = "reduce-overhead"
                log.info("graph %s for %dx%d, batch %d (%s, %s)", part, *self.resolution, batch, backend, mode)
                # Over its own code object: its own Dynamo cache and recompile count (RECOMPILE_LIMIT).
                compiled = torch.compile(own_code(fn), backend=backend, mode=mode, fullgraph=True, dynamic=False)
                self._compiled[key] = compiled
                found = functools.partial(self._compiler.call, key, fn, compiled, wanted=wanted) \
                    if self.background_compile else compiled
            else:
                self._compiled[key] = fn
            self._dispatch[key] = found
        return found

    def _padded(self, part: str, sessions: int, fn: Callable[..., Any]) -> Callable[..., Any]:
        """:meth:`_part` for a part whose per-session arguments and outputs are [sessions, ...]: it runs at the
        bucket of ``sessions``, each such argument padded with its last row, each output cut back."""
        padded = self.bucket(sessions)
        call = self._part(part, padded, fn)
        if padded == sessions:
            return call

        def run(*args: Any) -> Any:
            out = call(*(_pad_sessions(arg, sessions, padded) if isinstance(arg, torch.Tensor) and arg.dim()
                         and arg.shape[0] == sessions else arg for arg in args))
            return tuple(item[:sessions] for item in out) if isinstance(out, tuple) else out[:sessions]

        return run

    def wait_compiled(self, timeout_s: float = 600.0) -> bool:
        """Until no graph is compiling in the background (tests, benchmarks; never the frame path)."""
        return self._compiler.wait(timeout_s)

    def _make_controlnets(self) -> Any:
        controlnets = super()._make_controlnets()
        controlnets.warm = self._warm_controlnet
        controlnets.upload = self.upload  # condition images through the pinned buffers, as the frames
        return controlnets

    def _warm_controlnet(self, model: Any) -> None:
        """On the ControlNet loader's thread, before the new model serves: compile its graph for every
        shape a ControlNet graph serves now, so that the old set serves until it is ready and the first
        frame with the new one compiles nothing. A ControlNet of an architecture already compiled has
        its graph (Dynamo takes the weights as inputs): nothing to do."""
        if not (self.compile_active and self.background_compile):
            return
        for key, args, (inference, grad) in list(self._compiler.ready):
            if not (isinstance(key, tuple) and str(key[0]).startswith("control") and key in self._compiled):
                continue
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                self._compiler.prime(key, self._compiled[key], *materialize(args, model))

    def _entry(self, frames: torch.Tensor, noise: torch.Tensor, entry_coef: torch.Tensor,
               noise_coef: torch.Tensor) -> torch.Tensor:
        # frames [B, H, W, 3] uint8 -> [-1, 1] [B, 3, H, W] -> latents [B, 4, h, w] noised at t_0
        pixels = frames.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        return entry_coef * self.encode(pixels) + noise_coef * noise

    def _denoise(self, x: torch.Tensor, timesteps: torch.Tensor, input_scale: torch.Tensor,
                 sample_coef: torch.Tensor, eps_coef: torch.Tensor, drawn: torch.Tensor | None,
                 residual: torch.Tensor | None, carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                 cond: torch.Tensor, uncond: torch.Tensor | None, added: tuple[torch.Tensor, torch.Tensor] | None,
                 guidance: torch.Tensor, cfg: str, down: list[torch.Tensor], mid: torch.Tensor,
                 ip: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 feed: BankFeed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call and the scheduler's step. x [M, 4, h, w]; timesteps [M]; coefficients [M] or [1];
        ``drawn`` [M, 4, h, w], the noise a sampler that draws adds (LinearSchedule.step_noise), or None;
        ``carry``: (level [M], next level [M], delta []) where residual guidance carries the noise through
        LCM's re-noise: the residual's negative is ``delta * residual`` (StreamDiffusion's), and the second
        output is the carried noise (:func:`carried_noise`) rather than the guided prediction; None otherwise;
        cond, uncond [1, L, D]; ``added``: SDXL's (text_embeds, time_ids) per guidance half (see
        :meth:`_added_for_call`), None otherwise; guidance []; ControlNet residuals ``down``, ``mid``
        [M or 2M, C, h', w']; ``ip``: the IP-Adapter's (tokens [M, T, D], negative tokens [1, T, D], scale
        [M, 1, 1]), or None.
        Everything that changes live is an argument, so that a new prompt, guidance value or ControlNet
        scale is new input to the same graph, never a recompile.

        The residuals are always inputs, zeros when no ControlNet slot acts, rather than a second
        graph variant "with residuals": with two variants the first frame after a slot turns on would
        compile (or, warmed up front, every graph would exist twice in memory, CUDA graph pools
        included); with one, on/off is only a change of input, and the cost of the zeros is one
        elementwise add per skip connection, nothing next to the convolutions around it.

        ``feed``: the feature bank's entries for this call (:meth:`_denoise_banked`)."""
        assert self.parts is not None
        unet, batch = self.parts.unet, x.shape[0]
        attention = {"bank_feed": feed} if feed is not None else None
        model_input = (x * input_scale.view(-1, 1, 1, 1)).to(x.dtype)
        if cfg == "exact":
            assert uncond is not None
            embeddings: Any = torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])
            if ip is not None:  # the text, then the image tokens and scales by the same rows (ip_adapter.py)
                tokens, negative, scale = ip
                embeddings = (embeddings, torch.cat([negative.expand_as(tokens), tokens]), torch.cat([scale, scale]))
            noise_pred = unet(torch.cat([model_input, model_input]), torch.cat([timesteps, timesteps]),
                              encoder_hidden_states=embeddings, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, added_cond_kwargs=_added_kwargs(added, batch),
                              cross_attention_kwargs=attention, return_dict=False)[0]
            noise_uncond, noise_cond = noise_pred.chunk(2)
            eps = noise_uncond + guidance * (noise_cond - noise_uncond)
        else:
            hidden: Any = cond.expand(batch, -1, -1)
            if ip is not None:
                hidden = (hidden, ip[0], ip[2])
            eps = unet(model_input, timesteps, encoder_hidden_states=hidden,
                       down_block_additional_residuals=down, mid_block_additional_residual=mid,
                       added_cond_kwargs=_added_kwargs(added, batch), cross_attention_kwargs=attention,
                       return_dict=False)[0]
            if cfg == "residual":
                assert residual is not None
                negative = residual if carry is None else (residual * carry[2]).to(residual.dtype)
                eps = negative + guidance * (eps - negative)
        # The scheduler's arithmetic in float32, as diffusers' Euler step upcasts.
        x_next = sample_coef.view(-1, 1, 1, 1) * x.float() + eps_coef.view(-1, 1, 1, 1) * eps.float()
        if drawn is not None:
            x_next = x_next + drawn.float()
        if carry is not None:
            assert residual is not None
            carried = carried_noise(residual, eps, drawn, sample_coef, eps_coef, carry[0], carry[1])
            return x_next.to(x.dtype), carried.to(x.dtype)
        return x_next.to(x.dtype), eps

    def _control(self, model: Any, x: torch.Tensor, timesteps: torch.Tensor, input_scale: torch.Tensor,
                 cond: torch.Tensor, uncond: torch.Tensor | None, added: tuple[torch.Tensor, torch.Tensor] | None,
                 image: torch.Tensor, scale: torch.Tensor, cfg: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One ControlNet over the rows of one UNet call. x, timesteps, input_scale, cond, uncond, added as in
        :meth:`_denoise`; image [M, 3, H, W] in [0, 1], each row's condition; scale [M] float32 per row.
        -> (down, mid) residuals, [M or 2M, C, h', w'] each, contiguous (the UNet
        graph is specialised on its inputs' strides). The model's own conditioning_scale stays 1.0, a
        constant; the live scale is this tensor, so changing it is no recompile."""
        batch = x.shape[0]
        model_input = (x * input_scale.view(-1, 1, 1, 1)).to(x.dtype)
        embeddings = cond.expand(batch, -1, -1)
        if cfg == "exact":  # the condition doubled with the batch, as diffusers' pipeline does
            assert uncond is not None
            model_input = torch.cat([model_input, model_input])
            timesteps = torch.cat([timesteps, timesteps])
            embeddings = torch.cat([uncond.expand(batch, -1, -1), embeddings])
            image = torch.cat([image, image])
            scale = torch.cat([scale, scale])
        down, mid = model(model_input, timesteps, encoder_hidden_states=embeddings, controlnet_cond=image,
                          conditioning_scale=1.0, guess_mode=False, added_cond_kwargs=_added_kwargs(added, batch),
                          return_dict=False)
        weight = scale.to(mid.dtype).view(-1, 1, 1, 1)
        return [(sample * weight).contiguous() for sample in down], (mid * weight).contiguous()

    def _new_frame(self) -> None:
        # CUDA graph trees: outputs of the previous frame may be overwritten from here on (the
        # stream buffers and NaN flags that outlive a frame are copies).
        if self.compile_active and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    # --- frames in ------------------------------------------------------------------------------

    def upload(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames onto the device; from host memory through a pinned buffer, without blocking."""
        if frames.device == self.device or (frames.device.type == self.device.type == "cpu"):
            return frames
        if self.device.type != "cuda" or frames.device.type != "cpu":
            return frames.to(self.device)
        shape = tuple(frames.shape)
        ring = self._pinned.get(shape)
        if ring is None:
            # Two buffers: the copy of frame k may still be in flight while frame k + 1 is staged.
            ring = [(torch.empty(shape, dtype=torch.uint8).pin_memory(), torch.cuda.Event()) for _ in range(2)]
            self._pinned[shape] = ring
        self._pinned_turn ^= 1
        host, done = ring[self._pinned_turn]
        done.synchronize()  # the copy from two frames ago: long finished, no wait in practice
        host.copy_(frames)
        out = host.to(self.device, non_blocking=True)
        done.record()
        return out

    def fit(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames of another size stretched to the engine's resolution on the device (the worker crops or
        letterboxes already; this covers callers that hand frames straight to the engine)."""
        width, height = self.resolution
        if frames.shape[1:3] == (height, width):
            return frames
        pixels = frames.permute(0, 3, 1, 2).float()
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    # --- NaN, a frame late ------------------------------------------------------------------------

    def _read_previous_nan(self) -> None:
        pending, self._nan_pending = self._nan_pending, None
        if pending is None:
            return
        flags, states = pending
        bad = [state for state, flag in zip(states, flags.tolist()) if flag]
        if bad:
            self.nan_frames += len(bad)
            log.warning("NaN in the output of %d session(s) (%s): their input was sent instead; their stream "
                        "buffers are refilled", len(bad), ", ".join(s.session_id for s in bad))
            for state in bad:
                state.data.pop(STREAM_KEY, None)


def _inference(frames: torch.Tensor) -> torch.Tensor:
    """``frames`` as an inference tensor, copied if made outside inference mode (in it: the copy is one).
    A graph guards its inputs' dispatch keys, which tell the two apart: the worker's frames are inference
    tensors, a caller's from outside would be a second graph of the same part."""
    return frames if frames.is_inference() else frames.clone()


_SCHEDULER_SERIALS = itertools.count(1)


def _carries_over(old: tuple, new: tuple) -> bool:
    """Two stream slots' keys (seed, schedule key, resolution, residual) whose frames in flight can go on
    (``CompiledEngine._reslot``): the same sampler over the same schedule, maybe cut at another strength
    (the schedule key's number of denoising steps: ``CompiledEngine.prepare``), maybe another seed, maybe
    with residual guidance turned on or off (a guidance fader crossing 1: the frames in flight take their
    noise as the residual, as a frame's first step does). A frame in flight keeps the noise it entered with,
    as it keeps its condition image; the next frame enters with the new seed's, so a new seed shows with the
    frame after it, as a new frame does, and never stalls. (A sampler that draws noise at each step, LCM or
    Euler a, draws a frame's remaining steps from the new seed.)"""
    return old[2] == new[2] and old[1][0] == new[1][0] and old[1][2:] == new[1][2:]


def _carried(held: torch.Tensor | None, rows: Sequence[int | None],
             stand_in: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """A new slot's rows: place j takes ``held``'s row ``rows[j]``, or ``stand_in(j)`` where it has none."""
    return torch.cat([held[row:row + 1] if held is not None and row is not None else stand_in(j)
                      for j, row in enumerate(rows)])


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``reference``'s memory format (the graphs guard their inputs' strides)."""
    if reference.is_contiguous() or not reference.is_contiguous(memory_format=torch.channels_last):
        return tensor.contiguous()
    return tensor.contiguous(memory_format=torch.channels_last)


def _pad_sessions(tensor: Any, sessions: int, padded: int) -> Any:
    """``tensor`` [sessions * k, ...] -> [padded * k, ...], its last session's k rows repeated, in its own
    memory format (a channels_last input stays channels_last: the graph guards its inputs' strides).
    None stays None."""
    if tensor is None or padded == sessions:
        return tensor
    rows = tensor.shape[0] // sessions
    out = torch.cat([tensor, *[tensor[-rows:]] * (padded - sessions)])
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _one_layout(latents: torch.Tensor) -> torch.Tensor:
    """``latents`` [B, C, h, w] with the strides a new channels_last tensor of its shape has, copied only
    where they differ. A graph guards every stride (a dimension of size 1's too), so latents that two
    paths laid out differently reach one graph rather than one each."""
    _, channels, height, width = latents.shape
    if latents.stride() == (channels * height * width, 1, width * channels, channels):
        return latents
    return latents.clone(memory_format=torch.channels_last)


def _added_kwargs(added: tuple[torch.Tensor, torch.Tensor] | None, batch: int) -> dict[str, torch.Tensor] | None:
    """SDXL's ``added_cond_kwargs`` for a call of ``batch`` rows per guidance half: each half's row repeated,
    uncond rows then cond rows, as the embeddings are laid out."""
    if added is None:
        return None
    text_embeds, time_ids = added
    return {"text_embeds": text_embeds.repeat_interleave(batch, dim=0),
            "time_ids": time_ids.repeat_interleave(batch, dim=0)}


def _carry_suffix(carry: Any) -> str:
    """A residual graph that carries LCM's noise (its inputs differ) apart from one that does not."""
    return "-carry" if carry is not None else ""


def _ip_suffix(ip: Any) -> str:
    """A graph's name with the IP-Adapter's inputs apart from one without: their inputs differ."""
    return "-ip" if ip is not None else ""


def _take(tensor: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """Rows ``indices`` of ``tensor`` (in that order): a slice where they run on, else a copy."""
    if list(indices) == list(range(indices[0], indices[0] + len(indices))):
        return tensor[indices[0]:indices[0] + len(indices)]
    return torch.cat([tensor[i:i + 1] for i in indices])


def _session_controls(controls: Sequence[ControlUnit], indices: Sequence[int]) -> list[ControlUnit]:
    """The units restricted to sessions ``indices`` of the batch (the warm start fills those)."""
    return [dataclasses.replace(unit, image=_take(unit.image, indices),
                                scale=_take(unit.scale, indices) if isinstance(unit.scale, torch.Tensor)
                                else unit.scale) for unit in controls]


def _prompt_rows(prompt: ImagePrompt | None, indices: Sequence[int]) -> ImagePrompt | None:
    """The IP-Adapter's prompt restricted to sessions ``indices`` of the batch (ImagePrompt.session for many)."""
    if prompt is None:
        return None
    return dataclasses.replace(prompt, tokens=_take(prompt.tokens, indices), scale=_take(prompt.scale, indices))


def _in_flight_conditions(controls: Sequence[ControlUnit], slots: Sequence[_StreamSlot],
                          steps: int) -> list[ControlUnit]:
    """Each unit with one condition image per stream row, [B * N, 3, H, W] session-major like the
    latents: the new frame's, then the ones the frames in flight entered with; the new frame's stands
    in where none is held (a slot just turned on, a buffer just filled)."""
    out = []
    for unit in controls:
        rows = []
        for i, slot in enumerate(slots):
            current = unit.image[i:i + 1]
            held = slot.conditions.get(unit.slot)
            if held is None or held.shape[1:] != current.shape[1:]:
                held = current.expand(steps - 1, -1, -1, -1)
            rows.append(torch.cat([current, held]))
        out.append(dataclasses.replace(unit, image=torch.cat(rows)))
    return out


def _held_conditions(controls: Sequence[ControlUnit], session: int, steps: int,
                     state: StreamState) -> dict[int, torch.Tensor]:
    """What session ``session`` (``state``) keeps of this call's rows for the next: the first N - 1 rows' images.

    Nothing is kept for a unit where this session had no condition image (the unit's scale is then a
    tensor, 0 for it; its image a stand-in zero one): its frames in flight then take the newest image
    instead. A batch-mate without one changes nothing for this session (QA 63 F1): the unit's scale is
    a tensor then too, so whether this session had its image is read from its own ``SLOT_IMAGES``."""
    images = state.data.get(SLOT_IMAGES) or {}
    return {unit.slot: unit.image[session * steps:(session + 1) * steps - 1] for unit in controls
            if not isinstance(unit.scale, torch.Tensor) or images.get(unit.slot) is not None}


def _quantize(image: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]; a frame holding a NaN becomes ``fallback``. -> (out, nan [B])"""
    nan = torch.isnan(image).flatten(1).any(dim=1)
    out = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return torch.where(nan.view(-1, 1, 1, 1), fallback, out).contiguous(), nan

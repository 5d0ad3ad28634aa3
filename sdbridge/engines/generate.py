"""One-shot generation as AUTOMATIC1111 does it: txt2img, img2img, inpainting, hires fix.

The live stream and these requests share one model on one device, so a request must never hold
the device for long: :meth:`Generation.run` is a generator that yields after every UNet step,
and the worker advances it between stream frames (see bridge/worker.py). A request never
touches the stream's scheduler or prompt state: it builds its own scheduler from the model's
config and keeps its own embeddings.

Seeds follow A1111 with its RNG source on the CPU (modules/rng.py ``ImageRNG``): image ``i`` of a
request gets ``seed + i`` (the same seed for every image when a variation seed blends in, so that a
batch is variations of one image) and ``subseed + i``. Its starting noise is drawn on the CPU from a
generator of that seed alone, blended with the subseed's noise by ``subseed_strength`` (A1111's
slerp), and with ``seed_resize_from_w/h`` drawn at that size and pasted centred. Ancestral samplers
draw their per-step noise from the same generator, after the starting noise, and on the CPU too:
an image does not depend on its batch position, nor on the device.

The positive prompt is A1111's composable prompt: ``a castle AND a dragon:0.7`` is two prompts whose
guidance adds up, ``uncond + cfg * sum(weight_i * (cond_i - uncond))`` (modules/prompt_parser.py
``get_multicond_learned_conditioning``, sd_samplers_cfg_denoiser.py ``combine_denoised``); every
part runs in the same UNet batch beside the negative prompt. A prompt without ``AND`` is one part of
weight 1, the plain guidance, unless it ends in ``:weight`` as A1111 reads it too.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from sdbridge.bridge import codec
from sdbridge.engines import a1111_timesteps, samplers
from sdbridge.engines.controlnet import RequestUnit, request_stack
from sdbridge.engines.prompt_encode import match_lengths
from sdbridge.engines.prompt_schedule import prompt_schedules, split_composable
from sdbridge.engines.prompt_syntax import MAX_WEIGHT, RE_EXTRA_NETWORK, extract_networks
from sdbridge.errors import ParamError, SdbridgeError

if TYPE_CHECKING:
    from sdbridge.engines.diffusion import DiffusionEngine

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
RESIZE_MODES = {0: "stretch", 1: "crop", 2: "fit", 3: "stretch"}  # A1111: just resize, crop, fill, latent
FILL_MODES = ("fill", "original", "latent noise", "latent nothing")
# The hires fix's upscalers -> (where it scales, F.interpolate mode, antialias). The latent modes are
# A1111's ``shared.latent_upscale_modes``; "None" is A1111's plain resize (Lanczos there, bicubic with
# antialias here: on the device, no trip through the CPU). No model upscaler (R-ESRGAN, ...) is shipped.
HIRES_UPSCALERS: dict[str, tuple[str, str, bool]] = {
    "Latent": ("latent", "bilinear", False),
    "Latent (antialiased)": ("latent", "bilinear", True),
    "Latent (bicubic)": ("latent", "bicubic", False),
    "Latent (bicubic antialiased)": ("latent", "bicubic", True),
    "Latent (nearest)": ("latent", "nearest", False),
    "Latent (nearest-exact)": ("latent", "nearest-exact", False),
    "None": ("pixel", "bicubic", True),
    "Lanczos": ("pixel", "bicubic", True),
    "Nearest": ("pixel", "nearest", False),
}
_UPSCALER_BY_NAME = {name.lower(): name for name in HIRES_UPSCALERS}


class GenerationError(SdbridgeError):
    code = "bad_request"


def hires_upscaler(name: str) -> str:
    """A client's hires upscaler name (any case) -> its name in HIRES_UPSCALERS; GenerationError
    naming the ones that exist otherwise."""
    found = _UPSCALER_BY_NAME.get(name.strip().lower())
    if found is None:
        raise GenerationError(f"unknown hr_upscaler {name!r} (known: {', '.join(HIRES_UPSCALERS)})",
                              code="unknown_upscaler")
    return found


@dataclass
class GenerationRequest:
    """A txt2img or img2img request in A1111's terms (already validated by the API layer)."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str = "Euler a"
    scheduler: str = "automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    # A1111's sigma churn options (Euler, Heun, DPM2) and noise scale (those and the ancestral and SDE samplers):
    # see samplers.A1111_OPTIONS for what each sampler takes here. s_tmax 0 is no limit, as in A1111.
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    s_noise: float = 1.0
    clip_skip: int | None = None  # text-encoder layers skipped (A1111's clip skip - 1); None: the live value
    seed_resize_from_w: int = 0   # > 0 with _h: the noise a seed gives at that size, pasted centred
    seed_resize_from_h: int = 0
    # img2img
    init_images: list[np.ndarray] = field(default_factory=list)  # RGB uint8, any size
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: np.ndarray | None = None         # uint8 [H, W]: white is repainted
    mask_blur: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    initial_noise_multiplier: float = 1.0  # img2img: the starting noise scaled (A1111's "Noise multiplier")
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    # A model upscaler for hr_upscaler (engines/upscalers.py), set by the API when the name is one: uint8 RGB
    # [H, W, 3] -> uint8 RGB at (width, height), or a generator returning that image (UpscalerCache.hires_steps), run
    # between stream frames. It takes the place of HIRES_UPSCALERS' resize.
    hr_model: Callable[[np.ndarray, int, int], Any] | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    # The second pass's own prompt, negative prompt, sampler and schedule (A1111's hr_*): empty or None, the first's.
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    # ControlNet units (engines/controlnet.py), conditions at width x height
    controlnet: list[RequestUnit] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what was asked and not done, for the API's info
    # An IP-Adapter unit (engines/ip_adapter.py's RequestImagePrompt): a style image beside the prompt.
    image_prompt: Any = None

    def warn(self, warning: str) -> None:
        """Add ``warning`` to the info's warnings, once: each pass of a request (a hires pass, a batch's images)
        meets the same things again."""
        if warning not in self.warnings:
            self.warnings.append(warning)

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    def resolve_seeds(self) -> tuple[list[int], list[int]]:
        """Every image's seed and subseed; -1 draws one at random, as A1111 does. With a variation
        seed blending in, every image keeps the seed and only the subseed steps (A1111's
        ``process_images_inner``): the batch is variations of one image."""
        count = self.batch_size * self.n_iter
        seed = self.seed if self.seed >= 0 else random.randrange(MAX_SEED)
        subseed = self.subseed if self.subseed >= 0 else random.randrange(MAX_SEED)
        self.seed, self.subseed = seed, subseed
        seed_step = 0 if self.subseed_strength > 0 else 1
        return ([(seed + i * seed_step) % (MAX_SEED + 1) for i in range(count)],
                [(subseed + i) % (MAX_SEED + 1) for i in range(count)])

    @property
    def seed_resize(self) -> tuple[int, int] | None:
        """(width, height) the noise is drawn at, or None."""
        if self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0:
            return self.seed_resize_from_w, self.seed_resize_from_h
        return None

    def hires_sampler(self) -> tuple[str, str]:
        """The second pass's (sampler, schedule): ``hr_sampler_name`` (A1111's combined "DPM++ 2M Karras" form
        too) with ``hr_scheduler``, or else the first pass's schedule where the sampler takes it."""
        if not self.hr_sampler_name:
            return self.sampler_name, self.hr_scheduler or self.scheduler
        if self.hr_scheduler:
            return self.hr_sampler_name, self.hr_scheduler
        try:
            sampler, schedule = samplers.resolve(self.hr_sampler_name, self.scheduler, a1111=True)
        except SdbridgeError:
            return self.hr_sampler_name, "automatic"  # as A1111's fix_p_invalid_sampler_and_scheduler
        if samplers.ignored_schedule(sampler, schedule) and sampler.spaced:
            # DDIM's and PLMS's own timesteps, as A1111's (they read no schedule): nothing to say for one not named.
            # LCM keeps the schedule, whose warning says it runs its own where A1111's would take it (QA 42 L3).
            return self.hr_sampler_name, "automatic"
        return self.hr_sampler_name, self.scheduler

    def hires_size(self) -> tuple[int, int]:
        """The hires pass's (width, height): the output's size."""
        return self.hires_plan()[0]

    def hires_plan(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((width, height) out, (width, height) the first pass is scaled to), as A1111's
        ``calculate_target_resolution``: ``hr_resize_x/y`` of another aspect ratio scale to cover the target,
        keeping the first pass's shape, and the excess is cropped from the middle (never stretched)."""
        if not (self.hr_resize_x or self.hr_resize_y):
            size = (round(self.width * self.hr_scale) // 8 * 8, round(self.height * self.hr_scale) // 8 * 8)
            return size, size
        if not self.hr_resize_y:
            target = _eight((self.hr_resize_x, self.hr_resize_x * self.height // self.width))
            return target, target
        if not self.hr_resize_x:
            target = _eight((self.hr_resize_y * self.width // self.height, self.hr_resize_y))
            return target, target
        if self.width / self.height < self.hr_resize_x / self.hr_resize_y:
            cover = (self.hr_resize_x, self.hr_resize_x * self.height // self.width)
        else:
            cover = (self.hr_resize_y * self.width // self.height, self.hr_resize_y)
        return _eight((self.hr_resize_x, self.hr_resize_y)), _eight(cover)


@dataclass
class Progress:
    """What ``/sdapi/v1/progress`` reports; written by the worker thread, read by the loop."""

    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False
    skipped: bool = False
    preview_wanted: bool = False
    preview: np.ndarray | None = None

    @property
    def fraction(self) -> float:
        if not self.job_count or not self.sampling_steps:
            return 0.0
        per_job = 1.0 / self.job_count
        return min(1.0, self.job_no * per_job + per_job * self.sampling_step / self.sampling_steps)


def slerp(weight: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's subseed blend (modules/rng.py ``slerp``) of two [C, H, W] noises: one spherical
    interpolation per channel and column (norms along H), and its near-parallel fallback as it is."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * weight + high * (1 - weight)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - weight) * omega) / so).unsqueeze(1) * low + (torch.sin(weight * omega) / so).unsqueeze(1) \
        * high


def _cpu_randn(shape: Sequence[int], seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator or torch.Generator("cpu").manual_seed(int(seed or 0)))


def image_rng(seed: int, subseed: int, subseed_strength: float, shape: Sequence[int],
              resize_from: tuple[int, int] | None = None, scale: int = 8) -> tuple[torch.Tensor, torch.Generator]:
    """One image's starting noise [C, h, w] (CPU, fp32: the same on every device) and the generator that
    drew it, whose next draws are the sampler's step noise (A1111's ``ImageRNG.first``, RNG source CPU).

    ``resize_from`` (width, height): the noise this seed gives at that size, pasted centred into the
    seed's noise at this size (cropped when larger), so that a composition survives a change of size.
    """
    shape = tuple(shape)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise_shape = shape if resize_from is None else (shape[0], resize_from[1] // scale, resize_from[0] // scale)
    noise = _cpu_randn(shape, generator=generator) if noise_shape == shape else _cpu_randn(noise_shape, seed)
    if subseed_strength > 0:
        noise = slerp(subseed_strength, noise, _cpu_randn(noise_shape, subseed))
    if noise_shape != shape:
        full = _cpu_randn(shape, generator=generator)
        dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx, ty = max(dx, 0), max(dy, 0)
        sx, sy = max(-dx, 0), max(-dy, 0)
        full[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
        noise = full
    return noise, generator


def image_noise(seed: int, subseed: int, subseed_strength: float, shape: Sequence[int],
                resize_from: tuple[int, int] | None = None) -> torch.Tensor:
    """One image's starting noise [C, h, w], on the CPU in fp32 (the same on every device)."""
    return image_rng(seed, subseed, subseed_strength, shape, resize_from)[0]


# A1111 sets no bound on a prompt's AND parts; here each is a UNet row per image per step, and its conditioning one
# more row of the step's batch (QA 72 F1: 4,500 empty parts in a 19 KB prompt took GBs before the UNet ran).
# Composable prompts in use (Latent Couple, Regional Prompter grids) have a handful of parts, rarely over 10:
# 64 is far above that, and a step there is already 65 UNet rows per image, 32 times a plain prompt's.
MAX_AND_PARTS = 64


@dataclass(frozen=True)
class PromptTexts:
    """One pass's prompts as A1111 schedules them: each AND part's ``[(end, text), ...]`` (prompt editing and
    alternation), the parts' weights, and the negative prompt's schedule (never split on AND)."""

    parts: tuple[list[tuple[int, str]], ...]
    weights: tuple[float, ...]
    negative: list[tuple[int, str]]

    def ends(self) -> list[int]:
        """The end steps of the pass's schedule entries: where any part or the negative prompt changes."""
        return sorted({end for entries in [*self.parts, self.negative] for end, _ in entries})

    def at(self, end: int) -> tuple[list[str], str]:
        """The parts' texts and the negative prompt's while the step counter is at ``end``."""
        return [_text_until(part, end) for part in self.parts], _text_until(self.negative, end)


def prompt_texts(prompt: str, negative_prompt: str, steps: int, hires_steps: int | None = None,
                 name: str = "prompt") -> PromptTexts:
    """The texts a pass encodes (what the A1111 API checks before a request queues, and the worker encodes).
    ``hires_steps``: the hires pass's schedule (``when`` counts on from the first pass). ``name``: the field
    the prompt came from, for errors. The prompt's LoRA tags come out first, as A1111 strips them before
    scheduling; a ParamError (``bad_param``) for too many AND parts or a part's weight out of range."""
    # A1111 takes the <lora:...> tags out first (parse_extra_network_prompts, before get_conds): a tag's ':'
    # inside a [from:to:when] or before an AND weight would break them (QA 24). Then it splits on AND before
    # it parses schedules, so a part's brackets never span an AND.
    prompt = extract_networks(prompt)[0]
    parts = split_composable(prompt)
    if len(parts) > MAX_AND_PARTS:
        raise ParamError(f"{name}: {len(parts)} AND parts, more than the {MAX_AND_PARTS} a prompt may have (each "
                         f"part is one more UNet row per image per step)", name=name, value=prompt[:80],
                         code="bad_param")
    for text, weight in parts:
        if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
            raise ParamError(f"{name}: the AND part {text.strip()[:40]!r} has weight {weight:g}, out of range: "
                             f"a part's weight must be within ±{MAX_WEIGHT:g}", name=name,
                             value=prompt[:80], code="bad_param")
    return PromptTexts(parts=tuple(prompt_schedules(text, steps, hires_steps) for text, _ in parts),
                       weights=tuple(weight for _, weight in parts),
                       negative=prompt_schedules(negative_prompt, steps, hires_steps))


_Encoded = tuple[torch.Tensor, torch.Tensor, Any]   # one (part, negative) pair's (cond, uncond, pooled)


@dataclass(frozen=True, eq=False)
class PromptStep:
    """The conditioning of the sampler's steps while its counter (from 0) is at most ``end``, after the
    previous entry's (A1111's ``end_at_step``: ``[a:b:0.5]`` at 10 steps is ``a`` for 6 steps, as there):
    prompt editing ``[from:to:when]`` and alternation ``[a|b]`` change it between steps.

    It holds each part's encodings as made, shared with every other step and part of the same texts; the
    step's batch (:meth:`batch`) is built only while the sampler is at it, as A1111's
    reconstruct_multicond_batch does: all steps' batches at once took steps x parts x 77k x D (QA 72 F1)."""

    end: int
    parts: tuple[_Encoded, ...]                         # each AND part's (cond [1, 77k, D], uncond, pooled)
    weights: tuple[float, ...] = (1.0,)                 # each part's weight
    empty: torch.Tensor | None = None                   # set: cond and uncond padded to one length with it

    @property
    def composed(self) -> bool:
        """Whether the parts change guidance (two or more, or a weight not 1): then even cfg 1 guides."""
        return self.weights != (1.0,)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(cond [parts, 77k, D], uncond [1, 77j, D] (j may differ from k), SDXL's pooled embeds (uncond [1, P],
        cond [parts, P]) or None): the parts in one batch."""
        conds = [cond for cond, _, _ in self.parts]
        longest = max(range(len(conds)), key=lambda i: conds[i].shape[1])
        length = conds[longest].shape[1]
        # A1111's reconstruct_multicond_batch: a shorter part repeats its last vector up to the longest.
        cond = torch.cat([torch.cat([c, c[:, -1:].expand(-1, length - c.shape[1], -1)], dim=1) for c in conds])
        # The same negative for every part; an empty one on SDXL is zeros shaped like its part's cond.
        uncond = self.parts[longest][1]
        if self.empty is not None and cond.shape[1] != uncond.shape[1]:
            cond, uncond = match_lengths(cond, uncond, self.empty)
        pooled = None
        if self.parts[0][2] is not None:
            pooled = (self.parts[longest][2][0], torch.cat([part_pooled[1] for _, _, part_pooled in self.parts]))
        return cond, uncond, pooled

    @staticmethod
    def at(schedule: Sequence[PromptStep], step: int) -> PromptStep:
        return next((entry for entry in schedule if step <= entry.end), schedule[-1])


@dataclass(frozen=True)
class _StepInputs:
    """One PromptStep's UNet inputs for a pass: the guided batch, or its two halves (uncond; the parts)."""

    embeddings: torch.Tensor | None      # [uncond; part 1; part 2 ...] rows, or cond alone unguided; None when apart
    halves: tuple[torch.Tensor, torch.Tensor]
    added: dict[str, torch.Tensor] | None
    added_halves: tuple[dict[str, Any], dict[str, Any]]
    separate: bool                       # prompts of different lengths: two UNet calls


class Generation:
    """One request, run step by step on the worker thread."""

    def __init__(self, engine: DiffusionEngine, request: GenerationRequest) -> None:
        if engine.parts is None:
            raise GenerationError("no diffusion model is loaded", code="no_model")
        self.engine = engine
        self.parts = engine.parts
        self.request = request
        self.seeds, self.subseeds = request.resolve_seeds()
        # A1111 counts a hires pass as a job of its own (job_count doubled): /progress ran backwards, from the first
        # pass's end to the second's start, and showed 1.0 half-way (QA 68 F9).
        self._passes = 2 if request.enable_hr and not request.is_img2img else 1
        self.progress = Progress(job_count=request.n_iter * self._passes)
        self.images: list[np.ndarray] = []
        self.used_seeds: list[int] = []
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")  # A1111's: when the job began, local time
        self.device = engine.device
        self.dtype = engine.dtype
        self.scale = engine.vae_scale_factor
        self._latents: torch.Tensor | None = None
        self.loras: dict[str, float] = {}
        self.padded_conds = False  # the shorter prompt padded to the longer (with ControlNet units)
        self._hires_prompts: list[PromptStep] | None = None
        # Each image's CPU generator, past its starting noise: the sampler's step noise comes next from it.
        self._generators: list[torch.Generator] = []
        # Made on the worker thread after a turn's prepare: the live value is the current one.
        self.clip_skip = request.clip_skip if request.clip_skip is not None else engine.clip_skip
        # Set by the worker while a live stream shares the device: guidance runs as two UNet calls
        # (uncond, then cond) with a yield between, so a stream frame never waits for more than
        # one single-batch UNet call (benchmarks/bench_api_share.py).
        self.split_guidance = False
        # Checked here so that a bad name fails before any work, with the name in the message.
        samplers.resolve(request.sampler_name, request.scheduler, a1111=True)
        if request.enable_hr and request.hr_model is None:
            hires_upscaler(request.hr_upscaler)
        if request.enable_hr:
            samplers.resolve(*request.hires_sampler(), a1111=True)

    # --- the request --------------------------------------------------------------------------

    def run(self) -> Iterator[None]:
        """Yields after every UNet step; ``images`` holds the results when it ends."""
        request = self.request
        # The prompt's <lora:...> tags: applied while encoding and around each UNet step, the
        # stream's weights back in between (the stream runs between this request's steps).
        self.loras = self.engine.prompt_loras(_network_tags(request.prompt))
        # ControlNet units take one batch, so the shorter prompt is padded to the longer (A1111's "Pad conds");
        # otherwise prompts of different lengths run as two UNet calls, as A1111 does by default.
        self.padded_conds = bool(request.controlnet)
        prompts = self._prompt_schedule()
        for batch_no in range(request.n_iter):
            if self.progress.interrupted:
                break
            self.progress.job_no = batch_no * self._passes
            self.progress.skipped = False
            first = batch_no * request.batch_size
            seeds = self.seeds[first:first + request.batch_size]
            subseeds = self.subseeds[first:first + request.batch_size]
            if request.is_img2img:
                images = yield from self._img2img_batch(seeds, subseeds, prompts, first)
            else:
                images = yield from self._txt2img_batch(seeds, subseeds, prompts)
            self.images.extend(images)
            self.used_seeds.extend(seeds[: len(images)])

    def request_preview(self) -> None:
        self.progress.preview_wanted = True

    def _prompt_schedule(self, hires_steps: int | None = None) -> list[PromptStep]:
        """The prompts' conditioning per step: the positive prompt's AND parts, then A1111's prompt editing
        and alternation on each part and on the negative prompt, each distinct pair encoded once.
        ``hires_steps``: the hires pass's schedule (``when`` counts on from the first pass). The prompt's LoRA
        tags hold for every step, as A1111 strips them before scheduling."""
        request = self.request
        prompt, negative_prompt, name = request.prompt, request.negative_prompt, "prompt"
        if hires_steps is not None:  # A1111: an empty hires prompt is the first pass's
            if request.hr_prompt:
                prompt, name = request.hr_prompt, "hr_prompt"
            negative_prompt = request.hr_negative_prompt or negative_prompt
        texts = prompt_texts(prompt, negative_prompt, request.steps, hires_steps, name)
        # ControlNet's "Pad conds": the shorter of cond and uncond padded with the empty prompt's chunks.
        empty = self.engine.encode_prompt_pair("", "", self.clip_skip, loras=self.loras)[0] \
            if self.padded_conds else None
        # Encodings by text: a schedule repeats most of its texts from step to step (and AND parts may repeat
        # each other), so memory goes with the distinct texts, not with steps x parts (QA 72 F1).
        encoded: dict[tuple[str, str], _Encoded] = {}
        schedule = []
        for end in texts.ends():
            positives, negative = texts.at(end)
            pairs = []
            for positive in positives:
                if (positive, negative) not in encoded:
                    encoded[positive, negative] = self.engine.encode_prompt_pair(positive, negative, self.clip_skip,
                                                                                 loras=self.loras)
                pairs.append(encoded[positive, negative])
            schedule.append(PromptStep(end, tuple(pairs), texts.weights, empty))
        return schedule

    # --- txt2img ------------------------------------------------------------------------------

    def _txt2img_batch(self, seeds: list[int], subseeds: list[int], prompts: list[PromptStep]) -> Iterator[None]:
        request = self.request
        noise = self._noise(seeds, subseeds, request.width, request.height)
        scheduler = self._scheduler(seeds)
        samplers.set_timesteps(scheduler, self._fit_steps(scheduler, request.steps), self.device)
        latents = noise * samplers.initial_noise_scale(scheduler)
        latents = yield from self._denoise(scheduler, scheduler.timesteps, latents, prompts, seeds)
        if request.enable_hr and not self.progress.interrupted:
            latents = yield from self._hires(latents, seeds, subseeds)
        return (yield from self._decode_each(latents))

    def _hires(self, latents: torch.Tensor, seeds: list[int], subseeds: list[int]) -> Iterator[None]:
        """Upscale the first pass, then an img2img pass at the new size (A1111's hires fix)."""
        request = self.request
        (width, height), (cover_width, cover_height) = request.hires_plan()
        if request.hr_model is not None:
            space, mode, antialias = "model", "", False
        else:
            space, mode, antialias = HIRES_UPSCALERS[hires_upscaler(request.hr_upscaler)]
        if space == "latent":
            init = F.interpolate(latents.float(), size=(cover_height // self.scale, cover_width // self.scale),
                                 mode=mode, antialias=antialias)
            init = init.to(self.dtype)
        elif space == "model":  # as A1111: the decoded image through the model, image by image, then encoded
            yield
            upscaled = []
            for image in self._to_uint8(self._decode(latents)):
                yield
                result = request.hr_model(image, cover_width, cover_height)
                if isinstance(result, Generator):  # yields before each tile and while an Extras upscale runs
                    result = yield from result     # (QA 68 F5, F6): the stream's frames run between
                upscaled.append(result)
            pixels = torch.from_numpy(np.stack(upscaled)).to(self.device).permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
            init = self._encode(pixels.to(self.dtype) / 127.5 - 1)
        else:
            yield
            pixels = self._decode(latents)
            pixels = F.interpolate(pixels.float(), size=(cover_height, cover_width), mode=mode, antialias=antialias)
            init = self._encode(pixels.clamp(0, 1).to(self.dtype) * 2 - 1)
        init = _crop_centre(init, height // self.scale, width // self.scale)
        steps = request.hr_second_pass_steps or request.steps
        noise = self._noise(seeds, subseeds, width, height)
        scheduler = self._scheduler(seeds, *request.hires_sampler())
        timesteps = self._img2img_timesteps(scheduler, steps, request.denoising_strength, fixed=True)
        start = scheduler.add_noise(init, noise, _noised_at(scheduler, timesteps).repeat(len(seeds)))
        # The hires prompt's own <lora:...> tags hold for this pass (A1111's hr_extra_network_data), the first
        # prompt's again for the next batch's first pass.
        first_loras = self.loras
        if request.hr_prompt:
            self.loras = self.engine.prompt_loras(_network_tags(request.hr_prompt))
        try:
            if self._hires_prompts is None:  # the same for every batch of the request
                self._hires_prompts = self._prompt_schedule(hires_steps=steps)
            self.progress.job_no += 1
            self.progress.sampling_step = 0
            return (yield from self._denoise(scheduler, timesteps, start, self._hires_prompts, seeds,
                                             sampler_name=request.hires_sampler()[0]))
        finally:
            self.loras = first_loras

    # --- img2img and inpainting ---------------------------------------------------------------

    def _img2img_batch(self, seeds: list[int], subseeds: list[int], prompts: list[PromptStep],
                       first: int) -> Iterator[None]:
        request = self.request
        width, height = request.width, request.height
        originals = [request.init_images[(first + i) % len(request.init_images)] for i in range(len(seeds))]
        mask = self._mask(width, height) if request.mask is not None else None
        crop = None
        if mask is not None and request.inpaint_full_res:
            crop = _mask_crop(mask, request.inpaint_full_res_padding, width, height)
        inits = []
        for original in originals:
            fitted = codec.fit(original, width, height, RESIZE_MODES.get(request.resize_mode, "stretch"))
            inits.append(fitted)
        work = inits
        work_mask = mask
        if crop is not None:
            work = [_crop_resize(image, crop, width, height) for image in inits]
            assert mask is not None
            work_mask = _crop_resize(mask, crop, width, height)
        if work_mask is not None and request.inpainting_fill == 0:
            work = [cv2.inpaint(image, (work_mask > 127).astype(np.uint8), 8, cv2.INPAINT_TELEA)
                    for image in work]
        pixels = torch.from_numpy(np.stack(work)).to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1
        yield
        init_latents = yield from self._encode_each(pixels)
        noise = self._noise(seeds, subseeds, width, height)
        latent_mask = None
        if work_mask is not None:
            small = cv2.resize(work_mask, (width // self.scale, height // self.scale), interpolation=cv2.INTER_AREA)
            latent_mask = torch.from_numpy(np.around(small / 255.0)).to(self.device, self.dtype)[None, None]
            if request.inpainting_fill == 2:
                init_latents = init_latents * (1 - latent_mask) + noise * latent_mask
            elif request.inpainting_fill == 3:
                init_latents = init_latents * (1 - latent_mask)
        scheduler = self._scheduler(seeds)
        timesteps = self._img2img_timesteps(scheduler, request.steps, request.denoising_strength)
        if request.initial_noise_multiplier != 1.0:
            noise = noise * request.initial_noise_multiplier
        latents = scheduler.add_noise(init_latents, noise, _noised_at(scheduler, timesteps).repeat(len(seeds)))
        keep = None
        if latent_mask is not None:
            keep = (init_latents, noise, latent_mask)
        latents = yield from self._denoise(scheduler, timesteps, latents, prompts, seeds, keep=keep)
        images = yield from self._decode_each(latents)
        if mask is None:
            return images
        out = []
        for image, original in zip(images, inits):
            if crop is not None:
                image = _uncrop(image, original, crop)
            out.append(_overlay(image, original, mask))
        return out

    def _mask(self, width: int, height: int) -> np.ndarray:
        """The blurred mask at the output size, white = repaint (latent mask and overlay both use it)."""
        request = self.request
        assert request.mask is not None
        mask = request.mask
        if request.inpainting_mask_invert:
            mask = 255 - mask
        mode = RESIZE_MODES.get(request.resize_mode, "stretch")
        mask = codec.fit(np.repeat(mask[..., None], 3, axis=2), width, height, mode)[..., 0]
        blurred = mask
        if request.mask_blur > 0:
            size = 2 * int(2.5 * request.mask_blur + 0.5) + 1
            blurred = cv2.GaussianBlur(mask, (size, size), request.mask_blur)
        return blurred

    # --- the shared loop ----------------------------------------------------------------------

    def _denoise(self, scheduler: Any, timesteps: torch.Tensor, latents: torch.Tensor, prompts: list[PromptStep],
                 seeds: list[int], keep: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 sampler_name: str | None = None) -> Iterator[None]:
        """The UNet steps with classifier-free guidance; yields after each one."""
        request = self.request
        unet = self.parts.unet
        batch = latents.shape[0]
        # Below 1 too: A1111 blends towards the negative prompt there. Weighted parts guide even at 1.
        guided = request.cfg_scale != 1.0 or prompts[0].composed
        weights = prompts[0].weights
        height, width = latents.shape[-2] * self.scale, latents.shape[-1] * self.scale
        current: PromptStep | None = None
        now: _StepInputs | None = None
        accepted = _step_params(scheduler)
        # CPU generators: diffusers draws on them and moves the noise to the device, as A1111 does with RNG on the CPU.
        generators = self._generators if len(self._generators) == batch else [
            torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        extra: dict[str, Any] = {"generator": generators} if "generator" in accepted else {}
        brownian = _brownian_noise(scheduler, latents.shape, seeds)
        extra.update(self._sampler_options(sampler_name or request.sampler_name, accepted, brownian is not None))
        # Steps as A1111 counts them: diffusers' second-order schedulers (Heun, DPM2, DPM2 a, DPM++ SDE) interleave
        # two UNet calls a step in their timesteps, and showed 15 steps of 8 (QA 46 F3).
        order = max(1, int(getattr(scheduler, "order", 1)))
        self.progress.sampling_steps = -(-len(timesteps) // order)
        controls = request_stack(request.controlnet, batch, height, width, self.device, self.dtype,
                                 guided, copies=1 + len(weights)) if request.controlnet else None
        for index, t in enumerate(timesteps):
            if self.progress.interrupted or self.progress.skipped:
                break
            # The step counter as A1111's prompt schedules count it (model calls from 0; img2img starts at 0 too).
            entry = PromptStep.at(prompts, index)
            if entry is not current:
                # One entry's UNet inputs at a time, the last one's dropped first: all of them at once were
                # steps x parts x batch rows of conditioning (QA 72 F1).
                now = None
                current, now = entry, self._step_inputs(entry, batch, height, width, guided)
            assert now is not None
            embeddings, halves, added, added_halves = now.embeddings, now.halves, now.added, now.added_halves
            added_both = {"added_cond_kwargs": added} if added else {}
            noise_uncond = None
            if guided and controls is None and (self.split_guidance or now.separate):
                # The uncond half now, the cond half after the stream's next turn. The request's
                # LoRA scope is left before the yield: the stream runs with its own weights.
                with torch.inference_mode(), self.engine.lora_scope(self.loras):
                    half_input = scheduler.scale_model_input(latents, t)
                    noise_uncond = unet(half_input, t, encoder_hidden_states=self._hidden(halves[0], batch, index,
                                                                                           len(timesteps)),
                                        return_dict=False, **added_halves[0])[0]
                if self.split_guidance:
                    yield
                if self.progress.interrupted or self.progress.skipped:
                    break
            with torch.inference_mode(), self.engine.lora_scope(self.loras):
                if noise_uncond is not None:
                    noise_conds = unet(torch.cat([half_input] * len(weights)), t,
                                       encoder_hidden_states=self._hidden(halves[1], 0, index, len(timesteps)),
                                       return_dict=False,
                                       **added_halves[1])[0].chunk(len(weights))
                else:
                    model_input = torch.cat([latents] * (1 + len(weights))) if guided else latents
                    model_input = scheduler.scale_model_input(model_input, t)
                    residuals = controls(model_input, t, embeddings, index, len(timesteps), added) \
                        if controls is not None else {}
                    noise_pred = unet(model_input, t, encoder_hidden_states=self._hidden(
                                          embeddings, batch if guided else 0, index, len(timesteps)),
                                      return_dict=False, **residuals, **added_both)[0]
                    if guided:
                        noise_uncond, *noise_conds = noise_pred.chunk(1 + len(weights))
                if guided:
                    # A1111's combine_denoised: each part's guidance, by its weight (one part of weight 1: plain CFG).
                    noise_pred = noise_uncond
                    for weight, noise_cond in zip(weights, noise_conds):
                        noise_pred = noise_pred + (request.cfg_scale * weight) * (noise_cond - noise_uncond)
                if brownian is not None:
                    extra["variance_noise"] = brownian(t) * request.s_noise
                latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
                if keep is not None:
                    init_latents, noise, mask = keep
                    known = init_latents
                    if index + 1 < len(timesteps):
                        known = scheduler.add_noise(init_latents, noise, timesteps[index + 1:index + 2].repeat(batch))
                    latents = known * (1 - mask) + latents * mask
            self._latents = latents
            self.progress.sampling_step = -(-(index + 1) // order)
            if self.progress.preview_wanted:
                self.progress.preview_wanted = False
                self.progress.preview = self._to_uint8(self._decode(latents, fast=True))[0]
            yield
        scale = samplers.final_latent_scale(scheduler)
        if scale != 1.0 and getattr(scheduler, "step_index", None) == len(scheduler.timesteps):  # a finished pass
            latents = latents * scale
            self._latents = latents
        return latents

    # --- pieces -------------------------------------------------------------------------------

    def _sampler_options(self, sampler_name: str, accepted: set[str], brownian: bool) -> dict[str, Any]:
        """The request's eta and churn options that this pass's scheduler step takes. One A1111 would pass to the
        sampler, at a value other than A1111's default, that the diffusers step cannot take goes into the request's
        warnings (QA 33 M4: they were dropped unsaid)."""
        request = self.request
        extra: dict[str, Any] = {}
        if request.eta is not None and "eta" in accepted:
            extra["eta"] = request.eta
        sampler = samplers.resolve(sampler_name)[0].name
        for name in samplers.A1111_OPTIONS.get(sampler, ()):
            value = getattr(request, name)
            if value is None or value == samplers.A1111_OPTION_DEFAULTS[name] or name in extra:
                continue
            if name in accepted:
                extra[name] = math.inf if name == "s_tmax" and value == 0 else value
            elif not (name == "s_noise" and brownian):  # the Brownian noise is scaled by it in _denoise
                request.warn(f"{name} {value:g} ignored: diffusers' {sampler} takes no {name} (A1111's default, "
                             f"{samplers.A1111_OPTION_DEFAULTS[name]:g}, ran)")
        if "s_churn" in extra and sampler == "Euler":
            # k-diffusion's sample_euler churns x before the model call and evaluates it at the raised sigma;
            # diffusers' step churns after it, with the model output at the old sigma (QA 33 oracle: 5.6 apart).
            request.warn(f"s_churn {request.s_churn:g} applied as diffusers' Euler does (noise added after the UNet "
                         f"call, where A1111 adds it before): not A1111's picture")
        return extra

    def _hidden(self, text: torch.Tensor, negative_rows: int, index: int, count: int) -> Any:
        """The UNet's encoder hidden states at step ``index`` of ``count``: the text, with the request's image
        prompt inside its guidance window (its first ``negative_rows`` rows are the guidance's uncond half)."""
        prompt = self.request.image_prompt
        return text if prompt is None or not prompt.keeps(index, count) else prompt.hidden(text, negative_rows)

    @staticmethod
    def _step_inputs(step: PromptStep, batch: int, height: int, width: int, guided: bool) -> _StepInputs:
        # Prompts of different lengths (one past 75 tokens) run as two UNet calls, as A1111 does by default
        # (pad_cond_uncond off): padding the shorter with the empty prompt would change the image.
        step_cond, step_uncond, pooled = step.batch()
        separate = guided and step_cond.shape[1] != step_uncond.shape[1]
        # Part by part, each part's rows for the whole batch: the order noise_pred.chunk takes apart.
        cond, uncond = step_cond.repeat_interleave(batch, dim=0), step_uncond.expand(batch, -1, -1)
        embeddings = cond if not guided else None if separate else torch.cat([uncond, cond])
        added = Generation._added_cond(pooled, batch, height, width, guided)
        added_halves: tuple[dict[str, Any], dict[str, Any]] = (
            {"added_cond_kwargs": {k: v[:batch] for k, v in added.items()}},
            {"added_cond_kwargs": {k: v[batch:] for k, v in added.items()}}) if added else ({}, {})
        return _StepInputs(embeddings, (uncond, cond), added, added_halves, separate)

    @staticmethod
    def _added_cond(pooled_pair: tuple[torch.Tensor, torch.Tensor] | None, batch: int, height: int, width: int,
                    guided: bool) -> dict[str, torch.Tensor] | None:
        """SDXL's added conditioning for a pass at ``width`` x ``height``: the pooled embeds, uncond rows
        first when guided, and the time ids (original size, crop top-left, target size) = (H, W, 0, 0, H, W),
        as A1111 and diffusers' SDXL pipelines make them with no crop. None for SD 1.x/2.x."""
        if pooled_pair is None:
            return None
        uncond, cond = pooled_pair
        cond = cond.repeat_interleave(batch, dim=0)
        pooled = torch.cat([uncond.expand(batch, -1), cond]) if guided else cond
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.repeat(pooled.shape[0], 1)}

    def _scheduler(self, seeds: list[int], sampler_name: str | None = None, schedule: str | None = None) -> Any:
        """A fresh scheduler for a pass: the request's sampler and schedule, or the hires pass's own."""
        request = self.request
        # A1111's schedules (its Automatic per sampler, sigmas over the whole table), not the live stream's spacing.
        sampler_name, schedule = sampler_name or request.sampler_name, schedule or request.scheduler
        scheduler = samplers.make_scheduler(self.engine.parts.scheduler.config, sampler_name, schedule, a1111=True,
                                           sdxl=self.parts.architecture == "sdxl")
        # A1111's timestep samplers read no schedule type; LCM runs its own here (QA 37 M1: these were a 422).
        warning = samplers.schedule_warning(sampler_name, schedule)
        if warning is not None:
            request.warn(warning)
        if type(scheduler).__name__ == "DPMSolverSDEScheduler":
            # A Brownian tree per image, each from its own seed (A1111's create_noise_sampler passes the batch's
            # seeds): an image does not depend on its batch position. The config keeps the first, a number.
            scheduler.register_to_config(noise_sampler_seed=seeds[0])
            scheduler.noise_sampler_seed = list(seeds)
        return scheduler

    def _img2img_timesteps(self, scheduler: Any, steps: int, strength: float, fixed: bool = False) -> torch.Tensor:
        """A1111's img2img steps (modules/sd_samplers_common.py ``setup_img2img_steps``, img2img_fix_steps off):
        ``t_enc = int(min(strength, 0.999) * steps)``, then the last ``t_enc + 1`` steps of a ``steps``-long
        schedule, from its sigma at ``steps - t_enc - 1``. ``fixed`` (the hires pass, which names its step count):
        exactly ``steps`` steps, the last of a schedule ``int(steps / min(strength, 0.999))`` long."""
        strength = min(strength, 0.999)
        steps = self._fit_steps(scheduler, steps)
        length, t_enc = steps, int(strength * steps)
        if fixed and strength > 0:  # A1111 would run a 0-step schedule at strength 0: this rule then
            length, t_enc = int(steps / strength), steps - 1
            # DDIM, LCM and TCD take only so many (QA 37: 30 hires steps at strength 0.02 answered 500): the steps
            # run over the longest schedule they take; a sigma schedule takes any length, as A1111's
            length = min(length, samplers.most_steps(scheduler) or length)
        if a1111_timesteps.installed(scheduler):  # DDIM, PLMS: from below the grid point the latent is noised at
            return a1111_timesteps.run(scheduler, length, top=t_enc, device=self.device)
        samplers.set_timesteps(scheduler, length, self.device)
        t_start = length - t_enc - 1
        if type(scheduler).__name__ == "LMSDiscreteScheduler":
            # k-diffusion's sample_lms counts its order from the first sigma it is given, A1111's img2img passes the
            # schedule from its start sigma; diffusers' LMS counts from the schedule's first (QA 33 M2: a first
            # img2img step of order 4 on one derivative, 0.17 from A1111). So it gets the schedule from there.
            scheduler.sigmas = scheduler.sigmas[t_start:]
            scheduler.timesteps = scheduler.timesteps[t_start:]
            t_start = 0
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        return scheduler.timesteps[t_start * scheduler.order:]

    def _fit_steps(self, scheduler: Any, steps: int) -> int:
        """``steps``, or the most ``scheduler`` runs (LCM's and TCD's original 50), said in the request's warnings:
        more answered 500 (QA 37)."""
        most = samplers.most_steps(scheduler)
        if most is None or steps <= most:
            return steps
        warning = f"{type(scheduler).__name__} runs at most {most} steps: {most} ran of the {steps} asked for"
        self.request.warn(warning)
        return most

    def _noise(self, seeds: list[int], subseeds: list[int], width: int, height: int) -> torch.Tensor:
        """The batch's starting noise at this pass's size; the generators that drew it serve the pass's steps."""
        shape = (self.parts.unet.config.in_channels, height // self.scale, width // self.scale)
        drawn = [image_rng(seed, subseed, self.request.subseed_strength, shape, self.request.seed_resize, self.scale)
                 for seed, subseed in zip(seeds, subseeds)]
        self._generators = [generator for _, generator in drawn]
        return torch.stack([noise for noise, _ in drawn]).to(self.device, self.dtype)

    def _encode_each(self, pixels: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """The batch's encode, image by image with a yield between, as the decode goes: a stream frame waits for
        one image's VAE encode at most, not the whole batch's (QA 68 F11: 7.2-7.6 s stream gaps at batch 8)."""
        latents = []
        for index in range(pixels.shape[0]):
            if index:
                yield
            latents.append(self._encode(pixels[index:index + 1]))
        return torch.cat(latents)

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.parts.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        return latents.to(self.dtype) * float(vae.config.scaling_factor)

    def _decode_each(self, latents: torch.Tensor) -> Iterator[None]:
        """The batch's final decode, image by image with a yield before each: a stream frame waits
        for one image's VAE decode at most, not the whole batch's. Returns uint8 [H, W, 3] images."""
        images: list[np.ndarray] = []
        for index in range(latents.shape[0]):
            yield
            images.extend(self._to_uint8(self._decode(latents[index:index + 1])))  # [1, 4, h, w]
        return images

    @torch.inference_mode()
    def _decode(self, latents: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """Latents -> [0, 1] pixels; ``fast`` uses TAESD when the model has it (progress previews)."""
        if fast and self.parts.taesd is not None:
            return self.engine.decode(latents)
        vae = self.parts.vae
        image = vae.decode(latents.to(vae.dtype) / float(vae.config.scaling_factor), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def _to_uint8(pixels: torch.Tensor) -> list[np.ndarray]:
        array = (pixels.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(array)


def _network_tags(prompt: str) -> str:
    """The prompt's ``<kind:...>`` tags alone, for their LoRA weights: its attention weights are checked on the
    texts its schedule encodes, not here on the whole, where a ``[from:to:when]`` reads as ``[...]`` and refused
    ``[(cat:150):dog:0]``, which encodes ``dog`` (QA 72 F9)."""
    end = prompt.rfind(">") + 1  # no tag ends past the last '>'
    return " ".join(match.group(0) for match in RE_EXTRA_NETWORK.finditer(prompt[:end]))


def _text_until(schedule: list[tuple[int, str]], end: int) -> str:
    """A prompt's text while the step counter is at ``end`` (its schedule's first entry that lasts that long)."""
    return next(text for last, text in schedule if end <= last)


def _eight(size: tuple[int, int]) -> tuple[int, int]:
    return size[0] // 8 * 8, size[1] // 8 * 8


def _crop_centre(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The middle ``height`` x ``width`` of [B, C, H, W] (A1111's hires truncation: the odd one off the end)."""
    top, left = (latents.shape[-2] - height) // 2, (latents.shape[-1] - width) // 2
    return latents[..., top:top + height, left:left + width]


def _brownian_noise(scheduler: Any, shape: Sequence[int],
                    seeds: list[int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """DPM++ 2M SDE's (and 2M SDE Heun's, 3M SDE's) step noise as A1111 draws it: from a Brownian tree per image,
    each from its own seed, over the pass's whole schedule (sd_samplers_kdiffusion.py ``create_noise_sampler``:
    BrownianTreeNoiseSampler(x, sigma_min > 0, sigma_max, seed=the batch's seeds)), noise(sigma, next sigma) at each
    step. diffusers would draw Gaussian noise from the generator (QA 33 H1). None for any other scheduler."""
    if type(scheduler).__name__ != "DPMSolverMultistepScheduler" or not str(
            scheduler.config.algorithm_type).startswith("sde"):
        return None
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    sigmas = scheduler.sigmas.float().cpu()
    # On the CPU in fp32, as A1111 with its RNG source on the CPU (it draws torchsde's noise with randn_local).
    tree = BrownianTreeNoiseSampler(torch.zeros(tuple(shape)), float(sigmas[sigmas > 0].min()), float(sigmas.max()),
                                    seed=list(seeds))

    def draw(t: torch.Tensor) -> torch.Tensor:
        index = scheduler.step_index
        if index is None:
            index = scheduler.begin_index if scheduler.begin_index is not None else scheduler.index_for_timestep(t)
        if float(sigmas[index + 1]) == 0:  # the last step adds no noise; k-diffusion draws none there
            return torch.zeros(tuple(shape))
        return tree(sigmas[index], sigmas[index + 1])

    return draw


def _noised_at(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """The timestep img2img noises its latent at: the run's first, but for A1111's DDIM and PLMS, which noise it at
    the grid point above their first step's (sd_samplers_timesteps.py ``sample_img2img``)."""
    if a1111_timesteps.installed(scheduler):
        return torch.tensor([scheduler.a1111_noise_at], device=timesteps.device)
    return timesteps[:1]


def _step_params(scheduler: Any) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def _mask_crop(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The mask's bounding box plus padding, grown to the output's aspect ratio (A1111's "only masked")."""
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return 0, 0, mask.shape[1], mask.shape[0]
    x1, y1 = max(0, xs.min() - padding), max(0, ys.min() - padding)
    x2, y2 = min(mask.shape[1], xs.max() + 1 + padding), min(mask.shape[0], ys.max() + 1 + padding)
    ratio = width / height
    box_w, box_h = x2 - x1, y2 - y1
    if box_w / box_h < ratio:
        grow = math.ceil(box_h * ratio) - box_w
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:
        grow = math.ceil(box_w / ratio) - box_h
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    # Shift back inside the image, then clip.
    if x1 < 0:
        x1, x2 = 0, x2 - x1
    if y1 < 0:
        y1, y2 = 0, y2 - y1
    x2, y2 = min(mask.shape[1], x2), min(mask.shape[0], y2)
    return int(x1), int(y1), int(x2), int(y2)


def _crop_resize(image: np.ndarray, crop: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    x1, y1, x2, y2 = crop
    return cv2.resize(image[y1:y2, x1:x2], (width, height), interpolation=cv2.INTER_LANCZOS4)


def _uncrop(image: np.ndarray, original: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = crop
    out = original.copy()
    out[y1:y2, x1:x2] = cv2.resize(image, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LANCZOS4)
    return out


def _overlay(image: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The generated image inside the (blurred) mask, the original outside it, as A1111 pastes it."""
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    return (image.astype(np.float32) * alpha + original.astype(np.float32) * (1 - alpha)).round().astype(np.uint8)

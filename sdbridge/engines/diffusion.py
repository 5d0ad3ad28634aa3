"""The diffusion engine: stream img2img (and txt2img) on diffusers models, eager PyTorch.

What makes a frame cheap here, following what real-time work has shown:

- 1–4 denoising steps, as turbo/LCM models need; timesteps chosen exactly as diffusers'
  img2img pipeline chooses them, so the output matches it (tests/unit/engines/test_diffusion.py);
- fixed noise per session and seed, made once and kept in the session's state, so a still input
  gives a still output and only real changes in the input move the image;
- prompt embeddings encoded once per prompt and cached (artists flip between a few prompts), in
  AUTOMATIC1111's syntax (prompt_encode.py); LoRAs from ``<lora:...>`` tags and the ``loras``
  parameter reweighted in place, textual inversions from the embeddings folder (conditioning.py);
- TAESD as the autoencoder when the model has one (``taesd/``), the full VAE otherwise;
- SDXL (and SDXL-turbo): two text encoders, and the UNet's added conditioning (pooled text embeds
  and size ids) made once in ``prepare`` as :attr:`DiffusionEngine._added_cond`, as diffusers'
  ``StableDiffusionXLImg2ImgPipeline`` makes it (tests/unit/engines/test_sdxl.py);
- pre- and post-processing on the device: uint8 in, uint8 out, no host sync inside the step.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sdbridge.engines import samplers
from sdbridge.engines.base import Engine, StreamState
from sdbridge.engines.conditioning import TextConditioning
from sdbridge.engines.models import LOAD_LOCK
from sdbridge.engines.parts import PipelineParts
from sdbridge.engines.prompt_encode import blend, extra_prompts, match_lengths, mix
from sdbridge.errors import ModelError, ParamError, quoted
from sdbridge.params import parse_schedule

if TYPE_CHECKING:
    from sdbridge.engines.controlnet import ControlNets
    from sdbridge.engines.ip_adapter import IPAdapters

log = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 8

Encoded = tuple[torch.Tensor, "torch.Tensor | None"]   # [1, 77*k, D] and SDXL's pooled [1, D_pool] (None: SD)


class DiffusionEngine(Engine):
    name = "diffusion"
    needs_model = True
    # Whether this engine runs SDXL (added conditioning in its UNet calls); a subclass whose step does
    # not pass _added_cond sets False, and an SDXL model is then refused at load, not at the first frame.
    supports_sdxl = True

    def __init__(self) -> None:
        super().__init__()
        self.allow_pickle = False
        self.taesd: str | None = None
        self.models_dir: str | None = None
        self.model_config: str | None = None
        self.vae: str | None = None   # --vae: a VAE in place of each model's own (engines/vae_file.py)
        self.parts: PipelineParts | None = None
        self._prompt_cache: collections.OrderedDict[tuple, Encoded] = collections.OrderedDict()
        self._embeddings: torch.Tensor | None = None   # [B_cfg, 77*k, D]: uncond+cond with guidance, else cond
        # SDXL's UNet (and ControlNet) extra input, rows as _embeddings: {"text_embeds": [B_cfg, D_pool],
        # "time_ids": [B_cfg, 6]}; None for SD 1.x/2.x. The compiled engine reads it: keep name and layout.
        self._added_cond: dict[str, torch.Tensor] | None = None
        self._time_ids: tuple[tuple, torch.Tensor] | None = None  # SDXL's, for one resolution
        self._sdxl = False
        # LoRAs and textual inversions (conditioning.py); the host sets the folders (None: <models_dir>/lora, ...).
        self.lora_dir: str | None = None
        self.embeddings_dir: str | None = None
        self.conditioning: TextConditioning | None = None
        self._told_unfit: set[str] = set()   # LoRAs left out of the stream whose clients were told
        self._told_unfit_embeddings: set[str] = set()   # likewise, embeddings of another family a prompt names
        self._guided = False
        self._guidance = 1.0
        self._txt2img = False
        self._seed = 0
        self._blend_seed = 0
        self._seed_blend = 0.0  # > 0: the noise slerps towards blend_seed's (a seed change can glide)
        self._step_generator_state: tuple[tuple, torch.Tensor] | None = None  # (seed, shape), after the entry draw
        self._num_inference_steps = 1
        self._strength = 0.5
        # The ``schedule`` parameter ((indices, N), None: steps × strength), its timesteps as picked from the
        # scheduler's N-step schedule, and the (spec, scheduler) they were picked for (_prepare_explicit).
        self._explicit: tuple[tuple[int, ...], int] | None = None
        self._explicit_timesteps: list[float] | None = None
        self._explicit_for: tuple[tuple[tuple[int, ...], int], Any] | None = None
        self.text_encoder_calls = 0
        self.last_nan: torch.Tensor | None = None      # a device flag, read a frame later: no host sync
        # ControlNet slots (engines/controlnet.py), made at the first prepare; the host sets the folder and notify.
        self.controlnet_dir: str | None = None
        self.notify: Callable[[dict[str, Any]], None] | None = None
        self.controlnets: ControlNets | None = None
        self.ip_adapters: IPAdapters | None = None   # engines/ip_adapter.py, made at the first prepare

    # --- loading --------------------------------------------------------------------------------

    def load(self, source: str | None, device: torch.device, dtype: torch.dtype) -> None:
        from pathlib import Path

        from sdbridge.engines.models import load_pipeline_parts

        if not source:
            raise ModelError("the diffusion engine needs a model: pass --model PATH or set the model parameter")
        super().load(source, device, dtype)
        # The lock over the adoption too: it builds modules (the textual inversions' token rows), and a ControlNet
        # loading meanwhile for the engine still serving patched module building for the whole process, so they
        # came out on the meta device (QA 29: a switch with a LoRA, ControlNet and IP-Adapter on failed 4 in 5).
        with LOAD_LOCK:
            parts = load_pipeline_parts(source, device, dtype, allow_pickle=self.allow_pickle,
                                        models_dir=Path(self.models_dir) if self.models_dir else None,
                                        taesd=self.taesd, config_dir=self.model_config, vae=self.vae)
            self._adopt(parts)

    @classmethod
    def from_parts(cls, parts: PipelineParts) -> DiffusionEngine:
        engine = cls()
        engine.device = parts.unet.device
        engine.dtype = parts.unet.dtype
        engine.source = parts.source
        engine._adopt(parts)
        return engine

    def _adopt(self, parts: PipelineParts) -> None:
        self._sdxl = parts.architecture == "sdxl"
        if self._sdxl and not self.supports_sdxl:
            raise ModelError(f"{parts.source}: SDXL models are not supported by the {self.name} engine yet "
                             f"(the diffusion engine runs them)")
        if self._sdxl and parts.text_encoder_2 is None:
            raise ModelError(f"{parts.source}: an SDXL model needs its second text encoder (text_encoder_2), "
                             f"and none was loaded")
        self.parts = parts
        self.scheduler = parts.scheduler   # the model's own, until a ``sampler`` parameter picks another
        self._sampler = "model"
        self.autoencoder = parts.taesd if parts.taesd is not None else parts.vae
        self.uses_taesd = parts.taesd is not None
        # SDXL's VAE overflows in fp16 (black or NaN frames); its config says force_upcast, and diffusers'
        # SDXL pipelines then run it in fp32, as we do. TAESDXL and the fp16-fix VAE need no upcast.
        if (self._sdxl and not self.uses_taesd and self.dtype == torch.float16
                and getattr(parts.vae.config, "force_upcast", False)):
            parts.vae.to(torch.float32)
        self.autoencoder_dtype = self.autoencoder.dtype
        self.vae_scale_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.autoencoder.config.scaling_factor)
        self._prompt_cache.clear()
        self.conditioning = self._make_conditioning(parts)

    def _make_conditioning(self, parts: PipelineParts) -> TextConditioning:
        """LoRA stack and textual inversions for this model; embeddings read from their folder now."""
        from sdbridge.engines.models import lora_folder, models_subfolder

        conditioning = TextConditioning(
            parts, lora_dir=lora_folder(self.models_dir, self.lora_dir),
            embeddings_dir=models_subfolder(self.models_dir, "embeddings", self.embeddings_dir),
            allow_pickle=self.allow_pickle)
        conditioning.load_embeddings()
        return conditioning

    @property
    def textual_inversions(self) -> Any:
        """The loaded embeddings (``a1111_listing()`` for /sdapi/v1/embeddings), None before a model."""
        return self.conditioning.inversions if self.conditioning is not None else None

    def _tell_unfit_loras(self) -> None:
        """Each LoRA left out of the stream (its file does not load for this model), told once while it stays out."""
        assert self.conditioning is not None
        unfit = self.conditioning.unfit
        for name, exc in unfit.items():
            if name in self._told_unfit:
                continue
            message = f"LoRA {quoted(name)} left out: {exc}; the stream goes on without it"
            log.error("%s", message)
            if self.notify is not None:
                self.notify({"type": "error", "code": exc.code, "message": message})
        self._told_unfit = set(unfit)

    def _tell_unfit_embeddings(self, texts: Sequence[str]) -> None:
        """Each embedding a prompt names that was made for another model family (skipped at load, as A1111 skips
        it): its name is plain text in the prompt now. Told once while a prompt names it, as a LoRA left out is; it
        was a log line alone, on a switch to SDXL, while the LoRA and ControlNet beside it were told (QA 47 F3)."""
        inversions = self.textual_inversions
        skipped = getattr(inversions, "skipped", None)
        named: set[str] = set()
        if skipped:
            text = " ".join(texts).lower()   # CLIP lowercases, and a trigger ignores case (textual_inversion.py)
            named = {name for name in skipped
                     if re.search(rf"(?<![\w-]){re.escape(name.lower())}(?![\w-])", text)}
        for name in sorted(named - self._told_unfit_embeddings):
            architecture = self.parts.architecture if self.parts is not None else "this"
            message = (f"embedding {quoted(name)} left out: it was made for another model family than this "
                       f"{architecture} model, so its name is plain text in the prompt")
            log.error("%s", message)
            if self.notify is not None:
                self.notify({"type": "error", "code": "embedding_mismatch", "message": message})
        self._told_unfit_embeddings = named

    def rescan_embeddings(self) -> list[str]:
        """Read new and changed files in the embeddings folder (between frames); returns their names."""
        assert self.conditioning is not None, "load() before rescan_embeddings()"
        with LOAD_LOCK:  # new token rows are modules built: not while another thread loads (models.LOAD_LOCK)
            return self.conditioning.load_embeddings()

    def close(self) -> None:
        self.parts = None
        self.controlnets = None
        self.ip_adapters = None
        self._prompt_cache.clear()
        self._embeddings = None
        self._added_cond = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.parts is not None:
            out.update(architecture=self.parts.architecture, vae="taesd" if self.uses_taesd else "vae",
                       scheduler=type(self.scheduler).__name__)
        if self.controlnets is not None:
            out["controlnet"] = self.controlnets.describe()
        if self.ip_adapters is not None:
            out["ip_adapter"] = self.ip_adapters.describe()
        return out

    # --- parameters -----------------------------------------------------------------------------

    def prepare(self, params: Mapping[str, Any]) -> None:
        super().prepare(params)
        width, height = self.resolution
        if width % self.vae_scale_factor or height % self.vae_scale_factor:
            raise ModelError(f"resolution {width}x{height} is not a multiple of {self.vae_scale_factor}")
        self._guidance = float(params["guidance"])
        self._guided = self._guidance > 1.0
        self._txt2img = params["mode"] == "txt2img"
        self._seed = int(params["seed"])
        self._blend_seed = int(params.get("blend_seed", 0))
        self._seed_blend = float(params.get("seed_blend", 0.0))
        self._num_inference_steps = int(params["steps"])
        self._strength = float(params["strength"])
        sampler = str(params.get("sampler", "model"))
        if sampler != self._sampler:
            # Built on the model's scheduler config (its timestep spacing, betas, prediction type).
            assert self.parts is not None
            self.scheduler = self.parts.scheduler if sampler == "model" else samplers.make_scheduler(
                self.parts.scheduler.config, sampler)
            self._sampler = sampler
        self._prepare_explicit(str(params.get("schedule", "")))
        if self.controlnets is None:
            self.controlnets = self._make_controlnets()
        self.controlnets.prepare(params)
        if self.ip_adapters is None:
            self.ip_adapters = self._make_ip_adapters()
        self.ip_adapters.prepare(params)
        # LoRAs first: one on the text encoder changes the embeddings. An unknown name raises
        # ParamError (code unknown_lora) before any weight moves; the worker tells the client.
        prompt = str(params["prompt"])
        assert self.conditioning is not None
        self.conditioning.apply(self.conditioning.wanted(prompt, str(params.get("loras", ""))), leave_out_unfit=True)
        self._tell_unfit_loras()
        texts = [prompt, str(params.get("negative_prompt", "")), str(params.get("blend_prompt", ""))]
        self._tell_unfit_embeddings(texts + [text for _, text, _ in extra_prompts(params)])
        self.conditioning.clip_skip = self.checked_clip_skip(int(params.get("clip_skip", 0)))
        # The prompt (lerped with blend_prompt by prompt_blend, as before the N-way mix), then, when prompt_2..4
        # take part, the mix of them all by weight (prompt_encode.mix). A prompt at weight 0 is not encoded; all at
        # 0: the prompt alone. Encodings are cached per text, so a weight moving every frame encodes nothing.
        others: list[tuple[Encoded, float]] = []
        for name, text, weight in extra_prompts(params):
            try:
                others.append((self._encode_prompt_pooled(text), weight))
            except ParamError as exc:  # a weight out of range in the text: named as this prompt's
                raise ParamError(f"{name}: {exc}", name=name, value=text[:80], code=exc.code) from exc
        prompt_weight = float(params.get("prompt_weight", 1.0))
        if prompt_weight > 0.0 or not others:
            cond, cond_pooled = self._encode_prompt_pooled(prompt)
            blend_weight = float(params.get("prompt_blend", 0.0))
            if blend_weight > 0.0 and params.get("blend_prompt"):
                other, other_pooled = self._encode_prompt_pooled(str(params["blend_prompt"]))
                cond = blend(cond, other, blend_weight, self._encode_prompt(""))
                if cond_pooled is not None and other_pooled is not None:
                    # As blend() does with the hidden states: past 1 the second prompt alone.
                    cond_pooled = other_pooled if blend_weight >= 1.0 else torch.lerp(cond_pooled, other_pooled,
                                                                                       blend_weight)
            others.insert(0, ((cond, cond_pooled), prompt_weight))
        if len(others) > 1:
            weights = [weight for _, weight in others]
            interpolation = str(params.get("prompt_interpolation", "linear"))
            cond = mix([hidden for (hidden, _), _ in others], weights, interpolation, self._encode_prompt(""))
            pooled_parts = [pooled for (_, pooled), _ in others]
            cond_pooled = None if pooled_parts[0] is None else mix(pooled_parts, weights, interpolation)
        else:
            cond, cond_pooled = others[0][0]
        pooled = cond_pooled
        if self._guided:
            uncond, uncond_pooled = self._negative(str(params["negative_prompt"]), cond, cond_pooled)
            cond, uncond = match_lengths(cond, uncond, self._encode_prompt(""))
            self._embeddings = torch.cat([uncond, cond])
            if cond_pooled is not None and uncond_pooled is not None:
                pooled = torch.cat([uncond_pooled, cond_pooled])
        else:
            self._embeddings = cond
        self._added_cond = self._make_added_cond(pooled) if self._sdxl else None

    def _negative(self, negative_prompt: str, cond: torch.Tensor,
                  cond_pooled: torch.Tensor | None) -> Encoded:
        """The unconditional embeddings: zeros for an empty negative prompt on a model whose
        ``force_zeros_for_empty_prompt`` holds (SDXL's default, as diffusers' SDXL pipelines), else encoded."""
        assert self.parts is not None
        if self._sdxl and cond_pooled is not None and not negative_prompt.strip() and self.parts.zero_empty_negative:
            return torch.zeros_like(cond), torch.zeros_like(cond_pooled)
        return self._encode_prompt_pooled(negative_prompt)

    def _make_added_cond(self, pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """SDXL's added conditioning for ``pooled`` [B_cfg, D_pool]: the pooled embeds and the time ids
        (original size, crop top-left, target size) = (H, W, 0, 0, H, W) at the engine's resolution, as
        diffusers' SDXL img2img ``_get_add_time_ids`` makes them without an aesthetic score."""
        assert pooled is not None, "SDXL encodings carry pooled embeds"
        width, height = self.resolution
        # Copied to the device once per resolution: prepare runs every frame under an LFO, and a copy from the
        # host waits (on CUDA) for the work queued before it.
        key = (height, width, self.dtype, str(self.device))
        if self._time_ids is None or self._time_ids[0] != key:
            self._time_ids = (key, torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype,
                                                device=self.device))
        return {"text_embeds": pooled, "time_ids": self._time_ids[1].repeat(pooled.shape[0], 1)}

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, 77 * k, D] text embeddings (A1111 syntax, chunks of 75 tokens), from the cache when
        this prompt was seen recently with the same text-encoder LoRAs and embeddings."""
        return self._encode_prompt_pooled(prompt)[0]

    @torch.inference_mode()
    def _encode_prompt_pooled(self, prompt: str) -> Encoded:
        """The text embeddings and SDXL's pooled embeds [1, D_pool] (None for SD 1.x/2.x), cached together."""
        assert self.parts is not None and self.conditioning is not None
        key = self.conditioning.cache_key(prompt)
        cached = self._prompt_cache.get(key)
        if cached is not None:
            self._prompt_cache.move_to_end(key)
            return cached
        embeddings, pooled = self.conditioning.encode_pooled(prompt, self.device)
        encoded = embeddings.to(self.dtype), pooled.to(self.dtype) if pooled is not None else None
        self.text_encoder_calls += 1
        self._prompt_cache[key] = encoded
        if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return encoded

    def unet_conditioning(self, prompt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """One prompt's UNet conditioning as the stream makes it: hidden states [1, L, D] and, for SDXL,
        the added conditioning (pooled embeds, time ids at the engine's resolution); None otherwise.
        For probes of the UNet (the fp8 gate), which must see what frames will give it."""
        hidden, pooled = self._encode_prompt_pooled(prompt)
        return hidden, self._make_added_cond(pooled) if self._sdxl else None

    def encode_prompt_pair(self, prompt: str, negative_prompt: str, clip_skip: int | None = None, pad: bool = False,
                           loras: Mapping[str, float] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(cond, uncond, pooled) for guidance (one-shot requests): embeddings [1, 77 * k, D], each as long as
        its own prompt (``pad``: the shorter padded with the empty prompt's chunks), and for SDXL the pooled
        embeds (uncond, cond), each [1, D_pool] (None otherwise).
        An empty negative prompt on SDXL is zeros, as the stream (and A1111, and diffusers) make it.

        The prompt's ``<lora:...>`` tags (or ``loras``, {name: weight}, when given: a scheduled prompt's
        text may lack the tags of the whole) apply while encoding; the weights are the stream's again
        afterwards (run the UNet inside :meth:`lora_scope` for the request's LoRAs). ``clip_skip``
        (layers skipped, as the live parameter counts) applies to this pair only; None: the live value.
        """
        assert self.conditioning is not None
        live_clip_skip = self.conditioning.clip_skip
        if clip_skip is not None:
            self.conditioning.clip_skip = self.checked_clip_skip(clip_skip)
        try:
            with self.lora_scope(self.prompt_loras(prompt) if loras is None else loras):
                cond, cond_pooled = self._encode_prompt_pooled(prompt)
                uncond, uncond_pooled = self._negative(negative_prompt, cond, cond_pooled)
                if pad:
                    cond, uncond = match_lengths(cond, uncond, self._encode_prompt(""))
        finally:
            self.conditioning.clip_skip = live_clip_skip
        pooled = (uncond_pooled, cond_pooled) if cond_pooled is not None and uncond_pooled is not None else None
        return cond, uncond, pooled

    def checked_clip_skip(self, clip_skip: int) -> int:
        """``clip_skip`` if this model's text encoder has the layers to skip, else ParamError naming it: past them
        the encoder's hidden states ran out, an IndexError on every frame (QA 20: clip_skip 4 on a 2-layer model)."""
        assert self.parts is not None
        layers = int(getattr(self.parts.text_encoder.config, "num_hidden_layers", 0) or 0)
        # SD reads the hidden state clip_skip layers before the last (of layers + 1, the embeddings first); SDXL one
        # further back.
        most = layers - (1 if self._sdxl else 0)
        if layers and not 0 <= clip_skip <= most:
            raise ParamError(f"clip_skip {clip_skip} is more than this model's text encoder has to skip: "
                             f"{layers} layers, so at most {most}", name="clip_skip", value=clip_skip)
        return clip_skip

    @property
    def clip_skip(self) -> int:
        """Text-encoder layers skipped now (the live ``clip_skip`` parameter, from the last prepare)."""
        assert self.conditioning is not None
        return self.conditioning.clip_skip

    def prompt_loras(self, prompt: str) -> dict[str, float]:
        """{name: weight} of a prompt's ``<lora:...>`` tags; ParamError for a malformed tag."""
        assert self.conditioning is not None
        return self.conditioning.wanted(prompt)

    @contextlib.contextmanager
    def lora_scope(self, weights: Mapping[str, float]) -> Iterator[None]:
        """Exactly these LoRA weights inside the block, the stream's after it (one-shot requests,
        which run between stream frames). Cheap when they are the same."""
        assert self.conditioning is not None
        with self.conditioning.scope(weights):
            yield

    def _denoising_steps(self) -> int:
        """How many of the schedule's steps a frame runs: in img2img ``int(steps × strength)``, as diffusers'
        ``get_timesteps`` (so strengths between two multiples of 1 / steps give the same timesteps), and never
        fewer than 1: below 1 / steps one step runs, at the noise level the strength asks for (see
        :meth:`_schedule_length`). With an explicit ``schedule``, its number of indices. (At strength 0 no step
        runs at all, :meth:`_passes_through`; this count is then what a subclass that denoises anyway takes.)"""
        if self._explicit is not None:
            return len(self._explicit[0])
        steps = self._num_inference_steps
        return steps if self._txt2img else max(1, min(int(steps * self._strength), steps))

    def _schedule_length(self) -> int:
        """How long the schedule is that a frame's timesteps are the tail of: ``steps``, except in img2img below
        1 / steps (``int(steps × strength)`` is 0, where diffusers runs no step and refuses): there the one step
        runs from the last timestep of the scheduler's own ``ceil(1 / strength)``-step schedule, the noise level
        that strength asks for. So steps 1 at strength 0.5 runs what steps 2 at strength 0.5 runs, and a lower
        strength a less noisy step: taking the last step of the ``steps``-long schedule made every strength the
        same frame at steps 1 (t = 999: img2img turned txt2img) and strength 0 the same as 0.5 at steps 2 (QA 88
        F2). At most the longest schedule the scheduler takes (``samplers.most_steps``), which strength 0 gets."""
        steps = self._num_inference_steps
        if self._txt2img or self._explicit is not None or int(steps * self._strength) >= 1:
            return steps
        most = samplers.most_steps(self.scheduler) or int(self.scheduler.config.num_train_timesteps)
        if self._strength <= 0.0:
            return max(most, steps)
        return max(min(math.ceil(1.0 / self._strength), most), steps)

    def _passes_through(self) -> bool:
        """Strength 0 in img2img (no explicit ``schedule``): the input frame is the output, as the parameter
        says ("0 keeps it"); no step, no autoencoder round trip (which would blur it), no latent plugin."""
        return not self._txt2img and self._explicit is None and self._strength <= 0.0

    def _kept(self, frames: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The frame a pass-through (:meth:`_passes_through`) leaves: the input as [B, 3, H, W] in [0, 1],
        which quantises back to the same bytes (v / 255 * 255 rounds to v, in fp16 too); black without an
        input frame (nothing to keep: as the compiled engine's NaN fallback)."""
        if frames is None:
            width, height = self.resolution
            return torch.zeros((batch, 3, height, width), device=self.device, dtype=self.dtype)
        return frames.permute(0, 3, 1, 2).to(self.device, self.dtype) / 255.0

    def _prepare_explicit(self, text: str) -> None:
        """Settle the ``schedule`` parameter (StreamDiffusion's ``t_index_list``): "32,45@50" picks timesteps
        32 and 45 of the scheduler's ``set_timesteps(50)``, once per spec and scheduler (a device-to-host read
        here, none per frame). ParamError for a bad spec, or a sampler whose ``set_timesteps`` takes no
        ``timesteps=`` (or refuses them: Karras sigmas); the engine then keeps what it had."""
        spec = parse_schedule(text)
        if spec is None:
            self._explicit = None
            return
        scheduler = self.scheduler
        if self._explicit_for is not None and self._explicit_for[0] == spec and self._explicit_for[1] is scheduler:
            self._explicit = spec
            return
        sampler = self._sampler if self._sampler != "model" else f"the model's ({type(scheduler).__name__})"
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ParamError(f"schedule {text!r} needs a sampler that takes explicit timesteps, and sampler "
                             f"{sampler} does not (Euler, LCM, TCD, Heun, DPM++ 2M, 2M SDE, 3M SDE do)",
                             name="schedule", value=text)
        indices, count = spec
        try:
            scheduler.set_timesteps(count, device=self.device)
            full = scheduler.timesteps[::scheduler.order]  # a second-order solver's schedule has its points twice
            if indices[-1] >= len(full):
                raise ValueError(f"its {count}-step schedule has {len(full)} timesteps")
            picked = full[list(indices)].tolist()
            # Once with its warnings (LCM's about timesteps off its distillation schedule); per frame quiet.
            scheduler.set_timesteps(timesteps=picked, device=self.device)
        except ValueError as exc:  # diffusers' own sentence, cut: it may run long
            raise ParamError(f"schedule {text!r} cannot run on sampler {sampler}: {str(exc)[:160]}", name="schedule",
                             value=text) from exc
        self._explicit, self._explicit_timesteps, self._explicit_for = spec, picked, (spec, scheduler)

    def _timesteps(self) -> tuple[torch.Tensor, int]:
        """This frame's timesteps, as diffusers' img2img ``get_timesteps`` picks them; with an explicit
        ``schedule``, the picked ones, set as diffusers' pipelines set a ``timesteps=`` argument
        (``retrieve_timesteps``), and all of them run (``get_timesteps`` at strength 1).

        The scheduler is reset every frame (its step index and, for multistep solvers, its
        history), which ``set_timesteps`` does; its cost is small next to one UNet call.
        """
        scheduler = self.scheduler
        if self._explicit is not None:
            with _quiet(type(scheduler).__module__):
                scheduler.set_timesteps(timesteps=self._explicit_timesteps, device=self.device)
            if not self._txt2img and hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            return scheduler.timesteps, 0
        steps = self._schedule_length()
        scheduler.set_timesteps(steps, device=self.device)
        if self._txt2img:
            return scheduler.timesteps, 0
        t_start = max(steps - self._denoising_steps(), 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        return timesteps, t_start

    # --- per-session noise --------------------------------------------------------------------------

    def _noise(self, state: StreamState, shape: tuple[int, ...]) -> torch.Tensor:
        """This session's fixed noise for the current seed and resolution, [1, 4, h, w]; with ``seed_blend``
        above 0, on its way to ``blend_seed``'s (:func:`blend_noise`)."""
        weight = self._seed_blend
        key = (self._seed, shape, self.device, self.dtype) + ((self._blend_seed, weight) if weight > 0 else ())
        cached = state.data.get("diffusion.noise")
        if cached is None or cached[0] != key:
            noise = seed_noise(self._seed, shape).clone()  # the cache's own tensor stays as drawn
            if weight > 0:
                noise = blend_noise(weight, noise, seed_noise(self._blend_seed, shape))
            noise = noise.to(self.device, self.dtype)
            state.data["diffusion.noise"] = (key, noise)
            return noise
        return cached[1]

    def _step_kwargs(self, states: Sequence[StreamState], shape: tuple[int, ...]) -> dict[str, Any]:
        """What ``scheduler.step`` takes to draw its noise: generators (:meth:`_step_generators`), or none
        for a scheduler whose step takes none (DPM++ SDE seeds its own Brownian tree: with the seed)."""
        scheduler = self.scheduler
        if _step_takes_generator(type(scheduler)):
            return {"generator": self._step_generators(states, shape)}
        if hasattr(scheduler, "noise_sampler_seed"):
            # A tree per session, each as it draws alone: one int seeded one tree for the whole batch, and a session
            # drew other noise second in a batch than alone, 0.54 apart (QA 63 F2: flicker as others come and go).
            scheduler.noise_sampler_seed = [self._seed] * len(states)
        return {}

    def _step_generators(self, states: Sequence[StreamState], shape: tuple[int, ...]) -> list[torch.Generator]:
        """For the samplers that draw noise at each step (Euler a, LCM): one generator per session, which
        draws as diffusers' pipelines draw from theirs, seeded with the seed: after the entry noise (see
        :meth:`_noise`, ``shape`` its shape), each step's noise in turn. Every frame draws alike (a
        stream does not flicker with fresh noise), and a frame equals diffusers' image for that seed."""
        key = (self._seed, shape)
        if self._step_generator_state is None or self._step_generator_state[0] != key:
            generator = torch.Generator(device="cpu").manual_seed(self._seed)
            torch.randn(shape, generator=generator, dtype=torch.float32)  # the entry noise's draw
            self._step_generator_state = (key, generator.get_state())
        generators = [torch.Generator(device="cpu") for _ in states]
        for generator in generators:
            generator.set_state(self._step_generator_state[1])
        return generators

    # --- the frame ------------------------------------------------------------------------------

    def step(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        image = self.step_float(frames, states)  # [B, 3, H, W] in [0, 1]
        # 6. Back to uint8 [B, H, W, 3] on the device; the NaN flag is read a frame later.
        self.last_nan = torch.isnan(image).any()
        return (image * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    @torch.inference_mode()
    def step_float(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        """The frame before quantisation: [B, 3, H, W] floats in [0, 1] (parity tests compare this)."""
        assert self.parts is not None and self._embeddings is not None, "prepare() before step()"
        unet = self.parts.unet
        batch = len(states)
        if self._passes_through():
            return self._kept(frames, batch)
        width, height = self.resolution
        latent_shape = (1, unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        timesteps, _ = self._timesteps()

        # 1.-2. uint8 [B, H, W, 3] -> [-1, 1] [B, 3, H, W] -> latents [B, 4, h, w]
        noise = torch.cat([self._noise(state, latent_shape) for state in states])
        if self._txt2img:
            latents = noise * self.scheduler.init_noise_sigma
        elif frames is None:
            # No input frame in img2img: a zero latent noised at t_0, as an input is. init_noise_sigma is the noise
            # of the schedule's first timestep only, ~9x too much at Euler's t_0 = 499 of 4 steps (QA 88 F1); the
            # compiled engine starts here (its noise_coef).
            latents = self.scheduler.add_noise(torch.zeros_like(noise), noise, timesteps[:1].repeat(batch))
        else:
            pixels = frames.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
            init_latents = self.encode(pixels)
            # 3. Noise at the first timestep of this frame.
            latents = self.scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(batch))

        # 4. Denoise: UNet + scheduler for each timestep, guidance batched with the frame.
        embeddings = self._for_batch(self._embeddings, batch)
        added: dict[str, torch.Tensor] | None = None
        unet_kwargs: dict[str, Any] = {}
        if self._added_cond is not None:   # SDXL: pooled text embeds and time ids, rows as the embeddings
            added = {name: self._for_batch(value, batch) for name, value in self._added_cond.items()}
            unet_kwargs["added_cond_kwargs"] = added
        step_kwargs = self._step_kwargs(states, latent_shape)
        controls = self.controlnets.for_batch(states, self._guided) if self.controlnets is not None else None
        # The style image's tokens and scale ride with the text to the cross-attention (engines/ip_adapter.py).
        image_prompt = self.ip_adapters.rows(states, self._guided) if self.ip_adapters is not None else None
        hidden = (embeddings, *image_prompt) if image_prompt is not None else embeddings
        for index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if self._guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            extra = controls(model_input, t, embeddings, index, len(timesteps), added) if controls is not None else {}
            noise_pred = unet(model_input, t, encoder_hidden_states=hidden, return_dict=False, **unet_kwargs,
                              **extra)[0]
            if self._guided:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + self._guidance * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]

        # 5. Latent plugins (feedback, feature banks), then decode.
        if self.latent_hook is not None:
            latents = self.latent_hook(latents, states)
        return self.decode(latents)

    def _for_batch(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """[B_cfg, ...] (uncond, cond rows with guidance) -> [B_cfg * batch, ...]: uncond rows, then cond rows."""
        if self._guided:
            uncond, cond = rows.chunk(2)
            return torch.cat([uncond.expand(batch, *uncond.shape[1:]), cond.expand(batch, *cond.shape[1:])])
        return rows.expand(batch, *rows.shape[1:])

    def _make_controlnets(self) -> ControlNets:
        from pathlib import Path

        from sdbridge.engines.controlnet import ControlNets

        assert self.parts is not None
        folder = Path(self.controlnet_dir).expanduser() if self.controlnet_dir else None
        return ControlNets(self.parts.unet, self.device, self.dtype, folder, allow_pickle=self.allow_pickle,
                           notify=self.notify)

    def _make_ip_adapters(self) -> IPAdapters:
        from sdbridge.engines.ip_adapter import IPAdapters
        from sdbridge.engines.models import models_subfolder

        assert self.parts is not None
        return IPAdapters(self.parts.unet, self.device, self.dtype, models_subfolder(self.models_dir, "ip_adapter"),
                          allow_pickle=self.allow_pickle, notify=self.notify)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> scaled latents; the distribution's mode, not a sample (deterministic)."""
        output = self.autoencoder.encode(pixels.to(self.autoencoder_dtype))
        if hasattr(output, "latents"):       # AutoencoderTiny
            latents = output.latents
        else:                                # AutoencoderKL
            latents = output.latent_dist.mode()
        return (latents * self.scaling_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [0, 1] pixels [B, 3, H, W]."""
        image = self.autoencoder.decode((latents / self.scaling_factor).to(self.autoencoder_dtype),
                                        return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).to(self.dtype)


@functools.lru_cache(maxsize=8)
def seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A seed's starting noise, as diffusers' pipelines draw it (float32, on the CPU: the same on every device).
    Cached: while a seed glides, each frame blends the same two."""
    return torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32)


def blend_noise(weight: float, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first`` at 0, ``second`` at 1, and between them a spherical mix: two independent noises are nearly
    orthogonal, so a straight mix half-way would have 0.71 of a noise's norm (a washed-out, blurred frame)."""
    if weight >= 1.0:
        return second
    a, b = first.flatten().double(), second.flatten().double()
    omega = torch.acos((a @ b / (a.norm() * b.norm())).clamp(-1.0, 1.0))
    if float(omega) < 1e-4:  # the same noise, or nearly
        return torch.lerp(first, second, weight)
    mixed = (torch.sin((1.0 - weight) * omega) * first.double() + torch.sin(weight * omega) * second.double())
    return (mixed / torch.sin(omega)).to(first.dtype)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_BELOW_ERROR = _BelowError()


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """A logger's warnings dropped inside the block: a custom schedule's ``set_timesteps`` runs every frame,
    and LCM's and TCD's warn at each call that it starts below timestep 999 (said once, at prepare)."""
    logger = logging.getLogger(logger_name)
    logger.addFilter(_BELOW_ERROR)
    try:
        yield
    finally:
        logger.removeFilter(_BELOW_ERROR)


@functools.lru_cache(maxsize=None)
def _step_takes_generator(scheduler_type: type) -> bool:
    """Whether a scheduler's ``step`` takes a generator (read once per class, not every frame)."""
    return "generator" in inspect.signature(scheduler_type.step).parameters

"""IP-Adapter: an image as a prompt. A style image (a painting, a poster, an album cover) steers the stream.

An IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter") adds to each
cross-attention layer of the UNet a second attention over a few tokens made from a CLIP image
embedding: ``out = attn(q, K_text, V_text) + scale · attn(q, W_k·ip, W_v·ip)``. The tokens come
from the image encoder (CLIPVisionModelWithProjection) through the adapter's projection: the plain
adapter projects the image embed into 4 tokens, the "plus" adapters resample the encoder's
penultimate hidden states into 16. Made once per style image and kept: a new image costs one
encoder pass, a frame with the same image costs the extra attention only.

Files (docs/ip-adapter.md): ``<models_dir>/ip_adapter/NAME.safetensors`` in the layout the
adapters are published in (``image_proj.*`` and ``ip_adapter.*``; ``.bin`` only with
``--allow-pickle``), and the image encoder as a transformers folder, ``NAME.image_encoder/``
beside it or the shared ``image_encoder/``.

The maths is diffusers' (``load_ip_adapter`` and ``IPAdapterAttnProcessor2_0``): the same
projection modules, the same attention, zeros as the negative image for the plain adapters and
the encoding of a black image's hidden states for the plus ones, the same scale on both guidance
halves (tests/unit/engines/test_ip_adapter.py checks the engine against the diffusers pipeline).
What differs is how the tokens reach the layers: our processor takes them, with a per-row scale,
in the UNet's ``encoder_hidden_states`` as ``(text, tokens, scale)``, so the UNet itself is left
as it is (no ``encoder_hid_proj`` installed, the one-shot API paths untouched), a row without a
style image has scale 0, and a scale moved by an LFO is a new tensor, not a new constant. Given the
text alone, the processor is the one it replaced, unchanged: with no style image the output is the
base output bit for bit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdbridge.engines.background_load import BackgroundLoads
from sdbridge.engines.base import CONDITIONS, LAST_OUTPUT, OUTPUT_CHANNEL
from sdbridge.engines.feature_bank import attention_in, attention_out
from sdbridge.engines.models import (known_add_on_models, list_add_on_models, load_weight_file, resolve_add_on_model,
                                     serialized_load)
from sdbridge.errors import ModelError, SdbridgeError

log = logging.getLogger(__name__)

#: Session-state keys: this frame's style image (uint8 [H, W, 3], set while conditioning), and the
#: tokens made from it: (image, (adapter name, its source), tokens [1, T, D]).
SOURCE = "ip_adapter.source"
TOKENS = "ip_adapter.tokens"
INSTALLED = "_sdbridge_ip_adapter"
Notify = Callable[[dict[str, Any]], None]


# --- loading ---------------------------------------------------------------------------------------


def list_ip_adapters(folder: Path | None) -> list[str]:
    """The adapter names clients may use: weight files in the folder (the image encoders are not adapters)."""
    return [name for name in list_add_on_models(folder) if not name.endswith("image_encoder")]


def resolve_ip_adapter(name: str, folder: Path | None) -> Path:
    """A client's name -> the adapter's file in ``folder``; ModelError (model_not_found) naming the adapters there."""
    name = name.strip()
    if not name.endswith("image_encoder"):
        try:
            return resolve_add_on_model(name, folder, what="ip_adapter", setting="models_dir")
        except ModelError as exc:
            if exc.code != "model_not_found" or folder is None:
                raise
    # The first names only, as for the other add-on models: the whole folder was listed into it (QA 53 F9)
    known = known_add_on_models(folder, skip=lambda entry: entry.endswith("image_encoder"))
    raise ModelError(f"ip_adapter {name!r} not found in {folder} (known: {known})", code="model_not_found")


def read_ip_adapter(path: Path, *, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} from a published adapter file: a flat safetensors file
    with those prefixes, or (``allow_pickle``) the .bin's nested dict."""
    flat = load_weight_file(path, "IP-Adapter", allow_pickle=allow_pickle)
    if all(isinstance(flat.get(part), dict) for part in ("image_proj", "ip_adapter")):  # the .bin's nesting
        return {part: dict(flat[part]) for part in ("image_proj", "ip_adapter")}
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts and rest:
            parts[prefix][rest] = value
    if not parts["image_proj"] or not parts["ip_adapter"]:
        raise ModelError(f"{path}: not an IP-Adapter (it needs image_proj.* and ip_adapter.* weights; "
                         f"found {', '.join(sorted(flat)[:4])}...)")
    return parts


def cross_attention_layers(unet: Any) -> list[str]:
    """The UNet's cross-attention layers in the order the adapter's ``ip_adapter.{1,3,5,...}`` weights follow
    (diffusers' ``_convert_ip_adapter_attn_to_diffusers``): every ``attn2`` outside motion modules."""
    return [name.removesuffix(".processor") for name in unet.attn_processors
            if not name.endswith("attn1.processor") and "motion_modules" not in name]


@dataclass
class IPAdapter:
    """One loaded adapter: the image encoder, the projection into tokens, and each cross-attention layer's
    key and value weights for them."""

    name: str
    encoder: Any            # CLIPVisionModelWithProjection
    processor: Any          # CLIPImageProcessor
    projection: nn.Module   # ImageProjection or IPAdapterPlusImageProjection (diffusers')
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]   # layer -> (to_k_ip, to_v_ip) weights
    hidden_states: bool     # the plus adapters read the encoder's penultimate hidden states
    source: tuple[Any, ...] = ()  # the file read, as file_identity gives it: what a name asked for is compared with
    _negative: torch.Tensor | None = None

    @torch.inference_mode()
    def tokens(self, image: np.ndarray, device: torch.device) -> torch.Tensor:
        """The style image (uint8 [H, W, 3]) as the adapter's tokens [1, T, D], as diffusers' pipelines make them."""
        # The layout said: left to guess, transformers reads a 1- or 3-pixel-high image channels-first (QA 86 F3).
        pixels = self.processor(images=image, return_tensors="pt", input_data_format="channels_last").pixel_values
        pixels = pixels.to(device, self.encoder.dtype)
        return self._project(pixels)

    @torch.inference_mode()
    def negative(self, device: torch.device) -> torch.Tensor:
        """The negative image's tokens [1, T, D] (the guidance's uncond half), made once: the projection of
        zeros for the plain adapters, of a black image's hidden states for the plus ones."""
        if self._negative is None:
            size = self.encoder.config.image_size
            zeros = torch.zeros((1, 3, size, size), device=device, dtype=self.encoder.dtype)
            self._negative = self._project(zeros, negative=True)
        return self._negative

    def _project(self, pixels: torch.Tensor, negative: bool = False) -> torch.Tensor:
        if self.hidden_states:
            embeds = self.encoder(pixels, output_hidden_states=True).hidden_states[-2]
        else:
            embeds = self.encoder(pixels).image_embeds
            if negative:
                embeds = torch.zeros_like(embeds)
        dtype = next(self.projection.parameters()).dtype
        tokens = self.projection(embeds.to(dtype))
        return tokens.reshape(1, -1, tokens.shape[-1])


def file_identity(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime in ns) of an adapter file: two names for one file (``style``,
    ``style.safetensors``) are one adapter, and a file written anew is another; ModelError when it cannot be read."""
    try:
        stat = path.stat()
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns
    except OSError as exc:
        raise ModelError(f"ip_adapter file {path}: {exc.strerror or exc}", code="model_not_found") from exc


def find_encoder(path: Path) -> Path:
    """The adapter's CLIP image encoder folder: ``NAME.image_encoder/`` beside it, else the shared
    ``image_encoder/``."""
    for candidate in (path.with_name(path.stem + ".image_encoder"), path.parent / "image_encoder"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelError(f"IP-Adapter {path.stem!r} needs its CLIP image encoder (a transformers folder with config.json "
                     f"and model.safetensors) at {path.parent / 'image_encoder'} or "
                     f"{path.with_name(path.stem + '.image_encoder')}", code="model_not_found")


@serialized_load
def load_ip_adapter(path: Path, unet: Any, device: torch.device, dtype: torch.dtype, *,
                    allow_pickle: bool = False) -> IPAdapter:
    """An adapter for ``unet``'s family, on ``device`` in ``dtype``; ModelError says what does not fit."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from sdbridge.engines.models import load_pretrained_folder

    source = file_identity(path)  # before reading: a file changed meanwhile differs from it, and loads again
    state = read_ip_adapter(path, allow_pickle=allow_pickle)
    encoder = load_pretrained_folder(find_encoder(path), CLIPVisionModelWithProjection, dtype, "IP-Adapter image "
                                     "encoder", device=device).eval()
    try:
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    except Exception as exc:
        raise ModelError(f"{path}: its image projection is not one this version reads ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from exc
    projection = projection.to(device, dtype).eval()
    from diffusers.models.embeddings import ImageProjection

    hidden_states = not isinstance(projection, ImageProjection)
    wanted = encoder.config.hidden_size if hidden_states else encoder.config.projection_dim
    proj_in = next((state["image_proj"][key] for key in ("proj.weight", "proj_in.weight", "proj.0.weight")
                    if key in state["image_proj"]), None)
    given = proj_in.shape[-1] if proj_in is not None else wanted
    if given != wanted:
        raise ModelError(f"{path}: the adapter takes image features of width {given}, and its image encoder gives "
                         f"{wanted}: pair it with the encoder it was trained with", code="model_mismatch")
    weights = {}
    for index, layer in enumerate(cross_attention_layers(unet)):
        attn = unet.get_submodule(layer)
        key_id = 2 * index + 1
        try:
            to_k = state["ip_adapter"][f"{key_id}.to_k_ip.weight"]
            to_v = state["ip_adapter"][f"{key_id}.to_v_ip.weight"]
        except KeyError:
            raise ModelError(f"{path}: no weights for cross-attention layer {index + 1} ({layer}): an IP-Adapter for "
                             f"another model family", code="model_mismatch") from None
        if to_k.shape != attn.to_k.weight.shape:
            raise ModelError(f"{path}: layer {layer} takes {tuple(attn.to_k.weight.shape)} and the adapter has "
                             f"{tuple(to_k.shape)}: an IP-Adapter for another model family", code="model_mismatch")
        weights[layer] = (to_k.to(device, dtype), to_v.to(device, dtype))
    log.info("ip_adapter %s: %s, %d layers, encoder %s", path.stem, type(projection).__name__, len(weights),
             type(encoder).__name__)
    processor = CLIPImageProcessor(size={"shortest_edge": encoder.config.image_size},
                                   crop_size={"height": encoder.config.image_size,
                                              "width": encoder.config.image_size})
    return IPAdapter(path.stem, encoder, processor, projection, weights, hidden_states, source)


# --- the attention -------------------------------------------------------------------------------------------


class IPAttnProcessor:
    """A cross-attention layer's processor with the image prompt added. Given ``(text, tokens, scale)`` as the
    encoder hidden states (tokens [B, T, D], scale [B, 1, 1]) it attends to both with the stream's adapter, as
    diffusers' IPAdapterAttnProcessor2_0; ``(text, tokens, scale, adapter)`` with that adapter (a one-shot
    request's); given the text alone it is ``inner``, the processor it replaced."""

    def __init__(self, inner: Any, layer: str, holder: AdapterHolder) -> None:
        self.inner = inner
        self.layer = layer
        self.holder = holder

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 bank_feed: Any = None, **kwargs: Any) -> torch.Tensor:
        if bank_feed is not None:
            kwargs["bank_feed"] = bank_feed
        if not isinstance(encoder_hidden_states, tuple):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        text, tokens, scale, *request = encoder_hidden_states
        adapter = request[0] if request else self.holder.adapter  # a one-shot request's own, or the stream's
        weights = adapter.weights[self.layer] if adapter is not None else None
        if weights is None:
            return self.inner(attn, hidden_states, text, attention_mask, temb, *args, **kwargs)
        hidden_states, residual = attention_in(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key, value = attn.to_k(text), attn.to_v(text)
        head_dim = key.shape[-1] // attn.heads

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        out = F.scaled_dot_product_attention(query, heads(key), heads(value), attn_mask=attention_mask,
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        to_k_ip, to_v_ip = weights
        image = F.scaled_dot_product_attention(query, heads(F.linear(tokens, to_k_ip)),
                                               heads(F.linear(tokens, to_v_ip)), attn_mask=None, dropout_p=0.0,
                                               is_causal=False)
        image = image.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attention_out(attn, out + scale.to(out.dtype) * image, residual)


class AdapterHolder:
    """What the installed processors read: the adapter serving now (None: they pass the text on)."""

    def __init__(self) -> None:
        self.adapter: IPAdapter | None = None


def install(unet: Any, holder: AdapterHolder) -> None:
    """Our processor into each cross-attention layer, around the one there (kept inside it); again if a feature
    bank's attach or detach put back processors from before (cheap when they are in place)."""
    unet = getattr(unet, "_orig_mod", unet)
    for layer in cross_attention_layers(unet):
        attn = unet.get_submodule(layer)
        current = attn.processor
        ours = current if isinstance(current, IPAttnProcessor) else getattr(current, "inner", None)
        if isinstance(ours, IPAttnProcessor):
            ours.holder = holder  # the engine's, where a one-shot request installed them first
            continue
        attn.set_processor(IPAttnProcessor(current, layer, holder))
    setattr(unet, INSTALLED, holder)


# --- live use ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePrompt:
    """One batch's image prompt, per session: tokens [B, T, D] (the negative's for a session without a style
    image), the negative image's tokens [1, T, D] (the guidance's uncond rows), scale [B, 1, 1] (0 for a session
    without one); ``present``: whether any session has one."""

    tokens: torch.Tensor
    negative: torch.Tensor
    scale: torch.Tensor
    present: bool

    def session(self, index: int) -> ImagePrompt:
        return ImagePrompt(self.tokens[index:index + 1], self.negative, self.scale[index:index + 1], self.present)


@dataclass(frozen=True)
class Setting:
    model: str = ""
    scale: float = 0.6
    channel: int = 1

    @property
    def active(self) -> bool:
        return bool(self.model) and self.scale > 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Setting:
        return cls(str(params.get("ip_adapter", "")).strip(), float(params.get("ip_adapter_scale", 0.6)),
                   int(params.get("ip_adapter_channel", 1)))


class IPAdapters:
    """The engine's live IP-Adapter: parameters, the adapter loaded in the background (the one serving keeps
    serving meanwhile, and when the new one fails), each session's style tokens, and the batch's rows.

    As :class:`~sdbridge.engines.controlnet.ControlNets`: the worker thread calls :meth:`prepare`,
    :meth:`condition` (per session) and, inside the engine step, :meth:`rows`."""

    def __init__(self, unet: Any, device: torch.device, dtype: torch.dtype, folder: Path | None, *,
                 allow_pickle: bool = False, notify: Notify | None = None) -> None:
        self.unet = unet
        self.device = device
        self.dtype = dtype
        self.folder = folder
        self.allow_pickle = allow_pickle
        self.notify = notify or (lambda event: None)
        self.setting = Setting()
        self.holder = AdapterHolder()
        self.failed: dict[str, str] = {}  # name -> why it did not load; written by the worker thread only
        self.encodes = 0
        self._spare: IPAdapter | None = None
        self._wanted: tuple[Any, ...] | None = None  # file_identity of the name asked for (None: it resolves to none)
        self.loader: BackgroundLoads[IPAdapter] = BackgroundLoads(
            "ip_adapter", self.load_now, notify=self.notify, keeps=self._what_serves)
        self._masks: dict[tuple[bool, ...], torch.Tensor] = {}

    @property
    def serving(self) -> IPAdapter | None:
        return self.holder.adapter

    def prepare(self, params: Mapping[str, Any]) -> None:
        self.setting = Setting.from_params(params)
        name = self.setting.model
        self.failed = {key: why for key, why in self.failed.items() if key == name}
        self.refresh()
        self._load_asked()

    def _load_asked(self) -> None:
        """Start loading the adapter asked for unless it serves (the same file, by whatever name: QA 86 F4, a name
        with its suffix loaded again at every prepare), it failed, or a load runs. One load at a time; when that one
        is taken, :meth:`refresh` comes back here, so the name asked for last loads even when no prepare follows,
        and names asked for in between never load (QA 86 F5: the newest was never loaded)."""
        name = self.setting.model
        # A failed name is not resolved again: the folder listing of a missing one would run at every prepare.
        self._wanted = self._identity(name) if name and name not in self.failed else None
        if not name or name in self.failed or self.loader.loading:
            return
        serving = self.holder.adapter
        if serving is not None and self._wanted is not None and serving.source == self._wanted:
            return
        self.loader.start([name])

    def _identity(self, name: str) -> tuple[Any, ...] | None:
        """The file ``name`` resolves to, as an adapter's ``source``; None when none (its load says why)."""
        try:
            return file_identity(resolve_ip_adapter(name, self.folder))
        except SdbridgeError:
            return None

    def refresh(self) -> None:
        """Take a finished load: the new adapter serves from this frame on (a failed one: told, not retried); then
        the adapter asked for meanwhile starts loading."""
        taken = self.loader.take()
        self.failed.update(taken.failed)
        if taken.ready:
            install(self.unet, self.holder)
            self.holder.adapter = list(taken.ready.values())[-1]
        if taken.ready or taken.failed:
            self._load_asked()

    def wait(self, timeout_s: float = 60.0) -> None:
        """Until no load is running, the one asked for last included, and take them (tests, one-shot requests)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.loader.wait(max(0.0, deadline - time.monotonic()))
            self.refresh()
            if not self.loader.loading or time.monotonic() >= deadline:
                return

    def load_now(self, name: str) -> IPAdapter:
        """The adapter ``name``, loaded on the calling thread unless it (its file, unchanged) is loaded already
        (one-shot requests)."""
        path = resolve_ip_adapter(name, self.folder)
        source = file_identity(path)
        for loaded in (self.holder.adapter, self._spare):
            if loaded is not None and loaded.source == source:
                return loaded
        adapter = load_ip_adapter(path, self.unet, self.device, self.dtype, allow_pickle=self.allow_pickle)
        self._spare = adapter  # a client sends the same unit again and again: the last one loaded is kept
        return adapter

    # --- condition images (CPU pool, per session) ---

    def channels(self) -> frozenset[int]:
        """The condition channel (> 0) the style image comes from while the adapter acts."""
        setting = self.setting
        return frozenset({setting.channel}) if setting.active and setting.channel > 0 else frozenset()

    def condition(self, data: dict[str, Any], image: np.ndarray | None) -> None:
        """This frame's style image: the input frame (channel 0), the session's last output (-1) or the latest
        frame of its channel; none while the adapter is off or its channel has sent nothing."""
        setting = self.setting
        if not setting.active:
            data.pop(SOURCE, None)
            return
        channel = setting.channel
        source = (image if channel == 0 else data.get(LAST_OUTPUT) if channel == OUTPUT_CHANNEL
                  else data.get(CONDITIONS, {}).get(channel))
        if source is None:
            data.pop(SOURCE, None)
        else:
            data[SOURCE] = source

    # --- the batch (engine step) ---

    def acts(self, states: Sequence[Any]) -> bool:
        """Whether the adapter acts on one of these sessions' next frame (it serves, and one has a style image)."""
        self.refresh()
        adapter = self.holder.adapter
        return (adapter is not None and self.setting.active and self._asked(adapter)
                and any(SOURCE in state.data for state in states))

    def _asked(self, adapter: Any) -> bool:
        """Whether ``adapter`` serves for what is asked: it is the one named, or the one named is loading or failed
        to load and this one serves on, as docs/ip-adapter.md says (QA 29: it stopped steering, /health naming
        it)."""
        wanted = self._wanted
        return wanted is None or adapter.source == wanted or wanted not in self._loaded_sources()

    def _loaded_sources(self) -> set[tuple[Any, ...]]:
        return {loaded.source for loaded in (self.holder.adapter, self._spare) if loaded is not None}

    def prompts(self, states: Sequence[Any]) -> ImagePrompt | None:
        """Each session's tokens and scale for this batch, or None when no adapter acts (none serves, it is off,
        or the one asked for is loaded and not yet serving). A session without a style
        image has the negative tokens at scale 0. A session's tokens are made again only for a new image."""
        self.refresh()
        adapter = self.holder.adapter
        if adapter is None or not self.setting.active or not self._asked(adapter):
            return None
        install(self.unet, self.holder)  # a feature bank attached or detached since may have put back the old ones
        negative = adapter.negative(self.device)
        tokens = [self._session_tokens(adapter, state.data) for state in states]
        present = tuple(item is not None for item in tokens)
        return ImagePrompt(torch.cat([item if item is not None else negative for item in tokens]), negative,
                           self._scale(self.setting.scale, present), any(present))

    def rows(self, states: Sequence[Any], guided: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens, scale) for one eager UNet call over these sessions, rows laid out as the engine's embeddings
        (uncond rows then cond rows with guidance): tokens [B_cfg·B, T, D], scale [B_cfg·B, 1, 1]. None when no
        session has a style image: the UNet then runs as it would without the adapter, bit for bit."""
        prompt = self.prompts(states) if self.acts(states) else None
        if prompt is None:
            return None
        if guided:
            return torch.cat([prompt.negative.expand_as(prompt.tokens), prompt.tokens]), prompt.scale.repeat(2, 1, 1)
        return prompt.tokens, prompt.scale

    def _session_tokens(self, adapter: IPAdapter, data: dict[str, Any]) -> torch.Tensor | None:
        source = data.get(SOURCE)
        if source is None:
            return None
        # Only a condition channel's frame is kept by identity: the input frame is new at every frame, and the last
        # output (channel -1) may be a buffer a plugin fills in place, so its style never changed (QA 86 F7).
        keep = self.setting.channel > 0
        made_by = (adapter.name, adapter.source)  # not the adapter itself: the state would hold a replaced one
        cached = data.get(TOKENS)
        if keep and cached is not None and cached[0] is source and cached[1] == made_by:
            return cached[2]
        tokens = adapter.tokens(source, self.device)
        self.encodes += 1
        if keep:
            data[TOKENS] = (source, made_by, tokens)
        else:
            data.pop(TOKENS, None)
        return tokens

    def _scale(self, scale: float, present: tuple[bool, ...]) -> torch.Tensor:
        """[B, 1, 1]: the scale for a session with a style image, 0 without. The pattern is copied to the device
        once; the scale multiplies it there, so a scale moved every frame (an LFO) is no copy from the host."""
        mask = self._masks.get(present)
        if mask is None:
            if len(self._masks) > 64:
                self._masks.clear()
            mask = torch.tensor(present, dtype=self.dtype, device=self.device)[:, None, None]
            self._masks[present] = mask
        return mask * scale

    def _what_serves(self, name: str) -> str:
        """The end of a failed load's sentence: on a new engine (a model switch) no adapter served before."""
        serving = self.holder.adapter
        return (f"the IP-Adapter serving before ({serving.name}) serves on" if serving is not None
                else "the stream runs without an IP-Adapter")

    def describe(self) -> dict[str, Any]:
        """For /health and /stats (any thread)."""
        pending = self.loader.snapshot()
        loading = next(iter(self.loader.loading), None)
        # A finished load serves from the next frame on.
        serving = list(pending.ready.values())[-1] if pending.ready else self.holder.adapter
        if not self.setting.model:
            serving = None  # off: kept loaded for a quick way back, but nothing is served
        return {"model": self.setting.model, "serving": serving.name if serving is not None else None,
                "scale": self.setting.scale, "channel": self.setting.channel, "loading": loading,
                "failed": {**self.failed, **pending.failed}, "encodes": self.encodes}


# --- one-shot requests (the A1111 API's IP-Adapter units) ----------------------------------------------------


@dataclass(frozen=True)
class RequestImagePrompt:
    """A request's image prompt: its adapter (not necessarily the stream's), the image's tokens and the negative
    image's [1, T, D], the unit's weight and its guidance window (fractions of the steps, as a ControlNet
    unit's), and its names for the infotext."""

    adapter: IPAdapter
    tokens: torch.Tensor
    negative: torch.Tensor
    scale: float
    start: float = 0.0
    end: float = 1.0
    name: str = ""
    module: str = ""

    @classmethod
    def make(cls, adapter: IPAdapter, image: np.ndarray, scale: float, device: torch.device,
             **unit: Any) -> RequestImagePrompt:
        return cls(adapter, adapter.tokens(image, device), adapter.negative(device), scale, **unit)

    @property
    def weight(self) -> float:
        """The unit's weight (the scale), by the name the infotext gives a ControlNet unit's."""
        return self.scale

    def keeps(self, index: int, count: int) -> bool:
        """Whether step ``index`` of ``count`` is inside the window (sd-webui-controlnet's rule, as ControlUnit's)."""
        return not (index / count < self.start or (index + 1) / count > self.end)

    def hidden(self, text: torch.Tensor | None, negative_rows: int) -> Any:
        """``text`` [R, L, D] as the UNet's encoder hidden states with this image prompt: its first
        ``negative_rows`` rows (the guidance's uncond half) take the negative image's tokens, the rest the image's."""
        if text is None:
            return None
        rows = text.shape[0]
        tokens = torch.cat([self.negative.expand(negative_rows, -1, -1),
                            self.tokens.expand(rows - negative_rows, -1, -1)])
        scale = torch.full((rows, 1, 1), self.scale, dtype=text.dtype, device=text.device)
        return text, tokens, scale, self.adapter

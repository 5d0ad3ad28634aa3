"""Single-file checkpoints in the original (AUTOMATIC1111 / CompVis) layout.

Loading goes through diffusers' ``from_single_file`` with the architecture's configs shipped in
``sdbridge/data/configs/<arch>/`` (or a ``config_dir`` for unusual architectures, such as the
tiny test models), so it works offline. A checkpoint holds no tokenizer; the CLIP vocabulary is
built from open_clip's BPE file (:mod:`sdbridge.engines.clip_vocab`).

Pickle checkpoints (.ckpt) load only with ``allow_pickle``, through ``torch.load(weights_only=True)``,
and are handed to diffusers as a temporary safetensors file, so that no loader down the line
unpickles anything.

``save_single_file`` writes the other way (diffusers folder -> one file), for users who want one
file to carry around and for tests.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from sdbridge.engines.parts import PipelineParts
from sdbridge.errors import ModelError

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."


def shipped_config_dir(architecture: str) -> Path:
    return Path(str(resources.files("sdbridge").joinpath(f"data/configs/{architecture}")))


def detect_architecture(keys: set[str], shapes: dict[str, tuple[int, ...]]) -> str:
    """sd15, sd21 or sdxl from the checkpoint's keys; ModelError when it is none of them."""
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd21"  # OpenCLIP text encoder
    probe = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if probe in shapes:
        return {768: "sd15", 1024: "sd21"}.get(shapes[probe][1], "unknown")
    if any(key.startswith(CLIP_PREFIX) for key in keys) and any(key.startswith(UNET_PREFIX) for key in keys):
        return "sd15"
    raise ModelError(f"checkpoint keys match no known architecture (sd15, sd21, sdxl); first keys: "
                     f"{sorted(keys)[:3]}", code="unknown_architecture")


# UNets whose first convolution takes more than the latents: what the live stream cannot feed.
EXTRA_INPUTS = {9: "an inpainting model (9 input channels: the latents, a mask and the masked image)",
                8: "an InstructPix2Pix model (8 input channels: the latents and the input image's)"}


def has_vae(keys: Iterable[str]) -> bool:
    return any(key.startswith(VAE_PREFIX) for key in keys)


def check_servable(path: Path | str, shapes: dict[str, tuple[int, ...]], vae_given: bool = False) -> None:
    """ModelError naming what the file is when it is not a whole text-to-image checkpoint this stream can run
    (``vae_given``: a VAE comes from elsewhere, --vae or one beside the file)."""
    keys = set(shapes)
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        if any(key.startswith(("decoder.", "encoder.", VAE_PREFIX)) for key in keys) and \
                not any(key.startswith(("cond_stage_model.", "conditioner.")) for key in keys):
            raise ModelError(f"{path} is a VAE, not a model: it holds an autoencoder's weights alone "
                             "(a VAE file goes with a checkpoint that has none, see docs/models.md)",
                             code="incompatible_model")
        return  # detect_architecture names what it finds
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] in EXTRA_INPUTS:
        raise ModelError(f"{path} is {EXTRA_INPUTS[conv_in[1]]}; the live stream and img2img run 4-channel "
                         "models: use the model's plain version", code="incompatible_model")
    if not vae_given and not has_vae(keys):
        raise ModelError(f"{path} holds no VAE (no {VAE_PREFIX}* keys): a checkpoint saved without its VAE needs "
                         f"one: --vae FILE, or {Path(path).stem}.vae.safetensors beside it", code="incompatible_model")


def v_prediction(path: Path, keys: Iterable[str]) -> str | None:
    """Why the checkpoint predicts v (velocity) rather than noise, or None: a ``.yaml`` beside it with
    ``parameterization: "v"`` (how SD 2.x 768-v models ship, and how A1111 is told), or a ``v_pred`` key in it
    (as v-prediction SDXL fine-tunes mark themselves). Loaded as noise-predicting, such a model gives garbage
    (QA 25)."""
    for config in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        try:
            text = config.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*(#.*)?$", text, re.M):
            return f"parameterization v in {config.name}"
    if "v_pred" in set(keys):
        return "its v_pred key"
    return None


def old_clip_layout(keys: set[str]) -> bool:
    """SD 1.x checkpoints from early trainers name CLIP's layers without ``text_model.`` (A1111 renames them)."""
    return any(key.startswith(CLIP_PREFIX) for key in keys) and \
        not any(key.startswith(CLIP_PREFIX + "text_model.") for key in keys)


def _renamed_clip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {CLIP_PREFIX + "text_model." + key[len(CLIP_PREFIX):] if key.startswith(CLIP_PREFIX) else key: value
            for key, value in tensors.items()}


def known_architecture(path: Path | str, shapes: dict[str, tuple[int, ...]]) -> str:
    """sd15, sd21 or sdxl, or ModelError (unknown_architecture) naming the file and ``--model-config``, the way to
    load another (it said "no shipped configs for architecture 'unknown'", QA 28)."""
    try:
        architecture = detect_architecture(set(shapes), shapes)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}; a checkpoint of another architecture loads with --model-config DIR, a "
                         "diffusers folder whose configs describe it", code="unknown_architecture") from None
    if architecture == "unknown":
        probe = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", ())
        width = probe[1] if len(probe) > 1 else "?"
        raise ModelError(f"{path}: a UNet whose cross-attention takes {width}-wide text, not SD 1.x's "
                         "768 or SD 2.x's 1024; it loads with --model-config DIR, a diffusers folder whose configs "
                         "describe it", code="unknown_architecture")
    return architecture


def _read_keys(path: Path, allow_pickle: bool,
               vae_given: bool = False) -> tuple[dict[str, tuple[int, ...]], Path, Path | None]:
    """Key -> shape, the safetensors file diffusers should read, and a temporary folder to delete."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdbridge.engines.models import check_safetensors_file, file_suffix, header_shapes, load_pickle

    if file_suffix(path) == ".safetensors":
        check_safetensors_file(path)
        shapes = header_shapes(path)
        check_servable(path, shapes, vae_given)
        if not old_clip_layout(set(shapes)):
            if path.suffix == ".safetensors":
                return shapes, path, None
            # diffusers tells safetensors by the name alone, and reads anything else with torch.load:
            # MODEL.SAFETENSORS, or a link named without a suffix, is handed to it under a name it reads.
            named, temporary = _in_temporary_folder(path, lambda target: _link_or_copy(path.resolve(), target))
            return shapes, named, temporary
        log.info("%s names CLIP's layers in the old layout (no text_model.): renamed, as A1111 does", path.name)
        with safe_open(str(path), framework="pt") as tensors:
            state = _renamed_clip({key: tensors.get_tensor(key) for key in tensors.keys()})
        converted, temporary = _in_temporary_folder(path, lambda target: save_file(state, str(target)))
        return {key: tuple(value.shape) for key, value in state.items()}, converted, temporary
    if not allow_pickle:
        raise ModelError(f"{path} is a pickle file; pass --allow-pickle to load it", code="pickle_refused")
    state = load_pickle(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds no state dict")
    tensors = {key: value.contiguous() for key, value in state.items() if isinstance(value, torch.Tensor)}
    check_servable(path, {key: tuple(value.shape) for key, value in tensors.items()}, vae_given)
    if old_clip_layout(set(tensors)):
        tensors = _renamed_clip(tensors)
    converted, temporary = _in_temporary_folder(path, lambda target: save_file(tensors, str(target)))
    return {key: tuple(value.shape) for key, value in tensors.items()}, converted, temporary


def _in_temporary_folder(path: Path, write: Callable[[Path], None]) -> tuple[Path, Path]:
    """``write`` puts the checkpoint at ``<new temporary folder>/<stem>.safetensors``; the folder is removed if it
    fails (QA 44 F5: a refused symlink left one in %TEMP% per attempt)."""
    temporary = Path(tempfile.mkdtemp(prefix="sdbridge-ckpt-"))
    target = temporary / (path.stem + ".safetensors")
    try:
        write(target)
    except BaseException:
        remove_temporary(temporary)
        raise
    return target, temporary


def _link_or_copy(source: Path, target: Path) -> None:
    """``source`` under ``target``'s name: a hard link (no privilege needed, same volume only), else a symlink
    (Windows refuses one without Developer Mode or admin rights: WinError 1314, QA 44 F5), else a copy. The copy
    comes last: a link costs nothing, a copy the checkpoint's size in time and disk (Linux's /tmp is often
    another volume, where only the symlink works)."""
    try:
        os.link(source, target)
        return
    except OSError:  # another volume, FAT32/exFAT, or a file the user may not hard-link (protected_hardlinks)
        pass
    try:
        target.symlink_to(source)
        return
    except OSError as exc:
        log.info("%s: no link possible (%s); copying it under a name diffusers reads (rename it to end in "
                 ".safetensors, lower case, to skip the copy)", source.name, exc.strerror or exc)
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        raise ModelError(f"{source}: could not be handed to diffusers as {target.name} (a hard link, a symbolic "
                         f"link and a copy in {target.parent.parent} all failed: {exc.strerror or exc}); rename "
                         "the file to end in .safetensors, lower case") from exc


def remove_temporary(temporary: Path) -> None:
    """Removes a temporary checkpoint folder; says so when it cannot (QA 44 F9: Windows refuses to delete a file
    still mapped, as a CPU model's fp32 weights keep their file, and a converted copy of several GB was left in
    %TEMP% at every load without a word)."""
    try:
        shutil.rmtree(temporary)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        reason = exc
    shutil.rmtree(temporary, ignore_errors=True)  # what can go, goes
    if not temporary.exists():
        return
    try:
        size = sum(item.stat().st_size for item in temporary.rglob("*") if item.is_file())
        held = f" ({size / 1e9:.2f} GB)" if size >= 1e8 else f" ({size / 1e6:.1f} MB)"
    except OSError:
        held = ""
    log.warning("could not remove the temporary folder %s%s: %s; delete it once sdbridge has stopped",
                str(temporary), held, reason.strerror or reason)


def load_single_file(path: Path, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False,
                     taesd: Path | None = None, models_dir: Path | None = None, source: str | None = None,
                     config_dir: Path | None = None, vae_given: bool = False) -> PipelineParts:
    """``vae_given``: the caller puts another VAE in (engines/vae_file.py), so a checkpoint without one loads."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdbridge.engines.models import _load_taesd, architecture_of, find_taesd

    shapes, readable, temporary = _read_keys(path, allow_pickle, vae_given)
    try:
        detected = known_architecture(path, shapes) if config_dir is None else \
            ("sdxl" if any(key.startswith("conditioner.embedders.1.") for key in shapes) else "sd")
        if config_dir is None:
            config_dir = prepared_config_dir(detected)
        pipeline_class = StableDiffusionXLPipeline if detected == "sdxl" else StableDiffusionPipeline
        extra: dict[str, Any] = {} if detected == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        if not has_vae(shapes):  # one from elsewhere replaces it: the config's shape until then
            extra["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")).to(dtype)
        try:
            pipe = pipeline_class.from_single_file(str(readable), config=str(config_dir), local_files_only=True,
                                                   torch_dtype=dtype, **extra)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{path}: does not load as the architecture of {config_dir}: "
                             f"{type(exc).__name__}: {str(exc)[:300]}; a checkpoint of another shape loads with "
                             f"--model-config DIR, a diffusers folder whose configs describe it") from exc
    finally:
        if temporary is not None:
            remove_temporary(temporary)
    prediction = v_prediction(path, shapes)
    if prediction:
        log.info("%s: v-prediction (%s)", path.name, prediction)
        extra_config = {"rescale_betas_zero_snr": True} if "ztsnr" in shapes else {}
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                                          **extra_config)
    architecture = architecture_of(dict(pipe.unet.config))
    taesd_folder = taesd or find_taesd(None, architecture, models_dir)
    parts = PipelineParts(architecture=architecture, source=source or str(path), unet=pipe.unet, vae=pipe.vae,
                          text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
                          taesd=_load_taesd(taesd_folder, dtype) if taesd_folder else None,
                          text_encoder_2=getattr(pipe, "text_encoder_2", None),
                          tokenizer_2=getattr(pipe, "tokenizer_2", None),
                          force_zeros_for_empty_prompt=getattr(pipe.config, "force_zeros_for_empty_prompt", None))
    for module in parts.modules().values():
        module.to(device).eval().requires_grad_(False)
    return parts


def prepared_config_dir(architecture: str) -> Path:
    """The shipped configs plus a tokenizer built from the CLIP vocabulary, in a cache folder."""
    from sdbridge.engines.clip_vocab import write_clip_tokenizer
    from sdbridge.engines.models import default_models_dir

    shipped = shipped_config_dir(architecture)
    if not (shipped / "model_index.json").is_file():
        raise ModelError(f"no shipped configs for architecture {architecture!r}")
    target = default_models_dir().parent / "configs" / architecture
    # OpenCLIP's tokenizers pad with "!" (SD 2.x's, SDXL's second); CLIP ViT-L's with its end token.
    tokenizers = {"tokenizer": "!" if architecture == "sd21" else "<|endoftext|>"}
    if architecture == "sdxl":
        tokenizers["tokenizer_2"] = "!"
    if not all((target / name / "vocab.json").is_file() for name in tokenizers):
        shutil.copytree(shipped, target, dirs_exist_ok=True)
        for name, pad_token in tokenizers.items():
            write_clip_tokenizer(target / name, pad_token=pad_token)
    return target


# --- diffusers -> original layout ---------------------------------------------------------------


def _unet_key_map(config: dict) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) pairs for a UNet2DConditionModel of any depth."""
    layers = config["layers_per_block"]
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    for i, block in enumerate(down_types):
        for j in range(layers):
            pairs.append((f"input_blocks.{1 + i * (layers + 1) + j}.0.", f"down_blocks.{i}.resnets.{j}."))
            if block.startswith("CrossAttn"):
                pairs.append((f"input_blocks.{1 + i * (layers + 1) + j}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < len(down_types) - 1:
            pairs.append((f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, block in enumerate(up_types):
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{i * (layers + 1) + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if block.startswith("CrossAttn"):
                pairs.append((f"output_blocks.{i * (layers + 1) + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < len(up_types) - 1:
            slot = 2 if block.startswith("CrossAttn") else 1
            pairs.append((f"output_blocks.{i * (layers + 1) + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
              ("middle_block.2.", "mid_block.resnets.1.")]
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and size ids
        pairs += [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    return pairs


_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
           ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]


def _convert_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    prefixes = sorted(_unet_key_map(config), key=lambda pair: -len(pair[1]))
    for key, value in state.items():
        for original, diffusers_prefix in prefixes:
            if key.startswith(diffusers_prefix):
                rest = key[len(diffusers_prefix):]
                if ".resnets." in diffusers_prefix:
                    for sd_name, hf_name in _RESNET:
                        if rest.startswith(hf_name):
                            rest = sd_name + rest[len(hf_name):]
                            break
                out[UNET_PREFIX + original + rest] = value
                break
        else:
            raise ModelError(f"UNet key {key!r} has no place in the original layout")
    return out


def _convert_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    pairs: list[tuple[str, str]] = [("encoder.norm_out.", "encoder.conv_norm_out."),
                                    ("decoder.norm_out.", "decoder.conv_norm_out.")]
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < blocks - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{blocks - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0."),
                  (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1."),
                  (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.")]
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]
    pairs.sort(key=lambda pair: -len(pair[1]))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for original, diffusers_prefix in pairs:
            if key.startswith(diffusers_prefix):
                rest = key[len(diffusers_prefix):]
                if diffusers_prefix.endswith("attentions.0."):
                    for sd_name, hf_name in attention:
                        if rest.startswith(hf_name):
                            rest = sd_name + rest[len(hf_name):]
                            if sd_name in ("q.", "k.", "v.", "proj_out.") and value.ndim == 2:
                                value = value[:, :, None, None]  # linear -> 1x1 conv
                            break
                new = original + rest.replace("conv_shortcut.", "nin_shortcut.")
                break
        out[VAE_PREFIX + new] = value
    return out


SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# CLIPTextModel's names -> OpenCLIP's, inside a transformer layer (diffusers' convert_open_clip_checkpoint, reversed).
_OPEN_CLIP_LAYER = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's state with the "text_model." level, which transformers 5 drops from its keys."""
    return {(key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key): value
            for key, value in state.items()}


def _convert_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's state in OpenCLIP's layout (SDXL's second encoder in a checkpoint):
    q, k and v packed as ``in_proj``, the projection transposed."""
    state = _text_model_keys(state)
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    state.pop("text_model.embeddings.position_ids", None)
    layer_prefix = "text_model.encoder.layers."
    layers = sorted({int(key[len(layer_prefix):].split(".", 1)[0]) for key in state if key.startswith(layer_prefix)})
    for i in layers:
        here, there = f"{layer_prefix}{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{there}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{here}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")])
        for key in [key for key in state if key.startswith(here)]:
            rest = key[len(here):]
            for hf_name, clip_name in _OPEN_CLIP_LAYER:
                if rest.startswith(hf_name):
                    out[there + clip_name + rest[len(hf_name):]] = state.pop(key)
                    break
            else:
                raise ModelError(f"text encoder key {key!r} has no place in OpenCLIP's layout")
    if state:
        raise ModelError(f"text encoder keys with no place in OpenCLIP's layout: {sorted(state)[:3]}")
    return out


def save_single_file(parts: PipelineParts, path: Path) -> Path:
    """Write a checkpoint in the original layout (UNet, VAE, text encoders) as one .safetensors file:
    SD 1.x's (CompVis) or, for SDXL, Stability's generative-models layout (``conditioner.embedders``)."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    state.update(_convert_unet(parts.unet.state_dict(), dict(parts.unet.config)))
    state.update(_convert_vae(parts.vae.state_dict(), dict(parts.vae.config)))
    if parts.architecture == "sdxl":
        if parts.text_encoder_2 is None:
            raise ModelError("an SDXL model without text_encoder_2 cannot be saved as a checkpoint")
        for key, value in _text_model_keys(parts.text_encoder.state_dict()).items():
            state[SDXL_CLIP_PREFIX + key] = value
        for key, value in _convert_open_clip(parts.text_encoder_2.state_dict()).items():
            state[SDXL_OPEN_CLIP_PREFIX + key] = value
    else:
        for key, value in _text_model_keys(parts.text_encoder.state_dict()).items():
            state[CLIP_PREFIX + key] = value
    save_file({key: value.detach().cpu().contiguous() for key, value in state.items()}, str(path))
    return path

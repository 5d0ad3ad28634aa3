"""A VAE other than the model's own: AUTOMATIC1111's "SD VAE" (``--vae``) and its "Automatic" VAE beside a checkpoint.

Artists decode with a VAE file more often than with the one baked into a checkpoint: ``vae-ft-mse-840000`` for
SD 1.x, ``sdxl-vae-fp16-fix`` for SDXL, and the checkpoints published without one. The VAE is picked as A1111
picks it:

- ``--vae`` (``vae`` in sdbridge.toml): a file, a diffusers ``AutoencoderKL`` folder, or a name in the VAE folder
  (``<models>/VAE``, A1111's ``models/VAE``), for every model loaded;
- else a file beside a single-file checkpoint named after it, ``<checkpoint>.vae.safetensors`` (A1111's
  "Automatic");
- else the model's own.

A file is read in the original (LDM) layout (``encoder.down.0.block.0...``, with or without
``first_stage_model.``) or in diffusers' (``encoder.down_blocks.0...``), safetensors only unless pickles are
allowed; it takes the model's VAE config (its scaling factor included, as A1111 keeps the model's), and a VAE of
another shape is refused naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from sdbridge.engines.models import (PICKLE_SUFFIXES, check_safetensors_folder, file_suffix, header_shapes,
                                     load_weight_file, models_subfolder)
from sdbridge.errors import ModelError

log = logging.getLogger(__name__)
T = TypeVar("T")

VAE_FOLDER = "VAE"  # A1111's models/VAE
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
BESIDE_SUFFIXES = (".vae.safetensors",) + tuple(".vae" + suffix for suffix in PICKLE_SUFFIXES)


def vae_folder(models_dir: str | Path | None) -> Path:
    return models_subfolder(models_dir, VAE_FOLDER)


def list_vaes(models_dir: str | Path | None) -> list[Path]:
    """The VAE files and folders in the VAE folder, sorted by name (A1111's ``/sd-vae``)."""
    folder = vae_folder(models_dir)
    if not folder.is_dir():
        return []
    found = [entry for entry in folder.iterdir()
             if (entry.is_dir() and (entry / "config.json").is_file())
             or (entry.is_file() and file_suffix(entry) in (".safetensors",) + PICKLE_SUFFIXES)]
    return sorted(found, key=lambda entry: entry.name.lower())


def resolve_vae(name: str, models_dir: str | Path | None) -> Path:
    """``--vae``'s value: a path, or a file or folder in the VAE folder by its name or stem."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    for entry in list_vaes(models_dir):
        if name in (entry.name, entry.stem, entry.name.split(".")[0]):
            return entry
    known = ", ".join(entry.name for entry in list_vaes(models_dir)) or "none"
    raise ModelError(f"VAE {name!r} not found: no such file, and not in {vae_folder(models_dir)} (there: {known})",
                     code="model_not_found")


def _autoencoder_part(state: Mapping[str, T]) -> dict[str, T]:
    """The autoencoder's entries of a file, without a checkpoint's ``first_stage_model.`` prefix (``loss.*``,
    ``model_ema.*``: not ours)."""
    prefix = "first_stage_model."
    named = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
    return {key: value for key, value in named.items() if key.startswith(VAE_PARTS)}


def _in_diffusers_names(state: dict[str, Any], config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``state`` in diffusers' names: the original (LDM) layout converted, diffusers' own as it is."""
    if not any(".down." in key or ".mid.block_" in key or ".up." in key for key in state):
        return state
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        return convert_ldm_vae_checkpoint(state, dict(config))
    except Exception as exc:
        raise ModelError(f"VAE {path} is not in a layout read here: {type(exc).__name__}: {str(exc)[:200]}",
                         code="bad_model") from exc


def vae_file_problem(path: Path, *, allow_pickle: bool = False) -> str | None:
    """What would stop ``path`` loading as a VAE, told from its header (or folder) alone, or None: for doctor."""
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"VAE {path}: a VAE folder needs config.json"
    suffix = file_suffix(path)
    if suffix in PICKLE_SUFFIXES:
        return None if allow_pickle else f"VAE {path} is a pickle file; it loads only with --allow-pickle"
    try:
        shapes = header_shapes(path)
    except ModelError as exc:
        return str(exc)
    if not _autoencoder_part(shapes):
        return f"VAE {path} holds no autoencoder weights (no encoder.*/decoder.* keys)"
    return None


def vae_fit_problem(path: Path, config: dict[str, Any]) -> str | None:
    """Whether the VAE file at ``path`` fits an autoencoder of ``config``, told from the header's shapes against the
    model built on the meta device (no weight read, no memory): for doctor, which said ok to a VAE of another shape
    that serve then failed on (QA 32). None for a folder or a pickle (their loads say)."""
    from diffusers import AutoencoderKL

    if path.is_dir() or file_suffix(path) != ".safetensors":
        return None
    with torch.device("meta"):
        like = AutoencoderKL.from_config(config)
        state = {key: torch.empty(shape) for key, shape in _autoencoder_part(header_shapes(path)).items()}
        try:
            state = _in_diffusers_names(state, config, path)
        except ModelError as exc:
            return str(exc)
    expected = {key: tuple(value.shape) for key, value in like.state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            return f"VAE {path} does not fit this model's autoencoder: it lacks {key}"
        if tuple(state[key].shape) != shape:
            return (f"VAE {path} does not fit this model's autoencoder: {key} is {tuple(state[key].shape)} in the "
                    f"file, {shape} in the model (a VAE for another family?)")
    return None


def vae_beside(checkpoint: Path) -> Path | None:
    """A1111's "Automatic": ``model.vae.safetensors`` beside ``model.safetensors``."""
    for suffix in BESIDE_SUFFIXES:
        # the name less its suffix ([:-0] would be empty for a download saved without one)
        candidate = checkpoint.with_name(checkpoint.name[: len(checkpoint.name) - len(checkpoint.suffix)] + suffix)
        if candidate.is_file():
            return candidate
    return None


def load_vae(path: Path, like: Any, *, allow_pickle: bool = False) -> Any:
    """The AutoencoderKL in ``path`` with ``like``'s config, on ``like``'s device and dtype; ModelError naming
    the file when it is not one or does not fit."""
    from diffusers import AutoencoderKL

    device, dtype = like.device, like.dtype
    if path.is_dir():
        check_safetensors_folder(path, "VAE")
        try:
            vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
        except Exception as exc:
            raise ModelError(f"VAE {path}: {type(exc).__name__}: {str(exc)[:300]}") from exc
        if vae.config.latent_channels != like.config.latent_channels:
            raise ModelError(f"VAE {path} has {vae.config.latent_channels} latent channels; this model's has "
                             f"{like.config.latent_channels}", code="model_mismatch")
        return vae.to(device).eval().requires_grad_(False)
    state = _autoencoder_part(load_weight_file(path, "VAE", allow_pickle=allow_pickle))
    if not state:
        raise ModelError(f"VAE {path} holds no autoencoder weights (no encoder.*/decoder.* keys)", code="bad_model")
    state = _in_diffusers_names(state, like.config, path)
    vae = AutoencoderKL.from_config(like.config)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's message opens with a line of its own; the layer and both shapes are on the next (QA 29).
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3] if line.strip()) or str(exc)
        raise ModelError(f"VAE {path} does not fit this model's autoencoder (a VAE for another family?): "
                         f"{detail[:300]}", code="model_mismatch") from exc
    return vae.to(device, dtype).eval().requires_grad_(False)


def pick_vae(setting: str | None, checkpoint: Path | None, models_dir: str | Path | None) -> Path | None:
    """The VAE to load in place of the model's own, or None: ``setting`` (``--vae``), else one beside the
    checkpoint."""
    if setting:
        return resolve_vae(setting, models_dir)
    if checkpoint is not None and checkpoint.is_file():
        return vae_beside(checkpoint)
    return None


def replace_vae(parts: Any, path: Path, *, allow_pickle: bool = False) -> None:
    """Put the VAE in ``path`` into ``parts`` in place of the model's own."""
    with torch.no_grad():
        parts.vae = load_vae(path, parts.vae, allow_pickle=allow_pickle)
    log.info("VAE %s in place of the model's own", path)

"""Folders of random ControlNets, as the ControlNet tests and daemon tests need them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def controlnet_folder(folder: Path, unet: Any, **models: int | dict[str, Any]) -> Path:
    """``folder`` with one random ControlNet of ``unet``'s family per keyword, in the diffusers layout
    (safetensors): ``name=seed``, or ``name={"seed": ..., **random_controlnet's options}``."""
    from sdbridge.engines.tiny import random_controlnet

    for name, spec in models.items():
        options = dict(spec) if isinstance(spec, dict) else {"seed": spec}
        random_controlnet(unet, **options).save_pretrained(folder / name, safe_serialization=True)
    return folder


def edges_folder(folder: Path, model_dir: Path) -> Path:
    """The A1111 tests' ControlNet folder: one strong random ControlNet, "edges", for the model in ``model_dir``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    return controlnet_folder(folder, unet, edges={"seed": 1, "std": 1.0})

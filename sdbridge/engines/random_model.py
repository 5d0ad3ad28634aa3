"""Full-size models with random weights: the real architectures, for true speed figures offline.

Random weights make frames that mean nothing to the eye, but every layer, shape and FLOP is the
real model's, so a benchmark on them times what a real checkpoint costs. The architectures come
from the configs shipped in ``sdbridge/data/configs`` (the same ones single-file checkpoints load
with); TAESD uses its own default configuration. The tokenizer is the byte-level one of the tiny
model (any prompt tokenises), so nothing is downloaded.

``sdbridge models random DIR [--arch sd21]`` writes one to disk as a diffusers folder, for
``bench_daemon.py --model DIR --device cuda`` and for trying the daemon at full size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from sdbridge.engines.parts import PipelineParts
from sdbridge.errors import ModelError

ARCHITECTURES = ("sd21", "sd15", "sdxl")
COMPONENTS = ("unet", "vae", "taesd", "text_encoder", "text_encoder_2")


def build_random_components(architecture: str, vocab_size: int, device: torch.device | str = "cpu",
                            seed: int = 0) -> dict[str, Any]:
    """unet, vae, taesd, text_encoder (and SDXL's text_encoder_2) and scheduler of ``architecture``, random."""
    from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdbridge.engines.single_file import shipped_config_dir

    if architecture not in ARCHITECTURES:
        raise ModelError(f"no random model for architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})",
                         code="bad_model")
    configs = shipped_config_dir(architecture)
    torch.manual_seed(seed)
    # Built on the device: random init of ~865 M UNet parameters takes a while on a CPU.
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        taesd = AutoencoderTiny()  # TAESD's (and TAESDXL's) own default configuration
        out = {"unet": unet, "vae": vae, "taesd": taesd,
               "text_encoder": CLIPTextModel(_text_config(configs / "text_encoder", vocab_size))}
        if (configs / "text_encoder_2").is_dir():  # SDXL: OpenCLIP bigG with its projection
            out["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(configs / "text_encoder_2", vocab_size))
    out["scheduler"] = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(configs / "scheduler"))
    return out


def _text_config(folder: Path, vocab_size: int) -> Any:
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(folder)
    config.vocab_size = max(config.vocab_size, vocab_size)
    config.bos_token_id, config.eos_token_id = vocab_size - 2, vocab_size - 1
    config.pad_token_id = vocab_size - 1
    return config


def random_parts(architecture: str, device: torch.device, dtype: torch.dtype) -> PipelineParts:
    """PipelineParts with random weights, in memory: ``architecture`` is sd21, sd15, sdxl, or ``tiny`` /
    ``tiny-sdxl`` (the test models), for benchmarks that time the real layers without writing them to disk."""
    from transformers import CLIPTokenizer

    from sdbridge.engines.tiny import build_tiny_components, build_tiny_sdxl_components, write_tiny_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="sdbridge-random-"))
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")  # byte-level: any prompt tokenises
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if architecture == "tiny":
        components = build_tiny_components(seed=0, vocab_size=vocab_size)
    elif architecture == "tiny-sdxl":
        components = build_tiny_sdxl_components(seed=0, vocab_size=vocab_size)
    else:
        components = build_random_components(architecture, vocab_size, device=device)
    for name in COMPONENTS:
        if name in components:
            components[name] = components[name].to(device, dtype).eval().requires_grad_(False)
    architecture = {"tiny": "sd15", "tiny-sdxl": "sdxl"}.get(architecture, architecture)
    return PipelineParts(architecture=architecture, source="random weights",
                         unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
                         tokenizer=tokenizer, scheduler=components["scheduler"], taesd=components["taesd"],
                         text_encoder_2=components.get("text_encoder_2"),
                         tokenizer_2=tokenizer if "text_encoder_2" in components else None)


def write_random_model(folder: str | Path, architecture: str = "sd21", dtype: torch.dtype = torch.float16,
                       seed: int = 0) -> Path:
    """Write a full-size random model as a diffusers folder (+ ``taesd/``) in ``dtype``; its path."""
    from sdbridge.engines.tiny import write_components, write_sdxl_components, write_tiny_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    parts = build_random_components(architecture, vocab_size, seed=seed)
    for name in COMPONENTS:
        if name in parts:
            parts[name] = parts[name].to(dtype)
    if "text_encoder_2" in parts:
        write_tiny_tokenizer(folder / "tokenizer_2")
        return write_sdxl_components(folder, parts)
    return write_components(folder, parts)

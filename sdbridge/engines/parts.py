"""What a loaded Stable Diffusion model is made of, whatever file layout it came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("sd15", "sd21", "sdxl")


@dataclass
class PipelineParts:
    """The modules of one model, on their device and dtype, ready for an engine.

    ``taesd`` is the fast tiny autoencoder when one was found beside the model (``taesd/``) or
    configured; engines prefer it to ``vae`` for speed. SDXL fills the ``*_2`` fields.
    """

    architecture: str            # one of ARCHITECTURES
    source: str                  # what the user named: a folder, a file or a hub id
    unet: Any                    # diffusers.UNet2DConditionModel
    vae: Any                     # diffusers.AutoencoderKL
    text_encoder: Any            # transformers.CLIPTextModel
    tokenizer: Any               # transformers.CLIPTokenizer
    scheduler: Any               # a diffusers scheduler (its config says which)
    taesd: Any | None = None     # diffusers.AutoencoderTiny
    text_encoder_2: Any | None = None
    tokenizer_2: Any | None = None
    # model_index.json's flag: an empty negative prompt is zeros, not the empty prompt's encoding
    # (diffusers' SDXL pipelines). None: the architecture's default, see zero_empty_negative.
    force_zeros_for_empty_prompt: bool | None = None

    @property
    def zero_empty_negative(self) -> bool:
        """Whether guidance uses zeros for an empty negative prompt (True for SDXL unless the model says not)."""
        if self.force_zeros_for_empty_prompt is not None:
            return self.force_zeros_for_empty_prompt
        return self.architecture == "sdxl"

    def modules(self) -> dict[str, Any]:
        names = ("unet", "vae", "text_encoder", "taesd", "text_encoder_2")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

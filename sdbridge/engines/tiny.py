"""Tiny random Stable Diffusion models: the real diffusers classes with tiny configs.

No machine of this project can download weights, so tests and first-time users build one of
these and load it back through the real loading code (``sdbridge models tiny DIR`` writes one).
The layout is a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) plus ``taesd/`` (an AutoencoderTiny), all weights in safetensors.
The VAE and TAESD both downsample by 8, as the real ones do, so a 64×64 frame gives 8×8 latents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdbridge.engines.clip_vocab import bytes_to_unicode

TINY_TEXT_DIM = 32
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def write_tiny_tokenizer(folder: Path) -> int:
    """A byte-level CLIP tokenizer with no merges: any text tokenises, one character a token.

    Returns the vocabulary size.
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + list(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1], "unk_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[1],
        "do_lower_case": True,
    }), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "unk_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
    }), encoding="utf-8")
    return len(vocab)


def build_tiny_components(seed: int = 0, vocab_size: int = 514 + len(SPECIAL_TOKENS)) -> dict[str, object]:
    """The UNet, VAE, TAESD, text encoder and scheduler of a tiny SD model, random but seeded."""
    from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
    )
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TINY_TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_TEXT_DIM,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))
    # sd-turbo's scheduler: Euler with trailing timesteps, so 1–4 steps land on useful timesteps.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="trailing", prediction_type="epsilon", steps_offset=1,
    )
    for module in (unet, vae, taesd, text_encoder):
        module.eval()
    return {"unet": unet, "vae": vae, "taesd": taesd, "text_encoder": text_encoder, "scheduler": scheduler}


def write_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD model as a diffusers folder (+ ``taesd/``) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    return write_components(folder, build_tiny_components(seed=seed, vocab_size=vocab_size))


def write_components(folder: Path, parts: dict[str, object]) -> Path:
    """unet, vae, text_encoder, scheduler and taesd saved as a diffusers folder beside ``folder/tokenizer``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, unet=parts["unet"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    parts["taesd"].save_pretrained(folder / "taesd", safe_serialization=True)
    return folder


def random_controlnet(unet: torch.nn.Module, seed: int = 0, std: float = 0.3,  # noqa: ANN201 - ControlNetModel
                      **config: Any):
    """A ControlNet for ``unet``'s family (``ControlNetModel.from_unet``, ``config`` passed on), random but seeded.

    A new ControlNet's output convolutions start at zero, so it would add nothing; a trained one's
    are not zero, and neither are these (normal with ``std``), so that tests see it act.
    """
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel.from_unet(unet, **config)
    for module in [*model.controlnet_down_blocks, model.controlnet_mid_block, model.controlnet_cond_embedding.conv_out]:
        torch.nn.init.normal_(module.weight, std=std)
        torch.nn.init.normal_(module.bias, std=std / 3)
    return model.eval()

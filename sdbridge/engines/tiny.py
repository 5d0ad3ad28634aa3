"""Tiny random Stable Diffusion models: the real diffusers classes with tiny configs.

No machine of this project can download weights, so tests and first-time users build one of
these and load it back through the real loading code (``sdbridge models tiny DIR`` writes one).
The layout is a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) plus ``taesd/`` (an AutoencoderTiny), all weights in safetensors.
The VAE and TAESD both downsample by 8, as the real ones do, so a 64×64 frame gives 8×8 latents.

``write_tiny_model(folder, architecture="sdxl")`` writes a tiny SDXL instead: two text encoders
(``text_encoder/`` a CLIPTextModel, ``text_encoder_2/`` a CLIPTextModelWithProjection, the same
tiny tokenizer in ``tokenizer/`` and ``tokenizer_2/``) and a UNet with SDXL's "text_time" added
conditioning (pooled text embeds + six size/crop ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdbridge.engines.clip_vocab import bytes_to_unicode

TINY_TEXT_DIM = 32
# SDXL's second encoder is wider than its first (OpenCLIP bigG 1280, CLIP-L 768), and diffusers' single-file
# loader tells the two apart by width: the tiny one is too, so that its checkpoint loads as a real one does.
TINY_SDXL_TEXT2_DIM = 48
TINY_SDXL_TIME_DIM = 8                   # addition_time_embed_dim: each of the six time ids embeds to this width
TINY_ARCHITECTURES = ("sd15", "sdxl")
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


def write_tiny_model(folder: str | Path, seed: int = 0, architecture: str = "sd15") -> Path:
    """Write a tiny random model (``sd15`` or ``sdxl``) as a diffusers folder (+ ``taesd/``) and return its path."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"tiny architecture {architecture!r} not in {TINY_ARCHITECTURES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    if architecture == "sdxl":
        write_tiny_tokenizer(folder / "tokenizer_2")
        return write_sdxl_components(folder, build_tiny_sdxl_components(seed=seed, vocab_size=vocab_size))
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


def build_tiny_sdxl_components(seed: int = 0, vocab_size: int = 514 + len(SPECIAL_TOKENS)) -> dict[str, object]:
    """A tiny SDXL's parts, random but seeded: the SD parts' VAE, TAESD and scheduler, SDXL's UNet and encoders."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = build_tiny_components(seed=seed, vocab_size=vocab_size)
    torch.manual_seed(seed + 1)
    pooled_dim = TINY_SDXL_TEXT2_DIM  # text_encoder_2's projection_dim
    # SDXL's layout shrunk: no attention in the first block, more transformer layers deeper down,
    # linear projections, and the "text_time" embedding of pooled text + 6 time ids.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
        cross_attention_dim=TINY_TEXT_DIM + TINY_SDXL_TEXT2_DIM, addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=pooled_dim + 6 * TINY_SDXL_TIME_DIM,
    )
    text_config = dict(
        vocab_size=vocab_size, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=pooled_dim,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config, hidden_size=TINY_TEXT_DIM))
    # OpenCLIP ViT-bigG, SDXL's second encoder, uses exact GELU (the first, OpenAI's CLIP-L, quick GELU).
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, hidden_size=TINY_SDXL_TEXT2_DIM,
                                                                hidden_act="gelu"))
    for module in (unet, text_encoder, text_encoder_2):
        module.eval()
    # SDXL's VAE latents are scaled by 0.13025 (SD 1.x/2.x: 0.18215).
    parts["vae"].register_to_config(scaling_factor=0.13025)
    parts.update(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    return parts


def write_sdxl_components(folder: Path, parts: dict[str, object]) -> Path:
    """A tiny SDXL's parts saved as a diffusers folder beside ``folder/tokenizer`` and ``folder/tokenizer_2``."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), unet=parts["unet"],
        scheduler=parts["scheduler"], force_zeros_for_empty_prompt=True, add_watermarker=False,
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


def write_random_ip_adapter(folder: Path, unet: torch.nn.Module, name: str = "style", seed: int = 0,
                            std: float = 0.3, encoder: bool = True, plus: bool = False) -> Path:
    """An IP-Adapter for ``unet``'s family in the published layout (``image_proj.*``, ``ip_adapter.{1,3,..}``,
    one safetensors file, ``folder/NAME.safetensors``) and, with ``encoder``, a tiny CLIP image encoder in
    ``folder/image_encoder/``; random but seeded, ``std`` large enough that tests see the adapter act. ``plus``:
    an IP-Adapter Plus (the Resampler over the encoder's hidden states, 16 tokens), else a plain one (4 tokens)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from sdbridge.engines.ip_adapter import cross_attention_layers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    projection_dim = 16
    if encoder:
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=4, projection_dim=projection_dim)
        CLIPVisionModelWithProjection(config).eval().save_pretrained(folder / "image_encoder", safe_serialization=True)
    cross = unet.config.cross_attention_dim
    tokens = 4
    state = _random_resampler(cross, 32, std) if plus else {
        "image_proj.proj.weight": torch.randn(cross * tokens, projection_dim) * std,
        "image_proj.proj.bias": torch.randn(cross * tokens) * std,
        "image_proj.norm.weight": 1.0 + torch.randn(cross) * std / 3,
        "image_proj.norm.bias": torch.randn(cross) * std / 3}
    for index, layer in enumerate(cross_attention_layers(unet)):
        shape = unet.get_submodule(layer).to_k.weight.shape
        state[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = torch.randn(shape) * std
        state[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = torch.randn(shape) * std
    path = folder / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


def _random_resampler(output_dim: int, embedding_dim: int, std: float, dim: int = 32, queries: int = 16,
                      depth: int = 4) -> dict[str, torch.Tensor]:
    """IP-Adapter Plus's image projection (the original repository's Resampler, ``image_proj.*`` keys): ``queries``
    learned latents attending to the encoder's hidden states (``embedding_dim`` wide) through ``depth`` blocks of
    one 64-wide head, then out to the UNet's cross-attention width. diffusers reads its depth as 4."""
    inner, ff = 64, dim * 4

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1.0 + torch.randn(width) * std / 3, f"{prefix}.bias": torch.randn(width) * std / 3}

    state = {"image_proj.latents": torch.randn(1, queries, dim) * std,
             "image_proj.proj_in.weight": torch.randn(dim, embedding_dim) * std,
             "image_proj.proj_in.bias": torch.randn(dim) * std,
             "image_proj.proj_out.weight": torch.randn(output_dim, dim) * std,
             "image_proj.proj_out.bias": torch.randn(output_dim) * std, **norm("image_proj.norm_out", output_dim)}
    for i in range(depth):
        block = f"image_proj.layers.{i}"
        state.update({**norm(f"{block}.0.norm1", dim), **norm(f"{block}.0.norm2", dim),
                      f"{block}.0.to_q.weight": torch.randn(inner, dim) * std,
                      f"{block}.0.to_kv.weight": torch.randn(2 * inner, dim) * std,
                      f"{block}.0.to_out.weight": torch.randn(dim, inner) * std,
                      **norm(f"{block}.1.0", dim), f"{block}.1.1.weight": torch.randn(ff, dim) * std,
                      f"{block}.1.3.weight": torch.randn(dim, ff) * std})
    return state

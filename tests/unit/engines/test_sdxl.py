"""SDXL in the diffusion engine against diffusers' SDXL pipelines: same weights, same noise, same frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.base import StreamState
from sdbridge.engines.controlnet import load_controlnet
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.tiny import TINY_SDXL_TEXT2_DIM, TINY_TEXT_DIM, random_controlnet
from sdbridge.errors import ModelError
from tests.unit.engines.common import engine_params, relative_error

CPU = torch.device("cpu")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def sdxl_parts(tiny_sdxl_dir):
    """The tiny SDXL with the full VAE as the autoencoder, as diffusers' pipelines decode."""
    from sdbridge.engines.models import load_pipeline_parts

    loaded = load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32)
    loaded.taesd = None
    return loaded


@pytest.fixture
def frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)


def encoded(parts, frame: np.ndarray) -> torch.Tensor:
    """The frame's latents as the engine encodes them (handed to the reference pipelines as the image)."""
    pixels = torch.from_numpy(frame)[None].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        return DiffusionEngine.from_parts(parts).encode(pixels)


def run(engine: DiffusionEngine, frame: np.ndarray, state: StreamState | None = None, **overrides) -> torch.Tensor:
    state = state or StreamState("s")
    engine.prepare(engine_params(**overrides))
    if engine.controlnets is not None:
        engine.controlnets.wait()
        engine.controlnets.condition(state.data, frame)
    return engine.step_float(torch.from_numpy(frame)[None], [state])


def sdxl_components(parts) -> dict:
    return dict(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler)


def diffusers_sdxl_img2img(parts, frame: np.ndarray, *, steps: int, strength: float, guidance: float,
                           negative_prompt: str | None) -> torch.Tensor:
    """StableDiffusionXLImg2ImgPipeline's float output, handed our encoded latents and a generator seeded
    like the session's noise (the pipeline draws its noise first from it)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**sdxl_components(parts), requires_aesthetics_score=False,
                                            force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red fox", negative_prompt=negative_prompt, image=encoded(parts, frame), strength=strength,
                num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
                output_type="pt").images


# --- the model ---------------------------------------------------------------------------------------

def test_tiny_sdxl_loads_as_sdxl_with_both_encoders(sdxl_parts, tiny_sdxl_dir):
    import json

    assert sdxl_parts.architecture == "sdxl"
    assert type(sdxl_parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sdxl_parts.tokenizer_2 is not None
    assert sdxl_parts.unet.config.cross_attention_dim == (sdxl_parts.text_encoder.config.hidden_size
                                                          + sdxl_parts.text_encoder_2.config.hidden_size)
    assert json.loads((Path(tiny_sdxl_dir) / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    assert sdxl_parts.zero_empty_negative
    assert (Path(tiny_sdxl_dir) / "taesd" / "config.json").is_file()


def test_write_tiny_model_refuses_an_unknown_architecture(tmp_path):
    from sdbridge.engines.tiny import write_tiny_model

    with pytest.raises(ValueError, match="'sd3'"):
        write_tiny_model(tmp_path / "x", architecture="sd3")


# --- parity with diffusers ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps, strength, guidance, negative", [
    (1, 1.0, 1.0, ""), (2, 0.5, 1.0, ""), (4, 0.75, 1.0, ""),
    (2, 1.0, 3.0, "blurry"), (4, 0.5, 3.0, "blurry"),
    (2, 1.0, 3.0, ""), (4, 0.5, 3.0, "")])
def test_img2img_parity_with_diffusers_sdxl(sdxl_parts, frame, steps, strength, guidance, negative):
    """Same latents in, same noise: matches StableDiffusionXLImg2ImgPipeline (fp32, CPU). An empty negative
    prompt with guidance is zeros (force_zeros_for_empty_prompt), as diffusers does for negative_prompt=None."""
    engine = DiffusionEngine.from_parts(sdxl_parts)
    ours = run(engine, frame, steps=steps, strength=strength, guidance=guidance, negative_prompt=negative)
    theirs = diffusers_sdxl_img2img(sdxl_parts, frame, steps=steps, strength=strength, guidance=guidance,
                                    negative_prompt=negative or None)
    error = relative_error(ours, theirs)
    assert error <= TOLERANCE, f"relative error {error:.2e}"


def test_without_force_zeros_an_empty_negative_prompt_is_encoded(sdxl_parts, frame):
    """A model whose model_index.json says force_zeros_for_empty_prompt: false encodes "" as diffusers then does."""
    import dataclasses

    from diffusers import StableDiffusionXLImg2ImgPipeline

    parts = dataclasses.replace(sdxl_parts, force_zeros_for_empty_prompt=False)
    engine = DiffusionEngine.from_parts(parts)
    ours = run(engine, frame, steps=2, strength=1.0, guidance=3.0, negative_prompt="")
    assert engine._added_cond["text_embeds"][0].abs().max() > 0
    pipe = StableDiffusionXLImg2ImgPipeline(**sdxl_components(parts), force_zeros_for_empty_prompt=False,
                                            add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a red fox", negative_prompt=None, image=encoded(parts, frame), strength=1.0,
                  num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images
    assert relative_error(ours, theirs) <= TOLERANCE
    zeros = run(DiffusionEngine.from_parts(sdxl_parts), frame, steps=2, strength=1.0, guidance=3.0, negative_prompt="")
    assert (ours - zeros).abs().max() > 1e-3


def test_txt2img_parity_with_diffusers_sdxl(sdxl_parts):
    from diffusers import StableDiffusionXLPipeline

    engine = DiffusionEngine.from_parts(sdxl_parts)
    engine.prepare(engine_params(mode="txt2img", steps=2))
    ours = engine.step_float(None, [StreamState("s")])
    pipe = StableDiffusionXLPipeline(**sdxl_components(sdxl_parts), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a red fox", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert relative_error(ours, theirs) <= TOLERANCE


def test_added_cond_layout_follows_the_embeddings(sdxl_parts):
    """The compiled engine's interface: {"text_embeds": [B_cfg, D_pool], "time_ids": [B_cfg, 6]}, uncond row first."""
    engine = DiffusionEngine.from_parts(sdxl_parts)
    pooled_dim = sdxl_parts.text_encoder_2.config.projection_dim
    engine.prepare(engine_params(guidance=1.0, width=64, height=128))
    added = engine._added_cond
    assert added is not None and set(added) == {"text_embeds", "time_ids"}
    assert tuple(added["text_embeds"].shape) == (1, pooled_dim)
    assert added["time_ids"].tolist() == [[128.0, 64.0, 0.0, 0.0, 128.0, 64.0]]  # (H, W, top, left, H, W)
    cond_pooled = added["text_embeds"].clone()

    engine.prepare(engine_params(guidance=3.0, negative_prompt="", width=64, height=128))
    added = engine._added_cond
    assert tuple(added["text_embeds"].shape) == (2, pooled_dim) and tuple(added["time_ids"].shape) == (2, 6)
    assert engine._embeddings.shape[0] == 2
    assert torch.equal(added["text_embeds"][0], torch.zeros(pooled_dim))         # empty negative: zeros
    assert torch.equal(engine._embeddings[0], torch.zeros_like(engine._embeddings[0]))
    assert torch.equal(added["text_embeds"][1:], cond_pooled)

    engine.prepare(engine_params(guidance=3.0, negative_prompt="blurry", width=64, height=128))
    assert engine._added_cond["text_embeds"][0].abs().max() > 0                   # encoded, not zeros


def test_sd_models_have_no_added_cond(parts):
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(engine_params(guidance=3.0))
    assert engine._added_cond is None


def test_batch_of_two_sessions_matches_each_alone(sdxl_parts, frame):
    """Added cond rows expand with the batch: two sessions in one step equal each run alone."""
    engine = DiffusionEngine.from_parts(sdxl_parts)
    engine.prepare(engine_params(guidance=3.0, negative_prompt="blurry", steps=2, strength=1.0))
    other = np.ascontiguousarray(frame[::-1])
    frames = torch.from_numpy(np.stack([frame, other]))
    together = engine.step_float(frames, [StreamState("a"), StreamState("b")])
    alone = torch.cat([engine.step_float(frames[i:i + 1], [StreamState(name)]) for i, name in enumerate("ab")])
    assert relative_error(together, alone) <= 1e-5


def test_prompt_blend_blends_the_pooled_embeds(sdxl_parts):
    engine = DiffusionEngine.from_parts(sdxl_parts)
    engine.prepare(engine_params(prompt="a red fox"))
    first = engine._added_cond["text_embeds"].clone()
    engine.prepare(engine_params(prompt="a blue whale"))
    second = engine._added_cond["text_embeds"].clone()
    engine.prepare(engine_params(prompt="a red fox", blend_prompt="a blue whale", prompt_blend=0.25))
    assert torch.allclose(engine._added_cond["text_embeds"], torch.lerp(first, second, 0.25), atol=1e-6)


def test_prompt_weights_mix_the_pooled_embeds_as_the_hidden_states(sdxl_parts):
    from sdbridge.engines.prompt_encode import slerp

    engine = DiffusionEngine.from_parts(sdxl_parts)

    def conditioning(**overrides) -> tuple[torch.Tensor, torch.Tensor]:
        engine.prepare(engine_params(**overrides))
        return engine._embeddings.clone(), engine._added_cond["text_embeds"].clone()

    fox, fox_pooled = conditioning(prompt="a red fox")
    long, long_pooled = conditioning(prompt="a " * 100)
    empty, _ = conditioning(prompt="")
    mixed = dict(prompt_2="a " * 100, prompt_2_weight=3.0)
    only, only_pooled = conditioning(prompt_weight=0.0, **mixed)
    assert torch.equal(only, long) and torch.equal(only_pooled, long_pooled)
    hidden, pooled = conditioning(**mixed)
    assert hidden.shape == long.shape  # two chunks: the fox padded with the empty prompt's
    assert torch.allclose(hidden, 0.25 * torch.cat([fox, empty], dim=1) + 0.75 * long, atol=1e-5)
    assert torch.allclose(pooled, 0.25 * fox_pooled + 0.75 * long_pooled, atol=1e-6)
    _, spherical = conditioning(prompt_interpolation="slerp", **mixed)
    assert torch.allclose(spherical, slerp(fox_pooled, long_pooled, 0.75), atol=1e-6)
    assert not torch.allclose(spherical, pooled, atol=1e-4)


# --- prompts -----------------------------------------------------------------------------------------

def test_embeddings_match_diffusers_encode_prompt(sdxl_parts):
    from diffusers import StableDiffusionXLPipeline

    engine = DiffusionEngine.from_parts(sdxl_parts)
    engine.prepare(engine_params(prompt="a red fox"))
    pipe = StableDiffusionXLPipeline(**sdxl_components(sdxl_parts), add_watermarker=False)
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt("a red fox", device=CPU, do_classifier_free_guidance=False)
    assert torch.equal(engine._embeddings, embeds)
    assert torch.equal(engine._added_cond["text_embeds"], pooled)
    d1 = sdxl_parts.text_encoder.config.hidden_size
    assert engine._embeddings.shape == (1, 77, d1 + sdxl_parts.text_encoder_2.config.hidden_size)


def test_a1111_weights_change_the_output_and_weight_one_is_neutral(sdxl_parts, frame):
    plain = run(DiffusionEngine.from_parts(sdxl_parts), frame, prompt="a red fox")
    neutral = run(DiffusionEngine.from_parts(sdxl_parts), frame, prompt="a (red:1.0) fox")
    weighted = run(DiffusionEngine.from_parts(sdxl_parts), frame, prompt="a (red:1.6) fox")
    assert torch.equal(plain, neutral)
    assert (weighted - plain).abs().max() > 1e-3


def test_break_and_long_prompts_make_chunks_on_both_encoders(sdxl_parts):
    engine = DiffusionEngine.from_parts(sdxl_parts)
    engine.prepare(engine_params(prompt="a red fox BREAK a blue whale"))
    assert engine._embeddings.shape[1] == 2 * 77
    width = sdxl_parts.text_encoder.config.hidden_size
    # The second chunk of each encoder's half is its own encoding of "a blue whale", not a copy of the first.
    assert not torch.equal(engine._embeddings[:, 77:, :width], engine._embeddings[:, :77, :width])
    assert not torch.equal(engine._embeddings[:, 77:, width:], engine._embeddings[:, :77, width:])
    engine.prepare(engine_params(prompt="a red fox BREAK a blue whale", guidance=3.0, negative_prompt="blurry"))
    assert engine._embeddings.shape[:2] == (2, 2 * 77)   # the negative prompt padded to two chunks


def test_a_kohya_lora_on_text_encoder_2_changes_the_embeddings(sdxl_parts, tmp_path):
    from safetensors.torch import save_file

    from sdbridge.engines.lora import fusable_layers

    layer = next(name for name in fusable_layers(sdxl_parts.text_encoder_2) if name.endswith("q_proj"))
    flat = (layer if layer.startswith("text_model.") else "text_model." + layer).replace(".", "_")
    generator = torch.Generator().manual_seed(0)
    width = sdxl_parts.text_encoder_2.config.hidden_size
    save_file({f"lora_te2_{flat}.lora_down.weight": torch.randn(4, width, generator=generator),
               f"lora_te2_{flat}.lora_up.weight": torch.randn(width, 4, generator=generator),
               f"lora_te2_{flat}.alpha": torch.tensor(4.0)}, str(tmp_path / "te2.safetensors"))
    engine = DiffusionEngine.from_parts(sdxl_parts)
    engine.lora_dir = str(tmp_path)
    engine.conditioning.lora_dir = tmp_path
    engine.prepare(engine_params(prompt="a red fox"))
    before = engine._embeddings.clone(), engine._added_cond["text_embeds"].clone()
    try:
        engine.prepare(engine_params(prompt="a red fox <lora:te2:1>"))
        assert engine.conditioning.loras.get("te2").components == frozenset({"text_encoder_2"})
        after = engine._embeddings.clone(), engine._added_cond["text_embeds"].clone()
    finally:
        engine.prepare(engine_params(prompt="a red fox"))   # weight 0: the original weights back, bit for bit
    d1 = sdxl_parts.text_encoder.config.hidden_size
    assert torch.equal(after[0][..., :d1], before[0][..., :d1])          # text_encoder untouched
    assert (after[0][..., d1:] - before[0][..., d1:]).abs().max() > 1e-4  # text_encoder_2's half moved
    assert (after[1] - before[1]).abs().max() > 1e-4                      # and so did the pooled embeds
    assert torch.equal(engine._embeddings, before[0])


# --- textual inversion -------------------------------------------------------------------------------

def sdxl_embedding(path: Path, count: int, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    save_file({"clip_l": torch.randn(count, TINY_TEXT_DIM, generator=generator),
               "clip_g": torch.randn(count, TINY_SDXL_TEXT2_DIM, generator=generator)}, str(path))
    return path


@pytest.mark.parametrize("count", [1, 3])
def test_sdxl_textual_inversion_matches_diffusers(tiny_sdxl_dir, tmp_path, count):
    """clip_l to the first encoder, clip_g to the second, as diffusers' load_textual_inversion with
    text_encoder= and tokenizer= named; the prompt encodes as diffusers' SDXL encode_prompt then does."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from sdbridge.engines.models import load_pipeline_parts

    path = sdxl_embedding(tmp_path / "inkstyle.safetensors", count)
    ours = load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32)   # fresh: embeddings change the encoders
    engine = DiffusionEngine.from_parts(ours)
    engine.conditioning.embeddings_dir = tmp_path
    assert engine.rescan_embeddings() == ["inkstyle"]
    engine.prepare(engine_params(prompt="a inkstyle fox"))

    theirs = load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32)
    pipe = StableDiffusionXLPipeline(**sdxl_components(theirs), add_watermarker=False)
    tables = load_file(str(path))
    pipe.load_textual_inversion(tables["clip_l"], token="inkstyle", text_encoder=theirs.text_encoder,
                                tokenizer=theirs.tokenizer)
    pipe.load_textual_inversion(tables["clip_g"], token="inkstyle", text_encoder=theirs.text_encoder_2,
                                tokenizer=theirs.tokenizer_2)
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt("a inkstyle fox", device=CPU, do_classifier_free_guidance=False)
        plain, _, _, _ = pipe.encode_prompt("a fox", device=CPU, do_classifier_free_guidance=False)
    assert relative_error(engine._embeddings, embeds) <= 1e-6
    assert relative_error(engine._added_cond["text_embeds"], pooled) <= 1e-6
    assert (embeds[:, :8] - plain[:, :8]).abs().max() > 1e-3   # the trigger word did something


def test_embeddings_of_the_other_family_are_skipped(sdxl_parts, parts, tmp_path):
    from safetensors.torch import save_file

    from sdbridge.engines.textual_inversion import EmbeddingError, TextualInversions, read_embedding

    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "sdstyle.safetensors"))
    sdxl_file = sdxl_embedding(tmp_path / "xlstyle.safetensors", 1)
    with pytest.raises(EmbeddingError, match="is for SD 1.x/2.x .* this SDXL model") as caught:
        TextualInversions(sdxl_parts.tokenizer, sdxl_parts.text_encoder, sdxl_parts.tokenizer_2,
                          sdxl_parts.text_encoder_2).add(read_embedding(tmp_path / "sdstyle.safetensors"))
    assert caught.value.code == "embedding_mismatch"
    with pytest.raises(EmbeddingError, match="is an SDXL embedding .* SD 1.x/2.x") as caught:
        TextualInversions(parts.tokenizer, parts.text_encoder).add(read_embedding(sdxl_file))
    assert caught.value.code == "embedding_mismatch"
    # Nothing was added to either tokenizer by the refusals.
    assert "sdstyle" not in sdxl_parts.tokenizer.get_vocab() and "xlstyle" not in parts.tokenizer.get_vocab()


def test_a_prompt_naming_an_embedding_of_the_other_family_is_told_once(tiny_sdxl_dir, tmp_path):
    """QA 47 F3: on a switch to SDXL an SD 1.5 embedding in the prompt was a log line alone, while the LoRA and the
    ControlNet beside it were told to every client: its name is plain text now, and the clients hear so once while
    a prompt names it (in any case, as CLIP reads it)."""
    from safetensors.torch import save_file

    from sdbridge.engines.models import load_pipeline_parts

    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "sdstyle.safetensors"))
    engine = DiffusionEngine.from_parts(load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32))
    engine.conditioning.embeddings_dir = tmp_path
    engine.rescan_embeddings()
    told: list[dict] = []
    engine.notify = told.append
    for prompt, negative in (("a SDstyle fox", ""), ("a sdstyle fox", ""), ("a fox", ""), ("a fox", "sdstyle"),
                             ("a sdstyles fox", "")):
        engine.prepare(engine_params(prompt=prompt, negative_prompt=negative, guidance=2.0))
    assert [message["code"] for message in told] == ["embedding_mismatch"] * 2   # at the first, and named again
    assert "'sdstyle' left out" in told[0]["message"] and "plain text" in told[0]["message"]


# --- ControlNet --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_controlnet_dir(sdxl_parts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl-controlnet")
    random_controlnet(sdxl_parts.unet, seed=1).save_pretrained(folder / "edges", safe_serialization=True)
    return folder


@pytest.mark.parametrize("steps, strength, guidance, scale, start, end", [
    (2, 1.0, 1.0, 1.0, 0.0, 1.0), (4, 0.75, 3.0, 0.7, 0.0, 1.0), (4, 1.0, 3.0, 1.3, 0.25, 0.75)])
def test_controlnet_parity_with_diffusers_sdxl_controlnet_img2img(sdxl_parts, sdxl_controlnet_dir, frame, steps,
                                                                  strength, guidance, scale, start, end):
    """One ControlNet slot matches StableDiffusionXLControlNetImg2ImgPipeline (fp32, CPU)."""
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    engine = DiffusionEngine.from_parts(sdxl_parts)
    engine.controlnet_dir = str(sdxl_controlnet_dir)
    settings = dict(steps=steps, strength=strength, guidance=guidance, negative_prompt="blurry")
    ours = run(engine, frame, controlnet_1_model="edges", controlnet_1_scale=scale, controlnet_1_start=start,
               controlnet_1_end=end, **settings)
    pipe = StableDiffusionXLControlNetImg2ImgPipeline(
        **sdxl_components(sdxl_parts), controlnet=engine.controlnets.models["edges"],
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    control = torch.from_numpy(frame)[None].permute(0, 3, 1, 2).float() / 255.0
    theirs = pipe(prompt="a red fox", negative_prompt="blurry" if guidance > 1 else None,
                  image=encoded(sdxl_parts, frame), control_image=control, strength=strength,
                  num_inference_steps=steps, guidance_scale=guidance, controlnet_conditioning_scale=scale,
                  control_guidance_start=start, control_guidance_end=end,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    error = relative_error(ours, theirs)
    assert error <= TOLERANCE, f"relative error {error:.2e}"
    base = run(DiffusionEngine.from_parts(sdxl_parts), frame, **settings)
    assert (ours - base).abs().max() > 1e-3  # the ControlNet did something


def test_an_sd_controlnet_is_refused_on_sdxl_and_an_sdxl_one_on_sd(sdxl_parts, parts, tmp_path):
    random_controlnet(parts.unet, seed=1).save_pretrained(tmp_path / "sd", safe_serialization=True)
    random_controlnet(sdxl_parts.unet, seed=1).save_pretrained(tmp_path / "sdxl", safe_serialization=True)
    with pytest.raises(ModelError, match="SD 1.x/2.x ControlNet cannot run on the loaded SDXL") as caught:
        load_controlnet(tmp_path / "sd", sdxl_parts.unet, CPU, torch.float32)
    assert caught.value.code == "model_mismatch"
    with pytest.raises(ModelError, match="SDXL ControlNet cannot run on the loaded SD 1.x/2.x") as caught:
        load_controlnet(tmp_path / "sdxl", parts.unet, CPU, torch.float32)
    assert caught.value.code == "model_mismatch"


def test_sdxl_controlnet_single_file_takes_its_architecture_from_the_unet(sdxl_parts, sdxl_controlnet_dir,
                                                                           tmp_path):
    from safetensors.torch import save_file

    model = load_controlnet(sdxl_controlnet_dir / "edges", sdxl_parts.unet, CPU, torch.float32)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()},
              str(tmp_path / "edges.safetensors"))
    single = load_controlnet(tmp_path / "edges.safetensors", sdxl_parts.unet, CPU, torch.float32)
    assert single.config.addition_embed_type == "text_time"
    for key, value in model.state_dict().items():
        assert torch.equal(single.state_dict()[key], value), key


def test_sdxl_vae_runs_in_fp32_under_an_fp16_model(tiny_sdxl_dir, frame):
    """SDXL's VAE overflows in fp16; with force_upcast in its config it runs in fp32, as diffusers' SDXL
    pipelines run it, and the frame comes out in the model's dtype."""
    from sdbridge.engines.models import load_pipeline_parts

    half = load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float16)
    half.taesd = None
    assert half.vae.config.force_upcast
    engine = DiffusionEngine.from_parts(half)
    assert engine.autoencoder_dtype == torch.float32 and half.vae.dtype == torch.float32
    assert half.unet.dtype == torch.float16
    image = run(engine, frame, steps=2, strength=0.5)
    assert image.dtype == torch.float16 and bool(torch.isfinite(image).all())
    full = run(DiffusionEngine.from_parts(_fp32(tiny_sdxl_dir)), frame, steps=2, strength=0.5)
    assert relative_error(image.float(), full) <= 5e-2   # fp16 UNet and text encoders, fp32 VAE


def _fp32(folder):
    from sdbridge.engines.models import load_pipeline_parts

    loaded = load_pipeline_parts(str(folder), CPU, torch.float32)
    loaded.taesd = None
    return loaded


def test_an_engine_without_sdxl_support_refuses_it_at_load(sdxl_parts):
    class NoSdxl(DiffusionEngine):
        name = "no-sdxl"
        supports_sdxl = False

    with pytest.raises(ModelError, match="not supported by the no-sdxl engine"):
        NoSdxl.from_parts(sdxl_parts)


# --- IP-Adapter --------------------------------------------------------------------------------------------


def test_ip_adapter_parity_with_diffusers_sdxl_img2img(sdxl_parts, frame, tmp_path):
    """A style image on SDXL (pooled embeds and time ids beside the image tokens) is diffusers' IP-Adapter."""
    import copy

    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor

    from sdbridge.engines.base import CONDITIONS
    from sdbridge.engines.tiny import write_random_ip_adapter

    folder = tmp_path / "ip_adapter"
    write_random_ip_adapter(folder, sdxl_parts.unet, name="style", seed=4)
    style = np.full((64, 64, 3), (30, 200, 90), np.uint8)
    engine = DiffusionEngine.from_parts(sdxl_parts)
    engine.models_dir = str(tmp_path)
    state = StreamState("s")
    state.data[CONDITIONS] = {1: style}
    engine.prepare(engine_params(steps=2, strength=1.0, guidance=3.0, ip_adapter="style", ip_adapter_scale=0.8))
    engine.ip_adapters.wait()
    engine.ip_adapters.condition(state.data, frame)
    ours = engine.step_float(torch.from_numpy(frame)[None], [state])

    components = sdxl_components(sdxl_parts)
    components["unet"] = copy.deepcopy(sdxl_parts.unet)
    pipe = StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=False,
                                            force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="style.safetensors",
                         image_encoder_folder=str(folder / "image_encoder"))
    size = pipe.image_encoder.config.image_size
    pipe.feature_extractor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe(prompt="a red fox", image=encoded(sdxl_parts, frame), ip_adapter_image=Image.fromarray(style),
                  strength=1.0, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images
    assert relative_error(ours, theirs) <= TOLERANCE
    base = run(DiffusionEngine.from_parts(sdxl_parts), frame, steps=2, strength=1.0, guidance=3.0)
    assert (ours - base).abs().max() > 1e-3

"""One-shot generation (the A1111 API's txt2img/img2img) against diffusers, and its A1111 rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.generate import Generation, GenerationError, GenerationRequest, hires_upscaler, image_noise
from sdbridge.engines.models import load_pipeline_parts
from sdbridge.engines.samplers import make_scheduler, set_timesteps
from sdbridge.errors import SdbridgeError
from tests.unit.engines.common import decoded_run, relative_error

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> DiffusionEngine:
    return DiffusionEngine.from_parts(load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32))


def run(engine: DiffusionEngine, **fields) -> Generation:
    values = dict(prompt="a red fox", steps=3, width=64, height=64, seed=11, cfg_scale=5.0, sampler_name="Euler")
    values.update(fields)
    generation = Generation(engine, GenerationRequest(**values))
    steps = sum(1 for _ in generation.run())
    assert steps >= 1
    return generation


# Not DPM++ 2M: it runs A1111's fractional timesteps and start (QA 33 L3), where diffusers' pipeline rounds and
# starts at the noise itself (test_txt2img_s_first_unet_input_is_a1111_s). Nor DDIM, PLMS and UniPC: A1111's own
# timestep grid and last step (tests/unit/engines/test_a1111_timesteps.py).
@pytest.mark.parametrize("sampler, cls", [("Euler", "EulerDiscreteScheduler"),
                                          ("Heun Karras", "HeunDiscreteScheduler")])
def test_txt2img_matches_the_diffusers_pipeline(engine, sampler, cls):
    """Same weights, same starting noise, same scheduler: our float output equals StableDiffusionPipeline's."""
    import diffusers

    parts = engine.parts
    request = GenerationRequest(prompt="a red fox", negative_prompt="blur", steps=4, width=64, height=64, seed=7,
                                cfg_scale=4.0, sampler_name=sampler)
    ours = decoded_run(engine, request)
    scheduler = make_scheduler(parts.scheduler.config, sampler, a1111=True)  # as a one-shot request's
    assert type(scheduler).__name__ == cls
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = image_noise(7, 0, 0.0, (4, 8, 8))[None]
    theirs = pipe(prompt="a red fox", negative_prompt="blur", num_inference_steps=4, guidance_scale=4.0,
                  height=64, width=64, latents=latents, output_type="pt").images
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error <= 1e-4, f"{sampler}: relative error {error}"


def test_seeds_follow_a1111_and_do_not_depend_on_batch_position(engine):
    batch = run(engine, seed=100, batch_size=3, sampler_name="Euler a")
    assert batch.used_seeds == [100, 101, 102]
    alone = run(engine, seed=101, batch_size=1, sampler_name="Euler a")
    difference = np.abs(batch.images[1].astype(int) - alone.images[0].astype(int)).max()
    assert difference <= 1, difference
    again = run(engine, seed=100, batch_size=1, sampler_name="Euler a")
    assert np.array_equal(again.images[0], batch.images[0]) or \
        np.abs(again.images[0].astype(int) - batch.images[0].astype(int)).max() <= 1
    assert not np.array_equal(batch.images[0], batch.images[1])


def test_n_iter_and_random_seed(engine):
    generation = run(engine, seed=-1, batch_size=2, n_iter=2)
    assert len(generation.images) == 4
    first = generation.used_seeds[0]
    assert generation.used_seeds == [first, first + 1, first + 2, first + 3]
    assert generation.progress.job_count == 2


def test_variation_seed_moves_the_image_by_its_strength(engine):
    base = run(engine, seed=5, subseed=9, subseed_strength=0.0).images[0].astype(int)
    slight = run(engine, seed=5, subseed=9, subseed_strength=0.1).images[0].astype(int)
    strong = run(engine, seed=5, subseed=9, subseed_strength=0.9).images[0].astype(int)
    assert np.abs(base - slight).mean() < np.abs(base - strong).mean()
    assert np.abs(base - slight).mean() > 0


def test_hires_fix_gives_the_upscaled_size(engine):
    latent = run(engine, enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=1).images[0]
    assert latent.shape == (96, 96, 3)
    pixel = run(engine, enable_hr=True, hr_resize_x=128, hr_resize_y=80, hr_upscaler="Lanczos",
                hr_second_pass_steps=1).images[0]
    assert pixel.shape == (80, 128, 3)


def test_hires_upscalers_are_a1111s_names_and_each_one_runs_its_own_resize(engine):
    assert hires_upscaler(" latent (Nearest-Exact) ") == "Latent (nearest-exact)"
    with pytest.raises(GenerationError, match=r"unknown hr_upscaler 'R-ESRGAN 4x\+' \(known: Latent, .*Nearest\)"):
        Generation(engine, GenerationRequest(enable_hr=True, hr_upscaler="R-ESRGAN 4x+"))
    Generation(engine, GenerationRequest(hr_upscaler="R-ESRGAN 4x+"))  # not read without the hires fix
    # one hires step is enough to tell the resizes apart (A1111 runs exactly the hires steps asked for)
    images = {name: run(engine, enable_hr=True, hr_scale=1.5, hr_upscaler=name, denoising_strength=0.3,
                        hr_second_pass_steps=1).images[0]
              for name in ("Lanczos", "Nearest", "Latent", "Latent (nearest)")}
    assert all(image.shape == (96, 96, 3) for image in images.values())
    assert not np.array_equal(images["Lanczos"], images["Nearest"])
    assert not np.array_equal(images["Latent"], images["Latent (nearest)"])


def test_the_hires_prompt_runs_the_second_pass_as_prompt_editing_at_the_first_pass_s_end(engine):
    """A1111 counts a hires pass's prompt editing on from the first pass: ``[a:b:3]`` after 3 steps is ``a`` for the
    first pass and ``b`` for the whole hires pass, which is what ``hr_prompt`` asks for."""
    hires = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.6, negative_prompt="blurry", hr_second_pass_steps=1)
    plain = run(engine, **hires).images[0]
    edited = run(engine, **{**hires, "prompt": "[a red fox:a blue bird:3]",
                            "negative_prompt": "[blurry:ugly, grainy:3]"}).images[0]
    own = run(engine, **hires, hr_prompt="a blue bird", hr_negative_prompt="ugly, grainy").images[0]
    np.testing.assert_array_equal(own, edited)
    assert not np.array_equal(own, plain)
    # Empty or the same: the first pass's prompt.
    np.testing.assert_array_equal(run(engine, **hires, hr_prompt="a red fox").images[0], plain)
    np.testing.assert_array_equal(run(engine, **hires, hr_prompt="", hr_negative_prompt="").images[0], plain)


@pytest.mark.parametrize("sampler", ["DDIM", "LCM", "TCD", "Euler"])
def test_a_hires_pass_longer_than_the_model_s_timesteps_runs_its_steps(engine, sampler):
    """A1111's hires rule spans int(steps / strength) steps: 25 at 0.02 is 1250, more than DDIM, LCM and TCD take
    (QA 37: a 500); those run their steps over the model's 1000, a sigma schedule over 1250 as A1111's."""
    generation = Generation(engine, GenerationRequest(prompt="a red fox", sampler_name=sampler, steps=3, width=64,
                                                      height=64, enable_hr=True, denoising_strength=0.02,
                                                      hr_second_pass_steps=25))
    scheduler = generation._scheduler([1], *generation.request.hires_sampler())
    timesteps = generation._img2img_timesteps(scheduler, 25, 0.02, fixed=True)
    # A1111's DDIM steps from grid point t_enc - 1 = 23 down to point 1 (on the grid of the model's 1000: A1111's own
    # 1000 // 1250 is 0, a ValueError there).
    assert len(timesteps) == (23 if sampler == "DDIM" else 25), (sampler, len(timesteps))
    assert generation.request.warnings == []
    # more steps than LCM's original schedule: the most it runs, said (a txt2img of 60 answered 500 too)
    if sampler in ("LCM", "TCD"):
        assert len(generation._img2img_timesteps(scheduler, 60, 0.5)) == 26  # A1111's int(0.5 * 50) + 1
        assert generation.request.warnings == [f"{sampler}Scheduler runs at most 50 steps: 50 ran of the 60 asked "
                                               "for"]


def test_the_hires_sampler_and_schedule_run_the_second_pass_only(engine):
    hires = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.6)
    plain = run(engine, **hires)
    np.testing.assert_array_equal(run(engine, **hires, hr_sampler_name="Euler").images[0], plain.images[0])
    # Heun, not DDIM: at eta 0 DDIM is Euler's method, and A1111's 3 hires steps from one sigma gave the same pixels.
    heun = run(engine, **hires, hr_sampler_name="Heun")
    assert not np.array_equal(heun.images[0], plain.images[0])
    assert type(heun._scheduler([1], *heun.request.hires_sampler())).__name__ == "HeunDiscreteScheduler"
    assert type(heun._scheduler([1])).__name__ == "EulerDiscreteScheduler"
    # A bare hires sampler keeps the first pass's schedule where it takes it, else its own default (A1111's fix-up).
    assert GenerationRequest(scheduler="karras", hr_sampler_name="DPM++ 2M").hires_sampler() == ("DPM++ 2M", "karras")
    assert GenerationRequest(scheduler="karras", hr_sampler_name="DDIM").hires_sampler() == ("DDIM", "automatic")
    assert GenerationRequest(sampler_name="Euler", hr_scheduler="karras").hires_sampler() == ("Euler", "karras")
    with pytest.raises(SdbridgeError, match="unknown sampler 'nope'"):
        Generation(engine, GenerationRequest(enable_hr=True, hr_sampler_name="nope"))


def test_img2img_resize_modes_and_strength(engine):
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    for mode in (0, 1, 2):
        image = run(engine, init_images=[source], denoising_strength=0.5, resize_mode=mode).images[0]
        assert image.shape == (64, 64, 3)
    smooth = np.zeros((64, 64, 3), np.uint8)
    smooth[:, :32] = (200, 40, 40)
    weak = run(engine, init_images=[smooth], denoising_strength=0.2, steps=10).images[0].astype(int)
    strong = run(engine, init_images=[smooth], denoising_strength=1.0, steps=10).images[0].astype(int)
    vae_only = Generation(engine, GenerationRequest(width=64, height=64))
    pixels = torch.from_numpy(smooth).permute(2, 0, 1)[None].float() / 127.5 - 1
    roundtrip = vae_only._to_uint8(vae_only._decode(vae_only._encode(pixels)))[0].astype(int)
    # A low denoising strength stays near the input (through the VAE); full strength does not.
    assert np.abs(weak - roundtrip).mean() < np.abs(strong - roundtrip).mean()


def test_img2img_noise_multiplier_scales_the_starting_noise(engine):
    """A1111's initial_noise_multiplier scales the noise img2img starts from: at 0 the UNet's first input is the
    init's latents alone (Euler scales them, adding sigma * 0 of noise)."""
    smooth = np.zeros((64, 64, 3), np.uint8)
    smooth[:, :32] = (200, 40, 40)
    common = dict(init_images=[smooth], denoising_strength=0.6, steps=1)
    plain, scaled = (run(engine, initial_noise_multiplier=m, **common) for m in (1.0, 0.5))
    assert np.array_equal(plain.images[0], run(engine, **common).images[0])  # 1 is the default
    assert not np.array_equal(plain.images[0], scaled.images[0])
    quiet = Generation(engine, GenerationRequest(width=64, height=64, initial_noise_multiplier=0.0, steps=1,
                                                 sampler_name="Euler", cfg_scale=1.0, prompt="a red fox",
                                                 init_images=[smooth], denoising_strength=0.6))
    starts: list[torch.Tensor] = []
    hook = engine.parts.unet.register_forward_pre_hook(lambda module, args: starts.append(args[0].clone()))
    try:
        for _ in quiet.run():
            pass
    finally:
        hook.remove()
    pixels = torch.from_numpy(smooth).permute(2, 0, 1)[None].float() / 127.5 - 1
    init = quiet._encode(pixels)
    scale = float((starts[0] / init).flatten().median())  # Euler's scale_model_input: x / sqrt(sigma^2 + 1)
    assert 0 < scale < 1 and torch.allclose(starts[0], init * scale, rtol=1e-4, atol=1e-5)  # no noise in it


@pytest.mark.parametrize("fill, full_res, sampler", [
    *((fill, full_res, "Euler a") for fill in range(4) for full_res in (False, True)),
    (1, False, "UniPC")])  # A1111's UniPC noises the known latent to its fractional model times
def test_inpainting_keeps_the_pixels_outside_the_mask(engine, fill, full_res, sampler):
    rng = np.random.default_rng(2)
    source = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255
    generation = run(engine, init_images=[source], mask=mask, mask_blur=2, inpainting_fill=fill,
                     inpaint_full_res=full_res, inpaint_full_res_padding=4, denoising_strength=0.9,
                     sampler_name=sampler)
    out = generation.images[0].astype(int)
    outside = np.ones((64, 64), bool)
    outside[10:46, 14:50] = False          # the mask grown by more than its blur
    assert np.abs(out - source.astype(int))[outside].max() <= 1
    inside = np.abs(out - source.astype(int))[20:36, 24:40].mean()
    assert inside > 5, "the masked area was repainted"
    inverted = run(engine, init_images=[source], mask=mask, mask_blur=0, inpainting_mask_invert=True,
                   inpaint_full_res=False, denoising_strength=0.9).images[0].astype(int)
    assert np.abs(inverted - source.astype(int))[18:38, 22:42].max() <= 1


def test_interrupt_stops_between_steps_and_keeps_finished_images(engine):
    generation = Generation(engine, GenerationRequest(prompt="x", steps=6, width=64, height=64, n_iter=3, seed=1))
    steps = generation.run()
    for _ in range(8):      # the first batch's six steps, its decode, and one step of the second
        next(steps)
    generation.progress.interrupted = True
    for _ in steps:
        pass
    assert len(generation.images) in (1, 2)
    assert generation.progress.sampling_step < 6 or len(generation.images) == 1


def test_progress_preview_comes_from_the_current_latents(engine):
    generation = Generation(engine, GenerationRequest(prompt="x", steps=4, width=64, height=64, seed=1))
    steps = generation.run()
    next(steps)
    assert generation.progress.preview is None
    generation.request_preview()
    next(steps)
    assert generation.progress.preview is not None and generation.progress.preview.shape == (64, 64, 3)
    assert 0 < generation.progress.fraction < 1


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_split_guidance_gives_the_same_image_in_twice_the_yields(engine, sampler):
    """With a stream live, guidance runs as two half-batch UNet calls with a yield between (the
    stream's turn): the same image, and no yield longer than one single-batch UNet call."""
    def generate(split: bool) -> tuple[Generation, int]:
        request = GenerationRequest(prompt="a red fox", negative_prompt="blur", steps=4, width=64, height=64,
                                    seed=7, cfg_scale=5.0, sampler_name=sampler, batch_size=2)
        generation = Generation(engine, request)
        generation.split_guidance = split
        yields = sum(1 for _ in generation.run())
        return generation, yields

    whole, whole_yields = generate(False)
    split, split_yields = generate(True)
    assert split_yields == whole_yields + 4          # one more yield per step: between the halves
    for ours, theirs in zip(split.images, whole.images):
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_final_decode_yields_between_images_and_gives_the_batch_decode(engine, kind):
    """A stream frame waits for one image's VAE decode, not the batch's: a yield before each image's
    decode, and the images the whole batch decoded at once gives."""
    extra = {"init_images": [np.full((64, 64, 3), 90, np.uint8)], "denoising_strength": 1.0} \
        if kind == "img2img" else {}

    def generate(batch_size: int) -> tuple[Generation, int]:
        generation = Generation(engine, GenerationRequest(prompt="a red fox", steps=3, width=64, height=64, seed=5,
                                                          cfg_scale=5.0, sampler_name="Euler",
                                                          batch_size=batch_size, **extra))
        return generation, sum(1 for _ in generation.run())

    single, single_yields = generate(1)
    batch, batch_yields = generate(3)
    # One more decode and one more yield per extra image; img2img's encode yields between images too (QA 68 F11).
    assert batch_yields == single_yields + 2 * (2 if kind == "img2img" else 1)
    assert batch._latents is not None and batch._latents.shape[0] == 3
    reference = batch._to_uint8(batch._decode(batch._latents))  # the batch decoded in one call
    assert len(batch.images) == 3
    # A convolution's float sums differ by batch size in the last bits: one level of 255 at most.
    for ours, theirs in zip(batch.images, reference):
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert np.abs(batch.images[0].astype(int) - single.images[0].astype(int)).max() <= 1


# --- SDXL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_engine(tiny_sdxl_dir) -> DiffusionEngine:
    """The tiny SDXL, decoding with its full VAE (as A1111 and diffusers' pipelines do)."""
    parts = load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32)
    parts.taesd = None
    return DiffusionEngine.from_parts(parts)


@pytest.mark.parametrize("negative", ["blur", ""])
def test_sdxl_txt2img_matches_the_diffusers_pipeline(sdxl_engine, negative):
    """SDXL's pooled embeds and time ids go with each UNet call; an empty negative prompt is zeros (A1111's rule
    for SDXL, sd_models_xl; diffusers zeros a missing one). Same weights, same starting noise: the output of
    StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline

    parts = sdxl_engine.parts
    request = GenerationRequest(prompt="a red fox", negative_prompt=negative, steps=3, width=64, height=48, seed=7,
                                cfg_scale=4.0, sampler_name="Euler")
    ours = decoded_run(sdxl_engine, request)
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2, unet=parts.unet, add_watermarker=False,
        scheduler=make_scheduler(parts.scheduler.config, "Euler", a1111=True))
    pipe.set_progress_bar_config(disable=True)
    scale = sdxl_engine.vae_scale_factor
    latents = image_noise(7, 0, 0.0, (4, 48 // scale, 64 // scale))[None]
    theirs = pipe(prompt="a red fox", negative_prompt=negative or None, num_inference_steps=3, guidance_scale=4.0,
                  height=48, width=64, latents=latents, output_type="pt").images
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error <= 1e-4, f"negative {negative!r}: relative error {error}"


def test_sdxl_img2img_hires_and_split_guidance_run_with_their_own_sizes(sdxl_engine):
    """img2img and the hires fix's second pass (time ids at its size), and guidance split in two halves
    around the stream's turn: the same image as in one call."""
    init = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img2img = run(sdxl_engine, init_images=[init], denoising_strength=0.6, cfg_scale=3.0)
    assert img2img.images[0].shape == (64, 64, 3)
    hires = run(sdxl_engine, width=32, height=32, enable_hr=True, hr_scale=2.0, hr_upscaler="Latent",
                denoising_strength=0.5)
    assert hires.images[0].shape == (64, 64, 3)

    def generate(split: bool) -> np.ndarray:
        generation = Generation(sdxl_engine, GenerationRequest(prompt="a red fox", negative_prompt="blur", steps=3,
                                                               width=64, height=64, seed=3, cfg_scale=5.0,
                                                               sampler_name="Euler", batch_size=2))
        generation.split_guidance = split
        for _ in generation.run():
            pass
        return np.stack(generation.images).astype(int)

    assert np.abs(generate(True) - generate(False)).max() <= 1


# --- A1111's RNG ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["Euler a", "DPM2 a"])
def test_ancestral_step_noise_continues_the_seed_s_generator(engine, sampler):
    """A1111 (RNG source CPU) draws the starting noise and then each step's noise from one CPU generator per
    image, as diffusers' pipeline does with a CPU generator: the same image. A generator seeded afresh for the
    steps would add the starting noise back at the first step."""
    import diffusers

    parts = engine.parts
    request = GenerationRequest(prompt="a red fox", negative_prompt="blur", steps=4, width=64, height=64, seed=7,
                                cfg_scale=4.0, sampler_name=sampler)
    ours = decoded_run(engine, request)
    scheduler = make_scheduler(parts.scheduler.config, sampler, a1111=True)
    diffusers_own = scheduler.set_timesteps

    def a1111_schedule(steps: int, device=None, **_) -> None:
        """The pipeline's set_timesteps call gets A1111's schedule (DPM2 a's: its next-to-last sigma dropped)."""
        scheduler.set_timesteps = diffusers_own
        try:
            set_timesteps(scheduler, steps, device)
        finally:
            scheduler.set_timesteps = a1111_schedule

    scheduler.set_timesteps = a1111_schedule
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a red fox", negative_prompt="blur", num_inference_steps=4, guidance_scale=4.0, height=64,
                  width=64, generator=torch.Generator("cpu").manual_seed(7), output_type="pt").images
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error <= 1e-4, f"{sampler}: relative error {error}"


def test_variation_seeds_keep_the_seed_across_a_batch():
    """A1111's process_images_inner: with a variation seed blending in, the batch is variations of one image."""
    varied = GenerationRequest(seed=100, subseed=500, subseed_strength=0.3, batch_size=2, n_iter=2)
    assert varied.resolve_seeds() == ([100] * 4, [500, 501, 502, 503])
    plain = GenerationRequest(seed=100, subseed=500, batch_size=2, n_iter=2)
    assert plain.resolve_seeds() == ([100, 101, 102, 103], [500, 501, 502, 503])


def test_the_subseed_blend_is_a_slerp_per_channel_and_column():
    """A1111's rng.slerp on [C, H, W] noise: each (channel, column) vector interpolated on its own sphere."""
    from sdbridge.engines.generate import slerp

    low = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1))
    high = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(2))
    blended = slerp(0.3, low, high)
    for c in range(4):
        for x in range(5):
            a, b = low[c, :, x], high[c, :, x]
            omega = torch.acos(torch.dot(a / a.norm(), b / b.norm()))
            expected = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * b) / torch.sin(omega)
            assert torch.allclose(blended[c, :, x], expected, atol=1e-5)


def test_seed_resize_pastes_the_noise_of_the_other_size_centred():
    """seed_resize_from_w/h (A1111's ImageRNG.first): the seed's noise at that size, in the middle; the seed's
    own noise at this size around it (smaller) or a centred crop (larger)."""
    def fresh(shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(9))

    smaller = image_noise(9, 0, 0.0, (4, 8, 8), resize_from=(32, 32))
    assert torch.equal(smaller[:, 2:6, 2:6], fresh((4, 4, 4)))
    outside = torch.ones(4, 8, 8, dtype=torch.bool)
    outside[:, 2:6, 2:6] = False
    assert torch.equal(smaller[outside], fresh((4, 8, 8))[outside])
    larger = image_noise(9, 0, 0.0, (4, 8, 8), resize_from=(128, 96))
    assert torch.equal(larger, fresh((4, 12, 16))[:, 2:10, 4:12])
    assert torch.equal(image_noise(9, 0, 0.0, (4, 8, 8), resize_from=(64, 64)), fresh((4, 8, 8)))


def test_a_cfg_scale_below_one_guides_towards_the_negative_prompt(engine):
    """A1111 computes uncond + scale * (cond - uncond) for any scale: at 0 the negative prompt's image."""
    at_zero = run(engine, prompt="a red fox", negative_prompt="a blue car", cfg_scale=0.0)
    negative_alone = run(engine, prompt="a blue car", negative_prompt="", cfg_scale=1.0)
    positive_alone = run(engine, prompt="a red fox", negative_prompt="a blue car", cfg_scale=1.0)
    assert np.abs(at_zero.images[0].astype(int) - negative_alone.images[0].astype(int)).max() <= 1
    assert np.abs(at_zero.images[0].astype(int) - positive_alone.images[0].astype(int)).max() > 2


def test_dpm_sde_images_do_not_depend_on_their_batch_position(engine):
    """DPM++ SDE's Brownian tree is seeded per image (A1111's create_noise_sampler), not by the batch's first seed."""
    alone = run(engine, sampler_name="DPM++ SDE", seed=11, steps=3)
    second = run(engine, sampler_name="DPM++ SDE", seed=10, batch_size=2, steps=3)
    assert np.abs(alone.images[0].astype(int) - second.images[1].astype(int)).max() <= 1


def test_hires_resize_of_another_aspect_covers_and_crops_as_a1111(engine):
    """hr_resize_x/y (A1111's calculate_target_resolution): scale to cover the target keeping the first pass's
    shape, crop the middle; one side alone keeps the aspect ratio."""
    plan = GenerationRequest(width=64, height=64, enable_hr=True, hr_resize_x=128, hr_resize_y=64).hires_plan()
    assert plan == ((128, 64), (128, 128))
    assert GenerationRequest(width=96, height=64, hr_resize_x=128).hires_plan() == ((128, 80), (128, 80))
    assert GenerationRequest(width=64, height=96, hr_resize_y=128).hires_plan() == ((80, 128), (80, 128))
    assert GenerationRequest(width=64, height=64, hr_scale=1.5).hires_plan() == ((96, 96), (96, 96))
    # Both kinds of upscaler (in pixels, in latents) cover, then crop to the target.
    for upscaler in ("Nearest", "Latent"):
        generation = run(engine, width=64, height=64, enable_hr=True, hr_upscaler=upscaler, hr_resize_x=128,
                         hr_resize_y=64, denoising_strength=0.5, steps=2)
        assert generation.images[0].shape == (64, 128, 3)


def test_a_long_prompt_and_a_short_negative_run_as_two_unet_calls_unpadded(engine, monkeypatch):
    """A1111's default (pad_cond_uncond off): a cond of several 77-token chunks and an uncond of one go through
    the UNet apart, the shorter not padded with the empty prompt (which would change the image)."""
    long_prompt = ", ".join(["a red fox in the snow"] * 20)
    calls: list[int] = []
    hook = engine.parts.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        apart = run(engine, prompt=long_prompt, negative_prompt="blur", steps=2)
    finally:
        hook.remove()
    assert len(calls) == 4 and calls[0] == 77 and calls[1] > 77  # each step: the uncond call, then the cond call
    assert not apart.padded_conds
    original = engine.encode_prompt_pair
    monkeypatch.setattr(engine, "encode_prompt_pair",
                        lambda *args, **kwargs: original(*args, **{**kwargs, "pad": True}))
    padded = run(engine, prompt=long_prompt, negative_prompt="blur", steps=2)
    assert not np.array_equal(padded.images[0], apart.images[0])  # padding is not neutral: A1111 does not pad


def test_prompt_editing_and_alternation_change_the_prompt_between_steps(engine):
    """A1111's [from:to:when] and [a|b] (prompt_schedule.py): the UNet sees each prompt at A1111's steps."""
    fox, _, _ = engine.encode_prompt_pair("a red fox", "")
    car, _, _ = engine.encode_prompt_pair("a blue car", "")
    seen: list[str] = []

    def record(module, args, kwargs):
        states = kwargs["encoder_hidden_states"][-1:]  # the cond row (the uncond row first when guided)
        seen.append("fox" if torch.equal(states, fox) else "car" if torch.equal(states, car) else "?")

    hook = engine.parts.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        edited = run(engine, prompt="[a red fox:a blue car:0.5]", negative_prompt="", steps=4)
        edit_seen, seen[:] = list(seen), []
        run(engine, prompt="[a red fox|a blue car]", negative_prompt="", steps=4)
        alternate_seen = list(seen)
    finally:
        hook.remove()
    assert edit_seen == ["fox", "fox", "fox", "car"]  # A1111: the counter 0..2 is <= 2 (0.5 of 4 steps)
    assert alternate_seen == ["fox", "fox", "car", "fox"]  # A1111's end steps 1, 2, 3, 4 against a counter from 0
    never = run(engine, prompt="[a red fox:a blue car:10]", negative_prompt="", steps=4)
    plain = run(engine, prompt="a red fox", negative_prompt="", steps=4)
    assert np.array_equal(never.images[0], plain.images[0])
    assert not np.array_equal(edited.images[0], plain.images[0])


def test_network_tags_come_out_before_schedules_and_and_weights(engine):
    """A1111 takes <...:...> tags out before it parses schedules and AND weights; their ':' broke both (QA 24:
    '[a <lora:foo:0.8>:b:5]' never switched, and 'a cat:1.2 <lora:x:1>' lost its weight)."""
    fox, _, _ = engine.encode_prompt_pair("a red fox", "")
    car, _, _ = engine.encode_prompt_pair("a blue car", "")
    seen: list[str] = []

    def record(module, args, kwargs):
        states = kwargs["encoder_hidden_states"][-1:]
        seen.append("fox" if torch.equal(states, fox) else "car" if torch.equal(states, car) else "?")

    hook = engine.parts.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(engine, prompt="[a red fox <hypernet:x:0.8>:a blue car:0.5]", negative_prompt="", steps=4)
    finally:
        hook.remove()
    assert seen == ["fox", "fox", "fox", "car"]
    tagged = final_latents(engine, prompt="a red fox:1.5 <hypernet:x:1> AND a blue car", steps=2)
    weighted = final_latents(engine, prompt="a red fox:1.5 AND a blue car", steps=2)
    unweighted = final_latents(engine, prompt="a red fox AND a blue car", steps=2)
    assert torch.equal(tagged, weighted) and not torch.equal(tagged, unweighted)


def test_a_prompt_weight_that_would_overflow_is_refused(engine):
    from sdbridge.errors import ParamError

    for fields in ({"prompt": "(a cat:1" + "0" * 40 + ")"}, {"negative_prompt": "(blur:" + "9" * 60 + ")"},
                   {"prompt": "a cat AND a dog:1" + "0" * 40}):
        with pytest.raises(ParamError, match="out of range") as caught:
            run(engine, **fields)
        assert caught.value.code == "bad_param"


# --- composable prompts (AND) -------------------------------------------------------------------


def final_latents(engine: DiffusionEngine, **fields) -> torch.Tensor:
    generation = run(engine, **fields)
    assert generation._latents is not None
    return generation._latents.float()


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("long", [False, True])
def test_and_adds_each_part_s_guidance_by_its_weight(engine, cfg, long):
    """A1111's combine_denoised: uncond + cfg * sum(w_i * (cond_i - uncond)). One Euler step is affine in the noise
    prediction, so the latents of ``A AND B:w`` are those of A, plus w times what B's guidance adds to the negative
    prompt's own (cfg 0). ``long``: parts of two chunks against a one-chunk negative, run as two UNet calls."""
    first, second = ("a red fox", "a blue car") if not long else (", ".join(["a red fox"] * 20),
                                                                  ", ".join(["a blue car"] * 20))
    common = dict(steps=1, negative_prompt="blur", seed=21, cfg_scale=cfg)
    composed = final_latents(engine, prompt=f"{first} AND {second}:0.5", **common)
    alone_first = final_latents(engine, prompt=first, **common)
    alone_second = final_latents(engine, prompt=second, **common)
    negative_only = final_latents(engine, prompt=first, **{**common, "cfg_scale": 0.0})
    expected = alone_first + 0.5 * (alone_second - negative_only)
    assert relative_error(composed, expected) <= 1e-5
    assert relative_error(composed, alone_first) > 1e-3  # the second part moved it


def test_a_trailing_weight_scales_guidance_and_a_zero_weight_part_adds_nothing(engine):
    """A1111 reads ``a red fox:2`` as one part of weight 2 (twice the guidance), not as text; a part of weight 0
    leaves the image of the others."""
    doubled = run(engine, prompt="a red fox:2", cfg_scale=3.0)
    twice_the_scale = run(engine, prompt="a red fox", cfg_scale=6.0)
    assert np.abs(doubled.images[0].astype(int) - twice_the_scale.images[0].astype(int)).max() <= 1
    silent = run(engine, prompt="a red fox AND a blue car:0", negative_prompt="blur")
    plain = run(engine, prompt="a red fox", negative_prompt="blur")
    assert np.abs(silent.images[0].astype(int) - plain.images[0].astype(int)).max() <= 1
    unguided = run(engine, prompt="a red fox", cfg_scale=1.0)
    weighted = run(engine, prompt="a red fox:1.5", cfg_scale=1.0)  # a weight guides even at cfg 1
    assert not np.array_equal(unguided.images[0], weighted.images[0])


def test_and_parts_share_one_unet_batch_and_split_guidance_gives_the_same_image(engine):
    """Three parts and the negative run as one UNet batch of 4 rows per image; split around the stream's turn,
    the negative first, then the parts: the same latents."""
    rows: list[int] = []
    hook = engine.parts.unet.register_forward_pre_hook(lambda module, args, kwargs: rows.append(args[0].shape[0]),
                                                       with_kwargs=True)
    prompt = "a red fox AND a blue car:0.7 AND [snow:rain:0.5]:0.3"
    try:
        together = run(engine, prompt=prompt, steps=2, batch_size=2)
    finally:
        hook.remove()
    assert rows == [8, 8]
    request = GenerationRequest(prompt=prompt, steps=2, width=64, height=64, seed=11, cfg_scale=5.0,
                                sampler_name="Euler", batch_size=2)
    split = Generation(engine, request)
    split.split_guidance = True
    yields = sum(1 for _ in split.run())
    assert yields >= 4
    assert relative_error(split._latents, together._latents) <= 1e-5


def test_sdxl_and_takes_each_part_s_pooled_embeds(sdxl_engine):
    """SDXL: each part brings its pooled embeds (and time ids) to its rows: the same affine check as above."""
    common = dict(steps=1, negative_prompt="blur", seed=21, cfg_scale=4.0, width=64, height=48)
    composed = final_latents(sdxl_engine, prompt="a red fox AND a blue car:0.5", **common)
    first = final_latents(sdxl_engine, prompt="a red fox", **common)
    second = final_latents(sdxl_engine, prompt="a blue car", **common)
    negative_only = final_latents(sdxl_engine, prompt="a red fox", **{**common, "cfg_scale": 0.0})
    assert relative_error(composed, first + 0.5 * (second - negative_only)) <= 1e-5


def a1111_img2img_steps(steps: int, strength: float, fixed: bool = False) -> tuple[int, int, int]:
    """The oracle: A1111 1.10 modules/sd_samplers_common.py ``setup_img2img_steps`` (img2img_fix_steps off; a
    named step count, as the hires pass passes, takes its fixed branch), and sd_samplers_kdiffusion.py
    ``sample_img2img``'s ``sigmas[steps - t_enc - 1:]``. -> (schedule length, steps run, index of the first sigma)."""
    if fixed:
        length, t_enc = int(steps / min(strength, 0.999)), steps - 1
    else:
        length, t_enc = steps, int(min(strength, 0.999) * steps)
    return length, t_enc + 1, length - t_enc - 1


def unet_calls(engine: DiffusionEngine, **fields) -> tuple[Generation, list[float]]:
    """A run at cfg 1 (one UNet call a step) and the timestep of each call."""
    calls: list[float] = []
    hook = engine.parts.unet.register_forward_pre_hook(lambda module, args: calls.append(float(args[1])))
    try:
        return run(engine, cfg_scale=1.0, **fields), calls
    finally:
        hook.remove()


@pytest.mark.parametrize("steps, strength", [(20, 0.5), (10, 0.75), (7, 0.3), (5, 1.0), (4, 0.1)])
def test_img2img_runs_a1111_s_steps_from_a1111_s_sigma(engine, steps, strength):
    """QA 33 H4: diffusers' rule ran int(steps * strength) steps from a lower sigma (10 against 11 at 20 and .5)."""
    source = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    generation, calls = unet_calls(engine, init_images=[source], steps=steps, denoising_strength=strength)
    length, count, first = a1111_img2img_steps(steps, strength)
    assert len(calls) == count
    full = make_scheduler(engine.parts.scheduler.config, "Euler", a1111=True)
    set_timesteps(full, length)
    assert calls[0] == pytest.approx(float(full.timesteps[first]))
    scheduler = generation._scheduler([11])
    timesteps = generation._img2img_timesteps(scheduler, steps, strength)
    assert len(timesteps) == count and float(scheduler.sigmas[scheduler.begin_index]) == float(full.sigmas[first])


@pytest.mark.parametrize("hr_steps, strength", [(0, 0.7), (4, 0.5), (0, 0.3)])
def test_the_hires_pass_runs_exactly_its_steps_over_a_longer_schedule(engine, hr_steps, strength):
    """QA 33 M1: the hires pass names its step count (hr_second_pass_steps or steps), so A1111 runs exactly that
    many, the last of a schedule int(steps / strength) long; diffusers' rule ran int(steps * strength)."""
    steps = 6
    generation, calls = unet_calls(engine, steps=steps, enable_hr=True, hr_scale=1.5, denoising_strength=strength,
                                   hr_second_pass_steps=hr_steps)
    length, count, first = a1111_img2img_steps(hr_steps or steps, strength, fixed=True)
    assert len(calls) == steps + count == steps + (hr_steps or steps)
    full = make_scheduler(engine.parts.scheduler.config, "Euler", a1111=True)
    set_timesteps(full, length)
    assert calls[steps] == pytest.approx(float(full.timesteps[first]))


def test_txt2img_runs_a1111_s_schedule_on_a_trailing_model(engine):
    """QA 33 H2/H3: the UNet's timesteps are A1111's (uniform: 999 down to 0; DPM++ 2M's Automatic is Karras), not
    the shipped config's trailing ones (999 ... 249 at 4 steps) the live stream keeps."""
    assert engine.parts.scheduler.config["timestep_spacing"] == "trailing"
    _, calls = unet_calls(engine, steps=4, sampler_name="Euler")
    assert calls == pytest.approx([999.0, 666.0, 333.0, 0.0])
    _, one = unet_calls(engine, steps=1, sampler_name="Euler")
    assert one == [999.0]  # diffusers' own linspace gives a 1-step schedule t = 0
    generation, karras = unet_calls(engine, steps=4, sampler_name="DPM++ 2M")
    assert generation._scheduler([1]).config["use_karras_sigmas"] is True
    assert karras[0] == pytest.approx(999.0) and karras[-1] < 100


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
@pytest.mark.parametrize("img2img", [False, True])
def test_dpm_2m_sde_step_noise_comes_from_a_brownian_tree_per_seed(engine, monkeypatch, sampler, img2img):
    """QA 33 H1: A1111 (sd_samplers_kdiffusion.py create_noise_sampler) draws these samplers' step noise from
    BrownianTreeNoiseSampler(x, sigma_min > 0, sigma_max, seed=the batch's seeds) over the pass's whole schedule,
    noise(sigma_i, sigma_i+1) at step i and none into sigma 0; diffusers drew Gaussian noise from the generator.
    The oracle is diffusers' copy of k-diffusion's BrownianTreeNoiseSampler (the same draws, per QA 33)."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    noises: list[tuple[float, float, torch.Tensor | None]] = []
    step = DPMSolverMultistepScheduler.step

    def spy(self, model_output, timestep, sample, *args, variance_noise=None, **kwargs):
        index = self.step_index if self.step_index is not None else (self.begin_index or 0)
        noises.append((self.sigmas, index, variance_noise))
        return step(self, model_output, timestep, sample, *args, variance_noise=variance_noise, **kwargs)

    monkeypatch.setattr(DPMSolverMultistepScheduler, "step", spy)
    source = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    run(engine, sampler_name=sampler, seed=20, batch_size=2, steps=5,
        **(dict(init_images=[source], denoising_strength=0.6) if img2img else {}))
    sigmas = noises[0][0]
    tree = BrownianTreeNoiseSampler(torch.zeros(2, 4, 8, 8), float(sigmas[sigmas > 0].min()), float(sigmas.max()),
                                    seed=[20, 21])
    assert len(noises) == (4 if img2img else 5)
    for _, index, noise in noises:
        assert noise is not None
        if float(sigmas[index + 1]) == 0:
            assert not noise.any()
        else:
            torch.testing.assert_close(noise, tree(sigmas[index], sigmas[index + 1]), rtol=0, atol=0)


@pytest.mark.parametrize("sampler, options, applied", [
    ("Euler", {"s_churn": 1.0}, True), ("Euler", {"s_churn": 1.0, "s_tmax": 2.0, "s_noise": 0.5}, True),
    ("DPM++ 2M SDE", {"s_noise": 0.5}, True), ("DPM++ SDE", {"s_noise": 0.5}, True),
    ("Heun", {"s_churn": 1.0}, False), ("Euler a", {"eta": 0.5}, False), ("DPM2 a", {"s_noise": 0.5}, False),
    ("DPM++ 2M SDE", {"eta": 0.3}, False),
])
def test_eta_and_churn_options_apply_where_the_step_takes_them_and_warn_where_not(engine, sampler, options, applied):
    """QA 33 M4: A1111 passes eta, s_churn, s_tmin, s_tmax and s_noise to the samplers its sampler_extra_params
    name; they were dropped here without a word. Now a diffusers step that takes one gets it, else a warning."""
    plain = run(engine, sampler_name=sampler, steps=3)
    asked = run(engine, sampler_name=sampler, steps=3, **options)
    assert plain.request.warnings == []
    if applied:
        churn = ["s_churn 1 applied as diffusers' Euler does (noise added after the UNet call, where A1111 adds it "
                 "before): not A1111's picture"] if "s_churn" in options else []
        assert asked.request.warnings == churn
        assert not np.array_equal(asked.images[0], plain.images[0])
    else:
        name, value = next(iter(options.items()))
        assert asked.request.warnings == [f"{name} {value:g} ignored: diffusers' {sampler} takes no {name} "
                                          f"(A1111's default, {1.0 if name != 's_churn' else 0.0:g}, ran)"]
        np.testing.assert_array_equal(asked.images[0], plain.images[0])
    # A1111's defaults change nothing and say nothing.
    same = run(engine, sampler_name=sampler, steps=3, eta=1.0, s_churn=0.0, s_noise=1.0, s_tmin=0.0, s_tmax=0.0)
    assert same.request.warnings == [] and np.array_equal(same.images[0], plain.images[0])


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ 2M SDE", "Euler"])
def test_txt2img_s_first_unet_input_is_a1111_s(engine, sampler):
    """QA 33 L3: k-diffusion starts at x = noise * sigma_0 and the UNet gets c_in * x = x / sqrt(sigma_0^2 + 1)
    (CompVisDenoiser); diffusers' DPM-Solver started at noise itself, 0.09 apart on DPM++ 2M."""
    inputs: list[torch.Tensor] = []
    hook = engine.parts.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        generation = run(engine, sampler_name=sampler, cfg_scale=1.0, steps=4, seed=21)
    finally:
        hook.remove()
    sigma_0 = float(a1111_table_sigma_max(engine))
    noise = image_noise(21, generation.subseeds[0], 0.0, (4, 8, 8))[None]
    torch.testing.assert_close(inputs[0], noise * sigma_0 / math.sqrt(sigma_0 ** 2 + 1), rtol=1e-4, atol=1e-5)


def a1111_table_sigma_max(engine: DiffusionEngine) -> float:
    """The last of the model's sigmas, ((1 - a) / a) ** 0.5 at t = 999: every A1111 schedule here starts there."""
    config = engine.parts.scheduler.config
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    alpha = float(torch.cumprod(1 - betas, 0)[-1])
    return ((1 - alpha) / alpha) ** 0.5


# --- A1111 1.10's own sigma lists and the schedules its timestep samplers ignore (QA 37 M1) -------------------------

def kdiffusion_dpmpp_2m(denoise, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The oracle: k_diffusion.sampling.sample_dpmpp_2m, as written (first order from no history or into sigma 0,
    else the 2M midpoint), over sigmas of any last value."""
    def t_fn(sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log().neg()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, i)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def test_dpm_2m_on_kl_optimal_ends_where_k_diffusion_s_does(engine):
    """KL Optimal ends at sigma_min, not 0: k-diffusion's DPM++ 2M then takes a second-order last step and returns x
    itself, where diffusers' DPM-Solver would step down to first order and return x / sqrt(1 + sigma_min^2) (0.0245
    from A1111's oracle at 20 steps, QA 38). A 422 before."""
    calls: list[dict] = []
    hook = engine.parts.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        generation = run(engine, sampler_name="DPM++ 2M", scheduler="kl_optimal", cfg_scale=1.0, steps=4, seed=21)
    finally:
        hook.remove()
    scheduler = generation._scheduler([21])
    set_timesteps(scheduler, 4)
    sigmas, timesteps = scheduler.sigmas.double(), scheduler.timesteps
    assert float(sigmas[-1]) > 0.02 and len(calls) == 4

    @torch.inference_mode()
    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:  # CompVisDenoiser: x - sigma * eps(x * c_in, t)
        sigma = sigmas[i]
        eps = engine.parts.unet(x.float() / math.sqrt(float(sigma) ** 2 + 1), timesteps[i],
                                encoder_hidden_states=calls[0]).sample.double()
        return x - sigma * eps

    noise = image_noise(21, generation.subseeds[0], 0.0, (4, 8, 8))[None].double()
    expected = kdiffusion_dpmpp_2m(denoise, noise * sigmas[0], sigmas)
    assert generation.request.warnings == []
    torch.testing.assert_close(generation._latents.double(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("sampler, schedule", [("DDIM", "Karras"), ("PLMS", "Beta"), ("LCM", "Exponential"),
                                               ("UniPC", "KL Optimal"), ("UniPC", "DDIM")])
def test_a_schedule_the_sampler_does_not_read_runs_as_automatic_with_a_warning(engine, sampler, schedule):
    """QA 37 M1: A1111 1.10 runs these (its DDIM, PLMS and UniPC read no schedule type); they were a 422 here."""
    named = run(engine, sampler_name=sampler, scheduler=schedule, steps=2)
    plain = run(engine, sampler_name=sampler, scheduler="automatic", steps=2)
    np.testing.assert_array_equal(named.images[0], plain.images[0])
    assert plain.request.warnings == []
    assert len(named.request.warnings) == 1 and named.request.warnings[0].startswith(
        f"schedule type '{schedule}' ignored: {sampler} runs")


def test_align_your_steps_takes_the_sdxl_list_on_an_sdxl_model(engine, sdxl_engine):
    for model, first in ((engine, 6.475), (sdxl_engine, 6.315)):
        generation = Generation(model, GenerationRequest(prompt="a", steps=11, sampler_name="Euler",
                                                         scheduler="align_your_steps"))
        scheduler = generation._scheduler([1])
        set_timesteps(scheduler, 11)
        assert float(scheduler.sigmas[1]) == pytest.approx(first)


@pytest.mark.parametrize("fields, count", [
    (dict(init_images=[np.full((64, 64, 3), 90, np.uint8)], denoising_strength=0.5), 5),
    (dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=3), 3)])
def test_lms_counts_its_order_from_the_img2img_start_as_k_diffusion(engine, fields, count):
    """QA 33 M2: k-diffusion's sample_lms takes order min(i + 1, 4) with i counted from the sigmas it is given
    (A1111's img2img and hires pass give it the schedule from the start sigma), so its first step is Euler's;
    diffusers' LMS counted from the schedule's first sigma (order 4 on one derivative, 0.17 from A1111's oracle)."""
    def after_first_step(sampler: str) -> torch.Tensor:
        # The hires pass: an Euler first pass, then the sampler's.
        names = dict(sampler_name="Euler", hr_sampler_name=sampler) if "enable_hr" in fields else dict(
            sampler_name=sampler)
        generation = Generation(engine, GenerationRequest(prompt="a red fox", steps=8, width=64, height=64, seed=4,
                                                          cfg_scale=3.0, **names, **fields))
        for _ in generation.run():  # to the first step of the pass of ``count`` steps (img2img's 5, hires' 3)
            if generation.progress.sampling_steps == count and generation.progress.sampling_step == 1:
                return generation._latents.clone()
        raise AssertionError("no such step")

    torch.testing.assert_close(after_first_step("LMS"), after_first_step("Euler"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler, schedule, steps, shown", [
    ("Heun", "Automatic", 8, 8), ("DPM2", "Karras", 8, 8), ("DPM2 a", "DDIM", 30, 31), ("DPM++ SDE", "Karras", 6, 6),
    ("Euler", "DDIM", 30, 31), ("DPM++ 2M", "Karras", 8, 8)])
def test_progress_counts_sampler_steps_as_a1111_shows_them(engine, sampler, schedule, steps, shown):
    """QA 46 F3: the second-order samplers' two UNet calls a step were counted as steps (Heun at 8 showed 15, DPM2
    on DDIM at 30 showed 61); A1111's progress counts the sampler's steps (31 on DDIM's schedule at 30)."""
    generation = Generation(engine, GenerationRequest(prompt="a red fox", steps=steps, width=64, height=64, seed=4,
                                                      sampler_name=sampler, scheduler=schedule))
    seen = []
    for _ in generation.run():
        seen.append((generation.progress.sampling_step, generation.progress.sampling_steps))
    assert {total for _, total in seen if total} == {shown}
    counted = [step for step, total in seen if total]
    assert counted == sorted(counted) and counted[-1] == shown and counted[0] == 1


def test_a_hires_model_upscale_yields_while_an_extras_upscale_holds_the_lock_and_between_tiles(engine, tmp_path,
                                                                                               monkeypatch):
    """QA 68 F5: a hires fix with a model upscaler waited on the worker thread for the upscaler lock an Extras
    upscale held (the stream froze 4.2-4.6 s); F6: it ran all its tiles in one call (a 2.95 s gap). Its generator
    now yields while the lock is held elsewhere and before each tile, and its images are the same."""
    import threading
    import time

    from sdbridge.engines import upscalers

    if not upscalers.spandrel_available():
        pytest.skip(f"spandrel is not installed ({upscalers.INSTALL_HINT})")
    from tests.unit.engines.test_upscalers import esrgan, save

    save(esrgan(4), tmp_path / "ESRGAN" / "4x-Tiny.safetensors")
    cache = upscalers.UpscalerCache(tmp_path, CPU)
    tiles = upscalers._tiles
    monkeypatch.setattr(upscalers, "_tiles", lambda height, width, tile, overlap: tiles(height, width, 32, 8))
    upscaler = cache.get("4x-Tiny")
    calls: list[int] = []  # the number of the request's step (next()) each tile ran in
    step = 0

    class Counted:  # the network, counting its calls
        def __init__(self, descriptor) -> None:
            self.descriptor = descriptor

        def __getattr__(self, name: str):
            return getattr(self.descriptor, name)

        def __call__(self, window):
            calls.append(step)
            return self.descriptor(window)

    upscaler.descriptor = Counted(upscaler.descriptor)
    fields = dict(prompt="a red fox", steps=2, width=64, height=64, seed=11, cfg_scale=5.0, sampler_name="Euler",
                  enable_hr=True, hr_scale=1.5, hr_upscaler="4x-Tiny", denoising_strength=0.5, hr_second_pass_steps=1,
                  hr_model=lambda image, width, height: cache.hires_steps("4x-Tiny", image, width, height))
    free = Generation(engine, GenerationRequest(**fields))
    yields_free = sum(1 for _ in free.run())
    assert free.images[0].shape == (96, 96, 3) and len(calls) == 16, "64x64 in 16 tiles of 32 (16 inside)"
    calls.clear()

    held, release = threading.Event(), threading.Event()

    def extras() -> None:  # holds the lock as a running Extras upscale does; lets go after 8 s at the latest
        with cache._lock:
            held.set()
            release.wait(8)

    holder = threading.Thread(target=extras, daemon=True)
    holder.start()
    assert held.wait(10)
    generation = Generation(engine, GenerationRequest(**fields))
    steps = generation.run()
    longest = 0.0
    for step in range(yields_free + 60):  # more steps than the whole request takes: it waits, yielding
        before = time.perf_counter()
        done = next(steps, "done")
        longest = max(longest, time.perf_counter() - before)
        assert done != "done", f"it ran to its end, a step holding the worker {longest:.2f} s"
    assert longest < 4, f"a step held the worker {longest:.2f} s"
    assert holder.is_alive() and generation.images == [] and calls == []
    release.set()
    holder.join(10)
    for step in range(step + 1, step + 1000):
        try:
            next(steps)
        except StopIteration:
            break
    assert len(calls) == 16 and len(set(calls)) == 16, f"one tile a step at most: {calls}"
    np.testing.assert_array_equal(generation.images[0], free.images[0])


def test_progress_counts_the_hires_pass_as_a_job_and_only_rises(engine):
    """A1111 counts a hires pass as a job of its own; here /progress ran backwards from the first pass's end to the
    second's start, and showed 1.0 (eta 0) half-way (QA 68 F9)."""
    generation = Generation(engine, GenerationRequest(prompt="x", steps=4, width=64, height=64, seed=3, n_iter=2,
                                                      enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3,
                                                      denoising_strength=0.5))
    assert generation.progress.job_count == 4
    seen = [generation.progress.fraction for _ in generation.run()]
    assert all(later >= earlier for earlier, later in zip(seen, seen[1:])), seen
    assert max(seen[:len(seen) // 2]) < 0.6 and seen[-1] == 1.0


def test_img2img_encodes_its_batch_image_by_image_between_stream_frames(engine):
    """The batch's init images were encoded in one VAE call, the stream waiting for all of them (QA 68 F11: 7.2-7.6 s
    gaps at batch 8); the decode went image by image. Now each encode is a step of its own, the latents unchanged."""
    sources = [np.full((64, 64, 3), 40 + 50 * i, np.uint8) for i in range(3)]
    fields = dict(prompt="x", steps=2, width=64, height=64, seed=5, batch_size=3, init_images=sources,
                  denoising_strength=0.5)
    generation = Generation(engine, GenerationRequest(**fields))
    encoded: list[int] = []
    real = generation._encode

    def counting(pixels):
        encoded.append(pixels.shape[0])
        return real(pixels)

    generation._encode = counting
    for _ in generation.run():
        pass
    assert encoded == [1, 1, 1]
    pixels = torch.stack([torch.from_numpy(s).permute(2, 0, 1) for s in sources]).to(generation.dtype) / 127.5 - 1
    together = real(pixels.to(generation.device))
    one_by_one = torch.cat([real(pixels[i:i + 1].to(generation.device)) for i in range(3)])
    torch.testing.assert_close(one_by_one, together, rtol=1e-5, atol=1e-5)


# --- memory of AND parts x schedule steps (QA 72 F1) --------------------------------------------------------------


def _tensor_bytes(tensors) -> int:
    """The bytes of the distinct storages under ``tensors`` (views of one storage counted once)."""
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


def _tensors_in(value) -> list[torch.Tensor]:
    import dataclasses

    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):
        value = [getattr(value, field.name) for field in dataclasses.fields(value)]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors_in(item)]
    return []


def _live_conditioning_bytes(width: int) -> int:
    """The bytes of every live 3-d tensor of the text encoder's width: the conditioning held right now."""
    import gc

    return _tensor_bytes([thing for thing in gc.get_objects() if type(thing) is torch.Tensor
                          and thing.dim() == 3 and thing.shape[-1] == width])


# Ten AND parts, the first changing at every step (alternation), the other nine the same text.
PARTS = 10
ALTERNATING = "a red fox [" + "|".join(f"tone{i}" for i in range(16)) + "]" + " AND a blue car" * (PARTS - 1)


def test_a_schedule_holds_each_distinct_encoding_once_not_steps_x_parts(engine):
    """Each step's entry shares the encodings of its texts: 12 steps x 10 parts hold the 13 distinct (part,
    negative) encodings, not 12 batches of 10 rows each (QA 72 F1: 4,500 parts x 150 steps took 12.7 GiB)."""
    steps = 12
    generation = Generation(engine, GenerationRequest(prompt=ALTERNATING, negative_prompt="blur", steps=steps,
                                                      width=64, height=64, seed=1, sampler_name="Euler"))
    schedule = generation._prompt_schedule()
    assert len(schedule) == steps
    one_pair = engine.encode_prompt_pair("a red fox tone0", "blur")
    pair_bytes = one_pair[0].nbytes + one_pair[1].nbytes
    held = _tensor_bytes(_tensors_in(schedule))
    distinct = steps + 1  # the first part's text per step, and the nine parts' one text
    assert held <= distinct * pair_bytes, (held, distinct * pair_bytes)
    # The batch of one entry is what a step runs: the same rows as A1111's reconstruct_multicond_batch.
    cond, uncond, pooled = schedule[3].batch()
    assert cond.shape[0] == PARTS and uncond.shape[0] == 1 and pooled is None
    assert torch.equal(cond[0:1], engine.encode_prompt_pair("a red fox tone3", "blur")[0])
    assert torch.equal(cond[1:2], engine.encode_prompt_pair(" a blue car", "blur")[0])


def test_the_sampler_holds_one_step_s_batch_at_a_time(engine):
    """While the sampler runs, the conditioning held grows with the distinct texts, not with steps x parts x
    batch: the UNet inputs of each step are built when the sampler gets to it (QA 72 F1)."""
    width = engine.encode_prompt_pair("", "")[0].shape[-1]

    def most_held(steps: int) -> int:
        generation = Generation(engine, GenerationRequest(prompt=ALTERNATING, negative_prompt="blur", steps=steps,
                                                          width=64, height=64, seed=1, batch_size=2,
                                                          sampler_name="Euler"))
        before = _live_conditioning_bytes(width)
        most = 0
        for _ in generation.run():
            most = max(most, _live_conditioning_bytes(width) - before)
        return most

    few, many = most_held(4), most_held(16)
    one_pair = engine.encode_prompt_pair("a red fox tone0", "blur")
    pair_bytes = one_pair[0].nbytes + one_pair[1].nbytes
    # 12 more steps bring 12 more distinct texts (their encodings), nothing per step and part: before, each
    # step's UNet batch of (1 + 10 parts) x 2 images was held for the whole pass, 22 x pair_bytes / 2 a step.
    assert many - few <= 12 * pair_bytes * 2, (few, many, pair_bytes)


def test_more_and_parts_than_the_limit_are_refused_naming_the_count(engine):
    from sdbridge.engines.generate import MAX_AND_PARTS
    from sdbridge.errors import ParamError

    prompt = "a cat" + " AND" * MAX_AND_PARTS
    with pytest.raises(ParamError, match=f"{MAX_AND_PARTS + 1} AND parts, more than the {MAX_AND_PARTS}") as caught:
        run(engine, prompt=prompt)
    assert caught.value.code == "bad_param"
    with pytest.raises(ParamError, match="hr_prompt: ") as caught:
        run(engine, prompt="a cat", enable_hr=True, hr_prompt=prompt, steps=1)
    at_limit = run(engine, prompt="a cat" + " AND" * (MAX_AND_PARTS - 1), steps=1)
    assert len(at_limit.images) == 1


def test_weights_are_checked_on_the_texts_the_schedule_encodes_not_the_raw_prompt(engine):
    """QA 72 F9: the raw prompt's parse (a [from:to:when] read as [...]) refused '[(cat:150):dog:0]', which
    encodes 'dog' alone, as A1111 runs it; a weight in a text that is encoded still fails."""
    from sdbridge.errors import ParamError

    scheduled = run(engine, prompt="[(cat:150):dog:0]", steps=2)
    plain = run(engine, prompt="dog", steps=2)
    assert np.array_equal(scheduled.images[0], plain.images[0])
    with pytest.raises(ParamError, match="prompt weight 105 of 'cat' is out of range"):
        run(engine, prompt="[dog:(cat:105):0.5]", steps=2)

"""The diffusion engine against the plain diffusers pipelines: same weights, same noise, same frames."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sdbridge.engines.base import StreamState
from sdbridge.engines.diffusion import DiffusionEngine
from tests.unit.engines.common import engine_params, relative_error

CPU = torch.device("cpu")


def params(**overrides) -> dict:
    return engine_params(**overrides)


@pytest.fixture
def frame() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))


def reference_pipeline(parts, cls_name: str = "StableDiffusionImg2ImgPipeline"):
    import diffusers

    cls = getattr(diffusers, cls_name)
    pipe = cls(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
               scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("steps, strength, guidance", [(1, 1.0, 1.0), (2, 0.5, 1.0), (4, 0.75, 1.0),
                                                       (4, 1.0, 1.0), (2, 1.0, 3.0), (4, 0.5, 3.0)])
def test_img2img_parity_with_diffusers(vae_parts, frame, steps, strength, guidance):
    """Same latents in, same noise: the denoise + decode matches StableDiffusionImg2ImgPipeline (fp32, CPU)."""
    engine = DiffusionEngine.from_parts(vae_parts)
    engine.prepare(params(steps=steps, strength=strength, guidance=guidance, negative_prompt="blurry"))
    state = StreamState("s")
    ours = engine.step_float(frame, [state])
    # The pipeline takes 4-channel images as latents: hand it our encoded latents, and a generator
    # seeded like the session's noise (the pipeline draws its noise first from it).
    pixels = frame.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        latents = engine.encode(pixels)
    pipe = reference_pipeline(vae_parts)
    theirs = pipe(prompt="a red fox", negative_prompt="blurry" if guidance > 1 else None, image=latents,
                  strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    error = relative_error(ours, theirs)
    assert error <= 1e-4, f"relative error {error:.2e}"


def test_encode_matches_the_vae_mode(vae_parts, frame):
    engine = DiffusionEngine.from_parts(vae_parts)
    pixels = frame.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        ours = engine.encode(pixels)
        theirs = vae_parts.vae.encode(pixels).latent_dist.mode() * vae_parts.vae.config.scaling_factor
    assert relative_error(ours, theirs) <= 1e-6


def test_txt2img_parity_with_diffusers(vae_parts):
    engine = DiffusionEngine.from_parts(vae_parts)
    engine.prepare(params(mode="txt2img", steps=2))
    ours = engine.step_float(None, [StreamState("s")])
    pipe = reference_pipeline(vae_parts, "StableDiffusionPipeline")
    theirs = pipe(prompt="a red fox", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert relative_error(ours, theirs) <= 1e-4


def test_prompt_is_encoded_once_until_it_changes(parts, frame):
    engine = DiffusionEngine.from_parts(parts)
    for _ in range(5):
        engine.prepare(params())
        engine.step(frame, [StreamState("s")])
    assert engine.text_encoder_calls == 1
    engine.prepare(params(prompt="a blue whale"))
    engine.prepare(params(prompt="a red fox"))  # back to a cached one
    assert engine.text_encoder_calls == 2


def test_fixed_noise_per_session_and_seed(parts, frame):
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(params(strength=0.9))
    state = StreamState("s")
    first = engine.step(frame, [state])
    assert torch.equal(first, engine.step(frame, [state]))
    engine.prepare(params(strength=0.9, seed=4))
    assert not torch.equal(first, engine.step(frame, [state]))


def test_batch_of_sessions_equals_each_alone(parts, frame):
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(params(strength=0.9))
    other = torch.flip(frame, dims=[1])
    together = engine.step(torch.cat([frame, other]), [StreamState("a"), StreamState("b")])
    alone_a = engine.step(frame, [StreamState("a")])
    alone_b = engine.step(other, [StreamState("b")])
    assert (together[0].int() - alone_a[0].int()).abs().max() <= 1
    assert (together[1].int() - alone_b[0].int()).abs().max() <= 1


def test_taesd_used_when_present(parts, vae_parts):
    assert DiffusionEngine.from_parts(parts).uses_taesd
    assert not DiffusionEngine.from_parts(vae_parts).uses_taesd


@pytest.mark.parametrize("width, height", [(64, 64), (64, 96)])
def test_output_shape_dtype(parts, width, height):
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(params(width=width, height=height))
    frames = torch.zeros((2, height, width, 3), dtype=torch.uint8)
    out = engine.step(frames, [StreamState("a"), StreamState("b")])
    assert out.shape == (2, height, width, 3) and out.dtype == torch.uint8
    assert not bool(engine.last_nan)


def test_low_strength_still_runs_one_step(parts, frame):
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(params(steps=2, strength=0.1))  # diffusers would refuse: 2 * 0.1 < 1
    assert engine.step(frame, [StreamState("s")]).shape == (1, 64, 64, 3)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_strength_zero_passes_the_input_through(parts, frame, steps):
    """Strength 0 keeps the input, as the parameter says: the same bytes out, every session (QA 88 F2: steps 1 ran
    t = 999, a new picture; steps 2 ran t = 499, the frame strength 0.5 gives)."""
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(params(steps=steps, strength=0.0))
    frames = torch.cat([frame, torch.flip(frame, dims=[1])])
    assert torch.equal(engine.step(frames, [StreamState("a"), StreamState("b")]), frames)
    engine.prepare(params(steps=steps, strength=0.5))
    assert not torch.equal(engine.step(frame, [StreamState("a")]), frame)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_pass_through_keeps_every_byte_value_in_either_precision(parts, dtype):
    """v / 255 * 255 rounds back to v for every byte, in fp16 too (the GPU's dtype): the pass-through goes through
    step()'s quantisation, and must not move a value by one."""
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(params(strength=0.0))
    engine.dtype = dtype   # only _kept and the quantisation read it on this path; the model stays fp32
    frames = torch.arange(256, dtype=torch.uint8).repeat_interleave(48).reshape(1, 64, 64, 3)
    assert torch.equal(engine.step(frames, [StreamState("s")]), frames)


def test_below_one_step_the_strength_picks_the_noise_level_of_the_one_step(parts, frame):
    """Where int(steps * strength) is 0 one step runs, from the last timestep of the scheduler's ceil(1 / strength)
    step schedule: steps 1 at strength 0.5 is steps 2 at 0.5, and a lower strength a less noisy step (QA 88 F2: at
    steps 1 every strength ran t = 999, the same frame)."""
    engine = DiffusionEngine.from_parts(parts)

    def run(steps: int, strength: float) -> tuple[list[float], torch.Tensor]:
        engine.prepare(params(steps=steps, strength=strength))
        return engine._timesteps()[0].tolist(), engine.step_float(frame, [StreamState("s")])

    def last_of(count: int) -> list[float]:
        return schedule_tail(parts, count, 1)

    one_half, out_half = run(1, 0.5)
    two_half, out_two = run(2, 0.5)
    assert one_half == two_half == last_of(2) and torch.equal(out_half, out_two)
    assert run(1, 0.3)[0] == last_of(4) and run(2, 0.2)[0] == last_of(5) and run(4, 0.2)[0] == last_of(5)
    # From one step up nothing changed: diffusers' get_timesteps, the tail of the steps-long schedule.
    assert run(1, 1.0)[0] == last_of(1) and run(4, 0.5)[0] == schedule_tail(parts, 4, 2)
    levels = [run(1, strength)[0][0] for strength in (1.0, 0.5, 0.3, 0.1, 0.01)]
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == len(levels)


def schedule_tail(parts, count: int, taken: int) -> list[float]:
    """The last ``taken`` timesteps of the model's scheduler's ``count``-step schedule."""
    scheduler = copy.deepcopy(parts.scheduler)
    scheduler.set_timesteps(count)
    return scheduler.timesteps[count - taken:].tolist()


def test_a_frameless_img2img_step_is_diffusers_img2img_of_a_zero_latent(vae_parts):
    """No input frame in img2img: the frame starts as a zero latent noised at the first img2img timestep, which is
    diffusers' img2img pipeline handed zero latents (QA 88 F1: it started at init_noise_sigma, the first timestep
    of the whole schedule's noise, ~9x too much for t_0 = 499, and the compiled engine's frame differed)."""
    engine = DiffusionEngine.from_parts(vae_parts)
    engine.prepare(params(steps=4, strength=0.5))
    ours = engine.step_float(None, [StreamState("s")])
    theirs = reference_pipeline(vae_parts)(prompt="a red fox", image=torch.zeros((1, 4, 8, 8)), strength=0.5,
                                           num_inference_steps=4, guidance_scale=1.0,
                                           generator=torch.Generator().manual_seed(3), output_type="pt").images
    error = relative_error(ours, theirs)
    assert error <= 1e-4, f"relative error {error:.2e}"


def test_resolution_must_fit_the_vae(parts):
    from sdbridge.errors import ModelError

    engine = DiffusionEngine.from_parts(parts)
    with pytest.raises(ModelError, match="multiple of 8"):
        engine.prepare(params(width=68))


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_the_third_order_and_heun_sde_samplers_run_the_stream(vae_parts, frame, sampler):
    """A1111's DPM++ 3M SDE and 2M SDE Heun as the stream's sampler: finite frames, the same for the same seed
    (their step noise is seeded per session), another for another seed."""
    engine = DiffusionEngine.from_parts(vae_parts)
    frames = []
    for seed in (3, 3, 4):
        engine.prepare(params(sampler=sampler, steps=4, strength=0.75, guidance=2.0, seed=seed))
        frames.append(engine.step_float(frame, [StreamState("s")]))
    assert all(bool(torch.isfinite(out).all()) for out in frames)
    assert relative_error(frames[1], frames[0]) <= 1e-5
    assert relative_error(frames[2], frames[0]) > 1e-3


def test_seed_blend_slerps_the_starting_noise_from_one_seed_to_the_others(vae_parts, frame):
    """seed_blend 0 is the seed's frame, 1 blend_seed's, exactly; half-way a frame of its own, from a noise that
    keeps a noise's norm (a straight mix would have 0.71 of it: a washed-out frame mid-glide)."""
    from sdbridge.engines.diffusion import blend_noise, seed_noise

    def out(**values) -> torch.Tensor:
        engine = DiffusionEngine.from_parts(vae_parts)
        engine.prepare(params(steps=2, strength=0.75, **values))
        return engine.step_float(frame, [StreamState("s")])

    alone, other = out(seed=3), out(seed=4)
    assert relative_error(out(seed=3, blend_seed=4, seed_blend=0.0), alone) == 0.0
    assert relative_error(out(seed=3, blend_seed=4, seed_blend=1.0), other) <= 1e-6
    middle = out(seed=3, blend_seed=4, seed_blend=0.5)
    assert relative_error(middle, alone) > 1e-3 and relative_error(middle, other) > 1e-3
    first, second = seed_noise(3, (1, 4, 32, 32)), seed_noise(4, (1, 4, 32, 32))
    for weight in (0.25, 0.5, 0.75):
        assert abs(float(blend_noise(weight, first, second).norm() / first.norm()) - 1.0) < 0.03
    assert torch.equal(seed_noise(3, (1, 4, 32, 32)), first)  # the cache is not written through


def test_tcd_runs_the_stream_as_diffusers_img2img_runs_it(vae_parts, frame):
    """TCD (for TCD and Hyper-SD LoRAs): LCM's skipping timesteps and a step that re-noises by gamma (TCD's 0.3),
    drawn as the pipeline draws it from its generator after the entry noise: the frame is diffusers' for that seed."""
    import diffusers

    from sdbridge.engines.samplers import make_scheduler

    engine = DiffusionEngine.from_parts(vae_parts)
    engine.prepare(params(sampler="TCD", steps=4, strength=0.75))
    assert type(engine.scheduler).__name__ == "TCDScheduler"
    ours = engine.step_float(frame, [StreamState("s")])
    pixels = frame.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        latents = engine.encode(pixels)
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=vae_parts.vae, text_encoder=vae_parts.text_encoder, tokenizer=vae_parts.tokenizer, unet=vae_parts.unet,
        scheduler=make_scheduler(vae_parts.scheduler.config, "TCD"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a red fox", image=latents, strength=0.75, num_inference_steps=4, guidance_scale=1.0, eta=0.3,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert relative_error(ours, theirs) <= 1e-4
    engine.prepare(params(sampler="TCD", steps=4, strength=0.75, seed=4))
    assert relative_error(engine.step_float(frame, [StreamState("s")]), ours) > 1e-3


# --- the N-way prompt mix (prompt_2..prompt_4 and their weights) -------------------------------------

def embeddings_of(engine: DiffusionEngine, **overrides) -> torch.Tensor:
    engine.prepare(params(**overrides))
    assert engine._embeddings is not None
    return engine._embeddings.clone()


def test_prompt_weights_pick_and_mix_the_prompts(parts):
    engine = DiffusionEngine.from_parts(parts)
    fox = embeddings_of(engine, prompt="a red fox")
    whale = embeddings_of(engine, prompt="a blue whale")
    calls = engine.text_encoder_calls
    # Set but at weight 0 (the default), or empty: off and never encoded.
    assert torch.equal(embeddings_of(engine, prompt_2="a green owl", prompt_3="", prompt_3_weight=1.0), fox)
    assert engine.text_encoder_calls == calls
    assert torch.equal(embeddings_of(engine, prompt_2="a blue whale", prompt_2_weight=2.0, prompt_weight=0.0), whale)
    both = embeddings_of(engine, prompt_2="a blue whale", prompt_2_weight=1.0)
    assert torch.allclose(both, (fox + whale) / 2, atol=1e-6)
    # All weights 0: the prompt alone.
    assert torch.equal(embeddings_of(engine, prompt_weight=0.0, prompt_2="a blue whale"), fox)


def test_the_prompt_at_weight_zero_is_not_encoded(parts):
    engine = DiffusionEngine.from_parts(parts)
    embeddings_of(engine, prompt="a blue whale")
    calls = engine.text_encoder_calls
    embeddings_of(engine, prompt="something never encoded", prompt_weight=0.0, prompt_2="a blue whale",
                  prompt_2_weight=1.0)
    assert engine.text_encoder_calls == calls


def test_moving_weights_encode_nothing_and_move_the_embeddings(parts):
    """An LFO or a fader moves a weight every frame: the mix is made from the cached encodings."""
    engine = DiffusionEngine.from_parts(parts)
    texts = dict(prompt_2="a blue whale", prompt_3="a " * 100, prompt_4="(ink:1.3) sketch, BREAK paper")
    for interpolation in ("linear", "slerp"):
        embeddings_of(engine, prompt_2_weight=1.0, prompt_3_weight=1.0, prompt_4_weight=1.0,
                      prompt_interpolation=interpolation, **texts)
    calls = engine.text_encoder_calls
    seen = []
    for frame_index in range(24):
        phase = frame_index / 24 * 2 * torch.pi
        weights = dict(prompt_weight=1.0 + torch.sin(torch.tensor(phase)).item(), prompt_2_weight=frame_index / 10,
                       prompt_3_weight=0.5, prompt_4_weight=0.0 if frame_index % 3 else 2.0)
        seen.append(embeddings_of(engine, prompt_interpolation=("linear", "slerp")[frame_index % 2],
                                  **texts, **weights))
    assert engine.text_encoder_calls == calls
    assert all(frame.shape == (1, 2 * 77, 32) for frame in seen)  # prompt_3's two chunks: the others padded
    assert all(not torch.equal(first, second) for first, second in zip(seen, seen[1:]))  # each frame its own mix


def test_a_longer_prompt_2_pads_the_prompt_and_the_negative(parts):
    engine = DiffusionEngine.from_parts(parts)
    fox = embeddings_of(engine)
    empty = embeddings_of(engine, prompt="")
    mixed = embeddings_of(engine, prompt_2="a " * 100, prompt_2_weight=1.0, guidance=3.0, negative_prompt="blurry")
    assert mixed.shape == (2, 2 * 77, 32)  # uncond padded to the mix's two chunks
    long = embeddings_of(engine, prompt="a " * 100)
    assert torch.allclose(mixed[1:], (torch.cat([fox, empty], dim=1) + long) / 2, atol=1e-6)


def test_blend_prompt_mixes_into_the_prompt_before_the_weights(parts):
    """prompt_blend lerps the prompt with blend_prompt as before; that mix is the prompt's part, by prompt_weight."""
    engine = DiffusionEngine.from_parts(parts)
    blended = embeddings_of(engine, blend_prompt="a blue whale", prompt_blend=0.25)
    owl = embeddings_of(engine, prompt="a green owl")
    both = embeddings_of(engine, blend_prompt="a blue whale", prompt_blend=0.25, prompt_2="a green owl",
                         prompt_2_weight=3.0)
    assert torch.allclose(both, 0.25 * blended + 0.75 * owl, atol=1e-6)


def test_slerp_mix_keeps_the_length_between_the_prompts(parts):
    engine = DiffusionEngine.from_parts(parts)
    fox, whale = embeddings_of(engine), embeddings_of(engine, prompt="a blue whale")
    mixed = embeddings_of(engine, prompt_2="a blue whale", prompt_2_weight=1.0, prompt_interpolation="slerp")
    norms = fox.norm(dim=-1), whale.norm(dim=-1)
    assert torch.allclose(mixed.norm(dim=-1), (norms[0] + norms[1]) / 2, rtol=1e-5)
    linear = embeddings_of(engine, prompt_2="a blue whale", prompt_2_weight=1.0)
    assert not torch.allclose(mixed, linear, atol=1e-4)


def test_prompt_2_changes_the_frame(parts, frame):
    engine = DiffusionEngine.from_parts(parts)

    def out(**overrides) -> torch.Tensor:
        engine.prepare(params(strength=0.9, **overrides))
        return engine.step_float(frame, [StreamState("s")])

    alone = out()
    assert torch.equal(out(prompt_2="a blue whale"), alone)  # weight 0: the same frame, bit for bit
    mixed = out(prompt_2="a blue whale", prompt_2_weight=1.0)
    assert relative_error(mixed, alone) > 1e-3


def test_a_bad_weight_in_prompt_3_is_a_param_error_naming_it_and_the_engine_serves_on(parts, frame):
    from sdbridge.errors import ParamError

    engine = DiffusionEngine.from_parts(parts)
    fox = embeddings_of(engine)
    with pytest.raises(ParamError, match=r"prompt_3: prompt weight 1000 of 'ink'") as raised:
        engine.prepare(params(prompt_3="(ink:1000) sketch", prompt_3_weight=1.0))
    assert raised.value.name == "prompt_3" and raised.value.code == "bad_param"
    assert torch.equal(embeddings_of(engine, prompt_3="(ink:1000) sketch"), fox)  # at weight 0 it is not read
    assert torch.isfinite(engine.step_float(frame, [StreamState("s")])).all()


# --- an explicit timestep schedule (schedule: StreamDiffusion's t_index_list) ---------------------

def picked_timesteps(parts, sampler: str, indices: list[int], count: int) -> list:
    """The timesteps ``indices`` of ``sampler``'s ``count``-step schedule, picked apart from the engine (Heun's
    timesteps hold each point after the first twice: its ``count`` points are every second one)."""
    from sdbridge.engines.samplers import make_scheduler

    scheduler = make_scheduler(parts.scheduler.config, sampler)
    scheduler.set_timesteps(count)
    return scheduler.timesteps[::scheduler.order][indices].tolist()


def pipeline_with(parts, sampler: str, cls_name: str):
    from sdbridge.engines.samplers import make_scheduler

    pipe = reference_pipeline(parts, cls_name)
    pipe.scheduler = make_scheduler(parts.scheduler.config, sampler)
    return pipe


@pytest.mark.parametrize("sampler, spec, indices, guidance", [
    ("Euler", "32,45@50", [32, 45], 1.0), ("LCM", "32,45@50", [32, 45], 1.0), ("Euler", "5,20,40@50", [5, 20, 40], 3.0),
    ("TCD", "1,3@4", [1, 3], 1.0), ("DPM++ 2M", "10,30,45@50", [10, 30, 45], 1.0)])
def test_an_explicit_schedule_is_diffusers_img2img_with_those_timesteps(vae_parts, frame, sampler, spec, indices,
                                                                        guidance):
    """schedule "32,45@50": timesteps 32 and 45 of the sampler's 50-step schedule, and the frame equals
    StableDiffusionImg2ImgPipeline's called with ``timesteps=`` those and strength 1 (steps and strength ignored)."""
    picked = picked_timesteps(vae_parts, sampler, indices, int(spec.split("@")[1]))
    engine = DiffusionEngine.from_parts(vae_parts)
    engine.prepare(params(sampler=sampler, schedule=spec, steps=1, strength=0.1, guidance=guidance,
                          negative_prompt="blurry"))
    assert engine._explicit_timesteps == picked and engine._denoising_steps() == len(indices)
    ours = engine.step_float(frame, [StreamState("s")])
    pixels = frame.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        latents = engine.encode(pixels)
    pipe = pipeline_with(vae_parts, sampler, "StableDiffusionImg2ImgPipeline")
    extra = {"eta": 0.3} if sampler == "TCD" else {}
    theirs = pipe(prompt="a red fox", negative_prompt="blurry" if guidance > 1 else None, image=latents,
                  strength=1.0, timesteps=picked, guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
                  output_type="pt", **extra).images
    assert relative_error(ours, theirs) <= 1e-4
    # Steps and strength are ignored while a schedule is set.
    engine.prepare(params(sampler=sampler, schedule=spec, steps=4, strength=0.9, guidance=guidance,
                          negative_prompt="blurry"))
    assert torch.equal(engine.step_float(frame, [StreamState("s")]), ours)


@pytest.mark.parametrize("sampler", ["Euler", "LCM", "Heun"])
def test_an_explicit_schedule_in_txt2img_is_diffusers_with_those_timesteps(vae_parts, sampler):
    picked = picked_timesteps(vae_parts, sampler, [20, 45], 50)
    engine = DiffusionEngine.from_parts(vae_parts)
    engine.prepare(params(mode="txt2img", sampler=sampler, schedule="20,45@50"))
    assert engine._explicit_timesteps == picked
    ours = engine.step_float(None, [StreamState("s")])
    pipe = pipeline_with(vae_parts, sampler, "StableDiffusionPipeline")
    theirs = pipe(prompt="a red fox", height=64, width=64, timesteps=picked, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert relative_error(ours, theirs) <= 1e-4


def test_a_schedule_at_the_tail_is_steps_times_strength_and_empty_is_unchanged(vae_parts, frame):
    """"2,3@4" is the tail that 4 steps at strength 0.5 run: the same frame; back to '' the frame is the one
    before, bit for bit (the default leaves today's path untouched)."""
    engine = DiffusionEngine.from_parts(vae_parts)
    engine.prepare(params(sampler="Euler", steps=4, strength=0.5))
    before = engine.step_float(frame, [StreamState("s")])
    engine.prepare(params(sampler="Euler", schedule="2,3@4"))
    assert relative_error(engine.step_float(frame, [StreamState("s")]), before) <= 1e-5
    engine.prepare(params(sampler="Euler", schedule="10,45@50"))
    assert relative_error(engine.step_float(frame, [StreamState("s")]), before) > 1e-3
    engine.prepare(params(sampler="Euler", steps=4, strength=0.5, schedule=""))
    assert torch.equal(engine.step_float(frame, [StreamState("s")]), before)


@pytest.mark.parametrize("spec, message", [
    ("45,32@50", r"schedule '45,32@50': indices are not strictly increasing \(45 then 32\)"),
    ("32,50@50", r"schedule '32,50@50': index 50 is not in \[0, 50\)"),
    ("1,2,3,4,5,6,7,8,9@50", r"9 indices \(at most 8\)"),
    ("32,45@1001", r"N = 1001, not in \[1, 1000\]"),
    ("32,45", r"has no '@N'"),
    ("32;45@50", r"not indices and a step count"),
    ("\u0663@50", r"not indices and a step count"),  # an Arabic-Indic 3: int() takes it, the schema does not
])
def test_a_bad_schedule_is_a_param_error_and_the_engine_serves_on(parts, frame, spec, message):
    from sdbridge.errors import ParamError
    from sdbridge.params import Schema

    good, errors = Schema().validate({"schedule": spec})
    assert not good and errors[0].code == "bad_param" and errors[0].name == "schedule"
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(params(schedule="1,3@4"))
    with pytest.raises(ParamError, match=message) as raised:
        engine.prepare(params(schedule=spec))
    assert raised.value.code == "bad_param" and raised.value.name == "schedule"
    engine.prepare(params(schedule="0,2@4"))
    assert torch.isfinite(engine.step_float(frame, [StreamState("s")])).all()


@pytest.mark.parametrize("sampler, message", [
    ("Euler a", "sampler Euler a does not"), ("DDIM", "sampler DDIM does not"),
    ("LCM", r"cannot run on sampler LCM: .*`num_inference_steps`: 100"),  # LCM: at most its 50 distillation steps
])
def test_a_sampler_that_takes_no_or_not_these_timesteps_is_a_param_error_naming_it(parts, frame, sampler, message):
    from sdbridge.errors import ParamError

    engine = DiffusionEngine.from_parts(parts)
    with pytest.raises(ParamError, match=message) as raised:
        engine.prepare(params(sampler=sampler, schedule="32,45@100"))
    assert raised.value.code == "bad_param" and raised.value.name == "schedule"
    engine.prepare(params(sampler=sampler))  # the same sampler without a schedule serves
    assert torch.isfinite(engine.step_float(frame, [StreamState("s")])).all()


def test_lcm_warns_of_an_off_schedule_start_once_not_every_frame(parts, frame, caplog):
    engine = DiffusionEngine.from_parts(parts)
    with caplog.at_level("WARNING", logger="diffusers.schedulers.scheduling_lcm"):
        engine.prepare(params(sampler="LCM", schedule="32,45@50"))
        for _ in range(3):
            engine.step(frame, [StreamState("s")])
    assert sum("first timestep" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "Euler a", "LCM"])
def test_a_session_s_frame_does_not_depend_on_its_place_in_the_batch(parts, frame, sampler):
    """DPM++ SDE seeded one Brownian tree for the whole batch: a session second in a batch drew other noise than
    alone, 0.54 apart, so a still stream flickered as others joined or left (QA 63 F2)."""
    engine = DiffusionEngine.from_parts(parts)
    engine.prepare(params(sampler=sampler, steps=4, strength=1.0))
    other = torch.flip(frame, dims=[1])
    alone = engine.step_float(frame, [StreamState("a")])
    second = engine.step_float(torch.cat([other, frame]), [StreamState("b"), StreamState("a")])[1:]
    assert relative_error(second, alone) < 1e-4

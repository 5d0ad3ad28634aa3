"""A1111's LCM (modules/sd_samplers_lcm.py in A1111 1.10: LCMCompVisDenoiser, sample_lcm) for one-shot requests,
held to it written out here in float64 (A1111 stays out of our dependencies), on a stand-in UNet that reads its
timestep, with the same noises fed to both sides (QA 60 F3: diffusers' LCM ran 999, 759, 499, 259 at 4 steps where
A1111 runs 999, 679, 339, 19)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdbridge.engines import samplers
from sdbridge.engines.generate import Generation, _noised_at
from tests.unit.engines.test_a1111_timesteps import SD15, table
from tests.unit.engines.test_generate import engine, run  # noqa: F401  (the fixture)
from tests.unit.engines.test_samplers import BASE
from tests.unit.engines.test_samplers_a1111_oracle_gaps import eps_model

V_PREDICTION = {**SD15, "prediction_type": "v_prediction"}


def unet(x: torch.Tensor, t) -> torch.Tensor:
    """The stand-in UNet, its output scaled by its timestep: a call at another timestep shows."""
    return eps_model(x.float()).double() * (1 + int(t) / 1000)


class LCMCompVisDenoiser:
    """sd_samplers_lcm.LCMCompVisDenoiser on k-diffusion's DiscreteEpsDDPMDenoiser, float64."""

    def __init__(self, config) -> None:
        timesteps, original_timesteps = 1000, 50
        self.skip_steps = timesteps // original_timesteps
        alphas_cumprod = table(config)
        valid = torch.zeros(original_timesteps, dtype=torch.float64)
        for x in range(original_timesteps):
            valid[original_timesteps - 1 - x] = alphas_cumprod[timesteps - 1 - x * self.skip_steps]
        self.sigmas = ((1 - valid) / valid) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]
        self.v = config["prediction_type"] == "v_prediction"

    def get_sigmas(self, n: int) -> torch.Tensor:
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        t = torch.linspace(float(start), float(end), n, dtype=torch.float64)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

    def t_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp((timestep - (self.skip_steps - 1)) / self.skip_steps, min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_scaled_out(self, sigma, output, input):
        sigma_data = 0.5
        scaled_timestep = self.sigma_to_t(sigma) * 10.0
        c_skip = sigma_data ** 2 / (scaled_timestep ** 2 + sigma_data ** 2)
        c_out = scaled_timestep / (scaled_timestep ** 2 + sigma_data ** 2) ** 0.5
        return c_out * output + c_skip * input

    def __call__(self, input: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_out, c_in = -sigma, 1 / (sigma ** 2 + 1) ** 0.5
        t = self.sigma_to_t(sigma)
        eps = unet(input * c_in, t)
        if self.v:  # A1111 would read a v-prediction as noise: here converted at the step's sigma, as ours
            eps = c_in * eps + sigma * c_in * (input * c_in)
        return self.get_scaled_out(sigma, input + eps * c_out, input)


def sample_lcm(model, x, sigmas, noises):
    """k-diffusion's sample_lcm as A1111 calls it; ``noises[i]`` is its noise_sampler at step i."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i:i + 1])
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noises[i]
    return x


def ours(scheduler, x: torch.Tensor, timesteps: torch.Tensor, noises=None, generator=None) -> torch.Tensor:
    """generate.py's loop: the scheduler's step on the stand-in UNet's output at each of its timesteps."""
    for index, t in enumerate(timesteps):
        extra = {"variance_noise": noises[index].float()} if noises is not None else {"generator": generator}
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).float(), t, x, return_dict=False, **extra)[0]
    return x


def noises_for(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + steps)
    return [torch.randn((1, 4, 8, 8), generator=generator).double() for _ in range(steps)]


def start_noise(steps: int) -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(steps))


@pytest.mark.parametrize("steps, timesteps", [(1, [999]), (4, [999, 679, 339, 19]), (8, None), (20, None)])
def test_the_schedule_is_a1111_s_automatic(steps: int, timesteps) -> None:
    scheduler = samplers.make_scheduler(BASE, "LCM", a1111=True)
    samplers.set_timesteps(scheduler, steps)
    denoiser = LCMCompVisDenoiser(BASE)
    sigmas = denoiser.get_sigmas(steps)
    assert scheduler.timesteps.tolist() == denoiser.sigma_to_t(sigmas[:-1]).tolist()
    if timesteps is not None:
        assert scheduler.timesteps.tolist() == timesteps
    np.testing.assert_allclose(scheduler.a1111_lcm_sigmas, sigmas.tolist(), rtol=1e-6)
    assert samplers.initial_noise_scale(scheduler) == pytest.approx(float(sigmas[0] / (sigmas[0] ** 2 + 1) ** 0.5))


@pytest.mark.parametrize("steps", [1, 4, 8, 20])
@pytest.mark.parametrize("config", [BASE, SD15, V_PREDICTION], ids=["trailing", "sd15", "v"])
def test_txt2img_is_a1111_s_sample_lcm(config, steps: int) -> None:
    """k-diffusion starts at noise * sigma_0, the UNet sees it times c_in; the last step adds no noise."""
    scheduler = samplers.make_scheduler(config, "LCM", a1111=True)
    assert type(scheduler).__name__ == "LCMScheduler"
    samplers.set_timesteps(scheduler, steps)
    denoiser = LCMCompVisDenoiser(config)
    sigmas = denoiser.get_sigmas(steps)
    noise, noises = start_noise(steps), noises_for(steps)
    expected = sample_lcm(denoiser, noise.double() * sigmas[0], sigmas, noises)
    got = ours(scheduler, noise * samplers.initial_noise_scale(scheduler), scheduler.timesteps, noises)
    assert samplers.final_latent_scale(scheduler) == 1.0
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [4, 20])
def test_the_step_noise_comes_from_the_generator_as_diffusers_drew_it(steps: int) -> None:
    """The seed's generator: one draw of the latent's shape at each step but the last, as diffusers' LCM draws."""
    scheduler = samplers.make_scheduler(BASE, "LCM", a1111=True)
    samplers.set_timesteps(scheduler, steps)
    denoiser = LCMCompVisDenoiser(BASE)
    sigmas = denoiser.get_sigmas(steps)
    noise, drawing = start_noise(steps), torch.Generator().manual_seed(5)
    draws = [torch.randn((1, 4, 8, 8), generator=drawing).double() for _ in range(steps - 1)]
    expected = sample_lcm(denoiser, noise.double() * sigmas[0], sigmas, draws)
    generator = torch.Generator().manual_seed(5)
    got = ours(scheduler, noise * samplers.initial_noise_scale(scheduler), scheduler.timesteps,
               generator=[generator])
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.randn(3, generator=generator), torch.randn(3, generator=drawing))


def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """generate.py's own img2img rule, with the request's step count as is."""
    generation = SimpleNamespace(_fit_steps=lambda _, count: count, device=None)
    return Generation._img2img_timesteps(generation, scheduler, steps, strength)


@pytest.mark.parametrize("steps", [4, 8, 20])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_is_a1111_s_k_diffusion_rule(steps: int, strength: float) -> None:
    """KDiffusionSampler.sample_img2img: t_enc + 1 steps from sigma index steps - t_enc - 1, the init latent noised
    at that sigma (x + noise * sigma), the sigmas being LCM's Automatic ones."""
    scheduler = samplers.make_scheduler(BASE, "LCM", a1111=True)
    timesteps = img2img_timesteps(scheduler, steps, strength)
    t_enc = int(min(strength, 0.999) * steps)
    denoiser = LCMCompVisDenoiser(BASE)
    sigma_sched = denoiser.get_sigmas(steps)[steps - t_enc - 1:]
    assert timesteps.tolist() == denoiser.sigma_to_t(sigma_sched[:-1]).tolist()
    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(77))
    noise, noises = start_noise(steps), noises_for(steps)
    expected = sample_lcm(denoiser, init.double() + noise.double() * sigma_sched[0], sigma_sched, noises)
    start = scheduler.add_noise(init, noise, _noised_at(scheduler, timesteps))
    got = ours(scheduler, start, timesteps, noises)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_inpainting_s_known_part_is_noised_at_the_next_step_s_sigma() -> None:
    """generate.py noises the kept part to timesteps[index + 1] after step ``index``: that step's interpolated sigma."""
    scheduler = samplers.make_scheduler(BASE, "LCM", a1111=True)
    timesteps = img2img_timesteps(scheduler, 20, 0.5)
    init, noise = torch.ones((1, 4, 8, 8)), torch.zeros((1, 4, 8, 8))
    scheduler.step(torch.zeros((1, 4, 8, 8)), timesteps[0], init, variance_noise=noise)
    sigma = LCMCompVisDenoiser(BASE).get_sigmas(20)[20 - 10 - 1 + 1]
    known = scheduler.add_noise(init, noise, timesteps[1:2])
    torch.testing.assert_close(known, init / float((sigma ** 2 + 1) ** 0.5), rtol=1e-6, atol=1e-6)


def test_the_live_stream_s_lcm_is_diffusers_own() -> None:
    scheduler = samplers.make_scheduler(BASE, "LCM")
    samplers.set_timesteps(scheduler, 4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
    assert samplers.initial_noise_scale(scheduler) == 1.0
    assert not hasattr(scheduler, "a1111_lcm_sigmas")


def test_an_lcm_request_runs_a1111_s_timesteps_and_gives_finite_images(engine):  # noqa: F811
    calls: list[int] = []
    hook = engine.parts.unet.register_forward_pre_hook(lambda _, args: calls.append(int(args[1])))
    try:
        first = run(engine, sampler_name="LCM", steps=4, seed=3)
        again = run(engine, sampler_name="LCM", steps=4, seed=3)
        image = run(engine, sampler_name="LCM", steps=4, seed=3, denoising_strength=0.75,
                    init_images=[np.full((64, 64, 3), 90, np.uint8)])
    finally:
        hook.remove()
    assert calls == [999, 679, 339, 19] * 3  # img2img at 4 steps, 0.75: t_enc 3, so 4 steps from sigma index 0
    for generation in (first, image):
        assert all(np.isfinite(picture.astype(float)).all() for picture in generation.images)
        assert math.isfinite(float(generation._latents.abs().max()))
        assert generation.request.warnings == []
    np.testing.assert_array_equal(first.images[0], again.images[0])

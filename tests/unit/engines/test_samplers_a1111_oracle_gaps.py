"""QA 45f: the A1111 sampler x schedule pairs the earlier oracle runs left unchecked, held to A1111 1.10's formulas
written out (k-diffusion stays out of our dependencies): DPM++ 3M SDE, 2M SDE Heun, and the spaced schedules."""

from __future__ import annotations

import math

import pytest
import torch

from sdbridge.engines import samplers
from tests.unit.engines.test_samplers import (BASE, a1111_own_sigmas, a1111_sigma_table, a1111_sigma_to_t, a1111_sigmas,
                                              visited_sigmas)


def eps_model(x: torch.Tensor) -> torch.Tensor:
    """A stand-in UNet: curved, so that the multistep samplers' higher differences are not 0."""
    return 0.9 * torch.tanh(1.5 * x) + 0.05 * x


def a1111_list(schedule: str, n: int, discard: bool) -> torch.Tensor:
    """KDiffusionSampler.get_sigmas: n (+ 1 where the sampler has discard_next_to_last_sigma) sigmas, then the
    next-to-last dropped."""
    n += discard
    if schedule in ("uniform", "karras", "exponential"):
        sigmas = a1111_sigmas(BASE, schedule, n)
    else:
        sigmas = a1111_own_sigmas(BASE, schedule, n)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def kdiffusion_3m_sde(denoise, x: torch.Tensor, sigmas: torch.Tensor, noises: list[torch.Tensor]) -> torch.Tensor:
    """k_diffusion.sampling.sample_dpmpp_3m_sde at eta 1, s_noise 1, as written; ``noises[i]`` is its
    noise_sampler(sigmas[i], sigmas[i + 1])."""
    denoised_1 = denoised_2 = h_1 = h_2 = None
    eta = 1.0
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            x = x + noises[i] * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = (h if sigmas[i + 1] != 0 else None), h_1
    return x


def run_scheduler(scheduler, x: torch.Tensor, noises: list[torch.Tensor], start: int = 0) -> torch.Tensor:
    """generate.py's loop: the scheduler's steps from ``start``, the Brownian noise as variance_noise."""
    timesteps = scheduler.timesteps[start:]
    if start:
        scheduler.set_begin_index(start)
    for index, t in enumerate(timesteps):
        eps = eps_model(scheduler.scale_model_input(x, t))
        x = scheduler.step(eps, t, x, variance_noise=noises[start + index], return_dict=False)[0]
    return x * samplers.final_latent_scale(scheduler)


@pytest.mark.parametrize("steps", [5, 12, 20])
@pytest.mark.parametrize("schedule", ["automatic", "karras", "exponential", "polyexponential", "align_your_steps"])
def test_dpmpp_3m_sde_runs_k_diffusion_s_steps_on_a1111_s_shortened_schedule(schedule: str, steps: int) -> None:
    """QA 45f: A1111 1.10 gives DPM++ 3M SDE discard_next_to_last_sigma (ours ran the whole schedule), and
    k-diffusion's steps differ from diffusers' sde-dpmsolver++ in two terms: the second step's D1 (phi_2, not
    phi_1 / 2) and the third order's D2 (diffusers' adds a whole D2 more). 15 to 47 apart from A1111's latents."""
    scheduler = samplers.make_scheduler(BASE, "DPM++ 3M SDE", schedule, a1111=True)
    samplers.set_timesteps(scheduler, steps)
    ran = "exponential" if schedule == "automatic" else schedule
    expected = a1111_list(ran, steps, discard=True)
    torch.testing.assert_close(scheduler.sigmas.float(), expected.float(), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps.float(), a1111_sigma_to_t(BASE, expected[:-1].float()),
                               rtol=1e-3, atol=2e-2)
    generator = torch.Generator().manual_seed(steps)
    noise = torch.randn((1, 4, 8, 8), generator=generator)
    noises = [torch.randn((1, 4, 8, 8), generator=generator) for _ in range(steps)]
    noises[-1] = torch.zeros_like(noise)  # the step into 0 draws none
    ours = run_scheduler(scheduler, noise * samplers.initial_noise_scale(scheduler), noises)

    sigmas = expected.double()

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:  # CompVisDenoiser: x - sigma * eps(x * c_in)
        return x - sigmas[i] * eps_model((x / math.sqrt(float(sigmas[i]) ** 2 + 1)).float()).double()

    theirs = kdiffusion_3m_sde(denoise, noise.double() * sigmas[0], sigmas, [n.double() for n in noises])
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)


def test_the_live_stream_s_3m_sde_is_diffusers_own() -> None:
    """The A1111 semantics stay in one-shot requests: the stream's 3M SDE keeps diffusers' step and schedule."""
    live = samplers.make_scheduler(BASE, "DPM++ 3M SDE")
    samplers.set_timesteps(live, 6)
    assert "multistep_dpm_solver_third_order_update" not in vars(live)
    assert live.config["solver_type"] == "midpoint" and len(live.timesteps) == 6


# --- SGM Uniform, Simple and DDIM as A1111 computes them (modules/sd_schedulers.py) ----------------------------------

def a1111_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.t_to_sigma: log-sigma interpolated between the table's neighbours."""
    log_table = a1111_sigma_table(BASE).log()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def a1111_spaced_sigmas(schedule: str, n: int) -> torch.Tensor:
    """sd_schedulers.py's sgm_uniform (t = linspace(sigma_to_t(sigma_max), sigma_to_t(sigma_min), n + 1) less its
    last), simple_scheduler (sigmas[-(1 + int(x * len / n))]) and ddim_scheduler (sigmas[1::len // n], reversed),
    each then 0."""
    table = a1111_sigma_table(BASE)
    if schedule == "sgm_uniform":
        sigmas = [float(a1111_t_to_sigma(t)) for t in torch.linspace(999, 0, n + 1)[:-1]]
    elif schedule == "simple":
        ss = len(table) / n
        sigmas = [float(table[-(1 + int(x * ss))]) for x in range(n)]
    else:
        ss, x, sigmas = max(len(table) // n, 1), 1, []
        while x < len(table):
            sigmas.append(float(table[x]))
            x += ss
        sigmas = sigmas[::-1]
    return torch.tensor(sigmas + [0.0])


@pytest.mark.parametrize("steps", [1, 7, 20, 30])
@pytest.mark.parametrize("schedule", ["sgm_uniform", "simple", "ddim"])
@pytest.mark.parametrize("name", ["Euler", "Euler a", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE",
                                  "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_spaced_schedules_are_a1111_s_sigma_lists(name: str, schedule: str, steps: int) -> None:
    """QA 45f: these ran as diffusers' trailing or leading spacing. A1111's SGM Uniform spaces by 999 / n, not
    1000 / n; DPM2, DPM2 a and 3M SDE drop the next-to-last of n + 1 sigmas there too; DDIM's every (1000 // n)th
    timestep from 1 runs 8 steps at 7 (31 at 30); and the first sigma is the run's start (diffusers' leading spacing
    starts at sqrt(sigma^2 + 1)). 0.007 to 3.5 apart from A1111's latents at 20 steps."""
    scheduler = samplers.make_scheduler(BASE, name, schedule, a1111=True)
    samplers.set_timesteps(scheduler, steps)
    discard = name in ("DPM2", "DPM2 a", "DPM++ 3M SDE")
    expected = a1111_spaced_sigmas(schedule, steps + discard)
    if discard:
        expected = torch.cat([expected[:-2], expected[-1:]])
    ours = visited_sigmas(scheduler)
    assert ours.shape == expected.shape, (ours, expected)
    torch.testing.assert_close(ours, expected, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps[:1].float(), a1111_sigma_to_t(BASE, expected[:1].float()),
                               rtol=1e-3, atol=2e-2)
    if name in ("Euler", "LMS", "Heun", "DPM2"):  # txt2img starts at noise * sigmas[0], as A1111's sample()
        assert samplers.initial_noise_scale(scheduler) == pytest.approx(float(expected[0]), rel=1e-5)
    assert samplers.most_steps(scheduler) is None


def test_the_live_stream_keeps_diffusers_spacing_for_them() -> None:
    for schedule, first in (("sgm_uniform", 999), ("ddim", 951)):
        live = samplers.make_scheduler(BASE, "DPM2", schedule)
        samplers.set_timesteps(live, 20)
        assert round(float(live.timesteps[0])) == first and len(visited_sigmas(live)) == 21


# --- The sigma table as A1111 holds it: the SDE samplers' Brownian trees span its ends -------------------------------

@pytest.mark.parametrize("schedule", ["automatic", "uniform", "karras", "exponential", "beta", "sgm_uniform", "simple",
                                      "ddim"])
@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_the_brownian_samplers_schedule_ends_are_a1111_s_to_the_bit(name: str, schedule: str) -> None:
    """QA 45f: the schedules came from diffusers' float32 alphas_cumprod, whose sigma_max is a float32 step above the
    table A1111 builds (ldm's betas and cumprod in float64, stored as float32). create_noise_sampler's Brownian tree
    spans the schedule's ends, and a Brownian path moves by sqrt(dt): 2M SDE 0.008, 3M SDE 0.02 and DPM++ SDE (which
    ran diffusers' own Karras, Uniform and Beta) 0.065 from A1111's latents; now 2e-4 at most."""
    scheduler = samplers.make_scheduler(BASE, name, schedule, a1111=True)
    samplers.set_timesteps(scheduler, 10)
    ran = {"DPM++ SDE": "karras"}.get(name, "exponential") if schedule == "automatic" else schedule
    discard = name == "DPM++ 3M SDE"
    if ran in ("sgm_uniform", "simple", "ddim"):  # Simple and DDIM: the table's own sigmas (exp(log) was 1 ulp off)
        expected = a1111_spaced_sigmas(ran, 10 + discard)
    else:
        expected = a1111_list(ran, 10, discard=False) if not discard else a1111_list(ran, 11, discard=False)
    if discard:
        expected = torch.cat([expected[:-2], expected[-1:]])
    ours = scheduler.sigmas.float()
    ours = ours[ours > 0]
    assert float(ours.max()) == float(expected.max())  # to the bit: the tree's t1
    assert float(ours.min()) == float(expected[expected > 0].min())  # and its t0
    table = torch.cumprod(1 - torch.linspace(BASE["beta_start"] ** 0.5, BASE["beta_end"] ** 0.5, 1000,
                                             dtype=torch.float64) ** 2, 0).float()
    torch.testing.assert_close(samplers.a1111_alphas_cumprod(scheduler), table, rtol=0, atol=0)

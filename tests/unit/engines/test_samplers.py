"""A1111 sampler and schedule names -> diffusers schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from sdbridge.engines import samplers
from sdbridge.engines.samplers import SamplerError
from sdbridge.engines.tiny import build_tiny_components

BASE = build_tiny_components()["scheduler"].config

CASES = [
    ("Euler a", None, "EulerAncestralDiscreteScheduler", {}),
    ("Euler", None, "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    ("LMS", None, "LMSDiscreteScheduler", {}),
    ("Heun", None, "HeunDiscreteScheduler", {}),
    ("DPM++ 2M", None, "DPMSolverMultistepScheduler", {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M Karras", None, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPM++ 2M", "Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPM++ 2M", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPM++ SDE Karras", None, "DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    ("DPM++ 2M SDE", None, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    ("DPM++ 2M SDE Heun", None, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                "solver_type": "heun"}),
    ("DPM++ 3M SDE", None, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    ("DPM++ 3M SDE", "Karras", "DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ("DDIM", None, "DDIMScheduler", {}),
    ("PLMS", None, "PNDMScheduler", {"skip_prk_steps": True}),
    ("UniPC", None, "UniPCMultistepScheduler", {}),
    ("LCM", None, "LCMScheduler", {}),
    ("k_euler_a", None, "EulerAncestralDiscreteScheduler", {}),
    ("euler A", None, "EulerAncestralDiscreteScheduler", {}),
    ("Euler", "Exponential", "EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    ("DPM++ 2M", "Beta", "DPMSolverMultistepScheduler", {"use_beta_sigmas": True}),
    ("Euler a", "normal", "EulerAncestralDiscreteScheduler", {}),                     # sd-backend-client's default
    ("DDIM", "ddim", "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("Euler", "DDIM", "EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
]


@pytest.mark.parametrize(("name", "schedule", "cls", "config"), CASES)
def test_names_map_to_schedulers(name: str, schedule: str | None, cls: str, config: dict) -> None:
    scheduler = samplers.make_scheduler(BASE, name, schedule)
    assert type(scheduler).__name__ == cls
    for key, value in config.items():
        assert scheduler.config[key] == value, key
    # The model's own betas and spacing are kept.
    assert scheduler.config["beta_schedule"] == BASE["beta_schedule"]
    if "timestep_spacing" not in config:
        assert scheduler.config["timestep_spacing"] == BASE["timestep_spacing"]


def test_a_karras_model_config_does_not_leak_into_a_plain_sampler() -> None:
    karras = samplers.make_scheduler(BASE, "DPM++ 2M Karras")
    plain = samplers.make_scheduler(karras.config, "DPM++ 2M")
    assert plain.config["use_karras_sigmas"] is False
    third = samplers.make_scheduler(BASE, "DPM++ 3M SDE")
    second = samplers.make_scheduler(third.config, "DPM++ 2M")  # a model shipped with a third-order config
    assert (second.config["solver_order"], second.config["algorithm_type"]) == (2, "dpmsolver++")


@pytest.mark.parametrize(("name", "schedule", "code"), [
    ("Nope", None, "unknown_sampler"),
    ("DDIM Karras", None, "unknown_sampler"),    # DDIM has no sigma schedule
    ("DDIM", "Karras", "unknown_scheduler"),
    ("Euler a", "Karras", "unknown_scheduler"),  # diffusers' Euler a takes no sigma schedule: it would be ignored
    ("Euler a Karras", None, "unknown_sampler"),
    ("Euler", "kl_optimal", "unknown_scheduler"),
    ("Euler", "Wobbly", "unknown_scheduler"),
])
def test_unknown_names_are_refused_with_the_list(name: str, schedule: str | None, code: str) -> None:
    with pytest.raises(SamplerError) as caught:
        samplers.resolve(name, schedule)
    assert caught.value.code == code
    assert repr(schedule or name) in str(caught.value) or name in str(caught.value)


def test_every_listed_name_resolves() -> None:
    listed = samplers.a1111_samplers()
    assert {"name", "aliases", "options"} <= set(listed[0])
    # Each lists the schedule types it takes, each of which it runs (Euler a: no Karras; QA 6).
    by_name = {entry["name"]: entry["options"].get("scheduler", "") for entry in listed}
    # /sdapi/v1/samplers is the A1111 API's: Euler a takes Karras and Beta there (QA 33 M3, QA 37 M1), not on the
    # stream; LCM runs Karras as Automatic (warned), so it does not list it.
    assert "karras" in by_name["Euler"] and "karras" in by_name["Euler a"] and "karras" not in by_name["LCM"]
    assert "beta" in by_name["Euler a"] and "karras" not in by_name["DDIM"]
    for name, takes in by_name.items():
        for schedule in filter(None, takes.split(", ")):
            samplers.resolve(name, schedule, a1111=True)
    for name in samplers.names():
        samplers.make_scheduler(BASE, name)
    assert [s["name"] for s in samplers.a1111_schedulers()][:3] == ["automatic", "uniform", "karras"]


def test_the_stream_parameter_lists_every_sampler() -> None:
    """The live ``sampler`` parameter's choices (params.py keeps them without importing engines) are these."""
    from sdbridge.engines.samplers import SAMPLERS
    from sdbridge.params import STREAM_SAMPLERS

    assert STREAM_SAMPLERS == tuple(sampler.name for sampler in SAMPLERS)


@pytest.mark.parametrize("schedule", ["SGM Uniform", "sgm_uniform", "Simple"])
@pytest.mark.parametrize("name", ["Euler", "DPM++ 2M", "DDIM", "UniPC", "Euler a"])
def test_sgm_uniform_and_simple_space_timesteps_down_from_the_last(name: str, schedule: str) -> None:
    """A1111's schedule types for turbo and Lightning models: every sampler takes them, a model whose config
    spaces its timesteps otherwise ("leading", as SD 1.5's) included."""
    leading = {**BASE, "timestep_spacing": "leading"}
    scheduler = samplers.make_scheduler(leading, name, schedule)
    scheduler.set_timesteps(4)
    assert scheduler.config["timestep_spacing"] == "trailing"
    assert [round(float(t)) for t in scheduler.timesteps[::scheduler.order]][:4] == [999, 749, 499, 249]
    assert samplers.make_scheduler(leading, name).config["timestep_spacing"] == "leading"


def test_lcm_keeps_its_own_timesteps_and_says_so() -> None:
    assert {"sgm_uniform", "simple"} <= {schedule["name"] for schedule in samplers.a1111_schedulers()}
    with pytest.raises(SamplerError, match="'LCM' does not take the SGM Uniform schedule"):
        samplers.resolve("LCM", "SGM Uniform")


def test_a1111s_ddim_schedule_takes_every_nth_timestep_from_1():
    """A1111's ddim_scheduler: sigmas at timesteps 1, 1 + 1000 // n, ... (its sd_schedulers.py), the first step
    from the highest of them."""
    scheduler = samplers.make_scheduler(BASE, "Euler", "DDIM")
    scheduler.set_timesteps(20)
    assert [round(float(t)) for t in scheduler.timesteps] == list(range(951, 0, -50))


# --- The oracle: A1111 1.10's schedules, written out (k-diffusion stays out of our dependencies) -----------------

# modules/sd_samplers_kdiffusion.py ``samplers_k_diffusion``: each sampler's "scheduler" option, its Automatic.
A1111_AUTOMATIC = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM2": "karras", "DPM2 a": "karras",
                   "DPM++ 2M SDE": "exponential", "DPM++ 2M SDE Heun": "exponential", "DPM++ 3M SDE": "exponential"}


def a1111_sigma_table(config) -> torch.Tensor:
    """The model's 1000 discrete sigmas as A1111 holds them: ldm's make_beta_schedule("linear") (float64
    linspace of sqrt(beta), squared), alphas_cumprod, and k-diffusion CompVisDenoiser's ((1 - a) / a) ** 0.5."""
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def a1111_sigmas(config, schedule: str, n: int) -> torch.Tensor:
    """modules/sd_samplers_kdiffusion.py ``KDiffusionSampler.get_sigmas``: uniform is k-diffusion's
    DiscreteSchedule.get_sigmas (t = linspace(999, 0, n), log-sigma interpolated, then 0); Karras and
    Exponential are k_diffusion.sampling's get_sigmas_karras/_exponential between the table's ends."""
    table = a1111_sigma_table(config)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if schedule == "uniform":
        t = torch.linspace(len(table) - 1, 0, n)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        sigmas = ((1 - w) * table.log()[low] + w * table.log()[high]).exp()
    elif schedule == "karras":
        ramp, rho = torch.linspace(0, 1, n), 7.0
        sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    else:
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def visited_sigmas(scheduler) -> torch.Tensor:
    """The sigmas a scheduler steps through, each once (second-order ones hold each twice)."""
    sigmas = [float(s) for s in scheduler.sigmas]
    return torch.tensor([s for i, s in enumerate(sigmas) if i == 0 or abs(s - sigmas[i - 1]) > 1e-7])


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("schedule", ["automatic", "uniform", "karras", "exponential"])
@pytest.mark.parametrize("name", ["Euler", "Euler a", "LMS", "Heun", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
                                  "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_a1111_schedules_are_a1111_s_sigmas_on_a_trailing_model(name: str, schedule: str, steps: int) -> None:
    """QA 33 H2/H3: on the shipped (trailing) configs Automatic and Uniform ended at sigma 0.223 (A1111: 0.0292),
    Karras/Exponential took that as sigma_min, and Automatic ignored A1111's per-sampler default."""
    assert BASE["timestep_spacing"] == "trailing"
    scheduler = samplers.make_scheduler(BASE, name, schedule, a1111=True)
    samplers.set_timesteps(scheduler, steps)
    ran = A1111_AUTOMATIC.get(name, "uniform") if schedule == "automatic" else schedule
    assert samplers.a1111_schedule(name, schedule).name == ran
    discard = name == "DPM++ 3M SDE"  # A1111's discard_next_to_last_sigma (QA 45f)
    expected = a1111_sigmas(BASE, ran, steps + discard)
    if discard:
        expected = torch.cat([expected[:-2], expected[-1:]])
    ours = visited_sigmas(scheduler)
    assert ours.shape == expected.shape, (ours, expected)
    torch.testing.assert_close(ours, expected, rtol=2e-4, atol=1e-6)


def test_the_live_stream_s_schedulers_keep_the_model_s_spacing() -> None:
    """The A1111 semantics are an option for one-shot requests: the stream's scheduler is what it was."""
    for name in ("Euler", "DPM++ 2M", "Euler a"):
        scheduler = samplers.make_scheduler(BASE, name)
        samplers.set_timesteps(scheduler, 4)
        assert scheduler.config["timestep_spacing"] == "trailing"
        assert [round(float(t)) for t in scheduler.timesteps[::scheduler.order]] == [999, 749, 499, 249]
    assert samplers.make_scheduler(BASE, "DPM++ 2M").config["use_karras_sigmas"] is False


def test_automatic_names_the_schedule_a1111_runs() -> None:
    assert samplers.a1111_schedule("DPM++ 2M", "automatic").label == "Karras"
    assert samplers.a1111_schedule("DPM++ 2M SDE", None).label == "Exponential"
    assert samplers.a1111_schedule("Euler a", "automatic").name == "uniform"
    assert samplers.a1111_schedule("DPM++ 2M", "sgm_uniform").name == "sgm_uniform"
    assert samplers.a1111_schedule("DDIM", "automatic").name == "automatic"  # A1111's own timesteps (QA 33 M5)


def a1111_sigma_to_t(config, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.sigma_to_t (A1111's enable_quantization off): the UNet's fractional timestep
    for each sigma, log-sigma interpolated in the table."""
    log_table = a1111_sigma_table(config).log()
    dists = sigmas.log() - log_table[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_table) - 2)
    w = ((log_table[low] - sigmas.log()) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M", "DPM++ 2M SDE"])
@pytest.mark.parametrize("schedule", ["uniform", "karras", "exponential"])
def test_euler_a_takes_karras_and_the_unet_gets_a1111_s_fractional_timesteps(name: str, schedule: str) -> None:
    """QA 33 M3: A1111 runs Euler a on any schedule (it was a 422 here); L3: DPM++ 2M's Karras and Exponential
    timesteps were rounded for the UNet, A1111 passes sigma_to_t's fractional ones. The stream still refuses."""
    scheduler = samplers.make_scheduler(BASE, name, schedule, a1111=True)
    samplers.set_timesteps(scheduler, 10)
    expected = a1111_sigmas(BASE, schedule, 10)
    torch.testing.assert_close(scheduler.sigmas, expected, rtol=1e-5, atol=1e-6)
    t = a1111_sigma_to_t(BASE, expected[:-1]) if schedule != "uniform" else torch.linspace(999, 0, 10)
    torch.testing.assert_close(scheduler.timesteps.float(), t, rtol=1e-4, atol=1e-3)
    if schedule != "uniform":  # (999 / 9 apart, uniform's are whole at 10 steps)
        assert float(scheduler.timesteps[3]) != round(float(scheduler.timesteps[3]))
    if name == "Euler a" and schedule != "uniform":
        with pytest.raises(SamplerError):
            samplers.make_scheduler(BASE, name, schedule)  # the live stream's scheduler: refused as before


# --- A1111 1.10's own sigma lists (QA 37: Polyexponential, KL Optimal, Align Your Steps answered 422; Euler a Beta) --

# modules/sd_schedulers.py get_align_your_steps_sigmas: NVIDIA's 10-step lists.
A1111_AYS = {False: [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
             True: [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]}


def a1111_own_sigmas(config, schedule: str, n: int, sdxl: bool = False) -> torch.Tensor:
    """The oracle, A1111 1.10 as written (sigma_min, sigma_max: the table's ends, as get_sigmas passes them):
    k_diffusion.sampling.get_sigmas_polyexponential at Polyexponential's default_rho 1.0; sd_schedulers.py
    ``kl_optimal`` (n + 1 sigmas, no 0 after them), ``get_align_your_steps_sigmas`` (its loglinear_interp unless
    n is 11), ``beta_scheduler`` at the beta_dist_alpha/beta defaults 0.6."""
    import numpy as np
    from scipy import stats

    table = a1111_sigma_table(config)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if schedule == "polyexponential":
        ramp = torch.linspace(1, 0, n) ** 1.0
        sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
        return torch.cat([sigmas, sigmas.new_zeros(1)])
    if schedule == "kl_optimal":
        alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
        step_indices = torch.arange(n + 1)
        return torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)
    if schedule == "align_your_steps":
        sigmas = list(A1111_AYS[sdxl])
        if n != len(sigmas):
            xs, ys = np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1])
            sigmas = np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy(), [0.0])
        else:
            sigmas.append(0.0)
        return torch.FloatTensor(sigmas)
    assert schedule == "beta"
    timesteps = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + x * (sigma_max - sigma_min) for x in timesteps] + [0.0])


@pytest.mark.parametrize("steps", [1, 4, 11, 20])
@pytest.mark.parametrize("schedule", ["polyexponential", "kl_optimal", "align_your_steps", "beta"])
@pytest.mark.parametrize("name", ["Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M SDE"])
def test_a1111_s_own_sigma_lists_run_with_a1111_s_timesteps(name: str, schedule: str, steps: int) -> None:
    """No diffusers scheduler builds these: set_timesteps puts A1111's sigmas in, and the UNet's fractional t."""
    scheduler = samplers.make_scheduler(BASE, name, schedule, a1111=True)
    samplers.set_timesteps(scheduler, steps)
    expected = a1111_own_sigmas(BASE, schedule, steps)
    assert samplers.a1111_schedule(name, schedule).name == schedule
    torch.testing.assert_close(scheduler.sigmas.float(), expected.float(), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps.float(), a1111_sigma_to_t(BASE, expected[:steps].float()),
                               rtol=1e-3, atol=2e-2)


def test_align_your_steps_takes_sdxl_s_list_and_11_steps_are_the_list_itself() -> None:
    for sdxl in (False, True):
        scheduler = samplers.make_scheduler(BASE, "Euler", "Align Your Steps", a1111=True, sdxl=sdxl)
        samplers.set_timesteps(scheduler, 11)
        assert [round(float(s), 3) for s in scheduler.sigmas] == A1111_AYS[sdxl] + [0.0]
    assert samplers.final_latent_scale(scheduler) == 1.0


def test_kl_optimal_ends_at_sigma_min_and_dpm_solver_s_latents_are_scaled_back() -> None:
    """KL Optimal's last sigma is the table's first, not 0: DPM-Solver's x / sqrt(1 + sigma^2) is then not x."""
    scheduler = samplers.make_scheduler(BASE, "DPM++ 2M", "KL Optimal", a1111=True)
    samplers.set_timesteps(scheduler, 5)
    sigma_min = float(a1111_sigma_table(BASE)[0])
    assert float(scheduler.sigmas[-1]) == pytest.approx(sigma_min, rel=1e-4)
    assert samplers.final_latent_scale(scheduler) == pytest.approx(math.sqrt(1 + sigma_min ** 2))
    assert scheduler.config["final_sigmas_type"] == "sigma_min" and scheduler.config["lower_order_final"] is False
    karras = samplers.make_scheduler(BASE, "DPM++ 2M", "Karras", a1111=True)
    samplers.set_timesteps(karras, 5)
    assert samplers.final_latent_scale(karras) == 1.0 and karras.config["final_sigmas_type"] == "zero"


@pytest.mark.parametrize("schedule", ["polyexponential", "KL Optimal", "align_your_steps"])
def test_a1111_s_own_lists_stay_out_of_the_live_stream(schedule: str) -> None:
    with pytest.raises(SamplerError, match=f"{schedule!r}.*one-shot"):
        samplers.resolve("Euler", schedule)
    listed = {s["label"] for s in samplers.a1111_schedulers()}
    assert {"Polyexponential", "KL Optimal", "Align Your Steps"} <= listed
    taken = {entry["name"]: entry["options"].get("scheduler", "") for entry in samplers.a1111_samplers()}
    key = samplers.resolve("Euler", schedule, a1111=True)[1].name
    assert key in taken["Euler a"] and key in taken["Heun"] and key not in taken["DDIM"]


def a1111_get_sigmas(config, name: str, schedule: str, n: int) -> torch.Tensor:
    """KDiffusionSampler.get_sigmas: for DPM2 and DPM2 a (discard_next_to_last_sigma) one step more, and the
    next-to-last sigma dropped."""
    discard = name in ("DPM2", "DPM2 a")
    ran = A1111_AUTOMATIC.get(name, "uniform") if schedule == "automatic" else schedule
    n += discard
    own = ran in ("polyexponential", "kl_optimal", "align_your_steps", "beta")
    sigmas = a1111_own_sigmas(config, ran, n) if own else a1111_sigmas(config, ran, n)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize(("name", "schedule"), [
    (name, schedule) for name in ("DPM2", "DPM2 a")
    for schedule in ("automatic", "uniform", "karras", "exponential", "polyexponential", "kl_optimal",
                     "align_your_steps", "beta")
] + [(name, schedule) for name in ("Heun", "DPM++ SDE")
     for schedule in ("polyexponential", "kl_optimal", "align_your_steps")])
def test_second_order_samplers_run_a1111_s_sigmas_and_dpm2_drops_the_next_to_last(name, schedule, steps) -> None:
    """QA 33 L4: A1111 runs DPM2 and DPM2 a over steps + 1 sigmas less the next-to-last (0.25 / 1.1 apart from its
    oracle); the midpoint samplers took none of A1111's own lists (a 422). Heun's and DPM++ SDE's other schedules
    are diffusers' own (test_a1111_schedules_are_a1111_s_sigmas_on_a_trailing_model). KL Optimal ends at sigma_min:
    every step, the last too, is second-order there (k-diffusion's Euler step is only into 0): 2 UNet calls each."""
    scheduler = samplers.make_scheduler(BASE, name, schedule, a1111=True)
    samplers.set_timesteps(scheduler, steps)
    expected = a1111_get_sigmas(BASE, name, schedule, steps)
    assert len(scheduler.timesteps) == 2 * steps - (float(expected[-1]) == 0)
    if float(expected[-1]) > 0:  # diffusers' list goes on to 0, a step the run does not take
        expected = torch.cat([expected, expected.new_zeros(1)])
    ours = visited_sigmas(scheduler)
    assert ours.shape == expected.shape, (ours, expected)
    torch.testing.assert_close(ours, expected.float(), rtol=2e-4, atol=1e-6)
    # the UNet's first timestep: sigma_to_t of the first sigma, unrounded
    torch.testing.assert_close(scheduler.timesteps[:1].float(), a1111_sigma_to_t(BASE, expected[:1].float()),
                               rtol=1e-3, atol=2e-2)
    assert scheduler.config["use_exponential_sigmas"] == (schedule == "exponential" and name in ("DPM2", "DPM2 a"))


@pytest.mark.parametrize("name, schedule", [
    ("DDIM", "Karras"), ("DDIM", "Exponential"), ("DDIM", "Beta"), ("PLMS", "Karras"), ("PLMS", "Exponential"),
    ("PLMS", "Beta"), ("DDIM", "KL Optimal"), ("UniPC", "Align Your Steps"),
    ("LCM", "Karras"), ("LCM", "Exponential"), ("LCM", "SGM Uniform"), ("LCM", "Simple"), ("LCM", "DDIM"),
    ("LCM", "Beta"),
])
def test_a1111_s_timestep_samplers_and_lcm_run_any_schedule_as_automatic_and_say_so(name: str, schedule: str) -> None:
    """QA 37 M1: A1111 1.10 runs these pairs (its DDIM, PLMS and UniPC read no schedule type); they were a 422.
    They run as with Automatic, and the warning names what was not applied. The live stream still refuses them."""
    sampler, named = samplers.resolve(name, schedule, a1111=True)
    assert samplers.a1111_schedule(name, schedule).name == "automatic"
    scheduler = samplers.make_scheduler(BASE, name, schedule, a1111=True)
    automatic = samplers.make_scheduler(BASE, name, "automatic", a1111=True)
    samplers.set_timesteps(scheduler, 4)
    samplers.set_timesteps(automatic, 4)
    assert torch.equal(scheduler.timesteps, automatic.timesteps)
    warning = samplers.schedule_warning(name, schedule)
    assert warning is not None and warning.startswith(f"schedule type {named.label!r} ignored: {name} runs")
    assert samplers.schedule_warning(name, "automatic") is None and samplers.schedule_warning("Euler", schedule) is None
    with pytest.raises(SamplerError):
        samplers.resolve(name, schedule)


@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "Beta"])
def test_a1111_s_unipc_reads_no_sigma_schedule_either(schedule: str) -> None:
    """A1111 1.10's UniPC is one of its timestep samplers, which read no schedule type; ours applied Karras,
    Exponential and Beta in a one-shot request (QA 38f). It runs as with Automatic there, and says so; the live
    stream keeps diffusers' UniPC with the schedule, as before."""
    scheduler = samplers.make_scheduler(BASE, "UniPC", schedule, a1111=True)
    automatic = samplers.make_scheduler(BASE, "UniPC", "automatic", a1111=True)
    samplers.set_timesteps(scheduler, 6)
    samplers.set_timesteps(automatic, 6)
    assert torch.equal(scheduler.timesteps, automatic.timesteps)
    assert samplers.schedule_warning("UniPC", schedule).startswith(f"schedule type {schedule!r} ignored: UniPC runs")
    live, live_automatic = samplers.make_scheduler(BASE, "UniPC", schedule), samplers.make_scheduler(BASE, "UniPC")
    live.set_timesteps(6)
    live_automatic.set_timesteps(6)
    assert not torch.equal(live.timesteps, live_automatic.timesteps)


def test_a_diffusers_that_no_longer_takes_the_schedule_hook_is_refused_not_run_unsaid(monkeypatch):
    """Heun, DPM2 and DPM++ SDE get A1111's sigmas through the hook diffusers' Exponential schedule calls
    (samplers._derive_from); a diffusers that stops calling it would run its own schedule: a SamplerError, where
    an assert was (a 500, and nothing at all under python -O)."""
    scheduler = samplers.make_scheduler(BASE, "Heun", "Polyexponential", a1111=True)
    own = type(scheduler).set_timesteps

    def without_the_hook(self, *args, **kwargs):
        self.register_to_config(use_exponential_sigmas=False)  # as a diffusers that no longer reads it
        return own(self, *args, **kwargs)

    samplers.set_timesteps(scheduler, 8)  # with the hook: A1111's schedule
    monkeypatch.setattr(type(scheduler), "set_timesteps", without_the_hook)
    with pytest.raises(SamplerError, match="no longer takes A1111's schedule into HeunDiscreteScheduler") as info:
        samplers.set_timesteps(samplers.make_scheduler(BASE, "Heun", "Polyexponential", a1111=True), 8)
    assert info.value.code == "unknown_scheduler"

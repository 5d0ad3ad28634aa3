"""AUTOMATIC1111's sampler and schedule names, mapped onto diffusers schedulers.

A1111 names a sampler ("DPM++ 2M") and, since 1.9, a schedule type ("Karras") separately; older
clients still send the combined name ("DPM++ 2M Karras"). Both forms resolve here to one
diffusers scheduler class and its config overrides, following the table in diffusers' docs
("Schedulers: A1111 / k-diffusion equivalents"). The model's own scheduler config (betas,
prediction type, timestep spacing) is kept; only the solver and the sigma schedule change.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdbridge.engines import a1111_lcm, a1111_timesteps
from sdbridge.errors import SdbridgeError


class SamplerError(SdbridgeError):
    code = "unknown_sampler"


@dataclass(frozen=True)
class Sampler:
    name: str                      # as AUTOMATIC1111 shows it
    scheduler: str                 # the diffusers class
    aliases: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    stochastic: bool = False       # draws noise at each step (seeded per image)
    spaced: bool = True            # takes timestep_spacing (LCM keeps its own skipping schedule)
    # A1111 1.10's "Automatic" schedule for a sampler it runs through k-diffusion on sigma schedules
    # (modules/sd_samplers_kdiffusion.py ``samplers_k_diffusion``'s "scheduler" options); None: not one of those
    # (DDIM, PLMS and UniPC run A1111's own timesteps, QA 33 M5; LCM and TCD their own).
    automatic: str | None = None


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", ("k_euler_a", "k_euler_ancestral"), stochastic=True,
            automatic="uniform"),
    Sampler("Euler", "EulerDiscreteScheduler", ("k_euler",), automatic="uniform"),
    Sampler("LMS", "LMSDiscreteScheduler", ("k_lms",), automatic="uniform"),
    Sampler("Heun", "HeunDiscreteScheduler", ("k_heun",), automatic="uniform"),
    Sampler("DPM2", "KDPM2DiscreteScheduler", ("k_dpm_2",), automatic="karras"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", ("k_dpm_2_a",), stochastic=True, automatic="karras"),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", ("k_dpmpp_2m",), automatic="karras"),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", ("k_dpmpp_sde",), stochastic=True, automatic="karras"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", ("k_dpmpp_2m_sde",),
            {"algorithm_type": "sde-dpmsolver++"}, stochastic=True, automatic="exponential"),
    Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", ("k_dpmpp_2m_sde_heun",),
            {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, stochastic=True, automatic="exponential"),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", ("k_dpmpp_3m_sde",),
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, stochastic=True, automatic="exponential"),
    Sampler("DDIM", "DDIMScheduler", ("ddim",)),
    Sampler("PLMS", "PNDMScheduler", ("plms",), {"skip_prk_steps": True}),
    Sampler("UniPC", "UniPCMultistepScheduler", ("unipc",)),
    Sampler("LCM", "LCMScheduler", ("k_lcm", "lcm"), stochastic=True, spaced=False),
    # Trajectory Consistency Distillation, for TCD and Hyper-SD LoRAs: LCM's skipping schedule, and a step that
    # re-noises by its gamma (the step's eta: 0.3, TCD's default, or a request's eta).
    Sampler("TCD", "TCDScheduler", ("tcd",), stochastic=True, spaced=False),
)


@dataclass(frozen=True)
class Schedule:
    name: str                      # A1111's key
    label: str
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    sigmas: bool = False           # a sigma schedule, which only k-diffusion-style schedulers take
    # A1111's own sigma list, which no diffusers scheduler builds: computed by :func:`a1111_sigmas` for a one-shot
    # request only (A1111_ONLY_SCHEDULERS take it; the live stream refuses it).
    a1111_only: bool = False


SCHEDULES: tuple[Schedule, ...] = (
    Schedule("automatic", "Automatic"),
    Schedule("uniform", "Uniform"),
    Schedule("karras", "Karras", {"use_karras_sigmas": True}, default_rho=7.0, sigmas=True),
    Schedule("exponential", "Exponential", {"use_exponential_sigmas": True}, sigmas=True),
    # A1111 1.10's (modules/sd_schedulers.py): k-diffusion's get_sigmas_polyexponential at its default rho 1,
    # kl_optimal, and get_align_your_steps_sigmas (NVIDIA's fixed lists for SD 1.5 and SDXL).
    Schedule("polyexponential", "Polyexponential", default_rho=1.0, sigmas=True, a1111_only=True),
    # Timesteps evenly spaced down from the last one, the choice for turbo, Lightning and Hyper models: A1111's
    # "Simple" picks exactly diffusers' trailing timesteps; its "SGM Uniform" spaces them by 999/n rather than
    # 1000/n, a fraction of a timestep apart.
    Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, aliases=("sgm uniform",)),
    Schedule("kl_optimal", "KL Optimal", sigmas=True, a1111_only=True),
    Schedule("align_your_steps", "Align Your Steps", sigmas=True, a1111_only=True),
    Schedule("simple", "Simple", {"timestep_spacing": "trailing"}),
    # A1111's Normal spaces the timesteps evenly from the first to the last, as its Uniform does: here, as Uniform,
    # the model's own spacing. Its DDIM takes every (1000 / n)th timestep from 1 up: diffusers' leading spacing
    # with an offset of 1, exactly.
    Schedule("normal", "Normal"),
    Schedule("ddim", "DDIM", {"timestep_spacing": "leading", "steps_offset": 1}),
    Schedule("beta", "Beta", {"use_beta_sigmas": True}, sigmas=True),
)

_BY_NAME = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}
_SCHEDULE_BY_NAME = {key.lower(): s for s in SCHEDULES for key in (s.name, s.label, *s.aliases)}
# Schedules that only k-diffusion-style (sigma) schedulers take.
# Euler a's diffusers scheduler takes no sigma schedule (it would run its own and say Karras).
_SIGMA_SCHEDULERS = {"EulerDiscreteScheduler", "LMSDiscreteScheduler",
                     "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                     "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "UniPCMultistepScheduler"}


# Schedulers whose sigmas set_timesteps replaces with A1111's for a one-shot request: DPM++ 2M's (its linspace ends at
# t = 50 of 1000, and its Karras/Exponential timesteps are rounded for the UNet: QA 33 L3) and Euler a's, which
# builds no Karras or Exponential schedule itself (A1111 runs any schedule with any sampler: QA 33 M3).
_A1111_SIGMAS = {"DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"}
_A1111_SCHEDULES = ("uniform", "normal", "karras", "exponential", "beta")
# The config flags by which a diffusers scheduler builds a sigma schedule of its own.
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# The first-order schedulers whose sigmas and timesteps set_timesteps can replace outright, so that they take A1111's
# own sigma lists (Schedule.a1111_only).
A1111_ONLY_SCHEDULERS = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                         "DPMSolverMultistepScheduler"}
# The second-order ones, whose midpoints diffusers derives from the sigma list: set_timesteps has it derive them from
# A1111's (:func:`_derive_from`). Their last step into sigma 0 is an Euler step, one UNet call, as k-diffusion's; KL
# Optimal's last sigma is not 0, where k-diffusion takes a second-order step: diffusers gets that sigma as one more
# step's, and the run stops before the Euler step from it to 0.
_DERIVING = {"HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
             "DPMSolverSDEScheduler"}
# A1111 runs DPM2 and DPM2 a on a schedule one step longer with its next-to-last sigma dropped (samplers_k_diffusion's
# discard_next_to_last_sigma; QA 33 L4): on every sigma schedule here.
_DISCARDING = {"KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}
# The samplers A1111 1.10 gives discard_next_to_last_sigma: DPM++ 3M SDE too (QA 45f: it ran the whole schedule here).
_DISCARD_SAMPLERS = ("DPM2", "DPM2 a", "DPM++ 3M SDE")
# Samplers A1111 1.10 runs as its own timestep samplers (modules/sd_samplers_timesteps.py), which never read the
# schedule type: with one named, they run as with Automatic, and the request's warnings say so.
_TIMESTEP_SAMPLERS = ("DDIM", "PLMS", "UniPC")


def resolve(sampler_name: str | None, scheduler: str | None = None,
            a1111: bool = False) -> tuple[Sampler, Schedule]:
    """A1111's sampler (and schedule) names -> ours; the combined "DPM++ 2M Karras" form works too. ``a1111``: as
    a one-shot request runs them (make_scheduler's ``a1111``), where Euler a takes Karras and Exponential too."""
    name = (sampler_name or "Euler a").strip()
    schedule_name = (scheduler or "automatic").strip()
    sampler = _BY_NAME.get(name.lower())
    if sampler is None:
        for schedule in SCHEDULES[1:]:
            suffix = " " + schedule.label.lower()
            base = _BY_NAME.get(name[: -len(suffix)].lower()) if name.lower().endswith(suffix) else None
            if base is not None and base.scheduler in _SIGMA_SCHEDULERS:
                sampler, schedule_name = base, schedule.name
                break
    if sampler is None:
        raise SamplerError(f"unknown sampler {sampler_name!r} (known: {', '.join(names())})")
    schedule = _SCHEDULE_BY_NAME.get(schedule_name.lower())
    if schedule is None:
        raise SamplerError(f"unknown scheduler {scheduler!r} (known: {', '.join(s.label for s in SCHEDULES)})",
                           code="unknown_scheduler")
    if a1111 and ignored_schedule(sampler, schedule):
        return sampler, schedule
    computed = a1111 and sampler.scheduler in _A1111_SIGMAS and schedule.name in _A1111_SCHEDULES
    if schedule.a1111_only:
        computed = a1111 and (sampler.scheduler in A1111_ONLY_SCHEDULERS or sampler.scheduler in _DERIVING)
        if not a1111:
            raise SamplerError(f"scheduler {scheduler or schedule.label!r} runs in one-shot (A1111 API) requests "
                               f"only, not in the live stream", code="unknown_scheduler")
    if (schedule.sigmas and (sampler.scheduler not in _SIGMA_SCHEDULERS or schedule.a1111_only) and not computed) or (
            "timestep_spacing" in schedule.options and not sampler.spaced):
        raise SamplerError(f"sampler {sampler.name!r} does not take the {schedule.label} schedule",
                           code="unknown_scheduler")
    return sampler, schedule


def ignored_schedule(sampler: Sampler, schedule: Schedule) -> bool:
    """Whether a one-shot request runs ``sampler`` with its own schedule in place of ``schedule`` (then warned):
    A1111's timestep samplers (DDIM, PLMS, UniPC) read no schedule type (QA 38f: UniPC applied the sigma ones),
    and LCM and TCD run their own (LCM A1111's Automatic, TCD diffusers' skipping one), where A1111's sample_lcm
    would take the sigmas (QA 37 M1: these pairs answered 422; A1111 1.10 runs them)."""
    if schedule.name == "automatic":
        return False
    if sampler.name in _TIMESTEP_SAMPLERS:  # every type: spaced ones changed UniPC's timesteps (QA 60 F4)
        return True
    if schedule.name in ("uniform", "normal"):
        return False
    return not sampler.spaced


def schedule_warning(sampler_name: str | None, scheduler: str | None) -> str | None:
    """The request's warning for a schedule its sampler does not run (:func:`ignored_schedule`), else None."""
    sampler, schedule = resolve(sampler_name, scheduler, a1111=True)
    if not ignored_schedule(sampler, schedule):
        return None
    if sampler.spaced:
        return (f"schedule type {schedule.label!r} ignored: {sampler.name} runs its own timesteps, as A1111's "
                f"{sampler.name} does (it reads no schedule type)")
    if sampler.name == "LCM":
        return (f"schedule type {schedule.label!r} ignored: LCM runs diffusers' LCMScheduler on A1111's Automatic LCM "
                f"schedule (A1111's k-diffusion LCM would take the {schedule.label} sigmas)")
    return (f"schedule type {schedule.label!r} ignored: {sampler.name} runs diffusers' {sampler.scheduler} with its "
            f"own skipping schedule (A1111's k-diffusion {sampler.name} would take the {schedule.label} sigmas)")


def names() -> list[str]:
    """Every name a client may send, A1111's combined Karras forms included."""
    out = [s.name for s in SAMPLERS]
    out += [f"{s.name} Karras" for s in SAMPLERS if s.scheduler in _SIGMA_SCHEDULERS]
    return out


# The options A1111 1.10 passes each sampler (sd_samplers_kdiffusion.py ``sampler_extra_params``, and eta where the
# k-diffusion function takes one; its DDIM takes eta too), with A1111's defaults: a value other than these changes
# its image. diffusers' Euler takes the churn options, DDIM and TCD eta, DPM++ SDE s_noise; our Brownian noise for
# the 2M/3M SDE samplers takes s_noise. The rest would be dropped: generate.py says so in the request's warnings.
A1111_OPTION_DEFAULTS: dict[str, float] = {"eta": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
A1111_OPTIONS: dict[str, tuple[str, ...]] = {
    "Euler": _CHURN, "Heun": _CHURN, "DPM2": _CHURN, "Euler a": ("eta",), "DPM2 a": ("eta", "s_noise"),
    "DPM++ SDE": ("eta", "s_noise"), "DPM++ 2M SDE": ("eta", "s_noise"), "DPM++ 2M SDE Heun": ("eta", "s_noise"),
    "DPM++ 3M SDE": ("eta", "s_noise"), "DDIM": ("eta",), "TCD": ("eta",),
}


def a1111_schedule(sampler_name: str | None, scheduler: str | None = None) -> Schedule:
    """The schedule A1111 1.10 runs for these names: "Automatic" is the sampler's own default there (Karras for
    DPM++ 2M, Exponential for DPM++ 2M SDE, else Uniform); a named schedule is itself."""
    sampler, schedule = resolve(sampler_name, scheduler, a1111=True)
    if ignored_schedule(sampler, schedule):
        return SCHEDULES[0]
    if schedule.name == "automatic" and sampler.automatic is not None:
        return _SCHEDULE_BY_NAME[sampler.automatic]
    return schedule


def make_scheduler(base_config: Mapping[str, Any], sampler_name: str | None, scheduler: str | None = None,
                   *, a1111: bool = False, sdxl: bool = False) -> Any:
    """A fresh diffusers scheduler for these names, built on the model's own scheduler config.

    ``a1111``: A1111's schedules, for one-shot requests (the live stream keeps the model's own spacing, "trailing"
    in the shipped configs, right for turbo models). "Automatic" is the sampler's A1111 default, and a k-diffusion
    sampler's Uniform, Karras and Exponential schedules span the model's whole sigma table as A1111's get_sigmas
    does: timesteps from 999 down to 0 ("linspace" spacing; :func:`set_timesteps` mends what diffusers does
    otherwise), and Karras/Exponential between its first and last sigma. Use :func:`set_timesteps` on it.
    ``sdxl``: the model is SDXL (Align Your Steps takes its SDXL list).
    """
    import diffusers

    sampler, schedule = resolve(sampler_name, scheduler, a1111=a1111)
    if a1111:
        schedule = a1111_schedule(sampler_name, scheduler)
    cls = getattr(diffusers, sampler.scheduler)
    config = dict(base_config)
    # Options another solver left in the config must not leak into this one.
    for key in (*_SIGMA_FLAGS, "algorithm_type", "solver_order", "solver_type"):
        config.pop(key, None)
    # Overrides go in as keyword arguments: diffusers drops config keys it lists in
    # ``_use_default_values``, so a value merely put into the dict may be ignored.
    overrides = {**sampler.options, **schedule.options}
    # DDIM's class default clips x0 to [-1, 1], which is wrong for SD latents; diffusers' SD
    # pipelines force it off in the same way.
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        overrides["clip_sample"] = False
    # SGM Uniform, Simple and DDIM too: A1111 computes them as sigma lists (:data:`_SPACED`).
    kdiffusion = a1111 and sampler.automatic is not None
    if kdiffusion:
        overrides["timestep_spacing"] = "linspace"
    if sampler.scheduler not in _SIGMA_SCHEDULERS:  # Euler a: set_timesteps computes the schedule
        for key in _SIGMA_FLAGS:
            overrides.pop(key, None)
    elif kdiffusion and schedule.name == "beta" and sampler.scheduler in _A1111_SIGMAS:
        overrides.pop("use_beta_sigmas")  # DPM++ 2M: set_timesteps computes A1111's, with unrounded timesteps
    if sampler.scheduler == "DPMSolverSDEScheduler":
        _require_torchsde(sampler.name)
    if a1111 and sampler.name == "UniPC":
        overrides.update(a1111_timesteps.UNIPC_OPTIONS)
    if kdiffusion and sampler.name == "DPM++ 3M SDE":
        # k-diffusion's second step (one earlier output) adds phi_2 D1, diffusers' "heun" term; its "midpoint" adds
        # phi_1 / 2 D1 (QA 45f).
        overrides["solver_type"] = "heun"
    made = cls.from_config(config, **overrides)
    made.a1111_sigmas = kdiffusion  # read by set_timesteps
    made.a1111_discard = kdiffusion and sampler.name in _DISCARD_SAMPLERS
    if kdiffusion and sampler.name == "DPM++ 3M SDE":
        made.multistep_dpm_solver_third_order_update = _third_order_sde_update.__get__(made)
    made.a1111_schedule = schedule.name
    made.a1111_sdxl = sdxl
    if a1111 and sampler.name in a1111_timesteps.SAMPLERS:
        a1111_timesteps.install(made, sampler.name)
    if a1111 and sampler.name == "LCM":  # A1111's LCMCompVisDenoiser and sample_lcm (QA 60 F3)
        a1111_lcm.install(made)
    return made


def set_timesteps(scheduler: Any, steps: int, device: Any = None) -> None:
    """``scheduler.set_timesteps(steps)``; one made with ``a1111=True`` gets A1111's sigmas where diffusers'
    "linspace" differs from them."""
    if a1111_timesteps.installed(scheduler):
        a1111_timesteps.run(scheduler, steps, device=device)
        return
    if a1111_lcm.installed(scheduler):
        a1111_lcm.run(scheduler, steps, device=device)
        return
    if not getattr(scheduler, "a1111_sigmas", False):
        scheduler.set_timesteps(steps, device=device)
        return
    # diffusers' linspace puts a 1-step schedule's timestep at 0 (A1111's linspace(999, 0, 1): 999, trailing's).
    scheduler.register_to_config(timestep_spacing="trailing" if steps == 1 else "linspace")
    scheduler.set_timesteps(steps, device=device)
    schedule = getattr(scheduler, "a1111_schedule", None)
    name = type(scheduler).__name__
    own = schedule in _OWN or schedule in _SPACED
    sdxl = getattr(scheduler, "a1111_sdxl", False)
    # DPM++ SDE on every schedule: its Brownian tree spans the schedule's ends, which its own are diffusers' table's.
    kept_own = name in _DISCARDING or name == "DPMSolverSDEScheduler"
    if name in _DERIVING and (own or (kept_own and schedule in _A1111_SCHEDULES)):
        import torch

        discard = name in _DISCARDING
        sigmas, _ = a1111_sigmas(a1111_alphas_cumprod(scheduler), schedule, steps + discard, sdxl=sdxl)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        ends_above_0 = float(sigmas[-1]) > 0  # KL Optimal's sigma_min
        _derive_from(scheduler, sigmas if ends_above_0 else sigmas[:-1], device)
        if ends_above_0:  # its last (Euler) step, from sigma_min to the 0 diffusers adds, is not run
            scheduler.timesteps = scheduler.timesteps[:-1]
        return
    if (name in _A1111_SIGMAS and schedule in _A1111_SCHEDULES) or (own and name in A1111_ONLY_SCHEDULERS):
        import torch

        discard = getattr(scheduler, "a1111_discard", False)  # DPM++ 3M SDE
        sigmas, timesteps = a1111_sigmas(a1111_alphas_cumprod(scheduler), schedule, steps + discard, sdxl=sdxl)
        if discard:
            sigmas, timesteps = torch.cat([sigmas[:-2], sigmas[-1:]]), timesteps[:-1]
        scheduler.sigmas = sigmas
        scheduler.timesteps = timesteps.to(device)  # fractional, as A1111's UNet gets them
        if name == "DPMSolverMultistepScheduler":
            # k-diffusion's 3M SDE keeps third order up to its last step into 0; diffusers' drops to second order
            # a step earlier under 15 steps (2M is second order there either way).
            scheduler.register_to_config(lower_order_final=False)
        if name == "DPMSolverMultistepScheduler" and float(sigmas[-1]) > 0:
            # KL Optimal ends at sigma_min, not 0: k-diffusion's DPM++ 2M takes a full second-order last step there
            # (it steps down to first order only into sigma 0), where diffusers' would drop to first order.
            scheduler.register_to_config(lower_order_final=False, final_sigmas_type="sigma_min")


_OWN = tuple(schedule.name for schedule in SCHEDULES if schedule.a1111_only)
# The schedules the live stream runs as diffusers' timestep spacing, which a one-shot request's k-diffusion samplers
# take as A1111 computes them (QA 45f): SGM Uniform's timesteps 999 / n apart (trailing's are 1000 / n: 0.007 to 0.57
# from A1111's latents), DPM2's and 3M SDE's one step longer with the next-to-last dropped (trailing cannot), DDIM's
# every (1000 // n)th from 1 up to 999, which is more than n steps where n does not divide 1000 (31 at 30 steps), and
# each starting at noise * sigma_max (diffusers' leading spacing starts at sqrt(sigma_max^2 + 1): 0.13 apart).
_SPACED = ("sgm_uniform", "simple", "ddim")


def a1111_alphas_cumprod(scheduler: Any) -> Any:
    """The model's alphas_cumprod as A1111 holds it, which its sigma table and schedules come from: ldm's
    make_beta_schedule("linear") is diffusers' "scaled_linear" in float64, cumprod too, then stored as float32.
    diffusers computes it in float32: the table's ends come out 1e-7 apart, and the SDE samplers' Brownian trees,
    which span the schedule's ends, then draw other noise (a Brownian path moves by sqrt(dt): QA 45f, 2M SDE 0.008
    from A1111's latents, 3M SDE 0.02). A schedule of any other kind (trained betas) is the scheduler's own."""
    import torch

    config = scheduler.config
    if config.get("beta_schedule") != "scaled_linear" or config.get("trained_betas") is not None:
        return scheduler.alphas_cumprod
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _third_order_sde_update(self: Any, model_output_list: list[Any], *args: Any, sample: Any = None,
                            noise: Any = None, **kwargs: Any) -> Any:
    """DPM++ 3M SDE's third-order step as k-diffusion's sample_dpmpp_3m_sde takes it (eta 1, so h_eta = 2h), in
    diffusers' terms: x_t = (sigma_t / sigma_s0) e^-h x + alpha_t (phi_1 D0 + phi_2 D1 - phi_3 D2) + the noise,
    phi_1 = 1 - e^-2h, phi_2 = 1 - phi_1 / 2h, phi_3 = phi_2 / 2h - 1/2. diffusers 0.42's sde-dpmsolver++ update
    adds alpha_t (-phi_3 - 1) D2: a whole D2 more, which does not vanish as h -> 0 (QA 45f: 15 to 47 apart from
    A1111's latents at 20 steps)."""
    import torch

    i = self.step_index
    sigma_t, sigma_s0, sigma_s1, sigma_s2 = (self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1],
                                             self.sigmas[i - 2])
    lambdas = []
    for sigma in (sigma_t, sigma_s0, sigma_s1, sigma_s2):
        alpha, vp_sigma = self._sigma_to_alpha_sigma_t(sigma)
        lambdas.append(torch.log(alpha) - torch.log(vp_sigma))
    alpha_t, vp_sigma_t = self._sigma_to_alpha_sigma_t(sigma_t)
    _, vp_sigma_s0 = self._sigma_to_alpha_sigma_t(sigma_s0)
    h, h_0, h_1 = lambdas[0] - lambdas[1], lambdas[1] - lambdas[2], lambdas[2] - lambdas[3]
    r0, r1 = h_0 / h, h_1 / h
    m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_1 = -torch.expm1(-2.0 * h)
    phi_2 = 1.0 - phi_1 / (2.0 * h)
    phi_3 = phi_2 / (2.0 * h) - 0.5
    return ((vp_sigma_t / vp_sigma_s0 * torch.exp(-h)) * sample + alpha_t * (phi_1 * m0 + phi_2 * d1 - phi_3 * d2)
            + vp_sigma_t * torch.sqrt(phi_1) * noise)


def _derive_from(scheduler: Any, sigmas: Any, device: Any) -> None:
    """diffusers' own ``set_timesteps`` for a scheduler that derives midpoints (Heun, DPM2, DPM2 a, DPM++ SDE), on
    ``sigmas`` (A1111's, without the final 0): given through the hook its Exponential schedule calls, so that each
    derives its interleaved sigmas and sigma_to_t's fractional timesteps from them as from its own."""
    kept = {key: scheduler.config.get(key, False) for key in _SIGMA_FLAGS}
    scheduler.register_to_config(use_karras_sigmas=False, use_exponential_sigmas=True, use_beta_sigmas=False)
    scheduler._convert_to_exponential = lambda in_sigmas, num_inference_steps: sigmas.double().numpy()
    try:
        scheduler.set_timesteps(len(sigmas), device=device)
    finally:
        del scheduler._convert_to_exponential
        scheduler.register_to_config(**kept)
    # A diffusers that no longer calls the hook would run its own schedule unsaid: refused instead (an assert would
    # be a 500, and nothing under python -O). Every sigma given must be among those it steps through (its midpoints
    # interleaved): the first alone is sigma_max on every schedule, and says nothing.
    import torch

    got, given = scheduler.sigmas.float().cpu(), sigmas.float().cpu()
    if not torch.isclose(got[:, None], given[None, :], rtol=1e-4, atol=0.0).any(dim=0).all():
        import diffusers

        raise SamplerError(f"diffusers {diffusers.__version__} no longer takes A1111's schedule into "
                           f"{type(scheduler).__name__} (its Exponential hook moved): pick another sampler or "
                           f"schedule", code="unknown_scheduler")


def most_steps(scheduler: Any) -> int | None:
    """The most steps ``scheduler`` runs: LCM's and TCD's original schedule, DDIM's and the others' the model's
    timesteps; None for an A1111 sigma schedule, which takes any number, as A1111's does."""
    if getattr(scheduler, "a1111_sigmas", False):
        return None
    original = scheduler.config.get("original_inference_steps")
    return int(original) if original else int(scheduler.config.num_train_timesteps)


def initial_noise_scale(scheduler: Any) -> float:
    """What txt2img's starting noise is multiplied by: the scheduler's ``init_noise_sigma``, except that a
    DPMSolverMultistep scheduler made with ``a1111=True`` starts where A1111 does. k-diffusion starts at
    noise * sigma_0; diffusers' DPM-Solver works on x / sqrt(1 + sigma^2) and starts at noise, as if from
    noise * sqrt(1 + sigma_0^2) (QA 33 L3: 0.09 apart on DPM++ 2M). A1111's LCM: noise * sigma_0 in VP space."""
    if a1111_lcm.installed(scheduler):
        return a1111_lcm.initial_noise_scale(scheduler)
    if getattr(scheduler, "a1111_sigmas", False) and type(scheduler).__name__ == "DPMSolverMultistepScheduler":
        sigma = float(scheduler.sigmas[0])
        return sigma / math.sqrt(1 + sigma * sigma)
    return float(scheduler.init_noise_sigma)


def final_latent_scale(scheduler: Any) -> float:
    """What a finished pass's latents are multiplied by to be A1111's: diffusers' DPM-Solver works on
    x / sqrt(1 + sigma^2), which is x itself only at a last sigma of 0; KL Optimal ends at sigma_min (QA 38: DPM++ 2M
    0.0245 from A1111 without this, 1e-4 with it)."""
    if getattr(scheduler, "a1111_sigmas", False) and type(scheduler).__name__ == "DPMSolverMultistepScheduler":
        last = float(scheduler.sigmas[-1])
        return math.sqrt(1 + last * last)
    return 1.0


# Align Your Steps' sigmas for 10 steps (A1111 1.10 modules/sd_schedulers.py get_align_your_steps_sigmas, from
# https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), SD 1.5's for any model not SDXL.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
# A1111's Beta schedule's alpha and beta (its options beta_dist_alpha and beta_dist_beta, at their defaults).
BETA_ALPHA = BETA_BETA = 0.6


def a1111_sigmas(alphas_cumprod: Any, schedule: str, steps: int, sdxl: bool = False) -> tuple[Any, Any]:
    """A1111's ``steps``-step schedule (its sigmas, then 0, or KL Optimal's sigma_min) and the UNet's timestep for
    each step: k-diffusion's DiscreteSchedule over the model's sigma table, as KDiffusionSampler.get_sigmas uses it.
    Uniform (and Normal): t = linspace(999, 0, n), log-sigma interpolated; SGM Uniform: linspace(999, 0, n + 1)
    less its last; Simple: the table's sigma at t = 999 - int(i * 1000 / n); DDIM: at t = 1, 1 + 1000 // n, ... up to
    999, highest first (modules/sd_schedulers.py's sgm_uniform, simple_scheduler, ddim_scheduler); the others
    between the table's first and last sigma as A1111 1.10 computes them (k-diffusion's
    get_sigmas_karras/_exponential/_polyexponential, and sd_schedulers.py's beta_scheduler, kl_optimal,
    get_align_your_steps_sigmas), each sigma's t interpolated back (sigma_to_t, unquantized)."""
    import numpy as np
    import torch

    table = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float().cpu()
    log_table = table.log()
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    last = torch.zeros(1)
    if schedule in ("uniform", "normal", "sgm_uniform", "simple", "ddim"):
        if schedule == "sgm_uniform":
            t = torch.linspace(len(table) - 1, 0, steps + 1)[:-1]
        elif schedule == "simple":
            t = torch.tensor([len(table) - 1 - int(i * (len(table) / steps)) for i in range(steps)]).float()
        elif schedule == "ddim":
            t = torch.arange(1, len(table), max(len(table) // steps, 1)).flip(0).float()
        else:
            t = torch.linspace(len(table) - 1, 0, steps)
        low, high, weight = t.floor().long(), t.ceil().long(), t.frac()
        if schedule in ("simple", "ddim"):  # the table's own sigmas, not exp(log) of them (a float32 step apart)
            sigmas = table[low]
        else:
            sigmas = ((1 - weight) * log_table[low] + weight * log_table[high]).exp()
        return torch.cat([sigmas, last]).float(), t.float()
    if schedule == "karras":
        ramp, rho = torch.linspace(0, 1, steps), 7.0
        sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    elif schedule == "exponential":
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp()
    elif schedule == "polyexponential":  # rho 1, its default_rho
        ramp = torch.linspace(1, 0, steps) ** 1.0
        sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    elif schedule == "kl_optimal":  # n + 1 sigmas, from sigma_max down to sigma_min itself: no 0 after it
        alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
        index = torch.arange(steps + 1)
        sigmas = torch.tan(index / steps * alpha_min + (1.0 - index / steps) * alpha_max)
        sigmas, last = sigmas[:-1], sigmas[-1:]
    elif schedule == "align_your_steps":
        fixed = np.array(AYS_SDXL if sdxl else AYS_SD15)
        if steps != len(fixed):  # A1111's loglinear_interp, in float64 as numpy runs it
            ys = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(fixed)), np.log(fixed[::-1]))
            fixed = np.exp(ys)[::-1].copy()
        sigmas = torch.tensor(fixed, dtype=torch.float32)
    elif schedule == "beta":
        from scipy import stats

        ppf = [stats.beta.ppf(x, BETA_ALPHA, BETA_BETA) for x in 1 - np.linspace(0, 1, steps)]
        sigmas = torch.tensor([sigma_min + x * (sigma_max - sigma_min) for x in ppf], dtype=torch.float32)
    else:
        raise SamplerError(f"no A1111 sigma schedule {schedule!r}", code="unknown_scheduler")
    sigmas = sigmas.float()
    dists = sigmas.log() - log_table[:, None]                                        # [1000, n]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(table) - 2)
    weight = ((log_table[low] - sigmas.log()) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    t = (1 - weight) * low + weight * (low + 1)
    return torch.cat([sigmas, last.float()]).float(), t.float()


def _require_torchsde(name: str) -> None:
    try:
        import torchsde  # noqa: F401
    except ImportError as exc:
        raise SamplerError(f"sampler {name!r} needs the torchsde package: pip install torchsde") from exc


def _takes(sampler: Sampler, schedule: Schedule) -> bool:
    try:
        resolve(sampler.name, schedule.name, a1111=True)
    except SamplerError:
        return False
    return not ignored_schedule(sampler, schedule)  # run, but as Automatic: not listed as taken


def a1111_samplers() -> list[dict[str, Any]]:
    """``/sdapi/v1/samplers``: name, aliases, options, as A1111 lists them."""
    out = []
    for sampler in SAMPLERS:
        # The schedule types it takes by name (A1111 lists "True"; Euler a then read as taking Karras, which it
        # refuses: QA 6).
        takes = [schedule.name for schedule in SCHEDULES[1:] if _takes(sampler, schedule)]
        options: dict[str, str] = {"scheduler": ", ".join(takes)} if takes else {}
        if sampler.stochastic and "SDE" in sampler.name:
            options["brownian_noise"] = "True"
        elif sampler.stochastic and "eta" in A1111_OPTIONS.get(sampler.name, ()):  # LCM draws noise, takes no eta
            options["eta"] = "True"
        out.append({"name": sampler.name, "aliases": list(sampler.aliases), "options": options})
    return out


def a1111_schedulers() -> list[dict[str, Any]]:
    """``/sdapi/v1/schedulers``."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
             "default_rho": s.default_rho, "need_inner_model": False} for s in SCHEDULES]

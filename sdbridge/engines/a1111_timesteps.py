"""AUTOMATIC1111's DDIM, PLMS and UniPC, which it runs as its own timestep samplers (modules/sd_samplers_timesteps.py
and sd_samplers_timesteps_impl.py in A1111 1.10), on diffusers' DDIM, PNDM and UniPC schedulers.

A1111 does not take the model's timestep spacing for these: its grid is every ``1000 // n``-th timestep from 1,
``t_j = min(1 + j * (1000 // n), 999)``, and a run steps from each grid point to the one below, so its last step
ends at ``t_0 = 1``, not at the clean latent, after one step fewer than the grid has points (19 UNet calls for DDIM at
20 steps; 30 at 30, whose grid has 31 points, from t = 991). diffusers' leading spacing (SD 1.5's config) starts at
958 at 30 steps and takes a last step from t = 1 to alphas_cumprod[0]; its trailing spacing (sd-turbo's) starts at 999.
img2img noises the latent at the grid's ``t_enc``-th point and runs from the point below it.

The step itself is DDIM's (with A1111's eta term) or PLMS's pseudo improved Euler first step, then Adams-Bashforth of
orders 2 to 4 on the noise predictions, each prediction taken as noise first (a v-prediction converted at its own
timestep, as A1111's CompVisTimestepsVDenoiser does; diffusers' PNDM converts the combined one). The schedulers keep
their classes, so everything that names them still does; only ``step`` and the timesteps are A1111's.

UniPC (modules/models/diffusion/uni_pc/uni_pc.py) takes of the grid only its length, or for img2img its point
``t_enc - 1``: it steps on model times evenly spaced in continuous time, from 999 (img2img: that grid point) down to
0, fractional between (949.05 ... at 20 steps), on the model's alphas interpolated as its NoiseScheduleVP does, and
ends on the latent at model time 0, not the clean one, as DDIM ends at t = 1. Its solver is diffusers' UniPC with
A1111's default settings (:data:`UNIPC_OPTIONS`); only its timesteps, sigmas and ``add_noise`` are A1111's.
"""

from __future__ import annotations

import math
from typing import Any

SAMPLERS = ("DDIM", "PLMS", "UniPC")
# A1111 1.10's UniPC settings (modules/shared_options.py: uni_pc_variant "bh1", uni_pc_order 3,
# uni_pc_lower_order_final, its time_uniform skip type), in diffusers' names; sigma_min: it ends at model time 0.
UNIPC_OPTIONS = {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True, "final_sigmas_type": "sigma_min"}


def grid(steps: int) -> list[int]:
    """A1111's CompVisSampler.get_timesteps for ``steps``: every ``1000 // steps``-th timestep from 1, up to 999.

    Past 500 steps (a hires pass at a low strength asks for up to 1000) its grid of every timestep ends 999, 999 (1000
    clipped), whose first step, from 999 to 999, is left out here; beyond 1000 steps, where A1111's spacing is 0 (a
    ValueError), the grid is every timestep."""
    points = [min(t + 1, 999) for t in range(0, 1000, max(1000 // steps, 1))]
    return points[:-1] if len(points) > 1 and points[-1] == points[-2] else points


def install(scheduler: Any, sampler: str) -> None:
    """Make ``scheduler`` (diffusers' DDIM or PNDM) step as A1111's ``sampler``; :func:`run` sets its timesteps."""
    scheduler.a1111_timesteps = sampler
    if sampler == "UniPC":  # diffusers' step, on A1111's times; a noise point off them (img2img's) needs its own
        scheduler.add_noise = _add_noise.__get__(scheduler)
        return
    scheduler.step = (_ddim_step if sampler == "DDIM" else _plms_step).__get__(scheduler)


def installed(scheduler: Any) -> bool:
    return bool(getattr(scheduler, "a1111_timesteps", None))


def run(scheduler: Any, steps: int, top: int | None = None, device: Any = None) -> Any:
    """Set ``scheduler``'s timesteps to A1111's run on the grid of ``steps``: from grid point ``top - 1`` (the last
    point when None, as txt2img) down to point 1, each step ending at the point below. Returns the timesteps, and
    keeps in ``a1111_noise_at`` the grid point img2img noises its latent at (point ``top``)."""
    import torch

    from sdbridge.engines.samplers import a1111_alphas_cumprod

    scheduler.set_timesteps(steps, device=device)  # diffusers' own state: its counters, num_inference_steps
    points = grid(steps)
    if scheduler.a1111_timesteps == "UniPC":
        return _unipc_run(scheduler, points, top, device)
    top = len(points) if top is None else min(top, len(points))
    calls = points[top - 1:0:-1] if top > 1 else []
    scheduler.a1111_below = dict(zip(points[1:], points[:-1]))
    scheduler.a1111_noise_at = points[min(top, len(points) - 1)]
    scheduler.a1111_alphas = a1111_alphas_cumprod(scheduler).double().tolist()
    if scheduler.a1111_timesteps == "PLMS" and calls:
        # The first step calls the model twice: at its start, then at the point below on its Euler guess.
        scheduler.a1111_first = calls[0]
        calls = calls[:1] + [scheduler.a1111_below[calls[0]]] + calls[1:]
    scheduler.timesteps = torch.tensor(calls, dtype=torch.long, device=device)
    return scheduler.timesteps


def _unipc_run(scheduler: Any, points: list[int], top: int | None, device: Any) -> Any:
    """sd_samplers_timesteps_impl.unipc and UniPC.sample (time_uniform): ``len(points)`` steps from continuous time 1
    (model time 999), or for img2img ``top`` (t_enc) steps from grid point ``top - 1``, to time 1/1000 (model time
    0); the model is called at ``(t - 1/1000) * 1000``, sigmas from the alphas interpolated there."""
    import torch

    from sdbridge.engines.samplers import a1111_alphas_cumprod

    txt2img = top is None
    count = len(points) if txt2img else min(top, len(points))
    scheduler.set_timesteps(max(count, 1), device=device)  # diffusers' own state: its history, counters
    scheduler.a1111_alphas = a1111_alphas_cumprod(scheduler).double().tolist()
    scheduler.a1111_noise_at = points[-1] if txt2img else points[min(top, len(points) - 1)]
    start = 1.0 if txt2img else points[count - 1] / 1000 + 1 / 1000  # A1111: "likely off by a bit"
    times = torch.linspace(start, 1 / 1000, count + 1, dtype=torch.float64) if count > 0 else torch.zeros(1)
    model_times = ((times - 1 / 1000) * 1000).clamp(min=0).tolist()
    alphas = [_alpha_at(scheduler.a1111_alphas, t) for t in model_times]
    scheduler.sigmas = torch.tensor([math.sqrt((1 - a) / a) for a in alphas], dtype=torch.float32)
    scheduler.timesteps = torch.tensor(model_times[:-1], dtype=torch.float32, device=device)
    scheduler.num_inference_steps = count
    return scheduler.timesteps


def _alpha_at(alphas: list[float], t: float) -> float:
    """alphas_cumprod at model time ``t``, between two timesteps as NoiseScheduleVP("discrete") takes it: its log
    square root interpolated linearly."""
    low = min(int(t), len(alphas) - 1)
    high, fraction = min(low + 1, len(alphas) - 1), t - low
    if fraction <= 0:
        return alphas[low]
    return math.exp((1 - fraction) * math.log(alphas[low]) + fraction * math.log(alphas[high]))


def _add_noise(self: Any, original: Any, noise: Any, timesteps: Any) -> Any:
    """``original`` noised to each of ``timesteps`` (model times, fractional too) on A1111's alphas: UniPC's img2img
    noises at a grid point none of its steps is at, and inpainting to its fractional times."""
    import torch

    alphas = torch.tensor([_alpha_at(self.a1111_alphas, float(t)) for t in timesteps.flatten()],
                          dtype=torch.float64).to(original.device)
    view = (-1,) + (1,) * (original.dim() - 1)
    alpha = alphas.view(view)
    return (alpha.sqrt() * original.double() + (1 - alpha).sqrt() * noise.double()).to(original.dtype)


def _eps(scheduler: Any, model_output: Any, sample: Any, alpha: float) -> Any:
    """The model's output as noise: a v-prediction converted at its own timestep, as A1111 converts each call's."""
    if scheduler.config.prediction_type == "v_prediction":
        return math.sqrt(alpha) * model_output + math.sqrt(1 - alpha) * sample
    return model_output


def _update(sample: Any, eps: Any, alpha: float, alpha_below: float, sigma: float = 0.0) -> tuple[Any, Any]:
    """DDIM's step from ``alpha`` to ``alpha_below`` (alphas_cumprod) without its noise: (x below, predicted x0)."""
    x0 = (sample - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
    return math.sqrt(alpha_below) * x0 + math.sqrt(1 - alpha_below - sigma ** 2) * eps, x0


def _ddim_step(self: Any, model_output: Any, timestep: Any, sample: Any, eta: float = 0.0, generator: Any = None,
               variance_noise: Any = None, return_dict: bool = True, **_: Any) -> Any:
    """sd_samplers_timesteps_impl.ddim's step from ``timestep`` to the grid point below it."""
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    t = int(timestep)
    alpha, below = self.a1111_alphas[t], self.a1111_alphas[self.a1111_below[t]]
    sigma = eta * math.sqrt((1 - below) / (1 - alpha) * (1 - alpha / below))
    prev, x0 = _update(sample, _eps(self, model_output, sample, alpha), alpha, below, sigma)
    if sigma > 0:
        if variance_noise is None:
            variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device,
                                          dtype=sample.dtype)
        prev = prev + sigma * variance_noise
    return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev,)


# Adams-Bashforth on the last noise predictions, oldest first: PLMS's orders 1 to 4.
_ADAMS_BASHFORTH = {1: (1.0,), 2: (-1 / 2, 3 / 2), 3: (5 / 12, -16 / 12, 23 / 12),
                    4: (-9 / 24, 37 / 24, -59 / 24, 55 / 24)}


def _plms_step(self: Any, model_output: Any, timestep: Any, sample: Any, return_dict: bool = True,
               **_: Any) -> Any:
    """sd_samplers_timesteps_impl.plms, one model call at a time: call 0 takes an Euler guess to the point below, call
    1 (the model there, on the guess) redoes that first step on the mean of both; then Adams-Bashforth."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    t = int(timestep)
    eps = _eps(self, model_output, sample, self.a1111_alphas[t])
    if self.counter == 1:
        eps, start = (eps + self.ets[-1]) / 2, self.a1111_first
        sample, self.cur_sample = self.cur_sample, None
    else:
        if self.counter == 0:
            self.cur_sample = sample
        self.ets = [*self.ets[-3:], eps]
        eps = sum(weight * old for weight, old in zip(_ADAMS_BASHFORTH[len(self.ets)], self.ets))
        start = t
    prev, _ = _update(sample, eps, self.a1111_alphas[start], self.a1111_alphas[self.a1111_below[start]])
    self.counter += 1
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

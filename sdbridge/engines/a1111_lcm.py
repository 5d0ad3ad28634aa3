"""AUTOMATIC1111's LCM sampler (modules/sd_samplers_lcm.py in A1111 1.10) on diffusers' LCMScheduler, for one-shot
requests (``samplers.make_scheduler(..., a1111=True)``); the live stream keeps diffusers' own LCM.

A1111 runs LCM through k-diffusion on its ``LCMCompVisDenoiser``: a sigma table of the 50 LCM timesteps
(``20 j + 19``), its Automatic schedule ``get_sigmas(n)`` t = linspace(999, 19, n) with each sigma log-interpolated
between the table's (``t_to_sigma``), then 0. The UNet is called at ``sigma_to_t(sigma)``, the nearest of the 50 in
log sigma (4 steps: 999, 679, 339, 19, where diffusers' LCM runs 999, 759, 499, 259), on the latent scaled by
c_in = 1 / sqrt(sigma^2 + 1) at the interpolated sigma; x0 is taken at that sigma, then the boundary condition at the
UNet's timestep: c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25), on k-diffusion's unscaled
latent. sample_lcm: x = denoised, plus sigma_next * noise while sigma_next > 0.

sdbridge's latents stay in diffusers' VP space, x_vp = x_k / sqrt(sigma^2 + 1): the UNet's input as it is (A1111's
x_k * c_in), txt2img starts at noise * sigma_0 / sqrt(sigma_0^2 + 1) (``samplers.initial_noise_scale``), and img2img
noises at its first step's interpolated sigma (:func:`_add_noise`). Where diffusers' LCM draws its noise, this
step draws it, from the same generators, so a seed gives what it gave. A v-prediction is taken as noise at the
step's own sigma (A1111's LCM denoiser would read a v-prediction as noise). At most 50 steps, as diffusers' LCM: past
50 A1111 calls some LCM timesteps twice.
"""

from __future__ import annotations

import math
from typing import Any

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
ORIGINAL_STEPS = 50  # LCMCompVisDenoiser's original_timesteps


def install(scheduler: Any) -> None:
    """Make ``scheduler`` (diffusers' LCMScheduler) step as A1111's LCM; :func:`run` sets its timesteps."""
    scheduler.a1111_lcm = True
    scheduler.step = _step.__get__(scheduler)
    scheduler.add_noise = _add_noise.__get__(scheduler)


def installed(scheduler: Any) -> bool:
    return bool(getattr(scheduler, "a1111_lcm", False))


def table(alphas_cumprod: Any) -> tuple[Any, int]:
    """LCMCompVisDenoiser's sigma table (float32, as its buffers) over the model's alphas_cumprod at timesteps
    ``skip * j + skip - 1``, and ``skip`` (20)."""
    import torch

    total = len(alphas_cumprod)
    skip = total // ORIGINAL_STEPS
    alphas = torch.stack([alphas_cumprod[total - 1 - x * skip] for x in range(ORIGINAL_STEPS)]).flip(0).float()
    return ((1 - alphas) / alphas) ** 0.5, skip


def sigma_to_t(log_sigmas: Any, skip: int, sigmas: Any) -> Any:
    """The LCM timestep nearest each of ``sigmas`` in log sigma, in float32 as A1111's buffers (a sigma midway in
    log between two, as linspace(999, 19, 3)'s 509, goes where float32 rounding puts it, as there)."""
    dists = sigmas.float().log() - log_sigmas[:, None]
    return dists.abs().argmin(dim=0).view(sigmas.shape) * skip + (skip - 1)


def get_sigmas(sigmas: Any, skip: int, n: int) -> Any:
    """LCMCompVisDenoiser.get_sigmas(n): t = linspace(999, 19, n), each t's sigma log-interpolated, then 0."""
    import torch

    log_sigmas = sigmas.log()
    start, end = sigma_to_t(log_sigmas, skip, sigmas[-1:]), sigma_to_t(log_sigmas, skip, sigmas[:1])
    t = torch.linspace(int(start), int(end), n)
    t = torch.clamp((t - (skip - 1)) / skip, min=0, max=len(sigmas) - 1).float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[high]
    return torch.cat([log_sigma.exp(), log_sigma.new_zeros([1])])


def run(scheduler: Any, steps: int, device: Any = None) -> Any:
    """Set ``scheduler``'s timesteps to A1111's ``steps``-step LCM run: the UNet's timestep at each sigma of
    :func:`get_sigmas`. The sigmas, 0 last, are kept in ``a1111_lcm_sigmas``. Returns the timesteps."""
    from sdbridge.engines.samplers import a1111_alphas_cumprod

    scheduler.set_timesteps(min(steps, ORIGINAL_STEPS), device=device)  # diffusers' own state: its counters
    sigmas, skip = table(a1111_alphas_cumprod(scheduler))
    log_sigmas = sigmas.log()
    run_sigmas = get_sigmas(sigmas, skip, steps)
    scheduler.a1111_lcm_sigmas = run_sigmas.double().tolist()
    scheduler.timesteps = sigma_to_t(log_sigmas, skip, run_sigmas[:-1]).to(device)
    scheduler.num_inference_steps = steps
    scheduler._step_index = None
    scheduler._begin_index = None
    return scheduler.timesteps


def initial_noise_scale(scheduler: Any) -> float:
    """k-diffusion's start, noise * sigma_0, in VP space."""
    sigma = scheduler.a1111_lcm_sigmas[0]
    return sigma / math.sqrt(sigma * sigma + 1)


def _sigma_index(scheduler: Any, timestep: int) -> int | None:
    """The run's step at ``timestep``: the next to run where it is that one (img2img's start, inpainting's next
    step), else its first."""
    index = scheduler._step_index if scheduler._step_index is not None else (scheduler._begin_index or 0)
    timesteps = [int(t) for t in scheduler.timesteps]
    if index < len(timesteps) and timesteps[index] == timestep:
        return index
    return timesteps.index(timestep) if timestep in timesteps else None


def _add_noise(self: Any, original: Any, noise: Any, timesteps: Any) -> Any:
    """``original`` noised to the interpolated sigma of the step at each of ``timesteps`` (k-diffusion's
    x + noise * sigma, in VP space); a timestep not in the run at its own alphas_cumprod."""
    import torch

    from sdbridge.engines.samplers import a1111_alphas_cumprod

    sigmas = []
    for t in timesteps.flatten().tolist():
        index = _sigma_index(self, int(t))
        if index is None:
            alpha = float(a1111_alphas_cumprod(self)[int(t)])
            sigmas.append(math.sqrt((1 - alpha) / alpha))
        else:
            sigmas.append(self.a1111_lcm_sigmas[index])
    sigma = torch.tensor(sigmas, dtype=torch.float64, device=original.device).view((-1,) + (1,) * (original.dim() - 1))
    return ((original.double() + sigma * noise.double()) / (sigma * sigma + 1).sqrt()).to(original.dtype)


def _step(self: Any, model_output: Any, timestep: Any, sample: Any, generator: Any = None,
          variance_noise: Any = None, return_dict: bool = True, **_: Any) -> Any:
    """One step of sample_lcm on LCMCompVisDenoiser, in VP space."""
    from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    if self._step_index is None:
        self._step_index = self._begin_index or 0
    index = self._step_index
    sigma, sigma_next = self.a1111_lcm_sigmas[index], self.a1111_lcm_sigmas[index + 1]
    scale = math.sqrt(sigma * sigma + 1)
    x = sample.float() * scale  # k-diffusion's latent
    eps = model_output.float()
    if self.config.prediction_type == "v_prediction":
        eps = (eps + sigma * sample.float()) / scale  # sqrt(alpha) v + sqrt(1 - alpha) x_vp
    scaled = int(self.timesteps[index]) * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / math.sqrt(scaled ** 2 + SIGMA_DATA ** 2)
    denoised = c_out * (x - sigma * eps) + c_skip * x
    prev = denoised
    if sigma_next > 0:
        if variance_noise is None:  # as diffusers' LCM draws it: the same stream
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=sample.dtype)
        prev = (denoised + sigma_next * variance_noise.float()) / math.sqrt(sigma_next * sigma_next + 1)
    self._step_index = index + 1
    prev, denoised = prev.to(sample.dtype), denoised.to(sample.dtype)
    return LCMSchedulerOutput(prev_sample=prev, denoised=denoised) if return_dict else (prev, denoised)

"""A1111's DDIM, PLMS and UniPC (its timestep samplers), held to A1111 1.10's sd_samplers_timesteps_impl.py,
sd_samplers_timesteps.py and uni_pc.py written out (A1111 stays out of our dependencies), on a stand-in UNet."""

from __future__ import annotations

import math

import pytest
import torch

from sdbridge.engines import a1111_timesteps, samplers
from tests.unit.engines.test_samplers import BASE
from tests.unit.engines.test_samplers_a1111_oracle_gaps import eps_model

# SD 1.5's own scheduler config (leading spacing, offset 1): diffusers' DDIM on it starts at 958 at 30 steps, A1111's
# at 991. BASE is sd-turbo's (trailing: 999).
SD15 = {**BASE, "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True}
V_PREDICTION = {**SD15, "prediction_type": "v_prediction"}


def table(config) -> torch.Tensor:
    """The model's alphas_cumprod as A1111 holds it (ldm's betas in float64, stored as float32)."""
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def get_timesteps(steps: int) -> torch.Tensor:
    """CompVisSampler.get_timesteps, discard_next_to_last_sigma off."""
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def model(config, x: torch.Tensor, t: int) -> torch.Tensor:
    """The stand-in UNet as A1111's denoiser wraps it: noise out, a v-prediction converted at (x, t)."""
    out = eps_model(x.float()).double()
    if config["prediction_type"] == "v_prediction":
        alpha = float(table(config)[t])
        return math.sqrt(alpha) * out + math.sqrt(1 - alpha) * x
    return out


def ddim(config, x, timesteps, eta=0.0, noises=()):
    """sd_samplers_timesteps_impl.ddim, ``noises[i]`` its randn_like at step i."""
    alphas_cumprod = table(config)
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(config, x, timesteps[index].item())
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        sigma_t, sqrt_one_minus_at = sigmas[index].item(), sqrt_one_minus_alphas[index].item()
        pred_x0 = (x - sqrt_one_minus_at * e_t) / math.sqrt(a_t)
        dir_xt = math.sqrt(1. - a_prev - sigma_t ** 2) * e_t
        x = math.sqrt(a_prev) * pred_x0 + dir_xt + (sigma_t * noises[i] if sigma_t else 0)
    return x


def plms(config, x, timesteps):
    """sd_samplers_timesteps_impl.plms."""
    alphas_cumprod = table(config)
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    old_eps = []

    def get_x_prev_and_pred_x0(x, e_t, index):
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * e_t) / math.sqrt(a_t)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1. - a_prev) * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t_next = timesteps[max(index - 1, 0)].item()
        e_t = model(config, x, timesteps[index].item())
        if len(old_eps) == 0:
            e_t_next = model(config, get_x_prev_and_pred_x0(x, e_t, index), t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = get_x_prev_and_pred_x0(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


def ours(scheduler, x: torch.Tensor, timesteps: torch.Tensor, **step) -> torch.Tensor:
    """generate.py's loop: the scheduler's step on the stand-in UNet's output at each of its timesteps."""
    noises = step.pop("noises", None)
    for index, t in enumerate(timesteps):
        extra = {"variance_noise": noises[index].float()} if noises is not None else {}
        x = scheduler.step(eps_model(scheduler.scale_model_input(x, t)), t, x, return_dict=False, **step,
                           **extra)[0]
    return x


def noise_for(steps: int) -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(steps))


@pytest.mark.parametrize("steps", [2, 3, 7, 20, 25, 30])
@pytest.mark.parametrize("config", [BASE, SD15, V_PREDICTION], ids=["trailing", "sd15", "v"])
@pytest.mark.parametrize("name", ["DDIM", "PLMS"])
def test_txt2img_runs_a1111_s_grid_and_steps(name: str, config, steps: int) -> None:
    """DDIM and PLMS ran diffusers' schedulers on the model's spacing, a last step more, into
    alphas_cumprod[0]: at 30 steps on SD 1.5's config they started at t = 958 where A1111 starts at 991 (3.9 apart in
    the stand-in's latents), at 20 steps 0.014 apart; on sd-turbo's trailing spacing at 999."""
    scheduler = samplers.make_scheduler(config, name, a1111=True)
    assert type(scheduler).__name__ == {"DDIM": "DDIMScheduler", "PLMS": "PNDMScheduler"}[name]
    samplers.set_timesteps(scheduler, steps)
    grid = get_timesteps(steps)
    assert int(scheduler.timesteps[0]) == int(grid[-1])
    calls = len(grid) - 1 + (name == "PLMS")  # PLMS's first step calls the model twice
    assert len(scheduler.timesteps) == calls
    noise = noise_for(steps)
    expected = (ddim if name == "DDIM" else plms)(config, noise.double(), grid)
    got = ours(scheduler, noise * samplers.initial_noise_scale(scheduler), scheduler.timesteps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("name", ["DDIM", "PLMS"])
def test_img2img_noises_at_t_enc_and_runs_from_the_point_below(name: str, strength: float) -> None:
    """sample_img2img: t_enc = int(min(strength, 0.999) * steps), the latent noised at grid point t_enc, the run
    from point t_enc - 1 down (A1111's own quirk: a step lower than the noise it added)."""
    steps, config = 20, SD15
    scheduler = samplers.make_scheduler(config, name, a1111=True)
    t_enc = int(min(strength, 0.999) * steps)
    timesteps = a1111_timesteps.run(scheduler, steps, top=t_enc)
    grid = get_timesteps(steps)
    assert scheduler.a1111_noise_at == int(grid[t_enc])
    init, noise = noise_for(1) * 0.8, noise_for(2)
    alpha = table(config)[grid[t_enc]].double()
    xi = init.double() * alpha.sqrt() + noise.double() * (1 - alpha).sqrt()
    expected = (ddim if name == "DDIM" else plms)(config, xi, grid[:t_enc])
    start = scheduler.add_noise(init, noise, torch.tensor([scheduler.a1111_noise_at]))
    torch.testing.assert_close(ours(scheduler, start, timesteps).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_s_eta_adds_a1111_s_noise(eta: float) -> None:
    scheduler = samplers.make_scheduler(SD15, "DDIM", a1111=True)
    samplers.set_timesteps(scheduler, 10)
    generator = torch.Generator().manual_seed(5)
    noises = [torch.randn((1, 4, 8, 8), generator=generator).double() for _ in range(10)]
    noise = noise_for(10)
    expected = ddim(SD15, noise.double(), get_timesteps(10), eta=eta, noises=noises)
    got = ours(scheduler, noise, scheduler.timesteps, eta=eta, noises=noises)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    plain = ours(scheduler, noise, scheduler.timesteps)
    assert float((got - plain).abs().max()) > 0.01  # eta's noise went in


def test_the_grid_s_ends() -> None:
    assert a1111_timesteps.grid(20) == list(range(1, 1000, 50))
    assert a1111_timesteps.grid(30)[-1] == 991 and len(a1111_timesteps.grid(30)) == 31
    assert a1111_timesteps.grid(3) == [1, 334, 667, 999]  # 1000 clipped to 999, as A1111 clips it
    assert a1111_timesteps.grid(1000) == list(range(1, 1000))  # A1111's 999, 999: its no-op first step left out
    assert a1111_timesteps.grid(1250) == list(range(1, 1000))  # A1111: 1000 // 1250 is 0, a ValueError


def test_the_live_stream_s_ddim_is_diffusers_own() -> None:
    """A1111's grid is for one-shot requests: the stream's DDIM keeps the model's spacing and diffusers' step."""
    live = samplers.make_scheduler(SD15, "DDIM")
    samplers.set_timesteps(live, 4)
    assert not a1111_timesteps.installed(live) and "step" not in vars(live)
    assert live.timesteps.tolist() == [751, 501, 251, 1]


class NoiseScheduleVP:
    """uni_pc.py's NoiseScheduleVP("discrete"): log sqrt(alphas_cumprod) piecewise linear on t_i = (i + 1) / 1000."""

    def __init__(self, config) -> None:
        self.log_alpha = 0.5 * table(config).double().log()
        self.t_array = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)[1:]

    def marginal_log_mean_coeff(self, t: float) -> float:
        index = min(int(torch.searchsorted(self.t_array, torch.tensor([t], dtype=torch.float64))), 999)
        low = max(index - 1, 0)
        if index == low:
            return float(self.log_alpha[0])
        t0, t1 = float(self.t_array[low]), float(self.t_array[index])
        return float(self.log_alpha[low] + (t - t0) / (t1 - t0) * (self.log_alpha[index] - self.log_alpha[low]))

    def alpha(self, t: float) -> float:
        return math.exp(self.marginal_log_mean_coeff(t))

    def std(self, t: float) -> float:
        return math.sqrt(1.0 - math.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def lam(self, t: float) -> float:
        log_mean = self.marginal_log_mean_coeff(t)
        return log_mean - 0.5 * math.log(1.0 - math.exp(2.0 * log_mean))


def unipc(config, x, steps: int, t_start: float | None = None, order: int = 3, variant: str = "bh1"):
    """uni_pc.py's UniPC(predict_x0=True).sample(method="multistep", skip_type="time_uniform",
    lower_order_final=True) with A1111's defaults (variant bh1, order 3): data prediction, the UniP predictor and
    the UniC corrector at every step but the last, no model call after it."""
    ns = NoiseScheduleVP(config)
    times = torch.linspace(1.0 if t_start is None else t_start, 1 / 1000, steps + 1, dtype=torch.float64).tolist()

    def data(x, t):
        out = eps_model(x.float()).double()  # the stand-in at model time (t - 1/1000) * 1000: it ignores time
        if config["prediction_type"] == "v_prediction":
            return ns.alpha(t) * x - ns.std(t) * out
        return (x - ns.std(t) * out) / ns.alpha(t)

    def update(x, history, t, order, corrector):
        (t_prev, m_prev) = history[-1]
        h = ns.lam(t) - ns.lam(t_prev)
        rks, differences = [], []
        for t_old, m_old in reversed(history[-order:-1]):
            rk = (ns.lam(t_old) - ns.lam(t_prev)) / h
            rks.append(rk)
            differences.append((m_old - m_prev) / rk)
        rks.append(1.0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        b_h = hh if variant == "bh1" else math.expm1(hh)
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append([rk ** (i - 1) for rk in rks])
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rows, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        x_t_ = ns.std(t) / ns.std(t_prev) * x - ns.alpha(t) * h_phi_1 * m_prev
        x_t = x_t_
        if differences:
            rhos_p = [0.5] if order == 2 else torch.linalg.solve(rows[:-1, :-1], b[:-1]).tolist()
            x_t = x_t_ - ns.alpha(t) * b_h * sum(rho * d for rho, d in zip(rhos_p, differences))
        if not corrector:
            return x_t, None
        rhos_c = [0.5] if order == 1 else torch.linalg.solve(rows, b).tolist()
        m_t = data(x_t, t)
        correction = sum(rho * d for rho, d in zip(rhos_c[:-1], differences))
        return x_t_ - ns.alpha(t) * b_h * (correction + rhos_c[-1] * (m_t - m_prev)), m_t

    history = [(times[0], data(x, times[0]))]
    for step in range(1, steps + 1):
        step_order = min(order, step, steps + 1 - step)  # warm-up orders, then lower_order_final
        last = step == steps
        x, m = update(x, history, times[step], step_order, corrector=not last)
        if not last:
            history = [*history[-(order - 1):], (times[step], m)]
    return x


@pytest.mark.parametrize("steps", [3, 4, 7, 20, 30])
@pytest.mark.parametrize("config", [BASE, SD15, V_PREDICTION], ids=["trailing", "sd15", "v"])
def test_unipc_txt2img_is_a1111_s(config, steps: int) -> None:
    """UniPC ran diffusers' defaults (order 2, bh2, ending on the clean latent) on the model's spacing: 0.27 from
    A1111's latents at 4 steps, 0.023 at 20 (QA 60 F1). A1111 runs as many steps as its grid has points (31 at 30),
    on fractional model times, order 3, bh1, and ends at model time 0."""
    scheduler = samplers.make_scheduler(config, "UniPC", a1111=True)
    samplers.set_timesteps(scheduler, steps)
    length = len(get_timesteps(steps))
    assert len(scheduler.timesteps) == length and float(scheduler.timesteps[0]) == 999.0
    noise = noise_for(steps).double()
    expected = unipc(config, noise, length)
    got = ours(scheduler, noise * samplers.initial_noise_scale(scheduler), scheduler.timesteps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_unipc_img2img_runs_t_enc_steps_from_the_grid_point_below_the_noise(strength: float) -> None:
    """UniPC took the k-diffusion rule, t_enc + 1 steps from the top: at 4 steps and strength 0.75 it noised at 999
    (A1111: 751) and all but erased the input (QA 60 F2). A1111 noises at grid point t_enc and runs t_enc steps from
    point t_enc - 1 down to model time 0."""
    steps, config = 20, SD15
    scheduler = samplers.make_scheduler(config, "UniPC", a1111=True)
    t_enc = int(min(strength, 0.999) * steps)
    timesteps = a1111_timesteps.run(scheduler, steps, top=t_enc)
    grid = get_timesteps(steps)
    assert scheduler.a1111_noise_at == int(grid[t_enc]) and len(timesteps) == t_enc
    init, noise = noise_for(1) * 0.8, noise_for(2)
    alpha = table(config)[grid[t_enc]].double()
    xi = init.double() * alpha.sqrt() + noise.double() * (1 - alpha).sqrt()
    start = scheduler.add_noise(init.double(), noise.double(), torch.tensor([scheduler.a1111_noise_at]))
    torch.testing.assert_close(start, xi)
    expected = unipc(config, xi, t_enc, t_start=int(grid[t_enc - 1]) / 1000 + 1 / 1000)
    torch.testing.assert_close(ours(scheduler, start, timesteps).double(), expected, rtol=1e-5, atol=1e-5)


def test_the_live_stream_s_unipc_is_diffusers_own() -> None:
    live = samplers.make_scheduler(SD15, "UniPC")
    samplers.set_timesteps(live, 4)
    assert not a1111_timesteps.installed(live) and live.config.solver_order == 2
    assert live.timesteps.tolist() == [801, 601, 401, 201]  # diffusers' leading spacing, its offset of 1


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "UniPC"])
@pytest.mark.parametrize("schedule", ["Uniform", "DDIM", "Simple", "SGM Uniform", "Karras"])
def test_the_timestep_samplers_read_no_schedule_type(name: str, schedule: str) -> None:
    """A1111's timestep samplers read no schedule type; "DDIM", "Simple" and "SGM Uniform" changed UniPC's timesteps
    here, unwarned (QA 60 F4), and /sdapi/v1/samplers listed five types for each, where A1111 lists none."""
    plain = samplers.make_scheduler(SD15, name, a1111=True)
    samplers.set_timesteps(plain, 10)
    typed = samplers.make_scheduler(SD15, name, schedule, a1111=True)
    samplers.set_timesteps(typed, 10)
    assert typed.timesteps.tolist() == plain.timesteps.tolist()
    assert "ignored" in samplers.schedule_warning(name, schedule)
    listed = {entry["name"]: entry["options"] for entry in samplers.a1111_samplers()}
    assert listed[name] == {}


def test_lcm_is_named_and_listed_as_a1111_names_it() -> None:
    """A1111's alias for LCM is k_lcm, and it lists no eta for it (its sample_lcm takes none; QA 60 F5)."""
    assert samplers.resolve("k_lcm")[0].name == samplers.resolve("lcm")[0].name == "LCM"
    assert "eta" not in {entry["name"]: entry["options"] for entry in samplers.a1111_samplers()}["LCM"]

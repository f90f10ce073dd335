"""The σ view of SD's noise schedule, and what the σ samplers (euler.py, euler_ancestral.py, dpmpp_2m.py) share.

Notation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv 2206.00364)
--------------------------------------------------------------------------------------------------------------------
    x_t        SD's latent at training timestep t, variance preserving (VP): x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε   (ddim.py)
    σ_t        the noise level of timestep t:  σ_t = √((1−ᾱ_t)/ᾱ_t)  (0.0292 at t = 0 … 14.61 at t = 999 for SD)
    x          the σ-space latent, variance exploding (VE): x = x_t/√ᾱ_t = x_0 + σ ε
    t(σ)       the (fractional) timestep of a noise level: t interpolated linearly in log σ between the two
               neighbouring training timesteps (k-diffusion DiscreteSchedule.sigma_to_t, diffusers `_sigma_to_t`)
    σ_i        the noise level entering executed step i of an n-step run; σ_n = 0 (the run ends on a clean latent)
    F_θ        the UNet's output at (c_in·x, t(σ)): ε̂ or v̂
    D(x; σ)    the denoiser, the model's clean estimate x̂_0 (Karras et al. eq. 7 with σ_data = 1):
                   D(x; σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x; t(σ))
                   c_in   = 1/√(σ²+1)                  c_in·x = √ᾱ_t·x = x_t: the UNet sees the VP sample it was trained on
                   ε-prediction:  c_skip = 1,          c_out = −σ             (x̂_0 = x − σ ε̂)
                   v-prediction:  c_skip = 1/(σ²+1),   c_out = −σ/√(σ²+1)     (x̂_0 = √ᾱ x_t − √(1−ᾱ) v̂, written in x)
               (k-diffusion CompVisDenoiser / CompVisVDenoiser; diffusers' Euler `pred_original_sample`.)

In σ-space the probability-flow ODE is dx/dσ = (x − D(x; σ))/σ (Karras et al. eq. 3 with σ(t) = t). The σ samplers
integrate it from σ_0 down to σ_n = 0 over a σ schedule, which is where they differ from DDIM's timestep list.

σ schedules (what `schedule=` picks)
------------------------------------
    normal   the σ of evenly spaced training timesteps
    karras   σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7 (Karras et al. eq. 5): more of the
             steps at low noise, so 80 % of the steps is well past 80 % of the way down in σ
Spacing (`spacing=`): which timesteps a run visits, and which σ_min / σ_max: "leading" (the default: diffusers with
SD1.5's and SDXL's shipped configs), "linspace" (diffusers' class default), "k-diffusion" (A1111's) and "trailing"
(Lin et al. 2023; the default of a zero-terminal-SNR schedule). The notes at the end of this file say how each
method derives them, as diffusers and k-diffusion do, and what img2img, zero SNR and precision mean here.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .ddim import PREDICTION_TYPES, executed_steps
from .noise_schedule import leading_timesteps, trailing_timesteps

SCHEDULES = ("normal", "karras")
SPACINGS = ("leading", "linspace", "k-diffusion", "trailing")
ZERO_SNR_ALPHA = 2.0**-24  # ᾱ_{T−1} of a zero-terminal-SNR schedule, as the σ samplers see it (diffusers' value)
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: "ρ = 7 ... a good compromise"

# A spacing rule: (σ_t table [T], n, schedule) -> (model timesteps [n], σ_0 … σ_{n−1} [n] float64)
Spacing = Callable[[Tensor, int, str], tuple[Tensor, Tensor]]


def train_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """σ_t = √((1−ᾱ_t)/ᾱ_t) of every training timestep, float64 [T], increasing in t (a zero ᾱ, zero terminal SNR,
    taken as ZERO_SNR_ALPHA: σ 4096, not inf)."""
    a = alphas_cumprod.double().clamp_min(ZERO_SNR_ALPHA)
    return ((1.0 - a) / a).sqrt()


def sigma_to_t(sigma: Tensor, sigmas_t: Tensor) -> Tensor:
    """t(σ): the fractional timestep of each noise level, linear in log σ between neighbouring training timesteps,
    clamped to [0, T−1]. sigma: float64 [k]; sigmas_t: `train_sigmas` [T]."""
    log_sigmas, log_sigma = sigmas_t.log(), sigma.clamp_min(1e-10).log()
    # the last training timestep at or below σ (0 when σ is below them all), keeping one neighbour above it
    low = ((log_sigmas[:, None] <= log_sigma[None]).sum(0) - 1).clamp(0, len(sigmas_t) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return low.double() + w


def t_to_sigma(t: Tensor, sigmas_t: Tensor) -> Tensor:
    """σ(t) at fractional timesteps, interpolated linearly in log σ (k-diffusion DiscreteSchedule.t_to_sigma)."""
    low, high = t.floor().long(), t.ceil().long()
    w = t - low.double()
    return ((1.0 - w) * sigmas_t[low].log() + w * sigmas_t[high].log()).exp()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. eq. 5: n noise levels from σ_max down to σ_min, evenly spaced in σ^(1/ρ). float64 [n]."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _check_first_t(t: Tensor, n: int, T: int, rule: str) -> None:
    # The leading rules offset every timestep by +1, so enough steps start past the last trained one (as DDIM's).
    if int(t[0]) >= T:
        raise ValueError(f"{n} steps with {rule} start at t={int(t[0])}, outside the trained timesteps 0..{T - 1}; "
                         "use fewer steps")


def euler_discrete_spacing(sigmas_t: Tensor, n: int, schedule: str) -> tuple[Tensor, Tensor]:
    """diffusers EulerDiscreteScheduler.set_timesteps, timestep_spacing="leading", steps_offset=1."""
    T = len(sigmas_t)
    t = leading_timesteps(n, T)  # as DDIM: 951, 901, …, 1 for 20 steps
    _check_first_t(t, n, T, "the leading spacing")
    sigmas = sigmas_t[t]
    if schedule == "karras":
        # Between the spaced schedule's own ends (`in_sigmas[-1]`, `in_sigmas[0]`), at fractional timesteps.
        sigmas = karras_sigmas(n, float(sigmas[-1]), float(sigmas[0]))
        t = sigma_to_t(sigmas, sigmas_t)
    return t, sigmas


def dpm_multistep_spacing(sigmas_t: Tensor, n: int, schedule: str) -> tuple[Tensor, Tensor]:
    """diffusers DPMSolverMultistepScheduler.set_timesteps, timestep_spacing="leading", steps_offset=1."""
    T = len(sigmas_t)
    if schedule == "karras":
        # Over the whole training range, whatever the spacing; the UNet gets t(σ) rounded (round half to even, as
        # numpy's round), while the solver keeps the exact Karras σ.
        sigmas = karras_sigmas(n, float(sigmas_t[0]), float(sigmas_t[-1]))
        return sigma_to_t(sigmas, sigmas_t).round().long(), sigmas
    step = T // (n + 1)  # n + 1 points, the last (t = 0) dropped: 941, 894, …, 48 for 20 steps
    if step == 0:
        raise ValueError(f"{n} steps with DPM++'s leading spacing leave no room between timesteps; use fewer steps")
    t = torch.arange(n, 0, -1, dtype=torch.long) * step + 1
    _check_first_t(t, n, T, "DPM++'s leading spacing")
    return t, sigmas_t[t]


def euler_linspace_spacing(sigmas_t: Tensor, n: int, schedule: str) -> tuple[Tensor, Tensor]:
    """diffusers EulerDiscreteScheduler.set_timesteps, timestep_spacing="linspace" (interpolation_type="linear")."""
    T = len(sigmas_t)
    # numpy's linspace(0, T−1, n) reversed (one step: t = 0, numpy's start), σ interpolated linearly *in σ* (np.interp)
    t = torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
    low = t.floor().long().clamp(max=T - 2)
    w = t - low.double()
    sigmas = (1.0 - w) * sigmas_t[low] + w * sigmas_t[low + 1]
    if schedule == "karras":  # between that schedule's ends (σ(0) and σ(T−1), k-diffusion's range), at t(σ)
        sigmas = karras_sigmas(n, float(sigmas[-1]), float(sigmas[0]))
        t = sigma_to_t(sigmas, sigmas_t)
    return t, sigmas


def dpm_linspace_spacing(sigmas_t: Tensor, n: int, schedule: str) -> tuple[Tensor, Tensor]:
    """diffusers DPMSolverMultistepScheduler.set_timesteps, timestep_spacing="linspace"."""
    if schedule == "karras":
        return dpm_multistep_spacing(sigmas_t, n, schedule)  # the whole training range, whatever the spacing
    T = len(sigmas_t)
    # n + 1 points from T−1 down to 0, rounded half to even (numpy's round), the last (t = 0) dropped
    t = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().long().flip(0)[:-1]
    return t, sigmas_t[t]


def euler_trailing_spacing(sigmas_t: Tensor, n: int, schedule: str) -> tuple[Tensor, Tensor]:
    """diffusers EulerDiscreteScheduler.set_timesteps, timestep_spacing="trailing"."""
    t = trailing_timesteps(n, len(sigmas_t))  # 999, 949, …, 49 for 20 steps
    sigmas = sigmas_t[t]
    if schedule == "karras":  # between the spaced schedule's own ends, as under "leading"
        sigmas = karras_sigmas(n, float(sigmas[-1]), float(sigmas[0]))
        t = sigma_to_t(sigmas, sigmas_t)
    return t, sigmas


def dpm_trailing_spacing(sigmas_t: Tensor, n: int, schedule: str) -> tuple[Tensor, Tensor]:
    """diffusers DPMSolverMultistepScheduler.set_timesteps, timestep_spacing="trailing"."""
    if schedule == "karras":
        return dpm_multistep_spacing(sigmas_t, n, schedule)  # the whole training range, whatever the spacing
    t = trailing_timesteps(n, len(sigmas_t))
    return t, sigmas_t[t]


def k_diffusion_spacing(sigmas_t: Tensor, n: int, schedule: str) -> tuple[Tensor, Tensor]:
    """k-diffusion DiscreteSchedule.get_sigmas(n) / get_sigmas_karras(n, σ(0), σ(T−1)) (A1111's samplers)."""
    T = len(sigmas_t)
    if schedule == "karras":
        sigmas = karras_sigmas(n, float(sigmas_t[0]), float(sigmas_t[-1]))
    else:
        sigmas = t_to_sigma(torch.linspace(T - 1, 0, n, dtype=torch.float64), sigmas_t)
    return sigma_to_t(sigmas, sigmas_t), sigmas


class SigmaSampler:
    """The part every σ sampler shares: the run's σ schedule, the start latents, c_in and the denoiser D(x; σ).

    A method subclasses it and writes `update` (and `noise_std` if it adds noise). Usage, as DDIMSampler's:
    `ts = sampler.timesteps(n, strength)` fixes the run; then step i of it (0 … len(ts)−1) is
    `x, x0 = sampler.update(x, i, guided UNet output at (sampler.model_input(x, i), ts[i]))`.
    """

    name = ""  # set by each method
    # The diffusers class whose "leading" / "linspace" derivations (timesteps, Karras range) the method follows.
    leading_spacing: Spacing = staticmethod(euler_discrete_spacing)
    linspace_spacing: Spacing = staticmethod(euler_linspace_spacing)
    trailing_spacing: Spacing = staticmethod(euler_trailing_spacing)
    # The spacings under which x_T enters σ-space as x = σ_0·x_T (diffusers' Euler `init_noise_sigma` under
    # "linspace" and "trailing"; k-diffusion's samplers); under the others x = √(σ_0²+1)·x_T: x_T is the VP sample at
    # t_0, as DDIM's.
    ve_start_spacings: tuple[str, ...] = ("linspace", "k-diffusion", "trailing")

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon", schedule: str = "normal",
                 spacing: str = "leading") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
        self.prediction_type, self.schedule, self.spacing = prediction_type, schedule, spacing
        self.sigmas_t = train_sigmas(alphas_cumprod)  # σ_t of every training timestep, float64 [T]
        # Set by timesteps():
        self.num_inference_steps: int | None = None
        self.run_timesteps: Tensor | None = None  # the UNet's t at each executed step [n_run]: long, or float64
        self.sigmas: Tensor | None = None  # σ_i entering each executed step, then σ_n = 0; float64 [n_run + 1]

    # ----------------------------------------------------------------- schedule
    def timesteps(self, num_inference_steps: int, strength: float = 1.0) -> Tensor:
        """The UNet's timesteps of the executed steps [int(n · strength)] (img2img runs the schedule's tail); fixes
        the run's σ_i, which the other methods index by the executed-step index i."""
        n = num_inference_steps
        n_run = executed_steps(n, strength, len(self.sigmas_t))
        rule = {"leading": self.leading_spacing, "linspace": self.linspace_spacing,
                "k-diffusion": k_diffusion_spacing, "trailing": self.trailing_spacing}[self.spacing]
        t, sigmas = rule(self.sigmas_t, n, self.schedule)
        same = (sigmas[1:] >= sigmas[:-1]).nonzero()
        if len(same):  # e.g. DPM++'s linspace rounding n + 1 points onto fewer than n + 1 timesteps
            i = int(same[0])
            raise ValueError(f"{n} steps of {self.name} with the {self.spacing} spacing do not descend: steps {i} and "
                             f"{i + 1} are both at timestep {float(t[i + 1]):g} (σ {float(sigmas[i + 1]):.4g}); "
                             "use fewer steps")
        # Integral timesteps stay integers (the UNet embeds them exactly as DDIM's); fractional ones are float64.
        if t.is_floating_point() and bool((t == t.round()).all()):
            t = t.long()
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])  # σ_n = 0
        self.num_inference_steps = n
        self.run_timesteps, self.sigmas = t[n - n_run:], sigmas[n - n_run:]
        return self.run_timesteps

    def sigma(self, i: int) -> float:
        """σ_i, the noise level entering executed step i (i = len(run) gives the final 0)."""
        if self.sigmas is None:
            raise ValueError("call timesteps(num_inference_steps) first: it fixes the run the steps index into")
        if not 0 <= i < len(self.sigmas):
            raise ValueError(f"step index {i} is outside the run's {len(self.sigmas) - 1} steps")
        return float(self.sigmas[i])

    # ----------------------------------------------------------------- the σ-space denoiser
    def start_latents(self, noise: Tensor, x0: Tensor | None = None) -> Tensor:
        """The σ-space latent entering step 0: txt2img scales x_T = `noise` by √(σ_0²+1) (x_T is the VP sample at
        t_0, as DDIM has it) or by σ_0, as the reference of this method and spacing does (`ve_start_spacings`); img2img is
        x_0 + σ_0·ε."""
        s = self.sigma(0)
        if x0 is not None:
            return x0 + s * noise
        return noise * (s if self.spacing in self.ve_start_spacings else math.sqrt(s * s + 1.0))

    def model_input(self, x: Tensor, i: int) -> Tensor:
        """c_in·x = x/√(σ_i²+1): the VP sample x_t the UNet was trained on."""
        s = self.sigma(i)
        return x / math.sqrt(s * s + 1.0)

    def denoised(self, x: Tensor, i: int, model_output: Tensor) -> Tensor:
        """D(x; σ_i) = c_skip·x + c_out·F, the model's clean estimate x̂_0 (see the notation above)."""
        s = self.sigma(i)
        if self.prediction_type == "epsilon":
            return x - s * model_output
        return x / (s * s + 1.0) - (s / math.sqrt(s * s + 1.0)) * model_output

    def noise_std(self, i: int, eta: float) -> float:
        """The std of the fresh noise step i adds: 0 for the deterministic methods."""
        self.check_eta(eta)
        self.sigma(i)
        return 0.0

    def check_eta(self, eta: float) -> None:
        if eta != 0.0:
            raise ValueError(f"eta (DDIM's η) is for the ddim sampler; {self.name} takes eta=0 "
                             "(euler_a is the ancestral one, with η = 1)")

    def update(self, x: Tensor, i: int, model_output: Tensor, *, eta: float = 0.0, noise: Tensor | None = None,
               prev_x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Step i: (x_i, F at step i) -> (x_{i+1}, x̂_0). Written by each method."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(prediction_type={self.prediction_type!r}, schedule={self.schedule!r}, "
                f"spacing={self.spacing!r}, num_inference_steps={self.num_inference_steps})")


# Spacing (`spacing=`): which timesteps, and which σ_min / σ_max.
#     "leading" (default): what diffusers runs with SD1.5's and SDXL's shipped scheduler configs (`timestep_spacing=
#         "leading"`, `steps_offset=1`), each method as its diffusers class derives it:
#         Euler, Euler a (EulerDiscreteScheduler):  t_i = (n−1−i)·⌊T/n⌋ + 1 (20 steps: 951, 901, …, 1, DDIM's own);
#             karras between σ(t_{n−1}) and σ(t_0) of those, the UNet at the fractional t(σ_i).
#         DPM++ 2M (DPMSolverMultistepScheduler):  t_i = (n−i)·⌊T/(n+1)⌋ + 1 (20 steps: 941, 894, …, 48);
#             karras between σ(0) and σ(T−1), the UNet at t(σ_i) rounded to an integer.
#         x_T is taken as the VP sample at the first step: x = √(σ_0²+1)·x_T (diffusers' `init_noise_sigma`).
#     "linspace": what diffusers runs where the scheduler config names no spacing, SD1.5's shipped config among them:
#         a `from_config` swap to EulerDiscreteScheduler / DPMSolverMultistepScheduler gets the class default,
#         "linspace" (diffusers' own DDIM swap keeps DDIMScheduler's default, "leading"), each as its class derives it:
#         Euler, Euler a:  t_i = linspace(T−1, 0, n) (fractional), σ interpolated *linearly in σ* (np.interp), karras
#             between σ(0) and σ(T−1) at t(σ_i); x = σ_0·x_T (`init_noise_sigma` is σ_max for this spacing).
#         DPM++ 2M:  t_i = round(linspace(0, T−1, n+1)) reversed, the last (t = 0) dropped (20 steps: 999, 949, …, 50);
#             karras as under "leading"; x_T the VP sample at t_0, as always for DPM++.
#     "k-diffusion": k-diffusion's DiscreteSchedule.get_sigmas / get_sigmas_karras, what A1111 runs (quantization off):
#         t_i = linspace(T−1, 0, n) with σ interpolated in log σ; karras between σ(0) and σ(T−1); the UNet at the
#         fractional t(σ_i); x = σ_0·x_T.
#     "trailing": noise_schedule.trailing_timesteps, diffusers' timestep_spacing="trailing" (Lin et al. 2023): n
#         timesteps back from T−1 (20 steps: 999, 949, …, 49), for Euler, Euler a and DPM++ 2M alike; karras as under
#         "leading" for each method; x = σ_0·x_T for Euler and Euler a (diffusers' `init_noise_sigma` under "trailing"),
#         the VP sample for DPM++. The default of a zero-terminal-SNR schedule (below).
# img2img (strength s), for every spacing: the last int(n·s) steps of the n-step schedule run, from x = x_0 + σ·ε at the
# first of them (diffusers StableDiffusionImg2ImgPipeline.get_timesteps, and the schedulers' `add_noise`).
#
# Zero terminal SNR (noise_schedule.py): ᾱ_{T−1} = 0 makes σ_{T−1} infinite. As diffusers' σ schedulers do, that one
# ᾱ is taken as 2^−24 (`train_sigmas`), so σ_max = 4096: x = σ_0·x_T starts 4096 times the unit noise, and the first
# step's c_in·x is x_T itself to within 3e-8.
#
# Precision: σ_t is computed in float64 from the float32 ᾱ table of ddim.py (CompVis' buffer); diffusers computes it in
# float32 from its float32 cumprod, ~1e-6 relative apart. The per-step scalars are float64 Python numbers applied to the
# fp32 latents, as in ddim.py.

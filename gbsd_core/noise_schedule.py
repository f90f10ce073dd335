"""The noise schedule of a DDPM-trained model -- β_t, and ᾱ_t = ∏_{s≤t} (1 − β_s) -- and which timesteps an n-step
run visits. Every sampler reads ᾱ from here (ddim.py directly, sigmas.py as σ_t = √((1−ᾱ_t)/ᾱ_t)).

    T          number of training timesteps                                   (SD: 1000)
    β_t        the noise added at step t, t = 0 … T−1
    ᾱ_t        ∏_{s≤t} (1 − β_s): how much signal is left at t; x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
    SNR(t)     ᾱ_t / (1 − ᾱ_t)

Every released SD1, SD2 and SDXL model uses `SD` below; a diffusers folder may declare another in its
scheduler/scheduler_config.json (diffusers_configs.scheduler_config reads it), a single file cannot.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

BETA_SCHEDULES = ("scaled_linear", "linear")
SPACINGS = ("leading", "trailing")  # the two rules below; sigmas.py adds the σ samplers' own
MAX_TRAIN_TIMESTEPS = 10_000  # ten times any released schedule's T: beyond it a config is broken, not a model


@dataclass(frozen=True)
class NoiseSchedule:
    """β_1 … β_T as diffusers' scheduler configs name them (defaults: SD's; see the notes below the class)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    zero_terminal_snr: bool = False  # diffusers: rescale_betas_zero_snr

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or not 2 <= T <= MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}], got {T!r}")
        for name in ("beta_start", "beta_end"):
            beta = getattr(self, name)
            if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 < beta < 1.0:
                raise ValueError(f"{name} must be a number in (0, 1) (a variance added per step), got {beta!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not one gbsd builds "
                             f"({', '.join(BETA_SCHEDULES)}: the DDPM schedules of SD and its finetunes)")
        if not isinstance(self.zero_terminal_snr, bool):
            raise ValueError(f"rescale_betas_zero_snr must be true or false, got {self.zero_terminal_snr!r}")
        if not self.zero_terminal_snr and float(self.alphas_cumprod()[-1]) == 0.0:
            raise ValueError(f"these betas leave no signal at t = {T - 1} (ᾱ underflows to 0): only a zero-terminal-SNR "
                             "schedule (rescale_betas_zero_snr) may end at 0")

    def betas(self) -> Tensor:
        """β_t, float64 [T]."""
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":  # linear in √β
            betas = torch.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), T, dtype=torch.float64) ** 2
        else:  # "linear": linear in β
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        return rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas

    @property
    def spacing(self) -> str:
        """The timesteps a run visits unless asked otherwise: "trailing" for a zero-terminal-SNR schedule, whose
        sampling must start at t = T−1, else "leading" (CompVis' DDIM timesteps)."""
        return "trailing" if self.zero_terminal_snr else "leading"

    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t, float32 [T]: the float64 product stored as float32, as CompVis' `alphas_cumprod` buffer."""
        return torch.cumprod(1.0 - self.betas(), dim=0).to(torch.float32)


SD = NoiseSchedule()  # v1-inference.yaml, v2-inference(-v).yaml, sd_xl_base.yaml: linear_start/end, timesteps 1000

# Names. CompVis calls SD's schedule `make_beta_schedule("linear")` (linear_start/linear_end in the YAMLs), but it is
# linear in √β; diffusers calls the same schedule "scaled_linear" and keeps "linear" for β linear in t (the original
# DDPM's, Ho et al. 2020: 1e-4 to 0.02, diffusers' default when a config names none). We use diffusers' names, since
# diffusers' configs are where another schedule can come from.
#
# Precision. CompVis builds β and ᾱ in float64 and registers ᾱ as float32; so do we (ddim.py measures what that means
# against diffusers, which takes the cumprod in float32: ~1e-6 relative).


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 (arXiv 2305.08891), Algorithm 1: shift and scale √ᾱ so that √ᾱ_{T−1} = 0 (zero SNR at the
    last timestep: pure noise, as sampling starts) while √ᾱ_0 keeps its value; β from the new ᾱ. float64 [T]."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas

# Why. SD's schedule ends at ᾱ_999 = 0.0047 (SNR 0.005, not 0), so training never shows the model pure noise, while
# sampling starts from it: the model then cannot make very dark or very bright images (the paper's Fig. 1). A model
# finetuned on the rescaled schedule is given pure noise at t = T−1, where √ᾱ = 0 makes x_t = ε carry no signal: an
# ε-prediction model could only answer ε = x_t there and x̂_0 = (x_t − ε)/√ᾱ divides by 0, so such models predict v
# (diffusers_configs refuses the pair). Sampling must start at t = T−1 (the trailing spacing below), and the
# σ samplers, whose σ_{T−1} = √((1−ᾱ)/ᾱ) is infinite, take ᾱ_{T−1} as 2^−24, as diffusers' do (sigmas.train_sigmas).


def leading_timesteps(n: int, T: int) -> Tensor:
    """CompVis' DDIM timesteps: every ⌊T/n⌋-th from 0, plus one (diffusers: timestep_spacing="leading",
    steps_offset=1). Descending, long [n]: 50 of 1000 are 981, 961, …, 1."""
    return torch.arange(n - 1, -1, -1, dtype=torch.long) * (T // n) + 1


def trailing_timesteps(n: int, T: int) -> Tensor:
    """The trailing spacing (Lin et al. 2023, Table 2; diffusers: timestep_spacing="trailing"): n timesteps counted
    back from the last one, T/n apart, rounded (half to even, as numpy). Descending, long [n]: 50 of 1000 are
    999, 979, …, 19; n = T visits every timestep."""
    delta = (T - T / n) - T  # numpy's arange(T, 0, -T/n), which diffusers uses, steps by this rounded difference
    return (T + torch.arange(n, dtype=torch.float64) * delta).round().long() - 1

# The leading rule never visits t = T−1 (1000 steps would start past it, at t = 1000), so it never starts at zero SNR
# on a rescaled schedule; the trailing one always starts there. Rounding: numpy's arange adds i·delta with delta the
# float difference above, which puts some exact halves just below .5 (48 steps: 937.4999999999999, rounded to 937):
# computed the same way, every n gives diffusers' timesteps. Where numpy's float arange yields n + 1 points (61 of
# 1000 steps: its last one rounds to t = −1, past the schedule), diffusers runs a step too many; we run n.

"""Samplers: the rule that turns each step's guided UNet output into the next latent. GBSD is a schedule of
*conditionings*, so it runs on any of them; DDIM 50 (the paper's) stays the default.

    name       method                                 reference                                        file
    ddim       DDIM, η = 0 (η > 0 optional)           CompVis ddim.py / diffusers DDIMScheduler        ddim.py
    euler      Euler on the probability-flow ODE      k-diffusion sample_euler / EulerDiscreteScheduler  euler.py
    euler_a    Euler ancestral, η = 1                 sample_euler_ancestral / EulerAncestralDiscrete…   euler_ancestral.py
    dpmpp_2m   DPM-Solver++(2M)                       sample_dpmpp_2m / DPMSolverMultistepScheduler      dpmpp_2m.py
                                                      (algorithm_type="dpmsolver++", solver_order=2)

All four call the UNet once per step, so a 20-step run costs 20 UNet evaluations (with classifier-free guidance each
is one batched call on [uncond; cond]); 20–25 steps of DPM++ 2M or Euler look like 50 of DDIM. The σ samplers take a
`schedule`, "normal" or "karras", and a `spacing`: "leading" (the default: diffusers with `timestep_spacing=
"leading"`, SDXL's shipped config, CompVis' DDIM spacing), "linspace" (diffusers' class default, what a `from_config`
swap on SD1.5's shipped config gets), "k-diffusion" (A1111's) or "trailing" (Lin et al. 2023: from t = T−1, the
default of a zero-terminal-SNR model, DDIM's too); sigmas.py explains them, and the σ-space denoiser
D(x; σ) = c_skip·x + c_out·F they share.

The interface (`Sampler`) is index-keyed: `timesteps(n, strength)` fixes a run and returns the UNet's timesteps, then
executed step i = 0, 1, … is `update(x, i, out)`. `sampling.CFGStep` calls the UNet on `model_input(x, i)` at
`run_timesteps[i]`, guides, and hands the output to `update`; `sampling.denoise` runs the stages, draws the fresh
noise a step asks for (`noise_std`) and passes a multistep sampler its history (`prev_x0`, the previous x̂_0).
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

from .ddim import DDIMSampler
from .dpmpp_2m import DPMPP2MSampler
from .euler import EulerSampler
from .euler_ancestral import EulerAncestralSampler
from .noise_schedule import SPACINGS as DDIM_SPACINGS
from .noise_schedule import NoiseSchedule
from .sigmas import SCHEDULES, SPACINGS, SigmaSampler

SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
_SIGMA_SAMPLERS: dict[str, type[SigmaSampler]] = {
    "euler": EulerSampler, "euler_a": EulerAncestralSampler, "dpmpp_2m": DPMPP2MSampler,
}

__all__ = ["SAMPLERS", "SCHEDULES", "SPACINGS", "Sampler", "make_sampler"]


class Sampler(Protocol):
    """A tensor-only sampler: DDIMSampler (ddim.py) and the σ samplers (sigmas.SigmaSampler) implement it."""

    name: str  # one of SAMPLERS
    prediction_type: str  # "epsilon" | "v_prediction": what the UNet predicts
    schedule: str  # "normal" | "karras"
    spacing: str  # "leading" | "trailing"; the σ samplers also "linspace" | "k-diffusion"
    num_inference_steps: int | None  # n of the full schedule (img2img runs its last len(run_timesteps) steps)
    run_timesteps: Tensor | None  # the UNet's timestep at each executed step [n_run] (long; float64 if fractional)
    sigmas: Tensor | None  # noise level σ entering each executed step, then after the last; float64 [n_run + 1]

    def timesteps(self, num_inference_steps: int, strength: float = 1.0) -> Tensor:
        """Fix the run (the last int(n · strength) steps of the n-step schedule) and return `run_timesteps`."""

    def start_latents(self, noise: Tensor, x0: Tensor | None = None) -> Tensor:
        """The latent entering step 0, from x_T = `noise` (txt2img) or from the clean x0 noised by `noise` (img2img)."""

    def model_input(self, x: Tensor, i: int) -> Tensor:
        """What the UNet sees at step i (the σ samplers scale by c_in = 1/√(σ_i²+1); DDIM's latent is the input)."""

    def noise_std(self, i: int, eta: float) -> float:
        """The std of the fresh noise step i adds (> 0: the loop must pass `noise` to `update`)."""

    def update(self, x: Tensor, i: int, model_output: Tensor, *, eta: float = 0.0, noise: Tensor | None = None,
               prev_x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Step i: (x, guided model output) -> (next latent, x̂_0). `prev_x0`: step i−1's x̂_0 (multistep history)."""


def make_sampler(noise_schedule: NoiseSchedule, prediction_type: str, name: str = "ddim", schedule: str = "normal",
                 spacing: str | None = None) -> Sampler:
    """The sampler `name` for a model trained on `noise_schedule` (its ᾱ) that predicts `prediction_type` (ε or v):
    a bundle's `noise_schedule` and `family.prediction_type`.

    `spacing` None is the schedule's own: "leading" (CompVis' DDIM timesteps), "trailing" for a zero-terminal-SNR
    schedule. "ddim" takes no Karras σ and neither of the σ samplers' "linspace" and "k-diffusion" spacings.
    """
    if not isinstance(noise_schedule, NoiseSchedule):
        raise ValueError(f"noise_schedule must be a NoiseSchedule (a bundle's .noise_schedule), got "
                         f"{type(noise_schedule).__name__}")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    spacing = noise_schedule.spacing if spacing is None else spacing
    if name == "ddim":
        if schedule != "normal" or spacing not in DDIM_SPACINGS:
            raise ValueError(f"the ddim sampler runs DDIM timesteps with the {' or '.join(DDIM_SPACINGS)} spacing; "
                             f"schedule={schedule!r} and spacing={spacing!r} are for the σ samplers "
                             f"({', '.join(_SIGMA_SAMPLERS)})")
        return DDIMSampler(prediction_type, noise_schedule, spacing)
    return _SIGMA_SAMPLERS[name](noise_schedule.alphas_cumprod(), prediction_type, schedule, spacing)

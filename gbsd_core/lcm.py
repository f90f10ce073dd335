"""LCM: the Latent Consistency Model sampler (Luo et al. 2023, arXiv 2310.04378, Algorithm 1 "multistep latent
consistency sampling"; diffusers `LCMScheduler`). For LCM-distilled weights and LCM-LoRA: 4–8 steps, CFG 1–2.

Notation (as ddim.py: VP latents x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε)
-------------------------------------------------------------
    N          the original inference schedule the model was distilled on: `original_inference_steps` = 50
    k          T // N (20): the skipping interval; the distillation timesteps are k·j − 1, j = 1 … N (19, 39, …, 999)
    τ_i        the timestep of executed step i: n of the N distillation timesteps, counted from the top at indices
               ⌊i·N/n⌋ (numpy's floor(linspace(0, N, n, endpoint=False))): 4 steps visit 999, 759, 499, 259
    x̂_0        the model's clean estimate at τ_i (ε-model: (x − √(1−ᾱ) ε̂)/√ᾱ; v-model: √ᾱ x − √(1−ᾱ) v̂)
    c_skip,    the consistency boundary condition (Song et al. 2023, "Consistency Models", §3), with σ_data = 0.5
    c_out      and the timestep scaled by s = 10 (`timestep_scaling`):
                   c_skip(τ) = σ_data² / ((sτ)² + σ_data²),   c_out(τ) = sτ / √((sτ)² + σ_data²)
               so that f(x, 0) = x; at τ ≥ 259, c_skip < 1e-6 and f is x̂_0 to within that.
    f_i        the consistency function: f_i = c_skip(τ_i)·x + c_out(τ_i)·x̂_0
    z_i        N(0, I), drawn fresh for every step but the last

One step (Algorithm 1, lines 5–6):
    x_next = √ᾱ_{τ_{i+1}}·f_i + √(1 − ᾱ_{τ_{i+1}})·z_i        (the last step returns f_i itself)

Unlike DDIM, the next latent does not reuse ε̂: each step jumps to the clean estimate and re-noises it with fresh
noise to the next timestep. The noise is the caller's (`noise=`): `sampling.denoise` draws it from the run's CPU
generator, as for Euler ancestral. img2img runs the last int(n·strength) of the n steps, as every sampler here
(diffusers' StableDiffusionImg2ImgPipeline with an LCMScheduler does the same).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ddim import PREDICTION_TYPES, executed_steps
from .noise_schedule import SD, NoiseSchedule

ORIGINAL_INFERENCE_STEPS = 50  # N: LCMScheduler's default, the LCM and LCM-LoRA releases' scheduler configs
TIMESTEP_SCALING = 10.0  # s: LCMScheduler's default
SIGMA_DATA = 0.5  # σ_data of the boundary condition (LCMScheduler.get_scalings_for_boundary_condition_discrete)
SPACING = "lcm"  # the skipped schedule above; no other spacing applies


class LCMSampler:
    """LCM's multistep consistency sampling on a model's noise schedule; one UNet call per step, fresh noise at every
    step but the last. Usage as every sampler (samplers.Sampler): `ts = lcm.timesteps(4)`, then
    `x, f = lcm.update(x, i, model_output, noise=z)`."""

    name = "lcm"
    schedule = "normal"
    spacing = SPACING

    def __init__(self, prediction_type: str = "epsilon", noise_schedule: NoiseSchedule = SD) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if noise_schedule.zero_terminal_snr and prediction_type != "v_prediction":
            raise ValueError("a zero-terminal-SNR schedule needs a v_prediction model: an epsilon model's x̂_0 "
                             "divides by √ᾱ = 0 at the first step")
        self.prediction_type = prediction_type
        self.num_train_timesteps = noise_schedule.num_train_timesteps
        self.alphas_cumprod: Tensor = noise_schedule.alphas_cumprod()  # float32 [T]
        self.num_inference_steps: int | None = None
        self.run_timesteps: Tensor | None = None  # τ of the executed steps, long [n_run]
        self.sigmas: Tensor | None = None  # their noise levels σ, then 0 (the last step returns f), float64 [n_run + 1]

    def timesteps(self, num_inference_steps: int, strength: float = 1.0) -> Tensor:
        """The executed τ_i, long [int(n · strength)] (img2img: the schedule's tail); fixes the run."""
        n, T, N = num_inference_steps, self.num_train_timesteps, ORIGINAL_INFERENCE_STEPS
        n_run = executed_steps(n, strength, T)
        if n > N:
            raise ValueError(f"{n} steps are more than LCM's schedule has: it picks its steps from the "
                             f"{N} timesteps the model was distilled on; use at most {N} steps")
        k = T // N
        # floor(i · (N/n)) in float64, as numpy's linspace(0, N, n, endpoint=False) computes it
        index = (torch.arange(n, dtype=torch.float64) * (N / n)).floor().long()
        full = (N - index) * k - 1  # the distillation timesteps k·j − 1, counted from the top
        self.num_inference_steps, self.run_timesteps = n, full[n - n_run:]
        a = self.alphas_cumprod[self.run_timesteps].double()
        self.sigmas = torch.cat([((1.0 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)])
        return self.run_timesteps

    def start_latents(self, noise: Tensor, x0: Tensor | None = None) -> Tensor:
        """x_T = `noise` (txt2img), or x0 noised to τ_0: √ᾱ x0 + √(1−ᾱ) ε (img2img)."""
        if x0 is None:
            return noise
        a = self._alpha(self._t(0))
        return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise

    def model_input(self, x: Tensor, i: int) -> Tensor:
        """x_t itself, as DDIM's."""
        self._t(i)
        return x

    def noise_std(self, i: int, eta: float) -> float:
        """√(1 − ᾱ_{τ_{i+1}}): the re-noising of every step but the last (0 there)."""
        self._check_eta(eta)
        self._t(i)
        if i + 1 == len(self.run_timesteps):
            return 0.0
        return math.sqrt(1.0 - self._alpha(self._t(i + 1)))

    def boundary_condition(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at timestep t."""
        st = t * TIMESTEP_SCALING
        return SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2), st / math.sqrt(st**2 + SIGMA_DATA**2)

    def update(self, x: Tensor, i: int, model_output: Tensor, *, eta: float = 0.0, noise: Tensor | None = None,
               prev_x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x_t [B,4,h,w] and the guided UNet output at τ_i -> (x_next, f_i). `noise`: z_i (every step but the last).
        Single-step: `prev_x0` is unused."""
        std = self.noise_std(i, eta)
        t = self._t(i)
        a = self._alpha(t)
        if self.prediction_type == "epsilon":
            x0 = (x - math.sqrt(1.0 - a) * model_output) / math.sqrt(a)
        else:
            x0 = math.sqrt(a) * x - math.sqrt(1.0 - a) * model_output
        c_skip, c_out = self.boundary_condition(t)
        f = c_out * x0 + c_skip * x
        if std == 0.0:
            return f, f
        if noise is None:
            raise ValueError(f"lcm step {i} re-noises with std {std:.4g}: pass noise= (sampling.denoise draws it "
                             "from the run's generator)")
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(x.shape)}")
        a_next = self._alpha(self._t(i + 1))
        return math.sqrt(a_next) * f + std * noise.to(device=x.device, dtype=x.dtype), f

    def _check_eta(self, eta: float) -> None:
        if eta != 0.0:
            raise ValueError("eta (DDIM's η) is for the ddim sampler; lcm takes eta=0 (it re-noises every step "
                             "with fresh noise by construction)")

    def _t(self, i: int) -> int:
        if self.run_timesteps is None:
            raise ValueError("call timesteps(num_inference_steps) first: it fixes the run the steps index into")
        if not 0 <= i < len(self.run_timesteps):
            raise ValueError(f"step index {i} is outside the run's {len(self.run_timesteps)} steps")
        return int(self.run_timesteps[i])

    def _alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t])

    def __repr__(self) -> str:
        return f"LCMSampler(prediction_type={self.prediction_type!r}, num_inference_steps={self.num_inference_steps})"

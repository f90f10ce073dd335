"""Euler: one Euler step of the probability-flow ODE per UNet call (Karras et al. 2022, arXiv 2206.00364,
Algorithm 2 without "churn"; k-diffusion `sample_euler`; diffusers `EulerDiscreteScheduler`).

Notation (sigmas.py has the σ view of SD's schedule)
-----------------------------------------------------
    x_i        the σ-space latent entering executed step i, x = x_0 + σ ε (= x_t/√ᾱ_t)
    σ_i        its noise level; σ_n = 0 after the last of the n steps
    t(σ_i)     the timestep the UNet is called at (fractional under the Karras schedule)
    c_in       1/√(σ_i²+1): the UNet input is c_in·x_i = x_t
    D_i        D(x_i; σ_i) = c_skip·x_i + c_out·F_θ(c_in·x_i; t(σ_i)), the clean estimate x̂_0 (ε or v model)
    d_i        (x_i − D_i)/σ_i, the slope dx/dσ of the ODE (for an ε-model, d_i = ε̂)

One step (Karras et al. eq. 3 discretised):
    x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_i

At σ_{i+1} = 0 (the last step) x_{i+1} = x_i − σ_i·d_i = D_i: the run ends on the model's clean estimate, where DDIM
stops at ᾱ_0's noise level (σ = 0.0292). Writing x_i = D_i + σ_i·d_i shows x_{i+1} = D_i + σ_{i+1}·d_i: DDIM's η = 0
update (paper eq. 12) divided by √ᾱ. Euler *is* DDIM in σ-space, for ε- and v-models alike; what differs is the σ
schedule it runs (Karras, k-diffusion spacing) and that last step.
"""
from __future__ import annotations

from torch import Tensor

from .sigmas import SigmaSampler


class EulerSampler(SigmaSampler):
    """Euler steps on a σ schedule; one UNet call per step, deterministic."""

    name = "euler"

    def update(self, x: Tensor, i: int, model_output: Tensor, *, eta: float = 0.0, noise: Tensor | None = None,
               prev_x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x_i [B,4,h,w] and the guided UNet output at step i -> (x_{i+1}, D_i). Single-step: `prev_x0` is unused."""
        self.check_eta(eta)
        sigma, sigma_next = self.sigma(i), self.sigma(i + 1)
        x0 = self.denoised(x, i, model_output)
        d = (x - x0) / sigma
        return x + (sigma_next - sigma) * d, x0

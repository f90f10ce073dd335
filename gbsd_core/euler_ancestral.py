"""Euler ancestral ("Euler a"): an Euler step down past the next noise level, then fresh noise back up to it
(k-diffusion `sample_euler_ancestral` / `get_ancestral_step` with η = 1; diffusers `EulerAncestralDiscreteScheduler`).

Notation as euler.py (x_i, σ_i, D_i, d_i = (x_i − D_i)/σ_i), plus
    η          how much of the step is re-noised; 1 here, as A1111's and diffusers' default
    σ_up       the std of the fresh noise:  σ_up = min(σ_{i+1}, η·√(σ_{i+1}²·(σ_i² − σ_{i+1}²)/σ_i²))
    σ_down     where the deterministic part lands:  σ_down = √(σ_{i+1}² − σ_up²), so σ_down² + σ_up² = σ_{i+1}²
    z_i        N(0, I), drawn fresh for every step

One step:
    x_{i+1} = x_i + (σ_down − σ_i)·d_i + σ_up·z_i

With η = 1, σ_up is the DDPM posterior std written in σ-space (σ_up²·ᾱ_{i+1} = (1−ᾱ_{i+1})/(1−ᾱ_i)·(1 − ᾱ_i/ᾱ_{i+1})),
so this is DDIM with η = 1 divided by √ᾱ, as Euler is DDIM with η = 0. At σ_{i+1} = 0 (the last step) σ_up = σ_down
= 0: no noise is drawn and x_n = D_{n−1}.

The noise z_i is the caller's (`noise=`): `sampling.denoise` draws it from the run's CPU generator at the un-branched
batch, so a sweep's branches see the noise of their independent runs and a seed gives the same image on any device.
"""
from __future__ import annotations

import math

from torch import Tensor

from .sigmas import SigmaSampler

ETA = 1.0  # k-diffusion's and diffusers' default; A1111's "Eta for ancestral samplers"


class EulerAncestralSampler(SigmaSampler):
    """Euler ancestral steps on a σ schedule, η = 1; one UNet call per step, fresh noise at every step but the last."""

    name = "euler_a"

    def ancestral_step(self, i: int) -> tuple[float, float]:
        """(σ_down, σ_up) of step i."""
        s, s_next = self.sigma(i), self.sigma(i + 1)
        sigma_up = min(s_next, ETA * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        return math.sqrt(s_next**2 - sigma_up**2), sigma_up

    def noise_std(self, i: int, eta: float) -> float:
        """σ_up of step i (0 at the last step, into σ = 0)."""
        self.check_eta(eta)
        return self.ancestral_step(i)[1]

    def update(self, x: Tensor, i: int, model_output: Tensor, *, eta: float = 0.0, noise: Tensor | None = None,
               prev_x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x_i [B,4,h,w], the guided UNet output at step i and z_i (`noise`, needed when σ_up > 0) -> (x_{i+1}, D_i)."""
        self.check_eta(eta)
        sigma = self.sigma(i)
        sigma_down, sigma_up = self.ancestral_step(i)
        x0 = self.denoised(x, i, model_output)
        d = (x - x0) / sigma
        x_next = x + (sigma_down - sigma) * d
        if sigma_up > 0:
            if noise is None:
                raise ValueError(f"euler_a step {i} adds noise of std {sigma_up:.4g}: pass noise= (sampling.denoise "
                                 "draws it from the run's generator)")
            if noise.shape != x.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(x.shape)}")
            x_next = x_next + sigma_up * noise.to(device=x.device, dtype=x.dtype)
        return x_next, x0

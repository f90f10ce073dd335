"""DPM++ 2M: DPM-Solver++ with a second-order multistep correction (Lu et al. 2022, arXiv 2211.01095, Algorithm 2;
k-diffusion `sample_dpmpp_2m`; diffusers `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`).

Notation as euler.py (x_i, σ_i, D_i = D(x_i; σ_i) the clean estimate), plus
    λ_i        −log σ_i: half the log signal-to-noise ratio (the paper's λ_t = log(α_t/σ_t) in VP terms)
    h_i        λ_{i+1} − λ_i = log(σ_i/σ_{i+1}), the step in λ
    r_i        h_{i−1}/h_i, the ratio of the previous step to this one

One step. DPM-Solver++ integrates the ODE exactly in λ, treating D as a polynomial in λ:
    first order (the run's first step, a restart, or into σ_{i+1} = 0):   D̃ = D_i
    second order (2M), from this and the previous step's estimate:    D̃ = (1 + 1/(2 r_i))·D_i − 1/(2 r_i)·D_{i−1}
    x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h_i} − 1)·D̃

The paper writes it for the VP sample x̃ = α·x (α = 1/√(σ²+1)): x̃_{i+1} = (σ̃_{i+1}/σ̃_i)·x̃_i − α_{i+1}(e^{−h_i} − 1)·D̃
with σ̃ = α·σ; that is this update multiplied by α_{i+1}, and the form diffusers runs (its latents are x̃). The first-order
step, x_{i+1} = D_i + σ_{i+1}·(x_i − D_i)/σ_i, is DDIM (η = 0) again; the 2M term extrapolates D along λ, which is why
20–25 steps suffice. One UNet call per step: the second-order information comes from the history, not a second call.

The history is the previous step's D_{i−1} (`prev_x0`), given by the caller: `sampling.denoise` passes the last step's
x̂_0, across a GBSD stage switch too (as diffusers and A1111 keep theirs: D_{i−1} was made under the layout prompt),
and None at the first step or, with `restart_history=True`, at each stage's first step, which then runs first order.

At σ_{i+1} = 0 (the last step) λ = ∞, so e^{−h} = 0 and σ_{i+1}/σ_i = 0: x_n = D_{n−1}, first order (k-diffusion steps
first order into σ = 0; diffusers' `lower_order_final` with `final_sigmas_type="zero"` does the same).
"""
from __future__ import annotations

import math

from torch import Tensor

from .sigmas import SigmaSampler, dpm_linspace_spacing, dpm_multistep_spacing, dpm_trailing_spacing


class DPMPP2MSampler(SigmaSampler):
    """DPM-Solver++(2M) on a σ schedule; one UNet call per step, deterministic, one step of history."""

    name = "dpmpp_2m"
    leading_spacing = staticmethod(dpm_multistep_spacing)
    linspace_spacing = staticmethod(dpm_linspace_spacing)
    trailing_spacing = staticmethod(dpm_trailing_spacing)
    # diffusers' DPM-Solver works on the VP latent (`init_noise_sigma` = 1) whatever its spacing; k-diffusion's on x
    ve_start_spacings = ("k-diffusion",)

    def update(self, x: Tensor, i: int, model_output: Tensor, *, eta: float = 0.0, noise: Tensor | None = None,
               prev_x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x_i [B,4,h,w], the guided UNet output at step i and D_{i−1} (`prev_x0`, None: first order) ->
        (x_{i+1}, D_i)."""
        self.check_eta(eta)
        if prev_x0 is not None and i == 0:
            raise ValueError("step 0 has no previous step: pass prev_x0=None")
        sigma, sigma_next = self.sigma(i), self.sigma(i + 1)
        x0 = self.denoised(x, i, model_output)
        if sigma_next == 0.0:
            return x0.clone(), x0  # λ_{i+1} = ∞: the step lands on D_i
        h = math.log(sigma / sigma_next)
        if prev_x0 is None:
            d = x0
        else:
            r = math.log(self.sigma(i - 1) / sigma) / h
            d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * prev_x0.to(x0.dtype)
        return (sigma_next / sigma) * x - math.expm1(-h) * d, x0

"""DDIM (Song et al. 2020, arXiv 2010.02502), exactly as CompVis' `ldm/models/diffusion/ddim.py` runs it.

Notation (paper; `ldm` names in brackets)
-----------------------------------------
    T          number of training timesteps, 1000                              [num_timesteps]
    β_t        noise schedule (noise_schedule.py), SD's: β_t = (linspace(√β_start, √β_end, T)_t)²,
               β_start = 0.00085, β_end = 0.012 ("scaled_linear" in diffusers) [make_beta_schedule("linear")]
    ᾱ_t        ∏_{s≤t} (1 − β_s), t = 0 … T−1                               [alphas_cumprod]
    x_t        the noisy latent at timestep t: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
    ε_θ        the model's noise prediction ε_θ(x_t, t)                        [e_t]
    v          for v-models: v = √ᾱ_t ε − √(1−ᾱ_t) x_0
    x̂_0        predicted clean latent                                           [pred_x0]
    t_prev     the previous timestep actually visited, t − ⌊T/n⌋ for n steps
    ᾱ_prev     ᾱ_{t_prev}, or ᾱ_0 when t_prev < 0 (the last step, t = 1)      [a_prev]
    std_t(η)   η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev), the std of the fresh noise z
               (the paper's σ_t(η); here σ is always the noise level √((1−ᾱ)/ᾱ), sigmas.py)   [sigma_t]

One DDIM update (paper eq. 12):
    x̂_0    = (x_t − √(1−ᾱ_t) ε_θ) / √ᾱ_t
    x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − std_t²) ε_θ + std_t z,   z ~ N(0, I)
η = 0 is deterministic DDIM; η = 1 is the DDPM posterior variance. The notes below the code say which timesteps a run
visits (CompVis adds 1 to each: 981 … 1 for 50 steps) and how precise the scalars are.
"""
from __future__ import annotations

import math
import numbers

import torch

from .noise_schedule import SD, SPACINGS, NoiseSchedule, leading_timesteps, trailing_timesteps

PREDICTION_TYPES = ("epsilon", "v_prediction")
NUM_TRAIN_TIMESTEPS = 1000  # T of every SD1/SD2 schedule (`timesteps: 1000` in v1-inference.yaml / v2-inference.yaml)


def executed_steps(num_inference_steps: int, strength: float = 1.0,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """How many steps a run executes: int(n · strength), checked (every sampler truncates img2img this way).

    diffusers StableDiffusionImg2ImgPipeline.get_timesteps: `init_timestep = int(num_inference_steps * strength)`, the
    last that many steps of the n-step schedule run. What else a sampler's schedule refuses (DDIM: all of n = T) is
    its `timesteps`'; `params.check_schedule` asks the sampler itself, so the input checks and the run agree.
    """
    n, T = num_inference_steps, num_train_timesteps
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"num_inference_steps must be an int, got {n!r}")
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")  # (NaN is not in it either)
    n_run = int(n * strength)
    if n_run == 0:
        raise ValueError(
            f"strength {strength} with {n} steps runs int({n} * {strength}) = 0 steps; "
            f"use strength >= {1.0 / n:.4g} or more steps"
        )
    return n_run


class DDIMSampler:
    """DDIM on a model's noise schedule: a small, tensor-only object, independent of the networks.

    Usage, as every sampler (samplers.Sampler): `ts = ddim.timesteps(50)` fixes the run, then executed step i is
    `x, x0 = ddim.update(x, i, model_output)` with the UNet's output at (x, ts[i]).

    `noise_schedule`: the model's β/ᾱ (SD's unless a diffusers folder says otherwise); `spacing`: which timesteps a
    run visits, "leading" (CompVis') or "trailing"; None takes the schedule's own (`NoiseSchedule.spacing`).
    """

    name = "ddim"
    schedule = "normal"  # DDIM runs its own timesteps; Karras σ are for the σ samplers

    def __init__(self, prediction_type: str = "epsilon", noise_schedule: NoiseSchedule = SD,
                 spacing: str | None = None) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if not isinstance(noise_schedule, NoiseSchedule):
            raise ValueError(f"noise_schedule must be a NoiseSchedule, got {type(noise_schedule).__name__}")
        if noise_schedule.zero_terminal_snr and prediction_type != "v_prediction":
            # at ᾱ_{T−1} = 0, x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t divides by zero (noise_schedule.py)
            raise ValueError("a zero-terminal-SNR schedule needs a v_prediction model: an epsilon model's x̂_0 "
                             "divides by √ᾱ = 0 at the first step")
        spacing = noise_schedule.spacing if spacing is None else spacing
        if spacing not in SPACINGS:
            raise ValueError(f"the ddim sampler runs the {' or '.join(SPACINGS)} spacing, got {spacing!r}")
        self.prediction_type, self.noise_schedule, self.spacing = prediction_type, noise_schedule, spacing
        self.num_train_timesteps = noise_schedule.num_train_timesteps
        self.alphas_cumprod: torch.Tensor = noise_schedule.alphas_cumprod()  # float32 [T]
        # Set by timesteps(); the step size T // n finds the previous timestep.
        self.num_inference_steps: int | None = None
        self.run_timesteps: torch.Tensor | None = None  # the executed timesteps of the current run  [n_run]
        self.sigmas: torch.Tensor | None = None  # their noise levels σ, float64  [n_run + 1]

    # ----------------------------------------------------------------- the run
    def timesteps(self, num_inference_steps: int, strength: float = 1.0) -> torch.Tensor:
        """Descending timesteps actually executed, LongTensor [int(n * strength)]; fixes the run `update` indexes.

        strength < 1 is img2img: the whole n-step schedule is built and only its last int(n * strength) steps run
        (diffusers StableDiffusionImg2ImgPipeline.get_timesteps; CompVis img2img.py `t_enc = int(strength * steps)`);
        `start_latents` noises the input latent to the first of them.
        """
        n, T = num_inference_steps, self.num_train_timesteps
        n_run = executed_steps(n, strength, T)
        # leading: CompVis adds 1 to every DDIM timestep (make_ddim_timesteps), so the last step is t = 1
        full = (leading_timesteps if self.spacing == "leading" else trailing_timesteps)(n, T)  # [n], descending
        run = full[n - n_run:]
        if int(run[0]) >= T:
            # Only n = T gets here: its first timestep is T itself, past the end of ᾱ. CompVis and diffusers build the
            # same schedule and then fail with an IndexError at the first step; we say so up front.
            raise ValueError(
                f"{n} steps start at t={int(run[0])}, outside the trained timesteps 0..{T - 1} (DDIM timesteps are "
                f"offset by +1); use at most {T - 1} steps, or strength < 1"
            )
        self.num_inference_steps = n
        self.run_timesteps = run
        # The run in σ terms (sigmas.py): σ_t = √((1−ᾱ_t)/ᾱ_t) of each executed step, then of the ᾱ_prev the last
        # step lands on (ᾱ_0, see below). Recorded for the StepStates; DDIM's update does not use them (the first
        # step of a zero-terminal-SNR run is at σ = inf).
        a = self.alphas_cumprod[torch.cat([run, torch.zeros(1, dtype=torch.long)])].double()
        self.sigmas = ((1.0 - a) / a).sqrt()
        return run

    def start_latents(self, noise: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The latent entering step 0: x_T = `noise` itself (txt2img), or x0 noised to the first executed timestep."""
        return noise if x0 is None else self.add_noise(x0, noise, self._t(0))

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """What the UNet sees at step i: x_t itself (DDIM's latent is the VP sample the UNet was trained on)."""
        self._t(i)
        return x

    def noise_std(self, i: int, eta: float) -> float:
        """std_t(η) of step i: the std of the fresh noise z it adds (0 for η = 0)."""
        t = self._t(i)
        a, a_prev = self._alpha(t), self._alpha_prev(t)
        return eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)

    # ----------------------------------------------------------------- the update
    def to_eps_x0(self, x: torch.Tensor, timestep: int | torch.Tensor,
                  model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε, x̂_0) from the model output at x_t, for either prediction type. All tensors [B, C, h, w]."""
        a = self._alpha(self._check_t(timestep))
        sqrt_a, sqrt_1ma = math.sqrt(a), math.sqrt(1.0 - a)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - sqrt_1ma * eps) / sqrt_a
        else:  # v_prediction (Salimans & Ho 2022; ldm DDPM.predict_start_from_z_and_v / predict_eps_from_z_and_v)
            x0 = sqrt_a * x - sqrt_1ma * model_output
            eps = sqrt_a * model_output + sqrt_1ma * x
        return eps, x0

    def update(self, x: torch.Tensor, i: int, model_output: torch.Tensor, *, eta: float = 0.0,
               noise: torch.Tensor | None = None, prev_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i of the run, x_t -> x_prev (paper eq. 12). Returns (x_prev, x̂_0), both shaped like x [B, C, h, w].

        `noise`: the fresh z, needed when std_t(η) > 0 (the caller draws it: `sampling.denoise` draws every step's
        from the run's CPU generator). DDIM is single-step: `prev_x0` (a multistep history) is unused.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t = self._t(i)
        a_prev, std = self._alpha_prev(t), self.noise_std(i, eta)
        if std > 0 and noise is None:
            raise ValueError(f"step {i} adds fresh noise (η = {eta}): pass noise=")
        if noise is not None and noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(x.shape)}")
        eps, x0 = self.to_eps_x0(x, t, model_output)
        # For η ≤ 1, 1 − ᾱ_prev − std² ≥ (1−ᾱ_prev)² ᾱ_t / (ᾱ_prev (1−ᾱ_t)) ≥ 0 (= 0 at ᾱ_t = 0, zero terminal SNR,
        # where rounding may leave −1e-17); a larger η can make it negative.
        dir_var = 1.0 - a_prev - std**2
        if dir_var < -1e-12:
            raise ValueError(f"eta={eta} is too large at t={t}: 1 - alpha_prev - std^2 = {dir_var:.3g} < 0")
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(dir_var, 0.0)) * eps
        if std > 0:
            x_prev = x_prev + std * noise.to(device=x.device, dtype=x.dtype)
        return x_prev, x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0): √ᾱ_t x_0 + √(1−ᾱ_t) ε.

        `timestep` is an int or a LongTensor [B] (one per sample); x0, noise [B, C, h, w].
        """
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            t = timestep.to("cpu", torch.long).flatten()
            if t.numel() != x0.shape[0] or not bool(((t >= 0) & (t < self.num_train_timesteps)).all()):
                raise ValueError(f"timesteps {t.tolist()} must be one per sample, in [0, {self.num_train_timesteps})")
            a = self.alphas_cumprod[t].double()  # [B]
            shape = (-1,) + (1,) * (x0.dim() - 1)
            sqrt_a = a.sqrt().view(shape).to(device=x0.device, dtype=x0.dtype)
            sqrt_1ma = (1.0 - a).sqrt().view(shape).to(device=x0.device, dtype=x0.dtype)
            return sqrt_a * x0 + sqrt_1ma * noise
        a = self._alpha(self._check_t(timestep))
        return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise

    # ----------------------------------------------------------------- lookups
    def _t(self, i: int) -> int:
        """The timestep of executed step i."""
        if self.run_timesteps is None:
            raise ValueError("call timesteps(num_inference_steps) first: it fixes the run the steps index into")
        if not 0 <= i < len(self.run_timesteps):
            raise ValueError(f"step index {i} is outside the run's {len(self.run_timesteps)} steps")
        return int(self.run_timesteps[i])

    def _alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t])

    def _alpha_prev(self, t: int) -> float:
        t_prev = t - self.num_train_timesteps // self.num_inference_steps
        # CompVis prepends alphacums[0] to ddim_alphas_prev: the last step lands on ᾱ_0, not on 1.0.
        return self._alpha(t_prev) if t_prev >= 0 else self._alpha(0)

    def _check_t(self, timestep: int | torch.Tensor) -> int:
        t = int(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.num_train_timesteps}), got {t}")
        return t

    def __repr__(self) -> str:
        return (
            f"DDIMSampler(prediction_type={self.prediction_type!r}, num_train_timesteps={self.num_train_timesteps}, "
            f"num_inference_steps={self.num_inference_steps})"
        )


# Timesteps. CompVis `make_ddim_timesteps` takes every ⌊T/n⌋-th step and adds one ("to get the final alpha values
# right"): 50 steps visit 981, 961, …, 21, 1. The ᾱ_prev of the last step is ᾱ_0, not 1.0 (`make_ddim_sampling_parameters`
# prepends `alphacums[0]`), so the final x̂ is left at the t = 0 noise level, as the released SD models were sampled.
# This equals diffusers' DDIMScheduler with timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False.
# A zero-terminal-SNR schedule runs the trailing spacing instead (noise_schedule.py: 999, 979, …, 19 for 50 steps), as
# diffusers' DDIMScheduler with timestep_spacing="trailing": t_prev = t − ⌊T/n⌋ again, which is the next visited
# timestep when n divides T and may be one off otherwise (3 steps: 999, 666, 332, and 666 steps to ᾱ_333); we keep
# diffusers' rule so that the two agree step for step.
# We run exactly n steps (diffusers' `arange(n) * (T // n) + 1`); CompVis' `range(0, T, T // n)` visits one more step
# when n does not divide T (7 steps → 8), which is the only place the two differ, and only for such n. n = T would
# start at t = T, past the end of ᾱ (both references fail there with an IndexError), so the full 1000-step schedule is
# refused; its img2img truncations (strength < 1) are fine.
#
# Precision (a decision, measured in tests/test_ddim.py). CompVis builds β and ᾱ in float64 and stores ᾱ as a float32
# buffer (`register_schedule`: `to_torch(alphas_cumprod)`, the `alphas_cumprod` key found in checkpoints). We do the
# same: `alphas_cumprod` is float32, rounded from a float64 cumprod. diffusers takes the cumprod in float32, which
# drifts by up to ~1e-6 relative from the float64 product. The per-step scalars (√ᾱ, std_t, …) are then computed from
# those float32 ᾱ values in float64 Python arithmetic and only applied to the tensors in the tensor's dtype. Agreement
# with diffusers' `step()` is ~1e-6 relative (max |diff| / max |ref|); see the tests for the exact bound.

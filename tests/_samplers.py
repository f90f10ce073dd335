"""diffusers' schedulers for the samplers' parity tests, configured as diffusers users run them (test-only).

The base is SD1.5's shipped `scheduler/scheduler_config.json` (a PNDMScheduler config), with `timestep_spacing=
"leading"` stated explicitly, as SDXL's shipped config states it. (SD1.5's file has no `timestep_spacing` key, and
diffusers' `from_config` then gives the new class its own default, "linspace"; "leading" + steps_offset=1 is also
CompVis' DDIM spacing, which our default DDIM runs.)
"""
from __future__ import annotations

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

SD15_SHIPPED = dict(  # stable-diffusion-v1-5 scheduler/scheduler_config.json
    _class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
    clip_sample=False,
)
LEADING = dict(SD15_SHIPPED, timestep_spacing="leading")

SIGMA_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")
COMBOS = [(s, sch) for s in SIGMA_SAMPLERS for sch in ("normal", "karras")]


class KarrasEulerAncestral(EulerAncestralDiscreteScheduler):
    """diffusers 0.42 has no Karras σ for Euler ancestral (A1111 and ComfyUI pair the two). This one takes the σ and
    timesteps EulerDiscreteScheduler(use_karras_sigmas=True) derives from the same config, and leaves the ancestral
    step exactly as diffusers wrote it."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        karras = EulerDiscreteScheduler.from_config(self.config, use_karras_sigmas=True)
        karras.set_timesteps(num_inference_steps, device)
        self.timesteps, self.sigmas = karras.timesteps, karras.sigmas


def diffusers_scheduler(name: str, schedule: str = "normal", prediction_type: str = "epsilon", config: dict = LEADING):
    """The diffusers scheduler of our sampler `name` ("euler" | "euler_a" | "dpmpp_2m") with `schedule`."""
    karras = schedule == "karras"
    kw = dict(config, prediction_type=prediction_type)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(kw, use_karras_sigmas=karras)
    if name == "euler_a":
        return (KarrasEulerAncestral if karras else EulerAncestralDiscreteScheduler).from_config(kw)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(kw, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=karras)
    raise ValueError(name)


def vp_scale(sigma: float) -> float:
    """α = 1/√(σ²+1): DPMSolverMultistepScheduler keeps the VP latent α·x where we keep the σ-space x."""
    return 1.0 / (sigma * sigma + 1.0) ** 0.5


def inject_ancestral_noise(monkeypatch) -> list[torch.Tensor]:
    """Make diffusers' Euler ancestral step take each z from the returned list, in order, instead of drawing it
    (`randn_tensor` in its module replaced); a test fills the list with the noise our run draws, and an empty list
    afterwards shows diffusers used all of it."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as mod

    given: list[torch.Tensor] = []

    def injected(shape, generator=None, device=None, dtype=None, layout=None):
        z = given.pop(0)
        assert tuple(z.shape) == tuple(shape)
        return z.to(device=device, dtype=dtype)

    monkeypatch.setattr(mod, "randn_tensor", injected)
    return given

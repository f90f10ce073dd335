"""The GBSD denoise loop: DDIM steps grouped into stages, each stage with its own text conditioning.

GBSD (Generative Bokeh with Stage Diffusion, arXiv 2306.08251) splits the n executed DDIM steps in two:

    steps 0 … n_layout-1     "layout" stage   context = E(global)                      (objects placed, scene laid out)
    steps n_layout … n-1     "focus"  stage   context = α·E(global) + (1−α)·E(local)   (the local object drawn sharp)

with n_layout = round(σ·n). Nothing else changes: same noise, same scheduler, same unconditional embedding for
classifier-free guidance in both stages. The interpolation is on the 77×d CLIP token embeddings, never on noise
predictions.

The schedule is plain data (a list of `Stage`), so other schedules (three stages, ramps) are a list away. A stage
whose conditioning has K times the batch of the incoming latents *branches* them: each latent is repeated K times.
That is how sweeps share the layout stage: one layout stage at batch 1, then a focus stage at batch K (one row per α
or per local prompt). The DDIM noise for η > 0 is drawn at the un-branched batch size and repeated, so every branch
sees exactly the noise its own independent run would have seen. It is drawn for all steps when the run starts (the
same draws, in step order, as one per step) and moved to the device in one copy, not one blocking copy per step.

`denoise` is a generator: it yields a `StepState` after every step and leaves progress bars, previews, early stops
and tracing to the caller.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .ddim import DDIMScheduler

# A noise predictor: (x_t [B,4,h,w], t [B], context [B,77,D]) -> model output [B,4,h,w]. Usually the UNet.
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


class Stepper(Protocol):
    """Runs one classifier-free-guided DDIM step, and owns the step's settings: the guidance scale and η.

    `CFGStep` below is the plain one; gbsd_core.fast makes compiled / CUDA-graphed ones with the same members.
    """

    guidance_scale: float | None  # None: no classifier-free guidance (one UNet row per latent)
    eta: float  # DDIM η: 0 is deterministic; > 0 makes `denoise` draw fresh noise for every step

    def set_context(self, context: Tensor) -> None:
        """The conditioning for the coming steps, [2B,77,D] = [uncond; cond] with CFG, else [B,77,D]. Called once
        per stage, before its first step."""

    def __call__(self, latents: Tensor, t: int, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """x_t [B,4,h,w] at timestep t -> (x_prev, predicted x0); `noise` is the η-noise (None when η = 0)."""


class CFGStep:
    """The readable reference step: one batched UNet call on [x; x] with [uncond; cond], guidance, `scheduler.step`.

    guidance_scale None (or 1.0, which is the same image at half the cost) runs the model on the conditional rows only.
    """

    def __init__(self, model: Denoiser, scheduler: DDIMScheduler, guidance_scale: float | None,
                 eta: float = 0.0) -> None:
        self.model, self.scheduler, self.eta = model, scheduler, eta
        self.guidance_scale = None if guidance_scale is None or guidance_scale == 1.0 else guidance_scale
        self.context: Tensor | None = None

    def set_context(self, context: Tensor) -> None:
        self.context = context

    def __call__(self, latents: Tensor, t: int, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        use_cfg = self.guidance_scale is not None
        x_in = torch.cat([latents, latents]) if use_cfg else latents
        t_in = torch.full((x_in.shape[0],), t, device=latents.device, dtype=torch.long)
        out = self.model(x_in, t_in, self.context)
        if use_cfg:
            out_uncond, out_cond = out.chunk(2)
            # Classifier-free guidance (Ho & Salimans 2022): move from the unconditional towards the conditional output.
            out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
        return self.scheduler.step(out, t, latents, eta=self.eta, noise=noise)


class Probe(Protocol):
    """Watches the model calls of one run without changing them: `wrap` returns a denoiser that calls `model` and
    records what it needs (gbsd_core.bokeh.attnmaps.CrossAttentionCollector reads the cross-attention this way).
    `cfg`: the model is called on [uncond; cond] batches."""

    def wrap(self, model: Denoiser, timesteps: Tensor, stages: Sequence[Stage], cfg: bool) -> Denoiser: ...


@dataclass(frozen=True)
class Stage:
    """A run of consecutive executed steps that share one conditioning.

    `steps` indexes the executed timesteps (0 = the first, noisiest step). `cond` is [K·B, 77, D] where B is the
    batch of latents entering the stage; K > 1 branches the latents (see module docstring).
    """

    name: str
    steps: range
    cond: Tensor


@dataclass(frozen=True)
class StepState:
    """What the loop yields after each step."""

    step: int  # executed-step index, 0 … n-1
    timestep: int  # DDIM timestep t of this step (e.g. 981 … 1 for 50 steps)
    stage: str  # name of the stage the step belongs to
    latents: Tensor  # x_{t_prev} after the step, [B,4,h,w]
    pred_x0: Tensor  # the model's estimate x̂_0 at this step, [B,4,h,w]


def layout_steps(n: int, layout: float) -> int:
    """n_layout = round(σ·n), rounding halves up (σ=0.8, n=50 → 40; σ=0.5, n=5 → 3).

    Python's round() rounds halves to even (round(2.5) == 2), which would make the split jump around as n grows;
    floor(x + 0.5) is monotonic in both σ and n. A tiny epsilon absorbs float error such as 0.7·10 = 7.000000000000001.
    """
    if not 0.0 <= layout <= 1.0:
        raise ValueError(f"layout fraction σ must be in [0, 1], got {layout}")
    return min(n, max(0, math.floor(layout * n + 0.5 + 1e-9)))


def focus_conditioning(global_emb: Tensor, local_emb: Tensor, alpha: float | Tensor) -> Tensor:
    """α·E(global) + (1−α)·E(local) on token embeddings [B,77,D]; α may be a [K] tensor (broadcast over rows)."""
    alpha = torch.as_tensor(alpha, dtype=global_emb.dtype, device=global_emb.device).reshape(-1, 1, 1)
    return alpha * global_emb + (1.0 - alpha) * local_emb


def gbsd_stages(global_emb: Tensor, focus_emb: Tensor, n: int, layout: float) -> list[Stage]:
    """The paper's two-stage schedule: global prompt for round(σ·n) steps, the focus conditioning after.

    `focus_emb` is already interpolated (`focus_conditioning`); it may have K rows per global row to branch a sweep.
    Empty stages are left out (σ=1 is plain SD on the global prompt, σ=0 plain SD on the focus conditioning).
    """
    n_layout = layout_steps(n, layout)
    stages = []
    if n_layout > 0:
        stages.append(Stage("layout", range(0, n_layout), global_emb))
    if n_layout < n:
        stages.append(Stage("focus", range(n_layout, n), focus_emb))
    return stages


def check_stages(stages: Sequence[Stage], n: int) -> None:
    """A schedule must cover executed steps 0 … n-1 once each, in order."""
    expected = 0
    for stage in stages:
        if stage.steps.step != 1 or stage.steps.start != expected or len(stage.steps) == 0:
            raise ValueError(f"stage {stage.name!r} covers {stage.steps}, expected a non-empty range starting at {expected}")
        expected = stage.steps.stop
    if expected != n:
        raise ValueError(f"stages cover {expected} steps, but the schedule has {n}")


def denoise(
    stepper: Stepper,
    latents: Tensor,
    timesteps: Tensor,
    stages: Sequence[Stage],
    uncond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[StepState]:
    """Run `stepper` over `timesteps` with the conditioning each stage gives, yielding every step's state.

    latents: x_T (or the noised image for img2img), [B,4,h,w]. uncond: the negative-prompt embedding [1 or B,77,D],
    the same in every stage; needed when the stepper guides (`stepper.guidance_scale` is not None). generator: the
    source of the η-noise when `stepper.eta` > 0 (CPU by default, so a seed gives the same image on any device).
    """
    check_stages(stages, len(timesteps))
    use_cfg = stepper.guidance_scale is not None
    if use_cfg and uncond is None:
        raise ValueError("the stepper guides (classifier-free guidance) but no unconditional embedding was given")
    base_batch = latents.shape[0]  # batch before any branching: the η-noise is drawn at this size
    noises = _ddim_noises(latents, len(timesteps), generator) if stepper.eta > 0 else None
    for stage in stages:
        # Branch when the stage brings K conditionings per incoming latent (sweeps): repeat each latent K times.
        if stage.cond.shape[0] != latents.shape[0]:
            k, rem = divmod(stage.cond.shape[0], latents.shape[0])
            if rem or k < 1:
                raise ValueError(
                    f"stage {stage.name!r} has {stage.cond.shape[0]} conditionings for {latents.shape[0]} latents"
                )
            latents = latents.repeat_interleave(k, dim=0)
        batch = latents.shape[0]
        # The context is built once per stage, never per step: [uncond; cond] for one batched CFG evaluation.
        cond = stage.cond.to(latents.dtype)
        stepper.set_context(torch.cat([uncond.to(latents.dtype).expand(batch, -1, -1), cond]) if use_cfg else cond)
        for i in stage.steps:
            t = int(timesteps[i])
            noise = None if noises is None else _branch_rows(noises[i], latents.shape[0] // base_batch)
            latents, pred_x0 = stepper(latents, t, noise)
            yield StepState(step=i, timestep=t, stage=stage.name, latents=latents, pred_x0=pred_x0)


def _branch_rows(noise: Tensor, k: int) -> Tensor:
    """Each row of the un-branched noise repeated for its k branches (k = 1: the row itself, no copy)."""
    return noise if k == 1 else noise.repeat_interleave(k, dim=0)


def _ddim_noises(latents: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Fresh N(0, I) for each of the n steps of a stochastic (η > 0) DDIM run, [n, B, 4, h, w], at the un-branched
    batch B of `latents` (each step repeats its row per branch).

    Drawn on the generator's device (CPU by default, so a seed gives the same image on any device), one step after
    the other, exactly the draws one per step would make, then moved to the latents' device in one copy: from pinned
    memory and non-blocking on CUDA, where a per-step pageable copy would make the host wait for the GPU every step.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    pin = device.type == "cpu" and latents.device.type == "cuda"
    noises = torch.empty((n, *latents.shape), device=device, dtype=torch.float32, pin_memory=pin)
    for i in range(n):
        torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32, out=noises[i])
    return noises.to(latents.device, latents.dtype, non_blocking=True)

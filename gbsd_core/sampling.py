"""The GBSD denoise loop: sampler steps grouped into stages, each stage with its own text conditioning.

GBSD (Generative Bokeh with Stage Diffusion, arXiv 2306.08251) splits the n executed steps in two:

    steps 0 … n_layout-1     "layout" stage   context = E(global)                      (objects placed, scene laid out)
    steps n_layout … n-1     "focus"  stage   context = α·E(global) + (1−α)·E(local)   (the local object drawn sharp)

with n_layout = round(layout·n), `layout` the layout fraction. Nothing else changes: same noise, same sampler, same unconditional embedding for
classifier-free guidance in both stages. The interpolation is on the 77×d CLIP token embeddings, never on noise
predictions. SDXL's UNet also takes a vector y = [pooled text embedding ; size embeddings] (`Conditioning`): the
focus stage mixes the pooled embedding the same way and keeps the size embeddings as they are. The switch is at an
executed-step index, whatever the sampler (samplers.py: DDIM, Euler, Euler a, DPM++ 2M); its noise level differs by
σ schedule (with Karras σ, 80 % of the steps is not 80 % of the way down in σ), so each `StepState` of a σ sampler
carries the step's σ too.

The schedule is plain data (a list of `Stage`), so other schedules (three stages, ramps) are a list away. A stage
whose conditioning has K times the batch of the incoming latents *branches* them: each latent is repeated K times.
That is how sweeps share the layout stage: one layout stage at batch 1, then a focus stage at batch K (one row per α
or per local prompt). Fresh noise (DDIM's for η > 0, Euler ancestral's at every step) is drawn from the run's CPU
generator at the un-branched batch size and repeated, so every branch sees exactly the noise its own independent run
would have seen. It is drawn for all the steps that need it when the run starts (the same draws, in step order, as one
per step) and moved to the device in one copy, not one blocking copy per step. A multistep sampler's history (DPM++
2M: the previous x̂_0) is branched with the latents, and kept across the stage switch unless `restart_history=True`
makes each stage start at first order.

`denoise` is a generator: it yields a `StepState` after every step and leaves progress bars, previews, early stops
and tracing to the caller.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .samplers import Sampler

# A noise predictor: (x_t [B,4,h,w], t [B], context [B,77,D]) -> model output [B,4,h,w]; SDXL's also takes the
# vector y [B,adm] as a fourth argument. Usually the UNet.
Denoiser = Callable[..., Tensor]


# ---------------------------------------------------------------------------- GBSD: a schedule of conditionings


@dataclass(frozen=True)
class Stage:
    """A run of consecutive executed steps that share one conditioning.

    `steps` indexes the executed timesteps (0 = the first, noisiest step). `cond` is [K·B, 77, D] where B is the
    batch of latents entering the stage (for SDXL a `Conditioning` of K·B rows); K > 1 branches the latents (see
    module docstring).
    """

    name: str
    steps: range
    cond: Cond


def layout_steps(n: int, layout: float) -> int:
    """n_layout = round(layout·n) for the layout fraction `layout`, rounding halves up (0.8 of 50 → 40; 0.5 of 5 → 3),
    and for 0 < layout < 1 at least one step in each stage (0.8 of 2 → 1: few-step models; README "Few-step").

    Python's round() rounds halves to even (round(2.5) == 2), which would make the split jump around as n grows;
    floor(x + 0.5) is monotonic in layout and n. A tiny epsilon absorbs float error such as 0.7·10 = 7.000000000000001.
    A fraction strictly between 0 and 1 asks for two stages, which one step cannot hold: ValueError.
    """
    if not 0.0 <= layout <= 1.0:
        raise ValueError(f"the layout fraction must be in [0, 1], got {layout}")
    n_layout = min(n, max(0, math.floor(layout * n + 0.5 + 1e-9)))
    if 0.0 < layout < 1.0:
        if n < 2:
            raise ValueError(f"GBSD at {n} step: a layout stage and a focus stage need at least 2 executed steps "
                             "(or a layout fraction of 0 or 1, one stage)")
        n_layout = min(n - 1, max(1, n_layout))  # neither stage empty
    return n_layout


def focus_conditioning(global_emb: Cond, local_emb: Cond, alpha: float | Tensor) -> Cond:
    """α·E(global) + (1−α)·E(local) on token embeddings [B,77,D]; α may be a [K] tensor (broadcast over rows).

    For SDXL (`Conditioning`) the pooled embeddings [B,P] are mixed the same way, and the micro-conditioning (the
    image size and crop) stays the global prompt's: it describes the image, not the prompt.
    """
    if not isinstance(global_emb, Conditioning):
        return _mix(global_emb, local_emb, alpha)
    local = as_conditioning(local_emb)
    context = _mix(global_emb.context, local.context, alpha)
    pooled = None if global_emb.pooled is None else _mix(global_emb.pooled, local.pooled, alpha)
    micro = None if global_emb.micro is None else global_emb.micro.expand(context.shape[0], -1)
    return Conditioning(context, pooled, micro)


def _mix(global_emb: Tensor, local_emb: Tensor, alpha: float | Tensor) -> Tensor:
    """α·global + (1−α)·local with α broadcast over rows ([K] -> [K,1,...])."""
    alpha = torch.as_tensor(alpha, dtype=global_emb.dtype, device=global_emb.device)
    alpha = alpha.reshape(-1, *[1] * (global_emb.ndim - 1))
    return alpha * global_emb + (1.0 - alpha) * local_emb


def gbsd_stages(global_emb: Cond, focus_emb: Cond, n: int, layout: float) -> list[Stage]:
    """The paper's two-stage schedule: global prompt for round(layout·n) steps, the focus conditioning after.

    `focus_emb` is already interpolated (`focus_conditioning`); it may have K rows per global row to branch a sweep.
    Empty stages are left out (a layout fraction of 1 is plain SD on the global prompt, 0 plain SD on the focus
    conditioning).
    """
    n_layout = layout_steps(n, layout)
    stages = []
    if n_layout > 0:
        stages.append(Stage("layout", range(0, n_layout), global_emb))
    if n_layout < n:
        stages.append(Stage("focus", range(n_layout, n), focus_emb))
    return stages



# ---------------------------------------------------------------------------------------------- one step


class Stepper(Protocol):
    """Runs one classifier-free-guided step, and owns the step's settings: the guidance scale and η. The update rule
    is its `sampler`'s (a samplers.Sampler: DDIM or a σ sampler), keyed by the executed-step index.

    `CFGStep` below is the plain one; gbsd_core.fast makes compiled / CUDA-graphed ones with the same members.
    """

    guidance_scale: float | None  # None: no classifier-free guidance (one UNet row per latent)
    eta: float  # DDIM η: 0 is deterministic; > 0 makes `denoise` draw fresh noise for every step (ddim only)
    sampler: Sampler  # the update rule, whose run (`timesteps()`) the steps index into

    def set_context(self, context: Tensor, vector: Tensor | None = None) -> None:
        """The conditioning for the coming steps, [2B,77,D] = [uncond; cond] with CFG, else [B,77,D], and for SDXL
        the vector y in the same row order ([2B or B, adm]; `denoise` passes it only when there is one). Called once
        per stage, before its first step."""

    def step(self, latents: Tensor, i: int, noise: Tensor | None,
             prev_x0: Tensor | None) -> tuple[Tensor, Tensor]:
        """Executed step i: latents [B,4,h,w] -> (next latents, predicted x0). `noise`: the fresh noise the step adds
        (None when `sampler.noise_std(i, eta)` is 0); `prev_x0`: step i−1's x̂_0 (None at a first-order step)."""


def guidance(cfg: float | None) -> float | None:
    """The guidance scale a run uses: `cfg` above 1, else None, no guidance (the conditional branch alone, at half
    the cost). diffusers' rule (`do_classifier_free_guidance = guidance_scale > 1`), which the turbo models' cards
    rely on (`guidance_scale=0.0`); at 1 the formula below gives the conditional output anyway."""
    return None if cfg is None or cfg <= 1.0 else cfg


class CFGStep:
    """The readable reference step: one batched UNet call on [x; x] with [uncond; cond], guidance, then the sampler's
    `update`. Guidance lives here; everything about the noise schedule lives in the sampler.

    guidance_scale None or ≤ 1 (`guidance`) runs the model on the conditional rows only.
    """

    def __init__(self, model: Denoiser, sampler: Sampler, guidance_scale: float | None,
                 eta: float = 0.0) -> None:
        self.model, self.sampler, self.eta = model, sampler, eta
        self.guidance_scale = guidance(guidance_scale)
        self.context: Tensor | None = None
        self.vector: Tensor | None = None

    def set_context(self, context: Tensor, vector: Tensor | None = None) -> None:
        self.context, self.vector = context, vector

    def step(self, latents: Tensor, i: int, noise: Tensor | None,
             prev_x0: Tensor | None) -> tuple[Tensor, Tensor]:
        use_cfg = self.guidance_scale is not None
        sampler = self.sampler
        x = sampler.model_input(latents, i)  # DDIM: x_t itself; σ samplers: c_in·x
        x_in = torch.cat([x, x]) if use_cfg else x
        ts = sampler.run_timesteps  # long; float64 where the σ schedule puts the UNet between training timesteps
        t_in = torch.full((x_in.shape[0],), ts[i].item(), device=latents.device, dtype=ts.dtype)
        if self.vector is None:
            out = self.model(x_in, t_in, self.context)
        else:  # SDXL: the UNet's y as well
            out = self.model(x_in, t_in, self.context, self.vector)
        if use_cfg:
            out_uncond, out_cond = out.chunk(2)
            # Classifier-free guidance (Ho & Salimans 2022): move from the unconditional towards the conditional output.
            out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
        return sampler.update(latents, i, out, eta=self.eta, noise=noise, prev_x0=prev_x0)



# ---------------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class StepState:
    """What the loop yields after each step."""

    step: int  # executed-step index, 0 … n-1
    timestep: int | float  # the UNet's timestep t at this step (DDIM 50 steps: 981 … 1; fractional under Karras σ)
    stage: str  # name of the stage the step belongs to
    latents: Tensor  # the sampler's latent after the step, [B,4,h,w]: x_t for DDIM, x = x_0 + σε for σ samplers
    pred_x0: Tensor  # the model's estimate x̂_0 at this step, [B,4,h,w]
    sigma: float | None = None  # noise level σ = √((1−ᾱ)/ᾱ) entering this step, for σ samplers; None for DDIM (steps by t)


def denoise(
    stepper: Stepper,
    latents: Tensor,
    timesteps: Tensor,
    stages: Sequence[Stage],
    uncond: Cond | None = None,
    *,
    generator: torch.Generator | None = None,
    restart_history: bool = False,
    switch: StageSwitch | None = None,
) -> Iterator[StepState]:
    """Run `stepper` over `timesteps` with the conditioning each stage gives, yielding every step's state.

    latents: the sampler's start latents (`sampler.start_latents`: x_T, scaled for a σ sampler, or the noised image
    for img2img), [B,4,h,w]. timesteps: what `stepper.sampler.timesteps(n, strength)` returned (the run the steps
    index into). uncond: the negative-prompt embedding [1 or B,77,D] (SDXL: a `Conditioning` of 1 or B rows), the
    same in every stage; needed when the stepper guides (`stepper.guidance_scale` is not None). generator: the source
    of the fresh noise a step may add (DDIM with η > 0, Euler ancestral; CPU by default, so a seed gives the same
    image on any device). restart_history: a multistep sampler (DPM++ 2M) forgets its history at each stage's first
    step and runs it first order; by default the history carries across the stage switch, as diffusers' and A1111's
    samplers keep theirs. switch: told when each stage starts (`StageSwitch`), e.g. to merge a stage's LoRAs.
    """
    _check_run(stepper, timesteps, stages, uncond)
    sampler = stepper.sampler
    noise_of = _pre_drawn_noise(sampler, stepper.eta, latents, generator)  # step i -> its z, or None
    pred_x0: Tensor | None = None  # the previous step's x̂_0: a multistep sampler's history
    for stage in stages:
        latents, pred_x0 = _branch(latents, pred_x0, stage)  # a sweep: K focus rows per incoming latent
        if restart_history:
            pred_x0 = None
        context = _guided_context(stage.cond, uncond if stepper.guidance_scale is not None else None, latents)
        if switch is not None:
            switch.enter(stage)  # the model's own switch (per-stage LoRAs), before the stepper reads its weights
        stepper.set_context(context.context, context.vector)  # the GBSD switch: this stage's conditioning from now on
        for i in stage.steps:
            latents, pred_x0 = stepper.step(latents, i, noise_of(i, latents.shape[0]), pred_x0)
            yield StepState(step=i, timestep=timesteps[i].item(), stage=stage.name, latents=latents, pred_x0=pred_x0,
                            sigma=None if sampler.name == "ddim" else float(sampler.sigmas[i]))


def _check_run(stepper: Stepper, timesteps: Tensor, stages: Sequence[Stage], uncond: Cond | None) -> None:
    """The stages cover the run the stepper's sampler was given, and a guiding stepper has its negative prompt."""
    check_stages(stages, len(timesteps))
    run = stepper.sampler.run_timesteps
    if run is None or run.shape != timesteps.shape or not torch.equal(run, timesteps.to(run.device, run.dtype)):
        raise ValueError("timesteps are not the run of the stepper's sampler: pass what "
                         "stepper.sampler.timesteps(n, strength) returned")
    if stepper.guidance_scale is not None and uncond is None:
        raise ValueError("the stepper guides (classifier-free guidance) but no unconditional embedding was given")


def check_stages(stages: Sequence[Stage], n: int) -> None:
    """A schedule must cover executed steps 0 … n-1 once each, in order."""
    expected = 0
    for stage in stages:
        if stage.steps.step != 1 or stage.steps.start != expected or len(stage.steps) == 0:
            raise ValueError(f"stage {stage.name!r} covers {stage.steps}, expected a non-empty range starting at {expected}")
        expected = stage.steps.stop
    if expected != n:
        raise ValueError(f"stages cover {expected} steps, but the schedule has {n}")


def _branch(latents: Tensor, pred_x0: Tensor | None, stage: Stage) -> tuple[Tensor, Tensor | None]:
    """When the stage brings K conditionings per incoming latent (a sweep), each latent repeated K times, and the
    history with it; else both as they are."""
    rows, batch = as_conditioning(stage.cond).context.shape[0], latents.shape[0]
    if rows == batch:
        return latents, pred_x0
    k, rem = divmod(rows, batch)
    if rem or k < 1:
        raise ValueError(f"stage {stage.name!r} has {rows} conditionings for {batch} latents")
    return latents.repeat_interleave(k, dim=0), None if pred_x0 is None else pred_x0.repeat_interleave(k, dim=0)


def _guided_context(cond: Cond, uncond: Cond | None, latents: Tensor) -> Conditioning:
    """The stage's conditioning in the latents' dtype, with classifier-free guidance (`uncond` given) the negative
    prompt's rows first: [uncond; cond], so one batched UNet call serves both. Built once per stage, never per step."""
    cond = as_conditioning(cond).map(lambda t: t.to(latents.dtype))
    if uncond is None:
        return cond
    batch = latents.shape[0]
    negative = as_conditioning(uncond).map(lambda t: t.to(latents.dtype).expand(batch, *t.shape[1:]))
    return cat_conditioning([negative, cond])


def _pre_drawn_noise(sampler: Sampler, eta: float, latents: Tensor,
                     generator: torch.Generator | None) -> Callable[[int, int], Tensor | None]:
    """`noise_of(i, batch)`: the fresh noise step i adds (None if it adds none), at the (branched) batch it runs at.

    Every noisy step's noise is drawn when the run starts, at the un-branched batch, and each branch gets its row's:
    every branch sees exactly the noise its own independent run would have seen."""
    base_batch = latents.shape[0]
    noisy = [i for i in range(len(sampler.run_timesteps)) if sampler.noise_std(i, eta) > 0]
    noises = _run_noises(latents, len(noisy), generator) if noisy else None
    index = {i: j for j, i in enumerate(noisy)}

    def noise_of(i: int, batch: int) -> Tensor | None:
        return None if i not in index else _branch_rows(noises[index[i]], batch // base_batch)

    return noise_of


def _branch_rows(noise: Tensor, k: int) -> Tensor:
    """Each row of the un-branched noise repeated for its k branches (k = 1: the row itself, no copy)."""
    return noise if k == 1 else noise.repeat_interleave(k, dim=0)


def _run_noises(latents: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Fresh N(0, I) for the n steps of a run that add noise (DDIM with η > 0, Euler ancestral), [n, B, 4, h, w], at
    the un-branched batch B of `latents` (each step repeats its row per branch).

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



# ------------------------------------------------------- SDXL's conditioning, rack focus, the wings' seams


class Conditioning(NamedTuple):
    """What the UNet is conditioned on, per row. SD1/SD2: the text context alone (a plain tensor means the same).
    SDXL adds the two parts of its vector y: `pooled`, which GBSD mixes like the context, and `micro`, the size / crop
    (refiner: aesthetic score) embeddings, which stay fixed."""

    context: Tensor  # [B,77,D] token embeddings, for cross-attention
    pooled: Tensor | None = None  # [B,P] SDXL: OpenCLIP bigG's pooled text embedding
    micro: Tensor | None = None  # [B,256·n] SDXL: micro-conditioning embeddings (sdxl_conditioner.micro_embedding)

    @property
    def vector(self) -> Tensor | None:
        """SDXL's y = [pooled ; micro] (sgm's "vector"), None for SD1/SD2."""
        if self.pooled is None:
            return None
        return self.pooled if self.micro is None else torch.cat([self.pooled, self.micro], dim=-1)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """`fn` applied to each tensor present (a cast, a move, repeated rows)."""
        return Conditioning(*(None if t is None else fn(t) for t in self))


Cond = Tensor | Conditioning  # a plain tensor is a context alone (SD1/SD2)


def as_conditioning(cond: Cond) -> Conditioning:
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


def cat_conditioning(conds: Sequence[Conditioning]) -> Conditioning:
    """The rows of several conditionings, stacked (torch.cat along the batch) field by field."""
    return Conditioning(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*conds)))


def blend_embeddings(from_emb: Cond, to_emb: Cond, mix: float | Tensor) -> Cond:
    """(1−m)·E(from) + m·E(to): a local prompt part way between two (rack focus); m may be a [K] tensor.

    The same weighted sum as `focus_conditioning`, with E(to) in the weighted place: m = 0 and m = 1 give E(from) and
    E(to) exactly, and being element-wise a row comes out the same bits whether it is computed alone (generate) or in
    a batch (sweep). For SDXL the pooled embeddings blend the same way and the micro-conditioning (the image's size,
    the same in both) stays as it is.
    """
    return focus_conditioning(to_emb, from_emb, mix)


class Probe(Protocol):
    """Watches the model calls of one run without changing them: `wrap` returns a denoiser that calls `model` and
    records what it needs (gbsd_core.bokeh.attnmaps.CrossAttentionCollector reads the cross-attention this way).
    `cfg`: the model is called on [uncond; cond] batches."""

    def wrap(self, model: Denoiser, timesteps: Tensor, stages: Sequence[Stage], cfg: bool) -> Denoiser: ...


class Watcher(Protocol):
    """Looks at the states of one run as they pass, without changing them (previews, traces): `watch` takes the
    run's state iterator and yields the very same states on, in order, like a progress bar wrapping it.
    gbsd_core.bokeh.trace.Tracer decodes x̂_0 of chosen steps this way."""

    def watch(self, states: Iterator[StepState], timesteps: Tensor,
              stages: Sequence[Stage]) -> Iterator[StepState]: ...


class StageSwitch(Protocol):
    """Changes the model itself at stage boundaries (the conditioning is the stage's own): `denoise` calls `enter`
    at the start of every stage, before the stepper is given the stage's conditioning, so whatever the stepper
    derives from the weights when a stage starts sees the switched ones. gbsd_core.lora merges a stage's LoRAs this
    way (in place)."""

    def enter(self, stage: Stage) -> None: ...

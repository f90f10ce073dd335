"""Text-to-image, image-to-image and stage-sharing sweeps with GBSD, on a loaded `SDBundle`.

    bundle = gbsd_core.load("weights/v1-5-pruned-emaonly.safetensors")
    params = GenerationParams("a bunny and a carrot in a garden, bokeh", focus="a carrot", seed=1)
    generate(bundle, params).image.save("bokeh.png")

`generate` is the whole algorithm in order: check the parameters, pick the size and the timesteps, embed the
prompts, draw x_T (or encode the input image and noise it), build the GBSD stages, denoise, decode. `sweep` does the
same set-up and differs only in its focus stage, which carries K conditioning rows (one per local prompt × α) so the
layout stage is shared.

Everything random comes from one CPU `torch.Generator` seeded with `params.seed` (x_T, the VAE sample for img2img,
DDIM η-noise, Euler ancestral's noise), so a seed gives the same image on any device. Latents are kept in fp32
whatever the UNet's dtype: the UNet casts its input, and the sampler's update runs in full precision.

`params.sampler` / `params.schedule` pick the sampler (samplers.py; DDIM 50, the paper's, by default). The step itself
is a `Stepper` (sampling.py): by default the readable `CFGStep`; gbsd_core.fast makes faster ones (reduced precision,
compiled, CUDA-graphed; DDIM for now) that are passed in as `stepper=`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from .samplers import SAMPLERS, SCHEDULES, Sampler, make_sampler
from .sampling import (
    CFGStep,
    Conditioning,
    Probe,
    Stage,
    Stepper,
    StepState,
    Watcher,
    blend_embeddings,
    cat_conditioning,
    denoise,
    focus_conditioning,
    gbsd_stages,
    layout_steps,
)

if TYPE_CHECKING:
    from .bundle import SDBundle

LAYOUT_WARN_BELOW = 0.7  # the paper: with σ < 0.7 the focus prompt starts re-arranging the scene ("objects mix")


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides an image (with the weights). Field names are the CLI's flags."""

    prompt: str
    focus: str | None = None  # GBSD local prompt: the object kept sharp. None = plain SD.
    alpha: float = 0.5  # focus-stage mix α·E(global) + (1−α)·E(local)
    layout: float = 0.8  # σ: fraction of the executed steps in the global layout stage
    steps: int = 50
    cfg: float = 7.5
    negative: str = ""
    seed: int = 0
    width: int | None = None  # None: the family's native size (512; SD2-768-v 768; SDXL 1024); img2img: the input's
    height: int | None = None
    strength: float = 0.75  # img2img only: fraction of the schedule that is re-run
    eta: float = 0.0  # DDIM η
    sampler: str = "ddim"  # samplers.SAMPLERS: "ddim" | "euler" | "euler_a" | "dpmpp_2m"
    schedule: str = "normal"  # σ schedule of the σ samplers: "normal" | "karras"
    # Rack focus (gbsd_core/bokeh/rack.py): the focus stage's local embedding is (1−m)·E(focus) + m·E(focus_to),
    # m = focus_mix, instead of E(focus). None / 0 = the plain GBSD local prompt.
    focus_to: str | None = None
    focus_mix: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, before any weights are touched."""
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.layout <= 1.0:
            raise ValueError(f"layout (σ) must be in [0, 1], got {self.layout}")
        if not isinstance(self.steps, int) or self.steps < 1 or self.steps > 1000:
            raise ValueError(f"steps must be an integer in [1, 1000], got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.eta < 0.0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {v}")
        if self.focus_to is not None:
            if not isinstance(self.focus_to, str):
                raise ValueError(f"focus_to must be a string, got {type(self.focus_to).__name__}")
            if self.focus is None:
                raise ValueError("focus_to needs a focus prompt to move from (focus)")
        if not 0.0 <= self.focus_mix <= 1.0:
            raise ValueError(f"focus_mix must be in [0, 1], got {self.focus_mix}")
        if self.focus_mix != 0.0 and self.focus_to is None:
            raise ValueError(f"focus_mix {self.focus_mix} needs focus_to, the prompt to move the focus towards")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.sampler == "ddim" and self.schedule != "normal":
            raise ValueError(f"schedule {self.schedule!r} is for the σ samplers (euler, euler_a, dpmpp_2m); ddim runs "
                             "CompVis' DDIM timesteps")
        if self.sampler != "ddim" and self.eta != 0.0:
            raise ValueError(f"eta is DDIM's η; sampler {self.sampler!r} takes eta=0 (euler_a is ancestral, η = 1)")


@dataclass
class GenerationResult:
    image: Image.Image
    params: GenerationParams
    executed_steps: int  # sampler steps actually run (fewer than params.steps for img2img)
    layout_steps: int  # of which in the layout stage
    unet_calls: int  # UNet evaluations per sample row (CFG's doubled batch counts once), summed over the whole run/sweep
    # The stage switch: the UNet timestep and noise level σ of the first focus-stage step (None: no switch). With
    # Karras σ the switch at 80 % of the steps sits much lower in σ than with the normal schedule.
    boundary_timestep: int | float | None = None
    boundary_sigma: float | None = None


def resolve_size(bundle: SDBundle, params: GenerationParams, init_image: Image.Image | None = None) -> tuple[int, int]:
    """(width, height): explicit, else the input image's size (img2img), else the family's native resolution."""
    if init_image is not None and params.width is None and params.height is None:
        w, h = init_image.size
        if w % 8 or h % 8:
            raise ValueError(f"input image is {w}x{h}; sizes must be multiples of 8 — pass --size to resize it")
        return w, h
    native = bundle.family.resolution
    return params.width or native, params.height or native


def _image_to_tensor(image: Image.Image, size: tuple[int, int]) -> Tensor:
    """PIL → [1,3,H,W] in [-1, 1] (the VAE's input range)."""
    import numpy as np

    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).unsqueeze(0)


@dataclass
class _Start:
    """What every run shares before its stages: the timesteps, the embeddings, x_T and the run's generator."""

    sampler: Sampler  # its run fixed to `timesteps`
    timesteps: Tensor  # the UNet timesteps of the executed steps, descending
    # Conditionings (sampling.Conditioning): the token embeddings E(·) [rows,77,D], for SDXL with pooled + sizes
    uncond: Conditioning  # E(negative prompt), 1 row
    global_emb: Conditioning  # E(global prompt), 1 row
    local_embs: Conditioning | None  # E(local prompt), one row per focus prompt (F); None without one
    latents: Tensor  # x_T, or the noised input image, [1,4,h,w] fp32
    generator: torch.Generator
    size: tuple[int, int]  # (width, height) of the image


def _sampler(bundle: SDBundle, params: GenerationParams, stepper: Stepper | None) -> Sampler:
    """The sampler the parameters ask for: the stepper's own (which must be that one), else made on the bundle's ᾱ."""
    if stepper is None:
        return make_sampler(bundle.scheduler, params.sampler, params.schedule)
    sampler = stepper.scheduler
    if (sampler.name, sampler.schedule) != (params.sampler, params.schedule):
        raise ValueError(f"the stepper runs sampler {sampler.name!r} with the {sampler.schedule!r} schedule; these "
                         f"parameters ask for {params.sampler!r}, {params.schedule!r}")
    return sampler


def _start(bundle: SDBundle, params: GenerationParams, local_prompts: Sequence[str],
           init_image: Image.Image | None, x_T: Tensor | None, stepper: Stepper | None) -> _Start:
    """Validate, sampler, size, timesteps, embeddings (one text-encoder call per prompt), then the start latents."""
    params.validate()
    sampler = _sampler(bundle, params, stepper)
    w, h = resolve_size(bundle, params, init_image)
    # The schedule first: a bad (steps, strength) pair fails here, before the text encoder runs.
    timesteps = sampler.timesteps(params.steps, params.strength if init_image is not None else 1.0)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    device = next(bundle.unet.parameters()).device
    # One text-encoder call per prompt rather than one batch: CPU matmul kernels may round differently at another
    # batch size, and a prompt must embed to the same bits whichever run or sweep it is part of (σ = 1 is then
    # bit-identical to plain SD). The cost is a few ms per prompt. (SDXL: each also carries the size embeddings.)
    conds = [bundle.conditioning(p, (w, h), negative=i == 0).map(lambda t: t.to(device, torch.float32))
             for i, p in enumerate((params.negative, params.prompt, *local_prompts))]
    local_embs = cat_conditioning(conds[2:]) if local_prompts else None

    latent_shape = (1, 4, h // 8, w // 8)
    if init_image is None:
        if x_T is None:
            x_T = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
        elif tuple(x_T.shape) != latent_shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {latent_shape} for a {w}x{h} image")
        latents = sampler.start_latents(x_T.to(device, torch.float32))  # σ samplers: x_T scaled to σ-space
    else:
        # img2img (SDEdit): encode, then noise the clean latents to the first executed step's level.
        x0 = bundle.encode_images(_image_to_tensor(init_image, (w, h)), generator=generator).to(device, torch.float32)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
        latents = sampler.start_latents(noise, x0)
    return _Start(sampler, timesteps, conds[0], conds[1], local_embs, latents, generator, (w, h))


def _boundary(start: _Start, n_layout: int, has_focus: bool) -> tuple[int | float | None, float | None]:
    """(t, σ) of the first focus-stage step, or (None, None) when no stage switch happens."""
    if not has_focus or not 0 < n_layout < len(start.timesteps):
        return None, None
    return start.timesteps[n_layout].item(), float(start.sampler.sigmas[n_layout])


def _denoise(bundle: SDBundle, params: GenerationParams, start: _Start, stages: list[Stage], progress: bool,
             probe: Probe | None, stepper: Stepper | None, watch: Watcher | None = None) -> tuple[Tensor, int]:
    """Run the stages; returns the final latents and the UNet evaluations per sample row (counted from the states)."""
    guidance = None if params.cfg == 1.0 else params.cfg
    if stepper is None:
        # A probe wraps the plain UNet call; otherwise the UNet runs untouched.
        model = bundle.unet if probe is None else probe.wrap(bundle.unet, start.timesteps, stages, guidance is not None)
        stepper = CFGStep(model, start.sampler, guidance, params.eta)
    elif probe is not None:
        raise ValueError("a probe wraps the plain UNet call; it cannot be combined with stepper=")
    elif (stepper.guidance_scale, stepper.eta) != (guidance, params.eta):
        raise ValueError(f"the stepper runs guidance {stepper.guidance_scale}, η {stepper.eta}; these parameters ask "
                         f"for {guidance}, {params.eta}")
    states: Iterator[StepState] = denoise(stepper, start.latents, start.timesteps, stages, start.uncond,
                                          generator=start.generator)
    if watch is not None:
        states = watch.watch(states, start.timesteps, stages)
    if progress:
        from tqdm.auto import tqdm

        states = tqdm(states, total=len(start.timesteps), desc="denoise", unit="step")
    latents, unet_calls = start.latents, 0
    with torch.inference_mode():
        for state in states:
            latents = state.latents
            unet_calls += latents.shape[0]  # one UNet evaluation per row (the CFG pair counts once)
    return latents, unet_calls


def generate(
    bundle: SDBundle,
    params: GenerationParams,
    *,
    init_image: Image.Image | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
    probe: Probe | None = None,
    stepper: Stepper | None = None,
    watch: Watcher | None = None,
) -> GenerationResult:
    """One image: text-to-image, or image-to-image when `init_image` is given. GBSD when `params.focus` is set.

    `probe`: watches the UNet calls, e.g. gbsd_core.bokeh.attnmaps.CrossAttentionCollector (focus-stage maps).
    `stepper`: runs each step (default: `CFGStep` with the bundle's UNet and the sampler `params.sampler` /
    `params.schedule` names); it must have been made with `params.cfg` and `params.eta` and run that sampler (e.g.
    `gbsd_core.fast.make_stepper(bundle, options, params.cfg, params.eta)`, DDIM).
    `watch`: sees every step's state on the way, e.g. gbsd_core.bokeh.trace.Tracer (the x̂_0 filmstrip).
    """
    local_prompts = [p for p in (params.focus, params.focus_to) if p is not None]
    start = _start(bundle, params, local_prompts, init_image, x_T, stepper)
    n = len(start.timesteps)
    if params.focus is None:
        stages, n_layout = [Stage("global", range(n), start.global_emb)], n  # plain SD
    else:
        local = start.local_embs.map(lambda t: t[:1])
        if params.focus_to is not None:
            local = blend_embeddings(local, start.local_embs.map(lambda t: t[1:]), params.focus_mix)
        focus = focus_conditioning(start.global_emb, local, params.alpha)
        stages, n_layout = gbsd_stages(start.global_emb, focus, n, params.layout), layout_steps(n, params.layout)
    latents, unet_calls = _denoise(bundle, params, start, stages, progress, probe, stepper, watch)
    image = bundle.decode_latents(latents)[0]
    return GenerationResult(image, replace(params, width=start.size[0], height=start.size[1]), n, n_layout, unet_calls,
                            *_boundary(start, n_layout, params.focus is not None))


def sweep(
    bundle: SDBundle,
    params: GenerationParams,
    *,
    alphas: Sequence[float] | None = None,
    focus_prompts: Sequence[str] | None = None,
    mixes: Sequence[float] | None = None,
    init_image: Image.Image | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
    probe: Probe | None = None,
    stepper: Stepper | None = None,
) -> list[GenerationResult]:
    """A grid of focus stages (local prompt × α × focus mix) that share one layout stage.

    The layout stage runs once at batch 1; the focus stage then runs all K = len(focus_prompts)·len(alphas)·len(mixes)
    branches as one batch, so the UNet is evaluated n_layout + K·(n − n_layout) times instead of K·n. With the same
    seed every result equals an independent `generate` call (the branches see the same x_T and the same η-noise).
    `mixes` (needs `params.focus_to`): focus_mix values m, each branch's local embedding (1−m)·E(f) + m·E(focus_to)
    (a rack focus, gbsd_core/bokeh/rack.py); default [params.focus_mix].
    Results are ordered focus-prompt-major, then α, then mix: [(f0, α0, m0), (f0, α0, m1), …, (f0, α1, m0), …].
    """
    alphas = [params.alpha] if alphas is None else list(alphas)
    focus_prompts = list(focus_prompts) if focus_prompts is not None else [params.focus] if params.focus else []
    mixes = [params.focus_mix] if mixes is None else list(mixes)
    if not alphas:
        raise ValueError("a sweep needs at least one alpha")
    if not focus_prompts:
        raise ValueError("a sweep needs a focus prompt (params.focus or focus_prompts)")
    if not mixes:
        raise ValueError("a sweep needs at least one focus mix")
    cells = [(f, a, m) for f in focus_prompts for a in alphas for m in mixes]
    for _, a, m in cells:
        replace(params, alpha=a, focus_mix=m).validate()  # every cell's parameters are valid ones

    to_prompt = [params.focus_to] if params.focus_to is not None else []
    start = _start(bundle, params, [*focus_prompts, *to_prompt], init_image, x_T, stepper)
    n = len(start.timesteps)
    # The only difference from generate: K focus rows, one per cell, focus-prompt-major.
    alpha_rows = torch.tensor([a for _, a, _ in cells])
    per_prompt = len(alphas) * len(mixes)
    local_rows = start.local_embs.map(lambda t: t[:len(focus_prompts)].repeat_interleave(per_prompt, dim=0))
    if params.focus_to is not None:
        to_row = start.local_embs.map(lambda t: t[-1:])
        local_rows = blend_embeddings(local_rows, to_row, torch.tensor([m for *_, m in cells]))
    global_rows = start.global_emb.map(lambda t: t.expand(len(cells), *t.shape[1:]))
    focus = focus_conditioning(global_rows, local_rows, alpha_rows)
    stages = gbsd_stages(start.global_emb, focus, n, params.layout)
    latents, unet_calls = _denoise(bundle, params, start, stages, progress, probe, stepper)
    images = bundle.decode_latents(latents)
    if len(images) == 1 and len(cells) > 1:
        # σ = 1: no focus stage ran, so nothing branched: every cell is the same global-prompt image.
        images = images * len(cells)
    n_layout = layout_steps(n, params.layout)
    boundary = _boundary(start, n_layout, True)
    return [GenerationResult(image, replace(params, focus=f, alpha=a, focus_mix=m, width=start.size[0],
                                            height=start.size[1]), n, n_layout, unet_calls, *boundary)
            for (f, a, m), image in zip(cells, images)]

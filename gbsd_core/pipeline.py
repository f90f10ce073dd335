"""Text-to-image, image-to-image and stage-sharing sweeps with GBSD, on a loaded `SDBundle`.

    bundle = gbsd_core.load("weights/v1-5-pruned-emaonly.safetensors")
    params = GenerationParams("a bunny and a carrot in a garden, bokeh", focus="a carrot", seed=1)
    generate(bundle, params).image.save("bokeh.png")

`generate` is the whole algorithm in order: check the request against the model (params.py defines every rule), pick
the size and the timesteps, embed the prompts, draw x_T (or encode the input image and noise it), build the GBSD
stages, denoise, decode. `sweep` does the
same set-up and differs only in its focus stage, which carries K conditioning rows (one per local prompt × α) so the
layout stage is shared.

Everything random comes from one CPU `torch.Generator` seeded with `params.seed` (x_T, the VAE sample for img2img,
DDIM η-noise, Euler ancestral's noise), so a seed gives the same image on any device. Latents are kept in fp32
whatever the UNet's dtype: the UNet casts its input, and the sampler's update runs in full precision.

`params.sampler` / `params.schedule` pick the sampler (samplers.py; DDIM 50, the paper's, by default). The step itself
is a `Stepper` (sampling.py): by default the readable `CFGStep`; gbsd_core.fast makes faster ones (reduced precision,
compiled, CUDA-graphed; any sampler) that are passed in as `stepper=`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from PIL import Image
from torch import Tensor

from .bundle import SDBundle, check_finite
from .images import to_rgb
from .params import GenerationParams, image_size, sweep_axes
from .prompts.chunks import fit_conditionings
from .prompts.parser import check_lora_tags_taken_out
from .prompts.schedule import prompt_schedule, staged
from .samplers import Sampler, make_sampler
from .sampling import (
    CFGStep,
    Conditioning,
    Probe,
    Stage,
    Stepper,
    StageSwitch,
    StepState,
    Watcher,
    blend_embeddings,
    cat_conditioning,
    denoise,
    focus_conditioning,
    gbsd_stages,
    layout_steps,
)
from .sampling import guidance as sampling_guidance

LAYOUT_WARN_BELOW = 0.7  # the paper: with a layout fraction below 0.7 the focus prompt starts re-arranging the scene ("objects mix")


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
    """(width, height): explicit, else the input image's size (img2img), else the model's native size; a multiple of
    the VAE's factor and within the family's largest size (`params.image_size` with `bundle.limits()`)."""
    return image_size(params, bundle.limits(), init_image.size if init_image is not None else None)


# The members each pluggable argument must have (sampling.py's protocols), checked where the API is entered.
_PROTOCOLS = {"stepper": ("Stepper", ("sampler", "set_context", "step")), "probe": ("Probe", ("wrap",)),
              "watch": ("Watcher", ("watch",))}


def check_run_args(bundle: object, params: object, **pluggable: object) -> None:
    """The entry check of `generate`, `sweep` and the rack focus: each argument is what it must be before anything
    reads it, so a wrong one is a ValueError naming it, never an AttributeError from deep inside the run.
    `pluggable`: stepper=, probe=, watch= (None, or an object with the members of its sampling.py protocol)."""
    from .bundle import SDBundle

    if not isinstance(bundle, SDBundle):
        raise ValueError(f"bundle must be an SDBundle (gbsd_core.load(path)), got {type(bundle).__name__}")
    if not isinstance(params, GenerationParams):
        raise ValueError(f"params must be a GenerationParams, got {type(params).__name__}")
    for name, value in pluggable.items():
        protocol, members = _PROTOCOLS[name]
        if value is not None and not all(hasattr(value, m) for m in members):
            raise ValueError(f"{name} must be a sampling.{protocol} (with {', '.join(members)}), got "
                             f"{type(value).__name__}")


def _check_inputs(init_image: object, x_T: object) -> None:
    if init_image is not None and not isinstance(init_image, Image.Image):
        raise ValueError(f"init_image must be a PIL image, got {type(init_image).__name__}")
    if x_T is not None:
        if not isinstance(x_T, Tensor) or not x_T.is_floating_point():
            raise ValueError(f"x_T must be a floating-point tensor, got {getattr(x_T, 'dtype', type(x_T).__name__)}")
        if not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T holds NaN or inf values")


def _image_to_tensor(image: Image.Image, size: tuple[int, int]) -> Tensor:
    """PIL (8-bit RGB: `images.to_rgb`) → [1,3,H,W] in [-1, 1] (the VAE's input range)."""
    import numpy as np

    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).unsqueeze(0)


@dataclass
class _Start:
    """What every run shares before its stages: the timesteps, the embeddings, x_T and the run's generator."""

    sampler: Sampler  # its run fixed to `timesteps`
    timesteps: Tensor  # the UNet timesteps of the executed steps, descending
    # Conditionings (sampling.Conditioning): the token embeddings E(·) [1,77·k,D] (k: the run's chunk count, one for
    # prompts of at most 75 tokens), for SDXL with pooled + sizes
    uncond: Conditioning  # E(negative prompt), 1 row
    # The global prompt's then each local prompt's schedule [(end step, text)]: one entry, unless the prompt uses
    # prompt editing ([from:to:when], prompts/schedule.py)
    schedules: list[list[tuple[int, str]]]
    embs: dict[str, Conditioning]  # E(text) of every text the schedules hold
    latents: Tensor  # x_T, or the noised input image, [1,C,h,w] fp32 (C = 4, h = H/8 for SD)
    generator: torch.Generator
    size: tuple[int, int]  # (width, height) of the image


def _sampler(bundle: SDBundle, params: GenerationParams, stepper: Stepper | None) -> Sampler:
    """The sampler the parameters ask for: the stepper's own (which must be that one), else made on the bundle's ᾱ."""
    if stepper is None:
        return make_sampler(bundle.noise_schedule, bundle.family.prediction_type, params.sampler, params.schedule,
                            params.spacing)
    sampler = stepper.sampler
    if (sampler.name, sampler.schedule) != (params.sampler, params.schedule) or (
            params.spacing is not None and sampler.spacing != params.spacing):
        raise ValueError(f"the stepper runs sampler {sampler.name!r} with the {sampler.schedule!r} schedule and the "
                         f"{sampler.spacing!r} spacing; these parameters ask for {params.sampler!r}, "
                         f"{params.schedule!r}, spacing {params.spacing!r} (None: the model's own)")
    return sampler


def _start(bundle: SDBundle, params: GenerationParams, local_prompts: Sequence[str],
           init_image: Image.Image | None, x_T: Tensor | None, stepper: Stepper | None) -> _Start:
    """Check, sampler, size, timesteps, embeddings (one text-encoder call per prompt), then the start latents."""
    _check_inputs(init_image, x_T)
    if init_image is not None:
        init_image = to_rgb(init_image)  # 16-bit scaled, transparency flattened; no white level: ValueError here
    sampler = _sampler(bundle, params, stepper)
    limits = bundle.limits()
    w, h = image_size(params, limits, init_image.size if init_image is not None else None)
    # The schedule first: a bad (steps, strength) pair fails here, before the text encoder runs.
    timesteps = sampler.timesteps(params.steps, params.strength if init_image is not None else 1.0)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    device = next(bundle.unet.parameters()).device
    # One text-encoder call per prompt rather than one batch: CPU matmul kernels may round differently at another
    # batch size, and a prompt must embed to the same bits whichever run or sweep it is part of (a layout fraction of 1 is then
    # bit-identical to plain SD). The cost is a few ms per prompt. (SDXL: each also carries the size embeddings.)
    # Prompts are read as A1111 writes them (prompts/: weights, chunks of 75 tokens, embeddings, prompt editing);
    # then every context of the run is brought to one length (prompts/chunks.py: repeated, or padded). A LoRA tag
    # must have been taken out and applied before (gbsd_core.lora); the run would silently lack its LoRA otherwise.
    wheres = ["prompt", "negative", *["focus"] * len(local_prompts)]
    for where, prompt in zip(wheres, (params.prompt, params.negative, *local_prompts)):
        check_lora_tags_taken_out(prompt, where)
    schedules = [prompt_schedule(p, params.steps) for p in (params.prompt, *local_prompts)]
    texts = list(dict.fromkeys(text for schedule in schedules for _, text in schedule))
    conds = [bundle.conditioning(p, (w, h), negative=i == 0, emphasis=params.emphasis)
             for i, p in enumerate((params.negative, *texts))]
    conds = fit_conditionings(conds, params.chunk_padding, lambda: bundle.conditioning("", (w, h)).context)
    conds = [c.map(lambda t: t.to(device, torch.float32)) for c in conds]

    latent_shape = limits.latent_shape(w, h)
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
    return _Start(sampler, timesteps, conds[0], schedules, dict(zip(texts, conds[1:])), latents, generator, (w, h))


def _stages(start: _Start, layout: float | None,
            focus_of: Callable[[Conditioning, Conditioning], Conditioning]) -> list[Stage]:
    """The run's stages. Plain SD (`layout` None): one "global" stage. GBSD: the paper's two (`gbsd_stages`), E(global)
    then `focus_of(E(global), E(local prompts))` (the locals stacked, one row each); only prompt editing
    ([from:to:when], prompts/schedule.py) splits them further, where a text changes."""
    n = len(start.timesteps)

    def cond(focus: bool, texts: list[str]) -> Conditioning:
        global_emb = start.embs[texts[0]]
        return focus_of(global_emb, cat_conditioning([start.embs[t] for t in texts[1:]])) if focus else global_emb

    if any(len(schedule) > 1 for schedule in start.schedules):
        n_layout = n if layout is None else layout_steps(n, layout)
        return staged(n, n_layout, start.schedules, cond, "global" if layout is None else "layout")
    texts = [schedule[0][1] for schedule in start.schedules]
    if layout is None:
        return [Stage("global", range(n), cond(False, texts))]  # plain SD
    return gbsd_stages(cond(False, texts), cond(True, texts), n, layout)


def _focus(params: GenerationParams, global_emb: Conditioning, local_embs: Conditioning) -> Conditioning:
    """One run's focus conditioning α·E(global) + (1−α)·E(focus). A rack focus (`focus_to`, bokeh/rack.py) first
    blends the local embedding toward E(focus_to) by `focus_mix`; `local_embs` then holds both rows."""
    local = local_embs.map(lambda t: t[:1])
    if params.focus_to is not None:
        local = blend_embeddings(local, local_embs.map(lambda t: t[1:]), params.focus_mix)
    return focus_conditioning(global_emb, local, params.alpha)


def _sweep_focus(params: GenerationParams, cells: list[GenerationParams], n_prompts: int, global_emb: Conditioning,
                 local_embs: Conditioning) -> Conditioning:
    """A sweep's focus conditioning: one row per cell (focus-prompt-major, then α, then mix), each `_focus` of its
    cell, stacked so the focus stage branches the batch. `local_embs`: the n_prompts focus prompts, then focus_to."""
    per_prompt = len(cells) // n_prompts
    local_rows = local_embs.map(lambda t: t[:n_prompts].repeat_interleave(per_prompt, dim=0))
    if params.focus_to is not None:
        to_row = local_embs.map(lambda t: t[-1:])
        local_rows = blend_embeddings(local_rows, to_row, torch.tensor([c.focus_mix for c in cells]))
    global_rows = global_emb.map(lambda t: t.expand(len(cells), *t.shape[1:]))
    return focus_conditioning(global_rows, local_rows, torch.tensor([c.alpha for c in cells]))


def _boundary(start: _Start, n_layout: int, has_focus: bool) -> tuple[int | float | None, float | None]:
    """(t, σ) of the first focus-stage step, or (None, None) when no stage switch happens."""
    if not has_focus or not 0 < n_layout < len(start.timesteps):
        return None, None
    return start.timesteps[n_layout].item(), float(start.sampler.sigmas[n_layout])


def _denoise(bundle: SDBundle, params: GenerationParams, start: _Start, stages: list[Stage], progress: bool,
             probe: Probe | None, stepper: Stepper | None, watch: Watcher | None = None,
             switch: StageSwitch | None = None) -> tuple[Tensor, int]:
    """Run the stages; returns the final latents and the UNet evaluations per sample row (counted from the states)."""
    guidance = sampling_guidance(params.cfg)  # None at cfg ≤ 1: the conditional branch alone
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
                                          generator=start.generator, switch=switch)
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
    check_finite(latents, "the sampler's final latents")  # e.g. an fp16 overflow in the UNet
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
    switch: StageSwitch | None = None,
) -> GenerationResult:
    """One image: text-to-image, or image-to-image when `init_image` is given. GBSD when `params.focus` is set.

    `probe`: watches the UNet calls, e.g. gbsd_core.bokeh.attnmaps.CrossAttentionCollector (focus-stage maps).
    `stepper`: runs each step (default: `CFGStep` with the bundle's UNet and the sampler `params.sampler` /
    `params.schedule` names); it must have been made with `params.cfg` and `params.eta` and run that sampler (e.g.
    `gbsd_core.fast.make_stepper(bundle, options, params.cfg, params.eta, params.sampler, params.schedule)`).
    `watch`: sees every step's state on the way, e.g. gbsd_core.bokeh.trace.Tracer (the x̂_0 filmstrip).
    `switch`: told when each stage starts (sampling.StageSwitch), e.g. gbsd_core.lora's per-stage LoRAs.
    """
    check_run_args(bundle, params, stepper=stepper, probe=probe, watch=watch)
    local_prompts = [p for p in (params.focus, params.focus_to) if p is not None]
    start = _start(bundle, params, local_prompts, init_image, x_T, stepper)
    n = len(start.timesteps)
    # plain SD: one "global" stage; GBSD: "layout" for round(layout·n) steps, then "focus"
    stages = _stages(start, None if params.focus is None else params.layout, partial(_focus, params))
    n_layout = n if params.focus is None else layout_steps(n, params.layout)
    latents, unet_calls = _denoise(bundle, params, start, stages, progress, probe, stepper, watch, switch)
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
    switch: StageSwitch | None = None,
) -> list[GenerationResult]:
    """A grid of focus stages (local prompt × α × focus mix) that share one layout stage.

    The layout stage runs once at batch 1; the focus stage then runs all K = len(focus_prompts)·len(alphas)·len(mixes)
    branches as one batch, so the UNet is evaluated n_layout + K·(n − n_layout) times instead of K·n. With the same
    seed every result equals an independent `generate` call (the branches see the same x_T and the same η-noise).
    `mixes` (needs `params.focus_to`): focus_mix values m, each branch's local embedding (1−m)·E(f) + m·E(focus_to)
    (a rack focus, gbsd_core/bokeh/rack.py); default [params.focus_mix].
    Results are ordered focus-prompt-major, then α, then mix: [(f0, α0, m0), (f0, α0, m1), …, (f0, α1, m0), …].
    """
    check_run_args(bundle, params, stepper=stepper, probe=probe)
    focus_prompts, cell_params = sweep_axes(params, alphas, focus_prompts, mixes)

    to_prompt = [params.focus_to] if params.focus_to is not None else []
    start = _start(bundle, params, [*focus_prompts, *to_prompt], init_image, x_T, stepper)
    n = len(start.timesteps)
    # The only difference from generate: K focus rows, one per cell.
    stages = _stages(start, params.layout, partial(_sweep_focus, params, cell_params, len(focus_prompts)))
    latents, unet_calls = _denoise(bundle, params, start, stages, progress, probe, stepper, switch=switch)
    images = bundle.decode_latents(latents)
    if len(images) == 1 and len(cell_params) > 1:
        # layout fraction 1: no focus stage ran, so nothing branched: every cell is the same global-prompt image.
        images = images * len(cell_params)
    n_layout = layout_steps(n, params.layout)
    boundary = _boundary(start, n_layout, True)
    return [GenerationResult(image, replace(cell, width=start.size[0], height=start.size[1]), n, n_layout,
                             unet_calls, *boundary)
            for cell, image in zip(cell_params, images)]

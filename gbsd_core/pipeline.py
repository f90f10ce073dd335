"""Text-to-image, image-to-image and stage-sharing sweeps with GBSD, on a loaded `SDBundle`.

    bundle = gbsd_core.load("weights/v1-5-pruned-emaonly.safetensors")
    params = GenerationParams("a bunny and a carrot in a garden, bokeh", focus="a carrot", seed=1)
    generate(bundle, params).image.save("bokeh.png")

Everything random comes from one CPU `torch.Generator` seeded with `params.seed` (x_T, the VAE sample for img2img,
DDIM η-noise), so a seed gives the same image on any device.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from .fast import FastOptions, make_stepper
from .sampling import Stage, StepState, denoise, focus_conditioning, gbsd_stages, layout_steps

if TYPE_CHECKING:
    from .attnmaps import CrossAttentionCollector

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
    width: int | None = None  # None: the family's native size (512, or 768 for SD2-768-v); img2img: the input's size
    height: int | None = None
    strength: float = 0.75  # img2img only: fraction of the schedule that is re-run
    eta: float = 0.0

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


@dataclass
class GenerationResult:
    image: Image.Image
    params: GenerationParams
    executed_steps: int  # DDIM steps actually run (fewer than params.steps for img2img)
    layout_steps: int  # of which in the layout stage
    unet_calls: int  # UNet evaluations per sample row (CFG's doubled batch counts once), summed over the whole run/sweep


def resolve_size(bundle, params: GenerationParams, init_image: Image.Image | None = None) -> tuple[int, int]:
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
class _Prepared:
    latents: Tensor
    timesteps: Tensor
    uncond: Tensor
    global_emb: Tensor
    generator: torch.Generator
    size: tuple[int, int]


def _prepare(
    bundle, params: GenerationParams, extra_prompts: Sequence[str], init_image: Image.Image | None, x_T: Tensor | None,
    fast: FastOptions | None = None,
) -> tuple[_Prepared, Tensor]:
    """Shared set-up: validation, text embeddings (one text-encoder call), starting latents and the timesteps."""
    params.validate()
    size = resolve_size(bundle, params, init_image)
    # The schedule first: a bad (steps, strength) pair fails here, before the text encoder runs.
    timesteps = bundle.scheduler.timesteps(params.steps, params.strength if init_image is not None else 1.0)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    device, dtype = _unet_device_dtype(bundle)
    if fast is not None:
        dtype = torch.float32  # the fast stepper keeps latents in fp32 and casts only the UNet's input
    # Embeddings once per prompt, never per step. One text-encoder call per prompt rather than one batch: CPU matmul
    # kernels may round differently at another batch size, and a prompt must embed to the same bits whichever run or
    # sweep it is part of (σ = 1 is then bit-identical to plain SD). The cost is a few ms per prompt.
    embs = torch.cat([bundle.encode_prompt(p) for p in (params.negative, params.prompt, *extra_prompts)]).to(device, dtype)
    uncond, global_emb, extra = embs[:1], embs[1:2], embs[2:]

    w, h = size
    latent_shape = (1, 4, h // 8, w // 8)
    if init_image is None:
        if x_T is None:
            x_T = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
        elif tuple(x_T.shape) != latent_shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {latent_shape} for a {w}x{h} image")
        latents = x_T.to(device, dtype)
    else:
        # img2img (SDEdit): encode, then noise the clean latents to the first executed timestep.
        x0 = bundle.encode_images(_image_to_tensor(init_image, size), generator=generator).to(device, dtype)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device, dtype)
        latents = bundle.scheduler.add_noise(x0, noise, int(timesteps[0]))
    return _Prepared(latents, timesteps, uncond, global_emb, generator, size), extra


def _unet_device_dtype(bundle) -> tuple[torch.device, torch.dtype]:
    p = next(bundle.unet.parameters())
    return p.device, p.dtype


class _CountingDenoiser:
    """Wraps the UNet and counts evaluations per sample row (a CFG call on [2B] latents counts B)."""

    def __init__(self, unet, cfg: bool):
        self.unet, self.cfg, self.calls = unet, cfg, 0

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.calls += x.shape[0] // 2 if self.cfg else x.shape[0]
        return self.unet(x, t, context)


def _run(bundle, params: GenerationParams, prep: _Prepared, stages: list[Stage], progress: bool,
         attention: CrossAttentionCollector | None = None, fast: FastOptions | None = None) -> tuple[Tensor, int]:
    use_cfg = params.cfg != 1.0
    counter = _CountingDenoiser(bundle.unet, use_cfg)
    if fast is not None and attention is not None:
        raise ValueError("attention collection wraps the plain UNet call; it cannot be combined with fast=")
    # The fast step calls the UNet inside compiled / graphed code, so its calls are counted per step instead.
    stepper = None if fast is None else make_stepper(bundle, fast, params.cfg if use_cfg else None, params.eta)
    # Attention collection wraps the denoiser only when asked for: otherwise the UNet runs untouched.
    model = counter if attention is None else attention.wrap(counter, prep.timesteps, stages, use_cfg)
    states: Iterator[StepState] = denoise(
        model,
        bundle.scheduler,
        prep.latents,
        prep.timesteps,
        stages,
        prep.uncond if use_cfg else None,
        params.cfg,
        eta=params.eta,
        generator=prep.generator,
        stepper=stepper,
    )
    if progress:
        from tqdm.auto import tqdm

        states = tqdm(states, total=len(prep.timesteps), desc="denoise", unit="step")
    latents, fast_calls = prep.latents, 0
    try:
        with torch.inference_mode():
            for state in states:
                latents = state.latents
                fast_calls += latents.shape[0]
    finally:
        if stepper is not None:
            stepper.close()
    return latents, counter.calls if stepper is None else fast_calls


def generate(
    bundle,
    params: GenerationParams,
    *,
    init_image: Image.Image | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
    attention: CrossAttentionCollector | None = None,
    fast: FastOptions | None = None,
) -> GenerationResult:
    """One image: text-to-image, or image-to-image when `init_image` is given. GBSD when `params.focus` is set.

    `attention`: a collector that records the focus-stage cross-attention maps (gbsd_core.attnmaps).
    `fast`: run the steps through gbsd_core.fast (reduced precision, fused / compiled / CUDA-graphed step); this
    accelerates the bundle in place on first use. None (the default) is the plain fp32 path.
    """
    results = sweep(bundle, params, alphas=[params.alpha], init_image=init_image, x_T=x_T, progress=progress,
                    attention=attention, fast=fast)
    return results[0]


def sweep(
    bundle,
    params: GenerationParams,
    *,
    alphas: Sequence[float] | None = None,
    focus_prompts: Sequence[str] | None = None,
    init_image: Image.Image | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
    attention: CrossAttentionCollector | None = None,
    fast: FastOptions | None = None,
) -> list[GenerationResult]:
    """A grid of focus stages (local prompt × α) that share one layout stage.

    The layout stage runs once at batch 1; the focus stage then runs all K = len(focus_prompts)·len(alphas) branches
    as one batch, so the UNet is evaluated n_layout + K·(n − n_layout) times instead of K·n. With the same seed every
    result equals an independent `generate` call (the branches see the same x_T and the same η-noise).
    Results are ordered focus-prompt-major: [(f0, α0), (f0, α1), …, (f1, α0), …].
    """
    alphas = [params.alpha] if alphas is None else list(alphas)
    if focus_prompts is None:
        focus_prompts = [params.focus] if params.focus is not None else []
    focus_prompts = list(focus_prompts)
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {a}")
    if not alphas:
        raise ValueError("a sweep needs at least one alpha")

    prep, local = _prepare(bundle, params, focus_prompts, init_image, x_T, fast)
    n = len(prep.timesteps)
    cells = [(f, a) for f in focus_prompts for a in alphas]
    if not cells:
        # Plain SD: one stage on the global prompt.
        stages = [Stage("global", range(n), prep.global_emb)]
        n_layout = n
    else:
        alpha_t = torch.tensor([a for _, a in cells])
        local_rows = local.repeat_interleave(len(alphas), dim=0)  # one row per cell, focus-prompt-major
        focus = focus_conditioning(prep.global_emb.expand(len(cells), -1, -1), local_rows, alpha_t)
        stages = gbsd_stages(prep.global_emb, focus, n, params.layout)
        n_layout = layout_steps(n, params.layout)
    latents, calls = _run(bundle, params, prep, stages, progress, attention, fast)
    images = bundle.decode_latents(latents)
    if len(images) == 1 and len(cells) > 1:
        # σ = 1: no focus stage ran, so nothing branched: every cell is the same global-prompt image.
        images = images * len(cells)
    out = []
    for (focus_prompt, a), image in zip(cells or [(None, params.alpha)], images):
        cell_params = replace(params, focus=focus_prompt, alpha=a, width=prep.size[0], height=prep.size[1])
        out.append(GenerationResult(image, cell_params, n, n_layout, calls))
    return out

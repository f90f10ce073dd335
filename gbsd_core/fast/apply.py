"""`accelerate` (apply `FastOptions` to a bundle in place) and `make_stepper` (the fast step runner, cached per bundle).

    opts = FastOptions(dtype=torch.float16, channels_last=True, fuse_qkv=True, cache_context_kv=True,
                       compile="default", cuda_graphs=True)
    with make_stepper(bundle, opts, guidance_scale=7.5) as step:     # accelerates the bundle on first use
        generate(bundle, params, stepper=step)                       # params.cfg must be 7.5 too
        # or drive the loop yourself:
        for state in denoise(step, x_T, timesteps, stages, uncond): ...
    p = replace(params, sampler="dpmpp_2m", schedule="karras")       # every sampler runs fast
    with make_stepper(bundle, opts, p.cfg, p.eta, p.sampler, p.schedule) as step:
        generate(bundle, p, stepper=step)                            # (the stepper must run p's sampler)

What each option does, and why it is safe, is in options.py; the module swaps are in modules.py (UNet) and vae.py.

`accelerate` changes the bundle in place and is not undone (reload the checkpoint for the plain model); calling it
again with the same options does nothing, with other options it raises.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attention_sites import attention_sites
from .attention import swap_attention
from .kernels import triton_available
from .modules import (
    FusedGroupNormSiLU,
    KernelGroupNorm,
    TritonGEGLU,
    swap_group_norms,
    wire_triton,
)
from .options import FastOptions
from .prepack import prepack_, prepack_available
from .step import CudaGraphCapture, FastStepper
from .vae import UpcastingAutoencoderKL, accelerate_vae

if TYPE_CHECKING:
    from torch.nn.attention import SDPBackend

    from ..bundle import SDBundle

__all__ = ["FusedGroupNormSiLU", "KernelGroupNorm", "TritonGEGLU", "UpcastingAutoencoderKL", "accelerate",
           "make_stepper", "release_steppers", "sdpa_backend"]


def _use_triton(options: FastOptions, device: torch.device) -> bool:
    """Decided once, here (the wired modules never ask again). Off unless asked for: see fast/kernels/__init__.py."""
    if options.triton and not triton_available(device):
        raise ValueError(f"triton=True but Triton cannot run on {device} (needs CUDA, or TRITON_INTERPRET=1 on CPU)")
    return options.triton


def _use_prepack(options: FastOptions, device: torch.device) -> bool:
    if options.cpu_prepack is None:
        return device.type == "cpu" and prepack_available()
    if options.cpu_prepack and (device.type != "cpu" or not prepack_available()):
        raise ValueError(f"cpu_prepack=True needs the UNet on CPU and a PyTorch build with oneDNN (mkldnn); "
                         f"the UNet is on {device}, mkldnn available: {torch.backends.mkldnn.is_available()}")
    return options.cpu_prepack


def _check_device(options: FastOptions, device: torch.device) -> None:
    if device.type != "cuda" and (options.cuda_graphs or options.attention == "efficient"):
        raise ValueError(f"cuda_graphs and attention='efficient' need the UNet on CUDA, it is on {device}")


def accelerate(bundle: SDBundle, options: FastOptions) -> None:
    """Apply `options` to `bundle` in place (UNet dtype, layout, kernels, attention; VAE dtype). Irreversible."""
    _check_args(bundle, options)
    unet = bundle.unet
    done = getattr(unet, "fast_options", None)
    if done is not None:
        if done != options:
            raise ValueError(f"this bundle was already accelerated with {done}; reload it to apply {options}")
        return
    device = next(unet.parameters()).device
    _check_device(options, device)
    use_triton = _use_triton(options, device)
    use_prepack = _use_prepack(options, device)

    unet.to(options.dtype)
    attentions = swap_attention(unet)
    if options.dtype == torch.float16 and bundle.family.prediction_type == "v_prediction":
        for attn in attentions:  # SD2-768-v overflows fp16 attention logits (Stability's _ATTN_PRECISION); SDPA accumulates in fp32 anyway
            attn.upcast = True
    if options.attention == "math":
        for attn in attentions:
            attn.explicit_softmax = True
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if use_triton:
        wire_triton(unet)
    if options.dtype != torch.float32:
        swap_group_norms(unet)
    if options.fuse_qkv:  # last: it must see the final dtype/device (see CrossAttention.fuse_qkv)
        for site in attention_sites(unet, cross=False):
            site.module.fuse_qkv()
    accelerate_vae(bundle.vae, options.vae_dtype or torch.float32)
    if use_prepack:  # after every cast and layout change (the packed copies would follow them anyway, see prepack.py)
        prepack_(unet)
        prepack_(bundle.vae)
    unet.fast_options = options
    unet.fast_steppers = {}  # make_stepper's cache: (options, guidance, η, sampler, schedule, spacing, ᾱ) -> FastStepper


def _check_args(bundle: object, options: object) -> None:
    from ..bundle import SDBundle

    if not isinstance(bundle, SDBundle):
        raise ValueError(f"bundle must be an SDBundle (gbsd_core.load(path)), got {type(bundle).__name__}")
    if not isinstance(options, FastOptions):
        raise ValueError(f"options must be a FastOptions, got {type(options).__name__}")


def sdpa_backend(options: FastOptions) -> SDPBackend | None:
    """The `torch.nn.attention.SDPBackend` forced by options.attention, or None."""
    if options.attention not in ("flash", "efficient"):
        return None
    from torch.nn.attention import SDPBackend

    return SDPBackend.FLASH_ATTENTION if options.attention == "flash" else SDPBackend.EFFICIENT_ATTENTION


def make_stepper(bundle: SDBundle, options: FastOptions, guidance_scale: float | None, eta: float = 0.0,
                 sampler: str = "ddim", schedule: str = "normal", spacing: str | None = None) -> FastStepper:
    """A `sampling.Stepper` for `denoise` / `generate(stepper=)`: eager, compiled and/or CUDA-graphed per `options`,
    running the sampler `sampler` / `schedule` / `spacing` (samplers.make_sampler) on the bundle's noise schedule.

    guidance_scale None or 1.0 means no classifier-free guidance (one UNet row per latent). Accelerates the bundle
    first if needed. The stepper is cached on the bundle (its UNet) per (options, guidance, η, sampler, schedule,
    spacing, the bundle's noise schedule): a second call returns the same object, whose compiled step, coefficient tables
    and CUDA graphs (one per shape, with their K/V buffers) serve every later run, so a second `generate` neither
    compiles nor captures again. Steppers of other samplers share the compiled step (it does not specialise on the
    sampler). Close it (or use `with`) after a run to take its K/V cache off the UNet; `release_steppers(bundle)` frees
    the graphs' memory.
    """
    from ..params import check_field
    from ..samplers import make_sampler

    _check_args(bundle, options)
    if guidance_scale is not None:
        check_field("cfg", guidance_scale)  # the rules of GenerationParams' cfg and eta, which the stepper must match
    check_field("eta", eta)
    accelerate(bundle, options)
    guidance = None if guidance_scale is None or guidance_scale == 1.0 else float(guidance_scale)
    spacing = bundle.noise_schedule.spacing if spacing is None else spacing  # None: the model's own (make_sampler)
    key = (options, guidance, float(eta), sampler, schedule, spacing, bundle.noise_schedule, bundle.family.prediction_type)
    cache = bundle.unet.fast_steppers
    stepper = cache.get(key)
    if stepper is None:
        stepper = FastStepper(
            bundle.unet,
            make_sampler(bundle.noise_schedule, bundle.family.prediction_type, sampler, schedule, spacing),
            guidance,
            float(eta),
            cache_context_kv=options.cache_context_kv,
            channels_last=options.channels_last,
            compile_mode=options.compile,
            capture=CudaGraphCapture() if options.cuda_graphs else None,
            sdpa_backend=sdpa_backend(options),
        )
        cache[key] = stepper
    return stepper


def release_steppers(bundle: SDBundle) -> None:
    """Drop every cached stepper of `bundle`, with its CUDA graphs and K/V buffers (the memory they hold)."""
    for stepper in getattr(bundle.unet, "fast_steppers", {}).values():
        stepper.release()
    if hasattr(bundle.unet, "fast_steppers"):
        bundle.unet.fast_steppers = {}

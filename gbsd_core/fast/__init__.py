"""The speed wing: everything that makes sampling fast and nothing the plain algorithm needs.

    from gbsd_core.fast import FastOptions, make_stepper
    with make_stepper(bundle, FastOptions(dtype=torch.float16, channels_last=True, fuse_qkv=True,
                                          cache_context_kv=True), guidance_scale=params.cfg) as step:
        generate(bundle, params, stepper=step)

options.py (what each option does), apply.py (`accelerate`: applying them to a bundle in place; `make_stepper`, cached
per bundle), modules.py (the UNet's module swaps: native half GroupNorm, the Triton modules), vae.py (the VAE's),
attention.py (fused QKV, the per-stage K/V cache, explicit softmax), step.py (the compiled / CUDA-graphed CFG step of
every sampler), prepack.py (CPU weight prepacking), kernels/ (Triton GroupNorm+SiLU and GEGLU, opt-in).
It imports the core and is never imported by it.
"""
from .apply import accelerate, make_stepper, release_steppers
from .options import FastOptions

__all__ = ["FastOptions", "accelerate", "make_stepper", "release_steppers"]

"""gbsd: Generative Bokeh with Stage Diffusion (arXiv 2306.08251) on a from-scratch Stable Diffusion.

Learning how SD works? Start at docs/LEARN.md: walk.py first (prompt to pixels in one function), then in order
  tokenizer, clip_text, unet_blocks, attention, unet      the networks; module names are the checkpoint's keys
  ddim, sampling, pipeline, vae                           DDIM, the GBSD stages and loop, generate, the decode
  sigmas, euler                                           the σ samplers: Euler is DDIM in σ-space
The rest of the core loads, checks and converts (loading, params, family, diffusers_*, ...). Wings, which the core
never imports: fast/ (speed), bokeh/ (scoring, traces, rack focus), cli/ (the `gbsd` command).
`gbsd_core.load(path)` gives an `SDBundle`; importing this package is cheap (heavy modules load on first use).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # Lazy re-export so `import gbsd_core` stays fast (PEP 562).
    if name == "load":
        from .loading import load

        return load
    raise AttributeError(f"module 'gbsd_core' has no attribute {name!r}")

"""gbsd: Generative Bokeh with Stage Diffusion (arXiv 2306.08251) on a from-scratch Stable Diffusion.

Importing this package is cheap: torch is imported, but open_clip, safetensors readers, the CLI and the
reference libraries are not. Heavy modules are imported where they are used.
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

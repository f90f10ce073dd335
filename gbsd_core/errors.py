"""Errors about results rather than inputs. Kept free of torch, so the command line can name them in its error
handler without importing torch (gbsd_core/cli/common.py: `run_main`)."""
from __future__ import annotations


class NonFiniteError(RuntimeError):
    """A run produced NaN or inf values (the sampler's final latents, or the VAE's decoded image). Such an image
    would be written as black or garbage, so no image is made from it; the message says which values were bad."""

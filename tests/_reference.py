"""Reference-library twins of our modules, for parity tests (test-only: diffusers / transformers / open_clip).

The builders live in `bench/reference.py`, shared with the benchmark so its baseline is built exactly as the parity
tests build theirs; this module re-exports them under the names the tests import.
"""
from __future__ import annotations

import sys

from _util import REPO

if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(REPO))

from bench.reference import (  # noqa: E402
    DDIM_CONFIG,
    clip_tokenizer,
    diffusers_sd_pipeline,
    diffusers_unet,
    diffusers_unet_config,
    diffusers_vae,
    transformers_clip,
    transformers_openclip,
    write_clip_vocab,
)
from bench.reference_sdxl import (  # noqa: E402
    diffusers_sdxl_pipeline,
    transformers_bigg,
    transformers_clip_l,
)

__all__ = [
    "DDIM_CONFIG", "clip_tokenizer", "diffusers_sd_pipeline", "diffusers_sdxl_pipeline", "diffusers_unet",
    "diffusers_unet_config", "diffusers_vae", "transformers_bigg", "transformers_clip", "transformers_clip_l",
    "transformers_openclip", "write_clip_vocab",
]

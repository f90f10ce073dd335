"""Small helpers shared by the tests (not a fixture module, import it explicitly)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# The original checkpoints' key lists, emitted by the CompVis / Stability / sgm code (README inside).
LDM_KEYS = REPO / "tests" / "fixtures" / "ldm_keys"
# The golden key list of each family's original checkpoint, in LDM_KEYS.
GOLDEN = {"sd1": "sd1_v1-inference.tsv", "sd2-512": "sd2_v2-inference.tsv", "sd2-768-v": "sd2_v2-inference-v.tsv"}
# diffusers configs of SD1.5 (unet/, vae/, text_encoder/, ...), for diffusers' converters and from_single_file offline.
CONFIGS = Path(__file__).resolve().parent / "configs" / "sd15"


def model_ddim(bundle):
    """The model's own DDIM: its noise schedule, what it predicts (ε or v), the schedule's spacing."""
    from gbsd_core.samplers import make_sampler

    return make_sampler(bundle.noise_schedule, bundle.family.prediction_type)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, in float64: the error measure every parity test reports."""
    ours = ours.detach().double()
    ref = ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def read_keys_tsv(path: Path) -> dict[str, tuple[tuple[int, ...], str, str | None]]:
    """Parse a fixtures/ldm_keys TSV: key -> (shape, dtype, optional-tag or None)."""
    if not path.exists():
        raise FileNotFoundError(f"golden key list {path} is missing")
    out = {}
    for line in path.read_text().splitlines():
        if not line:
            continue
        cols = line.split("\t")
        shape = tuple(int(s) for s in cols[1].split(",")) if cols[1] else ()
        out[cols[0]] = (shape, cols[2], cols[3] if len(cols) > 3 else None)
    return out


def meta_state_dict(rows: dict) -> dict[str, torch.Tensor]:
    """Meta tensors (no memory) of the shapes and dtypes of `read_keys_tsv` rows."""
    dtypes = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
    return {k: torch.empty(shape, dtype=dtypes[dtype], device="meta") for k, (shape, dtype, _) in rows.items()}


def max_pixel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours/255 - ref| of a uint8 image against a reference pipeline's float image in [0, 1] (`output_type="np"`).

    The comparison must be about real pixels, not two saturated images, so a reference with fewer than 20 % of its
    values inside (0.02, 0.98) fails the test."""
    diff = np.abs(ours.astype(np.float64) / 255.0 - ref.astype(np.float64)).max()
    assert 0.2 < np.mean((ref > 0.02) & (ref < 0.98)), "reference image is saturated: the parity check would be empty"
    return float(diff)

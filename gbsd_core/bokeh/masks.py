"""Target-region masks for the sharpness metrics: from cross-attention maps, boxes, or mask files.

Every mask is a numpy bool array [H, W] (True = the object meant to be in focus), the form
``gbsd_core.bokeh.metrics`` takes. Sizes are given as (H, W), numpy order; PIL's ``Image.size`` is (W, H).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OTSU_BINS = 256
_LIGHTNESS = {"YCbCr": 0, "LAB": 0, "HSV": 2}  # the channel that is zero for black alone


def otsu_threshold(values: np.ndarray | torch.Tensor) -> float:
    """Otsu's threshold (Otsu 1979): the split of a histogram that maximises the between-class variance.

    Histogram: 256 equal bins over [min, max] of the data (not over a fixed [0, 255]), so it works for any range;
    bin i holds values in (lo + i*w, lo + (i+1)*w], w = (max - min) / 256 (bin 0 also holds the minimum). For
    each split k (classes = bins 0..k and k+1..255, both non-empty), with bin centres c_i and probabilities p_i:
        omega(k) = sum_{i<=k} p_i,  mu(k) = sum_{i<=k} p_i c_i,  mu_T = mu(255)
        sigma_B^2(k) = (mu_T omega(k) - mu(k))^2 / (omega(k) (1 - omega(k)))
    The first maximising k wins (as in OpenCV). Returns the upper edge of bin k, lo + (k+1)*w: foreground is
    ``values > threshold``. For uint8 data spanning 0..255 the bins are exactly the 256 levels, so this is
    OpenCV's THRESH_OTSU level t plus 255/256. Constant data returns that constant (no foreground).
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold: no values")
    if not np.isfinite(v).all():
        raise ValueError("otsu_threshold: values contain nan or inf")
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return lo
    width = (hi - lo) / OTSU_BINS
    idx = np.clip(np.ceil((v - lo) / width).astype(np.int64) - 1, 0, OTSU_BINS - 1)
    p = np.bincount(idx, minlength=OTSU_BINS) / v.size
    centres = lo + (np.arange(OTSU_BINS) + 0.5) * width
    omega = np.cumsum(p)[:-1]  # split after bin k, k = 0..254
    mu = np.cumsum(p * centres)[:-1]
    mu_t = float((p * centres).sum())
    valid = (omega > 0) & (omega < 1)
    denom = np.where(valid, omega * (1 - omega), 1.0)
    sigma_b = np.where(valid, (mu_t * omega - mu) ** 2 / denom, -1.0)
    k = int(np.argmax(sigma_b))  # argmax returns the first maximum
    return lo + (k + 1) * width


def attention_to_mask(attn: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Cross-attention map of the object's token(s) -> bool mask [H, W] of the image.

    attn: [h, w], any non-negative map (e.g. averaged softmax probabilities of one token at a UNet level).
    Steps: bilinear upsample to ``size`` (align_corners=False, pixel centres as in image resizing), normalise to
    [0, 1] by min/max, keep pixels above the Otsu threshold.
    """
    a = torch.as_tensor(attn).detach().double()
    if a.ndim != 2:
        raise ValueError(f"attention map must be 2-D [h, w], got shape {tuple(a.shape)}")
    height, width = size
    up = F.interpolate(a[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]  # [H, W]
    lo, hi = up.min(), up.max()
    if hi <= lo:
        raise ValueError("attention map is constant: it localises nothing")
    norm = ((up - lo) / (hi - lo)).cpu().numpy()
    return norm > otsu_threshold(norm)


def box_to_mask(box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """Box (x0, y0, x1, y1) in pixels, half-open like PIL crop boxes and Python slices (x0 <= x < x1), -> bool
    mask [H, W]. Fractional edges grow the box to every pixel it touches (floor x0, ceil x1); the box is clipped
    to the image, and an empty result is an error."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box} is empty: need x0 < x1 and y0 < y1")
    height, width = size
    cx0, cy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    cx1, cy1 = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    if cx1 <= cx0 or cy1 <= cy0:
        raise ValueError(f"box {box} lies outside the {width}x{height} (W x H) image")
    mask = np.zeros((height, width), dtype=bool)
    mask[cy0:cy1, cx0:cx1] = True
    return mask


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Read a mask image (PNG or any Pillow format): a pixel is object where any colour channel is nonzero;
    alpha is ignored. ``size`` is the (H, W) of the image it belongs to; a different size is an error (we do
    not resample masks silently: that shifts the region the metrics are measured on).

    Nonzero at any bit depth (16-bit, 32-bit and float greyscale are read as they are, never clipped to 8 bits),
    and "not black" in every colour space: CMYK is converted to RGB (its white is all zeros), and in YCbCr, LAB
    and HSV, whose black is not all zeros (YCbCr's and LAB's is (0, 128, 128)), the lightness channel decides
    (Y, L, V: zero only for black)."""
    with Image.open(path) as img:
        if img.mode == "P":
            img = img.convert("RGBA")
        elif img.mode == "CMYK":
            img = img.convert("RGB")
        arr = np.asarray(img)
        mode = img.mode
    if mode in _LIGHTNESS:
        mask = arr[..., _LIGHTNESS[mode]] != 0
    elif arr.ndim == 3:
        colour = arr[..., :-1] if mode in ("RGBA", "LA", "PA", "RGBa", "La") else arr
        mask = (colour != 0).any(axis=-1)
    else:
        mask = arr != 0
    height, width = size
    if mask.shape != (height, width):
        raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (W x H) but the image is {width}x{height}")
    return mask

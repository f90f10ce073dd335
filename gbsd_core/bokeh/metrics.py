"""Sharpness metrics used to judge bokeh: is the focused object sharp and the rest blurred?

GBSD (arXiv 2306.08251, Table 1) scores the focused object with the variance of the Laplacian and the Brenner
gradient; we add Tenengrad (mean squared Sobel magnitude) as a third, independent opinion. Every metric works on
a grayscale float64 image with values in [0, 255], over the whole image or over a region given as a boolean
mask of the same size.

Conventions, chosen so the numbers match OpenCV (the tool such papers use) and can be checked against it:
- Filters are correlations with 3x3 kernels and a reflect-101 border (OpenCV's BORDER_DEFAULT:
  ``gfedcb|abcdefgh|gfedcba``, the edge pixel is not repeated), so ``variance_of_laplacian(g)`` equals
  ``cv2.Laplacian(g, cv2.CV_64F).var()``.
- The filter response is always computed on the WHOLE image and only then restricted to the mask, so a region's
  score near its boundary sees the real neighbours, not a border rule.
- Coordinates: arrays are indexed ``[y, x]``; x is the column (width) axis.

Pure numpy (no OpenCV at runtime); the tests compare against OpenCV.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

# 3x3 four-neighbour Laplacian: OpenCV's cv2.Laplacian with the default ksize=1.
LAPLACIAN_KERNEL = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
# 3x3 Sobel kernels as OpenCV's cv2.Sobel(ksize=3) applies them (correlation, so Gx > 0 where I grows with x).
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
SOBEL_Y = SOBEL_X.T.copy()

# OpenCV's integer RGB->gray weights for 8-bit images (imgproc color_rgb, RGB2Gray<uchar>, shift 15):
# round(0.299 * 2**15) = 9798, round(0.587 * 2**15) = 19235, and B takes the rest, 32768 - 9798 - 19235 = 3735,
# so white stays 255. Measured bit-exact against cv2.cvtColor (opencv 5.0); the 2**14 weights (4899, 9617, 1868)
# of other conversions differ from it on ~0.2% of random pixels.
_GRAY_SHIFT = 15
_GRAY_WEIGHTS_FIXED = (9798, 19235, 3735)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def to_gray(img: Image.Image | np.ndarray) -> np.ndarray:
    """RGB image -> grayscale float64 [H, W] in [0, 255], ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B.

    Rounding: for 8-bit input (a PIL image or a uint8 array) the result is rounded to whole levels exactly as
    OpenCV's ``cvtColor(RGB2GRAY)`` does, i.e. ``(9798 R + 19235 G + 3735 B + 2**14) >> 15`` (fixed point,
    round-half-up), so it equals cv2 bit for bit. For float input no rounding is applied: the plain weighted sum.
    A 2-D array or an "L" image is taken as already gray. Alpha channels are ignored.
    """
    if isinstance(img, Image.Image):
        if img.mode in ("L", "I", "I;16", "F"):
            return np.asarray(img, dtype=np.float64)
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr.astype(np.float64)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"to_gray expects an [H, W, 3|4] RGB(A) image or an [H, W] gray one, got shape {arr.shape}")
    rgb = arr[..., :3]
    if arr.dtype == np.uint8:
        r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
        wr, wg, wb = _GRAY_WEIGHTS_FIXED
        y = (wr * r + wg * g + wb * b + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT
        return y.astype(np.float64)
    rgb = rgb.astype(np.float64)
    wr, wg, wb = _GRAY_WEIGHTS
    return wr * rgb[..., 0] + wg * rgb[..., 1] + wb * rgb[..., 2]


def _as_gray(gray: np.ndarray) -> np.ndarray:
    g = np.asarray(gray, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image [H, W], got shape {g.shape}; convert RGB with to_gray()")
    return g


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The mask as a bool array of the image's shape (all True when None); raise on a wrong size or an empty mask."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        # 0/1 vs 0/255 vs attention weights are ambiguous; make the caller say `mask != 0` or `mask > t`.
        raise TypeError(f"mask must be a boolean array, got dtype {m.dtype}")
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} does not match image shape {tuple(shape)}")
    if not m.any():
        raise ValueError("mask is empty: it selects no pixels")
    return m


def filter3x3(gray: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate ``gray`` [H, W] with a 3x3 ``kernel``: out[y, x] = sum_{i,j} k[i, j] * I[y+i-1, x+j-1], with the
    reflect-101 border (numpy's ``mode="reflect"`` is exactly OpenCV's BORDER_REFLECT_101)."""
    g = _as_gray(gray)
    h, w = g.shape
    # numpy reflects a 1-pixel axis onto itself, as OpenCV's borderInterpolate does.
    p = np.pad(g, 1, mode="reflect")
    out = np.zeros_like(g)
    for i in range(3):
        for j in range(3):
            if kernel[i, j] != 0:
                out += kernel[i, j] * p[i:i + h, j:j + w]
    return out


def laplacian(gray: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian response L = I[y-1,x] + I[y+1,x] + I[y,x-1] + I[y,x+1] - 4 I[y,x], reflect-101."""
    return filter3x3(gray, LAPLACIAN_KERNEL)


def variance_of_laplacian(gray: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Variance of the Laplacian (Pech-Pacheco et al. 2000), the paper's main bokeh metric.

    VoL = (1/N) * sum_{p in M} (L(p) - mean_M L)^2,  L = laplacian(I) on the whole image, M = mask (N pixels),
    i.e. the population variance (ddof=0, like numpy's ``.var()``) of the response over the mask's pixels.
    """
    g = _as_gray(gray)
    m = _check_mask(mask, g.shape)
    return float(laplacian(g)[m].var())


@dataclass(frozen=True)
class BrennerScore:
    """Brenner gradient over a region: ``sum`` grows with the region's area, ``mean`` (= sum / pairs) does not."""

    sum: float
    mean: float


def brenner(gray: np.ndarray, mask: np.ndarray | None = None) -> BrennerScore:
    """Brenner gradient (Brenner et al. 1976), horizontal, step 2.

    sum  = sum over pairs with (x, y) in M and x + 2 < W of (I[y, x+2] - I[y, x])^2
    mean = sum / (number of such pairs)
    No border rule is needed: a pair whose right pixel would fall outside the image is not counted.
    Raises ValueError when the mask has no countable pair (e.g. it only covers the last two columns).
    """
    g = _as_gray(gray)
    m = _check_mask(mask, g.shape)
    diff2 = (g[:, 2:] - g[:, :-2]) ** 2  # [H, W-2], indexed by the left pixel x
    left = m[:, :-2]
    n = int(left.sum())
    if n == 0:
        raise ValueError("brenner: no pixel pair (x, x+2) starts inside the mask and ends inside the image")
    total = float(diff2[left].sum())
    return BrennerScore(sum=total, mean=total / n)


def tenengrad(gray: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Tenengrad (Krotkov 1987): mean over M of Gx^2 + Gy^2, with Gx, Gy the 3x3 Sobel responses (reflect-101),
    i.e. ``cv2.Sobel(I, CV_64F, 1, 0, ksize=3)`` and ``(0, 1)``. No threshold is applied."""
    g = _as_gray(gray)
    m = _check_mask(mask, g.shape)
    gx = filter3x3(g, SOBEL_X)
    gy = filter3x3(g, SOBEL_Y)
    return float((gx * gx + gy * gy)[m].mean())


def local_variance_of_laplacian(gray: np.ndarray, window: int = 16) -> np.ndarray:
    """Variance of the Laplacian in each non-overlapping ``window`` x ``window`` tile -> [ceil(H/w), ceil(W/w)].

    The response is computed on the whole image (as in ``variance_of_laplacian``); tiles at the right/bottom edge
    may be smaller than ``window`` and use only their own pixels.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    lap = laplacian(gray)
    h, w = lap.shape
    th, tw = -(-h // window), -(-w // window)
    padded = np.full((th * window, tw * window), np.nan)
    padded[:h, :w] = lap
    tiles = padded.reshape(th, window, tw, window).transpose(0, 2, 1, 3).reshape(th, tw, -1)
    return np.nanvar(tiles, axis=-1)


def _ratio(a: float, b: float) -> float:
    # A perfectly flat background (0) makes the ratio infinite rather than an exception; 0/0 is undefined (nan).
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


@dataclass(frozen=True)
class SharpnessValues:
    """All metrics for one region (or, from ``ratio``, the element-wise ratios of two such sets)."""

    laplacian_var: float
    brenner_mean: float
    brenner_sum: float
    tenengrad: float

    @classmethod
    def measure(cls, gray: np.ndarray, mask: np.ndarray | None = None) -> "SharpnessValues":
        b = brenner(gray, mask)
        return cls(variance_of_laplacian(gray, mask), b.mean, b.sum, tenengrad(gray, mask))

    def ratio(self, other: "SharpnessValues") -> "SharpnessValues":
        """self / other for every metric (inf where other is 0 and self is not, nan for 0/0)."""
        return SharpnessValues(**{f.name: _ratio(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})


@dataclass(frozen=True)
class SharpnessReport:
    """Sharpness of one image's target region (the object meant to be in focus) and of its background.

    ``bokeh_ratio = target / background`` per metric: > 1 means the object is sharper than its surroundings.
    Compare ``brenner_mean`` across regions or images, not ``brenner_sum``: the sum grows with the area.
    """

    target: SharpnessValues
    background: SharpnessValues

    @classmethod
    def measure(cls, gray: np.ndarray, target_mask: np.ndarray) -> "SharpnessReport":
        """Measure ``gray`` [H, W] on ``target_mask`` (bool [H, W]) and on its complement."""
        g = _as_gray(gray)
        m = _check_mask(target_mask, g.shape)
        if m.all():
            raise ValueError("target mask covers the whole image: there is no background to compare with")
        return cls(SharpnessValues.measure(g, m), SharpnessValues.measure(g, ~m))

    @property
    def bokeh_ratio(self) -> SharpnessValues:
        return self.target.ratio(self.background)

    def caption(self) -> str:
        """Short label for a contact sheet: target and background variance of Laplacian, e.g. 'T 95.5 / B 12.1'."""
        return f"T {self.target.laplacian_var:.1f} / B {self.background.laplacian_var:.1f}"


@dataclass(frozen=True)
class SharpnessComparison:
    """GBSD / baseline ratios: ``target`` compares the focused objects (the paper's 3.81x VoL, 3.10x Brenner);
    ``bokeh_ratio`` compares the target/background contrasts."""

    target: SharpnessValues
    bokeh_ratio: SharpnessValues


def compare(gbsd: SharpnessReport, baseline: SharpnessReport) -> SharpnessComparison:
    """Ratios GBSD / baseline for every metric, on the target region and on the bokeh ratio."""
    return SharpnessComparison(
        target=gbsd.target.ratio(baseline.target),
        bokeh_ratio=gbsd.bokeh_ratio.ratio(baseline.bokeh_ratio),
    )

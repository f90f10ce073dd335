"""Sharpness metrics and masks: hand-computed values, agreement with OpenCV, and behaviour (blur, masks, errors).

OpenCV is test-only; gbsd_core.metrics / masks are numpy + torch.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from gbsd_core.bokeh.metrics import (
    SharpnessReport,
    SharpnessValues,
    brenner,
    compare,
    local_variance_of_laplacian,
    tenengrad,
    to_gray,
    variance_of_laplacian,
)

ODD_SHAPES = [(1, 1), (1, 9), (9, 1), (2, 3), (5, 5), (17, 31), (64, 48)]


def _corner_image() -> np.ndarray:
    g = np.zeros((5, 5))
    g[0, 0] = 100.0
    return g


# ---------------------------------------------------------------- hand-computed values


def test_laplacian_single_bright_pixel_in_the_middle():
    # 5x5 zeros with 100 at (2,2): response -4*100 = -400 at the centre, +100 at its four neighbours, 0 elsewhere.
    # mean = (-400 + 4*100)/25 = 0; variance = (400^2 + 4*100^2)/25 = 200000/25 = 8000.
    g = np.zeros((5, 5))
    g[2, 2] = 100.0
    assert variance_of_laplacian(g) == 8000.0


def test_laplacian_corner_pixel_uses_reflect101():
    # 5x5 zeros with 100 at the corner (0,0). Reflect-101 mirrors row -1 onto row 1 and column -1 onto column 1
    # (both 0 here), so the response is L(0,0) = 0 + 0 + 0 + 0 - 400 = -400, L(0,1) = L(1,0) = +100, 0 elsewhere.
    # (A replicate border would give L(0,0) = 100 + 100 - 400 = -200. A zero border happens to agree on this image;
    # the next case tells it apart.)
    # mean = (-400 + 200)/25 = -8;  E[L^2] = (160000 + 2*10000)/25 = 7200;  var = 7200 - 64 = 7136.
    assert variance_of_laplacian(_corner_image()) == pytest.approx(7136.0, rel=1e-12)
    # Mask = {(0,0), (0,1)}: values -400, 100 -> mean -150, var = (250^2 + 250^2)/2 = 62500.
    m = np.zeros((5, 5), dtype=bool)
    m[0, 0] = m[0, 1] = True
    assert variance_of_laplacian(_corner_image(), m) == pytest.approx(62500.0, rel=1e-12)


def test_laplacian_pixel_next_to_the_corner_tells_borders_apart():
    # 5x5 zeros with 100 at (1,1). Reflect-101 maps row -1 to row 1, so L(0,1) = I(1,1) [down] + I(-1->1, 1) [up]
    # = 200, and likewise L(1,0) = 200; L(1,1) = -400; L(1,2) = L(2,1) = 100; all else 0 (e.g. L(0,0) reads (1,0)
    # and (0,1), both 0). Sum = 200 -> mean 8; sum of squares = 160000 + 2*40000 + 2*10000 = 260000 -> E[L^2] = 10400;
    # var = 10400 - 64 = 10336. (Zero or replicate borders give L(0,1) = L(1,0) = 100 and var 8000.)
    g = np.zeros((5, 5))
    g[1, 1] = 100.0
    assert variance_of_laplacian(g) == pytest.approx(10336.0, rel=1e-12)


def test_tenengrad_corner_pixel_by_hand():
    # Same corner image. Sobel Gx(y,x) = sum_dy w(dy) * (I[y+dy, x+1] - I[y+dy, x-1]), w = (1, 2, 1), and Gy alike.
    # With reflect-101 the only pixels whose 3x3 window contains (0,0) are (0,0), (0,1), (1,0), (1,1)
    # (index -1 maps to 1, never to 0). (0,1) sees it at dx=-1, dy=0: Gx = -2*100 = -200, Gy = 0.
    # (1,0): Gy = -200, Gx = 0. (1,1) sees it at dx=-1, dy=-1: Gx = Gy = -100. (0,0) sees it at dx=dy=0: 0.
    # Sum of Gx^2+Gy^2 = 40000 + 40000 + 20000 = 100000 over 25 pixels -> 4000.
    assert tenengrad(_corner_image()) == pytest.approx(4000.0, rel=1e-12)


def test_brenner_vertical_step_edge_by_hand():
    # 4 rows of [0, 0, 10, 10, 10]. Pairs (x, x+2) with x+2 < 5: x = 0, 1, 2.
    # x=0: (10-0)^2 = 100, x=1: (10-0)^2 = 100, x=2: (10-10)^2 = 0 -> 200 per row, 800 in all over 12 pairs.
    g = np.tile(np.array([0.0, 0.0, 10.0, 10.0, 10.0]), (4, 1))
    b = brenner(g)
    assert b.sum == 800.0
    assert b.mean == pytest.approx(800.0 / 12.0, rel=1e-15)
    # Left two columns only: 8 pairs, all across the edge -> sum 800, mean 100.
    left = np.zeros_like(g, dtype=bool)
    left[:, :2] = True
    assert brenner(g, left).sum == 800.0 and brenner(g, left).mean == 100.0
    # Columns 2..4: only x=2 starts a pair -> 4 pairs of 0.
    right = ~left
    assert brenner(g, right).sum == 0.0 and brenner(g, right).mean == 0.0
    # Columns 3..4: no pair fits inside the image.
    last = np.zeros_like(g, dtype=bool)
    last[:, 3:] = True
    with pytest.raises(ValueError, match="no pixel pair"):
        brenner(g, last)
    # Tenengrad on the same step, by hand: rows are equal so Gy = 0; Gx(x) = 4*(I[x+1] - I[x-1]) with column -1 -> 1
    # and column 5 -> 3: x=0: 4*(0-0)=0, x=1: 4*10=40, x=2: 40, x=3: 4*(10-10)=0, x=4: 0 -> mean of squares
    # (1600+1600)/5 = 640.
    assert tenengrad(g) == pytest.approx(640.0, rel=1e-12)


def test_to_gray_by_hand():
    # Pure colours, uint8, OpenCV's 15-bit fixed point: R (9798*255 + 16384) >> 15 = 2514874 >> 15 = 76 (76.75),
    # G (19235*255 + 16384) >> 15 = 4921309 >> 15 = 150 (150.19), B (3735*255 + 16384) >> 15 = 968809 >> 15 = 29.
    # White: (32768*255 + 16384) >> 15 = 255. Mid-gray 128 stays 128.
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    assert to_gray(px).tolist() == [[76.0, 150.0, 29.0]]
    assert to_gray(np.array([[[255, 255, 255], [128, 128, 128]]], dtype=np.uint8)).tolist() == [[255.0, 128.0]]
    # Float input is not rounded.
    assert to_gray(px.astype(np.float64)) == pytest.approx(np.array([[76.245, 149.685, 29.07]]), rel=1e-12)


# ---------------------------------------------------------------- agreement with OpenCV


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_metrics_match_opencv(shape):
    rng = np.random.default_rng(1000 * shape[0] + shape[1])
    g = rng.uniform(0, 255, size=shape)
    ref_vol = cv2.Laplacian(g, cv2.CV_64F).var()
    gx = cv2.Sobel(g, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_64F, 0, 1, ksize=3)
    ref_ten = (gx**2 + gy**2).mean()
    vol, ten = variance_of_laplacian(g), tenengrad(g)
    err_vol = abs(vol - ref_vol) / max(ref_vol, 1e-300)
    err_ten = abs(ten - ref_ten) / max(ref_ten, 1e-300)
    print(f"{shape}: VoL {vol:.6g} rel err {err_vol:.2e}; Tenengrad {ten:.6g} rel err {err_ten:.2e}")
    assert err_vol <= 1e-9 or abs(vol - ref_vol) <= 1e-9
    assert err_ten <= 1e-9 or abs(ten - ref_ten) <= 1e-9
    # Masked: the response is restricted after filtering, so it must equal OpenCV's response indexed by the mask.
    m = rng.random(shape) < 0.5
    m.flat[0] = True
    assert variance_of_laplacian(g, m) == pytest.approx(cv2.Laplacian(g, cv2.CV_64F)[m].var(), rel=1e-9, abs=1e-9)
    assert tenengrad(g, m) == pytest.approx((gx**2 + gy**2)[m].mean(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 64), (257, 255)])
def test_to_gray_matches_opencv(shape):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ref = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
    np.testing.assert_array_equal(to_gray(rgb), ref)
    np.testing.assert_array_equal(to_gray(Image.fromarray(rgb)), ref)
    np.testing.assert_array_equal(to_gray(Image.fromarray(rgb).convert("RGBA")), ref)  # alpha ignored
    f = rng.uniform(0, 255, size=(*shape, 3)).astype(np.float32)
    np.testing.assert_allclose(to_gray(f), cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), rtol=1e-5, atol=1e-4)


def test_brenner_matches_direct_formula_on_random_image():
    # Independent formulation: explicit loop over pixels (x, y), counting a pair when x + 2 < W.
    rng = np.random.default_rng(5)
    g = rng.uniform(0, 255, size=(6, 9))
    m = rng.random(g.shape) < 0.4
    total, n = 0.0, 0
    for y in range(g.shape[0]):
        for x in range(g.shape[1] - 2):
            if m[y, x]:
                total += (g[y, x + 2] - g[y, x]) ** 2
                n += 1
    b = brenner(g, m)
    assert b.sum == pytest.approx(total, rel=1e-12) and b.mean == pytest.approx(total / n, rel=1e-12)


# ---------------------------------------------------------------- behaviour


def _textured(shape=(64, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=shape)


def test_blur_lowers_every_metric():
    g = _textured()
    blurred = cv2.GaussianBlur(g, (0, 0), sigmaX=2.0)
    sharp, soft = SharpnessValues.measure(g), SharpnessValues.measure(blurred)
    print(f"sharp {sharp}\nblurred {soft}")
    assert soft.laplacian_var < sharp.laplacian_var / 10
    assert soft.brenner_mean < sharp.brenner_mean / 2 and soft.brenner_sum < sharp.brenner_sum / 2
    assert soft.tenengrad < sharp.tenengrad / 2


def _half_sharp(shape=(32, 40)) -> tuple[np.ndarray, np.ndarray]:
    """Left half noise, right half flat 128; returns (image, left-half mask)."""
    g = np.full(shape, 128.0)
    half = shape[1] // 2
    g[:, :half] = _textured((shape[0], half), seed=1)
    left = np.zeros(shape, dtype=bool)
    left[:, :half] = True
    return g, left


def test_masks_restrict_to_the_region():
    g, left = _half_sharp()
    half = left.sum(axis=1)[0]
    # The flat half, minus its first column (whose 3x3 window reaches into the noise): every metric is exactly 0.
    flat = np.zeros_like(left)
    flat[:, half + 1:] = True
    assert variance_of_laplacian(g, flat) == 0.0
    assert tenengrad(g, flat) == 0.0
    assert brenner(g, flat).sum == 0.0
    assert variance_of_laplacian(g, left) > 1000.0
    assert brenner(g, left).mean > 1000.0 and tenengrad(g, left) > 1000.0

    report = SharpnessReport.measure(g, left)
    print(f"bokeh ratio {report.bokeh_ratio}; caption {report.caption()}")
    assert report.background.laplacian_var < report.target.laplacian_var
    assert report.bokeh_ratio.laplacian_var > 10 and report.bokeh_ratio.tenengrad > 1
    assert report.caption().startswith("T ") and " / B " in report.caption()
    # Swapping target and background inverts the ratio.
    swapped = SharpnessReport.measure(g, ~left)
    assert swapped.bokeh_ratio.laplacian_var == pytest.approx(1 / report.bokeh_ratio.laplacian_var, rel=1e-12)


def test_compare_gives_gbsd_over_baseline():
    g, left = _half_sharp()
    gbsd = SharpnessReport.measure(g, left)
    # Baseline: the same scene with the object blurred too.
    base = SharpnessReport.measure(cv2.GaussianBlur(g, (0, 0), sigmaX=1.5), left)
    c = compare(gbsd, base)
    print(f"GBSD / baseline on target: {c.target}")
    assert c.target.laplacian_var == pytest.approx(gbsd.target.laplacian_var / base.target.laplacian_var)
    assert c.target.brenner_mean > 1 and c.target.tenengrad > 1 and c.target.laplacian_var > 1
    assert c.bokeh_ratio.laplacian_var == pytest.approx(gbsd.bokeh_ratio.laplacian_var / base.bokeh_ratio.laplacian_var)


def test_perfectly_flat_background_gives_infinite_ratio():
    g = np.zeros((10, 10))
    g[:, :5] = _textured((10, 5))
    m = np.zeros_like(g, dtype=bool)
    m[:, :5] = True
    bg = np.zeros_like(m)
    bg[:, 7:] = True
    flat_bg = SharpnessValues.measure(g, bg)
    assert flat_bg.laplacian_var == 0.0
    assert SharpnessValues.measure(g, m).ratio(flat_bg).laplacian_var == float("inf")


def test_mask_errors():
    g = np.zeros((5, 6))
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(5, 6\)"):
        variance_of_laplacian(g, np.ones((6, 5), dtype=bool))
    for fn in (variance_of_laplacian, tenengrad, brenner):
        with pytest.raises(ValueError, match="empty"):
            fn(g, np.zeros((5, 6), dtype=bool))
        with pytest.raises(TypeError, match="boolean"):
            fn(g, np.ones((5, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match="to_gray"):
        variance_of_laplacian(np.zeros((5, 6, 3)))
    with pytest.raises(ValueError, match="whole image"):
        SharpnessReport.measure(g, np.ones((5, 6), dtype=bool))


def test_local_variance_of_laplacian_tiles():
    g = _textured((20, 36))
    tiles = local_variance_of_laplacian(g, window=8)
    assert tiles.shape == (3, 5)  # ceil(20/8), ceil(36/8)
    lap = cv2.Laplacian(g, cv2.CV_64F)
    assert tiles[1, 2] == pytest.approx(lap[8:16, 16:24].var(), rel=1e-12)
    assert tiles[2, 4] == pytest.approx(lap[16:20, 32:36].var(), rel=1e-12)  # partial corner tile


# ---------------------------------------------------------------- masks



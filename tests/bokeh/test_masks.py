"""Target masks (gbsd_core/bokeh/masks.py): Otsu's threshold against OpenCV, attention maps, boxes and mask files."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from gbsd_core.bokeh.masks import attention_to_mask, box_to_mask, load_mask, otsu_threshold


def _bimodal_uint8(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.concatenate([rng.normal(60, 18, 4000), rng.normal(185, 22, 2500), [0, 255]])
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_opencv_and_separates_modes(seed):
    a = _bimodal_uint8(seed)
    ref, _ = cv2.threshold(a.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    t = otsu_threshold(a)
    print(f"seed {seed}: ours {t:.3f}, OpenCV {ref}")
    assert abs(t - ref) <= 1.0
    assert 60 + 2 * 18 < t < 185 - 2 * 22  # between the modes
    # Same partition of the data (OpenCV: foreground = value > ref).
    assert np.array_equal(a > t, a > ref)


def test_otsu_on_float_range_and_edge_cases():
    rng = np.random.default_rng(0)
    # Two well separated clusters in an arbitrary float range: the threshold falls in the gap.
    v = np.concatenate([rng.uniform(-3.0, -2.0, 500), rng.uniform(5.0, 7.0, 300)])
    t = otsu_threshold(torch.from_numpy(v))
    assert -2.0 <= t < 5.0
    assert (v > t).sum() == 300
    assert otsu_threshold(np.full(10, 4.0)) == 4.0
    with pytest.raises(ValueError):
        otsu_threshold(np.array([]))
    with pytest.raises(ValueError):
        otsu_threshold(np.array([1.0, np.nan]))


def test_attention_to_mask_recovers_blob():
    # 16x16 map with a Gaussian blob centred at (x=10.5, y=4.5) in map cells, sigma 1.5 cells, on a weak noise floor.
    h = w = 16
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    noise = torch.rand(h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    attn = torch.exp(-((xx - 10.5) ** 2 + (yy - 4.5) ** 2) / (2 * 1.5**2)) + 0.02 * noise
    size = (128, 128)  # 8 image pixels per map cell
    mask = attention_to_mask(attn, size)
    assert mask.shape == size and mask.dtype == np.bool_
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    # Map cell c covers pixels [8c, 8c+8), so the blob centre (10.5, 4.5) cells is pixel (88, 40) (x, y).
    print(f"mask centroid (x={cx:.1f}, y={cy:.1f}), area {mask.sum()}")
    assert abs(cx - 88) < 3 and abs(cy - 40) < 3
    disk = (np.arange(128)[None, :] + 0.5 - 88) ** 2 + (np.arange(128)[:, None] + 0.5 - 40) ** 2 < (8 * 1.5 * 2) ** 2
    iou = (mask & disk).sum() / (mask | disk).sum()
    print(f"IoU with a 2-sigma disk {iou:.3f}")
    assert iou > 0.5
    assert not mask[100:, :].any() and not mask[:, :40].any()  # far from the blob: background
    with pytest.raises(ValueError, match="constant"):
        attention_to_mask(torch.ones(4, 4), (8, 8))


def test_box_to_mask():
    m = box_to_mask((1, 2, 4, 3), (5, 6))
    expected = np.zeros((5, 6), dtype=bool)
    expected[2:3, 1:4] = True  # half-open: x in {1,2,3}, y in {2}
    assert np.array_equal(m, expected)
    assert np.array_equal(box_to_mask((0.5, 1.2, 2.1, 2.0), (5, 6))[1:2, 0:3], np.ones((1, 3), dtype=bool))
    assert box_to_mask((0.5, 1.2, 2.1, 2.0), (5, 6)).sum() == 3
    assert box_to_mask((-5, -5, 100, 100), (5, 6)).all()  # clipped
    with pytest.raises(ValueError):
        box_to_mask((3, 0, 3, 4), (5, 6))
    with pytest.raises(ValueError, match="outside"):
        box_to_mask((10, 10, 12, 12), (5, 6))


def test_load_mask(tmp_path):
    arr = np.zeros((5, 7), dtype=np.uint8)
    arr[1:3, 2:6] = 255
    arr[4, 0] = 1  # any nonzero value is object
    Image.fromarray(arr).save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png", (5, 7))
    assert np.array_equal(m, arr != 0)
    # RGBA: colour decides, alpha is ignored.
    rgba = np.zeros((5, 7, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[2, 3, 0] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    m2 = load_mask(tmp_path / "c.png", (5, 7))
    assert m2.sum() == 1 and m2[2, 3]
    with pytest.raises(ValueError, match=r"7x5 \(W x H\).*5x7"):
        load_mask(tmp_path / "m.png", (7, 5))


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB"])
def test_a_mask_in_a_colour_space_means_not_black(mode, tmp_path):
    """White object on black, stored in a colour space whose black (or white) is not all zeros: the object is
    still the non-black pixels (CMYK's white is all zeros, YCbCr's and LAB's black is (0, 128, 128))."""
    arr = np.zeros((5, 7, 3), dtype=np.uint8)
    arr[1:3, 2:6] = 255
    Image.fromarray(arr).convert(mode).save(tmp_path / "m.tif")
    with Image.open(tmp_path / "m.tif") as im:
        assert im.mode == mode
    assert np.array_equal(load_mask(tmp_path / "m.tif", (5, 7)), arr.any(axis=-1))


def test_a_16_bit_mask_keeps_its_small_values(tmp_path):
    """16-bit levels 1..255 are object too (nonzero at the file's own depth, nothing clipped or scaled away)."""
    arr = np.zeros((5, 7), dtype=np.uint16)
    arr[1, 1], arr[2, 2], arr[3, 3] = 1, 255, 65535
    Image.fromarray(arr).save(tmp_path / "m16.png")
    assert np.array_equal(load_mask(tmp_path / "m16.png", (5, 7)), arr != 0)

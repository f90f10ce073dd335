"""Pictures: contact sheet layout, mask overlay, sharpness heatmap."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gbsd_core.bokeh.metrics import to_gray
from gbsd_core.bokeh.pictures import colour_ramp, contact_sheet, overlay_mask, sharpness_heatmap


def _solid(colour: tuple[int, int, int], size=(24, 16)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_contact_sheet_places_every_cell_once():
    # 2x3 grid of distinct solid colours that text (black) and background (white) never use.
    colours = [[(200, 30, 30), (30, 200, 30), (30, 30, 200)], [(200, 200, 30), (30, 200, 200), (200, 30, 200)]]
    cells = [[_solid(c) for c in row] for row in colours]
    sheet = contact_sheet(cells, ["a=0.2", "a=0.8"], ["s=1", "s=2", "s=4"],
                          [["T 95.5 / B 12.1"] * 3, ["T 1.0 / B 1.0"] * 3])
    w, h = sheet.size
    print(f"sheet {w}x{h}")
    assert sheet.mode == "RGB"
    assert w >= 3 * 24 and h >= 2 * 16
    arr = np.asarray(sheet)
    for row in colours:
        for c in row:
            hit = np.all(arr == np.array(c, dtype=np.uint8), axis=-1)
            assert hit.sum() == 24 * 16  # pasted once, not covered by text
            ys, xs = np.nonzero(hit)
            assert xs.max() - xs.min() + 1 == 24 and ys.max() - ys.min() + 1 == 16  # one contiguous rectangle
    # Cells of row 0 sit above row 1, columns left to right.
    def top_left(c):
        ys, xs = np.nonzero(np.all(arr == np.array(c, dtype=np.uint8), axis=-1))
        return xs.min(), ys.min()
    assert top_left(colours[0][0])[1] < top_left(colours[1][0])[1]
    assert top_left(colours[0][0])[0] < top_left(colours[0][1])[0] < top_left(colours[0][2])[0]
    # Text was drawn: there are dark pixels (labels and captions), and captions add height.
    assert (arr.sum(axis=-1) < 100).any()
    plain = contact_sheet(cells, ["a=0.2", "a=0.8"], ["s=1", "s=2", "s=4"])
    assert plain.size[0] == w and plain.size[1] < h


def test_contact_sheet_shape_errors():
    cells = [[_solid((1, 2, 3))] * 2]
    with pytest.raises(ValueError):
        contact_sheet(cells, ["r"], ["c"])
    with pytest.raises(ValueError):
        contact_sheet(cells, ["r"], ["c1", "c2"], [["only one"]])
    with pytest.raises(ValueError):
        contact_sheet([[_solid((1, 2, 3))], []], ["r1", "r2"], ["c"])


def test_overlay_changes_only_masked_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:12, 8:20] = True
    out = np.asarray(overlay_mask(Image.fromarray(rgb), mask, color=(255, 0, 0), alpha=0.4))
    assert out.shape == rgb.shape
    np.testing.assert_array_equal(out[~mask], rgb[~mask])
    # Masked pixels: 0.6 * pixel + 0.4 * (255, 0, 0), rounded (formula written out here, not taken from the code).
    expected = np.rint(0.6 * rgb[mask].astype(np.float64) + 0.4 * np.array([255.0, 0.0, 0.0]))
    np.testing.assert_array_equal(out[mask], expected.astype(np.uint8))
    assert (out[mask] != rgb[mask]).any()
    with pytest.raises(ValueError, match="does not match"):
        overlay_mask(Image.fromarray(rgb), mask.T)


def test_colour_ramp_brightens_monotonically():
    t = np.linspace(0, 1, 101)
    rgb = colour_ramp(t)
    assert rgb.shape == (101, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0]) == (0, 0, 0) and tuple(rgb[-1]) == (255, 255, 255)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) >= -0.6)  # non-decreasing up to uint8 rounding


@pytest.mark.parametrize("size", [(64, 48), (50, 37)])  # (W, H), the second not a multiple of the window
def test_heatmap_is_hotter_on_the_sharp_half(size):
    w, h = size
    rng = np.random.default_rng(1)
    arr = np.full((h, w, 3), 128, dtype=np.uint8)
    arr[:, : w // 2] = rng.integers(0, 256, size=(h, w // 2, 3), dtype=np.uint8)
    heat = sharpness_heatmap(Image.fromarray(arr), window=8)
    assert heat.size == (w, h) and heat.mode == "RGB"
    brightness = to_gray(heat)
    sharp_half, flat_half = brightness[:, : w // 2 - 8].mean(), brightness[:, w // 2 + 8:].mean()
    print(f"{size}: heat brightness sharp {sharp_half:.1f}, flat {flat_half:.1f}")
    assert sharp_half > 150 and flat_half == 0.0
    # A common scale: with vmax far above this image's sharpest tile the whole map gets darker.
    dim = to_gray(sharpness_heatmap(Image.fromarray(arr), window=8, vmax=1e12))
    assert dim[:, : w // 2 - 8].mean() < sharp_half

"""Pictures: contact sheet layout, mask overlay, sharpness heatmap."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gbsd_core.bokeh.metrics import to_gray
from gbsd_core.bokeh.pictures import (
    MARK,
    MARK_WIDTH,
    PAD,
    captioned,
    colour_ramp,
    contact_sheet,
    fit_cell,
    overlay_mask,
    save_animation,
    sharpness_heatmap,
    tile,
)


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


# ------------------------------------------------------------------------------ frame strips (traces, rack focus)


def test_fit_cell_enlarges_small_frames_by_whole_factors_and_shrinks_large_ones():
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    big = fit_cell(small)
    assert big.size == (192, 192)  # 3x: the first whole factor reaching 160
    assert np.array_equal(np.asarray(big)[::3, ::3], np.asarray(small))  # nearest: pixels stay pixels
    assert fit_cell(Image.new("RGB", (512, 384))).size == (256, 192)
    assert fit_cell(Image.new("RGB", (200, 100))).size == (200, 100)


def test_captioned_cells_share_one_size_and_marks_paint_a_bar():
    ims = [_solid((30, 200, 30), (96, 16)), _solid((30, 30, 200), (80, 12))]
    cells = captioned(ims, ["one line", "two\nlines"], marks={1})
    assert len({c.size for c in cells}) == 1
    w, h = cells[0].size
    assert w == 96 + 2 * MARK_WIDTH and h > 16 + 2 * 12  # room for two caption lines under the largest image
    one_line = captioned(ims[:1], ["one line"])[0]
    assert one_line.size[1] < h
    wide = captioned(ims[:1], ["a caption line much wider than the ninety-six pixels of the image"])[0]
    assert wide.width > 250  # the cell grows to its widest caption line instead of cutting it
    for i, cell in enumerate(cells):
        arr = np.asarray(cell)
        bar = np.all(arr[:, :MARK_WIDTH] == np.array(MARK, dtype=np.uint8), axis=-1)
        assert bar.all() if i == 1 else not bar.any()
        colour = np.array(ims[i].getpixel((0, 0)), dtype=np.uint8)
        assert np.all(arr == colour, axis=-1).sum() == ims[i].width * ims[i].height  # pasted whole, uncovered
        caption = arr[16:, MARK_WIDTH:].astype(np.int16)  # below the largest image
        black = caption.sum(axis=-1) < 150
        red = (caption[..., 0] > 150) & (caption[..., 1] < 100) & (caption[..., 2] < 100)
        assert (black.any() and not red.any()) if i == 0 else (red.any() and not black.any())  # marked: red text
    with pytest.raises(ValueError, match="caption"):
        captioned(ims, ["only one"])


def test_tile_places_cells_in_rows():
    cells = [_solid((10 * i, 100, 100), (10, 8)) for i in range(10)]
    sheet = tile(cells)  # at most 8 per row, rows balanced: 2 rows of 5
    assert sheet.size == (PAD + 5 * (10 + PAD), PAD + 2 * (8 + PAD))
    arr = np.asarray(sheet)
    for i in range(10):
        r, c = divmod(i, 5)
        x, y = PAD + c * (10 + PAD), PAD + r * (8 + PAD)
        assert np.all(arr[y:y + 8, x:x + 10] == np.array((10 * i, 100, 100), dtype=np.uint8))
    assert tile(cells, columns=3).size == (PAD + 3 * (10 + PAD), PAD + 4 * (8 + PAD))
    with pytest.raises(ValueError, match="one size"):
        tile([_solid((1, 2, 3), (10, 8)), _solid((1, 2, 3), (8, 8))])


@pytest.mark.parametrize("name", ["a.webp", "a.gif"])
def test_animation_round_trip(tmp_path, name):
    colours = [(250, 20, 20), (20, 250, 20), (20, 20, 250)]
    save_animation([_solid(c, (32, 24)) for c in colours], tmp_path / name, duration_ms=120)
    with Image.open(tmp_path / name) as im:
        assert im.n_frames == 3 and im.size == (32, 24) and im.info.get("loop") == 0
        for i, c in enumerate(colours):
            im.seek(i)
            got = np.asarray(im.convert("RGB"), dtype=np.int16)[12, 16]
            # lossless WebP: exact; GIF: 256 colours per frame, close
            assert np.abs(got - np.array(c)).max() <= (0 if name.endswith(".webp") else 12)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left
    with pytest.raises(ValueError, match="one size"):
        save_animation([_solid((1, 2, 3), (8, 8)), _solid((1, 2, 3), (16, 8))], tmp_path / "b.webp")


@pytest.mark.parametrize("change", ["whole", "one-pixel"])
def test_frames_a_few_levels_apart_all_survive(tmp_path, change):
    """Frames that differ from the one before by 1 to 3 levels (the whole frame, or one pixel): every one is kept and
    decodes to its own pixels. Lossy WebP took them as unchanged and wrote a still, one-frame animation."""
    base = np.random.default_rng(0).integers(10, 240, (24, 32, 3)).astype(np.int16)
    frames = []
    for d in (0, 1, 2, 3, -1, -2, -3, 1):
        arr = base.copy()
        if change == "whole":
            arr += d
        else:
            arr[5, 7, 1] += d
        frames.append(arr.astype(np.uint8))
    save_animation([Image.fromarray(f) for f in frames], tmp_path / "a.webp", duration_ms=100)
    with Image.open(tmp_path / "a.webp") as im:
        assert im.n_frames == len(frames)
        for i, want in enumerate(frames):
            im.seek(i)
            assert np.array_equal(np.asarray(im.convert("RGB")), want), i


def test_animation_frames_counts_what_the_writer_merged(tmp_path):
    """A frame equal to the one before is merged into it (shown longer): the count says so, for WebP and GIF."""
    from gbsd_core.bokeh.pictures import animation_frames

    a, b = _solid((10, 20, 30), (16, 8)), _solid((200, 20, 30), (16, 8))
    for name in ("m.webp", "m.gif"):
        save_animation([a, a, b, b, a], tmp_path / name)
        assert animation_frames(tmp_path / name) == 3

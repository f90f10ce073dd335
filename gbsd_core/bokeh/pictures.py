"""Pictures for judging bokeh by eye: a labelled contact sheet, a mask overlay, a local-sharpness heatmap, and the
captioned frame strips and animations of traces and rack focuses.

Pillow and numpy only (no matplotlib). Masks are numpy bool arrays [H, W], as in ``gbsd_core.bokeh.masks``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..loading import atomic_write
from .metrics import local_variance_of_laplacian, to_gray

PAD = 4  # pixels around every cell and label
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MARK = (220, 30, 30)  # the marker of a frame where a new stage begins (trace filmstrips)
MARK_WIDTH = 4  # pixels: the marker bar down a marked frame's left edge
CELL_MIN, CELL_MAX = 160, 256  # frame widths on strips: tiny test images are enlarged, 512² ones shrunk
ANIMATION_FORMATS = {".webp": "WEBP", ".gif": "GIF"}

# Colour ramp for the heatmap, position -> RGB: black, purple, red, yellow, white. Its luma rises at every control
# point (0, 45, 102, 193, 255) and is linear in between, so "brighter" always means "sharper", also in grayscale.
_RAMP_POS = np.array([0.0, 0.3, 0.6, 0.85, 1.0])
_RAMP_RGB = np.array([[0, 0, 0], [90, 0, 160], [230, 50, 30], [255, 200, 0], [255, 255, 255]], dtype=np.float64)


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _draw_centred(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font: Font) -> None:
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = box[0] + (box[2] - box[0] - (right - left)) // 2 - left
    y = box[1] + (box[3] - box[1] - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=INK, font=font)


def contact_sheet(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
                  captions: list[list[str]] | None = None, font_size: int = 12) -> Image.Image:
    """Grid of images (e.g. rows = GBSD alpha, columns = sigma) with row labels on the left, column labels on top
    and one caption under each cell (e.g. ``SharpnessReport.caption()``: "T 95.5 / B 12.1").

    Layout: every slot is as large as the largest cell; smaller cells are centred in it. Pillow's default font.
    """
    rows = len(cells)
    cols = len(cells[0]) if rows else 0
    if rows == 0 or cols == 0:
        raise ValueError("contact_sheet needs at least one cell")
    if any(len(r) != cols for r in cells):
        raise ValueError(f"every row must have {cols} cells, got {[len(r) for r in cells]}")
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"{rows}x{cols} cells need {rows} row labels and {cols} column labels, "
                         f"got {len(row_labels)} and {len(col_labels)}")
    if captions is not None and (len(captions) != rows or any(len(r) != cols for r in captions)):
        raise ValueError(f"captions must be a {rows}x{cols} list of lists")

    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max(im.width for r in cells for im in r)
    cell_h = max(im.height for r in cells for im in r)
    label_w = max(_text_size(measure, s, font)[0] for s in row_labels)
    label_w = label_w + 2 * PAD if label_w else 0
    header_h = max(_text_size(measure, s, font)[1] for s in col_labels)
    header_h = header_h + 2 * PAD if header_h else 0
    cap_h = 0
    if captions is not None:
        cap_h = max(_text_size(measure, s, font)[1] for r in captions for s in r)
        cap_h = cap_h + 2 * PAD if cap_h else 0
    slot_w, slot_h = cell_w + PAD, cell_h + cap_h + PAD

    sheet = Image.new("RGB", (label_w + cols * slot_w + PAD, header_h + rows * slot_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for j, text in enumerate(col_labels):
        x = label_w + PAD + j * slot_w
        _draw_centred(draw, (x, 0, x + cell_w, header_h), text, font)
    for i, row in enumerate(cells):
        y = header_h + PAD + i * slot_h
        _draw_centred(draw, (0, y, label_w, y + cell_h), row_labels[i], font)
        for j, im in enumerate(row):
            x = label_w + PAD + j * slot_w
            sheet.paste(im.convert("RGB"), (x + (cell_w - im.width) // 2, y + (cell_h - im.height) // 2))
            if captions is not None:
                _draw_centred(draw, (x, y + cell_h, x + cell_w, y + cell_h + cap_h), captions[i][j], font)
    return sheet


def overlay_mask(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0),
                 alpha: float = 0.4) -> Image.Image:
    """Tint the masked pixels: out = round((1 - alpha) * image + alpha * color) where mask, image elsewhere
    (unmasked pixels are left bit-identical). Returns an RGB image of the same size."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.asarray(image.convert("RGB"))
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {m.dtype}")
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {m.shape} does not match image shape {rgb.shape[:2]} (H, W)")
    out = rgb.copy()
    blended = (1.0 - alpha) * rgb[m].astype(np.float64) + alpha * np.asarray(color, dtype=np.float64)
    out[m] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def colour_ramp(t: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to uint8 RGB [..., 3] along the black-purple-red-yellow-white ramp."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(t, _RAMP_POS, _RAMP_RGB[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def sharpness_heatmap(image: Image.Image, window: int = 16, vmax: float | None = None) -> Image.Image:
    """Local variance of the Laplacian per ``window`` x ``window`` tile, coloured, same size as ``image``.

    Colour position = log1p(v) / log1p(vmax), vmax defaulting to the image's sharpest tile. The log keeps both
    textured (VoL ~ 1e3) and softly blurred (VoL ~ 1) regions readable; pass one ``vmax`` to several heatmaps to
    put them on a common scale.
    """
    gray = to_gray(image)
    tiles = local_variance_of_laplacian(gray, window)  # [ceil(H/window), ceil(W/window)]
    top = float(tiles.max()) if vmax is None else float(vmax)
    t = np.log1p(tiles) / np.log1p(top) if top > 0 else np.zeros_like(tiles)
    colours = colour_ramp(t)
    h, w = gray.shape
    full = np.repeat(np.repeat(colours, window, axis=0), window, axis=1)[:h, :w]
    return Image.fromarray(np.ascontiguousarray(full))


# ------------------------------------------------------------------------------------ frame strips and animations


def fit_cell(image: Image.Image, lo: int = CELL_MIN, hi: int = CELL_MAX) -> Image.Image:
    """A frame at a width a strip can show: narrower than `lo`, enlarged by a whole factor with nearest-neighbour
    (pixels stay pixels); wider than `hi`, shrunk to `hi` (Lanczos); otherwise unchanged."""
    if image.width < lo:
        k = -(-lo // image.width)
        return image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)
    if image.width > hi:
        return image.resize((hi, max(1, round(image.height * hi / image.width))), Image.Resampling.LANCZOS)
    return image


def _draw_lines(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font: Font,
                line_h: int, fill: tuple[int, int, int]) -> None:
    """Each line of `text` centred horizontally in `box`, `line_h` pixels apart, from the box's top + PAD."""
    for i, line in enumerate(text.split("\n")):
        if line:
            left, _, right, _ = draw.textbbox((0, 0), line, font=font)
            x = box[0] + (box[2] - box[0] - (right - left)) // 2 - left
            draw.text((x, box[1] + PAD + i * line_h), line, fill=fill, font=font)


def captioned(images: Sequence[Image.Image], captions: Sequence[str], marks: Collection[int] = (),
              font_size: int = 12) -> list[Image.Image]:
    """Each image above its caption (lines split at "\\n", centred), all on ONE cell size -- the largest image or
    the widest caption line, the most caption lines -- so the cells tile into a sheet or play as an animation
    without jumping.

    Cells whose index is in `marks` get a MARK-red bar down their left edge and a red caption: the trace uses it
    for the first frame of a new stage (the GBSD boundary).
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} and {len(captions)}")
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = measure.textbbox((0, 0), "Ag|", font=font)
    line_h = bottom - top + 2  # one line's height, from the font rather than from each text (no jumping)
    n_lines = max(len(c.split("\n")) for c in captions)
    text_w = max(_text_size(measure, line, font)[0] for c in captions for line in c.split("\n"))
    inner_w = max(max(im.width for im in images), text_w + 2 * PAD)  # between the two MARK_WIDTH margins
    img_h = max(im.height for im in images)
    width, height = MARK_WIDTH + inner_w + MARK_WIDTH, img_h + 2 * PAD + n_lines * line_h
    cells = []
    for i, (im, text) in enumerate(zip(images, captions)):
        cell = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(cell)
        marked = i in marks
        if marked:
            draw.rectangle((0, 0, MARK_WIDTH - 1, height - 1), fill=MARK)
        cell.paste(im.convert("RGB"), (MARK_WIDTH + (inner_w - im.width) // 2, (img_h - im.height) // 2))
        _draw_lines(draw, (MARK_WIDTH, img_h, MARK_WIDTH + inner_w, height), text, font, line_h,
                    MARK if marked else INK)
        cells.append(cell)
    return cells


def tile(cells: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Equal-size cells left to right, then top to bottom, `columns` per row (default: at most 8, rows balanced),
    PAD pixels apart on white."""
    if not cells:
        raise ValueError("tile needs at least one cell")
    if len({c.size for c in cells}) != 1:
        raise ValueError(f"cells must share one size, got {sorted({c.size for c in cells})}")
    if columns is None:
        columns = math.ceil(len(cells) / math.ceil(len(cells) / 8))
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = math.ceil(len(cells) / columns)
    w, h = cells[0].size
    sheet = Image.new("RGB", (PAD + columns * (w + PAD), PAD + rows * (h + PAD)), BACKGROUND)
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        sheet.paste(cell, (PAD + c * (w + PAD), PAD + r * (h + PAD)))
    return sheet


def save_animation(frames: Sequence[Image.Image], path: str | os.PathLike, duration_ms: int = 250) -> Path:
    """A looping animation of equal-size frames: animated WebP (.webp, lossless) or GIF (.gif, 256 colours per
    frame), Pillow's own writers, written atomically (`loading.atomic_write`).

    Lossless, because an animation encoder stores a frame as its change from the one before, and lossy WebP takes a
    pixel within a few levels of the last as unchanged: a rack whose frames differ subtly (with real weights, the
    focus moving is exactly such a change) came out as one still frame. A frame identical to the one before is
    merged into it by both writers (it is shown for longer); GIF's palette also makes nearly equal frames identical.
    `animation_frames` counts what was kept."""
    path = Path(path)
    fmt = ANIMATION_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: an animation must be {' or '.join(ANIMATION_FORMATS)}")
    if not frames or len({f.size for f in frames}) != 1:
        raise ValueError("an animation needs at least one frame, all of one size")
    rgb = [f.convert("RGB") for f in frames]

    def write(tmp: Path) -> None:
        if fmt == "WEBP":
            rgb[0].save(tmp, format=fmt, save_all=True, append_images=rgb[1:], duration=duration_ms, loop=0,
                        lossless=True)
        else:
            rgb[0].save(tmp, format=fmt, save_all=True, append_images=rgb[1:], duration=duration_ms, loop=0)

    return atomic_write(path, write)


def animation_frames(path: str | os.PathLike) -> int:
    """How many frames an animation file holds (frames equal to the one before them were merged when written)."""
    with Image.open(path) as im:
        return getattr(im, "n_frames", 1)

"""An input image (img2img's init) as the 8-bit RGB the VAE encoder takes, whatever mode Pillow opened it in.

Pillow's own `convert("RGB")` does not scale: it clips. A 16-bit greyscale PNG (mode I;16, values 0..65535) comes
out almost white, since everything above 255 becomes 255. So the modes are taken one by one:

    RGB                        as it is
    1, L, P, CMYK, YCbCr, LAB, HSV, RGBX
                               Pillow's conversion (8 bits already; the colour spaces converted, not reinterpreted)
    I;16, I;16L, I;16B, I;16N  16 bits per pixel: v / 257, rounded (0 -> 0, 65535 -> 255, each 8-bit level's
                               16-bit twin 257·v back to v)
    I                          32-bit integers, taken as 16-bit data (what older Pillow hands out for a 16-bit PNG);
                               values outside 0..65535 have no white level gbsd can know: refused
    F                          floating point: no white level either (0..1? 0..255?): refused
    RGBA, LA, PA, RGBa, and L / P / RGB with a transparent colour
                               composited over white, as A1111 flattens a transparent img2img input
                               (modules/images.py `flatten`, its img2img background colour defaults to white);
                               dropping the alpha would keep whatever colour hides under it (often black)

A refusal is a ValueError naming the mode, so the CLI reports it like any other bad input.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WHITE = (255, 255, 255)


def _sixteen_to_eight(values: np.ndarray) -> Image.Image:
    """Greyscale values in 0..65535 -> an 8-bit L image: v / 257 rounded (65535 / 255 = 257 exactly)."""
    return Image.fromarray(np.rint(values.astype(np.float64) / 257.0).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, scaled and flattened by its mode (see the module docstring); ValueError when its mode
    holds values without a known white level."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in SIXTEEN_BIT_MODES:
        return _sixteen_to_eight(np.asarray(image)).convert("RGB")
    if mode == "I":
        values = np.asarray(image)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"a 32-bit integer image (mode I) with values {lo}..{hi}, beyond 16 bits, has no white "
                             "level gbsd can know; save it with 8 or 16 bits per channel")
        return _sixteen_to_eight(values).convert("RGB")
    if mode == "F":
        raise ValueError("a floating-point image (mode F) has no white level gbsd can know (0..1? 0..255?); save it "
                         "with 8 or 16 bits per channel")
    if mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # a palette's or a colour key's transparency becomes alpha
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert (e.g. premultiplied La)
        raise ValueError(f"an image in mode {mode} cannot be converted to RGB ({e})") from None

"""gbsd_core/images.py: every mode Pillow can hand out, as the 8-bit RGB the VAE takes -- scaled, not clipped, and
transparency flattened over white. Expected values are computed here with numpy from the mode's definition."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gbsd_core.images import to_rgb

RAMP16 = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)  # every 16-bit range, ends included


def _expected_from_16(values: np.ndarray) -> np.ndarray:
    """The 8-bit RGB of 16-bit grey: v·255/65535 rounded, in three equal channels."""
    grey = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _reopened(image: Image.Image, fmt: str) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_greyscale_file_is_scaled_not_clipped(fmt):
    """A 16-bit greyscale PNG or TIFF (Pillow: I;16) from 0 to 65535: convert("RGB") made 99.6 % of it white."""
    image = _reopened(Image.fromarray(RAMP16), fmt)
    assert image.mode.startswith("I;16")
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.array_equal(np.asarray(rgb), _expected_from_16(RAMP16))
    assert (np.asarray(rgb) == 255).mean() < 0.01  # the clipped conversion: > 0.99


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N", "I"])
def test_every_16_bit_mode(mode):
    """The 16-bit byte orders, and 32-bit I holding 16-bit values (older Pillow's 16-bit PNG): v / 257."""
    if mode == "I":
        image = Image.fromarray(RAMP16.astype(np.int32))
    else:  # from the bytes (Pillow's own convert between the 16-bit modes clips too)
        order = {"I;16": "<", "I;16L": "<", "I;16B": ">", "I;16N": "="}[mode]
        image = Image.frombytes(mode, (64, 8), RAMP16.astype(f"{order}u2").tobytes())
    assert image.mode == mode and np.array_equal(np.asarray(image).astype(np.int64), RAMP16)
    assert np.array_equal(np.asarray(to_rgb(image)), _expected_from_16(RAMP16))


def test_each_8_bit_level_survives_its_16_bit_twin():
    """257·v (what an 8-bit image saved as 16 bits holds) comes back as v, for all 256 levels."""
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(levels * 257)))[..., 0], levels)


@pytest.mark.parametrize("values, match", [((-1, 10), "-1..10"), ((0, 65536), "0..65536")])
def test_32_bit_values_beyond_16_bits_are_refused(values, match):
    image = Image.fromarray(np.array([values], dtype=np.int32), mode="I")
    with pytest.raises(ValueError, match=rf"mode I.*{match}.*16 bits"):
        to_rgb(image)


def test_floating_point_is_refused():
    with pytest.raises(ValueError, match="floating-point.*mode F"):
        to_rgb(Image.new("F", (4, 4), 0.5))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_flattened_over_white(mode):
    """Alpha 0 is white whatever colour hides under it, alpha 255 is the colour, in between the blend."""
    colour = {"RGBA": (10, 200, 30), "LA": (90, 90, 90), "PA": (200, 0, 0)}[mode]
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = colour
    rgba[0, :, 3] = (0, 255, 128)
    image = Image.fromarray(rgba, mode="RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "PA":
        image = image.convert("PA")
    got = np.asarray(to_rgb(image)).astype(int)[0]
    assert np.array_equal(got[0], (255, 255, 255))
    assert np.array_equal(got[1], colour)
    blend = np.array(colour) * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(got[2] - blend).max() <= 1


@pytest.mark.parametrize("mode", ["P", "L", "RGB"])
def test_a_transparent_colour_is_flattened_over_white(mode):
    """A palette's transparent index (PNG tRNS), or a grey / RGB colour key: white, not the colour under it."""
    image = Image.new(mode, (2, 1), 0)
    if mode == "P":
        image.putpalette([0, 0, 0, 40, 80, 120])
        image.putpixel((1, 0), 1)
    else:
        image.putpixel((1, 0), 77 if mode == "L" else (40, 80, 120))
    image.info["transparency"] = 0 if mode != "RGB" else (0, 0, 0)
    image = _reopened(image, "PNG")
    got = np.asarray(to_rgb(image))[0]
    assert np.array_equal(got[0], (255, 255, 255))  # convert("RGB") gave the hidden black
    assert np.array_equal(got[1], (77, 77, 77) if mode == "L" else (40, 80, 120))


@pytest.mark.parametrize("mode, value, rgb", [
    ("1", 1, (255, 255, 255)), ("L", 77, (77, 77, 77)), ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("CMYK", (0, 0, 0, 255), (0, 0, 0)), ("YCbCr", (255, 128, 128), (255, 255, 255)),
    ("YCbCr", (0, 128, 128), (0, 0, 0)), ("HSV", (0, 255, 255), (255, 0, 0)),
])
def test_8_bit_modes_and_colour_spaces_are_converted(mode, value, rgb):
    assert np.array_equal(np.asarray(to_rgb(Image.new(mode, (2, 2), value)))[0, 0], rgb)


def test_rgb_is_returned_as_it_is():
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(image) is image


def test_a_mode_pillow_cannot_convert_is_named():
    with pytest.raises(ValueError, match="mode La"):
        to_rgb(Image.new("La", (2, 2)))

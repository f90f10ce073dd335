"""Plain helpers of the command-line tests (fixtures are in tests/cli/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from gbsd_core.cli.main import main as cli_main

TINY = ["--steps", "3", "--size", "64x64", "-q"]  # generate flags that make a run take milliseconds
# eval / grid on the tiny model: 4 steps, the focus stage from step 2
EVAL_ARGS = ["--size", "64x64", "--steps", "4", "--layout", "0.5", "-q"]
PAIRS = [
    {"prompt": "a bunny and a carrot on grass", "focus": "a carrot", "seed": 1},
    {"prompt": "a cat and a dog on a sofa", "focus": "a cat", "seed": 2, "box": [8, 8, 40, 48]},
    {"id": "with-mask", "prompt": "a cup and a croissant on a table", "focus": "a cup", "seed": 3, "mask": "m.png"},
]


class Loaded(BaseException):
    """Raised by the patched loader (fixture `no_load`): reaching it means validation let the input through. A
    BaseException, so the CLI's last-resort handler (which turns an unexpected Exception into exit 1) lets it out."""


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`gbsd ARGV` in this process: (exit status, stdout, stderr)."""
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def everything(d: Path) -> list[str]:
    """Every file and folder under `d`, relative: what a refused command must leave exactly as it was."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def noise_png(path: Path, size=(64, 64), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def png_texts(path: Path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


# ------------------------------------------------------------------------------------------ hostile files


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC (PNG spec §5.3)."""
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(path: Path, width: int, height: int, idat: bytes, texts: dict[str, str] | None = None) -> Path:
    """A PNG written chunk by chunk (8-bit grayscale), every CRC valid: the header may claim any size and the
    image data may be anything, which is what a hostile file does."""
    import struct

    text = b"".join(_chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1")) for k, v in (texts or {}).items())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + text + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def bomb_png(path: Path, side: int = 30000, texts: dict[str, str] | None = None) -> Path:
    """A ~100-byte PNG claiming side x side pixels (a decompression bomb)."""
    import zlib

    return raw_png(path, side, side, zlib.compress(b"\0" * 64), texts)


def broken_zlib_png(path: Path, texts: dict[str, str] | None = None) -> Path:
    """64x64, valid signature and CRCs, but the IDAT is not a zlib stream: PIL opens and verifies it, and fails
    only when it decodes the pixels."""
    return raw_png(path, 64, 64, b"x\x9c" + bytes(range(256)) * 4, texts)


def meta_png(path: Path, gbsd: object = None, parameters: str | None = None, size=(64, 64)) -> Path:
    """A real PNG with a crafted `gbsd` JSON chunk (any JSON value, or raw text when a str) and/or A1111 text."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if gbsd is not None:
        info.add_text("gbsd", gbsd if isinstance(gbsd, str) else json.dumps(gbsd))
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", size, (120, 60, 30)).save(path, pnginfo=info)
    return path


# --from-png arguments of the generate tests: a PNG made on the fly from the text between the braces


def M(**params) -> str:
    """`--from-png` of a PNG whose `gbsd` JSON chunk holds these parameters (prompt "p" unless given)."""
    return "{meta:" + json.dumps({"version": 1, "params": {"prompt": "p", **params}}) + "}"


def RAW(obj) -> str:
    """`--from-png` of a PNG whose `gbsd` chunk is this JSON value (or raw text, when a str)."""
    return "{meta:" + (obj if isinstance(obj, str) else json.dumps(obj)) + "}"


def INFO(line: str, prompt: str = "p") -> str:
    """`--from-png` of a PNG with only an A1111 `parameters` chunk."""
    return "{info:" + prompt + "\n" + line + "}"


A1111 = "Steps: 3, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64"

"""Plain helpers of the command-line tests (fixtures are in tests/cli/conftest.py)."""
from __future__ import annotations

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


class Loaded(Exception):
    """Raised by the patched loader (fixture `no_load`): reaching it means validation let the input through."""


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

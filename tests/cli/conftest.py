"""Fixtures of the command-line tests (plain helpers are in tests/_cli.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import EVAL_ARGS, PAIRS, Loaded
from PIL import Image

from gbsd_core.cli import common
from gbsd_core.cli.main import main as cli_main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny model's ops are microseconds; on a shared 2-core machine a second intra-op thread mostly waits
    # (measured 15x slower per conv under load). The torchrun ranks run with OMP_NUM_THREADS=1 too, and CPU kernels
    # may round differently with more threads, while the distributed eval test compares images bit for bit.
    # Restored afterwards so other modules keep their setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_load(monkeypatch):
    """Any command that gets as far as loading weights raises `Loaded`."""
    def boom(*a, **kw):
        raise Loaded

    monkeypatch.setattr(common, "load_checkpoint", boom)


@pytest.fixture
def dummy_weights(tmp_path):
    # Validation never opens the weights, so any existing file will do for the bad-input tests.
    f = tmp_path / "dummy.safetensors"
    f.write_bytes(b"not loaded")
    return f


@pytest.fixture(scope="module")
def amp_ckpt(responsive_ckpt) -> Path:
    """The tiny checkpoint whose prompts steer the image and whose attention maps have structure (conftest.py)."""
    return responsive_ckpt


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    yy, xx = np.mgrid[:64, :64]
    Image.fromarray((((yy - 30) ** 2 + (xx - 34) ** 2 < 15**2) * 255).astype(np.uint8)).save(d / "m.png")
    path = d / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


@pytest.fixture(scope="module")
def single_run(amp_ckpt, pairs_file, tmp_path_factory) -> Path:
    """One finished `gbsd eval` of the three PAIRS."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert cli_main(["eval", str(pairs_file), "-o", str(out), "--weights", str(amp_ckpt), *EVAL_ARGS]) == 0
    return out

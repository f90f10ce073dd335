"""The shared command-line helpers (gbsd_core/cli/common.py): device choice and the default-model resolver."""
from __future__ import annotations

import shutil

import pytest
import torch
from _cli import TINY, Loaded, meta_png, run_cli

from gbsd_core.cli import common
from gbsd_core.cli.main import main as cli_main


def test_device_cuda_unavailable(tmp_path, capsys, no_load, dummy_weights):

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_cli(["generate", "p", "--weights", dummy_weights, "--device", "cuda", "-o", tmp_path / "o.png"],
                        capsys)
    assert code == 2 and "CUDA is not available" in err


def _recording_loader(monkeypatch) -> dict:
    seen = {}

    def fake_load(checkpoint, device, dtype):
        seen.update(path=checkpoint.path, family=checkpoint.family.name)
        raise Loaded

    monkeypatch.setattr(common, "load_checkpoint", fake_load)
    return seen


def test_default_weights_found_in_env_dir(tmp_path, monkeypatch, capsys, tiny_ckpt):
    shutil.copy(tiny_ckpt, tmp_path / "v1-5-pruned-emaonly.safetensors")
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    seen = _recording_loader(monkeypatch)
    with pytest.raises(Loaded):
        cli_main(["generate", "p", "-o", str(tmp_path / "o.png")])
    assert seen == {"path": tmp_path / "v1-5-pruned-emaonly.safetensors", "family": "sd1"}


@pytest.mark.parametrize("name", ["tiny-sd1.safetensors", "tiny-sd1"])  # JSON's file name; A1111's "Model" label
@pytest.mark.parametrize("chunk", ["gbsd", "parameters"])
def test_the_model_a_png_names_is_found_inside_the_weights_folder(name, chunk, tmp_path, monkeypatch, tiny_ckpt):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_ckpt, weights / "tiny-sd1.safetensors")
    monkeypatch.setenv("GBSD_WEIGHTS", str(weights))
    if chunk == "gbsd":
        png = meta_png(tmp_path / "m.png", {"version": 1, "params": {"prompt": "p"}, "model": {"file": name}})
    else:
        png = meta_png(tmp_path / "m.png", parameters=f"p\nSteps: 3, Seed: 1, CFG scale: 7, Model: {name}")
    seen = _recording_loader(monkeypatch)
    with pytest.raises(Loaded):
        cli_main(["generate", "--from-png", str(png), "-o", str(tmp_path / "o.png")])
    assert seen["path"] == weights / "tiny-sd1.safetensors"


def test_an_unexpected_error_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys, tiny_ckpt):
    """The last-resort handler: an exception no check foresaw (here: the loader running out of memory) is one
    line naming it, exit 1, no traceback, and nothing written."""
    def boom(*a):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 20.00 GiB")

    monkeypatch.setattr(common, "load_checkpoint", boom)
    code, _, err = run_cli(["generate", "p", "--weights", tiny_ckpt, *TINY, "-o", tmp_path / "o.png"], capsys)
    print(err)
    assert code == 1 and err.count("\n") == 1 and "RuntimeError: CUDA out of memory" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()

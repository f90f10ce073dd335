"""The shared command-line helpers (gbsd_core/cli/common.py): device choice and the default-model resolver."""
from __future__ import annotations

import pytest
import torch
from _cli import Loaded, run_cli

from gbsd_core.cli import common
from gbsd_core.cli.main import main as cli_main


def test_device_cuda_unavailable(tmp_path, capsys, no_load, dummy_weights):

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_cli(["generate", "p", "--weights", dummy_weights, "--device", "cuda", "-o", tmp_path / "o.png"],
                        capsys)
    assert code == 2 and "CUDA is not available" in err


def test_default_weights_found_in_env_dir(tmp_path, monkeypatch, capsys, no_load):
    (tmp_path / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    seen = {}

    def fake_load(path, family, device, dtype):
        seen.update(path=path, family=family)
        raise Loaded

    monkeypatch.setattr(common, "load_checkpoint", fake_load)
    with pytest.raises(Loaded):
        cli_main(["generate", "p", "-o", str(tmp_path / "o.png")])
    assert seen == {"path": tmp_path / "v1-5-pruned-emaonly.safetensors", "family": "sd1"}

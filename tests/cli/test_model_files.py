"""`gbsd download` (registry listing, sha256-checked download with the hub monkeypatched) and `gbsd info`."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
from _cli import run_cli


def test_download_command(tmp_path, monkeypatch, capsys):
    import types

    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    code, out, _ = run_cli(["download"], capsys)
    assert code == 0 and "sd15" in out and "sd21-base" in out and "missing" in out
    code, _, err = run_cli(["download", "sd99"], capsys)
    assert code == 2 and "sd99" in err

    def hf_hub_download(repo_id, filename, local_dir=None, **kw):
        dest = Path(local_dir) / filename
        dest.write_bytes(b"truncated download")
        return str(dest)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    code, _, err = run_cli(["download", "sd15"], capsys)
    print(err)
    assert code == 1 and "sha256 mismatch" in err
    assert not (tmp_path / "v1-5-pruned-emaonly.safetensors").exists()


def test_info(tiny_ckpt, capsys):
    from safetensors import safe_open

    code, out, err = run_cli(["info", tiny_ckpt], capsys)
    assert code == 0, err
    print(out)
    assert "family: sd1" in out and "dtype: float32" in out
    # Parameter counts per component, checked against the raw file's tensors (read with safetensors directly).
    counts = {"unet": 0, "vae": 0, "text_encoder": 0}
    prefixes = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text_encoder"}
    with safe_open(str(tiny_ckpt), "pt") as f:
        for k in f.keys():
            if k.endswith("position_ids"):
                continue
            comp = next(v for p, v in prefixes.items() if k.startswith(p))
            counts[comp] += int(np.prod(f.get_slice(k).get_shape()))
    for comp, n in counts.items():
        assert f"{comp}: {n:,}" in out, comp
    assert hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest() in out

"""`gbsd download` (registry listing, sha256-checked download with the hub monkeypatched) and `gbsd info`."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _broken import BROKEN, UNET, Workshop
from _cli import run_cli
from _tiny import save_tiny_pipe


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


# ------------------------------------------------------------------------------------------ hostile weights


@pytest.fixture(scope="module")
def good_pipe(tmp_path_factory):
    return save_tiny_pipe(tmp_path_factory.mktemp("pipe") / "tiny-pipe", layers_per_block=1, text_layers=1)


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_info_refuses_broken_checkpoints_in_one_line(case, tmp_path, good_pipe, sdxl_pipe, capsys):
    name, build, needle = case
    path = build(Workshop(tmp_path, good_pipe, sdxl_pipe))
    code, _, err = run_cli(["info", path], capsys)
    print(f"{name}: {err.strip()}")
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_parts_that_do_not_fit_are_refused_before_loading(tmp_path, capsys, no_load):
    path = Workshop(tmp_path, tmp_path).single(unet=replace(UNET, in_channels=9))
    code, _, err = run_cli(["generate", "p", "--weights", path, "-o", tmp_path / "o.png"], capsys)
    assert code == 2 and "9-channel" in err and err.count("\n") == 1  # no_load: the loader was never reached


def test_info_into_a_closed_pipe_prints_no_traceback(tiny_ckpt, tmp_path):
    """`gbsd info … | head -3`: the reader goes away; the command must not print a BrokenPipeError traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gbsd_core.cli", "info", str(tiny_ckpt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    proc.stdout.close()  # before the command has written anything: every write meets a closed pipe
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    print(err)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


@pytest.mark.parametrize("argv", [["download", "sd15"], ["download", "sd15", "--dir", "{file}"], ["download"]])
def test_download_into_a_file_is_refused(argv, tmp_path, monkeypatch, capsys):
    f = tmp_path / "weights-file"
    f.write_text("not a folder")
    monkeypatch.setenv("GBSD_WEIGHTS", str(f))
    argv = [str(f) if a == "{file}" else a for a in argv]
    code, _, err = run_cli(argv, capsys)
    print(err)
    assert code == 2 and "not a folder" in err and err.count("\n") == 1


def test_info_never_writes_through_a_sidecar_link(tiny_ckpt, tmp_path, capsys):
    """Someone else's weights folder whose `m.safetensors.sha256` is a symbolic link: `gbsd info` hashes the file
    and leaves the link and its target as they were (it once overwrote the target with its cache)."""
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(tiny_ckpt.read_bytes())
    target = tmp_path / "elsewhere.txt"
    target.write_text("someone's notes")
    (tmp_path / "m.safetensors.sha256").symlink_to(target)
    code, out, err = run_cli(["info", ckpt], capsys)
    assert code == 0, err
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() in out
    assert target.read_text() == "someone's notes" and (tmp_path / "m.safetensors.sha256").is_symlink()


def test_a_bad_cached_digest_does_not_reach_the_png(tiny_ckpt, tmp_path, capsys):
    """A cache whose size and mtime match but whose digest is not 64 lower-case hex digits is recomputed: the PNG
    carries the real sha256, and `--from-png` of it is accepted (gbsd once wrote PNGs its own reader refused)."""
    import json

    from _cli import TINY, png_texts

    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(tiny_ckpt.read_bytes())
    st = ckpt.stat()
    (tmp_path / "m.safetensors.sha256").write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                                "sha256": "NOT-A-DIGEST".ljust(64, "x")}))
    code, _, err = run_cli(["generate", "p", "--weights", ckpt, *TINY, "-o", tmp_path / "a.png"], capsys)
    assert code == 0, err
    want = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert json.loads(png_texts(tmp_path / "a.png")["gbsd"])["model"]["sha256"] == want
    code, _, err = run_cli(["generate", "--from-png", tmp_path / "a.png", "--weights", ckpt, "-q",
                            "-o", tmp_path / "b.png"], capsys)
    assert code == 0, err

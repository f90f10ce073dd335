"""The `gbsd` command line, end to end on a tiny random SD1 checkpoint (conftest's `tiny_ckpt`), plus every
bad-input path: exit status 2, one line on stderr naming the problem, no output file, and no weights loaded."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gbsd_core import cli, pngmeta

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "3", "--size", "64x64", "-q"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny model's ops are microseconds; on a shared 2-core machine a second intra-op thread mostly waits
    # (measured 15x slower per conv under load). Restored afterwards so other modules keep their setting.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Loaded(Exception):
    """Raised by the patched loader: reaching it means validation let the input through."""


@pytest.fixture
def no_load(monkeypatch):
    def boom(*a, **kw):
        raise _Loaded

    monkeypatch.setattr(cli, "load_checkpoint", boom)


@pytest.fixture
def dummy_weights(tmp_path):
    # Validation never opens the weights, so any existing file will do for the bad-input tests.
    f = tmp_path / "dummy.safetensors"
    f.write_bytes(b"not loaded")
    return f


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _pngs(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*.png"))


def _noise_png(path: Path, size=(64, 64), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ no model needed


def test_help_is_instant_and_imports_no_torch():
    code = (
        "import sys, contextlib, io\n"
        "from gbsd_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    rc = main(['--help'])\n"
        "assert rc == 0 and 'generate' in out.getvalue(), out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'PIL', 'huggingface_hub') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


BAD_INPUTS = [
    # (id, argv after the command, text the message must contain)
    ("alpha-high", ["generate", "p", "--alpha", "1.5"], "alpha"),
    ("alpha-neg", ["generate", "p", "--focus", "f", "--alpha", "-0.1"], "alpha"),
    ("alpha-nan", ["generate", "p", "--alpha", "abc"], "--alpha"),
    ("layout-high", ["generate", "p", "--layout", "1.2"], "layout"),
    ("steps-zero", ["generate", "p", "--steps", "0"], "steps"),
    ("strength-zero", ["img2img", "p", "--init", "{img}", "--strength", "0"], "strength"),
    ("strength-high", ["img2img", "p", "--init", "{img}", "--strength", "1.5"], "strength"),
    ("strength-no-steps", ["img2img", "p", "--init", "{img}", "--strength", "0.1", "--steps", "5"], "--strength"),
    ("size-not-8", ["generate", "p", "--size", "60x64"], "--size"),
    ("size-malformed", ["generate", "p", "--size", "big"], "--size"),
    ("init-missing-flag", ["img2img", "p"], "--init"),
    ("init-missing-file", ["img2img", "p", "--init", "{tmp}/nope.png"], "no such file"),
    ("init-not-image", ["img2img", "p", "--init", "{txt}"], "not a readable image"),
    ("init-size-not-8", ["img2img", "p", "--init", "{img60}"], "multiples of 8"),
    ("weights-missing", ["generate", "p", "--weights", "{tmp}/missing.safetensors"], "weights file not found"),
    ("weights-default-absent", ["generate", "p"], "gbsd download sd15"),
    ("weights-name-absent", ["generate", "p", "--weights", "sd21"], "gbsd download sd21"),
    ("out-dir-missing", ["generate", "p", "-o", "{tmp}/no/such/dir/x.png"], "does not exist"),
    ("out-not-writable", ["generate", "p", "-o", "/proc/gbsd-test.png"], "not writable"),
    ("out-not-png", ["generate", "p", "-o", "{tmp}/x.jpg"], ".png"),
    ("out-is-dir", ["generate", "p", "-o", "{tmp}/sub.png"], "is a directory"),
    ("no-prompt", ["generate"], "prompt is required"),
    ("from-png-missing", ["generate", "--from-png", "{tmp}/nope.png"], "no such file"),
    ("from-png-no-meta", ["generate", "--from-png", "{img}"], "no generation parameters"),
    ("family-unknown", ["generate", "p", "--family", "sd9"], "family"),
    ("sweep-nothing", ["sweep", "p", "--focus", "f"], "--alphas and/or --focus-stack"),
    ("sweep-alphas-no-focus", ["sweep", "p", "--alphas", "0,1"], "focus prompt"),
    ("sweep-alpha-range", ["sweep", "p", "--focus", "f", "--alphas", "0,2"], "alpha"),
    ("sweep-alpha-text", ["sweep", "p", "--focus", "f", "--alphas", "0,x"], "--alphas"),
    ("sweep-names-repeat", ["sweep", "p", "--focus-stack", "a", "b", "-o", "{tmp}/same.png"], "repeat"),
    ("sweep-bad-pattern", ["sweep", "p", "--focus-stack", "a", "-o", "{tmp}/{nope}.png"], "pattern"),
    ("compile-mode-unknown", ["generate", "p", "--compile", "fastest"], "--compile"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_before_loading(case, tmp_path, capsys, monkeypatch, no_load, dummy_weights):
    name, argv, needle = case
    work = tmp_path / "work"
    work.mkdir()
    (work / "sub.png").mkdir()
    img = _noise_png(work / "in.png")
    img60 = _noise_png(work / "in60.png", size=(60, 64))
    txt = work / "notes.png"
    txt.write_text("this is not an image")
    subs = {"{tmp}": str(work), "{img60}": str(img60), "{img}": str(img), "{txt}": str(txt)}

    def sub(a):
        for k, v in subs.items():
            a = a.replace(k, v)
        return a

    argv = [sub(a) for a in argv]
    if "--weights" not in argv and name != "weights-default-absent":
        argv += ["--weights", str(dummy_weights)]
    if "-o" not in argv and argv[0] != "sweep":
        argv += ["-o", str(work / "out.png")]
    if argv[0] == "sweep" and "-o" not in argv:
        argv += ["-o", str(work)]
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path / "empty-weights"))
    monkeypatch.chdir(work)
    before = _pngs(work)
    code, out, err = _run(argv, capsys)
    print(f"{name}: {err.strip()}")
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1  # one line
    assert _pngs(work) == before  # no output file
    assert not [p for p in os.listdir(work) if p.endswith(".tmp")]


def test_device_cuda_unavailable(tmp_path, capsys, no_load, dummy_weights):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _run(["generate", "p", "--weights", dummy_weights, "--device", "cuda", "-o", tmp_path / "o.png"],
                        capsys)
    assert code == 2 and "CUDA is not available" in err


def test_layout_warning_then_load(tmp_path, capsys, no_load, dummy_weights):
    # σ < 0.7 with a focus prompt warns but proceeds: the (patched) loader is reached.
    with pytest.raises(_Loaded):
        cli.main(["generate", "p", "--focus", "f", "--layout", "0.5", "--weights", str(dummy_weights),
                  "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert "warning" in err and "0.7" in err
    with pytest.raises(_Loaded):
        cli.main(["generate", "p", "--focus", "f", "--layout", "0.7", "--weights", str(dummy_weights),
                  "-o", str(tmp_path / "o.png")])
    assert "warning" not in capsys.readouterr().err


def test_default_weights_found_in_env_dir(tmp_path, monkeypatch, capsys, no_load):
    (tmp_path / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    seen = {}

    def fake_load(path, family, device, dtype):
        seen.update(path=path, family=family)
        raise _Loaded

    monkeypatch.setattr(cli, "load_checkpoint", fake_load)
    with pytest.raises(_Loaded):
        cli.main(["generate", "p", "-o", str(tmp_path / "o.png")])
    assert seen == {"path": tmp_path / "v1-5-pruned-emaonly.safetensors", "family": "sd1"}


def test_download_command(tmp_path, monkeypatch, capsys):
    import types

    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    code, out, _ = _run(["download"], capsys)
    assert code == 0 and "sd15" in out and "sd21-base" in out and "missing" in out
    code, _, err = _run(["download", "sd99"], capsys)
    assert code == 2 and "sd99" in err

    def hf_hub_download(repo_id, filename, local_dir=None, **kw):
        dest = Path(local_dir) / filename
        dest.write_bytes(b"truncated download")
        return str(dest)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    code, _, err = _run(["download", "sd15"], capsys)
    print(err)
    assert code == 1 and "sha256 mismatch" in err
    assert not (tmp_path / "v1-5-pruned-emaonly.safetensors").exists()


# ------------------------------------------------------------------------------------------ end to end, tiny model


def _meta(path: Path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


def test_generate_metadata_and_determinism(tiny_ckpt, tmp_path, capsys):
    def args(seed, out):
        return ["generate", "a bunny and a carrot", "--focus", "a carrot", "--alpha", "0.25", "--layout", "0.75",
                "--negative", "blurry", "--cfg", "5", "--seed", seed, "--weights", tiny_ckpt, *TINY, "-o", out]

    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert _run(args(7, a), capsys)[0] == 0
    assert _run(args(7, b), capsys)[0] == 0
    assert a.read_bytes() == b.read_bytes()  # same seed -> identical PNG bytes (pixels and metadata)
    assert _run(args(8, c), capsys)[0] == 0
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))  # the seed matters
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "c.png"]  # no temp files left

    with Image.open(a) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    texts = _meta(a)
    sha = hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()  # independent of gbsd's cached hasher
    lines = texts["parameters"].split("\n")
    assert lines[0] == "a bunny and a carrot" and lines[1] == "Negative prompt: blurry"
    for part in ("Steps: 3", "Sampler: DDIM", "CFG scale: 5.0", "Seed: 7", "Size: 64x64", f"Model hash: {sha[:10]}",
                 "Model: tiny-sd1", "GBSD focus: a carrot", "GBSD alpha: 0.25", "GBSD layout: 0.75"):
        assert part in lines[2], part
    assert "Denoising strength" not in lines[2]
    data = json.loads(texts["gbsd"])
    assert data["model"] == {"file": "tiny-sd1.safetensors", "sha256": sha}
    assert data["params"] == {"prompt": "a bunny and a carrot", "focus": "a carrot", "alpha": 0.25, "layout": 0.75,
                              "steps": 3, "cfg": 5.0, "negative": "blurry", "seed": 7, "width": 64, "height": 64,
                              "strength": 0.75, "eta": 0.0}
    assert data["executed_steps"] == 3 and data["mode"] == "txt2img"


def test_fast_flag_runs_the_fast_path_close_to_the_plain_one(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from gbsd_core import pipeline

    seen = []
    real = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: seen.append(k["fast"]) or real(*a, **k))
    base = ["generate", "a bunny and a carrot", "--focus", "a carrot", "--weights", tiny_ckpt, *TINY]
    plain, fast, bf16 = tmp_path / "plain.png", tmp_path / "fast.png", tmp_path / "bf16.png"
    assert _run([*base, "-o", plain], capsys)[0] == 0
    assert _run([*base, "--fast", "-o", fast], capsys)[0] == 0
    assert _run([*base, "--fast", "--dtype", "bf16", "-o", bf16], capsys)[0] == 0
    assert seen[0] is None
    assert seen[1].fuse_qkv and seen[1].cache_context_kv and seen[1].channels_last and seen[1].compile is None
    assert seen[2].dtype == torch.bfloat16
    a, b = (np.asarray(Image.open(f), dtype=np.int16) for f in (plain, fast))
    assert np.abs(a - b).max() <= 2  # fp32 fast path: same math, other summation order
    assert _meta(fast)["parameters"] == _meta(plain)["parameters"]


def test_from_png_round_trip_and_override(tiny_ckpt, tmp_path, capsys):
    src, again, other = tmp_path / "src.png", tmp_path / "again.png", tmp_path / "other.png"
    code, _, _ = _run(["generate", "a red fox, bokeh", "--focus", "a fox", "--alpha", "0.4", "--seed", "3",
                       "--cfg", "4", "--eta", "0.5", "--weights", tiny_ckpt, *TINY, "-o", src], capsys)
    assert code == 0
    assert _run(["generate", "--from-png", src, "--weights", tiny_ckpt, "-q", "-o", again], capsys)[0] == 0
    assert np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(again)))
    assert pngmeta.read_params(again) == pngmeta.read_params(src)
    # An explicit flag overrides the PNG's value; everything else is kept.
    assert _run(["generate", "--from-png", src, "--alpha", "0.9", "--weights", tiny_ckpt, "-q", "-o", other],
                capsys)[0] == 0
    p_src, p_other = pngmeta.read_params(src), pngmeta.read_params(other)
    assert p_other.alpha == 0.9 and p_other == type(p_src)(**{**p_src.__dict__, "alpha": 0.9})
    assert not np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(other)))


def test_img2img(tiny_ckpt, tmp_path, capsys):
    init = _noise_png(tmp_path / "init.png", seed=5)
    out = tmp_path / "out.png"
    code, _, err = _run(["img2img", "a painting", "--init", init, "--strength", "0.5", "--steps", "4", "-q",
                         "--weights", tiny_ckpt, "-o", out], capsys)
    assert code == 0, err
    assert "runs 2 of 4 steps" in err  # CompVis: int(strength * steps) executed steps
    with Image.open(out) as im:
        assert im.size == (64, 64)  # the input's size when --size is not given
    texts = _meta(out)
    assert "Denoising strength: 0.5" in texts["parameters"]
    data = json.loads(texts["gbsd"])
    assert data["mode"] == "img2img" and data["executed_steps"] == 2 and data["params"]["strength"] == 0.5


def test_sweep_writes_one_png_per_cell(tiny_ckpt, tmp_path, capsys):
    outdir = tmp_path / "sweep"
    outdir.mkdir()
    code, out, err = _run(["sweep", "a bunny and a carrot", "--focus-stack", "a carrot", "a bunny",
                           "--alphas", "0,1", "--weights", tiny_ckpt, *TINY, "-o", outdir], capsys)
    assert code == 0, err
    names = sorted(os.listdir(outdir))
    assert names == ["sweep_00_a-carrot_a0.png", "sweep_01_a-carrot_a1.png", "sweep_02_a-bunny_a0.png",
                     "sweep_03_a-bunny_a1.png"]
    assert out.split() == [str(outdir / n) for n in names]
    cells = [(pngmeta.read_params(outdir / n).focus, pngmeta.read_params(outdir / n).alpha) for n in names]
    assert cells == [("a carrot", 0.0), ("a carrot", 1.0), ("a bunny", 0.0), ("a bunny", 1.0)]
    # α = 1 uses only the global prompt in the focus stage, so both focus prompts give the same image there,
    # while α = 0 uses only the focus prompt, so they differ.
    px = {n: np.asarray(Image.open(outdir / n)) for n in names}
    assert np.array_equal(px[names[1]], px[names[3]])
    assert not np.array_equal(px[names[0]], px[names[2]])
    # Pattern form of -o.
    code, out, _ = _run(["sweep", "p", "--focus", "f", "--alphas", "0.5,0.75", "--weights", tiny_ckpt, *TINY,
                         "-o", tmp_path / "{seed}_{alpha:.2f}.png"], capsys)
    assert code == 0 and (tmp_path / "0_0.50.png").exists() and (tmp_path / "0_0.75.png").exists()


def test_info(tiny_ckpt, capsys):
    from safetensors import safe_open

    code, out, err = _run(["info", tiny_ckpt], capsys)
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


def test_console_script_subprocess(tiny_ckpt, tmp_path):
    """The real entry point in a fresh interpreter: exit 0 with an image, exit 2 on bad input."""
    out = tmp_path / "sub.png"
    cmd = [sys.executable, "-m", "gbsd_core.cli", "generate", "a cat", "--weights", str(tiny_ckpt), *TINY, "-o",
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see _one_thread
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and out.exists()
    bad = subprocess.run([*cmd[:-2], "--alpha", "2", "-o", str(tmp_path / "bad.png")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "alpha" in bad.stderr and not (tmp_path / "bad.png").exists()

"""The `gbsd` command line, end to end on a tiny random SD1 checkpoint (conftest's `tiny_ckpt`), plus every
bad-input path: exit status 2, one line on stderr naming the problem, no output file, and no weights loaded."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from _cli import TINY, Loaded, everything, noise_png, png_texts, run_cli
from PIL import Image

from gbsd_core.cli import pngmeta
from gbsd_core.cli.main import main as cli_main

# ------------------------------------------------------------------------------------------------ no model needed


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
    # the rack-frame fields
    ("focus-to-no-focus", ["generate", "p", "--focus-to", "b"], "focus_to needs a focus"),
    ("focus-mix-no-to", ["generate", "p", "--focus", "f", "--focus-mix", "0.5"], "needs focus_to"),
    ("focus-mix-range", ["generate", "p", "--focus", "f", "--focus-to", "g", "--focus-mix", "1.5"], "focus_mix"),
    # --trace (the x̂0 filmstrip)
    ("trace-not-writable", ["generate", "p", "--trace", "/proc/gbsd-trace"], "not writable"),
    ("trace-existing-not-writable", ["generate", "p", "--trace", "/proc"], "not writable"),
    ("trace-is-a-file", ["generate", "p", "--trace", "{txt}"], "is a file"),
    ("trace-parent-missing", ["generate", "p", "--trace", "{tmp}/no/such/trace"], "does not exist"),
    ("trace-every-zero", ["generate", "p", "--trace", "{tmp}/tr", "--trace-every", "0"], "--trace-every"),
    ("trace-every-text", ["generate", "p", "--trace", "{tmp}/tr", "--trace-every", "two"], "--trace-every"),
    ("trace-every-alone", ["generate", "p", "--trace-every", "2"], "needs --trace"),
    ("trace-preview-alone", ["generate", "p", "--trace-preview", "linear"], "needs --trace"),
    ("trace-preview-unknown", ["generate", "p", "--trace", "{tmp}/tr", "--trace-preview", "taesd"], "--trace-preview"),
    ("trace-img2img-bad-init", ["img2img", "p", "--init", "{txt}", "--trace", "{tmp}/tr"], "not a readable image"),
    ("trace-not-for-sweep", ["sweep", "p", "--focus", "f", "--alphas", "0", "--trace", "{tmp}/tr"], "--trace"),
    # gbsd rack
    ("rack-frames-one", ["rack", "p", "--from", "a", "--to", "b", "--frames", "1"], "--frames"),
    ("rack-frames-many", ["rack", "p", "--from", "a", "--to", "b", "--frames", "65"], "--frames"),
    ("rack-same-prompt", ["rack", "p", "--from", "a bunny", "--to", "A  Bunny"], "same prompt"),
    ("rack-no-to", ["rack", "p", "--from", "a bunny"], "--to"),
    ("rack-no-from", ["rack", "p", "--to", "a carrot"], "--from"),
    ("rack-empty-from", ["rack", "p", "--from", " ", "--to", "a carrot"], "--from is empty"),
    ("rack-no-prompt", ["rack", "--from", "a", "--to", "b"], "prompt is required"),
    ("rack-layout-one", ["rack", "p", "--from", "a", "--to", "b", "--layout", "1"], "no focus stage"),
    ("rack-alpha-one", ["rack", "p", "--from", "a", "--to", "b", "--alpha", "1"], "alpha 1"),
    ("rack-alpha-range", ["rack", "p", "--from", "a", "--to", "b", "--alpha", "2"], "alpha"),
    ("rack-steps-zero", ["rack", "p", "--from", "a", "--to", "b", "--steps", "0"], "steps"),
    ("rack-out-not-animation", ["rack", "p", "--from", "a", "--to", "b", "-o", "{tmp}/r.png"], ".webp or .gif"),
    ("rack-out-dir-missing", ["rack", "p", "--from", "a", "--to", "b", "-o", "{tmp}/no/r.webp"], "does not exist"),
    ("rack-out-not-writable", ["rack", "p", "--from", "a", "--to", "b", "-o", "/proc/r.webp"], "not writable"),
    ("rack-out-is-dir", ["rack", "p", "--from", "a", "--to", "b", "-o", "{tmp}/sub.webp"], "is a directory"),
    ("rack-from-png-no-meta", ["rack", "--from-png", "{img}", "--to", "b"], "no generation parameters"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_before_loading(case, tmp_path, capsys, monkeypatch, no_load, dummy_weights):
    name, argv, needle = case
    work = tmp_path / "work"
    work.mkdir()
    (work / "sub.png").mkdir()
    (work / "sub.webp").mkdir()
    img = noise_png(work / "in.png")
    img60 = noise_png(work / "in60.png", size=(60, 64))
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
        argv += ["-o", str(work / ("rack.webp" if argv[0] == "rack" else "out.png"))]
    if argv[0] == "sweep" and "-o" not in argv:
        argv += ["-o", str(work)]
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path / "empty-weights"))
    monkeypatch.chdir(work)
    before = everything(work)
    code, out, err = run_cli(argv, capsys)
    print(f"{name}: {err.strip()}")
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1  # one line
    assert everything(work) == before  # no output file, no animation, no trace folder
    assert not [p for p in os.listdir(work) if p.endswith(".tmp")]


def test_layout_warning_then_load(tmp_path, capsys, no_load, dummy_weights):
    # σ < 0.7 with a focus prompt warns but proceeds: the (patched) loader is reached.
    with pytest.raises(Loaded):
        cli_main(["generate", "p", "--focus", "f", "--layout", "0.5", "--weights", str(dummy_weights),
                  "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert "warning" in err and "0.7" in err
    with pytest.raises(Loaded):
        cli_main(["generate", "p", "--focus", "f", "--layout", "0.7", "--weights", str(dummy_weights),
                  "-o", str(tmp_path / "o.png")])
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end, tiny model


def test_generate_metadata_and_determinism(tiny_ckpt, tmp_path, capsys):
    def args(seed, out):
        return ["generate", "a bunny and a carrot", "--focus", "a carrot", "--alpha", "0.25", "--layout", "0.75",
                "--negative", "blurry", "--cfg", "5", "--seed", seed, "--weights", tiny_ckpt, *TINY, "-o", out]

    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert run_cli(args(7, a), capsys)[0] == 0
    assert run_cli(args(7, b), capsys)[0] == 0
    assert a.read_bytes() == b.read_bytes()  # same seed -> identical PNG bytes (pixels and metadata)
    assert run_cli(args(8, c), capsys)[0] == 0
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))  # the seed matters
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "c.png"]  # no temp files left

    with Image.open(a) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    texts = png_texts(a)
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
                              "strength": 0.75, "eta": 0.0, "sampler": "ddim", "schedule": "normal",
                              "focus_to": None, "focus_mix": 0.0}
    assert data["executed_steps"] == 3 and data["mode"] == "txt2img"


def test_fast_flag_runs_the_fast_path_close_to_the_plain_one(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from gbsd_core import fast

    seen = []  # the FastOptions of every fast stepper the CLI makes
    real = fast.make_stepper
    monkeypatch.setattr(fast, "make_stepper", lambda bundle, opts, *a: seen.append(opts) or real(bundle, opts, *a))
    base = ["generate", "a bunny and a carrot", "--focus", "a carrot", "--weights", tiny_ckpt, *TINY]
    plain, fast, bf16 = tmp_path / "plain.png", tmp_path / "fast.png", tmp_path / "bf16.png"
    assert run_cli([*base, "-o", plain], capsys)[0] == 0
    assert run_cli([*base, "--fast", "-o", fast], capsys)[0] == 0
    assert run_cli([*base, "--fast", "--dtype", "bf16", "-o", bf16], capsys)[0] == 0
    assert len(seen) == 2  # the plain run makes none
    assert seen[0].fuse_qkv and seen[0].cache_context_kv and seen[0].channels_last and seen[0].compile is None
    assert seen[1].dtype == torch.bfloat16
    a, b = (np.asarray(Image.open(f), dtype=np.int16) for f in (plain, fast))
    assert np.abs(a - b).max() <= 2  # fp32 fast path: same math, other summation order
    assert png_texts(fast)["parameters"] == png_texts(plain)["parameters"]


def test_from_png_round_trip_and_override(tiny_ckpt, tmp_path, capsys):
    src, again, other = tmp_path / "src.png", tmp_path / "again.png", tmp_path / "other.png"
    code, _, _ = run_cli(["generate", "a red fox, bokeh", "--focus", "a fox", "--alpha", "0.4", "--seed", "3",
                       "--cfg", "4", "--eta", "0.5", "--weights", tiny_ckpt, *TINY, "-o", src], capsys)
    assert code == 0
    assert run_cli(["generate", "--from-png", src, "--weights", tiny_ckpt, "-q", "-o", again], capsys)[0] == 0
    assert np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(again)))
    assert pngmeta.read_params(again) == pngmeta.read_params(src)
    # An explicit flag overrides the PNG's value; everything else is kept.
    assert run_cli(["generate", "--from-png", src, "--alpha", "0.9", "--weights", tiny_ckpt, "-q", "-o", other],
                capsys)[0] == 0
    p_src, p_other = pngmeta.read_params(src), pngmeta.read_params(other)
    assert p_other.alpha == 0.9 and p_other == type(p_src)(**{**p_src.__dict__, "alpha": 0.9})
    assert not np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(other)))


def test_img2img(tiny_ckpt, tmp_path, capsys):
    init = noise_png(tmp_path / "init.png", seed=5)
    out = tmp_path / "out.png"
    code, _, err = run_cli(["img2img", "a painting", "--init", init, "--strength", "0.5", "--steps", "4", "-q",
                         "--weights", tiny_ckpt, "-o", out], capsys)
    assert code == 0, err
    assert "runs 2 of 4 steps" in err  # CompVis: int(strength * steps) executed steps
    with Image.open(out) as im:
        assert im.size == (64, 64)  # the input's size when --size is not given
    texts = png_texts(out)
    assert "Denoising strength: 0.5" in texts["parameters"]
    data = json.loads(texts["gbsd"])
    assert data["mode"] == "img2img" and data["executed_steps"] == 2 and data["params"]["strength"] == 0.5


def test_sweep_writes_one_png_per_cell(tiny_ckpt, tmp_path, capsys):
    outdir = tmp_path / "sweep"
    outdir.mkdir()
    code, out, err = run_cli(["sweep", "a bunny and a carrot", "--focus-stack", "a carrot", "a bunny",
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
    code, out, _ = run_cli(["sweep", "p", "--focus", "f", "--alphas", "0.5,0.75", "--weights", tiny_ckpt, *TINY,
                         "-o", tmp_path / "{seed}_{alpha:.2f}.png"], capsys)
    assert code == 0 and (tmp_path / "0_0.50.png").exists() and (tmp_path / "0_0.75.png").exists()




def test_from_png_of_another_sampler_is_refused_before_any_weights(tmp_path, capsys):
    """A (hand-made) PNG whose JSON names a sampler the command line cannot run yet: one line, exit 2, nothing read."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("gbsd", json.dumps({"version": 1, "params": {"prompt": "a fox", "steps": 4, "sampler": "euler"}}))
    src = tmp_path / "src.png"
    Image.new("RGB", (64, 64)).save(src, pnginfo=info)
    code, out, err = run_cli(["generate", "--from-png", src, "--weights", tmp_path / "missing.safetensors", "-q",
                              "-o", tmp_path / "out.png"], capsys)
    assert code == 2 and "sampler 'euler'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()

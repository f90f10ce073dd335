"""The `gbsd` command line, end to end on a tiny random SD1 checkpoint (conftest's `tiny_ckpt`): inputs that look
odd but are fair, edge values, metadata, determinism, img2img, sweeps. (Bad inputs: tests/cli/test_bad_inputs.py.)"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from _cli import A1111, INFO, TINY, Loaded, M, meta_png, noise_png, png_texts, run_cli
from PIL import Image

from gbsd_core.cli import pngmeta
from gbsd_core.cli.main import main as cli_main

# ------------------------------------------------------------------------------------------------ no model needed

def test_layout_warning_then_load(tmp_path, capsys, no_load, tiny_ckpt):
    # a layout fraction below 0.7 with a focus prompt warns but proceeds: the (patched) loader is reached.
    with pytest.raises(Loaded):
        cli_main(["generate", "p", "--focus", "f", "--layout", "0.5", "--weights", str(tiny_ckpt),
                  "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert "warning" in err and "0.7" in err
    with pytest.raises(Loaded):
        cli_main(["generate", "p", "--focus", "f", "--layout", "0.7", "--weights", str(tiny_ckpt),
                  "-o", str(tmp_path / "o.png")])
    assert "warning" not in capsys.readouterr().err


FAIR_INPUTS = [
    # (id, argv): inputs that look odd but can fairly be accepted, so they must run (and validation must not reach
    # for the model's file before it has to)
    ("cfg-zero", ["generate", "p", "--cfg", "0"]),
    ("eta-one", ["generate", "p", "--eta", "1"]),
    ("seed-max", ["generate", "p", "--seed", str(2**64 - 1)]),
    ("steps-999", ["generate", "p", "--steps", "999"]),
    ("img2img-1000-steps", ["img2img", "p", "--init", "{img}", "--steps", "1000", "--strength", "0.5"]),
    ("size-odd-latent", ["generate", "p", "--size", "72x56"]),
    ("init-16-bit", ["img2img", "p", "--init", "{img16}"]),
    ("init-palette", ["img2img", "p", "--init", "{imgP}"]),
    ("init-huge-photo-resized", ["img2img", "p", "--init", "{img4k}", "--size", "64x64"]),
    ("from-png-int-alpha", ["generate", "--from-png", M(alpha=1, focus="f", cfg=7)]),
    ("from-png-unknown-fields", ["generate", "--from-png", M(guidance_rescale=0.7, future=[1, 2])]),
    ("from-png-ddim-named", ["generate", "--from-png", M(sampler="ddim", schedule="normal")]),
    ("sampler-euler-a-karras", ["generate", "p", "--sampler", "euler_a", "--schedule", "karras"]),
    ("sampler-dpmpp-998-steps", ["generate", "p", "--sampler", "dpmpp_2m", "--steps", "998"]),
    ("from-png-dpmpp-karras", ["generate", "--from-png", M(sampler="dpmpp_2m", schedule="karras")]),
    ("from-png-heun-overridden", ["generate", "--from-png", M(sampler="heun", schedule="exponential"), "--sampler",
                                  "euler", "--schedule", "normal"]),
    ("sweep-sampler", ["sweep", "p", "--focus", "f", "--alphas", "0", "--sampler", "dpmpp_2m"]),
    ("prompt-unicode", ["generate", "ünïcödé 🐰, a \"quoted\": prompt\nwith two lines"]),
    # A1111 infotexts: the hires fix at denoise 0 (an upscale alone), DDIM with the schedule A1111 >= 1.9 writes for
    # every sampler, Windows line ends
    ("info-hires-denoise-0", ["generate", "--from-png", INFO(A1111 + ", Denoising strength: 0, Hires upscale: 2, "
                                                         "Hires upscaler: Latent")]),
    ("info-ddim-karras", ["generate", "--from-png", INFO(A1111.replace("DDIM", "DDIM, Schedule type: Karras"))]),
    ("info-crlf", ["generate", "--from-png", INFO(A1111 + "\r\n", prompt="a cat\r\nNegative prompt: dog\r")]),
]


@pytest.mark.parametrize("case", FAIR_INPUTS, ids=[c[0] for c in FAIR_INPUTS])
def test_fair_input_is_accepted(case, tmp_path, monkeypatch, no_load, tiny_ckpt):
    _, argv = case
    Image.new("RGB", (3840, 2160), (90, 140, 200)).save(tmp_path / "4k.png")  # a photo's size, resized by --size
    subs = {"{img}": noise_png(tmp_path / "in.png"), "{img4k}": tmp_path / "4k.png"}
    Image.new("I;16", (64, 64), 300).save(tmp_path / "i16.png")
    Image.new("P", (64, 64), 3).save(tmp_path / "p.png")
    subs.update({"{img16}": tmp_path / "i16.png", "{imgP}": tmp_path / "p.png"})
    argv = [str(meta_png(tmp_path / "meta.png", gbsd=a[len("{meta:"):-1])) if a.startswith("{meta:")
            else str(meta_png(tmp_path / "info.png", parameters=a[len("{info:"):-1])) if a.startswith("{info:")
            else str(subs.get(a, a)) for a in argv]
    with pytest.raises(Loaded):
        cli_main([*argv, "--weights", str(tiny_ckpt), "-o", str(tmp_path / "out.png")])


def test_a_fifo_sha256_sidecar_does_not_hang(tiny_ckpt, tmp_path, capsys):
    """The cached digest beside a checkpoint is read only if it is a regular file (a pipe there would block)."""
    ckpt = tmp_path / "tiny.safetensors"
    ckpt.write_bytes(tiny_ckpt.read_bytes())
    os.mkfifo(tmp_path / "tiny.safetensors.sha256")
    code, _, err = run_cli(["generate", "p", "--weights", ckpt, *TINY, "-o", tmp_path / "o.png"], capsys)
    assert code == 0, err
    assert json.loads(png_texts(tmp_path / "o.png")["gbsd"])["model"]["sha256"] == \
        hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_end_to_end_edge_values(tiny_ckpt, tmp_path, capsys):
    """The largest seed, η = 1 and a layout-fraction-1 sweep run and are recorded as given."""
    out = tmp_path / "edge.png"
    code, _, err = run_cli(["generate", "p", "--focus", "f", "--seed", str(2**64 - 1), "--eta", "1", "--cfg", "0",
                            "--weights", tiny_ckpt, *TINY, "-o", out], capsys)
    assert code == 0, err
    params = pngmeta.read_params(out)
    assert (params.seed, params.eta, params.cfg) == (2**64 - 1, 1.0, 0.0)


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
                              "spacing": None, "focus_to": None, "focus_mix": 0.0, "emphasis": "original", "chunk_padding": "repeat"}
    assert data["executed_steps"] == 3 and data["mode"] == "txt2img" and data["embeddings"] == {}


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


def test_a1111_infotext_from_windows_with_the_hires_fix_is_its_first_pass(tiny_ckpt, tmp_path, capsys):
    """An A1111 image (no gbsd chunk) made with the hires fix at denoise 0, its text with CRLF line ends: gbsd makes
    the first pass, a txt2img at Size, says that the hires pass is not reproduced, and keeps no "\r" in the prompts."""
    text = ("a cat on a sofa\r\nNegative prompt: blurry\r\nSteps: 3, Sampler: DDIM, Schedule type: Karras, CFG scale: 7, "
            "Seed: 9, Size: 64x64, Denoising strength: 0, Hires upscale: 2, Hires upscaler: Latent\r\n")
    src = meta_png(tmp_path / "a1111.png", parameters=text)
    code, _, err = run_cli(["generate", "--from-png", src, "--weights", tiny_ckpt, "-q", "-o", tmp_path / "o.png"],
                           capsys)
    assert code == 0, err
    assert "hires fix" in err and "Hires upscale: 2" in err and "first pass" in err
    data = json.loads(png_texts(tmp_path / "o.png")["gbsd"])
    assert data["mode"] == "txt2img" and data["size"] == [64, 64]
    assert (data["params"]["prompt"], data["params"]["negative"], data["params"]["sampler"]) == (
        "a cat on a sofa", "blurry", "ddim")


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


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_img2img_from_a_16_bit_file_is_its_8_bit_twin(fmt, tiny_ckpt, tmp_path, capsys):
    """A 16-bit greyscale init (each 8-bit level v stored as 257·v) makes the image its 8-bit grey makes: scaled,
    not clipped to white by Pillow's convert("RGB")."""
    grey8 = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / f"i16.{fmt}")
    Image.fromarray(grey8).save(tmp_path / "l8.png")
    outs = []
    for name in (f"i16.{fmt}", "l8.png"):
        outs.append(tmp_path / f"out-{name}.png")
        code, _, err = run_cli(["img2img", "a painting", "--init", tmp_path / name, "--strength", "0.5", "--steps", "4",
                                "-q", "--weights", tiny_ckpt, "-o", outs[-1]], capsys)
        assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(outs[0])), np.asarray(Image.open(outs[1])))


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


@pytest.mark.parametrize("command", [["generate", "p"], ["sweep", "p", "--focus", "f", "--alphas", "0,1"]],
                         ids=["generate", "sweep"])
def test_a_non_finite_result_exits_1_naming_it_and_writes_nothing(command, tiny_ckpt, tmp_path, capsys,
                                                                    monkeypatch):
    """A model whose decoder gives NaN (fp16 overflow, a broken finetune): one line naming NaN, exit 1, no PNG (the
    old behaviour: an all-black PNG and exit 0)."""
    import gbsd_core
    from gbsd_core.cli import common

    def nan_decoder(checkpoint, device, dtype):
        b = gbsd_core.load(checkpoint.path)
        with torch.no_grad():
            b.vae.decoder.conv_out.bias[0] = float("nan")
        return b

    monkeypatch.setattr(common, "load_checkpoint", nan_decoder)
    out = tmp_path / ("o.png" if command[0] == "generate" else "sweep")
    out.mkdir() if command[0] == "sweep" else None
    code, _, err = run_cli([*command, "--weights", tiny_ckpt, *TINY, "-o", out], capsys)
    print(err)
    assert code == 1 and err.count("\n") == 1 and "NaN" in err and "unexpected" not in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.png"))

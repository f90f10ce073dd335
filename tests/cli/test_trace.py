"""`gbsd generate --trace DIR` end to end on the tiny models: the image is the untraced one byte for byte, the
sheet and the animation hold the kept frames, and the sheet's metadata reproduces the image. (Bad input: the
BAD_INPUTS table of test_generate.py.)"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _cli import TINY, png_texts, run_cli
from PIL import Image

ARGS = ["generate", "a bunny and a carrot in a garden, bokeh", "--focus", "a carrot", "--seed", "2"]


@pytest.fixture(params=["tiny_ckpt", "responsive_ckpt"])
def ckpt(request):
    return request.getfixturevalue(request.param)


def test_trace_leaves_the_image_unchanged_and_writes_sheet_and_animation(ckpt, tmp_path, capsys):
    plain, traced, trace_dir = tmp_path / "plain.png", tmp_path / "bokeh.png", tmp_path / "trace"
    base = [*ARGS, "--weights", ckpt, "--steps", "10", "--size", "64x64", "-q"]
    assert run_cli([*base, "-o", plain], capsys)[0] == 0
    code, out, err = run_cli([*base, "--trace", trace_dir, "--trace-every", "3", "-o", traced], capsys)
    assert code == 0, err
    assert traced.read_bytes() == plain.read_bytes()  # pixels and metadata: the trace changes nothing
    sheet, anim = trace_dir / "bokeh_trace.png", trace_dir / "bokeh_trace.webp"
    assert out.split() == [str(traced), str(sheet), str(anim)]
    assert sorted(os.listdir(trace_dir)) == ["bokeh_trace.png", "bokeh_trace.webp"]
    data = json.loads(png_texts(sheet)["gbsd"])
    # 10 steps, layout fraction 0.8: layout 0..7, focus from step 8; every 3rd from the first, the first focus step, the last.
    assert data["trace"]["steps"] == [0, 3, 6, 8, 9] and data["trace"]["preview"] == "vae"
    assert data["trace"]["captions"][3] == "step 9/10\nt 101\nfocus starts"
    assert data["params"] == json.loads(png_texts(traced)["gbsd"])["params"]  # the image's own parameters
    with Image.open(anim) as im:
        assert im.n_frames == 5
    with Image.open(sheet) as im:
        assert im.width > 5 * 64  # five frames in one row


def test_from_png_on_the_sheet_reproduces_the_image(responsive_ckpt, tmp_path, capsys):
    image, again = tmp_path / "x.png", tmp_path / "again.png"
    assert run_cli([*ARGS, "--weights", responsive_ckpt, *TINY, "--trace", tmp_path, "-o", image], capsys)[0] == 0
    assert run_cli(["generate", "--from-png", tmp_path / "x_trace.png", "--weights", responsive_ckpt, "-q",
                    "-o", again], capsys)[0] == 0
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(again)))


def test_default_keeps_at_most_16_frames_and_the_linear_preview_works(responsive_ckpt, tmp_path, capsys):
    base = [*ARGS, "--weights", responsive_ckpt, "--steps", "40", "--size", "64x64", "-q"]
    code, _, err = run_cli([*base, "--trace", tmp_path / "vae", "-o", tmp_path / "a.png"], capsys)
    assert code == 0, err
    steps = json.loads(png_texts(tmp_path / "vae" / "a_trace.png")["gbsd"])["trace"]["steps"]
    assert steps == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32, 33, 36, 39]  # k = 3, the focus stage from 32
    code, _, err = run_cli([*base, "--trace", tmp_path / "lin", "--trace-preview", "linear", "-o", tmp_path / "b.png"],
                           capsys)
    assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "lin" / "b_trace.webp") as im:
        assert im.n_frames == len(steps)


def test_img2img_trace_covers_the_executed_steps(responsive_ckpt, tmp_path, capsys):
    from _cli import noise_png

    init = noise_png(tmp_path / "init.png", seed=3)
    code, _, err = run_cli(["img2img", "a garden", "--focus", "a carrot", "--init", init, "--strength", "0.5",
                            "--steps", "8", "--trace", tmp_path, "--weights", responsive_ckpt, "-q",
                            "-o", tmp_path / "out.png"], capsys)
    assert code == 0, err
    data = json.loads(png_texts(tmp_path / "out_trace.png")["gbsd"])
    assert data["trace"]["steps"] == [0, 1, 2, 3]  # 4 of 8 steps run; layout fraction 0.8 -> layout 0..2, focus from 3
    assert data["trace"]["captions"][3] == "step 4/4\nt 1\nfocus starts"

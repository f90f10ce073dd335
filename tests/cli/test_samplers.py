"""--sampler / --schedule on the `gbsd` command line, end to end on the tiny SD1 checkpoint (conftest's `tiny_ckpt`):
every sampler recorded in the PNG by A1111's names and reproduced by --from-png from either chunk, the fast path,
img2img's truncation, the help, and a PNG naming an unknown sampler. (The bad-input rows of --sampler / --schedule
are in test_generate.py's BAD_INPUTS.)"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from _cli import TINY, meta_png, noise_png, png_texts, run_cli
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from gbsd_core.cli import pngmeta

SAMPLER_RUNS = [("ddim", "normal")] + [(n, sch) for n in ("euler", "euler_a", "dpmpp_2m") for sch in ("normal", "karras")]


@pytest.mark.parametrize("sampler, schedule", SAMPLER_RUNS)
def test_every_sampler_end_to_end_and_back_from_either_chunk(sampler, schedule, tiny_ckpt, tmp_path, capsys):
    """--sampler/--schedule run and are recorded by A1111's names and in the JSON; --from-png reproduces the image
    from the JSON chunk and, with it stripped, from the A1111 text alone."""
    src, again, via_text = tmp_path / "src.png", tmp_path / "again.png", tmp_path / "via-text.png"
    flags = ["--sampler", sampler] + (["--schedule", schedule] if schedule != "normal" else [])
    code, _, err = run_cli(["generate", "a red fox, bokeh", "--focus", "a fox", "--layout", "0.7", *flags,
                            "--weights", tiny_ckpt, *TINY, "-o", src], capsys)
    assert code == 0, err
    texts = png_texts(src)
    data = json.loads(texts["gbsd"])
    assert (data["params"]["sampler"], data["params"]["schedule"]) == (sampler, schedule)
    label = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}[sampler]
    assert f"Sampler: {label}" in texts["parameters"]
    assert ("Schedule type" in texts["parameters"]) == (sampler != "ddim")
    assert run_cli(["generate", "--from-png", src, "--weights", tiny_ckpt, "-q", "-o", again], capsys)[0] == 0
    info = PngInfo()
    info.add_text("parameters", texts["parameters"])  # the JSON chunk stripped
    stripped = tmp_path / "stripped.png"
    Image.open(src).save(stripped, pnginfo=info)
    assert run_cli(["generate", "--from-png", stripped, "--weights", tiny_ckpt, "-q", "-o", via_text], capsys)[0] == 0
    for out in (again, via_text):
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(src))), out
        assert pngmeta.read_params(out) == pngmeta.read_params(src)


def test_samplers_change_the_image_and_run_on_the_fast_path(tiny_ckpt, tmp_path, capsys):
    base = ["generate", "a red fox, bokeh", "--focus", "a fox", "--weights", tiny_ckpt, *TINY]
    runs = {}
    for name, extra in (("ddim", []), ("dpmpp", ["--sampler", "dpmpp_2m", "--schedule", "karras"]),
                        ("dpmpp-fast", ["--sampler", "dpmpp_2m", "--schedule", "karras", "--fast"])):
        assert run_cli([*base, *extra, "-o", tmp_path / f"{name}.png"], capsys)[0] == 0
        runs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.abs(runs["ddim"] - runs["dpmpp"]).max() > 2  # another sampler, another image
    assert np.abs(runs["dpmpp"] - runs["dpmpp-fast"]).max() <= 2  # the fast step of that sampler: the same image
    assert png_texts(tmp_path / "dpmpp-fast.png")["parameters"] == png_texts(tmp_path / "dpmpp.png")["parameters"]


def test_img2img_reports_the_samplers_own_truncation(tiny_ckpt, tmp_path, capsys):
    init = noise_png(tmp_path / "init.png", seed=5)
    code, _, err = run_cli(["img2img", "a painting", "--init", init, "--strength", "0.5", "--steps", "5", "-q",
                            "--sampler", "euler_a", "--schedule", "karras", "--weights", tiny_ckpt,
                            "-o", tmp_path / "out.png"], capsys)
    assert code == 0, err
    assert "runs 2 of 5 steps (Euler a Karras)" in err  # int(5 * 0.5) = 2 executed steps of that schedule
    assert json.loads(png_texts(tmp_path / "out.png")["gbsd"])["executed_steps"] == 2


def test_the_help_names_every_sampler_and_schedule():
    from gbsd_core.cli.generate import SAMPLER_HELP, SCHEDULE_HELP
    from gbsd_core.samplers import SAMPLERS
    from gbsd_core.sigmas import SCHEDULES

    assert [w for w in re.findall(r"\w+", SAMPLER_HELP) if w in SAMPLERS] == list(SAMPLERS)
    assert [w for w in re.findall(r"\w+", SCHEDULE_HELP) if w in SCHEDULES] == list(SCHEDULES)


def test_a_sampler_name_from_a_png_is_checked_by_its_rule(tmp_path, capsys, no_load, tiny_ckpt):
    """A PNG naming a sampler that does not exist: the core's rule (params.FIELDS), one line, exit 2."""
    png = meta_png(tmp_path / "m.png", {"version": 1, "params": {"prompt": "p", "sampler": "heun"}})
    code, _, err = run_cli(["generate", "--from-png", png, "--weights", tiny_ckpt, "-o", tmp_path / "o.png"], capsys)
    assert code == 2 and "sampler must be one of ddim, euler, euler_a, dpmpp_2m" in err and err.count("\n") == 1

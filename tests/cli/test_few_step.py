"""Few-step runs on the `gbsd` command line (README "Few-step"): a turbo family's defaults, --spacing, --sampler lcm,
their A1111 names and --from-png, the --cfg ≤ 1 note, and the bad inputs (exit 2, one line, nothing written)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _cli import meta_png, png_texts, run_cli
from PIL import Image

from gbsd_core.cli import pngmeta


def test_sdxl_turbo_family_runs_its_cards_recipe_and_reproduces(tiny_sdxl_ckpt, tmp_path, capsys):
    """--family sdxl-turbo on SDXL base keys: Euler a, trailing ("SGM Uniform"), 1 step, guidance off, 512 native
    (64x64 given here); --from-png gives the same pixels from either chunk."""
    src, again, via_text = tmp_path / "t.png", tmp_path / "again.png", tmp_path / "via-text.png"
    code, _, err = run_cli(["generate", "a red fox", "--weights", tiny_sdxl_ckpt, "--family", "sdxl-turbo",
                            "--size", "64x64", "-q", "-o", src], capsys)
    assert code == 0, err
    texts = png_texts(src)
    assert "Steps: 1, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 0.0," in texts["parameters"]
    params = json.loads(texts["gbsd"])["params"]
    assert (params["sampler"], params["spacing"], params["steps"], params["cfg"]) == ("euler_a", "trailing", 1, 0.0)
    assert run_cli(["generate", "--from-png", src, "--weights", tiny_sdxl_ckpt, "--family", "sdxl-turbo", "-q",
                    "-o", again], capsys)[0] == 0
    stripped = tmp_path / "stripped.png"
    meta_png(stripped, parameters=texts["parameters"])
    assert run_cli(["generate", "--from-png", stripped, "--weights", tiny_sdxl_ckpt, "--family", "sdxl-turbo", "-q",
                    "-o", via_text], capsys)[0] == 0
    for out in (again, via_text):
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(src))), out
    # flags override the recipe
    code, _, err = run_cli(["generate", "a red fox", "--weights", tiny_sdxl_ckpt, "--family", "sdxl-turbo",
                            "--size", "64x64", "--steps", "4", "--focus", "a fox", "-q", "-o", tmp_path / "4.png"],
                           capsys)
    assert code == 0, err
    assert "Steps: 4, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 0.0," in png_texts(tmp_path / "4.png")[
        "parameters"]


def test_lcm_and_spacing_end_to_end_and_back(tiny_ckpt, tmp_path, capsys):
    for name, flags, label in (("lcm", ["--sampler", "lcm", "--cfg", "1.5", "--steps", "4"], "Sampler: LCM, CFG"),
                               ("trail", ["--sampler", "euler", "--spacing", "trailing", "--steps", "2", "--cfg", "0"],
                                "Sampler: Euler, Schedule type: SGM Uniform")):
        src, again = tmp_path / f"{name}.png", tmp_path / f"{name}-again.png"
        code, _, err = run_cli(["generate", "a red fox, bokeh", "--focus", "a fox", *flags, "--weights", tiny_ckpt,
                                "--size", "64x64", "-q", "-o", src], capsys)
        assert code == 0, err
        assert label in png_texts(src)["parameters"]
        assert run_cli(["generate", "--from-png", src, "--weights", tiny_ckpt, "-q", "-o", again], capsys)[0] == 0
        assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(src)))
        assert pngmeta.read_params(again) == pngmeta.read_params(src)


def test_cfg_below_one_says_guidance_is_off(tiny_ckpt, tmp_path, capsys):
    code, _, err = run_cli(["generate", "a red fox", "--cfg", "0.5", "--weights", tiny_ckpt, "--steps", "2",
                            "--size", "64x64", "-q", "-o", tmp_path / "a.png"], capsys)
    assert code == 0 and "turns guidance off" in err


BAD = [
    (["--family", "sd-turbo"], "sd-turbo.*expects a openclip text encoder"),  # SD1 keys
    (["--sampler", "lcm", "--eta", "0.5"], "eta is DDIM's"),
    (["--sampler", "lcm", "--steps", "60"], "at most 50 steps"),
    (["--spacing", "backwards"], "spacing must be one of leading, linspace, k-diffusion, trailing"),
    (["--sampler", "lcm", "--spacing", "trailing"], "lcm sampler runs its own schedule"),
    (["--focus", "a fox", "--steps", "1"], "GBSD at 1 step"),
]


@pytest.mark.parametrize("flags, match", BAD)
def test_few_step_bad_inputs_exit_2_with_one_line(flags, match, tiny_ckpt, tmp_path, capsys):
    import re

    out = tmp_path / "x.png"
    code, _, err = run_cli(["generate", "a red fox", "--weights", tiny_ckpt, "--size", "64x64", "-q", *flags,
                            "-o", out], capsys)
    assert code == 2, err
    assert re.search(match, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()

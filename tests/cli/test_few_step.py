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


# ------------------------------------------------------------------------------------------ turbo diffusers folders

# stabilityai/sd-turbo's scheduler/scheduler_config.json is EulerDiscreteScheduler on SD's scaled-linear betas with
# timestep_spacing "trailing"; the folder below writes that shape over a tiny SD2-architecture pipeline.
TURBO_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                   "interpolation_type": "linear", "use_karras_sigmas": False, "steps_offset": 1,
                   "timestep_spacing": "trailing"}


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    from _tiny import save_tiny_pipe

    return save_tiny_pipe(tmp_path_factory.mktemp("sd2-folder") / "pipe", sd2=True)


def _variant(base, dest, spacing: str, sample_size: int, **scheduler):
    """A copy of a tiny diffusers folder with the turbo scheduler config at `spacing` and the UNet's sample_size
    (native side = sample_size x the tiny VAE's factor 2)."""
    import shutil

    shutil.copytree(base, dest)
    (dest / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**TURBO_SCHEDULER, "timestep_spacing": spacing, **scheduler}))
    unet = json.loads((dest / "unet" / "config.json").read_text())
    (dest / "unet" / "config.json").write_text(json.dumps({**unet, "sample_size": sample_size}))
    return dest


FOLDERS = [  # (spacing, sample_size, extra scheduler options, the family it is)
    ("trailing", 256, {}, "sd-turbo"),  # SD-Turbo's: trailing at a native 512²
    ("leading", 256, {}, "sd2-512"),  # SD 2.1-base's spacing at 512²
    ("trailing", 32, {}, "sd2-512"),  # trailing, but native 64²: not a turbo model's size
    ("trailing", 384, {}, "sd2-512"),  # native 768²
    ("trailing", 256, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, "sd2-768-v"),  # zero SNR
]


@pytest.mark.parametrize("spacing, sample_size, extra, family", FOLDERS)
def test_a_diffusers_folder_with_a_trailing_scheduler_at_512_is_the_turbo_family(sd2_folder, tmp_path, spacing,
                                                                                  sample_size, extra, family):
    import gbsd_core

    folder = _variant(sd2_folder, tmp_path / "f", spacing, sample_size, **extra)
    assert gbsd_core.load(folder).family.name == family


def test_the_cli_runs_the_turbo_recipe_on_a_turbo_folder_and_not_on_its_sd2_twin(sd2_folder, tmp_path, capsys):
    """No flags: a turbo folder gets its card's Euler a, trailing, 1 step, guidance off; the same weights with SD 2.1's
    leading scheduler config get SD's defaults (DDIM, guided)."""
    runs = {}
    for name, spacing in (("turbo", "trailing"), ("sd2", "leading")):
        folder = _variant(sd2_folder, tmp_path / name, spacing, 256)
        out = tmp_path / f"{name}.png"
        code, _, err = run_cli(["generate", "a red fox", "--weights", folder, "--size", "64x64", "-q", "-o", out],
                               capsys)
        assert code == 0, err
        runs[name] = json.loads(png_texts(out)["gbsd"])["params"]
        runs[name]["text"] = png_texts(out)["parameters"]
    t = runs["turbo"]
    assert (t["sampler"], t["spacing"], t["steps"], t["cfg"]) == ("euler_a", "trailing", 1, 0.0)
    assert "Steps: 1, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 0.0," in t["text"]
    s = runs["sd2"]
    assert s["sampler"] != "euler_a" and s["steps"] > 1 and s["cfg"] > 1 and s.get("spacing") != "trailing"


def test_info_on_a_turbo_folder_says_the_recipe_it_runs(sd2_folder, tmp_path, capsys):
    """`gbsd info` on a turbo folder names the recipe's trailing spacing beside the schedule's own leading one (it
    showed only "leading spacing" before); its SD 2.1 twin has no recipe line."""
    lines = {}
    for name, spacing in (("turbo", "trailing"), ("sd2", "leading")):
        code, out, err = run_cli(["info", _variant(sd2_folder, tmp_path / name, spacing, 256)], capsys)
        assert code == 0, err
        lines[name] = [line.strip() for line in out.splitlines() if line.strip().startswith("recipe:")]
    assert lines["turbo"] == ["recipe: euler_a, trailing spacing, 1 step, cfg 0 (the CLI's defaults for this family)"]
    assert lines["sd2"] == []


MISMATCHES = [  # a turbo family forced onto weights of another architecture: the loader's family check, one line
    ("sd-turbo", "tiny_sdxl_ckpt", "sd-turbo.*expects a openclip text encoder.*holds a sdxl-clip\\+openclip one"),
    ("sdxl-turbo", "tiny_ckpt", "sdxl-turbo.*expects a sdxl-clip\\+openclip text encoder.*holds a clip one"),
    ("sdxl-turbo", "sd2_folder", "sdxl-turbo.*expects a sdxl-clip\\+openclip text encoder.*holds a openclip one"),
    ("sd-turbo", "tiny_sdxl_refiner_ckpt", "sd-turbo.*expects a openclip text encoder.*holds a sdxl-openclip one"),
]


@pytest.mark.parametrize("family, weights, match", MISMATCHES)
def test_a_turbo_family_forced_onto_other_weights_exits_2_with_one_line(family, weights, match, request, tmp_path,
                                                                         capsys):
    import re

    out = tmp_path / "x.png"
    code, _, err = run_cli(["generate", "a red fox", "--weights", request.getfixturevalue(weights), "--family", family,
                            "--size", "64x64", "-q", "-o", out], capsys)
    assert code == 2, err
    assert re.search(match, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()

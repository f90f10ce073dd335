"""The `gbsd` command line on SDXL, end to end on tiny random SDXL base / refiner files (conftest.py) and a tiny SDXL
diffusers folder: generate, img2img, sweep, PNG metadata and --from-png, the base -> refiner hand-off, eval, grid,
rack, --trace, --fast, `gbsd info` and `gbsd download sdxl`, the model's own size rules (a 1024 native side, up to
4096, multiples of 8)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import EVAL_ARGS, PAIRS, TINY, png_texts, run_cli
from PIL import Image

from gbsd_core.cli import generate as generate_cli
from gbsd_core.cli import pngmeta, weights
from gbsd_core.cli.main import build_parser

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


@pytest.fixture(scope="module")
def weights_dir(tiny_sdxl_ckpt, tiny_sdxl_refiner_ckpt, tmp_path_factory):
    """A weights folder holding the two tiny files, so a PNG's model name can be resolved from it."""
    d = tmp_path_factory.mktemp("weights")
    for f in (tiny_sdxl_ckpt, tiny_sdxl_refiner_ckpt):
        shutil.copy(f, d / f.name)
    return d


def test_generate_metadata_and_from_png_round_trip(weights_dir, tmp_path, capsys, monkeypatch):
    """GBSD txt2img on the base, recorded in the PNG; `--from-png` alone (the model found by its name in the weights
    folder) makes the same pixels; a flag overrides one field."""
    monkeypatch.setenv("GBSD_WEIGHTS", str(weights_dir))
    base = weights_dir / "tiny-sdxl-base.safetensors"
    src, again, other = tmp_path / "src.png", tmp_path / "again.png", tmp_path / "other.png"
    code, _, err = run_cli(["generate", PROMPT, "--focus", FOCUS, "--alpha", "0.3", "--layout", "0.67", "--seed", "5",
                            "--weights", base, *TINY, "-o", src], capsys)
    assert code == 0, err
    texts = png_texts(src)
    assert "Model: tiny-sdxl-base" in texts["parameters"] and "GBSD focus: a carrot" in texts["parameters"]
    data = json.loads(texts["gbsd"])
    assert data["model"]["file"] == "tiny-sdxl-base.safetensors" and data["mode"] == "txt2img"
    assert (data["params"]["width"], data["params"]["height"], data["layout_steps"]) == (64, 64, 2)
    assert run_cli(["generate", "--from-png", src, "-q", "-o", again], capsys)[0] == 0
    assert np.array_equal(pixels(src), pixels(again))
    assert pngmeta.read_params(again) == pngmeta.read_params(src)
    assert run_cli(["generate", "--from-png", src, "--alpha", "1", "-q", "-o", other], capsys)[0] == 0
    assert pngmeta.read_params(other).alpha == 1.0 and not np.array_equal(pixels(src), pixels(other))


def test_sizes_follow_the_model(tiny_sdxl_ckpt, tiny_ckpt, tmp_path, capsys):
    """SDXL's native side is 1024 (no --size: 1024x1024) and its largest 4096 (4x), where SD1's stops at 2048; sides
    must be multiples of the VAE's 8. Checked by the plan, before any weights load."""
    parser = build_parser()

    def plan(*argv):
        return generate_cli.plan(parser.parse_args(["generate", "p", *map(str, argv), "-o", str(tmp_path / "o.png")]))

    from gbsd_core.params import image_size

    p = plan("--weights", tiny_sdxl_ckpt)
    assert image_size(p.params, p.checkpoint.limits()) == (1024, 1024)
    p = plan("--weights", tiny_sdxl_ckpt, "--size", "4096x1024")
    assert image_size(p.params, p.checkpoint.limits()) == (4096, 1024)
    code, _, err = run_cli(["generate", "p", "--weights", tiny_ckpt, "--size", "4096x1024", "-o", tmp_path / "x.png"],
                           capsys)
    assert code == 2 and "larger than 2048" in err
    assert not (tmp_path / "x.png").exists()


def test_native_size_of_an_sdxl_diffusers_folder(sdxl_pipe, tmp_path, capsys):
    """A folder's own sample_size x VAE factor is its native size (the tiny folder: 64), as diffusers defaults to."""
    out = tmp_path / "o.png"
    code, _, err = run_cli(["generate", PROMPT, "--weights", sdxl_pipe, "--steps", "3", "-q", "-o", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (64, 64)
    assert json.loads(png_texts(out)["gbsd"])["model"] == {"file": sdxl_pipe.name, "sha256": None}


def test_base_then_refiner_img2img(weights_dir, tmp_path, capsys):
    """README's recipe: the base makes the image, the refiner re-runs the last part of the schedule on it (img2img,
    same prompt and seed); the refiner's PNG records its own model, the mode and the executed steps."""
    base, refined = tmp_path / "base.png", tmp_path / "refined.png"
    common = [PROMPT, "--seed", "3", "--steps", "6", "-q"]
    assert run_cli(["generate", *common, "--size", "64x64", "--weights", weights_dir / "tiny-sdxl-base.safetensors",
                    "-o", base], capsys)[0] == 0
    code, _, err = run_cli(["img2img", *common, "--init", base, "--strength", "0.34",
                            "--weights", weights_dir / "tiny-sdxl-refiner.safetensors", "-o", refined], capsys)
    assert code == 0, err
    assert "runs 2 of 6 steps" in err
    assert Image.open(refined).size == (64, 64)  # the input's size
    data = json.loads(png_texts(refined)["gbsd"])
    assert (data["model"]["file"], data["mode"], data["executed_steps"]) == ("tiny-sdxl-refiner.safetensors",
                                                                            "img2img", 2)
    assert "Denoising strength: 0.34" in png_texts(refined)["parameters"]
    # the Python API's recipe (README) makes the same pixels from the base's PNG
    import gbsd_core
    from gbsd_core.pipeline import GenerationParams, generate

    refiner = gbsd_core.load(weights_dir / "tiny-sdxl-refiner.safetensors")
    again = generate(refiner, GenerationParams(PROMPT, seed=3, steps=6, strength=0.34), init_image=Image.open(base))
    assert np.array_equal(np.asarray(again.image, dtype=np.int16), pixels(refined))
    assert not np.array_equal(pixels(base), pixels(refined))


def test_sdxl_with_euler_and_dpmpp_karras_and_the_fast_path(weights_dir, tmp_path, capsys, monkeypatch):
    """--sampler / --schedule on SDXL: recorded as A1111 names them, --from-png runs the same sampler again; --fast
    runs it through the fast step (vector y and DPM++'s history in its inputs)."""
    monkeypatch.setenv("GBSD_WEIGHTS", str(weights_dir))
    base = weights_dir / "tiny-sdxl-base.safetensors"
    args = ["generate", PROMPT, "--focus", FOCUS, "--seed", "2", "--weights", base, *TINY]
    for sampler, schedule, name in (("euler", "normal", "Euler"), ("dpmpp_2m", "karras", "DPM++ 2M")):
        src, again, fast = (tmp_path / f"{sampler}-{k}.png" for k in ("src", "again", "fast"))
        code, _, err = run_cli([*args, "--sampler", sampler, "--schedule", schedule, "-q", "-o", src], capsys)
        assert code == 0, err
        assert f"Sampler: {name}" in png_texts(src)["parameters"]
        assert (pngmeta.read_params(src).sampler, pngmeta.read_params(src).schedule) == (sampler, schedule)
        assert run_cli(["generate", "--from-png", src, "-q", "-o", again], capsys)[0] == 0
        assert np.array_equal(pixels(src), pixels(again))
        assert run_cli([*args, "--sampler", sampler, "--schedule", schedule, "--fast", "-q", "-o", fast],
                       capsys)[0] == 0
        assert np.abs(pixels(src) - pixels(fast)).max() <= 2
    assert not np.array_equal(pixels(tmp_path / "euler-src.png"), pixels(tmp_path / "dpmpp_2m-src.png"))


def test_sweep_on_sdxl(tiny_sdxl_ckpt, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    code, _, err = run_cli(["sweep", PROMPT, "--focus-stack", "a carrot", "a bunny", "--alphas", "0,1",
                            "--weights", tiny_sdxl_ckpt, *TINY, "-o", out], capsys)
    assert code == 0, err
    names = sorted(os.listdir(out))
    assert len(names) == 4
    px = {n: pixels(out / n) for n in names}
    assert np.array_equal(px[names[1]], px[names[3]])  # α = 1: the focus prompt is not used
    assert not np.array_equal(px[names[0]], px[names[2]])  # α = 0: only the focus prompt (context and pooled)


def test_trace_and_fast_on_sdxl(tiny_sdxl_ckpt, tmp_path, capsys):
    plain, fast, trace = tmp_path / "plain.png", tmp_path / "fast.png", tmp_path / "trace"
    args = [PROMPT, "--focus", FOCUS, "--weights", tiny_sdxl_ckpt, *TINY]
    assert run_cli(["generate", *args, "-o", plain], capsys)[0] == 0
    code, out, err = run_cli(["generate", *args, "--fast", "--trace", trace, "-o", fast], capsys)
    assert code == 0, err
    assert np.abs(pixels(plain) - pixels(fast)).max() <= 2  # fp32 fast path: the same math in another order
    assert sorted(os.listdir(trace)) == ["fast_trace.png", "fast_trace.webp"]


def test_eval_grid_and_rack_on_sdxl(tiny_sdxl_ckpt, tmp_path, capsys):
    """The cross-attention probe takes SDXL's 4-argument UNet call: eval's attention masks, grid's cells and rack's
    frames all run."""
    pairs = tmp_path / "pairs.jsonl"
    yy, xx = np.mgrid[:64, :64]
    Image.fromarray((((yy - 30) ** 2 + (xx - 34) ** 2 < 15**2) * 255).astype(np.uint8)).save(tmp_path / "m.png")
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    code, _, err = run_cli(["eval", pairs, "-o", tmp_path / "eval", "--weights", tiny_sdxl_ckpt, *EVAL_ARGS], capsys)
    assert code == 0, err
    records = [json.loads((tmp_path / "eval" / "pairs" / d / "record.json").read_text())
               for d in sorted(os.listdir(tmp_path / "eval" / "pairs"))]
    assert sorted(r["mask_source"] for r in records) == ["attention", "box", "file"]
    code, _, err = run_cli(["grid", PROMPT, "--focus", FOCUS, "--alphas", "0,1", "--layouts", "0.5", "-o",
                            tmp_path / "grid", "--weights", tiny_sdxl_ckpt, "--size", "64x64", "--steps", "4", "-q"],
                           capsys)
    assert code == 0, err
    assert any(n.endswith(".png") for n in os.listdir(tmp_path / "grid"))
    code, _, err = run_cli(["rack", PROMPT, "--from", "a carrot", "--to", "a bunny", "--frames", "2", "-o",
                            tmp_path / "rack.webp", "--weights", tiny_sdxl_ckpt, "--size", "64x64", "--steps", "4",
                            "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "rack.webp").exists()


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_info_reports_the_sdxl_family_and_parts(tiny_sdxl_ckpt, tiny_sdxl_refiner_ckpt, refiner, capsys):
    from safetensors import safe_open

    path = tiny_sdxl_refiner_ckpt if refiner else tiny_sdxl_ckpt
    code, out, err = run_cli(["info", path], capsys)
    assert code == 0, err
    print(out)
    assert f"family: {'sdxl-refiner' if refiner else 'sdxl-base'}" in out and "native_size: 1,024" in out
    assert "label embedding of a" in out and "scale 0.13025" in out
    towers = ["OpenCLIP"] if refiner else ["CLIP", "OpenCLIP"]
    for i, kind in enumerate(towers):
        assert f"text_encoder.embedders.{i}: {kind} text transformer" in out
    assert ("aesthetic_score" in out) == refiner
    # parameter counts per part and per tower, against the raw file's tensors
    counts: dict[str, int] = {}
    prefixes = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "conditioner.": "text_encoder"}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            n = int(np.prod(f.get_slice(k).get_shape()))
            comp = next(v for p, v in prefixes.items() if k.startswith(p))
            counts[comp] = counts.get(comp, 0) + n
            if comp == "text_encoder":
                tower = "text_encoder." + ".".join(k.split(".")[1:3])
                counts[tower] = counts.get(tower, 0) + n
    assert len(counts) == 3 + len(towers)
    for comp, n in counts.items():
        assert f"  {comp}: {n:,}\n" in out, comp


def test_info_on_an_sdxl_diffusers_folder(sdxl_pipe, capsys):
    code, out, err = run_cli(["info", sdxl_pipe], capsys)
    assert code == 0, err
    assert "family: sdxl-base" in out and "native_size: 64" in out and "sha256" not in out.split("path:")[0]


def test_download_sdxl_is_sha256_checked(tmp_path, monkeypatch, capsys):
    """`gbsd download sdxl` / `sdxl-refiner` fetch the official files from Stability's repos (hub monkeypatched) and
    refuse a file that does not hash to the registry's sha256."""
    import hashlib
    import types

    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    code, out, _ = run_cli(["download"], capsys)
    assert code == 0 and "sdxl-base" in out and "sdxl-refiner" in out
    asked = []

    def hf_hub_download(repo_id, filename, local_dir=None, **kw):
        asked.append((repo_id, filename))
        dest = Path(local_dir) / filename
        dest.write_bytes(payload)
        return str(dest)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    payload = b"not the model"
    for name, repo, file in (("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors"),
                             ("sdxl-refiner", "stabilityai/stable-diffusion-xl-refiner-1.0",
                              "sd_xl_refiner_1.0.safetensors")):
        code, _, err = run_cli(["download", name], capsys)
        assert code == 1 and "sha256 mismatch" in err and not (tmp_path / file).exists()
        assert asked[-1] == (repo, file)
        assert weights.registry_family(tmp_path / file) == weights.REGISTRY[name].family
    # a file that does hash to the registry's digest is kept (the registry's digest patched to this payload's)
    entry = weights.REGISTRY["sdxl"]
    patched = dict(weights.REGISTRY)
    patched["sdxl"] = type(entry)(**{**entry.__dict__, "sha256": hashlib.sha256(payload).hexdigest()})
    monkeypatch.setattr(weights, "REGISTRY", patched)
    code, out, err = run_cli(["download", "sdxl"], capsys)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "sd_xl_base_1.0.safetensors")


def test_registry_sdxl_entries(tmp_path, monkeypatch):
    """The official digests (Stability-AI/generative-models README's "File Hash (sha256)" of SDXL 1.0)."""
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    base, refiner = weights.REGISTRY["sdxl"], weights.REGISTRY["sdxl-refiner"]
    assert base.sha256 == "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"
    assert refiner.sha256 == "7440042bbdc8a24813002c09b6b69b64dc90fded4472613437b7f55f9b7d9c5f"
    assert (base.size, refiner.size) == (6_938_078_334, 6_075_981_930)
    assert (base.family, refiner.family) == ("sdxl-base", "sdxl-refiner")
    from gbsd_core.cli.common import UsageError, resolve_model

    with pytest.raises(UsageError, match="run `gbsd download sdxl-refiner`"):  # absent here: the command to get it
        resolve_model(argparse.Namespace(weights="sdxl-refiner", family=None), None)
    (tmp_path / "sd_xl_base_1.0.safetensors").write_bytes(b"x")
    assert resolve_model(argparse.Namespace(weights="sdxl", family=None), None) == (
        tmp_path / "sd_xl_base_1.0.safetensors", "sdxl-base")

"""PNG metadata: A1111 infotext format, the JSON chunk, round trips and atomic writes (no model needed)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gbsd_core.cli import pngmeta
from gbsd_core.pipeline import GenerationParams

# A parameter line as A1111 writes it (typed by hand from a real A1111 image's "PNG Info", not produced by us).
A1111_TEXT = (
    "a photo of a cat, masterpiece\n"
    "ugly, blurry\n"  # A1111 prompts may span lines
    "Negative prompt: lowres, bad anatomy\n"
    "extra fingers\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, "
    'Model: v1-5-pruned-emaonly, Denoising strength: 0.6, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0'
)


def _params(**kw) -> GenerationParams:
    base = dict(prompt="a bunny and a carrot, bokeh", focus="a carrot", alpha=0.3, layout=0.75, steps=4, cfg=6.5,
                negative="blurry", seed=42, width=64, height=48, strength=0.6, eta=0.0)
    base.update(kw)
    return GenerationParams(**base)


def _record(**kw) -> pngmeta.ImageRecord:
    base = dict(width=64, height=48, model_file="tiny-sd1.safetensors", model_sha256="ab" * 32, img2img=False,
                executed_steps=4, layout_steps=3)
    base.update(kw)
    return pngmeta.ImageRecord(**base)


def test_infotext_matches_a1111_layout():
    text = pngmeta.infotext(_params(), _record())
    print(text)
    # Expected string written from the A1111 format description (prompt line, "Negative prompt:" line, k: v line).
    assert text == (
        "a bunny and a carrot, bokeh\n"
        "Negative prompt: blurry\n"
        "Steps: 4, Sampler: DDIM, CFG scale: 6.5, Seed: 42, Size: 64x48, Model hash: ababababab, Model: tiny-sd1, "
        "GBSD focus: a carrot, GBSD alpha: 0.3, GBSD layout: 0.75, GBSD layout steps: 3, GBSD executed steps: 4"
    )


def test_infotext_img2img_and_plain_sd():
    t = pngmeta.infotext(_params(focus=None, negative="", eta=0.5), _record(img2img=True, layout_steps=None))
    lines = t.split("\n")
    assert len(lines) == 2 and "Negative prompt" not in t  # A1111 drops the line for an empty negative prompt
    assert "Denoising strength: 0.6" in lines[1] and "Eta DDIM: 0.5" in lines[1]
    assert "GBSD focus" not in t and "GBSD alpha" not in t


def test_parse_real_a1111_text():
    params, extra = pngmeta.parse_infotext(A1111_TEXT)
    assert params["prompt"] == "a photo of a cat, masterpiece\nugly, blurry"
    assert params["negative"] == "lowres, bad anatomy\nextra fingers"
    assert params["steps"] == 20 and params["cfg"] == 7.0 and params["seed"] == 1234567890
    assert (params["width"], params["height"]) == (512, 768) and params["strength"] == 0.6
    assert extra == {"img2img": True, "model_hash": "6ce0161689", "model": "v1-5-pruned-emaonly",
                     "lora_hashes": "add_detail: 7c6bad76eb54", "layout_loras": None,  # A1111 1.6's "Lora hashes"
                     "embeddings": {}}
    assert "focus" not in params  # not a GBSD image: GenerationParams defaults apply
    assert (params["sampler"], params["schedule"]) == ("dpmpp_2m", "karras")  # A1111 < 1.9's "DPM++ 2M Karras"


@pytest.mark.parametrize("focus", ["a carrot", 'a "red", shiny: carrot\nwith leaves', None])
def test_infotext_round_trip(focus):
    p = _params(focus=focus, prompt="line one, with: colon\nline two", negative="neg: a, b", eta=0.25, cfg=7.1)
    parsed, extra = pngmeta.parse_infotext(pngmeta.infotext(p, _record(img2img=True)))
    got = pngmeta.params_from_dict(parsed)
    if focus is None:  # α and σ mean nothing without a focus prompt: not written, read back as defaults
        p = dataclasses.replace(p, alpha=0.5, layout=0.8)
    assert got == p
    assert extra["model_hash"] == "ab" * 5 and extra["model"] == "tiny-sd1" and extra["img2img"]
    assert extra["executed_steps"] == 4


def _png(tmp_path: Path, params: GenerationParams, record: pngmeta.ImageRecord, name: str = "x.png") -> Path:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (record.height, record.width, 3), dtype=np.uint8))
    out = tmp_path / name
    pngmeta.save_png_atomic(img, out, pngmeta.pnginfo(params, record))
    return out


def test_png_round_trip_json_exact(tmp_path):
    p = _params(prompt="ünïcödé 🐰 prompt", cfg=0.1 + 0.2)  # non-Latin-1 text and a float with a long repr
    out = _png(tmp_path, p, _record())
    # An independent reader (PIL) sees both chunks; the JSON one is plain JSON with every field.
    with Image.open(out) as im:
        texts = dict(im.text)
    data = json.loads(texts["gbsd"])
    assert data["params"] == dataclasses.asdict(p)
    assert data["model"] == {"file": "tiny-sd1.safetensors", "sha256": "ab" * 32}
    assert texts["parameters"].startswith("ünïcödé 🐰 prompt\n")
    assert pngmeta.read_params(out) == p
    meta = pngmeta.read_metadata(out)
    assert meta["source"] == "json" and meta["model_sha256"] == "ab" * 32


def test_read_params_falls_back_to_infotext(tmp_path):
    p = _params()
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    info = pngmeta.PngInfo()
    info.add_text("parameters", pngmeta.infotext(p, _record()))  # JSON chunk stripped
    img.save(tmp_path / "a.png", pnginfo=info)
    assert pngmeta.read_metadata(tmp_path / "a.png")["source"] == "infotext"
    # txt2img text carries no "Denoising strength", so strength reads back as the default
    assert pngmeta.read_params(tmp_path / "a.png") == dataclasses.replace(p, strength=0.75)


def test_read_params_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no generation parameters"):
        pngmeta.read_params(tmp_path / "plain.png")
    info = pngmeta.PngInfo()
    info.add_text("gbsd", "{not json")
    Image.new("RGB", (8, 8)).save(tmp_path / "broken.png", pnginfo=info)
    with pytest.raises(ValueError, match="broken 'gbsd'"):
        pngmeta.read_params(tmp_path / "broken.png")


def test_unknown_json_fields_ignored(tmp_path):
    info = pngmeta.PngInfo()
    info.add_text("gbsd", json.dumps({"version": 9, "params": {"prompt": "p", "steps": 3, "future_knob": 1}}))
    Image.new("RGB", (8, 8)).save(tmp_path / "f.png", pnginfo=info)
    assert pngmeta.read_params(tmp_path / "f.png") == GenerationParams(prompt="p", steps=3)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    class Boom(Exception):
        pass

    class BadImage:
        def save(self, path, **kw):
            Path(path).write_bytes(b"\x89PNG half")
            raise Boom

    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        pngmeta.save_png_atomic(BadImage(), target)
    assert target.read_bytes() == b"old"  # old file untouched
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # temp file removed
    out = _png(tmp_path, _params(), _record(), name="out.png")
    assert out.stat().st_mode & 0o777 == 0o644 and sorted(os.listdir(tmp_path)) == ["out.png"]


@pytest.mark.parametrize("chunk, match", [
    ({"params": {"prompt": "p", "width": "64"}}, "width must be an integer"),
    ({"params": {"prompt": "p", "seed": 2.0}}, "seed must be an integer"),
    ({"params": {"prompt": ["p"]}}, "prompt must be text"),
    ({"params": {"prompt": "p", "negative": ["a", "b"]}}, "negative must be text"),
    ({"params": {"prompt": "p", "cfg": float("nan")}}, "cfg"),
    ([1, 2], "metadata"),
    ("[" * 100000 + "]" * 100000, "metadata"),
    ('{"params": {"prompt": "p", "seed": ' + "9" * 5000 + "}}", "metadata"),
    ({"params": {"prompt": "p"}, "model": "a.safetensors"}, "model"),
    ({"params": {"prompt": "p"}, "model": {"file": 3}}, "model"),
    ({"params": {"prompt": "p"}, "model": {"sha256": ["x"]}}, "sha256"),
    ({"params": {"prompt": "p"}, "mode": 7}, "mode"),
])
def test_read_params_refuses_malformed_chunks(chunk, match, tmp_path):
    info = pngmeta.PngInfo()
    info.add_text("gbsd", chunk if isinstance(chunk, str) else json.dumps(chunk))
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", pnginfo=info)
    with pytest.raises(ValueError, match=match) as e:
        pngmeta.read_params(tmp_path / "x.png")
    print(e.value)


@pytest.mark.parametrize("line, match", [
    ("Steps: 3, Seed: 1, CFG scale: nan", "cfg"),
    ("Steps: 3, Seed: 1, CFG scale: 1e999", "cfg"),
    ("Steps: 3, Seed: -5, CFG scale: 7", "seed"),
    ("Steps: 3.5, Seed: 1, CFG scale: 7", "Steps"),
    ("Steps: 3, Seed: 1, CFG scale: 7, GBSD layout steps: many", "GBSD layout steps"),
])
def test_read_params_refuses_bad_infotext(line, match, tmp_path):
    info = pngmeta.PngInfo()
    info.add_text("parameters", "a prompt\n" + line)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", pnginfo=info)
    with pytest.raises(ValueError, match=match):
        pngmeta.read_params(tmp_path / "x.png")


def test_rack_frame_fields_round_trip_through_both_chunks(tmp_path):
    p = _params(focus="a bunny", focus_to="a carrot, small", focus_mix=1 / 3)
    text = pngmeta.infotext(p, _record())
    assert 'GBSD focus to: "a carrot, small", GBSD focus mix: 0.3333333333333333' in text
    parsed, _ = pngmeta.parse_infotext(text)
    assert pngmeta.params_from_dict(parsed) == dataclasses.replace(p, strength=0.75)  # txt2img: no strength
    assert "GBSD focus to" not in pngmeta.infotext(_params(), _record())  # only rack frames carry it
    out = _png(tmp_path, p, _record())
    assert pngmeta.read_params(out) == p  # the JSON chunk: exact


def test_extra_entries_are_written_and_read_back(tmp_path):
    img = Image.new("RGB", (8, 8))
    extra = {"trace": {"steps": [0, 3, 5], "every": 3}}
    pngmeta.save_png_atomic(img, tmp_path / "s.png", pngmeta.pnginfo(_params(), _record(), extra))
    meta = pngmeta.read_metadata(tmp_path / "s.png")
    assert meta["json"]["trace"] == {"steps": [0, 3, 5], "every": 3}
    assert pngmeta.read_params(tmp_path / "s.png") == _params()  # the extra entry does not disturb the params
    with pytest.raises(ValueError, match="standard entries"):
        pngmeta.json_text(_params(), _record(), {"params": {}})


def png_text(path: Path, key: str) -> str:
    with Image.open(path) as im:
        return im.text[key]


SAMPLER_CASES = [("ddim", "normal")] + [(n, sch) for n in ("euler", "euler_a", "dpmpp_2m") for sch in ("normal", "karras")]


@pytest.mark.parametrize("sampler, schedule", SAMPLER_CASES)
def test_every_sampler_and_schedule_round_trips_through_both_chunks(sampler, schedule, tmp_path):
    p = _params(sampler=sampler, schedule=schedule)
    text = pngmeta.infotext(p, _record())
    names = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}  # A1111's labels
    expected = f"Sampler: {names[sampler]}" + ("" if sampler == "ddim" else
                                               f", Schedule type: {'Karras' if schedule == 'karras' else 'Uniform'}")
    assert f"Steps: 4, {expected}, CFG scale: 6.5" in text
    parsed, _ = pngmeta.parse_infotext(text)
    assert pngmeta.params_from_dict(parsed) == dataclasses.replace(p, strength=0.75)  # txt2img: no strength written
    out = _png(tmp_path, p, _record())
    assert pngmeta.read_params(out) == p  # the JSON chunk
    data = json.loads(png_text(out, "gbsd"))
    assert (data["params"]["sampler"], data["params"]["schedule"]) == (sampler, schedule)
    stripped = tmp_path / "infotext-only.png"
    info = pngmeta.PngInfo()
    info.add_text("parameters", png_text(out, "parameters"))
    Image.open(out).save(stripped, pnginfo=info)
    assert pngmeta.read_metadata(stripped)["source"] == "infotext"
    assert pngmeta.read_params(stripped) == dataclasses.replace(p, strength=0.75)


# Parameter lines as A1111 writes them (typed from A1111's create_infotext / sd_samplers code, not produced by us):
# v1.9+ writes "Schedule type" apart (the resolved label: DPM++ 2M on Automatic says Karras), older versions put
# Karras into the sampler's name.
A1111_LINES = [
    ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.10.1",
     "dpmpp_2m", "karras"),
    ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512", "dpmpp_2m",
     "karras"),
    ("Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.9.4",
     "euler_a", "normal"),
    ("Steps: 30, Sampler: Euler, Schedule type: Uniform, CFG scale: 7, Seed: 1, Size: 512x512", "euler", "normal"),
    ("Steps: 30, Sampler: Euler, Schedule type: Normal, CFG scale: 7, Seed: 1, Size: 512x512", "euler", "normal"),
    ("Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512", "euler_a", "karras"),
    ("Steps: 50, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.5, Seed: 1, Size: 512x512", "ddim", "normal"),
    # A1111 >= 1.9 writes its Schedule type for DDIM too, which ignores it: still DDIM, on its own schedule
    ("Steps: 50, Sampler: DDIM, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Version: v1.10.1",
     "ddim", "normal"),
    ("Steps: 50, Sampler: DDIM, Schedule type: Exponential, CFG scale: 7.5, Seed: 1, Size: 512x512", "ddim", "normal"),
    ("Steps: 50, Sampler: DDIM, Schedule type: Uniform, CFG scale: 7.5, Seed: 1, Size: 512x512", "ddim", "normal"),
    ("Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.6.0", "dpmpp_2m",
     "karras"),
    ("Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.6.0", "dpmpp_2m", "normal"),
    ("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.5.1", "euler_a", "normal"),
]


@pytest.mark.parametrize("line, sampler, schedule", A1111_LINES)
def test_a1111_sampler_names_are_read(line, sampler, schedule):
    params, _ = pngmeta.parse_infotext("a photo of a cat\n" + line)
    p = pngmeta.params_from_dict(params)
    assert (p.sampler, p.schedule) == (sampler, schedule)


@pytest.mark.parametrize("line, match", [
    ("Steps: 20, Sampler: Heun, CFG scale: 7, Seed: 1", "sampler must be one of ddim, euler, euler_a, dpmpp_2m, "
                                                        "lcm, got 'Heun'"),
    ("Steps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1", "got 'DPM\\+\\+ SDE Karras'"),
    ("Steps: 20, Sampler: Euler, Schedule type: Exponential, CFG scale: 7, Seed: 1",
     "schedule must be one of normal, karras, got 'Exponential'"),
])
def test_samplers_gbsd_does_not_have_are_refused_by_name(line, match):
    params, _ = pngmeta.parse_infotext("p\n" + line)
    with pytest.raises(ValueError, match=match):
        pngmeta.params_from_dict(params)


# Few-step lines as A1111 writes them for SD-Turbo (Euler a + SGM Uniform) and LCM-LoRA (LCM, usually + SGM Uniform)
FEW_STEP_LINES = [
    ("Steps: 1, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 1, Seed: 1, Size: 512x512, Version: v1.10.1",
     "euler_a", "normal", "trailing"),
    ("Steps: 4, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 1, Seed: 1, Size: 512x512", "euler", "normal",
     "trailing"),
    ("Steps: 6, Sampler: LCM, Schedule type: SGM Uniform, CFG scale: 1.5, Seed: 1, Size: 512x512, Version: v1.10.1",
     "lcm", "normal", None),
    ("Steps: 6, Sampler: LCM, Schedule type: Karras, CFG scale: 1.5, Seed: 1, Size: 512x512", "lcm", "normal", None),
    ("Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 1, Size: 512x512", "euler_a", "normal",
     None),
]


@pytest.mark.parametrize("line, sampler, schedule, spacing", FEW_STEP_LINES)
def test_a1111_few_step_lines_are_read(line, sampler, schedule, spacing):
    params, _ = pngmeta.parse_infotext("a photo of a cat\n" + line)
    p = pngmeta.params_from_dict(params)
    assert (p.sampler, p.schedule, p.spacing) == (sampler, schedule, spacing)


@pytest.mark.parametrize("kw, written", [
    (dict(sampler="lcm"), "Sampler: LCM, CFG scale"),
    (dict(sampler="euler_a", spacing="trailing"), "Sampler: Euler a, Schedule type: SGM Uniform, CFG scale"),
    (dict(sampler="euler", spacing="trailing", schedule="karras"), "Sampler: Euler, Schedule type: Karras, CFG"),
    (dict(sampler="ddim", spacing="trailing"), "Sampler: DDIM, CFG scale"),
])
def test_few_step_samplers_round_trip(kw, written, tmp_path):
    """Written with A1111's names and read back; the JSON chunk keeps every spacing (the infotext only SGM Uniform's)."""
    p = _params(**kw)
    text = pngmeta.infotext(p, _record())
    assert written in text
    out = _png(tmp_path, p, _record())
    assert pngmeta.read_params(out) == p
    parsed, _ = pngmeta.parse_infotext(text)
    back = pngmeta.params_from_dict(parsed)
    assert (back.sampler, back.schedule) == (p.sampler, p.schedule)
    assert back.spacing == (p.spacing if "SGM Uniform" in text else None)


def test_sampler_labels():
    assert [pngmeta.sampler_label(*c) for c in SAMPLER_CASES] == [
        "DDIM", "Euler", "Euler Karras", "Euler a", "Euler a Karras", "DPM++ 2M", "DPM++ 2M Karras"]


# A1111's hires fix (txt2img): its keys as processing.py writes them; "Denoising strength" is the hires pass's
HIRES = ("Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x512, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: {d}, Hires upscale: 2, "
         "Hires steps: 10, Hires upscaler: Latent, Version: v1.10.1")


@pytest.mark.parametrize("denoise", ["0", "0.0", "0.55", "1"])
def test_a_hires_fix_denoise_is_not_an_img2img_strength(denoise):
    """txt2img with the hires fix at any denoise, 0 included (an upscale alone, which A1111 allows): the first pass,
    a txt2img at Size; the denoise is kept with the other hires keys (it was read as strength, and 0 was refused)."""
    params, extra = pngmeta.parse_infotext("a cat\n" + HIRES.format(d=denoise))
    p = pngmeta.params_from_dict(params)
    assert "strength" not in params and p.strength == 0.75 and extra["img2img"] is False
    assert (p.width, p.height, p.steps, p.seed, p.sampler) == (512, 512, 20, 5, "euler_a")
    assert extra["hires"] == {"Hires upscale": "2", "Hires steps": "10", "Hires upscaler": "Latent",
                              "Denoising strength": denoise}


@pytest.mark.parametrize("line", [
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Denoising strength: 0, Hires resize: 1024x1024",
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Denoising strength: 0.7, "
    "First pass size: 256x256",  # A1111 before the hires fix's rewrite (late 2022)
])
def test_every_hires_key_marks_the_hires_fix(line):
    params, extra = pngmeta.parse_infotext("a cat\n" + line)
    assert "strength" not in params and extra["img2img"] is False and extra["hires"]


def test_img2img_denoising_strength_is_still_the_strength():
    params, extra = pngmeta.parse_infotext("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, "
                                           "Denoising strength: 0.4")
    assert params["strength"] == 0.4 and extra["img2img"] is True and "hires" not in extra


def test_crlf_infotext_is_stripped_per_line_as_a1111_does():
    """Windows line ends (and spaces around a line): each line stripped, as A1111's parse_generation_parameters
    does; the prompt and negative prompt keep no "\r" (they once did, and a prompt with "\r" is another prompt)."""
    lf = ("a photo of a cat, masterpiece\nugly, blurry\nNegative prompt: lowres, bad anatomy\nextra fingers\n"
          "Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 3, Size: 512x512")
    crlf = lf.replace("\n", "\r\n") + "\r\n"
    spaced = "\n".join(f"  {line} \t" for line in lf.split("\n"))
    want = pngmeta.parse_infotext(lf)
    assert want[0]["prompt"] == "a photo of a cat, masterpiece\nugly, blurry"
    assert want[0]["negative"] == "lowres, bad anatomy\nextra fingers"
    for text in (crlf, spaced):
        got = pngmeta.parse_infotext(text)
        assert got == want and "\r" not in got[0]["prompt"] + got[0]["negative"]

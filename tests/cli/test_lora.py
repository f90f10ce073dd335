"""LoRAs on the command line (gbsd_core/cli/loras.py): --lora / --layout-lora / --focus-lora and <lora:NAME:WEIGHT>
tags on every command that generates, the PNG record (A1111's tags and Lora hashes, the files' sha256 in the gbsd
chunk), --from-png re-applying them by name, `gbsd info` of a LoRA, and every bad input: exit 2, one line, nothing
written, no weights loaded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import TINY, everything, png_texts, run_cli
from _lora import kohya_state_dict, write
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import gbsd_core
from gbsd_core.lora import apply_loras, load_lora
from gbsd_core.pipeline import GenerationParams, generate

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"


@pytest.fixture(scope="module")
def weights(amp_ckpt, tmp_path_factory) -> Path:
    """A weights folder: the tiny model, and loras/ with `style` (UNet and text encoder) and `detail` (UNet)."""
    root = tmp_path_factory.mktemp("lora-cli") / "weights"
    (root / "loras").mkdir(parents=True)
    b = gbsd_core.load(amp_ckpt)
    unet = [(n, tuple(m.weight.shape)) for n, m in b.unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    text = [(f"text_model.encoder.layers.{i}.self_attn.{w}_proj", (64, 64)) for i in range(2) for w in "qv"]
    write(kohya_state_dict([("lora_unet_", unet), ("lora_te_", text)], seed=1, std=0.15), root / "loras" / "style.safetensors")
    write(kohya_state_dict([("lora_unet_", unet)], seed=2, std=0.15), root / "loras" / "detail.pt")
    return root


@pytest.fixture
def env(weights, monkeypatch):
    monkeypatch.setenv("GBSD_WEIGHTS", str(weights))
    return weights


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_tags_and_flags_make_what_the_python_api_makes_and_the_png_records_them(env, amp_ckpt, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, _, err = run_cli(["generate", f"{PROMPT} <lora:style:0.7>", "--focus", f"{FOCUS} <lora:detail:0.8>",
                            "--layout-lora", "style:0.2", "--lora", f"{env}/loras/detail.pt:-0.3", "--seed", "4",
                            "--weights", amp_ckpt, *TINY, "-o", out], capsys)
    assert code == 0, err
    assert "4 text-encoder modules of --layout-lora / --focus-lora files are not merged" in err
    b = gbsd_core.load(amp_ckpt)
    style, detail = load_lora(env / "loras" / "style.safetensors"), load_lora(env / "loras" / "detail.pt")
    params = GenerationParams(PROMPT + " ", focus=FOCUS + " ", seed=4, steps=3, width=64, height=64)
    with apply_loras(b, [(detail, -0.3), (style, 0.7)], layout=[(style, 0.2)], focus=[(detail, 0.8)]) as applied:
        api = generate(b, params, switch=applied)
    plain = generate(b, params)
    assert np.array_equal(_pixels(out), np.asarray(api.image, np.int16))
    assert np.abs(_pixels(out) - np.asarray(plain.image, np.int16)).max() > 2
    texts = png_texts(out)
    text = texts["parameters"]
    print(text)
    assert text.startswith(f"{PROMPT} <lora:style:0.7> <lora:detail:-0.3>\n")  # A1111 tags; the flag's added
    assert f'GBSD focus: "{FOCUS} <lora:detail:0.8>"' in text and 'GBSD layout loras: "<lora:style:0.2>"' in text
    hashes = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in (env / "loras").iterdir()}
    raw = (env / "loras" / "style.safetensors").read_bytes()
    addnet = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()[:12]
    assert f'Lora hashes: "detail: {hashes["detail"][:12]}, style: {addnet}"' in text
    record = json.loads(texts["gbsd"])
    assert record["params"]["prompt"] == f"{PROMPT} <lora:style:0.7>"  # the prompt as typed
    assert sorted((e["name"], e["scale"], e["stage"], e["from"], e["sha256"]) for e in record["loras"]) == sorted([
        ("detail", -0.3, "both", "flag", hashes["detail"]), ("style", 0.2, "layout", "flag", hashes["style"]),
        ("style", 0.7, "both", "tag", hashes["style"]), ("detail", 0.8, "focus", "tag", hashes["detail"])])


def test_from_png_reapplies_the_loras_by_name(env, amp_ckpt, tmp_path, capsys):
    """From the gbsd chunk, and from A1111's text alone (tags in the prompt and focus, GBSD layout loras)."""
    out = tmp_path / "out.png"
    assert run_cli(["generate", f"{PROMPT} <lora:style:0.5>", "--focus", FOCUS, "--focus-lora", "detail:0.9",
                    "--layout-lora", "style:-0.4", "--weights", amp_ckpt, *TINY, "-o", out], capsys)[0] == 0
    with Image.open(out) as im:
        info = PngInfo()
        info.add_text("parameters", im.text["parameters"])
        im.save(tmp_path / "a1111.png", pnginfo=info)
    for source in (out, tmp_path / "a1111.png"):
        again = tmp_path / f"again-{source.stem}.png"
        code, _, err = run_cli(["generate", "--from-png", source, "--weights", amp_ckpt, "-q", "-o", again], capsys)
        assert code == 0, err
        assert np.array_equal(_pixels(again), _pixels(out)), source
    code, _, err = run_cli(["generate", "--from-png", out, "--lora", "detail:0.1", "--weights", amp_ckpt, "-q", "-o",
                            tmp_path / "other.png"], capsys)  # flags replace the PNG's flag LoRAs
    assert code == 0 and not np.array_equal(_pixels(tmp_path / "other.png"), _pixels(out))


def test_a_png_lora_is_looked_up_in_the_loras_folder_only(env, amp_ckpt, tmp_path, capsys):
    outside = tmp_path / "mine.safetensors"
    outside.write_bytes((env / "loras" / "style.safetensors").read_bytes())
    out = tmp_path / "out.png"
    assert run_cli(["generate", PROMPT, "--lora", f"{outside}:0.6", "--weights", amp_ckpt, *TINY, "-o", out],
                   capsys)[0] == 0
    assert png_texts(out)["parameters"].startswith(f"{PROMPT} <lora:mine:0.6>\n")
    before = everything(tmp_path)
    code, _, err = run_cli(["generate", "--from-png", out, "--weights", amp_ckpt, "-q", "-o", tmp_path / "x.png"], capsys)
    print(err)
    assert code == 2 and err.count("\n") == 1 and "the image was made with LoRA 'mine'; no LoRA named 'mine' in" in err
    assert everything(tmp_path) == before


@pytest.mark.parametrize("command", ["img2img", "sweep", "rack", "grid", "eval"])
def test_every_generating_command_takes_loras(command, env, amp_ckpt, pairs_file, tmp_path, capsys):
    """Each command runs with a both-stage and a focus-stage LoRA, and its output differs from the run without."""
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(init)
    base = {
        "img2img": ["img2img", PROMPT, "--focus", FOCUS, "--init", init, *TINY],
        "sweep": ["sweep", PROMPT, "--focus-stack", FOCUS, "a bunny", *TINY],
        "rack": ["rack", PROMPT, "--from", "a bunny", "--to", FOCUS, "--frames", "2", *TINY],
        "grid": ["grid", PROMPT, "--focus", FOCUS, "--alphas", "0.5", "--layouts", "0.5", "--steps", "3", "--size",
                 "64x64", "-q"],
        "eval": ["eval", pairs_file, "--limit", "1", "--size", "64x64", "--steps", "3", "--layout", "0.5", "-q"],
    }[command]
    outputs = {}
    for name, flags in (("plain", []), ("lora", ["--lora", "style:0.6", "--focus-lora", "detail:0.8"])):
        out = tmp_path / name
        out.mkdir()
        target = {"img2img": out / "i.png", "sweep": out, "rack": out / "r.webp"}.get(command, out)
        code, _, err = run_cli([*base, "--weights", amp_ckpt, *flags, "-o", target], capsys)
        assert code == 0, err
        images = sorted(out.rglob("*.png"))
        assert images
        outputs[name] = images
    for a, b in zip(outputs["plain"], outputs["lora"]):
        if a.name not in ("mask.png",):
            assert a.name == b.name and not np.array_equal(_pixels(a), _pixels(b)), a.name
    if command == "eval":
        assert "style" in json.loads((tmp_path / "lora" / "run.json").read_text())["loras"]
        code, _, err = run_cli([*base, "--weights", amp_ckpt, "--lora", "style:0.5", "-o", tmp_path / "lora"], capsys)
        assert code == 2 and "holds a run with other settings (loras:" in err  # resuming with other LoRAs: refused
    if command == "grid":
        assert [e["name"] for e in json.loads((tmp_path / "lora" / "grid.json").read_text())["loras"]] == ["style",
                                                                                                          "detail"]


def test_gbsd_info_describes_a_lora(env, capsys):
    from safetensors import safe_open

    path = env / "loras" / "style.safetensors"
    with safe_open(str(path), "pt") as f:
        downs = [k for k in f.keys() if k.endswith(".lora_down.weight")]
    unet, te = sum(k.startswith("lora_unet_") for k in downs), sum(k.startswith("lora_te_") for k in downs)
    code, out, err = run_cli(["info", path], capsys)
    assert code == 0, err
    print(out)
    assert "format: kohya" in out and "ranks: 4" in out and "alpha / rank: 0.5" in out
    assert f"targets: {unet + te} modules (te {te}, unet {unet})" in out and "kind: LoRA (LoCon: 3x3 convs)" in out
    assert f"sha256: {hashlib.sha256(path.read_bytes()).hexdigest()}" in out


def _xl_lora(folder: Path) -> Path:
    groups = [("lora_unet_", [("input_blocks.4.1.transformer_blocks.0.attn2.to_k", (640, 2048))]),
              ("lora_te1_", [("text_model.encoder.layers.0.self_attn.q_proj", (768, 768))]),
              ("lora_te2_", [("text_model.encoder.layers.0.self_attn.q_proj", (1280, 1280))])]
    return write(kohya_state_dict(groups), folder / "xl.safetensors")


BAD = [
    ("tag-no-name", [f"{PROMPT} <lora::0.5>"], "error: prompt tag '<lora::0.5>' names no LoRA"),
    ("tag-missing", [f"{PROMPT} <lora:nope:1>"], "prompt tag <lora:nope:1>: no LoRA named 'nope' in"),
    ("tag-path", [f"{PROMPT} <lora:../style:1>"], "is not a plain file name"),
    ("tag-weight", [f"{PROMPT} <lora:style:big>"], "weight 'big' is not a number"),
    ("tag-scale", [f"{PROMPT} <lora:style:50>"], "scale must be a number in [-10, 10], got 50.0"),
    ("flag-scale", [PROMPT, "--lora", "style:abc"], "--lora style:abc: 'abc' is not a scale"),
    ("flag-missing", [PROMPT, "--lora", "{tmp}/none.safetensors"], "--lora {tmp}/none.safetensors: no such file"),
    ("flag-name-missing", [PROMPT, "--lora", "other:0.5"], "no LoRA named 'other'"),
    ("focus-lora-no-focus", [PROMPT, "--focus-lora", "detail"], "--focus-lora needs a focus stage"),
    ("focus-only-tags", [PROMPT, "--focus", "<lora:detail:1>"], "without its LoRA tags, "),
    ("stack-tags", [PROMPT, "--focus-stack", "a <lora:detail:1>", "--alphas", "0.5"], "--focus-stack: LoRA tags are "
                                                                                      "not read here"),
    ("not-a-lora", [PROMPT, "--lora", "{ckpt}"], "not a LoRA file"),
    ("other-family", [PROMPT, "--lora", "{xl}"], "a LoRA for another model family (it looks made for SDXL"),
    ("code", [PROMPT, "--lora", "{evil}"], "refused to unpickle"),
]


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.mkdir, ("/tmp/gbsd-lora-code-ran",))


@pytest.mark.parametrize("case, argv, message", BAD, ids=[c[0] for c in BAD])
def test_bad_lora_input_exits_2_before_loading_and_writes_nothing(case, argv, message, env, amp_ckpt, tmp_path,
                                                                  capsys, no_load):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "x": _RunsCode()}, tmp_path / "evil.pt")
    subs = {"{tmp}": str(tmp_path), "{ckpt}": str(amp_ckpt), "{xl}": str(_xl_lora(tmp_path)),
            "{evil}": str(tmp_path / "evil.pt")}
    argv = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
    message = next((message.replace(k, v) for k, v in subs.items() if k in message), message)
    command = "sweep" if "--focus-stack" in argv else "generate"
    before = everything(tmp_path)
    code, out, err = run_cli([command, *argv, "--weights", amp_ckpt, *TINY, "-o", tmp_path / ("s" if command ==
                                                                                             "sweep" else "o.png")],
                             capsys)
    print(err)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert everything(tmp_path) == before
    assert not Path("/tmp/gbsd-lora-code-ran").exists()


def test_a_merge_that_overflows_half_precision_exits_2(env, amp_ckpt, tmp_path, capsys):
    """Found only once the fp16 weights are loaded: still one line, exit 2, nothing written."""
    b = gbsd_core.load(amp_ckpt)
    name = "input_blocks.1.1.transformer_blocks.0.ff.net.2"
    shape = tuple(b.unet.get_submodule(name).weight.shape)
    write(kohya_state_dict([("lora_unet_", [(name, shape)])], std=300.0), tmp_path / "huge.safetensors")
    before = everything(tmp_path)
    code, _, err = run_cli(["generate", PROMPT, "--lora", tmp_path / "huge.safetensors", "--dtype", "fp16",
                            "--weights", amp_ckpt, *TINY, "-o", tmp_path / "o.png"], capsys)
    print(err)
    assert code == 2 and err.count("\n") == 1 and f"merging huge into unet.{name}.weight overflows float16" in err
    assert everything(tmp_path) == before

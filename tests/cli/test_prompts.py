"""Prompts on the command line: --embedding and the weights folder's embeddings/, --emphasis / --no-emphasis,
--chunk-padding, the A1111 metadata round trip (a PNG made by A1111 reproduces what gbsd makes from its prompt), the
other commands with such prompts, and bad input (one line, exit 2, nothing written, before any weights load)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import TINY, meta_png, png_texts, run_cli
from safetensors.torch import save_file

WEIGHTED = "a (bunny:1.3) and a [carrot] in a garden BREAK soft light, bokeh"
LONG = ", ".join(["a bunny with long soft ears"] * 14)


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


def embedding(path: Path, n: int = 2, width: int = 64, seed: int = 0) -> Path:
    save_file({"emb_params": torch.randn(n, width, generator=torch.Generator().manual_seed(seed))}, str(path))
    return path


@pytest.fixture
def weights_dir(tmp_path, monkeypatch, tiny_ckpt) -> Path:
    """$GBSD_WEIGHTS with the tiny model and an embeddings/ folder holding `bunnystyle` (2 vectors)."""
    d = tmp_path / "weights"
    (d / "embeddings").mkdir(parents=True)
    (d / tiny_ckpt.name).symlink_to(tiny_ckpt)
    embedding(d / "embeddings" / "bunnystyle.safetensors")
    monkeypatch.setenv("GBSD_WEIGHTS", str(d))
    return d


def test_embeddings_from_the_folder_and_the_flag(weights_dir, tmp_path, capsys, tiny_ckpt):
    base = ["generate", "a bunnystyle bunny, bokeh", "--weights", tiny_ckpt, *TINY]
    assert run_cli([*base, "-o", tmp_path / "a.png"], capsys)[0] == 0
    texts = png_texts(tmp_path / "a.png")
    sha = hashlib.sha256((weights_dir / "embeddings" / "bunnystyle.safetensors").read_bytes()).hexdigest()
    assert f'TI hashes: "bunnystyle: {sha[:10]}"' in texts["parameters"]  # A1111's short hash, quoted
    assert json.loads(texts["gbsd"])["embeddings"] == {"bunnystyle": sha}
    # --embedding PATH: another file of the same stem wins over the folder's
    other = embedding(tmp_path / "bunnystyle.safetensors", seed=1)
    assert run_cli([*base, "--embedding", other, "-o", tmp_path / "b.png"], capsys)[0] == 0
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    # a name with no file is plain text, as in A1111
    assert run_cli([*base[:1], "a bunnystile bunny, bokeh", *base[2:], "-o", tmp_path / "c.png"], capsys)[0] == 0
    assert "TI hashes" not in png_texts(tmp_path / "c.png")["parameters"]


def test_a1111_png_reproduces_what_gbsd_makes_from_its_prompt(weights_dir, tmp_path, capsys, tiny_ckpt):
    """A PNG whose only metadata is A1111's text (emphasis, BREAK, a 2-chunk prompt, an embedding name, editing):
    --from-png makes exactly what gbsd makes from the same prompt and settings."""
    prompt = f"{WEIGHTED}, bunnystyle, [bunny:carrot:2], " + LONG
    negative = "(blurry:1.2), lowres"
    direct = tmp_path / "direct.png"
    code, _, err = run_cli(["generate", prompt, "--negative", negative, "--steps", "3", "--cfg", "6", "--seed", "5",
                            "--size", "64x64", "--weights", tiny_ckpt, "-q", "-o", direct], capsys)
    assert code == 0, err
    info = (f"{prompt}\nNegative prompt: {negative}\nSteps: 3, Sampler: DDIM, CFG scale: 6, Seed: 5, Size: 64x64, "
            f"Model hash: 0123456789, Model: {tiny_ckpt.stem}, TI hashes: \"bunnystyle: 0000000000\", Version: v1.10.1")
    a1111 = meta_png(tmp_path / "a1111.png", parameters=info)
    again = tmp_path / "again.png"
    code, _, err = run_cli(["generate", "--from-png", a1111, "-q", "-o", again], capsys)
    assert code == 0, err
    assert "embedding 'bunnystyle' sha256 0000000000" in err  # another file than A1111's: said, then run
    assert np.array_equal(pixels(direct), pixels(again))
    assert png_texts(again)["parameters"].split("\n")[0] == prompt  # written as given, syntax intact


@pytest.mark.parametrize("flags, written", [
    (["--no-emphasis"], "Emphasis: None"), (["--emphasis", "no_norm"], "Emphasis: No norm"),
    (["--chunk-padding", "empty"], "Pad conds: True"),
])
def test_prompt_flags_round_trip(flags, written, weights_dir, tmp_path, capsys, tiny_ckpt):
    prompt = WEIGHTED if "Pad" not in written else LONG
    base = ["generate", prompt, "--negative", "(blurry:1.3)", "--weights", tiny_ckpt, *TINY]
    assert run_cli([*base, "-o", tmp_path / "default.png"], capsys)[0] == 0
    assert run_cli([*base, *flags, "-o", tmp_path / "flag.png"], capsys)[0] == 0
    info = png_texts(tmp_path / "flag.png")["parameters"]
    assert written in info
    assert not np.array_equal(pixels(tmp_path / "default.png"), pixels(tmp_path / "flag.png"))
    a1111 = meta_png(tmp_path / "a1111.png", parameters=info)  # the text chunk alone, as A1111 would write it
    assert run_cli(["generate", "--from-png", a1111, "-q", "-o", tmp_path / "again.png"], capsys)[0] == 0
    assert np.array_equal(pixels(tmp_path / "flag.png"), pixels(tmp_path / "again.png"))


def test_other_commands_take_such_prompts(weights_dir, tmp_path, capsys, tiny_ckpt):
    """sweep, rack, grid and eval with weighted, long prompts and a weighted focus: --focus "(carrot:1.4)"."""
    model = ["--weights", tiny_ckpt]
    fast = ["--steps", "4", "--layout", "0.5", "--size", "64x64", "-q"]
    runs = [
        ["sweep", LONG, "--focus-stack", "(a carrot:1.4)", "a bunnystyle bunny", "--alphas", "0.3,0.7", *fast,
         "-o", tmp_path / "sweep"],
        ["rack", WEIGHTED, "--from", "(a bunny:1.2)", "--to", "a [carrot]", "--frames", "2", *fast,
         "-o", tmp_path / "rack.webp"],
        ["grid", LONG, "--focus", "(carrot:1.4)", "--alphas", "0.5", "--layouts", "0.5", "--steps", "4",
         "--size", "64x64", "-q", "-o", tmp_path / "grid"],
    ]
    (tmp_path / "sweep").mkdir()
    for argv in runs:
        code, _, err = run_cli([*argv, *model], capsys)
        assert code == 0, (argv[0], err)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": LONG + ", (a carrot:1.3)", "focus": "(carrot:1.4)", "seed": 1}) + "\n")
    code, _, err = run_cli(["eval", pairs, "-o", tmp_path / "eval", *fast, *model], capsys)
    assert code == 0, err


def _bad(tmp: Path) -> dict[str, str]:
    return {"{wide}": str(embedding(tmp / "wide.safetensors", width=128)),
            "{sdxl}": str(_sdxl_file(tmp / "xl.safetensors")),
            "{text}": str(_write(tmp / "notes.txt", "0.1 0.2")), "{broken}": str(_truncated(tmp / "broken.pt")),
            "{nan}": str(_nan(tmp / "nan.pt"))}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _truncated(path: Path) -> Path:
    torch.save({"emb_params": torch.ones(2, 64)}, path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def _sdxl_file(path: Path) -> Path:
    save_file({"clip_l": torch.ones(1, 64), "clip_g": torch.ones(1, 128)}, str(path))
    return path


def _nan(path: Path) -> Path:
    torch.save({"string_to_param": {"*": torch.full((1, 64), float("nan"))}, "name": "nan"}, path)
    return path


FIVE, FOUR = " ".join(["photo"] * 370), " ".join(["photo"] * 290)
BAD_PROMPTS = [
    ("weight-not-a-number", ["generate", "a (cat:1.2.3)"], "prompt: the weight '1.2.3' in '(cat:1.2.3)' is not a number"),
    ("weight-absurd", ["generate", "a (cat:1000000000)"], "weight 1e+09 on 'cat' is beyond +-100"),
    ("weight-absurd-focus", ["generate", "a cat", "--focus", "((cat:20):20)"], "focus: weight 400"),
    ("and", ["generate", "a cat AND a dog"], "'AND' (A1111's composable prompts"),
    ("lora-tag", ["generate", "a cat <lora:film-grain:0.8>"], "no LoRA named 'film-grain'"),  # handed to the LoRAs
    ("hypernet-tag", ["generate", "a cat", "--negative", "<hypernet:x:1>"], "kind 'hypernet'"),
    ("negative-editing", ["generate", "a cat", "--negative", "[ugly:blurry:5]"], "not supported in the negative"),
    ("10000-characters", ["generate", "a " * 5000], "gbsd reads at most 8 (600 tokens)"),
    ("repeat-limit", ["generate", FIVE, "--negative", FOUR], "repeat to a common 20 chunks"),
    ("emphasis-bogus", ["generate", "a cat", "--emphasis", "Original"], "emphasis must be one of original, no_norm"),
    ("padding-bogus", ["generate", "a cat", "--chunk-padding", "zeros"], "chunk_padding must be one of repeat, empty"),
    ("embedding-width", ["generate", "a wide cat", "--embedding", "{wide}"],
     "'wide' (wide.safetensors) has vectors 128 wide; this sd1 model's text tower is 64 wide"),
    ("embedding-sdxl-on-sd1", ["generate", "a xl cat", "--embedding", "{sdxl}"], "is an SDXL embedding"),
    ("embedding-format", ["generate", "a cat", "--embedding", "{text}"], "--embedding"),
    ("embedding-broken", ["generate", "a broken cat", "--embedding", "{broken}"], "broken.pt: not a readable"),
    ("embedding-nan", ["generate", "a nan cat", "--embedding", "{nan}"], "NaN or inf"),
    ("embedding-missing", ["generate", "a cat", "--embedding", "missing.pt"], "missing.pt: no such file"),
    ("png-pad-v0", ["generate", "--from-png", "{info:a cat\nSteps: 3, Sampler: DDIM, Seed: 1, Pad conds v0: True}"],
     "chunk_padding must be one of repeat, empty, got \"last vector (A1111's Pad conds v0)\""),
    ("png-emphasis", ["generate", "--from-png", "{info:a cat\nSteps: 3, Sampler: DDIM, Seed: 1, Emphasis: Weird}"],
     "emphasis must be one of"),
    ("sweep-focus-stack", ["sweep", "a cat", "--focus-stack", "a (dog:1..2)", "--alphas", "0.5"], "--focus-stack"),
    ("rack-to", ["rack", "a cat and a dog", "--from", "a cat", "--to", "a <lora:x:1> dog"], "LoRA tag"),
    ("grid-focus", ["grid", "a cat", "--focus", "a AND b", "--alphas", "0.5", "--layouts", "0.5"], "'AND'"),
]


@pytest.mark.parametrize("case", BAD_PROMPTS, ids=[c[0] for c in BAD_PROMPTS])
def test_bad_prompts_exit_2_before_loading(case, tmp_path, capsys, monkeypatch, no_load, tiny_ckpt):
    name, argv, needle = case
    work = tmp_path / "work"
    work.mkdir()
    subs = _bad(tmp_path)

    def sub(a: str) -> str:
        if a.startswith("{info:"):
            return str(meta_png(tmp_path / "info.png", parameters=a[len("{info:"):-1]))
        return subs.get(a, a)

    argv = [sub(a) for a in argv] + ["--weights", str(tiny_ckpt), "--steps", "3", "--size", "64x64"]
    out = {"sweep": work, "rack": work / "rack.webp", "grid": work / "grid"}.get(argv[0], work / "out.png")
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path / "no-weights-folder"))
    monkeypatch.chdir(work)
    code, _, err = run_cli([*argv, "-o", out], capsys)
    print(f"{name}: {err.strip()}")
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(work.iterdir()) == []  # nothing written


def test_help_names_every_mode():
    """--help lists the modes without importing torch; the lists are the core's (params.FIELDS)."""
    import re

    from gbsd_core.cli.generate import EMPHASIS_HELP, PADDING_HELP
    from gbsd_core.prompts.chunks import PADDINGS
    from gbsd_core.prompts.parser import EMPHASIS

    assert [w for w in re.findall(r"\w+", EMPHASIS_HELP) if w in EMPHASIS] == list(EMPHASIS)
    assert [w for w in re.findall(r"\w+", PADDING_HELP) if w in PADDINGS] == list(PADDINGS)

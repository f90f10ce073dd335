"""LoRA tags and A1111 prompts together on the command line: the prompt parser (gbsd_core/prompts/parser.py) finds the
`<lora:...>` tags, the LoRA wing applies them (global prompt: both stages, --focus: the focus stage) while the rest of
the prompt is read with its emphasis, BREAK, chunks, embeddings and prompt editing; the PNG records both, and
--from-png (the gbsd chunk, or A1111's text alone) makes the same image again."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import TINY, everything, meta_png, png_texts, run_cli
from _lora import kohya_state_dict, write
from PIL import Image
from safetensors.torch import save_file

import gbsd_core
from gbsd_core.lora import apply_loras, load_lora
from gbsd_core.pipeline import GenerationParams, generate
from gbsd_core.prompts.embeddings import EmbeddingLibrary

LONG = ", ".join(["a bunny with long soft ears"] * 14)  # with the rest of the prompt: 3 chunks of 75 tokens


@pytest.fixture(scope="module")
def weights(amp_ckpt, tmp_path_factory) -> Path:
    """A weights folder: loras/ with `style` (UNet and text encoder) and `detail` (UNet), embeddings/ with
    `bunnystyle` (2 vectors of the tiny model's width, 64)."""
    root = tmp_path_factory.mktemp("lora-prompts") / "weights"
    (root / "loras").mkdir(parents=True)
    (root / "embeddings").mkdir()
    b = gbsd_core.load(amp_ckpt)
    unet = [(n, tuple(m.weight.shape)) for n, m in b.unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    text = [(f"text_model.encoder.layers.{i}.self_attn.{w}_proj", (64, 64)) for i in range(2) for w in "qv"]
    write(kohya_state_dict([("lora_unet_", unet), ("lora_te_", text)], seed=1, std=0.15),
          root / "loras" / "style.safetensors")
    write(kohya_state_dict([("lora_unet_", unet)], seed=2, std=0.15), root / "loras" / "detail.safetensors")
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(0))},
              str(root / "embeddings" / "bunnystyle.safetensors"))
    return root


@pytest.fixture
def env(weights, monkeypatch):
    monkeypatch.setenv("GBSD_WEIGHTS", str(weights))
    return weights


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


def _api(env: Path, amp_ckpt, params: GenerationParams, both: list, focus: list = ()) -> np.ndarray:
    """The Python API's image: the prompts without their tags (written out by hand), the LoRAs merged."""
    b = gbsd_core.load(amp_ckpt)
    b.embeddings = EmbeddingLibrary((), env / "embeddings")
    lora = {name: load_lora(env / "loras" / f"{name}.safetensors") for name in ("style", "detail")}
    with apply_loras(b, [(lora[n], s) for n, s in both], focus=[(lora[n], s) for n, s in focus]) as applied:
        return np.asarray(generate(b, params, switch=applied).image, dtype=np.int16)


def test_a_lora_run_with_a1111_prompts_is_the_api_run_and_reproduces_from_its_png(env, amp_ckpt, tmp_path, capsys):
    prompt = f"a (bunny:1.3) and a [carrot] <lora:style:0.6> in a garden BREAK bunnystyle, {LONG}"
    focus = "(a carrot:1.4) <lora:detail:0.8>"
    out = tmp_path / "out.png"
    code, _, err = run_cli(["generate", prompt, "--focus", focus, "--negative", "(blurry:1.2), lowres", "--seed", "3",
                            "--weights", amp_ckpt, *TINY, "-o", out], capsys)
    assert code == 0, err
    params = GenerationParams(f"a (bunny:1.3) and a [carrot]  in a garden BREAK bunnystyle, {LONG}",
                              focus="(a carrot:1.4) ", negative="(blurry:1.2), lowres", seed=3, steps=3, width=64,
                              height=64)
    assert np.array_equal(_pixels(out), _api(env, amp_ckpt, params, [("style", 0.6)], [("detail", 0.8)]))
    texts = png_texts(out)
    info, record = texts["parameters"], json.loads(texts["gbsd"])
    print(info)
    assert info.startswith(prompt + "\n") and f"GBSD focus: \"{focus}\"" in info  # as typed: syntax and tags
    assert 'TI hashes: "bunnystyle: ' in info and 'Lora hashes: "style: ' in info and "detail: " in info
    assert record["params"]["prompt"] == prompt and list(record["embeddings"]) == ["bunnystyle"]
    assert sorted((e["name"], e["stage"], e["from"]) for e in record["loras"]) == [("detail", "focus", "tag"),
                                                                                  ("style", "both", "tag")]
    a1111 = meta_png(tmp_path / "a1111.png", parameters=info)  # A1111's text alone
    for source in (out, a1111):
        again = tmp_path / f"again-{source.stem}.png"
        code, _, err = run_cli(["generate", "--from-png", source, "--weights", amp_ckpt, "-q", "-o", again], capsys)
        assert code == 0, err
        assert np.array_equal(_pixels(again), _pixels(out)), source


def test_flag_loras_with_a1111_prompts_reproduce_from_a1111_text(env, amp_ckpt, tmp_path, capsys):
    """--lora and --focus-lora beside a weighted, edited prompt: the PNG's A1111 text adds them as tags (after the
    prompt's own), and a PNG carrying that text alone makes the same image."""
    out = tmp_path / "out.png"
    code, _, err = run_cli(["generate", "a [bunny:carrot:2] in a ((garden)) <lora:style:0.4>", "--focus", "a (carrot)",
                            "--lora", "detail:-0.3", "--focus-lora", "style:0.5", "--seed", "2", "--weights", amp_ckpt,
                            *TINY, "-o", out], capsys)
    assert code == 0, err
    info = png_texts(out)["parameters"]
    assert info.startswith("a [bunny:carrot:2] in a ((garden)) <lora:style:0.4> <lora:detail:-0.3>\n")
    assert 'GBSD focus: "a (carrot) <lora:style:0.5>"' in info
    again = tmp_path / "again.png"
    code, _, err = run_cli(["generate", "--from-png", meta_png(tmp_path / "a1111.png", parameters=info), "--weights",
                            amp_ckpt, "-q", "-o", again], capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(again), _pixels(out))


def test_tags_inside_emphasis_and_prompt_editing_apply_for_the_whole_run(env, amp_ckpt, tmp_path, capsys):
    """As A1111: tags are taken out before the emphasis and the schedule are read, so the brackets' weight is not the
    LoRA's, and a LoRA named in [from:to:when] is merged for every step (A1111 schedules no LoRA)."""
    out = tmp_path / "out.png"
    code, _, err = run_cli(["generate", "a ((bunny <lora:style:0.5>:1.2)) in a [cat <lora:detail:0.7>:garden:2]",
                            "--seed", "5", "--weights", amp_ckpt, *TINY, "-o", out], capsys)
    assert code == 0, err
    params = GenerationParams("a ((bunny :1.2)) in a [cat :garden:2]", seed=5, steps=3, width=64, height=64)
    assert np.array_equal(_pixels(out), _api(env, amp_ckpt, params, [("style", 0.5), ("detail", 0.7)]))
    plain = GenerationParams("a ((bunny :1.2)) in a [cat :garden:2]", seed=5, steps=3, width=64, height=64)
    assert not np.array_equal(_pixels(out), _api(env, amp_ckpt, plain, []))


@pytest.mark.parametrize("argv, message", [
    (["a cat", "--negative", "ugly <lora:style:1>"], "negative: <lora:style:1> is a LoRA tag; A1111 applies LoRAs "
                                                     "from the prompt only"),
    (["a cat <hypernet:<lora:style:1>"], "kind 'hypernet'"),  # one tag of kind hypernet, as A1111 reads it
    (["a cat <lora:style:0.5:te=1>"], "gbsd reads <lora:NAME:WEIGHT> only"),
    (["a cat", "--focus", "a (cat <lora:nothere:1>:1.2)"], "--focus tag <lora:nothere:1>: no LoRA named 'nothere'"),
])
def test_bad_tags_exit_2_before_loading(argv, message, env, amp_ckpt, tmp_path, capsys, no_load):
    before = everything(tmp_path)
    code, _, err = run_cli(["generate", *argv, "--weights", amp_ckpt, *TINY, "-o", tmp_path / "out.png"], capsys)
    print(err)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert everything(tmp_path) == before

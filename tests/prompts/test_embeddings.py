"""Textual-inversion embeddings (gbsd_core/prompts/embeddings.py, spliced in by encode.py): the four file layouts,
the library (files and a folder, read on demand), refusals, and parity with diffusers' `load_textual_inversion` on
the same weights (text embeddings within fp32 tolerance, images within 1/255)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _reference import diffusers_sd_pipeline, diffusers_sdxl_pipeline
from _sdxl import write_tiny_sdxl
from _tiny import tiny_modules
from _util import max_pixel_diff, rel_err
from safetensors.torch import save_file

import gbsd_core
from gbsd_core.bundle import SDBundle
from gbsd_core.family import family_by_name
from gbsd_core.pipeline import GenerationParams, generate
from gbsd_core.prompts.embeddings import EmbeddingLibrary, read_embedding
from gbsd_core.prompts.parser import PromptError
from gbsd_core.tokenizer import Tokenizer

SIZE = dict(width=64, height=64)


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path: Path, t: torch.Tensor) -> Path:
    """A1111's textual_inversion.Embedding.save layout."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "stored-name", "step": 3000,
                "sd_checkpoint": "6ce0161689", "sd_checkpoint_name": "v1-5"}, path)
    return path


def emb_params(path: Path, t: torch.Tensor) -> Path:
    save_file({"emb_params": t.contiguous()}, str(path))
    return path


def diffusers_bin(path: Path, t: torch.Tensor) -> Path:
    torch.save({"<concept>": t}, path)
    return path


def sdxl_file(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


# --------------------------------------------------------------------------------------------------- file layouts


def test_the_four_layouts(tmp_path: Path) -> None:
    t = vectors(3, 64, 0)
    for make, name in ((a1111_pt, "a.pt"), (emb_params, "b.safetensors"), (diffusers_bin, "c.bin")):
        e = read_embedding(make(tmp_path / name, t))
        assert e.name == Path(name).stem and e.length == 3 and torch.equal(e.vectors[""], t)
    save_file({"learned": t[0].contiguous()}, str(tmp_path / "one.safetensors"))  # diffusers' [D] form: one vector
    assert read_embedding(tmp_path / "one.safetensors").vectors[""].shape == (1, 64)
    x = read_embedding(sdxl_file(tmp_path / "x.safetensors", vectors(2, 64, 1), vectors(2, 128, 2)))
    assert x.length == 2 and set(x.vectors) == {"clip_l", "clip_g"} and x.vectors["clip_g"].shape == (2, 128)
    assert read_embedding(emb_params(tmp_path / "h.safetensors", t.half())).vectors[""].dtype == torch.float32


def _truncated(path: Path) -> None:
    torch.save({"emb_params": torch.ones(2, 8)}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("make, match", [
    (lambda p: torch.save({"a": torch.ones(2, 8), "b": torch.ones(2, 8)}, p / "x.pt"), "not an embedding layout"),
    (lambda p: torch.save({"string_to_param": {"*": torch.ones(2, 8), "+": torch.ones(2, 8)}}, p / "x.pt"),
     "exactly one tensor"),
    (lambda p: torch.save({"emb_params": torch.ones(2, 8, dtype=torch.long)}, p / "x.pt"), "not a float tensor"),
    (lambda p: torch.save({"emb_params": torch.ones(2, 3, 8)}, p / "x.pt"), r"shape \[2, 3, 8\]"),
    (lambda p: torch.save({"emb_params": torch.full((2, 8), float("nan"))}, p / "x.pt"), "NaN or inf"),
    (lambda p: torch.save({"emb_params": torch.ones(76, 8)}, p / "x.pt"), "76 vectors; an embedding takes 1 to 75"),
    (lambda p: torch.save({"emb_params": torch.ones(0, 8)}, p / "x.pt"), "0 vectors"),
    (lambda p: save_file({"clip_l": torch.ones(2, 8), "clip_g": torch.ones(3, 8)}, str(p / "x.safetensors")),
     "different vector counts"),
    (lambda p: torch.save([torch.ones(2, 8)], p / "x.pt"), "holds a list"),
    (lambda p: _truncated(p / "x.pt"), "not a readable torch checkpoint"),
    (lambda p: (p / "x.safetensors").write_bytes(b"\x08\x00\x00"), "not a readable safetensors file"),
    (lambda p: torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2, 8))})},
                          p / "x.pt"), "refused to unpickle .*ParameterDict"),  # old A1111 files: code to load
    (lambda p: (p / "x.txt").write_text("0.1 0.2"), "unknown file type '.txt'"),
])
def test_bad_files_are_refused_by_name(tmp_path: Path, make, match: str) -> None:
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(PromptError, match=f"embedding .*{path.name}.*{match}"):
        read_embedding(path)


def test_library_reads_files_on_demand(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    emb_params(folder / "Style-One.safetensors", vectors(2, 64, 0))
    (folder / "broken.pt").write_bytes(b"not read unless named")
    (folder / "notes.txt").write_text("ignored")
    (folder / "sub").mkdir()
    explicit = emb_params(tmp_path / "broken.safetensors", vectors(1, 64, 1))
    lib = EmbeddingLibrary([explicit], folder)
    assert lib.names() == ["Style-One", "broken"]
    assert lib.get("broken").path == explicit  # an explicit file wins over the folder's of the same stem
    assert lib.get("Style-One").length == 2
    emb_params(folder / "twice.safetensors", vectors(1, 64, 2))
    a1111_pt(folder / "twice.pt", vectors(1, 64, 3))
    with pytest.raises(PromptError, match="'twice' is 2 files .*twice.pt, twice.safetensors"):
        EmbeddingLibrary([], folder).get("twice")
    with pytest.raises(PromptError, match="a second embedding named 'x'"):
        EmbeddingLibrary([emb_params(tmp_path / "x.safetensors", vectors(1, 8, 0)), a1111_pt(tmp_path / "x.pt",
                                                                                               vectors(1, 8, 0))])
    with pytest.raises(PromptError, match="--embedding .*missing.pt: no such file"):
        EmbeddingLibrary([tmp_path / "missing.pt"])
    assert EmbeddingLibrary([], tmp_path / "no-folder").names() == []


# -------------------------------------------------------------------------------------- models and refusals


def sd_bundle(sd2: bool = False) -> SDBundle:
    return SDBundle(**tiny_modules(sd2=sd2), tokenizer=Tokenizer(0 if sd2 else 49407),
                    family=family_by_name("sd2-512" if sd2 else "sd1"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> SDBundle:
    return gbsd_core.load(write_tiny_sdxl(tmp_path_factory.mktemp("sdxl")))


def test_embeddings_must_fit_the_text_towers(tmp_path: Path, sdxl: SDBundle) -> None:
    sd1, sd2 = sd_bundle(), sd_bundle(sd2=True)  # towers 64 (CLIP) and 128 (OpenCLIP) wide
    files = {"one64": emb_params(tmp_path / "one64.safetensors", vectors(2, 64, 0)),
             "one128": emb_params(tmp_path / "one128.safetensors", vectors(2, 128, 0)),
             "xl": sdxl_file(tmp_path / "xl.safetensors", vectors(2, 64, 1), vectors(2, 128, 2)),
             "xlnarrow": sdxl_file(tmp_path / "xlnarrow.safetensors", vectors(2, 64, 1), vectors(2, 96, 2))}
    for b in (sd1, sd2, sdxl):
        b.embeddings = EmbeddingLibrary(files.values())
    assert sd1.conditioning("a one64 cat", (64, 64)).context.shape == (1, 77, 64)
    assert sd2.conditioning("a one128 cat", (64, 64)).context.shape == (1, 77, 128)
    assert sdxl.conditioning("a xl cat", (64, 64)).context.shape == (1, 77, 192)
    for b, prompt, match in (
        (sd1, "a one128 cat", r"'one128' .*vectors 128 wide; this sd1 model's text tower is 64 wide"),
        (sd2, "a one64 cat", r"vectors 64 wide; this sd2-512 model's text tower is 128 wide"),
        (sd1, "a xl cat", "'xl' .*is an SDXL embedding .*this sd1 model has one text tower"),
        (sdxl, "a one64 cat", r"'one64' .*one \[n, D\] tensor \(an SD1/SD2 embedding\); this sdxl-base model needs "
                              "clip_l and clip_g"),
        (sdxl, "a xlnarrow cat", "clip_g vectors 96 wide; this sdxl-base model's text tower is 128 wide"),
    ):
        with pytest.raises(PromptError, match=match):
            b.conditioning(prompt, (64, 64))


def test_the_refiner_takes_the_clip_g_vectors(tmp_path: Path) -> None:
    refiner = gbsd_core.load(write_tiny_sdxl(tmp_path, refiner=True, seed=1))  # bigG alone, 128 wide
    refiner.embeddings = EmbeddingLibrary([sdxl_file(tmp_path / "xl.safetensors", vectors(2, 64, 1), vectors(2, 128, 2)),
                                           emb_params(tmp_path / "one.safetensors", vectors(2, 128, 3))])
    with_xl = refiner.conditioning("a xl cat", (64, 64))
    assert with_xl.context.shape == (1, 77, 128)
    assert (with_xl.context - refiner.conditioning("a cat", (64, 64)).context[:, :77]).abs().max() > 1e-3
    with pytest.raises(PromptError, match="one .n, D. tensor .*sdxl-refiner model needs clip_g vectors"):
        refiner.conditioning("a one cat", (64, 64))


def test_a_name_without_a_file_is_text() -> None:
    b = sd_bundle()
    b.embeddings = EmbeddingLibrary([])
    assert torch.equal(b.conditioning("a my-style cat", (64, 64)).context, b.encode_prompt("a my-style cat"))


def test_vectors_replace_the_token_embeddings_at_their_positions(tmp_path: Path) -> None:
    """The splice, seen from the outside: a name with n vectors equals a prompt whose tokens at those positions had
    the vectors as their token embeddings (written here by editing a copy of the token-embedding table)."""
    b = sd_bundle()
    t = vectors(3, 64, 5)
    b.embeddings = EmbeddingLibrary([emb_params(tmp_path / "concept.safetensors", t)])
    ours = b.conditioning("a concept cat", (64, 64)).context
    words = b.tokenizer.encode
    row = [49406, *words("a"), 49408, 49409, 49410, *words("cat"), 49407]
    ids = torch.tensor([row + [49407] * (77 - len(row))])  # the vectors as three new vocabulary rows
    table = b.text_encoder.transformer.text_model.embeddings.token_embedding
    saved = table.weight.detach().clone()
    with torch.no_grad():
        extra = torch.nn.Embedding(49411, 64)
        extra.weight[:49408] = saved
        extra.weight[49408:] = t
        b.text_encoder.transformer.text_model.embeddings.token_embedding = extra
        try:
            expected = b.text_encoder(ids)
        finally:
            b.text_encoder.transformer.text_model.embeddings.token_embedding = table
    assert torch.equal(ours, expected)
    assert torch.equal(table.weight, saved) and not table._forward_hooks  # no hook left behind


# ------------------------------------------------------------------------------------- parity with diffusers


def _diffusers_embeds(pipe, prompt: str) -> torch.Tensor:
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.mark.parametrize("layout", ["a1111_pt", "emb_params", "diffusers_bin"])
@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_text_embeddings_equal_diffusers_load_textual_inversion(tmp_path: Path, layout: str, sd2: bool) -> None:
    b = sd_bundle(sd2)
    width = b.text_encoder.config.width
    t = vectors(3, width, 7) * 0.5
    path = {"a1111_pt": lambda: a1111_pt(tmp_path / "concept.pt", t),
            "emb_params": lambda: emb_params(tmp_path / "concept.safetensors", t),
            "diffusers_bin": lambda: diffusers_bin(tmp_path / "concept.bin", t)}[layout]()
    b.embeddings = EmbeddingLibrary([path])
    pipe = diffusers_sd_pipeline(b, tmp_path / "pipe")
    # diffusers' own readers: the A1111 .pt and the {token: tensor} file by path; emb_params as a tensor
    source = str(path) if layout != "emb_params" else t.clone()
    pipe.load_textual_inversion(source, token="concept")
    prompt = "a photo of concept in a garden, concept and concept"  # three uses, three sets of vectors
    ours = b.conditioning(prompt, (64, 64)).context
    theirs = _diffusers_embeds(pipe, prompt)
    diff = (ours - theirs).abs().max().item()
    print(f"{'SD2' if sd2 else 'SD1'} {layout}: text embeddings max |diff| vs diffusers {diff:.2e}")
    assert diff < 1e-5
    b.embeddings = None
    assert (b.conditioning(prompt, (64, 64)).context - ours).abs().max() > 1e-2  # the vectors matter


def test_sd1_image_equals_diffusers_with_textual_inversion(tmp_path: Path, responsive_ckpt: Path) -> None:
    b = gbsd_core.load(responsive_ckpt)
    t = vectors(2, b.text_encoder.config.width, 8)
    b.embeddings = EmbeddingLibrary([a1111_pt(tmp_path / "bunnystyle.pt", t)])
    pipe = diffusers_sd_pipeline(b, tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(tmp_path / "bunnystyle.pt"), token="bunnystyle")
    prompt, n = "a bunnystyle bunny and a carrot in a garden, bokeh", 8
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = np.asarray(generate(b, GenerationParams(prompt, steps=n, **SIZE), x_T=x_T).image, dtype=np.int16)
    theirs = pipe(prompt, negative_prompt="", num_inference_steps=n, guidance_scale=7.5, eta=0.0,
                  latents=x_T.clone(), output_type="np", **SIZE).images[0]
    diff = max_pixel_diff(ours, theirs)
    print(f"SD1 + textual inversion vs diffusers: max pixel diff {diff * 255:.3f}/255")
    assert diff <= 1 / 255
    b.embeddings = None
    without = np.asarray(generate(b, GenerationParams(prompt, steps=n, **SIZE), x_T=x_T).image, dtype=np.int16)
    assert np.abs(without - ours).max() > 2  # the embedding changes the image


def test_sdxl_equals_diffusers_with_textual_inversion(tmp_path: Path, sdxl: SDBundle) -> None:
    """SDXL files carry one set of vectors per tower; diffusers loads each into its tower (its documented recipe):
    both contexts and the pooled vector agree, and so do the images."""
    clip_l, clip_g = vectors(2, 64, 9) * 0.5, vectors(2, 128, 10) * 0.5
    path = sdxl_file(tmp_path / "xlconcept.safetensors", clip_l, clip_g)
    sdxl.embeddings = EmbeddingLibrary([path])
    pipe = diffusers_sdxl_pipeline(sdxl, tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(clip_l.clone(), token="xlconcept", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g.clone(), token="xlconcept", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt, n = "a xlconcept bunny and a carrot in a garden, bokeh", 6
    ours = sdxl.conditioning(prompt, (64, 64))
    context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    diffs = (ours.context - context).abs().max().item(), rel_err(ours.pooled, pooled)
    print(f"SDXL textual inversion vs diffusers: context max |diff| {diffs[0]:.2e}, pooled rel_err {diffs[1]:.2e}")
    assert max(diffs) < 1e-5
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    image = np.asarray(generate(sdxl, GenerationParams(prompt, steps=n, **SIZE), x_T=x_T).image, dtype=np.int16)
    theirs = pipe(prompt, negative_prompt=None, num_inference_steps=n, guidance_scale=7.5, eta=0.0,
                  latents=x_T.clone(), output_type="np", **SIZE).images[0]
    diff = max_pixel_diff(image, theirs)
    print(f"SDXL + textual inversion vs diffusers: max pixel diff {diff * 255:.3f}/255")
    assert diff <= 1 / 255
    sdxl.embeddings = None

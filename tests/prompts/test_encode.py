"""gbsd_core/prompts/encode.py through `SDBundle.conditioning`: plain prompts encode to the bits of today's path;
weights, mean restoration and chunks against a reference written here from A1111's documented algorithm, on the
transformers twins of the text towers with transformers' own CLIPTokenizer (no gbsd code on the reference side);
SDXL pools the first chunk, as diffusers does."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _reference import clip_tokenizer, transformers_bigg, transformers_clip, transformers_clip_l, transformers_openclip
from _sdxl import write_tiny_sdxl
from _tiny import tiny_modules
from _util import rel_err

import gbsd_core
from gbsd_core.bundle import SDBundle
from gbsd_core.family import family_by_name
from gbsd_core.prompts.parser import PromptError
from gbsd_core.tokenizer import Tokenizer

SOT, EOT = 49406, 49407
PLAIN = ["a bunny and a carrot in a garden, bokeh", "", "a photo: of x; 50% off!", "  spaces   between  words ",
         "émigré café, naïve", " ".join(["photo"] * 75)]


def sd_bundle(sd2: bool = False) -> SDBundle:
    return SDBundle(**tiny_modules(sd2=sd2, seed=4), tokenizer=Tokenizer(0 if sd2 else EOT),
                    family=family_by_name("sd2-512" if sd2 else "sd1"))


@pytest.fixture(scope="module")
def sd1() -> SDBundle:
    return sd_bundle()


@pytest.fixture(scope="module")
def sd2() -> SDBundle:
    return sd_bundle(sd2=True)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> SDBundle:
    return gbsd_core.load(write_tiny_sdxl(tmp_path_factory.mktemp("sdxl")))


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


# --------------------------------------------------------------------------------------------- bit identity


@pytest.mark.parametrize("prompt", PLAIN, ids=range(len(PLAIN)))
def test_plain_prompts_encode_to_the_same_bits(prompt: str, sd1: SDBundle, sd2: SDBundle, sdxl: SDBundle) -> None:
    for b in (sd1, sd2):
        assert torch.equal(b.conditioning(prompt, (64, 64)).context, b.encode_prompt(prompt))
    ours, today = sdxl.conditioning(prompt, (64, 64)), sdxl.encode_prompt(prompt)
    assert torch.equal(ours.context, today.context) and torch.equal(ours.pooled, today.pooled)


# ------------------------------------------------------------------------ the reference, from A1111's documents


def reference_rows(chunks: list[list[tuple[str, float]]], tokenizer, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk of (text, weight) pieces -> a row [start, its tokens (each piece tokenized alone), end, padding]
    of 77 ids and the weights per position (1 for start, end and padding): [k, 77] ids, [k, 77] weights."""
    ids, weights = [], []
    for chunk in chunks:
        row, w = [SOT], [1.0]
        for text, weight in chunk:
            toks = tokenizer(text, add_special_tokens=False)["input_ids"]
            row += toks
            w += [weight] * len(toks)
        assert len(row) <= 76
        row.append(EOT)
        ids.append(row + [pad] * (77 - len(row)))
        weights.append(w + [1.0] * (77 - len(w)))
    return torch.tensor(ids), torch.tensor(weights)


def reference_emphasis(z: torch.Tensor, w: torch.Tensor, mode: str = "original") -> torch.Tensor:
    """A1111's documented emphasis on one chunk z [1, 77, D]: multiply by the weights, then ("Original") rescale so
    the mean is the unweighted mean."""
    weighted = z * w[None, :, None]
    return weighted if mode == "no_norm" else weighted * (z.mean() / weighted.mean())


# A prompt, the chunks of weighted pieces A1111's documentation says it is (emphasis rules; BREAK starts a chunk)
WEIGHTED = [
    ("a (red:1.3) [car] on a ((street)), night", [[("a ", 1.0), ("red", 1.3), (" ", 1.0), ("car", 1 / 1.1),
                                                    (" on a ", 1.0), ("street", 1.1 * 1.1), (", night", 1.0)]]),
    ("a cat (sitting:0.6) BREAK on a [[mat]], (stars:1.5)",
     [[("a cat ", 1.0), ("sitting", 0.6)], [("on a ", 1.0), ("mat", 1 / 1.1 / 1.1), (", ", 1.0), ("stars", 1.5)]]),
    ("(" + "photo " * 80 + ":1.2) of a cat", [[("photo", 1.2)] * 75, [("photo", 1.2)] * 5 + [(" of a cat", 1.0)]]),
]


@pytest.mark.parametrize("prompt, chunks", WEIGHTED, ids=["weights", "break", "long"])
@pytest.mark.parametrize("mode", ["original", "no_norm"])
def test_sd1_weights_and_chunks_equal_the_reference(prompt, chunks, mode, sd1: SDBundle, hf_tokenizer) -> None:
    ref = transformers_clip(sd1.text_encoder)
    ids, w = reference_rows(chunks, hf_tokenizer, EOT)
    with torch.no_grad():
        zs = [ref(input_ids=ids[k:k + 1]).last_hidden_state for k in range(len(ids))]
    expected = torch.cat([reference_emphasis(z, w[k], mode) for k, z in enumerate(zs)], dim=1)
    ours = sd1.conditioning(prompt, (64, 64), emphasis=mode).context
    err = rel_err(ours, expected)
    # The mean restoration divides by mean(z·w): where that mean is small against the values, it magnifies the
    # towers' rounding by mean|z·w| / |mean(z·w)| (the same in A1111); the tolerance grows with it.
    gain = max(float((z * w[k][None, :, None]).abs().mean() / (z * w[k][None, :, None]).mean().abs())
               for k, z in enumerate(zs)) if mode == "original" else 1.0
    print(f"SD1 {mode} {prompt[:30]!r}: {len(ids)} chunks, rel_err {err:.2e} vs the reference (gain {gain:.0f})")
    assert ours.shape == (1, 77 * len(chunks), 64) and err < 1e-6 * max(10.0, gain)


@pytest.mark.parametrize("prompt, chunks", WEIGHTED[:2], ids=["weights", "break"])
def test_sd2_weights_and_chunks_equal_the_reference(prompt, chunks, sd2: SDBundle, hf_tokenizer) -> None:
    ref = transformers_openclip(sd2.text_encoder)  # OpenCLIP pads with 0
    ids, w = reference_rows(chunks, hf_tokenizer, 0)
    with torch.no_grad():
        expected = torch.cat([reference_emphasis(ref(input_ids=ids[k:k + 1]).last_hidden_state, w[k])
                              for k in range(len(ids))], dim=1)
    err = rel_err(sd2.conditioning(prompt, (64, 64)).context, expected)
    print(f"SD2 {prompt[:30]!r}: rel_err {err:.2e} vs the reference")
    assert err < 1e-5


@pytest.mark.parametrize("prompt, chunks", WEIGHTED, ids=["weights", "break", "long"])
def test_sdxl_weights_per_tower_and_pooled_from_the_first_chunk(prompt, chunks, sdxl: SDBundle, hf_tokenizer) -> None:
    """A1111 weights each tower's output alone; the pooled vector is bigG's on the first chunk, unweighted."""
    clip_l, bigg = transformers_clip_l(sdxl.text_encoder), transformers_bigg(sdxl.text_encoder)
    ids_l, w = reference_rows(chunks, hf_tokenizer, EOT)
    ids_g, _ = reference_rows(chunks, hf_tokenizer, 0)
    parts = []
    with torch.no_grad():
        for k in range(len(ids_l)):
            out_l = clip_l(input_ids=ids_l[k:k + 1], output_hidden_states=True)
            out_g = bigg(input_ids=ids_g[k:k + 1], output_hidden_states=True)
            parts.append(torch.cat([reference_emphasis(out_l.hidden_states[-2], w[k]),
                                    reference_emphasis(out_g.hidden_states[-2], w[k])], dim=-1))
            pooled = out_g.text_embeds if k == 0 else pooled
    ours = sdxl.conditioning(prompt, (64, 64))
    err_c, err_p = rel_err(ours.context, torch.cat(parts, dim=1)), rel_err(ours.pooled, pooled)
    print(f"SDXL {prompt[:30]!r}: context rel_err {err_c:.2e}, pooled rel_err {err_p:.2e} vs the reference")
    assert err_c < 1e-5 and err_p < 1e-5


def test_sdxl_pools_what_diffusers_pools(sdxl: SDBundle, tmp_path: Path) -> None:
    """diffusers cuts a prompt to its first 77 tokens and pools that row; a prompt whose first chunk is 75 tokens
    has the same first row here, so the pooled vectors agree (A1111 pools its first chunk: zs[0].pooled)."""
    from _reference import diffusers_sdxl_pipeline

    prompt = " ".join(["a bunny"] * 50)  # 100 tokens: chunks of 75 and 25, no comma to move the break
    pipe = diffusers_sdxl_pipeline(sdxl, tmp_path)
    _, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    ours = sdxl.conditioning(prompt, (64, 64))
    assert ours.context.shape[1] == 154
    err = rel_err(ours.pooled, pooled)
    print(f"SDXL pooled of a 2-chunk prompt vs diffusers' (77 tokens): rel_err {err:.2e}")
    assert err < 1e-5


def test_emphasis_ignore_and_none(sd1: SDBundle) -> None:
    # "ignore": the syntax is read (brackets gone), no weights; "none": brackets and BREAK are text
    ignored = sd1.conditioning("a (red:1.5) car", (64, 64), emphasis="ignore").context
    assert torch.equal(ignored, sd1.encode_prompt("a red car"))
    literal = sd1.conditioning("a (red:1.5) car BREAK x", (64, 64), emphasis="none").context
    assert torch.equal(literal, sd1.encode_prompt("a (red:1.5) car BREAK x"))
    weighted = sd1.conditioning("a (red:1.5) car", (64, 64)).context
    assert (weighted - ignored).abs().max() > 1e-3


def test_weights_that_cancel_the_mean_are_refused() -> None:
    from gbsd_core.prompts.encode import weigh

    with pytest.raises(PromptError, match="cancel a chunk's mean"):
        weigh(torch.ones(1, 77, 4), [0.0] * 77)  # mean(z·w) = 0: A1111 would divide by it and make NaN
    assert torch.equal(weigh(torch.ones(1, 77, 4), [0.0] + [2.0] * 76), torch.cat(
        [torch.zeros(1, 1, 4), torch.full((1, 76, 4), 2.0 * 77 / 152)], dim=1))


def test_prompt_limits(sd1: SDBundle) -> None:
    sd1.conditioning(" ".join(["photo"] * 600), (64, 64))  # 8 chunks of 75: the limit
    with pytest.raises(PromptError, match="is 9 chunks of 75 tokens; gbsd reads at most 8 .600 tokens"):
        sd1.conditioning(" ".join(["photo"] * 601), (64, 64))
    with pytest.raises(PromptError, match="is .* chunks"):
        sd1.conditioning("a " * 4999, (64, 64))  # 10,000 characters

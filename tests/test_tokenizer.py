"""Tokenizer parity: our ids vs transformers' CLIPTokenizer (SD1's reference) built offline from open_clip's BPE."""
from __future__ import annotations

import subprocess
import sys
import warnings

import open_clip.tokenizer as open_clip_tokenizer  # a test extra: if missing, fail (never skip)
import pytest
import torch
from _reference import clip_tokenizer

from gbsd_core.tokenizer import Tokenizer

LONG_PROMPT = (
    "a breathtaking ultra detailed photograph of an old lighthouse on a rocky cliff at sunset, dramatic clouds, "
    "crashing waves, golden hour light, volumetric fog, seagulls in the sky, a small fishing boat in the distance, "
    "reflections on wet rocks, shot on a 85mm lens at f/1.4, shallow depth of field, bokeh, film grain, "
    "award winning, trending on artstation, national geographic cover, octane render, 8k resolution, masterpiece"
)
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Portrait of a Woman, 85mm f/1.4, BOKEH!!",
    "it's a dog's life -- (cat:1.2) [forest]",
    "   multiple   spaces\tand\nnewlines   ",
    "café crème brûlée, 1999, #42 @home",
    "",
    LONG_PROMPT,
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer from CLIP's vocab.json + merges.txt, made from open_clip's BPE file."""
    tok = clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))
    assert tok.pad_token_id == 49407  # SD1 tokenizers pad with <|endoftext|>
    return tok


def hf_ids(tok, prompts: list[str]) -> torch.Tensor:
    # What diffusers' StableDiffusionPipeline.encode_prompt and ldm's FrozenCLIPEmbedder call.
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_long_prompt_is_long(hf_tokenizer):
    assert len(hf_tokenizer(LONG_PROMPT).input_ids) > 77


def test_sd1_ids_equal_transformers(hf_tokenizer):
    ours = Tokenizer(pad_token_id=49407)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
    want = hf_ids(hf_tokenizer, PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    for i, p in enumerate(PROMPTS):
        assert torch.equal(got[i], want[i]), (p, got[i].tolist(), want[i].tolist())


def test_sd2_ids_equal_transformers_then_zeros(hf_tokenizer):
    ours = Tokenizer(pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
    want = hf_ids(hf_tokenizer, PROMPTS)
    for i, p in enumerate(PROMPTS):
        end = int((want[i] == 49407).nonzero()[0]) + 1  # through the first end token
        assert torch.equal(got[i, :end], want[i, :end]), p
        assert (got[i, end:] == 0).all(), p
    # The framing is also what Stability's FrozenOpenCLIPEmbedder gets from open_clip.tokenize (zero padding,
    # truncation to start + 75 + end).
    assert torch.equal(got, open_clip_tokenizer.SimpleTokenizer()(PROMPTS, context_length=77))


def test_empty_prompt_and_single_string():
    for pad in (49407, 0):
        t = Tokenizer(pad)
        ids = t("")
        assert ids.shape == (1, 77)
        assert ids[0, :2].tolist() == [49406, 49407] and (ids[0, 2:] == pad).all()
        assert torch.equal(t("a cat"), t(["a cat"]))


def test_overlong_prompt_warns_naming_dropped_words(hf_tokenizer):
    kept_words = ["cat"] * 75
    prompt = " ".join(kept_words + ["zebra", "giraffe"])
    assert len(hf_tokenizer(prompt).input_ids) == 2 + 77  # each word one token: 75 kept, 2 dropped
    t = Tokenizer(49407)
    with pytest.warns(UserWarning, match="dropped: 'zebra giraffe'") as rec:
        ids = t(["short prompt", prompt])
    assert len(rec) == 1 and "prompt 1" in str(rec[0].message)
    assert torch.equal(ids[1], hf_ids(hf_tokenizer, [prompt])[0])
    # Exactly 75 tokens fit without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t(" ".join(kept_words))
    # The realistic long prompt: the warning names its tail, which the reference drops too.
    with pytest.warns(UserWarning, match="masterpiece"):
        t(LONG_PROMPT)


def test_import_does_not_load_open_clip():
    code = "import sys, gbsd_core.tokenizer, gbsd_core.ddim; assert 'open_clip' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_pad_id_raises():
    for bad in (-1, 49408):
        with pytest.raises(ValueError, match="pad_token_id"):
            Tokenizer(bad)
    with pytest.raises(ValueError, match="no prompts"):
        Tokenizer(0)([])

"""Text encoders: key layout vs the golden lists, config inference, and parity with independent references.

References (test-only): transformers `CLIPTextModel` fed through diffusers' `convert_ldm_clip_checkpoint` (SD1),
open_clip's own text-tower modules run the way Stability's `FrozenOpenCLIPEmbedder.encode_with_transformer` runs
them (SD2), and diffusers' `convert_open_clip_checkpoint` into a transformers `CLIPTextModel` (SD2, 2nd opinion).
"""
from __future__ import annotations

import gc
import re
import time

import pytest
import torch
from _reference import transformers_clip
from _text import BOS, EOS, TINY_SD1, TINY_SD2, TOL, golden_keys, key_pattern, randomize_, sd_tokens, shapes
from _util import rel_err

from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder


# ----------------------------------------------------------------------------------------------------- key layout
@pytest.mark.parametrize("tsv,module", [
    ("sd1_v1-inference.tsv", lambda: CLIPTextEncoder(CLIPTextConfig())),
    ("sd2_v2-inference.tsv", lambda: OpenCLIPTextEncoder(OpenCLIPTextConfig())),
])
def test_fullsize_keys_and_shapes_on_meta(tsv, module):
    # Built on the meta device: exact names and shapes of the real architecture at no memory cost.
    with torch.device("meta"):
        m = module()
    assert shapes(m) == golden_keys(tsv)


@pytest.mark.parametrize("tsv,module", [
    ("sd1_v1-inference.tsv", lambda: CLIPTextEncoder(TINY_SD1)),
    ("sd2_v2-inference.tsv", lambda: OpenCLIPTextEncoder(TINY_SD2)),
])
def test_tiny_keys_follow_golden_pattern(tsv, module):
    m = module()
    assert key_pattern(m.state_dict()) == key_pattern(golden_keys(tsv))
    n = {int(i) for k in m.state_dict() for i in re.findall(r"\.(?:layers|resblocks)\.(\d+)\.", k)}
    assert n == set(range(3))


# ----------------------------------------------------------------------------------------------------- config inference
def test_clip_config_from_state_dict():
    assert CLIPTextConfig.from_state_dict(CLIPTextEncoder(TINY_SD1).state_dict(), heads=4) == TINY_SD1
    # default heads = width // 64 (ViT-L/14: 12)
    with torch.device("meta"):
        full = CLIPTextEncoder(CLIPTextConfig()).state_dict()
    assert CLIPTextConfig.from_state_dict(full) == CLIPTextConfig()
    cfg = CLIPTextConfig(vocab_size=1000, width=128, layers=2, heads=2, context_length=40)
    assert CLIPTextConfig.from_state_dict(CLIPTextEncoder(cfg).state_dict()) == cfg
    with pytest.raises(ValueError, match="heads"):
        CLIPTextConfig.from_state_dict(CLIPTextEncoder(TINY_SD1).state_dict())


# ----------------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("make", [lambda: CLIPTextEncoder(TINY_SD1), lambda: OpenCLIPTextEncoder(TINY_SD2)])
def test_causal(make):
    # Changing tokens from position 30 on must leave positions < 30 untouched and change the rest.
    m = make().eval()
    randomize_(m, 1)
    a = sd_tokens(EOS, (60,))
    b = a.clone()
    b[:, 30:60] = torch.randint(256, BOS, (1, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ya, yb = m(a), m(b)
    assert torch.equal(ya[:, :30], yb[:, :30])
    assert (ya[:, 30:] - yb[:, 30:]).abs().amax() > 1e-2


def test_clip_skip_range():
    m = CLIPTextEncoder(TINY_SD1)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="clip_skip"):
            m(sd_tokens(EOS), clip_skip=bad)


# ----------------------------------------------------------------------------------------------------- tiny parity
def test_tiny_clip_parity_transformers():
    ours = CLIPTextEncoder(TINY_SD1).eval()
    randomize_(ours, 0)
    hf = transformers_clip(ours)
    tokens = sd_tokens(EOS)
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        for skip in range(1, TINY_SD1.layers + 1):
            ref = out.last_hidden_state if skip == 1 else hf.final_layer_norm(out.hidden_states[-skip])
            err = rel_err(ours(tokens, clip_skip=skip), ref)
            print(f"tiny CLIP clip_skip={skip}: rel_err {err:.2e}")
            assert err <= TOL


# ----------------------------------------------------------------------------------------------------- full size
@pytest.mark.fullsize
def test_fullsize_clip_l_parity():
    t0 = time.perf_counter()
    with torch.device("meta"):  # skip the default init; randomize_ sets every parameter
        ours = CLIPTextEncoder(CLIPTextConfig()).eval()
    ours.to_empty(device="cpu")
    randomize_(ours, 0)
    hf = transformers_clip(ours)
    tokens = sd_tokens(EOS, (8, 75))
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        for skip in (1, 2):
            ref = out.last_hidden_state if skip == 1 else hf.final_layer_norm(out.hidden_states[-2])
            err = rel_err(ours(tokens, clip_skip=skip), ref)
            print(f"CLIP-L clip_skip={skip}: rel_err {err:.2e}")
            assert err <= TOL
    del ours, hf, out
    gc.collect()
    print(f"CLIP-L full-size test: {time.perf_counter() - t0:.1f}s")



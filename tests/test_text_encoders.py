"""Text encoders: key layout vs the golden lists, config inference, and parity with independent references.

References (test-only): transformers `CLIPTextModel` fed through diffusers' `convert_ldm_clip_checkpoint` (SD1),
open_clip's own text-tower modules run the way Stability's `FrozenOpenCLIPEmbedder.encode_with_transformer` runs
them (SD2), and diffusers' `convert_open_clip_checkpoint` into a transformers `CLIPTextModel` (SD2, 2nd opinion).
"""
from __future__ import annotations

import gc
import re
import time
from dataclasses import replace

import pytest
import torch

from _reference import transformers_clip, transformers_openclip
from _util import LDM_KEYS, read_keys_tsv, rel_err
from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder

TOL = 1e-5
BOS, EOS = 49406, 49407
TINY_SD1 = CLIPTextConfig(vocab_size=49408, width=32, layers=3, heads=4, context_length=77)
TINY_SD2 = OpenCLIPTextConfig(vocab_size=49408, width=32, layers=3, heads=4, context_length=77, embed_dim=24)


# ----------------------------------------------------------------------------------------------------- helpers
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial values (random biases and LayerNorm affines too, so a swapped or dropped
    bias cannot hide behind a zero init). Scales keep each residual branch O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 0:
                continue  # logit_scale: unused by SD
            if name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim == 1:  # LayerNorm weight
                p.copy_(1 + 0.1 * r)
            elif "embedding" in name:  # token / position embeddings
                p.copy_(r)
            else:  # Linear-like [out, in] (and text_projection [in, out]: scale only matters loosely)
                p.copy_(r / p.shape[1] ** 0.5)


def sd_tokens(pad: int, lengths: tuple[int, ...] = (3, 17, 75), seed: int = 0) -> torch.Tensor:
    """Real-looking prompts: BOS, n word ids, EOS, then padding (SD1 pads with EOS, SD2 with 0) to 77."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(256, BOS, (n,), generator=g)
        row = torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS])])
        rows.append(torch.cat([row, torch.full((77 - len(row),), pad)]))
    return torch.stack(rows)


def golden_keys(tsv: str) -> dict[str, tuple[int, ...]]:
    """Required `cond_stage_model.*` keys of a golden list, prefix stripped -> shape."""
    rows = read_keys_tsv(LDM_KEYS / tsv)
    p = "cond_stage_model."
    return {k[len(p):]: shape for k, (shape, _, opt) in rows.items() if k.startswith(p) and opt is None}


def key_pattern(keys) -> set[str]:
    return {re.sub(r"\.(layers|resblocks)\.\d+\.", r".\1.N.", k) for k in keys}


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def stability_penultimate(model: torch.nn.Module, tokens: torch.Tensor, skip_last: bool = True) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder.encode_with_transformer (layer="penultimate") on open_clip's own modules."""
    x = model.token_embedding(tokens) + model.positional_embedding
    if not model.transformer.batch_first:  # open_clip < 2.24 ran the stack sequence-first
        x = x.permute(1, 0, 2)
    blocks = model.transformer.resblocks
    for r in blocks[: len(blocks) - 1] if skip_last else blocks:
        x = r(x, attn_mask=model.attn_mask)
    if not model.transformer.batch_first:
        x = x.permute(1, 0, 2)
    return model.ln_final(x)


def tiny_open_clip(cfg: OpenCLIPTextConfig) -> torch.nn.Module:
    """A tiny open_clip CLIP with the visual tower removed, as FrozenOpenCLIPEmbedder keeps it."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                       heads=cfg.heads, layers=cfg.layers)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    m = CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)
    del m.visual
    return m.eval()


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


def test_openclip_without_projection_keys():
    m = OpenCLIPTextEncoder(OpenCLIPTextConfig(width=32, layers=2, heads=4, has_projection=False))
    keys = set(m.state_dict())
    assert "model.text_projection" not in keys and "model.logit_scale" not in keys
    assert "model.ln_final.weight" in keys


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


def test_openclip_config_from_state_dict():
    assert OpenCLIPTextConfig.from_state_dict(OpenCLIPTextEncoder(TINY_SD2).state_dict(), heads=4) == TINY_SD2
    with torch.device("meta"):
        full = OpenCLIPTextEncoder(OpenCLIPTextConfig()).state_dict()
    assert OpenCLIPTextConfig.from_state_dict(full) == OpenCLIPTextConfig()
    # a diffusers-style tower: no projection (inferred from keys); 23 layers, all run (stated by the caller)
    cfg = OpenCLIPTextConfig(width=128, layers=3, heads=2, penultimate=False, has_projection=False)
    sd = OpenCLIPTextEncoder(cfg).state_dict()
    assert OpenCLIPTextConfig.from_state_dict(sd, penultimate=False) == cfg


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


def test_tiny_openclip_parity_open_clip():
    ref_model = tiny_open_clip(TINY_SD2)
    randomize_(ref_model, 0)
    ours = OpenCLIPTextEncoder(TINY_SD2).eval()
    ours.load_state_dict({"model." + k: v for k, v in ref_model.state_dict().items()}, strict=True)
    tokens = sd_tokens(0)
    with torch.no_grad():
        err = rel_err(ours(tokens), stability_penultimate(ref_model, tokens))
        print(f"tiny OpenCLIP penultimate vs open_clip: rel_err {err:.2e}")
        assert err <= TOL
        # penultimate=False on the same weights runs every block
        all_blocks = OpenCLIPTextEncoder(replace(TINY_SD2, penultimate=False))
        all_blocks.load_state_dict(ours.state_dict(), strict=True)
        err = rel_err(all_blocks(tokens), stability_penultimate(ref_model, tokens, skip_last=False))
        print(f"tiny OpenCLIP all blocks vs open_clip: rel_err {err:.2e}")
        assert err <= TOL


def test_tiny_openclip_parity_diffusers_conversion():
    ours = OpenCLIPTextEncoder(TINY_SD2).eval()
    randomize_(ours, 2)
    hf = transformers_openclip(ours)
    tokens = sd_tokens(0)
    with torch.no_grad():
        err = rel_err(ours(tokens), hf(input_ids=tokens).last_hidden_state)
    print(f"tiny OpenCLIP vs diffusers-converted transformers (2 of 3 layers): rel_err {err:.2e}")
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


@pytest.mark.fullsize
def test_fullsize_openclip_h_parity():
    import open_clip

    t0 = time.perf_counter()
    ref_model = open_clip.create_model("ViT-H-14", pretrained=None)
    del ref_model.visual  # as FrozenOpenCLIPEmbedder does; frees most of the 4 GB
    gc.collect()
    ref_model.eval()
    with torch.device("meta"):  # no init of our copy: it takes (shares) the reference's tensors
        ours = OpenCLIPTextEncoder(OpenCLIPTextConfig()).eval()
    ref_sd = {"model." + k: v for k, v in ref_model.state_dict().items()}
    ours.load_state_dict(ref_sd, strict=True, assign=True)  # names are identical under `model.`
    del ref_sd
    tokens = sd_tokens(0, (8, 75))
    with torch.no_grad():
        ref = stability_penultimate(ref_model, tokens)
        y = ours(tokens)
    del ref_model
    gc.collect()
    err = rel_err(y, ref)
    print(f"OpenCLIP-H penultimate vs open_clip: rel_err {err:.2e}")
    assert err <= TOL

    hf = transformers_openclip(ours)
    with torch.no_grad():
        err = rel_err(y, hf(input_ids=tokens).last_hidden_state)
    print(f"OpenCLIP-H vs diffusers-converted 23-layer transformers: rel_err {err:.2e}")
    assert err <= TOL
    del ours, hf
    gc.collect()
    print(f"OpenCLIP-H full-size test: {time.perf_counter() - t0:.1f}s")

"""SD2's OpenCLIP ViT-H/14 text encoder (gbsd_core/openclip_text.py): keys, config inference, parity with open_clip
and diffusers' conversion (tiny and full size)."""
from __future__ import annotations

import gc
import time
from dataclasses import replace

import pytest
import torch
from _reference import transformers_openclip
from _text import TINY_SD2, TOL, randomize_, sd_tokens
from _util import rel_err

from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder


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


def test_openclip_without_projection_keys():
    m = OpenCLIPTextEncoder(OpenCLIPTextConfig(width=32, layers=2, heads=4, has_projection=False,
                                               has_logit_scale=False))
    keys = set(m.state_dict())
    assert "model.text_projection" not in keys and "model.logit_scale" not in keys
    assert "model.ln_final.weight" in keys


def test_logit_scale_is_its_own_part():
    """SDXL's diffusers text_encoder_2 has the projection (the pooled vector) but no logit_scale."""
    keys = set(OpenCLIPTextEncoder(OpenCLIPTextConfig(width=32, layers=2, heads=4, has_logit_scale=False)).state_dict())
    assert "model.text_projection" in keys and "model.logit_scale" not in keys
    sd = OpenCLIPTextEncoder(TINY_SD2).state_dict()
    del sd["model.logit_scale"]
    assert not OpenCLIPTextConfig.from_state_dict(sd, heads=4).has_logit_scale


def test_openclip_config_from_state_dict():
    assert OpenCLIPTextConfig.from_state_dict(OpenCLIPTextEncoder(TINY_SD2).state_dict(), heads=4) == TINY_SD2
    with torch.device("meta"):
        full = OpenCLIPTextEncoder(OpenCLIPTextConfig()).state_dict()
    assert OpenCLIPTextConfig.from_state_dict(full) == OpenCLIPTextConfig()
    # a diffusers-style tower: no projection, no logit_scale (inferred from keys); 23 layers, all run (stated by the
    # caller)
    cfg = OpenCLIPTextConfig(width=128, layers=3, heads=2, penultimate=False, has_projection=False,
                             has_logit_scale=False)
    sd = OpenCLIPTextEncoder(cfg).state_dict()
    assert OpenCLIPTextConfig.from_state_dict(sd, penultimate=False) == cfg


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

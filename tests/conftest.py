"""Shared pytest fixtures. (Plain helpers live in tests/_util.py.)"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test files live in folders that mirror the package (tests/fast/, tests/cli/, ...) and import the shared helpers
# (_util, _reference) by name; pytest runs in importlib mode (pyproject.toml), which adds no folder to sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random SD1-layout single-file checkpoint, written with the loader's own writer.

    Sizes are picked so the loader's `from_state_dict` inference gives the same configs back: CLIP keeps the real
    vocabulary (the tokenizer emits ids up to 49407) and 77 positions, width 64 (heads are inferred as width // 64);
    a context width other than 768 makes the UNet infer 64-wide heads, so its attention levels have 64 or 128
    channels; the VAE keeps four levels (the 8x downsampling the pipeline assumes). 64x64 images -> 8x8 latents.
    """
    import torch

    from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
    from gbsd_core.loading import save_single_file
    from gbsd_core.unet import UNetConfig, UNetModel
    from gbsd_core.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(1234)
    unet = UNetModel(UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                                num_heads=-1, num_head_channels=64, context_dim=64))
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1))
    text = CLIPTextEncoder(CLIPTextConfig(width=64, layers=2, heads=1))
    # Random init leaves some layers at exactly zero (e.g. zero-initialised output convs), which would make every
    # image identical; perturb everything so different seeds/prompts give different pixels.
    with torch.no_grad():
        for module in (unet, vae, text):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("tiny-weights") / "tiny-sd1.safetensors"
    save_single_file({"unet": unet, "vae": vae, "text_encoder": text}, path)
    return path


@pytest.fixture(scope="session")
def responsive_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint, made to respond visibly to its conditioning.

    A random tiny UNet barely listens to its context: the cross-attention value/output projections are small next to
    the residual path. They are amplified so that switching the conditioning (GBSD's stage switch, a wrong context, a
    precision loss) changes the image, and the attention maps have structure; the tiny random decoder squeezes every
    pixel near mid-grey, so its output conv is amplified too. Tests that must be able to fail on such changes use this.
    """
    import torch

    import gbsd_core
    from gbsd_core.loading import save_single_file

    b = gbsd_core.load(tiny_ckpt)
    with torch.no_grad():
        for name, p in b.unet.named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_out.0.weight" in name:
                p.mul_(6.0)
        b.vae.decoder.conv_out.weight.mul_(5.0)
    return save_single_file(b, tmp_path_factory.mktemp("responsive") / "tiny-responsive.safetensors")


@pytest.fixture(scope="session")
def sdxl_pipe(tmp_path_factory) -> Path:
    """A tiny SDXL base diffusers folder written by diffusers' own save_pretrained (tests/_sdxl.py)."""
    from _sdxl import save_tiny_sdxl_pipe

    return save_tiny_sdxl_pipe(tmp_path_factory.mktemp("sdxl-pipe") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(tmp_path_factory) -> Path:
    """A tiny random SDXL base single file (sgm layout, tests/_sdxl.py), made to respond to its conditioning."""
    from _sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_ckpt(tmp_path_factory) -> Path:
    """The tiny SDXL refiner single file (bigG alone, aesthetic-score micro-conditioning)."""
    from _sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-refiner"), refiner=True, seed=1)

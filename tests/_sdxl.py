"""Tiny SDXL-shaped modules (base and refiner) with seeded random weights, and a single-file checkpoint of them.

Shapes keep what makes SDXL SDXL: a conditioner with CLIP-L + OpenCLIP towers (the refiner: OpenCLIP alone) whose
contexts are concatenated, a pooled vector plus 256-wide micro-conditioning embeddings feeding the UNet's label_emb,
a UNet without attention at its first level and with per-level transformer depths. Sizes are picked so that the
loader's `from_state_dict` inference gives these configs back (heads = width // 64).
"""
from __future__ import annotations

from pathlib import Path

import torch

from gbsd_core.clip_text import CLIPTextConfig
from gbsd_core.loading import save_single_file
from gbsd_core.openclip_text import OpenCLIPTextConfig
from gbsd_core.sdxl_conditioner import (
    REFINER_MICRO,
    SDXLConditioner,
    SDXLConditionerConfig,
)
from gbsd_core.unet import UNetConfig, UNetModel
from gbsd_core.vae import AutoencoderKL, VAEConfig

TINY_BIGG = OpenCLIPTextConfig(width=128, layers=3, heads=2, embed_dim=32)
TINY_CONDITIONER = SDXLConditionerConfig(clip=CLIPTextConfig(width=64, layers=2, heads=1), openclip=TINY_BIGG)
TINY_REFINER_CONDITIONER = SDXLConditionerConfig(clip=None, openclip=TINY_BIGG, micro_conditioning=REFINER_MICRO)

# Base-shaped: three levels, attention at ds 2 and 4 only, depths 1 and 2 (the middle block: 2), context 64 + 128.
TINY_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4, 2),
                       num_heads=-1, num_head_channels=64, context_dim=192, use_linear_in_transformer=True,
                       transformer_depth=(1, 1, 2), adm_in_channels=TINY_CONDITIONER.vector_dim)
# Refiner-shaped: four levels, attention on the middle two, one depth throughout, context 128 (bigG alone).
TINY_REFINER_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                               attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64, context_dim=128,
                               use_linear_in_transformer=True, transformer_depth=2,
                               adm_in_channels=TINY_REFINER_CONDITIONER.vector_dim)

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.13025)  # 8x down, as SDXL's


def tiny_sdxl_modules(refiner: bool = False, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Default init plus seeded noise everywhere (no layer left at exactly zero), then made to respond visibly to
    its conditioning, as tests/conftest.py's responsive_ckpt: the cross-attention value/output projections and the
    label embedding are amplified, as are bigG's text projection (the pooled vector) and the decoder's output conv (a
    tiny random decoder squeezes pixels to grey)."""
    torch.manual_seed(seed)
    modules = {
        "unet": UNetModel(TINY_REFINER_UNET if refiner else TINY_UNET),
        "vae": AutoencoderKL(TINY_VAE),
        "text_encoder": SDXLConditioner(TINY_REFINER_CONDITIONER if refiner else TINY_CONDITIONER),
    }
    with torch.no_grad():
        for module in modules.values():
            for name, p in module.named_parameters():
                if not name.endswith("logit_scale"):
                    p.add_(torch.randn_like(p) * 0.02)
        for name, p in modules["unet"].named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_out.0.weight" in name or name.startswith("label_emb.0.2."):
                p.mul_(6.0)
        modules["vae"].decoder.conv_out.weight.mul_(5.0)
        modules["text_encoder"].embedders[-1].model.text_projection.mul_(20.0)  # the pooled vector matters too
    return {name: m.eval() for name, m in modules.items()}


def write_tiny_sdxl(folder: Path, refiner: bool = False, seed: int = 0) -> Path:
    """The tiny modules as an original-layout single file (`conditioner.*` keys), written by our writer."""
    name = "tiny-sdxl-refiner.safetensors" if refiner else "tiny-sdxl-base.safetensors"
    return save_single_file(tiny_sdxl_modules(refiner, seed), folder / name)

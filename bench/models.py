"""SD1.5- / SD2.1- / SDXL-base-size (or tiny) bundles with seeded random weights, for timing. No checkpoint is read.

Each module is built on the meta device (no default init: it would cost as much as ours and then be overwritten),
materialised with `to_empty` on the target device and filled from one seeded generator on that device, so every
build with the same (arch, tiny, device, seed) holds the same weights. The diffusers baseline is then made *from*
such a bundle (`bench.reference`), so both sides run identical weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from gbsd_core.bundle import SDBundle
from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.family import SD1, SD2_768_V, SDXL_BASE, Family
from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from gbsd_core.sdxl_conditioner import SDXLConditioner, SDXLConditionerConfig
from gbsd_core.tokenizer import Tokenizer
from gbsd_core.unet import UNetConfig, UNetModel
from gbsd_core.vae import AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class Arch:
    family: Family
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig | OpenCLIPTextConfig | SDXLConditionerConfig


# SD2.1 is the 768-v model: loading.load turns attention upcasting on for v-models, and so do we (diffusers'
# sd2-1 config has upcast_attention=True too, so the twin matches).
ARCHS = {
    "sd15": Arch(SD1, UNetConfig.sd1(), VAEConfig(), CLIPTextConfig()),
    "sd21": Arch(SD2_768_V, replace(UNetConfig.sd2(), upcast_attention=True), VAEConfig(), OpenCLIPTextConfig()),
    # SDXL 1.0 base (sd_xl_base.yaml): the 2.57B UNet, CLIP-L + OpenCLIP bigG, the VAE at scale 0.13025
    "sdxl": Arch(SDXL_BASE, UNetConfig.sdxl_base(), VAEConfig(scale_factor=0.13025), SDXLConditionerConfig.base()),
}
# Tiny stand-ins with the same structure (attention levels, linear vs conv proj, CLIP vs OpenCLIP), for the smoke
# test. Widths are multiples of 32 (GroupNorm) and heads 64 wide; the VAE keeps 4 levels (8x downsampling).
TINY_ARCHS = {
    "sd15": Arch(SD1, UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                                 num_heads=-1, num_head_channels=64, context_dim=64),
                 VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1), CLIPTextConfig(width=64, layers=2, heads=1)),
    "sd21": Arch(SD2_768_V, UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                                       attention_resolutions=(2, 1), num_heads=-1, num_head_channels=64, context_dim=64,
                                       use_linear_in_transformer=True, upcast_attention=True),
                 VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
                 OpenCLIPTextConfig(width=64, layers=3, heads=1, embed_dim=64)),
    # SDXL's shape: no attention at the first level, per-level depths, two towers side by side, the vector y
    "sdxl": Arch(SDXL_BASE, UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                                       attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64,
                                       context_dim=192, use_linear_in_transformer=True, transformer_depth=(1, 1, 2),
                                       adm_in_channels=64 + 6 * 256),
                 VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.13025),
                 SDXLConditionerConfig(clip=CLIPTextConfig(width=64, layers=2, heads=1),
                                       openclip=OpenCLIPTextConfig(width=128, layers=3, heads=2, embed_dim=64))),
}


@torch.no_grad()
def _init_(name: str, p: torch.Tensor, generator: torch.Generator) -> None:
    """Matrices/kernels N(0, 1/fan_in) (each layer keeps its input's scale, so activations stay O(1) and fp16 neither
    overflows nor hits denormals), biases N(0, 0.02²), 1-D scales 1 + N(0, 0.02²)."""
    if p.ndim == 0:  # OpenCLIP logit_scale: unused by SD
        p.fill_(1.0)
    elif p.ndim >= 2:
        p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)
    elif name.endswith("bias"):
        p.normal_(0.0, 0.02, generator=generator)
    else:
        p.normal_(1.0, 0.02, generator=generator)


@torch.no_grad()
def seeded_init_(module: nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter in place, in order (see `_init_`)."""
    for name, p in module.named_parameters():
        _init_(name, p, generator)


def _build(cls: type[nn.Module], config, device: torch.device, generator: torch.Generator,
           dtype: torch.dtype) -> nn.Module:
    """`cls(config)` on the meta device, then each parameter drawn in fp32 on `device` and cast to `dtype` one at a
    time: the same values at every dtype as `seeded_init_` of an fp32 module, and an SDXL UNet (2.6 G parameters) never
    held in fp32 and in `dtype` at once."""
    with torch.device("meta"):
        module = cls(config)
    for name, p in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        t = torch.empty(p.shape, device=device, dtype=torch.float32)
        _init_(name, t, generator)
        module.get_submodule(owner)._parameters[leaf] = nn.Parameter(t.to(dtype), requires_grad=p.requires_grad)
    for name, b in list(module.named_buffers()):  # none in gbsd's modules today; materialised, never left on meta
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._buffers[leaf] = torch.zeros(b.shape, device=device, dtype=b.dtype)
    return module.eval()


def build_bundle(arch: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 tiny: bool = False, seed: int = 0) -> SDBundle:
    """An `SDBundle` of the named architecture ("sd15" | "sd21" | "sdxl") with seeded random weights, on `device` in
    `dtype`."""
    spec = (TINY_ARCHS if tiny else ARCHS)[arch]
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(seed)  # weights are created on the device: no host round trip
    text_cls = {CLIPTextConfig: CLIPTextEncoder, OpenCLIPTextConfig: OpenCLIPTextEncoder,
                SDXLConditionerConfig: SDXLConditioner}[type(spec.text)]
    return SDBundle(
        unet=_build(UNetModel, spec.unet, device, g, dtype),
        vae=_build(AutoencoderKL, spec.vae, device, g, dtype),
        text_encoder=_build(text_cls, spec.text, device, g, dtype),
        tokenizer=Tokenizer(pad_token_id=spec.family.pad_token_id),
        family=spec.family,
    )


def build_unet(arch: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               tiny: bool = False, seed: int = 0) -> UNetModel:
    """The UNet of `arch` alone, seeded as in `build_bundle` (bench.lora: the LoRA merge needs no VAE or text towers,
    and an SDXL bundle's would not fit beside the merge's backups)."""
    device = torch.device(device)
    return _build(UNetModel, (TINY_ARCHS if tiny else ARCHS)[arch].unet, device,
                  torch.Generator(device).manual_seed(seed), dtype)


def parameter_counts(bundle: SDBundle) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(bundle, name).parameters())
            for name in ("unet", "vae", "text_encoder")}

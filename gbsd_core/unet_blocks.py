"""Convolutional building blocks of the SD UNet: timestep embedding, ResBlock, Downsample, Upsample, and the
`TimestepEmbedSequential` container that routes (emb, context) to the layers that need them.

Mirrors `ldm/modules/diffusionmodules/openaimodel.py` and `util.py` (CompVis / Stability) for the 2-D case, with the
same module names: ResBlock `in_layers.{0 norm, 1 SiLU, 2 conv}`, `emb_layers.{0 SiLU, 1 Linear}`,
`out_layers.{0 norm, 1 SiLU, 2 Dropout, 3 conv}`, `skip_connection`; Downsample `op`; Upsample `conv`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SpatialTransformer
from .norm import GroupNorm32


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim]: dim/2 frequencies max_period^(-i/(dim/2)), laid out as [cos, sin].

    As `util.timestep_embedding` (repeat_only=False). Timesteps may be ints or floats; computed in fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # the reference pads odd dims with a zero column
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-Dropout-conv, plus a skip.

    The skip is Identity when the channel count is unchanged, else a 1x1 conv (the reference's use_conv=False).
    SD uses use_scale_shift_norm=False, so the embedding is simply added.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: [B, C, h, w]; emb: [B, emb_channels] -> [B, out_channels, h, w]
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with padding 1: [B, C, h, w] -> [B, C, ceil(h/2), ceil(w/2)]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv.

    The reference always doubles (`scale_factor=2`); that breaks the skip concatenation when a downsampled size was
    odd (ceil(h/2) * 2 = h + 1). So the caller passes the skip's size, as diffusers does with `upsample_size`; for even
    sizes nearest-to-size(2h, 2w) picks exactly the same pixels as scale_factor=2.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks, the context to SpatialTransformers and the target
    size to Upsample (the reference dispatches on the same isinstance checks)."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x

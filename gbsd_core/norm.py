"""The one normalisation layer of SD's UNet and VAE: GroupNorm over 32 groups, statistics in fp32.

CompVis' `GroupNorm32` (ldm/modules/diffusionmodules/util.py) runs `super().forward(x.float()).type(x.dtype)`:
even in an fp16 model the mean and variance are taken in fp32, because the variance of large activations (the VAE
decoder's reach the thousands) loses precision in half. `Normalize` (model.py, the VAE) is the same GroupNorm.
eps differs by site (CompVis' code): 1e-5 in the UNet's ResBlocks and output, 1e-6 in SpatialTransformer norms and
everywhere in the VAE; callers pass it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) whose statistics and affine run in at least fp32; the result is cast back to x's dtype.

    The affine parameters are cast too, so a model converted wholesale with `.half()` still normalises in fp32.
    fp32 is a floor, not a ceiling: an fp64 input stays fp64 (a plain `.float()` would silently round it).
    In fp32 this is exactly `nn.GroupNorm`.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(GROUPS, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(t), self.num_groups, self.weight.to(t), self.bias.to(t), self.eps).to(x.dtype)

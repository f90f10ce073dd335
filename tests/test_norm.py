"""GroupNorm32 (gbsd_core/norm.py), the one normalisation of the UNet and the VAE: 32 groups, statistics in fp32
(CompVis' GroupNorm32), fp64 kept fp64; against a float64 reference written out here."""
from __future__ import annotations

import pytest
import torch

from _util import rel_err
from gbsd_core.norm import GroupNorm32
from gbsd_core.vae import Normalize


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm(32) in float64 by hand: per (sample, group) mean and biased variance, then the affine."""
    b, c = x.shape[:2]
    g = x.double().reshape(b, 32, -1)
    y = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return y.reshape(x.shape) * weight.double().view(1, c, 1, 1) + bias.double().view(1, c, 1, 1)


def _norm(channels: int, eps: float = 1e-5, seed: int = 0) -> GroupNorm32:
    norm = GroupNorm32(channels, eps=eps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(channels, generator=g))
        norm.bias.copy_(0.1 * torch.randn(channels, generator=g))
    return norm


def test_fp32_equals_the_float64_reference():
    norm = _norm(64)
    x = torch.randn(2, 64, 5, 7, generator=torch.Generator().manual_seed(1)) * 3 + 2
    assert norm.num_groups == 32 and norm.eps == 1e-5
    assert rel_err(norm(x), _reference(x, norm.weight, norm.bias, 1e-5)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_normalised_with_fp32_statistics(dtype):
    # A large mean and a small spread: statistics taken in half precision lose the spread (the variance of
    # x - mean cancels catastrophically), fp32 statistics keep it. The result is only rounded once, at the end.
    norm = _norm(64).to(dtype)
    x = (torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.05 + 30).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    ref = _reference(x, norm.weight, norm.bias, 1e-5)
    one_rounding = rel_err(ref.to(dtype), ref)
    err = rel_err(out, ref)
    print(f"{dtype}: GroupNorm32 {err:.2e}, the output rounding alone {one_rounding:.2e}")
    assert err <= 2 * one_rounding


def test_fp64_stays_fp64():
    norm = _norm(32).double()
    x = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = norm(x)
    assert out.dtype == torch.float64
    assert rel_err(out, _reference(x, norm.weight, norm.bias, 1e-5)) <= 1e-12  # a .float() would give ~1e-7


def test_vae_normalize_is_groupnorm32_with_eps_1e_6():
    norm = Normalize(128)
    assert type(norm) is GroupNorm32 and norm.num_groups == 32 and norm.eps == 1e-6

"""The plain-torch GroupNorm(+SiLU) reference (gbsd_core/fast/kernels/groupnorm_silu.py) against PyTorch's own ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _util import rel_err

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}  # as the kernel tests (test_triton_kernels.py)


@pytest.mark.parametrize("c,groups,hw,eps", [(40, 4, (7, 5), 1e-5), (320, 32, (8, 8), 1e-6), (64, 32, (1, 1), 1e-6)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_reference_vs_torch(c: int, groups: int, hw: tuple[int, int], eps: float, silu: bool) -> None:
    from gbsd_core.fast.kernels import group_norm_silu_reference

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, c, *hw, generator=g) * 3 + 1
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    ref = F.group_norm(x, groups, w, b, eps)
    ref = F.silu(ref) if silu else ref
    err = rel_err(group_norm_silu_reference(x, w, b, groups, eps, silu), ref)
    print(f"reference vs F.group_norm{'+F.silu' if silu else ''} C={c} G={groups} {hw}: {err:.3g}")
    assert err <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_reference_low_precision_is_fp32_stats(dtype: torch.dtype) -> None:
    """CompVis GroupNorm32: ``super().forward(x.float()).type(x.dtype)``: stats in fp32, result in the input dtype."""
    from gbsd_core.fast.kernels import group_norm_silu_reference

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 40, 7, 5, generator=g) * 4).to(dtype)
    w, b = torch.randn(40, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    ours = group_norm_silu_reference(x, w, b, 4, 1e-6, False)
    ref = F.group_norm(x.float(), 4, w.float(), b.float(), 1e-6).to(dtype)
    assert ours.dtype == dtype
    err = rel_err(ours, ref)
    print(f"{dtype} reference vs fp32 F.group_norm: {err:.3g}")
    assert err <= TOL[str(dtype).split(".")[1]]

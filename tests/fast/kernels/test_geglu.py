"""The plain-torch GEGLU reference (gbsd_core/fast/kernels/geglu.py) against PyTorch's own ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _util import rel_err


@pytest.mark.parametrize("shape", [(2, 3, 80), (5, 2 * 1280)])
def test_geglu_reference_vs_torch(shape: tuple[int, ...]) -> None:
    from gbsd_core.fast.kernels import geglu_reference

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 3
    hidden, gate = x.chunk(2, dim=-1)
    ref = hidden * F.gelu(gate)                           # F.gelu default = exact erf form
    err = rel_err(geglu_reference(x), ref)
    print(f"geglu reference vs F.gelu {shape}: {err:.3g}")
    assert err <= 1e-6
    # And it is not the tanh approximation (the two differ by ~1e-3 somewhere in this range).
    assert rel_err(geglu_reference(x), hidden * F.gelu(gate, approximate="tanh")) > 1e-5

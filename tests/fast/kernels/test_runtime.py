"""Where the Triton kernels run (gbsd_core/fast/kernels/runtime.py) and how the entry points dispatch: automatic,
switched off by GBSD_TRITON=0, the reference for unsupported cases and on a CPU without the interpreter, and no
triton import until a kernel is called."""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from _util import REPO


@pytest.fixture
def fake_kernels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-in for gbsd_core.fast.kernels.triton_kernels that records calls, with Triton declared available."""
    # importlib, not `import ... as`: the package attribute `geglu` is the function, which shadows the submodule.
    geglu_mod = importlib.import_module("gbsd_core.fast.kernels.geglu")
    gn_mod = importlib.import_module("gbsd_core.fast.kernels.groupnorm_silu")

    calls: list[str] = []
    fake = types.ModuleType("gbsd_core.fast.kernels.triton_kernels")
    fake.group_norm_silu_triton = lambda x, *a: calls.append("gn") or torch.full_like(x, math.pi)
    fake.geglu_triton = lambda x: calls.append("geglu") or torch.full_like(x[..., : x.shape[-1] // 2], math.pi)
    monkeypatch.setitem(sys.modules, "gbsd_core.fast.kernels.triton_kernels", fake)
    monkeypatch.setattr(gn_mod, "triton_available", lambda device: True)
    monkeypatch.setattr(geglu_mod, "triton_available", lambda device: True)
    monkeypatch.delenv("GBSD_TRITON", raising=False)
    return calls


def test_dispatch_auto_uses_triton_when_available(fake_kernels: list[str]) -> None:
    from gbsd_core.fast.kernels import geglu, group_norm_silu

    x = torch.randn(1, 8, 3, 3)
    assert torch.all(group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5) == math.pi)
    assert torch.all(geglu(torch.randn(2, 6)) == math.pi)
    assert fake_kernels == ["gn", "geglu"]


def test_dispatch_env_off_and_unsupported_take_reference(fake_kernels: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from gbsd_core.fast.kernels import geglu, geglu_reference, group_norm_silu, group_norm_silu_reference

    x, w, b = torch.randn(1, 8, 3, 3), torch.randn(8), torch.randn(8)
    ref = group_norm_silu_reference(x, w, b, 2, 1e-5, True)
    assert torch.equal(group_norm_silu(x, w, b, 2, 1e-5, True, use_triton=False), ref)
    assert torch.equal(group_norm_silu(x, None, None, 2, 1e-5), group_norm_silu_reference(x, None, None, 2, 1e-5))
    assert torch.equal(group_norm_silu(x.to(torch.float64), w, b, 2, 1e-5).float(),
                       group_norm_silu_reference(x.double(), w, b, 2, 1e-5).float())
    xg = x.clone().requires_grad_(True)                   # autograd needs the differentiable reference
    group_norm_silu(xg, w, b, 2, 1e-5, True).sum().backward()
    assert xg.grad is not None
    assert fake_kernels == []
    monkeypatch.setenv("GBSD_TRITON", "0")                # read per call, no restart needed
    assert torch.equal(group_norm_silu(x, w, b, 2, 1e-5, True), ref)
    y = torch.randn(2, 6)
    assert torch.equal(geglu(y), geglu_reference(y))
    assert fake_kernels == []
    monkeypatch.setenv("GBSD_TRITON", "1")
    geglu(y)
    assert fake_kernels == ["geglu"]


def test_dispatch_cpu_without_interpreter_takes_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from gbsd_core.fast.kernels import (
        geglu,
        geglu_reference,
        group_norm_silu,
        group_norm_silu_reference,
        triton_available,
    )

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("GBSD_TRITON", raising=False)
    assert not triton_available("cpu")
    x, w, b = torch.randn(1, 8, 3, 3), torch.randn(8), torch.randn(8)
    assert torch.equal(group_norm_silu(x, w, b, 2, 1e-5, True), group_norm_silu_reference(x, w, b, 2, 1e-5, True))
    y = torch.randn(2, 6)
    assert torch.equal(geglu(y), geglu_reference(y))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        group_norm_silu(x, w, b, 2, 1e-5, use_triton=True)


def test_import_and_cpu_calls_do_not_import_triton() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GBSD_TRITON")}
    code = ("import sys, torch, gbsd_core.fast.kernels as k\n"
            "x = torch.randn(1, 8, 3, 3)\n"
            "k.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5, True); k.geglu(torch.randn(2, 6))\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

"""The module swaps `accelerate` makes in the UNet and the VAE: same parameters (so the same state_dict keys), another
forward.

- `KernelGroupNorm`: GroupNorm without GroupNorm32's explicit fp32 round trip, for fp16/bf16 models.
- `FusedGroupNormSiLU` / `TritonGEGLU`: the Triton kernels of fast/kernels at ResBlock in_layers.0+1, out_layers.0+1,
  the UNet's out.0+1, and ff.net.0 (`FastOptions(triton=True)`).

The Triton modules are given their kernel when they are wired (`wire_triton`), so whether Triton runs is decided once,
by `accelerate`; forward never asks again (asking means importing triton, which torch.compile refuses to trace).
Under torch.compile they run plain PyTorch ops instead, and inductor fuses GroupNorm+SiLU and GEGLU itself.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import GEGLU, FeedForward
from ..norm import GroupNorm32
from ..unet_blocks import ResBlock


class KernelGroupNorm(GroupNorm32):
    """`GroupNorm32` without the explicit fp32 round trip, for fp16/bf16 models.

    PyTorch's group_norm kernels already accumulate mean and variance in fp32 for fp16/bf16 inputs (ATen's opmath /
    acc types, on CPU and CUDA; inductor's decomposition computes in fp32 too), so casting the whole activation to
    fp32 and back only adds two full copies: about 2.8x the memory traffic of a native half GroupNorm. The result
    equals GroupNorm32's up to the final rounding (tests/fast/test_apply.py checks it on a large-mean input).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _inference_kernel(x: Tensor) -> bool:
    """Whether a wired Triton module may run its kernel on x (not while torch.compile traces, no autograd)."""
    return not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)


class FusedGroupNormSiLU(GroupNorm32):
    """`GroupNorm32` followed by SiLU in one Triton kernel (fp32 statistics); same parameters, so same keys.

    Without a kernel (not wired, or under torch.compile) it is F.group_norm then F.silu, GroupNorm's statistics in
    fp32 as above."""

    kernel: Callable[..., Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is not None and _inference_kernel(x):
            return self.kernel(x, self.weight, self.bias, self.num_groups, self.eps, True)
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class TritonGEGLU(GEGLU):
    """`GEGLU` whose gating runs in the fused Triton kernel; the projection `proj` is the same Linear."""

    kernel: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is not None and _inference_kernel(x):
            return self.kernel(self.proj(x))
        return super().forward(x)


def swap_group_norms(model: nn.Module) -> None:
    """Every plain GroupNorm32 in `model` -> KernelGroupNorm sharing its parameters (UNet: the SpatialTransformer
    norms, and the ResBlocks' without Triton; VAE: all of them)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is GroupNorm32:
                with torch.device("meta"):
                    swapped = KernelGroupNorm(child.num_channels, eps=child.eps)
                swapped.weight, swapped.bias = child.weight, child.bias
                setattr(module, name, swapped)


def _fuse_norm_silu(seq: nn.Sequential, kernel: Callable[..., Tensor]) -> None:
    """seq[0] GroupNorm32, seq[1] SiLU -> seq[0] fused, seq[1] Identity (the slot is kept for the key indices)."""
    norm = seq[0]
    with torch.device("meta"):  # shell only: the parameters are the old module's own
        fused = FusedGroupNormSiLU(norm.num_channels, eps=norm.eps)
    fused.weight, fused.bias = norm.weight, norm.bias
    fused.kernel = kernel
    seq[0], seq[1] = fused, nn.Identity()


def wire_triton(unet: nn.Module) -> None:
    """Swap in the Triton kernels at every site they cover (module docstring). Imports triton: call it only where
    Triton can run (CUDA, or TRITON_INTERPRET=1 on CPU)."""
    from .kernels.triton_kernels import geglu_triton, group_norm_silu_triton

    for module in list(unet.modules()):
        if isinstance(module, ResBlock):
            _fuse_norm_silu(module.in_layers, group_norm_silu_triton)
            _fuse_norm_silu(module.out_layers, group_norm_silu_triton)
        elif isinstance(module, FeedForward):
            proj = module.net[0].proj
            with torch.device("meta"):
                fused = TritonGEGLU(proj.in_features, proj.out_features // 2)
            fused.proj = proj
            fused.kernel = geglu_triton
            module.net[0] = fused
    _fuse_norm_silu(unet.out, group_norm_silu_triton)

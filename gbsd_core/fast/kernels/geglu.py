"""Fused GEGLU for the transformer feed-forward: a Triton kernel, a plain-torch reference, and the dispatch.

CompVis ``ldm/modules/attention.py``::

    class GEGLU(nn.Module):                      # lives at ff.net.0, its Linear at ff.net.0.proj
        def forward(self, x):
            x, gate = self.proj(x).chunk(2, dim=-1)
            return x * F.gelu(gate)              # exact (erf) GELU, not the tanh approximation

This module fuses what follows the projection: unfused, PyTorch materialises ``gelu(gate)`` and then the product (read
2D, write D, read 2D, write D per row); fused it reads the 2D-wide projection once and writes D. The math runs in fp32
and the result is cast back to the input dtype, so fp16/bf16 models lose nothing to intermediate rounding.
"""
from __future__ import annotations

import math

import torch

from gbsd_core.fast.kernels.runtime import triton_available, triton_enabled_by_env

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    """hidden * gelu_erf(gate) where hidden, gate = x.chunk(2, -1); computed in fp32, returned in x's dtype.

    x: [..., 2D] -> [..., D]. GELU is written out as 0.5 g (1 + erf(g / sqrt 2)) so this stays independent of F.gelu.
    """
    hidden, gate = x.float().chunk(2, dim=-1)
    return (hidden * (0.5 * gate * (1.0 + torch.erf(gate * (1.0 / math.sqrt(2.0)))))).to(x.dtype)


def _triton_supported(x: torch.Tensor) -> bool:
    """Cases the kernel handles; everything else goes to the reference under automatic dispatch."""
    return (x.dim() >= 1 and x.numel() > 0 and x.shape[-1] % 2 == 0 and x.dtype in _SUPPORTED_DTYPES
            and not (torch.is_grad_enabled() and x.requires_grad))


def geglu(x: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """GEGLU activation of a projection output. x: [..., 2D] -> [..., D], same dtype.

    use_triton: None = automatic (Triton when ``triton_available(x.device)``, the dtype is fp16/bf16/fp32 and the last
    dim is even, unless the env var ``GBSD_TRITON=0``, read on every call); True = Triton or raise; False = reference.
    """
    if use_triton is None:
        use_triton = triton_enabled_by_env() and triton_available(x.device) and _triton_supported(x)
    if not use_triton:
        return geglu_reference(x)
    if not _triton_supported(x):
        raise ValueError(f"Triton geglu does not support x {tuple(x.shape)} {x.dtype} "
                         "(needs an even last dim, fp16/bf16/fp32, no autograd)")
    if not triton_available(x.device):
        raise RuntimeError(f"Triton cannot run on {x.device} (CUDA, or CPU with TRITON_INTERPRET=1, is needed)")
    # Imported here so that `import gbsd_core.fast.kernels` never imports triton.
    from gbsd_core.fast.kernels.triton_kernels import geglu_triton
    return geglu_triton(x)

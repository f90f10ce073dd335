"""Fused GroupNorm (+ optional SiLU) for the sampler: a Triton kernel, a plain-torch reference, and the dispatch.

Where it is used: every UNet ResBlock opens with ``in_layers = [GroupNorm32(32, C), SiLU, conv]`` and ends with
``out_layers = [GroupNorm32, SiLU, Dropout, conv]`` (CompVis ``ldm/modules/diffusionmodules/openaimodel.py``); the VAE's
ResnetBlocks do ``norm -> nonlinearity(swish)`` (``ldm/modules/diffusionmodules/model.py``), and SpatialTransformer /
VAE attention use the norm alone. Unfused, PyTorch reads the activation for the statistics, writes the normalized
tensor, reads it again for SiLU and writes it again; fused, it is two reads and one write of this memory-bound op.

Numerics (the reason for the fp32 rule): CompVis' ``GroupNorm32.forward`` runs
``super().forward(x.float()).type(x.dtype)``, i.e. statistics in fp32 even in an fp16 model. Both paths here
accumulate mean and variance in fp32 whatever the input dtype (fp16 / bf16 / fp32) and return the input dtype.
eps is 1e-5 in UNet ResBlocks and 1e-6 in the VAE and the SpatialTransformer norms (norm.py); the
caller passes it.

Layouts: the Triton path reads NCHW-contiguous and channels_last-contiguous inputs in place and returns the same memory
format; any other strides are first copied with ``.contiguous()``. The reference always returns NCHW-contiguous.
Autograd: the Triton path is inference-only; automatic dispatch uses the (differentiable) reference when grad is needed.
"""
from __future__ import annotations

import torch

from gbsd_core.fast.kernels.runtime import triton_available, triton_enabled_by_env

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                              groups: int, eps: float, silu: bool = False) -> torch.Tensor:
    """Plain-torch GroupNorm(+SiLU) with fp32 statistics; output in x's dtype. x: [B, C, *spatial]."""
    b, c = x.shape[:2]
    xf = x.float().reshape(b, groups, -1)                               # [B, G, C/G * H*W]
    mean = xf.mean(dim=-1, keepdim=True)
    var = xf.var(dim=-1, unbiased=False, keepdim=True)                  # biased, as torch.nn.GroupNorm
    y = ((xf - mean) * torch.rsqrt(var + eps)).reshape(b, c, -1)        # [B, C, H*W]
    if weight is not None:
        y = y * weight.float()[None, :, None]
    if bias is not None:
        y = y + bias.float()[None, :, None]
    if silu:
        y = y * torch.sigmoid(y)
    return y.reshape(x.shape).to(x.dtype)


def _triton_supported(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int) -> bool:
    """Cases the kernel handles; everything else goes to the reference under automatic dispatch."""
    return (x.dim() == 4 and x.numel() > 0 and x.dtype in _SUPPORTED_DTYPES
            and groups > 0 and x.shape[1] % groups == 0
            and weight is not None and bias is not None
            and weight.shape == (x.shape[1],) and bias.shape == (x.shape[1],)
            and weight.device == x.device and bias.device == x.device
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)))


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, silu: bool = False, use_triton: bool | None = None) -> torch.Tensor:
    """GroupNorm over ``groups`` groups, affine, then SiLU if ``silu``. x: [B, C, H, W] -> same shape and dtype.

    use_triton: None = automatic (Triton when ``triton_available(x.device)``, the dtype is fp16/bf16/fp32 and the case
    is supported, unless the env var ``GBSD_TRITON=0``, read on every call); True = Triton or raise; False = reference.
    """
    if use_triton is None:
        use_triton = (triton_enabled_by_env() and triton_available(x.device)
                      and _triton_supported(x, weight, bias, groups))
    if not use_triton:
        return group_norm_silu_reference(x, weight, bias, groups, eps, silu)
    if not _triton_supported(x, weight, bias, groups):
        raise ValueError(f"Triton group_norm_silu does not support x {tuple(x.shape)} {x.dtype} on {x.device} "
                         f"with groups={groups}, affine weight and bias of shape [C] (and no autograd)")
    if not triton_available(x.device):
        raise RuntimeError(f"Triton cannot run on {x.device} (CUDA, or CPU with TRITON_INTERPRET=1, is needed)")
    # Imported here so that `import gbsd_core.fast.kernels` never imports triton.
    from gbsd_core.fast.kernels.triton_kernels import group_norm_silu_triton
    return group_norm_silu_triton(x, weight, bias, groups, eps, silu)

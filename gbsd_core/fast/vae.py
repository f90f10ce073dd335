"""The VAE side of `accelerate`: its dtype, a decode and an encode that upcast themselves on fp16 overflow, native half
GroupNorm, and attention tokens SDPA's fused kernels accept.

- `UpcastingAutoencoderKL`: an fp16/bf16 VAE that redoes a decode or an encode in fp32 when it overflows
  (diffusers' `upcast_vae`).
- GroupNorm: in fp16/bf16 every GroupNorm32 becomes a `KernelGroupNorm` (fast/modules.py): statistics still in fp32,
  without the two full fp32 copies of each activation the core's explicit round trip costs.
- `FastAttnBlock`: the mid-block attention with contiguous [B, 1, H·W, C] tokens. The core's tokens are a transposed
  view of the conv output, so their last dimension has stride H·W; PyTorch's memory-efficient and flash kernels need
  a unit last stride, so SDPA fell back to its math kernel, which materialises the [H·W, H·W] scores (4096² = 16.8M
  entries per image at 512²). One copy of q, k, v each is far cheaper. (Flash also caps the head dim at
  256 and the VAE's is 512, so it is the memory-efficient kernel that takes over on CUDA.)
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vae import AttnBlock, AutoencoderKL, DiagonalGaussian
from .modules import swap_group_norms


class UpcastingAutoencoderKL(AutoencoderKL):
    """An fp16/bf16 VAE that switches itself to fp32 when a decode or an encode overflows (what diffusers' `upcast_vae`
    does).

    The SD decoder's activations can exceed fp16's range (65504) and come out inf/NaN, and so can the encoder's on
    some images (img2img). The check costs one reduction and a device sync per call, nothing next to the network.
    """

    def decode(self, z: Tensor) -> Tensor:
        x = super().decode(z)
        if self._overflowed("decode", x):
            x = super().decode(z)
        return x

    def encode(self, x: Tensor) -> DiagonalGaussian:
        posterior = super().encode(x)
        # The log-variance is clamped to [-30, 20] (an overflow to ±inf lands where fp32 would clamp it too), so a
        # NaN there and a non-finite mean are what an overflow leaves.
        if self._overflowed("encode", posterior.mean, posterior.logvar):
            posterior = super().encode(x)
        return posterior

    def _overflowed(self, what: str, *outputs: Tensor) -> bool:
        """Whether a half-precision call's outputs are not all finite; if so, warn and upcast the VAE to fp32."""
        if self.dtype not in (torch.float16, torch.bfloat16) or all(bool(torch.isfinite(t).all()) for t in outputs):
            return False
        warnings.warn(f"VAE {what} overflowed in {self.dtype}; the VAE is upcast to float32 from now on")
        self.float()
        return True


class FastAttnBlock(AttnBlock):
    """`AttnBlock` handing SDPA contiguous tokens (module docstring); same modules, same keys, same result."""

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C, H, W]; attention over the H*W tokens, one head of width C, scale C**-0.5.
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, H*W, C], unit stride along C
            return t.reshape(b, c, h * w).transpose(1, 2).contiguous().unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


def accelerate_vae(vae: AutoencoderKL, dtype: torch.dtype) -> None:
    """The VAE in `dtype` (fp32: plain; fp16/bf16: upcasting decode, native half GroupNorm); fast attention always."""
    vae.to(dtype)
    for m in vae.modules():
        if type(m) is AttnBlock:
            m.__class__ = FastAttnBlock  # same submodules; only forward differs
    if dtype != torch.float32:
        swap_group_norms(vae)
        vae.__class__ = UpcastingAutoencoderKL  # same modules and parameters, one more check in decode

"""Transformer pieces of the SD UNet: CrossAttention, GEGLU feed-forward, BasicTransformerBlock, SpatialTransformer.

Mirrors `ldm/modules/attention.py` of CompVis/stable-diffusion (SD1) and Stability-AI/stablediffusion (SD2), so
module names equal the checkpoint keys under e.g. `model.diffusion_model.input_blocks.1.1.`:

    norm, proj_in, transformer_blocks.N.{norm1, attn1, norm2, attn2, norm3, ff.net.0.proj, ff.net.2}, proj_out
    attn1/attn2: to_q, to_k, to_v (no bias), to_out.0 (Linear with bias; to_out.1 is a Dropout slot)

The VAE's single-head 1x1-conv attention is a different module and lives with the VAE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import GroupNorm32


class CrossAttention(nn.Module):
    """Multi-head attention of `query` over `context` (itself when context is None: self-attention `attn1`).

    softmax(Q Kᵀ / √d) V with `F.scaled_dot_product_attention` (PyTorch picks a fused kernel where one applies).

    `upcast`: compute attention in fp32 and cast back. Stability's SD2 code does this for q·k and the softmax by default
    (`_ATTN_PRECISION = "fp32"`); the SD2 768-v model overflows fp16 without it.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, upcast: bool = False) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # Index 1 is the reference's Dropout slot (kept so `to_out.0` keeps its index).
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, heads*dim_head] -> [B, heads, N, dim_head]; the reference's 'b n (h d) -> (b h) n d' (heads outer)."""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, heads, N, dim_head] -> [B, N, heads*dim_head], the inverse of split_heads."""
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, Nq, query_dim]; context: [B, Nk, context_dim] or None -> [B, Nq, query_dim]
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))  # [B, heads, Nq, d]
        k = self.split_heads(self.to_k(context))  # [B, heads, Nk, d]
        v = self.split_heads(self.to_v(context))
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, heads, Nq, d]
        return self.to_out(self.merge_heads(out).to(dtype))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): one Linear to 2*dim_out, value half times GELU(gate half)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # reference order: value first, gate second
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """`ff.net = [GEGLU(dim, 4*dim), Dropout, Linear(4*dim, dim)]` (reference FeedForward with glu=True, mult=4)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text context, GEGLU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        # nn.LayerNorm defaults (eps 1e-5), as the reference.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, N, dim]; context: [B, 77, context_dim]
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last if a 4-d tensor is laid out that way (and not also plain contiguous), else contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class SpatialTransformer(nn.Module):
    """Transformer over the h*w positions of a feature map, with a residual around the whole thing.

    SD1 projects in/out with 1x1 convs (applied on the map); SD2 (`use_linear`) with Linear layers (applied on the
    token sequence): Stability's `use_linear_in_transformer`. Both are the same map; only the weight shapes differ.
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(in_channels, eps=1e-6)  # reference `Normalize`: GroupNorm(32, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, C, h, w] -> tokens [B, h*w, inner] -> [B, C, h, w]
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # Back to the input's memory layout. The transposed view would be channels-last strided, and every conv after
        # it (proj_out, the next ResBlock's) would then run channels-last and re-lay its weights out on each call:
        # measured ~1 s of weight copies per SD1.5 UNet call on CPU. (Channels-last models stay channels-last.)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=_memory_format(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in

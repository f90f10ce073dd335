"""Transformer pieces of the SD UNet: CrossAttention, GEGLU feed-forward, BasicTransformerBlock, SpatialTransformer.

Mirrors `ldm/modules/attention.py` of CompVis/stable-diffusion (SD1) and Stability-AI/stablediffusion (SD2), so
module names equal the checkpoint keys under e.g. `model.diffusion_model.input_blocks.1.1.`:

    norm, proj_in, transformer_blocks.N.{norm1, attn1, norm2, attn2, norm3, ff.net.0.proj, ff.net.2}, proj_out
    attn1/attn2: to_q, to_k, to_v (no bias), to_out.0 (Linear with bias; to_out.1 is a Dropout slot)

The VAE's single-head 1x1-conv attention is a different module and lives with the VAE.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# probs_hook(module, probs): probs is [B, heads, Nq, Nk], softmax over the last axis (keys).
ProbsHook = Callable[["CrossAttention", torch.Tensor], None]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups whose statistics are always computed in fp32.

    CompVis `GroupNorm32` casts the input to fp32 (`super().forward(x.float()).type(x.dtype)`); we also cast the affine
    parameters, so a model converted wholesale with `.half()` still normalizes in fp32 (under autocast, which the
    reference runs fp16 with, group_norm runs in fp32 too). eps: 1e-5 in ResBlocks, 1e-6 in SpatialTransformer.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(32, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of `query` over `context` (itself when context is None: self-attention `attn1`).

    Computed with `F.scaled_dot_product_attention` (fused kernels where available). When `probs_hook` is set, the
    attention is computed explicitly as softmax(Q K^T * scale) V instead, and the hook receives the probabilities
    [B, heads, Nq, Nk]; with no hook there is no extra work (one attribute check).

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
        self.probs_hook: ProbsHook | None = None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # Index 1 is the reference's Dropout slot (kept so `to_out.0` keeps its index).
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))
        # Inference fast paths (gbsd_core/fast.py switches them on; all off by default, none is in the state dict):
        self.explicit_softmax = False  # attention as softmax(QK^T·scale)V in plain ops instead of SDPA
        self.register_buffer("qkv_weight", None, persistent=False)  # self-attention q|k|v stacked, see fuse_qkv()
        self.qkv_linear = F.linear  # the stacked matmul; prepack.py swaps in a prepacked one for CPU
        # cross-attention: (context, K, V) with K, V [B, heads, Nk, dim_head] precomputed by set_context_kv()
        self.context_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # [B, N, heads*dim_head] -> [B, heads, N, dim_head]; the reference's 'b n (h d) -> (b h) n d' (heads outer).
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, Nq, query_dim]; context: [B, Nk, context_dim] or None -> [B, Nq, query_dim]
        if self.context_kv is not None:
            k, v = self._cached_kv(context)
            q = self._split_heads(self.to_q(x))
        elif context is None and self.qkv_weight is not None:
            b, n, _ = x.shape
            # one [B, N, 3*inner] matmul, split as (q|k|v, heads, dim_head) -> 3 x [B, heads, N, dim_head] views
            qkv = self.qkv_linear(x, self.qkv_weight)
            q, k, v = qkv.view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        else:
            context = x if context is None else context
            q = self._split_heads(self.to_q(x))
            k = self._split_heads(self.to_k(context))
            v = self._split_heads(self.to_v(context))
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        if self.probs_hook is None and not self.explicit_softmax:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            probs = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)  # [B, heads, Nq, Nk]
            if self.probs_hook is not None:
                self.probs_hook(self, probs)
            out = probs @ v
        b, _, nq, _ = out.shape
        out = out.transpose(1, 2).reshape(b, nq, self.heads * self.dim_head).to(dtype)
        return self.to_out(out)

    # ------------------------------------------------------------------ inference fast paths (fast.py)
    def fuse_qkv(self) -> None:
        """Self-attention only: compute q, k, v with one matmul against the stacked weight [3*inner, query_dim].

        Costs no memory: the stacked weight is a non-persistent buffer and to_q/to_k/to_v.weight become Parameters
        that are *views* into it, so state_dict() still yields the checkpoint's three keys, and load_state_dict()
        (which copies into the parameters in place) updates the stacked weight too. Moving or casting the module
        afterwards (.to()) gives the views their own storage; a load hook re-stacks on the next load_state_dict, but
        do such moves before fusing (fast.accelerate does). Irreversible by design; inference only.
        """
        if self.to_k.in_features != self.to_q.in_features:
            raise ValueError("fuse_qkv is for self-attention (attn1); cross-attention K/V come from the context")
        if self.qkv_weight is None:
            self.register_load_state_dict_post_hook(lambda module, _keys: module._stack_qkv())
        self._stack_qkv()

    def _stack_qkv(self) -> None:
        with torch.no_grad():
            stacked = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # [3*inner, query_dim]
        self.qkv_weight = stacked  # a non-persistent buffer (registered in __init__): moves with .to(), no key
        for i, lin in enumerate((self.to_q, self.to_k, self.to_v)):
            lin.weight = nn.Parameter(stacked[i * lin.out_features:(i + 1) * lin.out_features], requires_grad=False)

    @torch.no_grad()
    def set_context_kv(self, context: torch.Tensor | None) -> None:
        """Cross-attention only: precompute K and V of `context` [B, Nk, context_dim] (None: drop them).

        The text context is fixed for a whole GBSD stage, so its K/V projections need not be recomputed every step.
        While set, forward() must be called with this very tensor (checked in eager mode) and uses the cached K/V.
        When the new K/V have the old shapes they are written in place, so a captured CUDA graph that reads them
        sees the new stage's values (the stage switch is then a copy, not a re-capture).
        """
        if context is None:
            self.context_kv = None
            return
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        old = self.context_kv
        if old is not None and old[1].shape == k.shape and old[1].dtype == k.dtype and old[1].device == k.device:
            old[1].copy_(k)
            old[2].copy_(v)
            self.context_kv = (context, old[1], old[2])
        else:
            self.context_kv = (context, k.contiguous(), v.contiguous())

    def _cached_kv(self, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        source, k, v = self.context_kv  # type: ignore[misc]
        # A stale cache would silently condition on the previous stage's prompt; refuse instead. (Identity is what
        # counts: the cache is set once per stage with the stage's context tensor. Skipped while torch.compile
        # traces, where the check would only add guards.)
        if not torch.compiler.is_compiling() and context is not source:
            raise RuntimeError("cross-attention K/V are cached for another context tensor; call "
                               "set_context_kv(context) (UNetModel.set_context_kv) when the context changes")
        return k, v


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

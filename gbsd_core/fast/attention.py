"""`FastCrossAttention`: the core `CrossAttention` with three inference shortcuts, swapped in by `accelerate`.

- **fused QKV** (self-attention `attn1`): q, k, v from one matmul against the stacked weight [3·inner, dim], whose
  slices *are* to_q/to_k/to_v.weight, so state_dict() keys and memory are unchanged (`fuse_qkv`).
- **cached K/V** (cross-attention `attn2`): the text context is fixed for a whole GBSD stage, so its K and V
  projections are computed once per stage (`set_context_kv`), not once per step.
- **explicit softmax**: softmax(QKᵀ·scale)V in plain ops instead of SDPA (`FastOptions(attention="math")`).

Precision (`upcast`, on for SD2-768-v in fp16): only the explicit softmax computes in fp32. Every SDPA kernel already
accumulates q·kᵀ and the softmax in fp32 for fp16/bf16 inputs (flash and memory-efficient attention in their tiles;
PyTorch's math kernel too, unless `torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)`; the CPU kernels
use fp32 accumulators), so they get q/k/v in the model's dtype: casting them up would only cost memory traffic, and
CUDA's flash kernel has no fp32 implementation at all (a forced "flash" would fail). diffusers' SDPA processor
(AttnProcessor2_0) likewise ignores `upcast_attention`. tests/fast/test_attention.py checks both paths on logits past
fp16's range.

With none of the shortcuts switched on, forward computes what the core's does. The swap keeps every parameter (the Linear modules themselves
move over), so `state_dict()` and `load_state_dict()` see the checkpoint's keys as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import CrossAttention
from ..attention_sites import attention_sites
from ..unet import UNetModel


class FastCrossAttention(CrossAttention):
    """`CrossAttention` plus fused QKV, a per-stage K/V cache and an explicit-softmax switch (module docstring)."""

    explicit_softmax: bool
    qkv_weight: Tensor | None
    context_kv: tuple[Tensor, Tensor, Tensor] | None

    @classmethod
    def from_plain(cls, plain: CrossAttention) -> FastCrossAttention:
        """A FastCrossAttention that shares `plain`'s projections (built on meta: no new parameters)."""
        with torch.device("meta"):
            fast = cls(plain.to_q.in_features, plain.to_k.in_features, plain.heads, plain.dim_head, plain.upcast)
        fast.to_q, fast.to_k, fast.to_v, fast.to_out = plain.to_q, plain.to_k, plain.to_v, plain.to_out
        return fast

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, upcast: bool = False) -> None:
        super().__init__(query_dim, context_dim, heads, dim_head, upcast)
        self.explicit_softmax = False
        self.register_buffer("qkv_weight", None, persistent=False)  # see fuse_qkv(); moves with .to(), no key
        self.qkv_linear = F.linear  # the stacked matmul; prepack.py swaps in a prepacked one on CPU
        # cross-attention: (context, K, V) with K, V [B, heads, Nk, dim_head] precomputed by set_context_kv()
        self.context_kv = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        # x: [B, Nq, query_dim]; context: [B, Nk, context_dim] or None -> [B, Nq, query_dim]
        if self.context_kv is not None:
            k, v = self._cached_kv(context)
            q = self.split_heads(self.to_q(x))
        elif context is None and self.qkv_weight is not None:
            b, n, _ = x.shape
            # one [B, N, 3*inner] matmul, split as (q|k|v, heads, dim_head) -> 3 x [B, heads, N, dim_head] views
            qkv = self.qkv_linear(x, self.qkv_weight)
            q, k, v = qkv.view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        else:
            context = x if context is None else context
            q, k, v = (self.split_heads(proj(t)) for proj, t in ((self.to_q, x), (self.to_k, context),
                                                                 (self.to_v, context)))
        return self.to_out(self.merge_heads(self.attend(q, k, v)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q kᵀ · scale) v in q's dtype. q: [B, heads, Nq, d]; k, v: [B, heads, Nk, d] -> [B, heads, Nq, d].

        The fp32 upcast applies to the explicit softmax only (module docstring): SDPA accumulates in fp32 itself.
        """
        if not self.explicit_softmax:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        return ((q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1) @ v).to(dtype)

    # ------------------------------------------------------------------ fused QKV
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
        self.qkv_weight = stacked
        for i, lin in enumerate((self.to_q, self.to_k, self.to_v)):
            lin.weight = nn.Parameter(stacked[i * lin.out_features:(i + 1) * lin.out_features], requires_grad=False)

    # ------------------------------------------------------------------ cached cross-attention K/V
    @torch.no_grad()
    def set_context_kv(self, context: Tensor | None) -> None:
        """Cross-attention only: precompute K and V of `context` [B, Nk, context_dim] (None: drop them).

        While set, forward() must be called with this very tensor (checked in eager mode) and uses the cached K/V.
        When the new K/V have the old shapes they are written in place, so a captured CUDA graph that reads them
        sees the new stage's values (the stage switch is then a copy, not a re-capture).
        """
        if context is None:
            self.context_kv = None
            return
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        old = self.context_kv
        if old is not None and old[1].shape == k.shape and old[1].dtype == k.dtype and old[1].device == k.device:
            old[1].copy_(k)
            old[2].copy_(v)
            self.context_kv = (context, old[1], old[2])
        else:
            self.context_kv = (context, k.contiguous(), v.contiguous())

    def _cached_kv(self, context: Tensor | None) -> tuple[Tensor, Tensor]:
        source, k, v = self.context_kv  # type: ignore[misc]
        # A stale cache would silently condition on the previous stage's prompt; refuse instead. (Identity is what
        # counts: the cache is set once per stage with the stage's context tensor. Skipped while torch.compile
        # traces, where the check would only add guards.)
        if not torch.compiler.is_compiling() and context is not source:
            raise RuntimeError("cross-attention K/V are cached for another context tensor; call "
                               "set_context_kv(unet, context) when the context changes")
        return k, v


def swap_attention(unet: UNetModel) -> list[FastCrossAttention]:
    """Replace every CrossAttention of `unet` by a FastCrossAttention sharing its parameters; returns them all."""
    for site in [*attention_sites(unet, cross=False), *attention_sites(unet, cross=True)]:
        if not isinstance(site.module, FastCrossAttention):
            parent, name = site.name.rsplit(".", 1)
            setattr(unet.get_submodule(parent), name, FastCrossAttention.from_plain(site.module))
    return [m for m in unet.modules() if isinstance(m, FastCrossAttention)]


def set_context_kv(unet: UNetModel, context: Tensor | None) -> None:
    """Precompute every cross-attention's K/V for `context` [B, 77, D] (None drops them); see
    `FastCrossAttention.set_context_kv`. Call it at every context change, i.e. once per GBSD stage, and pass the same
    tensor to forward()."""
    dtype = unet.out[2].weight.dtype
    if context is not None and context.dtype != dtype:
        # forward() would cast it to a new tensor, which the caches (keyed by tensor identity) would not accept
        raise ValueError(f"pass the context in the UNet's dtype {dtype}, got {context.dtype}")
    for site in attention_sites(unet):
        if not isinstance(site.module, FastCrossAttention):
            raise TypeError(f"{site.name} is a plain CrossAttention; gbsd_core.fast.accelerate the UNet first")
        site.module.set_context_kv(context)

"""The Triton kernels and their launchers. Imported lazily (on the first Triton call), because importing triton is slow
and optional; the public, dispatching entry points are in ``groupnorm_silu.py`` and ``geglu.py``.

Triton decides at *definition* time whether ``@triton.jit`` kernels run compiled (CUDA) or in its numpy interpreter
(env ``TRITON_INTERPRET=1``, how CPU-only CI exercises them), so that variable must be set before this module is
imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1/sqrt(2) for the exact GELU, 0.5 g (1 + erf(g / sqrt 2)); kernels may only read constexpr globals.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _group_norm_silu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, HW, CPG, GROUPS, eps,
                            CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """One program normalizes one (batch, group): CPG channels x HW pixels, walked in BLOCK-wide chunks.

    Element i of the group (0 <= i < CPG*HW) is, in NCHW, channel i // HW of the group at flat offset base + i (the
    group is one contiguous run); in channels_last, pixel i // CPG and channel i % CPG at base + pixel*C + channel.
    """
    pid = tl.program_id(0)
    n = pid // GROUPS
    g = pid % GROUPS
    group_numel = CPG * HW
    # int64 base: B*C*H*W can pass 2**31 (e.g. a VAE decode of a batch at 1024^2).
    if CHANNELS_LAST:
        base = n.to(tl.int64) * C * HW + g * CPG
    else:
        base = (n.to(tl.int64) * C + g * CPG) * HW
    lanes = tl.arange(0, BLOCK)

    # Pass 1: statistics in fp32 with Welford's update per lane (stable when |mean| >> std, unlike sum and
    # sum-of-squares), then the lanes' (count, mean, M2) are merged with Chan et al.'s pairwise formula.
    cnt = tl.zeros([BLOCK], dtype=tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, group_numel, BLOCK):
        i = start + lanes
        mask = i < group_numel
        if CHANNELS_LAST:
            pix = i // CPG
            off = pix * C + (i - pix * CPG)
        else:
            off = i
        x = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
        cnt_new = cnt + mask.to(tl.float32)
        delta = x - mean
        mean = mean + tl.where(mask, delta / tl.maximum(cnt_new, 1.0), 0.0)
        m2 = m2 + tl.where(mask, delta * (x - mean), 0.0)
        cnt = cnt_new
    total = tl.sum(cnt, axis=0)
    g_mean = tl.sum(cnt * mean, axis=0) / total
    spread = mean - g_mean
    g_var = tl.sum(m2 + cnt * spread * spread, axis=0) / total      # biased variance, as torch.nn.GroupNorm
    rstd = tl.math.rsqrt(g_var + eps)

    # Pass 2: normalize, per-channel affine, optional SiLU, store in the output dtype (same layout as the input).
    for start in range(0, group_numel, BLOCK):
        i = start + lanes
        mask = i < group_numel
        if CHANNELS_LAST:
            pix = i // CPG
            c_in_group = i - pix * CPG
            off = pix * C + c_in_group
        else:
            c_in_group = i // HW
            off = i
        ch = g * CPG + c_in_group
        x = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        y = (x - g_mean) * rstd * w + b
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + base + off, y.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                           silu: bool, block: int | None = None) -> torch.Tensor:
    """Launch the fused GroupNorm(+SiLU). x: [B, C, H, W] NCHW- or channels_last-contiguous (else copied) -> same.

    ``block`` (a power of two) overrides the chunk width; tests use a small one to exercise the loop and its tail.
    """
    bsz, c, h, w = x.shape
    if x.is_contiguous():
        channels_last = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        x = x.contiguous()
        channels_last = False
    y = torch.empty_like(x)                     # preserve_format: same strides as the (dense) input
    cpg = c // groups
    group_numel = cpg * h * w
    if block is None:
        block = min(triton.next_power_of_2(group_numel), 2048)
    # One program per (batch, group): B*G programs (64 for SD's CFG batch). That under-fills a big GPU, but at SD sizes
    # a group is <= 40 x 64 x 64 elements and the second pass re-reads it from L2.
    _group_norm_silu_kernel[(bsz * groups,)](
        x, weight.contiguous(), bias.contiguous(), y, c, h * w, cpg, groups, float(eps),
        CHANNELS_LAST=channels_last, SILU=bool(silu), BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return y


@triton.jit
def _geglu_kernel(x_ptr, y_ptr, D, stride_row, BLOCK: tl.constexpr):
    """Program (row, j) writes y[row, j*BLOCK : (j+1)*BLOCK] = hidden * gelu(gate).

    hidden = x[row, :D], gate = x[row, D:] (CompVis' ``chunk(2, dim=-1)`` order).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    x_row = x_ptr + row * stride_row
    hidden = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_row + D + cols, mask=mask, other=0.0).to(tl.float32)
    y = hidden * (0.5 * gate * (1.0 + tl.math.erf(gate * _INV_SQRT2)))
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def geglu_triton(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Launch the fused GEGLU. x: [..., 2D] -> [..., D] (contiguous). ``block``: power-of-two column chunk (tests)."""
    two_d = x.shape[-1]
    d = two_d // 2
    rows = x.reshape(-1, two_d)                 # [M, 2D]; a view when possible, rows may be strided
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty((rows.shape[0], d), dtype=x.dtype, device=x.device)
    if block is None:
        block = min(triton.next_power_of_2(d), 1024)
    # Rows on grid axis 0 (limit 2**31 - 1); column chunks on axis 1 (limit 65535, ample for D <= 64M).
    _geglu_kernel[(rows.shape[0], triton.cdiv(d, block))](rows, y, d, rows.stride(0), BLOCK=block,
                                                          num_warps=4 if block >= 512 else 2)
    return y.reshape(*x.shape[:-1], d)

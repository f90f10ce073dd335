"""The Triton kernels and their launchers. Imported lazily (on the first Triton call), because importing triton is slow
and optional; the public, dispatching entry points are in ``groupnorm_silu.py`` and ``geglu.py``.

Triton decides at *definition* time whether ``@triton.jit`` kernels run compiled (CUDA) or in its numpy interpreter
(env ``TRITON_INTERPRET=1``, how CPU-only CI exercises them), so that variable must be set before this module is
imported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# 1/sqrt(2) for the exact GELU, 0.5 g (1 + erf(g / sqrt 2)); kernels may only read constexpr globals.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)


# ------------------------------------------------------------------------------------------------ GroupNorm (+SiLU)
# Three launches, the first and last on a full grid (why: kernels/__init__.py):
#   1. stats     partial (count, mean, M2) of one tile of one image's channel(s): a plane chunk (NCHW) or a
#                pixels x channels tile (channels-last, rows of contiguous channels)  -> [B, C, SPLITS] each
#   2. finalize  one program per (image, group) merges its C/G x SPLITS partials (Chan et al.'s pairwise formula) and
#                folds mean, rstd and the affine into a per-channel scale a = rstd·w and shift b = bias − mean·a
#   3. apply     y = x·a + b (+ SiLU), one multiply-add per element, the layout's natural tiles; no division
# ATen's own GroupNorm kernels use the same fused form for the apply (ComputeFusedParams); its statistics pass runs
# one block per (image, group).


@triton.jit
def _gn_stats_nchw_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, HW, SPLITS, BLOCK: tl.constexpr):
    """Program (row, s), row = n*C + c: statistics of x[n, c].flatten()[s*BLOCK : (s+1)*BLOCK] (contiguous)."""
    row = tl.program_id(0).to(tl.int64)  # int64: B*C*H*W can pass 2**31 (a VAE decode of a batch at 1024^2)
    s = tl.program_id(1)
    offs = s * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    x = tl.load(x_ptr + row * HW + offs, mask=mask, other=0.0).to(tl.float32)
    cnt = tl.sum(mask.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / cnt
    d = tl.where(mask, x - mean, 0.0)  # deviations from the tile's own mean: stable when |mean| >> std
    out = row * SPLITS + s
    tl.store(cnt_ptr + out, cnt)
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, tl.sum(d * d, axis=0))


@triton.jit
def _gn_stats_cl_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, C, HW, SPLITS,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (s, n, cb): per-channel statistics of pixels [s*BLOCK_P, ...) x channels [cb*BLOCK_C, ...) of image n.

    Channels-last: pixel p, channel c of image n sit at (n*HW + p)*C + c, so each tile row is contiguous.
    """
    s = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cb = tl.program_id(2)
    p = s * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask, cmask = p < HW, c < C
    mask = pmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + (n * HW + p[:, None]) * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    cnt = tl.sum(pmask.to(tl.float32), axis=0)  # pixels in this tile (the same for every channel)
    mean = tl.sum(x, axis=0) / cnt  # [BLOCK_C]
    d = tl.where(mask, x - mean[None, :], 0.0)
    out = (n * C + c) * SPLITS + s
    tl.store(cnt_ptr + out, tl.zeros([BLOCK_C], dtype=tl.float32) + cnt, mask=cmask)
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, tl.sum(d * d, axis=0), mask=cmask)


@triton.jit
def _gn_finalize_kernel(cnt_ptr, mean_ptr, m2_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, CPG, GROUPS, SPLITS, eps,
                        BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program n*GROUPS + g: merge the group's partials (its CPG channels' [SPLITS] rows are one contiguous run),
    then write the per-channel scale and shift of the apply pass."""
    pid = tl.program_id(0)
    n = pid // GROUPS
    g = pid % GROUPS
    base = (n.to(tl.int64) * C + g * CPG) * SPLITS
    total = CPG * SPLITS
    lanes = tl.arange(0, BLOCK)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, total, BLOCK):
        i = start + lanes
        m = i < total
        cn = tl.load(cnt_ptr + base + i, mask=m, other=0.0)
        acc_n += cn
        acc_s += cn * tl.load(mean_ptr + base + i, mask=m, other=0.0)
    count = tl.sum(acc_n, axis=0)
    g_mean = tl.sum(acc_s, axis=0) / count
    # Chan et al.: M2 of the union = sum of the parts' M2 + n_i (mean_i - mean)^2
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, total, BLOCK):
        i = start + lanes
        m = i < total
        dlt = tl.load(mean_ptr + base + i, mask=m, other=0.0) - g_mean
        acc += tl.load(m2_ptr + base + i, mask=m, other=0.0) + tl.load(cnt_ptr + base + i, mask=m, other=0.0) * dlt * dlt
    rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / count + eps)  # biased variance, as torch.nn.GroupNorm
    cs = tl.arange(0, BLOCK_C)
    cm = cs < CPG
    ch = g * CPG + cs
    a = tl.load(w_ptr + ch, mask=cm, other=0.0).to(tl.float32) * rstd
    b = tl.load(b_ptr + ch, mask=cm, other=0.0).to(tl.float32) - g_mean * a
    tl.store(scale_ptr + n * C + ch, a, mask=cm)
    tl.store(shift_ptr + n * C + ch, b, mask=cm)


@triton.jit
def _gn_apply_nchw_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, HW, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, j), row = n*C + c: y = x·a + b (+ SiLU) over x[n, c].flatten()[j*BLOCK : (j+1)*BLOCK]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    a = tl.load(scale_ptr + row)
    b = tl.load(shift_ptr + row)
    x = tl.load(x_ptr + row * HW + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * a + b
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + row * HW + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_apply_cl_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, C, HW, SILU: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (s, n, cb): y = x·a + b (+ SiLU) on the channels-last tile of _gn_stats_cl_kernel."""
    s = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cb = tl.program_id(2)
    p = s * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (p < HW)[:, None] & cmask[None, :]
    a = tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0)
    b = tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0)
    offs = (n * HW + p[:, None]) * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * a[None, :] + b[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GroupNormPlan:
    """Launch geometry of one group_norm_silu_triton call (tests check that the big launches fill the GPU)."""

    channels_last: bool
    splits: int  # tiles per (image, channel) plane: the partials per channel
    block: int  # NCHW: elements per tile; channels-last: pixels per tile
    block_c: int  # channels-last: channels per tile (1 for NCHW)
    stats_grid: tuple[int, ...]
    finalize_grid: tuple[int]
    apply_grid: tuple[int, ...]
    num_warps: int


TILE = 4096  # most elements per stats/apply program: 8 KB of fp16, 16 per thread at 8 warps
MIN_TILE = 256


def plan_group_norm(shape: tuple[int, int, int, int], groups: int, channels_last: bool,
                    block: int | None = None) -> GroupNormPlan:
    """The grids for x of `shape` [B, C, H, W]. `block` (a power of two) overrides the tile (tests: several tiles).

    Tiles shrink with the tensor (numel / 1024, within [256, 4096] elements), so even the UNet's 8x8 levels launch
    hundreds of programs: about a thousand for every SD-sized activation, against B·G = 64 of a program per group.
    """
    bsz, c, h, w = shape
    hw = h * w
    tile = min(TILE, max(MIN_TILE, triton.next_power_of_2(max(bsz * c * hw // 1024, 1))))
    if channels_last:
        block_c = min(triton.next_power_of_2(c), 64)
        block = block or max(tile // block_c, 1)
        splits = triton.cdiv(hw, block)
        grid = (splits, bsz, triton.cdiv(c, block_c))
    else:
        block_c = 1
        block = block or min(triton.next_power_of_2(hw), tile)
        splits = triton.cdiv(hw, block)
        grid = (bsz * c, splits)
    return GroupNormPlan(channels_last, splits, block, block_c, grid, (bsz * groups,), grid,
                         num_warps=8 if block * block_c >= 2048 else 4)


def group_norm_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                           silu: bool, block: int | None = None) -> torch.Tensor:
    """Fused GroupNorm(+SiLU). x: [B, C, H, W] NCHW- or channels_last-contiguous (else copied) -> same layout.

    ``block`` (a power of two) overrides the tile size; tests use a small one to exercise several tiles and the tail.
    """
    bsz, c, h, w = x.shape
    if x.is_contiguous():
        channels_last = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        x = x.contiguous()
        channels_last = False
    plan = plan_group_norm((bsz, c, h, w), groups, channels_last, block)
    cpg, hw = c // groups, h * w
    y = torch.empty_like(x)  # preserve_format: same strides as the (dense) input
    cnt, mean, m2 = torch.empty((3, bsz * c * plan.splits), device=x.device, dtype=torch.float32)
    scale, shift = torch.empty((2, bsz * c), device=x.device, dtype=torch.float32)
    if channels_last:
        _gn_stats_cl_kernel[plan.stats_grid](x, cnt, mean, m2, c, hw, plan.splits, BLOCK_P=plan.block,
                                             BLOCK_C=plan.block_c, num_warps=plan.num_warps)
    else:
        _gn_stats_nchw_kernel[plan.stats_grid](x, cnt, mean, m2, hw, plan.splits, BLOCK=plan.block,
                                               num_warps=plan.num_warps)
    _gn_finalize_kernel[plan.finalize_grid](
        cnt, mean, m2, weight.contiguous(), bias.contiguous(), scale, shift, c, cpg, groups, plan.splits, float(eps),
        BLOCK=min(triton.next_power_of_2(cpg * plan.splits), 1024), BLOCK_C=triton.next_power_of_2(cpg),
        num_warps=4)
    if channels_last:
        _gn_apply_cl_kernel[plan.apply_grid](x, y, scale, shift, c, hw, SILU=bool(silu), BLOCK_P=plan.block,
                                             BLOCK_C=plan.block_c, num_warps=plan.num_warps)
    else:
        _gn_apply_nchw_kernel[plan.apply_grid](x, y, scale, shift, hw, SILU=bool(silu), BLOCK=plan.block,
                                               num_warps=plan.num_warps)
    return y


# ----------------------------------------------------------------------------------------------------------- GEGLU
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

"""CPU weight prepacking: convolution and linear weights packed once into the layout the oneDNN kernel computes in.

Why it pays: on CPU, PyTorch's conv2d runs oneDNN ("mkldnn_convolution"), which first reorders the plain
[out, in, kh, kw] weight into a blocked layout (channel blocks for AVX-512 registers, tiles for AMX) and only then
convolves -- on every call. For the UNet's deep levels (1280 channels at 8x8 and 4x4 when the latent is 32x32) the
reorder of a 59 MB fp32 weight costs more than the arithmetic. Measured on this project's 2-core Xeon (AMX-BF16):
a 1280->1280 3x3 conv at 4x4, batch 2, takes 31 ms plain vs 6.5 ms prepacked in fp32, and 6.0 vs 1.5 ms in bf16. A
bf16 linear also goes through oneDNN (an AMX inner product) and gains as much (a 320->2560 GEGLU projection over
2048 tokens: 3.4 -> 1.4 ms). An fp32 linear is MKL's sgemm, which packs its weight per call too; MKL's packed-GEMM
API gains less there (~6-8 % of an fp32 SD1.5 UNet call, measured A/B on the same model), but it is the same idea.
Over a whole SD1.5 UNet call at a 32x32 latent, the conv packing alone took the fp32 convolutions from 2.27 s to
1.32 s (profiled A/B on one model).

This is what torch.compile's inductor does with `freezing=True` (torch/_inductor/fx_passes/mkldnn_fusion.py), done
eagerly: the ops are the ones PyTorch registers for inductor, `torch.ops.mkldnn._reorder_convolution_weight` /
`_convolution_pointwise`, `_reorder_linear_weight` / `_linear_pointwise` ("none": no fused post-op) for bf16 and
`torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear` for fp32.

What stays true: `prepack_(module)` only changes the class of each nn.Conv2d / nn.Linear (and gives fused-QKV
attention a packed matmul), so parameters, state_dict() keys and load_state_dict() are untouched. The packed copy
is a cache keyed by the input shape and the weight's identity and version, so loading new weights or casting the
module repacks on the next call. The plain path runs instead whenever packing does not apply: off CPU, fp16,
autograd, inside torch.compile (inductor packs for itself), string padding or non-zero padding modes.
Cost: the packed copy is a second copy of each packed weight in memory.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import FastCrossAttention

CONV_DTYPES = (torch.float32, torch.bfloat16)
# fp32 linears use MKL's packed GEMM (x86 builds have MKL); without MKL they keep F.linear
LINEAR_DTYPES = (torch.float32, torch.bfloat16) if torch.backends.mkl.is_available() else (torch.bfloat16,)


def prepack_available() -> bool:
    """Whether this PyTorch build has the oneDNN prepacking ops (x86 and ARM builds with mkldnn do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._convolution_pointwise  # noqa: B018 -- raises if the op is not registered
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _packable(x: Tensor, weight: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu" and weight.dtype in dtypes
            and x.dtype == weight.dtype and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _identity(weight: Tensor) -> tuple:
    """What must not change for a packed copy to stay valid: storage, dtype and in-place version of the weight."""
    try:
        version = weight._version  # load_state_dict copies into the parameter in place: the version moves
    except RuntimeError:  # an inference tensor keeps no version counter (and cannot be changed outside inference)
        version = -1
    return weight.data_ptr(), weight.dtype, version


class _Packer:
    """One packed weight (for the last key seen). Copies and pickles as empty: the packed tensor is an opaque
    oneDNN buffer, rebuilt on the next call."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.packed: Tensor | None = None

    def get(self, key: tuple, pack: Callable[[], Tensor]) -> Tensor:
        if self.key != key:
            self.packed, self.key = None, None  # free the old copy before making the new one
            self.packed, self.key = pack(), key
        return self.packed

    def __deepcopy__(self, memo: dict) -> _Packer:
        return type(self)()

    def __reduce__(self):
        return type(self), ()


class LinearPacker(_Packer):
    """y = x @ weight.T + bias with `weight` [out, in] packed once: for MKL's packed sgemm (fp32) or oneDNN's inner
    product (bf16, AMX)."""

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not _packable(x, weight, LINEAR_DTYPES):
            return F.linear(x, weight, bias)
        rows = x.numel() // x.shape[-1]  # the GEMM's M, which both libraries pick their kernel for
        w = weight.detach()
        if weight.dtype == torch.float32:
            packed = self.get((rows, *_identity(weight)), lambda: torch.ops.mkl._mkl_reorder_linear_weight(w, rows))
            return torch.ops.mkl._mkl_linear(x, packed, w, bias, rows)
        packed = self.get((rows, *_identity(weight)), lambda: torch.ops.mkldnn._reorder_linear_weight(w, rows))
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """nn.Linear whose fp32/bf16 CPU forward uses a prepacked weight; same parameters, same keys."""

    packer: LinearPacker

    def forward(self, x: Tensor) -> Tensor:
        return self.packer(x, self.weight, self.bias)


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d whose fp32/bf16 CPU forward uses a weight prepacked for the input's shape; same parameters/keys."""

    packer: _Packer

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() != 4 or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or not _packable(x, self.weight, CONV_DTYPES)):
            return super().forward(x)
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        packed = self.packer.get(
            (tuple(x.shape), *_identity(self.weight)),
            lambda: torch.ops.mkldnn._reorder_convolution_weight(self.weight.detach(), *args, list(x.shape)))
        out = torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *args, "none", [], "")
        # oneDNN answers channels-last; nn.Conv2d answers NCHW when input and weight are NCHW. Keep the module's
        # contract, so a model that is not channels-last does not turn so half-way (cf. attention.py's layout note).
        return out.contiguous() if x.is_contiguous() and self.weight.is_contiguous() else out


def prepack_(module: nn.Module) -> int:
    """Make every plain nn.Conv2d / nn.Linear in `module` (and every fused-QKV matmul) use prepacked weights on CPU.

    In place and idempotent; returns how many layers were switched. Packing itself happens on each layer's first
    call (it needs the input shape)."""
    switched = 0
    for m in module.modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            m.__class__ = PackedConv2d if type(m) is nn.Conv2d else PackedLinear
            m.packer = _Packer() if isinstance(m, PackedConv2d) else LinearPacker()
            switched += 1
        elif isinstance(m, FastCrossAttention) and not isinstance(m.qkv_linear, LinearPacker):
            m.qkv_linear = LinearPacker()  # used only once fuse_qkv() has stacked the weight
    return switched

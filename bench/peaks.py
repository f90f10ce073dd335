"""Dense fp16/bf16 tensor-core peaks of common GPUs, for "% of peak" beside the achieved TFLOP/s.

Every figure is the vendor's datasheet (or architecture whitepaper) number for FP16/BF16 tensor-core math with
FP32 accumulation (what PyTorch's fp16/bf16 matmuls and convolutions use) **without** structured sparsity; where the
datasheet prints only the sparse figure (marked "with sparsity"), the dense one is half of it, as the datasheets'
footnotes say. Boost clocks; a card held at lower clocks (power, temperature) reaches less. A GPU not in the table
gets TFLOP/s only, and so do fp32 runs (their peak is another unit's).

Names are matched against `torch.cuda.get_device_name()` (first matching pattern wins, so the more specific come
first).
"""
from __future__ import annotations

import re
from typing import NamedTuple


class Peak(NamedTuple):
    pattern: str  # regex searched in the device name
    name: str
    tflops: float  # dense FP16/BF16 tensor, FP32 accumulate
    source: str


PEAKS: tuple[Peak, ...] = (
    Peak(r"H200 NVL", "H200 NVL", 835.5,
         "NVIDIA H200 datasheet: FP16/BF16 Tensor Core 1,671 TFLOPS with sparsity (NVL)"),
    Peak(r"H200", "H200 SXM", 989.5,
         "NVIDIA H200 datasheet: FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity (SXM)"),
    Peak(r"H100 NVL", "H100 NVL", 835.5,
         "NVIDIA H100 datasheet: FP16/BF16 Tensor Core 1,671 TFLOPS with sparsity (NVL)"),
    Peak(r"H100 PCIe", "H100 PCIe", 756.5,
         "NVIDIA H100 datasheet: FP16/BF16 Tensor Core 1,513 TFLOPS with sparsity (PCIe)"),
    Peak(r"H100", "H100 SXM", 989.5,
         "NVIDIA H100 datasheet: FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity (SXM)"),
    Peak(r"A100", "A100", 312.0,
         "NVIDIA A100 datasheet: FP16/BF16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe"),
    Peak(r"L40S", "L40S", 362.05,
         "NVIDIA L40S datasheet: FP16/BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    Peak(r"L40\b", "L40", 181.05,
         "NVIDIA L40 datasheet: FP16/BF16 Tensor Core 181.05 TFLOPS (362.1 with sparsity)"),
    Peak(r"\bL4\b", "L4", 121.0,
         "NVIDIA L4 datasheet: FP16/BF16 Tensor Core 242 TFLOPS with sparsity"),
    Peak(r"\bA10\b", "A10", 125.0,
         "NVIDIA A10 datasheet: FP16/BF16 Tensor Core 125 TFLOPS (250 with sparsity)"),
    Peak(r"RTX 4090", "GeForce RTX 4090", 165.2,
         "NVIDIA Ada Lovelace architecture whitepaper: RTX 4090 peak FP16/BF16 Tensor TFLOPS with FP32 accumulate "
         "165.2 (330.4 with sparsity)"),
    Peak(r"RTX 3090(?! Ti)", "GeForce RTX 3090", 71.0,
         "NVIDIA Ampere GA102 whitepaper: RTX 3090 peak FP16 Tensor TFLOPS with FP32 accumulate 71 (142 with "
         "sparsity)"),
)

HALF_DTYPES = ("float16", "bfloat16")


def peak_for(device_name: str | None, dtype: str) -> Peak | None:
    """The table's entry for this GPU at this dtype ("float16" / "bfloat16"), or None (unknown GPU, CPU, fp32)."""
    if not device_name or dtype not in HALF_DTYPES:
        return None
    return next((p for p in PEAKS if re.search(p.pattern, device_name)), None)

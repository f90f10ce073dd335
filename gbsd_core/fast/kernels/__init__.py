"""Triton kernels for the sampler's memory-bound hot spots, each with a plain-torch reference and a dispatching entry.

- ``group_norm_silu``: GroupNorm (fp32 statistics) + optional SiLU, fused (ResBlocks, VAE, transformer norms).
- ``geglu``: ``hidden * gelu(gate)`` after ``ff.net.0.proj``, fused.

Importing this package does not import triton; the kernels in ``triton_kernels`` are imported on the first Triton call.
``GBSD_TRITON=0`` in the environment switches every automatic dispatch to the references.
"""
from gbsd_core.fast.kernels.geglu import geglu, geglu_reference
from gbsd_core.fast.kernels.groupnorm_silu import group_norm_silu, group_norm_silu_reference
from gbsd_core.fast.kernels.runtime import triton_available

__all__ = ["geglu", "geglu_reference", "group_norm_silu", "group_norm_silu_reference", "triton_available"]

"""Triton kernels for the sampler's memory-bound hot spots, each with a plain-torch reference and a dispatching entry.

- ``group_norm_silu``: GroupNorm (fp32 statistics) + optional SiLU, fused (ResBlocks, VAE, transformer norms).
- ``geglu``: ``hidden * gelu(gate)`` after ``ff.net.0.proj``, fused.

Importing this package does not import triton; the kernels in ``triton_kernels`` are imported on the first Triton call.
``GBSD_TRITON=0`` in the environment switches every automatic dispatch to the references.

Decision (issue "GPU path that works on first contact", item 11): **opt-in, `FastOptions(triton=True)`; off by
default on CUDA until a GPU run measures them faster than ATen.** No GPU was lent when this was decided, so it rests
on counting, not timing:

- The first GroupNorm+SiLU kernel ran one program per (image, group): 64 programs for a CFG image on an H100/H200's
  132 SMs, each walking its 40·64·64-element group twice with a loop-carried Welford update and an fp32 division per
  element, channels-last read through a div/mod per element. That is launch-starved and latency-bound: about half the
  SMs idle, and ~40 dependent 2048-wide steps per pass. ATen's native kernel also reduces with one block per (image,
  group) but applies on a full grid, so this kernel was at best break-even, more likely slower; its fusion saved one
  read and one write of a tensor that, at SD sizes (≤ 5 MB in fp16), sits in the 50-60 MB L2 anyway.
- Rewritten (triton_kernels.py): statistics split over a full grid of tiles (each tile's mean and M2 in registers,
  no division per element), a tiny per-(image, group) merge that folds mean, rstd and the affine into a per-channel
  scale/shift, and a full-grid apply y = x·a + b (+ SiLU) in the layout's own tiles (contiguous rows of channels when
  channels-last). Two reads and one write, three launches, hundreds of programs at every SD size (a test checks the
  grids). By the byte count that is 3 passes against ATen's 3 (norm) + 2 (SiLU): a gain of the order of a few µs
  per site, ~60 sites per UNet call, i.e. ≈1 % of an SD1.5 step at 512² on an H100 (~20-25 ms), within the noise
  of launch overheads. Small enough that only a measurement should move the default.
- GEGLU (ff.net.0 gating) already runs on a full grid (one program per row and 1024-column chunk, contiguous
  16-byte loads, no division): it reads the 2D-wide projection once and writes D, where ATen's chunk + gelu + mul
  reads 3D and writes 2D. Kept as it is, under the same opt-in: the same order of gain, equally unmeasured.
- Under torch.compile (every compiled preset, graphs+compile included) the wired modules run plain ops and
  inductor generates its own fused GroupNorm+SiLU and GEGLU kernels, so the kernels here only ever matter for the
  eager `fast` / `graphs` paths.

What flips the default: `python -m bench --configs fast,fast+triton` (and bench/gpu.sh, which runs it with the
kernel micro-benchmark `python -m bench.kernels`) showing the kernels faster than ATen on the GPU.
"""
from gbsd_core.fast.kernels.geglu import geglu, geglu_reference
from gbsd_core.fast.kernels.groupnorm_silu import group_norm_silu, group_norm_silu_reference
from gbsd_core.fast.kernels.runtime import triton_available

__all__ = ["geglu", "geglu_reference", "group_norm_silu", "group_norm_silu_reference", "triton_available"]

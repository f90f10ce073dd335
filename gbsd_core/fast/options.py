"""`FastOptions`: the inference shortcuts of gbsd_core.fast, all opt-in (the default pipeline is the plain fp32 code).

What each option does and why it is safe:

- `dtype`: UNet weights in fp16/bf16. GroupNorm statistics stay fp32 (PyTorch's group_norm accumulates in fp32),
  latents and the DDIM update stay fp32 (the stepper casts only the UNet input). fp16 with a v-model (SD2-768-v) turns on
  attention upcasting, which that model needs (Stability's `_ATTN_PRECISION = "fp32"`), where it matters: on the
  explicit-softmax path. SDPA's kernels get fp16 q/k/v and accumulate in fp32 themselves (fast/attention.py).
- `vae_dtype`: None keeps the VAE in fp32 (the default; the SD decoder overflows fp16). fp16/bf16 decodes in that
  dtype, and the VAE becomes an `UpcastingAutoencoderKL`, which switches to fp32 by itself when a decode or an
  encode overflows.
- `attention`: "sdpa" lets PyTorch pick; "flash" / "efficient" force that SDPA backend (`sdpa_kernel`; "efficient" is
  CUDA only, flash also has a CPU kernel); "math" is the explicit softmax(QKᵀ)V in plain ops.
- `channels_last`: NHWC convolution weights and UNet input (cuDNN / oneDNN prefer it).
- `fuse_qkv`: self-attention q/k/v as one matmul against a stacked weight whose slices *are* to_q/to_k/to_v.weight,
  so state_dict() keys and memory are unchanged (`FastCrossAttention.fuse_qkv`, fast/attention.py).
- `cache_context_kv`: cross-attention K/V of the text context computed once per stage, in `set_context`; a new stage
  (new context tensor) recomputes them, and attention refuses a context other than the cached one.
- `triton`: the fused GroupNorm+SiLU (ResBlock in_layers.0+1 and out_layers.0+1, the UNet's out.0+1) and GEGLU
  (ff.net.0) kernels of fast/kernels, by swapping those modules for subclasses with the same parameters (keys
  unchanged; the now-redundant SiLU slots become Identity). Opt-in (default off): no GPU has measured them against
  ATen yet, and unmeasured kernels stay off the default path (fast/kernels/__init__.py gives the reasoning;
  `python -m bench --configs fast,fast+triton` and bench/gpu.sh measure it). Availability is decided once, here;
  under torch.compile the modules are plain ops and inductor fuses them itself.
- `cpu_prepack`: conv and linear weights (fp32/bf16) packed once into the layout oneDNN / MKL compute in, instead of
  on every call (prepack.py: the UNet's deep 1280-channel convs spend more time reordering their weight than computing).
  None = on when the UNet is on CPU and PyTorch has the oneDNN ops. Keys unchanged; costs a second copy of the
  packed weights in memory. Applied to the UNet and the VAE.
- `compile`: torch.compile of the whole step function (UNet + guidance + DDIM), `fullgraph=True`. "reduce-overhead"
  and "max-autotune" bring inductor's own CUDA graphs (`CUDAGRAPH_COMPILE_MODES`); the step then copies its outputs,
  which the next replay would overwrite. "max-autotune-no-cudagraphs" autotunes without them.
- `cuda_graphs`: capture the whole step in a CUDA graph with static buffers (see fast/step.py). Not together with a
  compile mode that has CUDA graphs of its own: that would replay a graph inside our capture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_BACKENDS = ("sdpa", "math", "flash", "efficient")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes whose inductor options include "triton.cudagraphs" (torch._inductor.list_mode_options; a test checks this
# table against it, so options are made without importing inductor).
CUDAGRAPH_COMPILE_MODES = frozenset({"reduce-overhead", "max-autotune"})


@dataclass(frozen=True)
class FastOptions:
    """Which inference shortcuts `accelerate` / `make_stepper` apply; every one is off by default."""

    dtype: torch.dtype = torch.float32     # fp16/bf16 weights; GroupNorm statistics always fp32
    attention: str = "sdpa"                # "sdpa" (auto) | "math" (explicit softmax) | "flash" | "efficient"
    channels_last: bool = False
    fuse_qkv: bool = False                 # self-attention q/k/v as one matmul
    cache_context_kv: bool = False         # cross-attention K/V of the text context computed once per stage
    triton: bool = False                   # fused GroupNorm+SiLU and GEGLU Triton kernels (opt-in, see above)
    cpu_prepack: bool | None = None        # oneDNN-prepacked conv/linear weights; None = auto (CPU only)
    compile: str | None = None             # None or one of COMPILE_MODES
    cuda_graphs: bool = False              # capture a whole CFG + DDIM step; stage switch = copy into static buffers
    vae_dtype: torch.dtype | None = None   # None: fp32 VAE decode (fp16/bf16: upcast automatically on overflow)

    def __post_init__(self) -> None:
        floats = (torch.float32, torch.float16, torch.bfloat16)
        if self.dtype not in floats or self.vae_dtype not in (None, *floats):
            raise ValueError(f"dtype / vae_dtype must be one of {floats}, got {self.dtype} / {self.vae_dtype}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.compile not in (None, *COMPILE_MODES):
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")
        if not isinstance(self.triton, bool) or not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"triton and cuda_graphs must be True or False, got {self.triton!r} / {self.cuda_graphs!r}")
        if self.cuda_graphs and self.compile in CUDAGRAPH_COMPILE_MODES:
            other = " (or compile='max-autotune-no-cudagraphs')" if self.compile == "max-autotune" else ""
            raise ValueError(f"compile={self.compile!r} brings inductor's own CUDA graphs, which cannot be replayed "
                             f"inside ours: use cuda_graphs=True with compile='default'{other}, or that mode "
                             f"without cuda_graphs=True")

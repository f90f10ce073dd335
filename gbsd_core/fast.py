"""Inference fast paths, all opt-in: the default pipeline stays the plain fp32 code of unet.py / sampling.py.

    opts = FastOptions(dtype=torch.float16, channels_last=True, fuse_qkv=True, cache_context_kv=True,
                       compile="max-autotune", cuda_graphs=True)
    generate(bundle, params, fast=opts)              # accelerates the bundle in place on first use
    # or drive the loop yourself:
    accelerate(bundle, opts)
    with make_stepper(bundle, opts, guidance_scale=7.5) as step:
        for state in denoise(bundle.unet, bundle.scheduler, x_T, timesteps, stages, uncond, 7.5, stepper=step): ...

What each option does and why it is safe:

- `dtype`: UNet weights in fp16/bf16. GroupNorm statistics stay fp32 (`GroupNorm32` upcasts, as CompVis), latents and
  the DDIM update stay fp32 (the stepper casts only the UNet input). fp16 with a v-model (SD2-768-v) turns on
  attention upcasting, which that model needs (Stability's `_ATTN_PRECISION = "fp32"`).
- `vae_dtype`: None keeps the VAE in fp32 (the default; the SD decoder overflows fp16). fp16/bf16 decodes in that
  dtype and `AutoencoderKL.decode` switches to fp32 by itself when the result has inf/NaN.
- `attention`: "sdpa" lets PyTorch pick; "flash" / "efficient" force that SDPA backend (`sdpa_kernel`; "efficient" is
  CUDA only, flash also has a CPU kernel); "math" is the explicit softmax(QKᵀ)V in plain ops.
- `channels_last`: NHWC convolution weights and UNet input (cuDNN / oneDNN prefer it).
- `fuse_qkv`: self-attention q/k/v as one matmul against a stacked weight whose slices *are* to_q/to_k/to_v.weight,
  so state_dict() keys and memory are unchanged (`CrossAttention.fuse_qkv`).
- `cache_context_kv`: cross-attention K/V of the text context computed once per stage, in `set_context`; a new stage
  (new context tensor) recomputes them, and attention refuses a context other than the cached one.
- `triton`: the fused GroupNorm+SiLU (ResBlock in_layers.0+1 and out_layers.0+1, the UNet's out.0+1) and GEGLU
  (ff.net.0) kernels of gbsd_core/kernels, by swapping those modules for subclasses with the same parameters (keys
  unchanged; the now-redundant SiLU slots become Identity). None = on when the UNet is on CUDA and triton imports.
- `cpu_prepack`: conv and linear weights (fp32/bf16) packed once into the layout oneDNN / MKL compute in, instead of
  on every call (prepack.py: the UNet's deep 1280-channel convs spend more time reordering their weight than computing).
  None = on when the UNet is on CPU and PyTorch has the oneDNN ops. Keys unchanged; costs a second copy of the
  packed weights in memory. Applied to the UNet and the VAE.
- `compile`: torch.compile of the whole step function (UNet + guidance + DDIM), `fullgraph=True`.
- `cuda_graphs`: capture the whole step in a CUDA graph with static buffers (see fast_step.py).

`accelerate` changes the bundle in place and is not undone (reload the checkpoint for the plain model); calling it
again with the same options does nothing, with other options it raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import GEGLU, CrossAttention, FeedForward, GroupNorm32
from .fast_step import FastStepper, cuda_graph_capture
from .kernels import geglu, group_norm_silu, triton_available
from .prepack import prepack_, prepack_available
from .unet_blocks import ResBlock

ATTENTION_BACKENDS = ("sdpa", "math", "flash", "efficient")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class FastOptions:
    dtype: torch.dtype = torch.float32     # fp16/bf16 weights; GroupNorm statistics always fp32
    attention: str = "sdpa"                # "sdpa" (auto) | "math" (explicit softmax) | "flash" | "efficient"
    channels_last: bool = False
    fuse_qkv: bool = False                 # self-attention q/k/v as one matmul
    cache_context_kv: bool = False         # cross-attention K/V of the text context computed once per stage
    triton: bool | None = None             # fused GroupNorm+SiLU and GEGLU kernels; None = auto (CUDA only)
    cpu_prepack: bool | None = None        # oneDNN-prepacked conv/linear weights; None = auto (CPU only)
    compile: str | None = None             # None | "default" | "reduce-overhead" | "max-autotune"
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
        if self.cuda_graphs and self.compile == "reduce-overhead":
            raise ValueError("compile='reduce-overhead' already uses CUDA graphs; use it or cuda_graphs=True, not both")


class KernelGroupNorm(GroupNorm32):
    """`GroupNorm32` without the explicit fp32 round trip, for fp16/bf16 models.

    PyTorch's group_norm kernels already accumulate mean and variance in fp32 for fp16/bf16 inputs (ATen's opmath /
    acc types, on CPU and CUDA), so casting the whole activation to fp32 and back only adds two full copies. The
    result equals GroupNorm32's up to the final rounding (tests/test_fast.py checks it on a large-mean input).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class FusedGroupNormSiLU(GroupNorm32):
    """`GroupNorm32` followed by SiLU in one Triton kernel (fp32 statistics); same parameters, so same keys."""

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, silu=True, use_triton=True)


class TritonGEGLU(GEGLU):
    """`GEGLU` whose gating runs in the fused Triton kernel; the projection `proj` is the same Linear."""

    def forward(self, x: Tensor) -> Tensor:
        return geglu(self.proj(x), use_triton=True)


def _swap_group_norms(unet: nn.Module) -> None:
    """Every plain GroupNorm32 left in the UNet (SpatialTransformer norms; ResBlocks too without Triton) ->
    KernelGroupNorm sharing its parameters."""
    for module in list(unet.modules()):
        for name, child in module.named_children():
            if type(child) is GroupNorm32:
                with torch.device("meta"):
                    swapped = KernelGroupNorm(child.num_channels, eps=child.eps)
                swapped.weight, swapped.bias = child.weight, child.bias
                setattr(module, name, swapped)


def _fuse_norm_silu(seq: nn.Sequential) -> None:
    """seq[0] GroupNorm32, seq[1] SiLU -> seq[0] fused, seq[1] Identity (the slot is kept for the key indices)."""
    norm = seq[0]
    with torch.device("meta"):  # shell only: the parameters are the old module's own
        fused = FusedGroupNormSiLU(norm.num_channels, eps=norm.eps)
    fused.weight, fused.bias = norm.weight, norm.bias
    seq[0], seq[1] = fused, nn.Identity()


def wire_triton(unet: nn.Module) -> None:
    """Swap in the Triton kernels at every site they cover (see the module docstring)."""
    for module in list(unet.modules()):
        if isinstance(module, ResBlock):
            _fuse_norm_silu(module.in_layers)
            _fuse_norm_silu(module.out_layers)
        elif isinstance(module, FeedForward):
            proj = module.net[0].proj
            with torch.device("meta"):
                fused = TritonGEGLU(proj.in_features, proj.out_features // 2)
            fused.proj = proj
            module.net[0] = fused
    _fuse_norm_silu(unet.out)


def _use_triton(options: FastOptions, device: torch.device) -> bool:
    if options.triton is None:
        return device.type == "cuda" and triton_available(device)
    if options.triton and not triton_available(device):
        raise ValueError(f"triton=True but Triton cannot run on {device} (needs CUDA, or TRITON_INTERPRET=1 on CPU)")
    return options.triton


def _use_prepack(options: FastOptions, device: torch.device) -> bool:
    if options.cpu_prepack is None:
        return device.type == "cpu" and prepack_available()
    if options.cpu_prepack and (device.type != "cpu" or not prepack_available()):
        raise ValueError(f"cpu_prepack=True needs the UNet on CPU and a PyTorch build with oneDNN (mkldnn); "
                         f"the UNet is on {device}, mkldnn available: {torch.backends.mkldnn.is_available()}")
    return options.cpu_prepack


def accelerate(bundle, options: FastOptions) -> None:
    """Apply `options` to `bundle` in place (UNet dtype, layout, kernels, attention; VAE dtype). Irreversible."""
    unet = bundle.unet
    done = getattr(unet, "fast_options", None)
    if done is not None:
        if done != options:
            raise ValueError(f"this bundle was already accelerated with {done}; reload it to apply {options}")
        return
    device = next(unet.parameters()).device
    if device.type != "cuda" and (options.cuda_graphs or options.attention == "efficient"):
        raise ValueError(f"cuda_graphs and attention='efficient' need the UNet on CUDA, it is on {device}")
    use_triton = _use_triton(options, device)
    use_prepack = _use_prepack(options, device)

    unet.to(options.dtype)
    attentions = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    if options.dtype == torch.float16 and bundle.family.prediction_type == "v_prediction":
        for attn in attentions:  # SD2-768-v overflows fp16 attention logits (GUIDE §2)
            attn.upcast = True
    if options.attention == "math":
        for attn in attentions:
            attn.explicit_softmax = True
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if use_triton:
        wire_triton(unet)
    if options.dtype != torch.float32:
        _swap_group_norms(unet)
    if options.fuse_qkv:  # last: it must see the final dtype/device (see CrossAttention.fuse_qkv)
        for site in unet.attention_sites(cross=False):
            site.module.fuse_qkv()
    bundle.vae.to(options.vae_dtype or torch.float32)
    if use_prepack:  # after every cast and layout change (the packed copies would follow them anyway, see prepack.py)
        prepack_(unet)
        prepack_(bundle.vae)
    unet.fast_options = options


def sdpa_backend(options: FastOptions):
    """The `torch.nn.attention.SDPBackend` forced by options.attention, or None."""
    if options.attention not in ("flash", "efficient"):
        return None
    from torch.nn.attention import SDPBackend

    return SDPBackend.FLASH_ATTENTION if options.attention == "flash" else SDPBackend.EFFICIENT_ATTENTION


def make_stepper(bundle, options: FastOptions, guidance_scale: float | None, eta: float = 0.0) -> FastStepper:
    """The step runner `sampling.denoise(..., stepper=)` uses: eager, compiled and/or CUDA-graphed per `options`.

    guidance_scale None or 1.0 means no classifier-free guidance (one UNet row per latent). Accelerates the bundle
    first if needed. Close it (or use `with`) to drop the K/V cache it keeps on the UNet.
    """
    accelerate(bundle, options)
    if options.compile is not None or options.cuda_graphs:
        if any(site.module.probs_hook is not None for site in bundle.unet.attention_sites()):
            # A hook is a Python side effect: a graph replay would skip it, compile would break the graph at it.
            raise ValueError("attention probs hooks need the eager step; use compile=None and cuda_graphs=False")
    return FastStepper(
        bundle.unet,
        bundle.scheduler,
        None if guidance_scale is None or guidance_scale == 1.0 else float(guidance_scale),
        float(eta),
        cache_context_kv=options.cache_context_kv,
        channels_last=options.channels_last,
        compile_mode=options.compile,
        capture=cuda_graph_capture if options.cuda_graphs else None,
        sdpa_backend=sdpa_backend(options),
    )

"""`accelerate` (apply `FastOptions` to a bundle in place) and `make_stepper` (the fast step runner).

    opts = FastOptions(dtype=torch.float16, channels_last=True, fuse_qkv=True, cache_context_kv=True,
                       compile="max-autotune", cuda_graphs=True)
    with make_stepper(bundle, opts, guidance_scale=7.5) as step:     # accelerates the bundle on first use
        generate(bundle, params, stepper=step)                       # params.cfg must be 7.5 too
        # or drive the loop yourself:
        for state in denoise(step, x_T, timesteps, stages, uncond): ...

What each option does, and why it is safe, is in options.py.

`accelerate` changes the bundle in place and is not undone (reload the checkpoint for the plain model); calling it
again with the same options does nothing, with other options it raises.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import GEGLU, FeedForward
from ..norm import GroupNorm32
from ..unet_blocks import ResBlock
from ..vae import AutoencoderKL
from .attention import swap_attention
from .kernels import geglu, group_norm_silu, triton_available
from .options import FastOptions
from .prepack import prepack_, prepack_available
from .step import FastStepper, cuda_graph_capture

if TYPE_CHECKING:
    from torch.nn.attention import SDPBackend

    from ..bundle import SDBundle


class KernelGroupNorm(GroupNorm32):
    """`GroupNorm32` without the explicit fp32 round trip, for fp16/bf16 models.

    PyTorch's group_norm kernels already accumulate mean and variance in fp32 for fp16/bf16 inputs (ATen's opmath /
    acc types, on CPU and CUDA), so casting the whole activation to fp32 and back only adds two full copies. The
    result equals GroupNorm32's up to the final rounding (tests/fast/test_apply.py checks it on a large-mean input).
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


class UpcastingAutoencoderKL(AutoencoderKL):
    """An fp16/bf16 VAE that switches itself to fp32 when a decode overflows (what diffusers' `upcast_vae` does).

    The SD decoder's activations can exceed fp16's range (65504) and come out inf/NaN. The check costs one reduction
    and a device sync per decode, nothing next to the decoder itself.
    """

    def decode(self, z: Tensor) -> Tensor:
        x = super().decode(z)
        if self.dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(x).all()):
            warnings.warn(f"VAE decode overflowed in {self.dtype}; the VAE is upcast to float32 from now on")
            self.float()
            x = super().decode(z)
        return x


def accelerate(bundle: SDBundle, options: FastOptions) -> None:
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
    attentions = swap_attention(unet)
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
    if bundle.vae.dtype != torch.float32:
        bundle.vae.__class__ = UpcastingAutoencoderKL  # same modules and parameters, one more check in decode
    if use_prepack:  # after every cast and layout change (the packed copies would follow them anyway, see prepack.py)
        prepack_(unet)
        prepack_(bundle.vae)
    unet.fast_options = options


def sdpa_backend(options: FastOptions) -> SDPBackend | None:
    """The `torch.nn.attention.SDPBackend` forced by options.attention, or None."""
    if options.attention not in ("flash", "efficient"):
        return None
    from torch.nn.attention import SDPBackend

    return SDPBackend.FLASH_ATTENTION if options.attention == "flash" else SDPBackend.EFFICIENT_ATTENTION


def make_stepper(bundle: SDBundle, options: FastOptions, guidance_scale: float | None,
                 eta: float = 0.0) -> FastStepper:
    """A `sampling.Stepper` for `denoise` / `generate(stepper=)`: eager, compiled and/or CUDA-graphed per `options`.

    guidance_scale None or 1.0 means no classifier-free guidance (one UNet row per latent). Accelerates the bundle
    first if needed. Close it (or use `with`) to drop the K/V cache it keeps on the UNet.
    """
    accelerate(bundle, options)
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

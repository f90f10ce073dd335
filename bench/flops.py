"""FLOPs of one CFG step, counted once per shape with `torch.utils.flop_counter.FlopCounterMode` on the real step.

The step is the plain reference step (`sampling.CFGStep`: our UNet on [x; x] with the [uncond; cond] context, the
guidance, the DDIM update) run on the meta device: every ATen op with its true shapes, no arithmetic, no memory, so
a 1024² batch-8 step counts as quickly as a tiny one. The count is the model's: the same number for every
configuration at that shape (ours, compiled, graphed, diffusers: the same network), so "achieved TFLOP/s" is model
FLOPs over measured time, comparable across configurations; one that skips work (the cross-attention K/V cache
skips the 77-token K/V projections, ~0.1 % at 512²) shows it as a little more utilisation. Counting each
implementation's own ops instead cannot work for all of them: compiled and graphed code and CPU-prepacked kernels
are not ATen ops the counter sees. SD1.5 at 512² with CFG counts 1.607 TFLOP per step (by hand: 0.40 TMAC per
sample at a 64×64 latent, i.e. 1.61 TFLOP per CFG step); tests/bench checks it. SDXL base at 1024² (a 128×128
latent) counts 13.52 TFLOP per CFG step, 8.4x SD1.5 at 512², as diffusers' own SDXL UNet does under the same counter.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from gbsd_core.ddim import DDIMSampler
from gbsd_core.sampling import CFGStep
from gbsd_core.unet import UNetModel

from .models import ARCHS, TINY_ARCHS


def step_flops(arch: str, tiny: bool, size: int, batch: int, cfg: float, positions: int = 77) -> int:
    """FLOPs of one step at `size`² (batch `batch`; CFG doubles the UNet batch unless cfg == 1), with a context of
    `positions` tokens (77·k for a prompt of k chunks)."""
    spec = (TINY_ARCHS if tiny else ARCHS)[arch]
    with torch.device("meta"):
        unet = UNetModel(spec.unet).eval()
    sampler = DDIMSampler(prediction_type=spec.family.prediction_type)
    sampler.timesteps(50)  # the run the step indexes into (every step costs the same)
    step = CFGStep(unet, sampler, cfg)
    rows = batch if step.guidance_scale is None else 2 * batch
    context = torch.empty(rows, positions, spec.unet.context_dim, device="meta")
    if spec.unet.adm_in_channels is None:
        step.set_context(context)
    else:  # SDXL: the vector y [rows, 2816] through the label embedding too
        step.set_context(context, torch.empty(rows, spec.unet.adm_in_channels, device="meta"))
    latents = torch.empty(batch, spec.unet.in_channels, size // 8, size // 8, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step.step(latents, 0, None, None)
    return int(counter.get_total_flops())

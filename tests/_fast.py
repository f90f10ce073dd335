"""Helpers of the fast-path tests (tests/fast/): tiny UNets, a GBSD run through a stepper, fast generate/sweep."""
from __future__ import annotations

import math

import numpy as np
import torch
from _util import rel_err

from gbsd_core.ddim import DDIMSampler
from gbsd_core.fast import make_stepper
from gbsd_core.fast.attention import swap_attention
from gbsd_core.pipeline import generate, sweep
from gbsd_core.noise_schedule import SD as SD_SCHEDULE
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import CFGStep, denoise, gbsd_stages
from gbsd_core.unet import UNetConfig, UNetModel

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"

SIZE = dict(width=64, height=64)

CUDA = torch.cuda.is_available()


def tiny_unet(seed: int = 0, context_dim: int = 48) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                                num_heads=-1, num_head_channels=32, context_dim=context_dim)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def fast_unet(seed: int = 0) -> UNetModel:
    """tiny_unet with the fast attention swapped in (what accelerate does first)."""
    unet = tiny_unet(seed)
    swap_attention(unet)
    return unet


def gbsd_run(unet, stepper=None, n=6, layout=0.5, rows=1, seed=0, sampler="ddim", schedule="normal",
             prediction_type="epsilon", inference=True):
    """Latents after every step of a GBSD run of `sampler` (stage switch at round(layout·n)); `rows` > 1 branches the focus
    stage (a sweep). The stepper (default: the plain CFGStep) is given the run's sampler; fresh noise (euler_a) comes
    from a generator seeded with `seed`, so two runs see the same noise. `inference=False` drives `denoise` outside
    inference mode, as a caller may."""
    g = torch.Generator().manual_seed(seed)
    d = unet.config.context_dim
    glob, loc, unc = (torch.randn(1, 77, d, generator=g) for _ in range(3))
    focus = loc.repeat(rows, 1, 1) * torch.linspace(0.5, 1.5, rows).view(-1, 1, 1)
    sched = make_sampler(SD_SCHEDULE, prediction_type, sampler, schedule)
    ts = sched.timesteps(n)
    x = sched.start_latents(torch.randn(1, 4, 8, 8, generator=g))
    if stepper is not None:
        stepper.sampler = sched
    with torch.inference_mode(inference):
        step = stepper if stepper is not None else CFGStep(unet, sched, 7.5)
        return [s.latents for s in denoise(step, x, ts, gbsd_stages(glob, focus, n, layout), unc,
                                           generator=torch.Generator().manual_seed(seed))]


def fast_generate(bundle, params, opts):
    """generate() through a fast stepper made for the params, as the CLI runs it."""
    with make_stepper(bundle, opts, params.cfg, params.eta, params.sampler, params.schedule) as step:
        return generate(bundle, params, stepper=step)


def fast_sweep(bundle, params, opts, **kw):
    with make_stepper(bundle, opts, params.cfg, params.eta, params.sampler, params.schedule) as step:
        return sweep(bundle, params, stepper=step, **kw)


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(rel_err(x, y) for x, y in zip(a, b))


def psnr(a, b) -> float:
    a, b = (np.asarray(im, dtype=np.float64) for im in (a, b))
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def tiny_bundle(prediction_type: str = "epsilon", seed: int = 0):
    """An SDBundle of a tiny UNet and VAE (no text encoder: the tests feed contexts themselves); a v-prediction
    bundle stands in for SD2-768-v (accelerate turns on its fp16 attention upcast)."""
    from gbsd_core.bundle import SDBundle
    from gbsd_core.family import SD1, SD2_768_V
    from gbsd_core.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)).eval()
    family = SD2_768_V if prediction_type == "v_prediction" else SD1
    return SDBundle(unet=tiny_unet(seed), vae=vae, text_encoder=None, tokenizer=None,
                    family=family)


def compile_as(monkeypatch, backend: str = "aot_eager"):
    """Make every torch.compile in the code under test use `backend` (fast on a CPU; inductor needs ~1 min per
    compile of even a tiny UNet here), keeping its fullgraph/dynamic arguments. Returns the list of compiled fns."""
    real = torch.compile
    compiled = []

    def fake(fn, *, fullgraph=False, dynamic=None, mode=None, options=None, backend_=None, **_):
        compiled.append(fn)
        return real(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", fake)
    return compiled

"""The fast path on SDXL: the vector y (pooled text + size embeddings) reaches the UNet in every form of the fast
step -- eager, CUDA graphs (the CPU stand-in for the capture: y in a static buffer, copied at the stage switch like
the context, never a re-capture), torch.compile (fullgraph, aot_eager backend) -- and fp16/bf16, channels-last,
fused QKV and the K/V cache run a tiny SDXL bundle close to the plain fp32 pipeline; an fp16 VAE upcasts itself on
overflow. (A UNet with a label embedding refuses to run without y, so a dropped vector cannot pass unnoticed.)"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _fast import compile_as, fast_generate, fast_sweep, psnr
from _sdxl import TINY_UNET, write_tiny_sdxl
from _util import rel_err

import gbsd_core
from gbsd_core.attention_sites import attention_sites
from gbsd_core.ddim import DDIMSampler
from gbsd_core.fast import FastOptions, make_stepper
from gbsd_core.fast import apply as fast_apply
from gbsd_core.fast.step import FastStepper, eager_capture
from gbsd_core.fast.vae import UpcastingAutoencoderKL
from gbsd_core.pipeline import GenerationParams, generate
from gbsd_core.noise_schedule import SD as SD_SCHEDULE
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import (
    CFGStep,
    Conditioning,
    denoise,
    focus_conditioning,
    gbsd_stages,
)
from gbsd_core.unet import UNetModel

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"
SIZE = dict(width=64, height=64)


def _unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(TINY_UNET).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if name.startswith("label_emb.0.2."):  # y must matter
                p.mul_(20.0)
    return unet


def _run(step, n: int = 4, layout: float = 0.5, rows: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """Latents after every step of an SDXL-shaped GBSD run (global, local and negative Conditionings with pooled and
    micro parts) on the stepper's sampler (Euler a's noise from a seeded generator); `rows` > 1 branches the focus
    stage."""
    g = torch.Generator().manual_seed(seed)
    adm = TINY_UNET.adm_in_channels
    glob, loc, unc = (Conditioning(torch.randn(1, 77, TINY_UNET.context_dim, generator=g),
                                   torch.randn(1, 32, generator=g), torch.randn(1, adm - 32, generator=g))
                      for _ in range(3))
    alphas = torch.linspace(0.2, 0.8, rows)
    focus = focus_conditioning(glob, loc.map(lambda t: t.repeat(rows, *[1] * (t.ndim - 1))), alphas)
    sched = step.sampler
    ts = sched.timesteps(n)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.inference_mode():
        return [s.latents for s in denoise(step, sched.start_latents(x), ts, gbsd_stages(glob, focus, n, layout), unc,
                                           generator=torch.Generator().manual_seed(seed + 1))]


def test_fast_stepper_passes_the_vector_eagerly():
    unet = _unet()
    ref = _run(CFGStep(unet, DDIMSampler(), 7.5))
    fast = _run(FastStepper(unet, DDIMSampler(), 7.5, 0.0))
    err = max(rel_err(a, b) for a, b in zip(fast, ref))
    print(f"SDXL-shaped FastStepper (eager) vs CFGStep: max rel_err {err:.2e}")
    assert err <= 1e-6


def test_graphed_step_keeps_the_vector_in_a_static_buffer():
    """CUDA-graph buffer logic on the CPU stand-in: equal to the eager stepper bit for bit; the stage switch copies
    the focus stage's y into the same buffer (its address never changes: a real graph reads it there) and captures
    nothing new; a sweep's branched focus stage (3 rows) is one more shape, one more capture."""
    unet = _unet()
    for rows, captures in ((1, 1), (3, 2)):
        eager = _run(FastStepper(unet, DDIMSampler(), 7.5, 0.0, cache_context_kv=True), rows=rows)
        graphed = FastStepper(unet, DDIMSampler(), 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
        seen = []  # (buffer address, buffer contents == the stepper's current y) at every switch
        real = graphed._switch_context
        graphed._switch_context = lambda g: (real(g), seen.append((g.vector.data_ptr(),
                                                                   torch.equal(g.vector, graphed._vector))))
        out = _run(graphed, rows=rows)
        graphed.close()
        assert all(torch.equal(a, b) for a, b in zip(out, eager)), rows
        assert graphed.captures == captures and len(seen) == 2 and all(same for _, same in seen)
        if rows == 1:
            assert seen[0][0] == seen[1][0]  # one graph, one vector buffer, written in place at the switch
    # the copy matters: a graph that kept the layout stage's y in the focus stage would make another image
    stale = FastStepper(unet, DDIMSampler(), 7.5, 0.0, capture=eager_capture)
    switch = stale._switch_context

    def keep_the_old_vector(g) -> None:
        old = g.vector.clone()
        switch(g)
        g.vector.copy_(old)

    stale._switch_context = keep_the_old_vector
    assert not torch.equal(_run(stale)[-1], _run(FastStepper(unet, DDIMSampler(), 7.5, 0.0))[-1])


@pytest.mark.parametrize("name, schedule", [("euler", "karras"), ("euler_a", "normal"), ("dpmpp_2m", "karras")])
def test_every_sampler_runs_sdxl_through_the_graphed_step(name, schedule):
    """The samplers on SDXL's fast step: y and DPM++'s history (or Euler a's noise) in the static buffers of the
    CUDA graph (CPU stand-in), bit-equal to the eager fast step and, over a whole GBSD run whose focus stage is branched
    into 3 rows (history and noise branched with the latents), within 1e-5 of the plain CFGStep (the whole-run bound
    of tests/fast/test_step_samplers.py: the coefficient form rounds ~1e-7 per step, a random UNet amplifies it)."""
    unet = _unet()

    def sampler():
        return make_sampler(SD_SCHEDULE, "epsilon", name, schedule)

    ref = _run(CFGStep(unet, sampler(), 7.5), rows=3)
    eager = _run(FastStepper(unet, sampler(), 7.5, 0.0, cache_context_kv=True), rows=3)
    graphed = FastStepper(unet, sampler(), 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    out = _run(graphed, rows=3)
    graphed.close()
    assert all(torch.equal(a, b) for a, b in zip(out, eager)) and graphed.captures == 2
    err = max(rel_err(a, b) for a, b in zip(out, ref))
    print(f"SDXL {name} {schedule}: graphed fast step vs CFGStep, max rel_err {err:.2e}")
    assert err <= 1e-5
    assert not torch.equal(ref[-1], _run(CFGStep(unet, DDIMSampler(), 7.5), rows=3)[-1])  # another sampler


def test_compiled_step_takes_the_vector_in_one_graph(monkeypatch):
    """torch.compile (aot_eager backend: the trace without minutes of inductor on 2 cores), fullgraph: the SDXL step
    traces in one graph, y is a tensor input, so the stage switch does not recompile; equal to eager."""
    import torch._dynamo

    compiled_fns = compile_as(monkeypatch, "aot_eager")
    unet = _unet()
    eager = _run(FastStepper(unet, DDIMSampler(), 7.5, 0.0, cache_context_kv=True))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = _run(FastStepper(unet, DDIMSampler(), 7.5, 0.0, cache_context_kv=True, compile_mode="default"))
    assert len(compiled_fns) == 1
    err = max(rel_err(a, b) for a, b in zip(out, eager))
    print(f"SDXL compiled (aot_eager, fullgraph) vs eager fast step: max rel_err {err:.2e}")
    assert err <= 1e-5
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- the bundle, end to end
@pytest.fixture(scope="module")
def xl_ckpt(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("xl"))


@pytest.fixture(scope="module")
def plain(xl_ckpt):
    return gbsd_core.load(xl_ckpt)


PARAMS = GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=0.5, steps=4, seed=3, **SIZE)


@pytest.mark.parametrize("dtype, min_psnr", [(torch.float32, 60.0), (torch.bfloat16, 25.0), (torch.float16, 30.0)])
def test_fast_sdxl_bundle_is_close_to_the_plain_pipeline(xl_ckpt, plain, dtype, min_psnr):
    """accelerate() on an SDXL bundle: the UNet in fp16/bf16, channels-last, fused self-attention QKV, the K/V
    cache of the cross-attention (the SDXL context, recomputed at the stage switch), prepacked CPU weights; GBSD with
    CFG against the plain fp32 run."""
    b = gbsd_core.load(xl_ckpt)
    opts = FastOptions(dtype=dtype, channels_last=True, fuse_qkv=True, cache_context_kv=True)
    fast = fast_generate(b, PARAMS, opts)
    ref = generate(plain, PARAMS)
    quality = psnr(fast.image, ref.image)
    print(f"SDXL fast path {dtype}: PSNR vs plain fp32 {quality:.1f} dB")
    assert b.unet.input_blocks[0][0].weight.dtype == dtype
    assert b.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(hasattr(s.module, "qkv_weight") for s in attention_sites(b.unet, cross=False))
    assert quality >= min_psnr
    assert (np.asarray(fast.image) != np.asarray(generate(plain, GenerationParams(PROMPT, steps=4, seed=3,
                                                                                  **SIZE)).image)).any()


def test_cuda_graph_stepper_runs_sdxl_generate_and_sweep(xl_ckpt, plain, monkeypatch):
    """make_stepper with cuda_graphs=True (the CPU stand-in for the capture) through generate and sweep on the SDXL
    bundle: one capture per shape, a second generate replays, images as the plain pipeline's."""
    monkeypatch.setattr(fast_apply, "_check_device", lambda options, device: None)  # cuda_graphs on the CPU
    monkeypatch.setattr(fast_apply, "CudaGraphCapture", lambda: eager_capture)
    b = gbsd_core.load(xl_ckpt)
    opts = FastOptions(cuda_graphs=True, cache_context_kv=True, fuse_qkv=True)
    first, second = fast_generate(b, PARAMS, opts), fast_generate(b, PARAMS, opts)
    stepper = make_stepper(b, opts, PARAMS.cfg, PARAMS.eta)
    assert stepper.captures == 1 and np.array_equal(np.asarray(first.image), np.asarray(second.image))
    diff = np.abs(np.asarray(first.image, np.int16) - np.asarray(generate(plain, PARAMS).image, np.int16)).max()
    assert diff <= 1
    cells = fast_sweep(b, PARAMS, opts, alphas=[0.0, 1.0])
    assert stepper.captures == 2  # the branched focus stage: batch 2
    from gbsd_core.pipeline import sweep

    for ours, theirs in zip(cells, sweep(plain, PARAMS, alphas=[0.0, 1.0])):
        assert np.abs(np.asarray(ours.image, np.int16) - np.asarray(theirs.image, np.int16)).max() <= 1


def test_sdxl_fp16_vae_goes_through_the_upcasting_vae(xl_ckpt):
    """SDXL's VAE overflows fp16 (diffusers ships force_upcast=True for it); with vae_dtype=fp16 accelerate() makes
    it an UpcastingAutoencoderKL, which redoes an overflowing decode in fp32."""
    b = gbsd_core.load(xl_ckpt)
    with torch.no_grad():
        b.vae.decoder.conv_out.weight.mul_(1e4)  # outputs beyond fp16's 65504 (weights still within it)
    ref = copy.deepcopy(b.vae).half().float()  # fp32 with the fp16-rounded weights
    fast_apply.accelerate(b, FastOptions(vae_dtype=torch.float16))
    assert isinstance(b.vae, UpcastingAutoencoderKL) and b.vae.dtype == torch.float16
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) / b.vae.config.scale_factor
    with torch.no_grad(), pytest.warns(UserWarning, match="upcast"):
        out = b.vae.decode(z)
    assert b.vae.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert rel_err(out, ref.decode(z)) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdxl_cuda_graphs_real(xl_ckpt, dtype):
    """The real capture on a GPU: SDXL's y read from its static buffer across the stage switch, one capture."""
    def on_cuda():
        b = gbsd_core.load(xl_ckpt)
        b.unet.cuda(), b.vae.cuda(), b.text_encoder.cuda()
        return b

    eager = fast_generate(on_cuda(), PARAMS, FastOptions(dtype=dtype, cache_context_kv=True, fuse_qkv=True))
    b = on_cuda()
    opts = FastOptions(dtype=dtype, cache_context_kv=True, fuse_qkv=True, cuda_graphs=True)
    graphed = fast_generate(b, PARAMS, opts)
    print(f"SDXL CUDA graphs {dtype}: PSNR vs eager fast {psnr(graphed.image, eager.image):.1f} dB")
    assert psnr(graphed.image, eager.image) >= 40.0 and make_stepper(b, opts, PARAMS.cfg).captures == 1

"""The fast CFG + DDIM step (gbsd_core/fast/step.py): the coefficient form of DDIM, the K/V cache across stage
switches, the CUDA-graph buffer logic (CPU stand-in for the capture), torch.compile on CPU, real CUDA graphs where
CUDA is available."""
from __future__ import annotations

import pytest
import torch
from _fast import CUDA, FOCUS, PROMPT, SIZE, fast_generate, gbsd_run, max_rel, psnr, tiny_unet
from _util import rel_err

from gbsd_core.ddim import DDIMScheduler
from gbsd_core.fast import FastOptions, make_stepper
from gbsd_core.fast.attention import set_context_kv
from gbsd_core.fast.prepack import prepack_
from gbsd_core.fast.step import FastStepper, ddim_coefficients, eager_capture
from gbsd_core.pipeline import GenerationParams
from gbsd_core.sampling import denoise, gbsd_stages


# ----------------------------------------------------------------------------------------------------- DDIM form
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_coefficient_form_reproduces_scheduler_step(prediction_type, eta):
    sched = DDIMScheduler(prediction_type)
    gen = torch.Generator().manual_seed(0)
    for t in sched.timesteps(20):
        out, x, z = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        ref_prev, ref_x0 = sched.step(out, int(t), x, eta=eta, noise=z)
        c = ddim_coefficients(sched, int(t), eta).float()
        err = max(rel_err(c[0] * x + c[1] * out + c[4] * z, ref_prev), rel_err(c[2] * x + c[3] * out, ref_x0))
        assert err <= 1e-6, (int(t), err)
    print(f"coefficient form vs scheduler.step ({prediction_type}, η={eta}): ok")


def _count_calls(modules) -> list[int]:
    count = [0]
    for m in modules:
        m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_gbsd_stage_switch_with_cache_equals_uncached_run():
    """σ = 0.5: the cache must be rebuilt at the stage switch; the run equals the uncached and the plain runs."""
    unet = tiny_unet()
    plain_run = gbsd_run(unet)
    uncached = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0))
    to_k = _count_calls(site.module.to_k for site in unet.attention_sites())
    with FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True) as stepper:
        cached = gbsd_run(unet, stepper)
    n_attn2 = len(list(unet.attention_sites()))
    assert to_k[0] == 2 * n_attn2  # K computed once per stage (2 stages), not once per step (6)
    err_cache, err_plain = max_rel(cached, uncached), max_rel(cached, plain_run)
    print(f"GBSD σ=0.5 cached vs uncached: {err_cache:.2e}; fast vs plain CFGStep: {err_plain:.2e}")
    assert err_cache <= 1e-5 and err_plain <= 1e-5
    # Without the stage switch the last steps differ: the comparison above can fail.
    assert max_rel(gbsd_run(unet, sigma=1.0), plain_run) > 1e-3


# ----------------------------------------------------------------------------------------------------- graphs
def test_graphed_step_buffers_with_cpu_stand_in():
    """The CUDA-graph stepper's buffer logic, with "replay" = run the body on the static buffers: equal to the eager
    stepper bit for bit; a stage switch is a copy (no new capture) and updates the cached K/V in place; a sweep's
    branching (new batch) captures once more."""
    unet = tiny_unet()
    eager = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True))
    graphed = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    kv_ptrs = []
    real_switch = graphed._switch_context
    graphed._switch_context = lambda g: (real_switch(g), kv_ptrs.append(graphed._kv_storage()))
    out = gbsd_run(unet, graphed)
    assert all(torch.equal(a, b) for a, b in zip(out, eager))
    assert graphed.captures == 1 and len(kv_ptrs) == 2 and kv_ptrs[0] == kv_ptrs[1]
    # Sweep: layout at batch 1, focus branched to 3 rows -> one more capture; equal to the eager stepper.
    eager3 = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True), rows=3)
    graphed3 = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    assert all(torch.equal(a, b) for a, b in zip(gbsd_run(unet, graphed3, rows=3), eager3))
    assert graphed3.captures == 2
    # Another user re-points the UNet's K/V cache at another batch: the graph must notice and capture again.
    ctx, x = torch.randn(2, 77, 48), torch.randn(1, 4, 8, 8)
    graphed.set_context(ctx)
    first = graphed(x, 981, None)
    assert graphed.captures == 2  # graphed3 above re-allocated the K/V at batch 3
    graphed.set_context(ctx)  # same shapes: a copy, no capture
    assert torch.equal(graphed(x, 981, None)[0], first[0]) and graphed.captures == 2
    set_context_kv(unet, torch.randn(6, 77, 48))
    second = graphed(x, 981, None)
    assert graphed.captures == 3 and torch.equal(first[0], second[0])
    graphed.close()
    reference = FastStepper(unet, graphed.scheduler, 7.5, 0.0)
    reference.set_context(ctx)
    with torch.inference_mode():
        assert rel_err(first[0], reference(x, 981, None)[0]) <= 1e-6


@pytest.mark.skipif(not CUDA, reason="needs CUDA (bench/gpu.sh runs it)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graphs_real(fresh, dtype):
    b = fresh()
    b.unet.cuda(), b.vae.cuda(), b.text_encoder.cuda()
    p = GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=0.5, steps=8, seed=3, **SIZE)
    eager = fast_generate(b, p, FastOptions(dtype=dtype, cache_context_kv=True, fuse_qkv=True))
    b2 = fresh()
    b2.unet.cuda(), b2.vae.cuda(), b2.text_encoder.cuda()
    opts = FastOptions(dtype=dtype, cache_context_kv=True, fuse_qkv=True, cuda_graphs=True)
    with make_stepper(b2, opts, 7.5) as stepper:
        ts = b2.scheduler.timesteps(8)
        cond = torch.cat([b2.encode_prompt(PROMPT), b2.encode_prompt(FOCUS)]).cuda()
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
        list(denoise(stepper, x, ts, gbsd_stages(cond[:1], cond[1:], 8, 0.5), b2.encode_prompt("").cuda()))
        assert stepper.captures == 1  # the stage switch did not re-capture
    graphed = fast_generate(b2, p, opts)
    print(f"CUDA graphs {dtype}: PSNR vs eager fast {psnr(graphed.image, eager.image):.1f} dB")
    assert psnr(graphed.image, eager.image) >= 40.0


# ----------------------------------------------------------------------------------------------------- compile
def test_torch_compile_cpu_matches_eager_without_recompiling_at_stage_switch():
    """torch.compile (inductor, CPU: needs the C++ compiler) of the whole step. One compile for a whole GBSD run:
    the stage switch and every new timestep are tensor inputs. Tiny model, ~1 min of compile on 2 cores. The UNet is
    prepacked as the CPU fast path makes it: eager runs the packed oneDNN kernels, the compiled step traces the plain
    layers (prepack.py steps aside under compile), so this also checks the two agree."""
    import torch._dynamo

    unet = tiny_unet()
    assert prepack_(unet) > 0
    eager = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True), n=4)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, compile_mode="default"),
                            n=4)
    err = max_rel(compiled, eager)
    print(f"torch.compile (CPU, freezing) vs eager fast step: rel err {err:.2e}")
    assert err <= 1e-4


def test_fast_steps_run_ddim_only_for_now(fresh):
    """The loop's entry `step(latents, i, ...)` is DDIM's step at run_timesteps[i]; a σ sampler is refused clearly
    (the fast σ samplers are a later phase), by the stepper and by generate()."""
    from gbsd_core.pipeline import generate
    from gbsd_core.samplers import make_sampler

    b = fresh()
    with make_stepper(b, FastOptions(), 7.5) as stepper:
        ts = b.scheduler.timesteps(6)
        stepper.set_context(torch.randn(2, 77, b.unet.config.context_dim))
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            assert torch.equal(stepper.step(x, 2, None)[0], stepper(x, int(ts[2]), None)[0])
        with pytest.raises(ValueError, match="the stepper runs sampler 'ddim'"):
            generate(b, GenerationParams(PROMPT, steps=4, sampler="euler", **SIZE), stepper=stepper)
        stepper.scheduler = make_sampler(b.scheduler, "euler")
        stepper.scheduler.timesteps(6)
        with pytest.raises(ValueError, match="DDIM only"):
            stepper.step(x, 0, None)

"""The fast CFG step (gbsd_core/fast/step.py): the coefficient form of every sampler, the K/V cache across stage
switches, the CUDA-graph buffer logic (CPU stand-in for the capture), torch.compile on CPU, real CUDA graphs where
CUDA is available. Every sampler's fast runs against the plain CFGStep: tests/fast/test_step_samplers.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _fast import (
    CUDA,
    FOCUS,
    PROMPT,
    SIZE,
    fast_generate,
    gbsd_run,
    max_rel,
    psnr,
    tiny_unet,
)
from _util import rel_err

from gbsd_core.attention_sites import attention_sites
from gbsd_core.ddim import DDIMSampler
from gbsd_core.fast import FastOptions, make_stepper
from gbsd_core.fast.attention import set_context_kv
from gbsd_core.fast.prepack import prepack_
from gbsd_core.fast.step import FastStepper, eager_capture, step_coefficients
from gbsd_core.pipeline import GenerationParams
from gbsd_core.noise_schedule import SD as SD_SCHEDULE
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import CFGStep, denoise, gbsd_stages


# ----------------------------------------------------------------------------------------------------- the form
FORMS = [("ddim", "normal", eta) for eta in (0.0, 1.0)] + [
    (name, schedule, 0.0) for name in ("euler", "euler_a", "dpmpp_2m") for schedule in ("normal", "karras")]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name, schedule, eta", FORMS)
def test_coefficient_form_reproduces_the_samplers_update(name, schedule, eta, prediction_type):
    """x / in_scale is what the sampler's model_input gives (bit for bit), and a_x·x + a_out·out + a_prev·prev + a_noise·z / d_x·x +
    d_out·out what its update gives, at every step of a 20-step run, first and second order, on random fp32 inputs."""
    sampler = make_sampler(SD_SCHEDULE, prediction_type, name, schedule)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for i in range(len(sampler.timesteps(20))):
        x, out, prev, z = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(4))
        needs_noise = sampler.noise_std(i, eta) > 0
        for second in (False, True) if i > 0 else (False,):
            ref_next, ref_x0 = sampler.update(x, i, out, eta=eta, noise=z if needs_noise else None,
                                              prev_x0=prev if second else None)
            c = step_coefficients(sampler, i, eta, second).float()
            mine = c[1] * x + c[2] * out + c[3] * (prev if second else 0) + c[4] * z
            worst = max(worst, rel_err(mine, ref_next), rel_err(c[5] * x + c[6] * out, ref_x0))
            assert torch.equal(x / c[0], sampler.model_input(x, i))
    print(f"coefficient form vs {name} {schedule} update ({prediction_type}, η={eta}): {worst:.2e}")
    assert worst <= 1e-6
    if name != "dpmpp_2m":  # only the multistep sampler reads its history
        assert all(float(step_coefficients(sampler, i, eta, True)[3]) == 0.0 for i in range(20))


def _count_calls(modules) -> list[int]:
    count = [0]
    for m in modules:
        m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_gbsd_stage_switch_with_cache_equals_uncached_run():
    """Layout fraction 0.5: the cache must be rebuilt at the stage switch; the run equals the uncached and the plain runs."""
    unet = tiny_unet()
    plain_run = gbsd_run(unet)
    uncached = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0))
    to_k = _count_calls(site.module.to_k for site in attention_sites(unet))
    with FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True) as stepper:
        cached = gbsd_run(unet, stepper)
    n_attn2 = len(list(attention_sites(unet)))
    assert to_k[0] == 2 * n_attn2  # K computed once per stage (2 stages), not once per step (6)
    err_cache, err_plain = max_rel(cached, uncached), max_rel(cached, plain_run)
    print(f"GBSD layout fraction 0.5 cached vs uncached: {err_cache:.2e}; fast vs plain CFGStep: {err_plain:.2e}")
    assert err_cache <= 1e-5 and err_plain <= 1e-5
    # Without the stage switch the last steps differ: the comparison above can fail.
    assert max_rel(gbsd_run(unet, layout=1.0), plain_run) > 1e-3


# ----------------------------------------------------------------------------------------------------- graphs
def _kv_ptrs(stepper) -> list[tuple[int, int]]:
    """Storage of the cached K and V every cross-attention reads."""
    return [(a.context_kv[1].data_ptr(), a.context_kv[2].data_ptr()) for a in stepper._attn2]


def test_graphed_step_buffers_with_cpu_stand_in():
    """The CUDA-graph stepper's buffer logic, with "replay" = run the body on the static buffers: equal to the eager
    stepper bit for bit; a stage switch is a copy (no new capture) and updates the cached K/V in place; a sweep's
    branching (new batch) captures once more."""
    unet = tiny_unet()
    eager = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True))
    graphed = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    kv_ptrs = []
    real_switch = graphed._switch_context
    graphed._switch_context = lambda g: (real_switch(g), kv_ptrs.append(_kv_ptrs(graphed)))
    out = gbsd_run(unet, graphed)
    assert all(torch.equal(a, b) for a, b in zip(out, eager))
    assert graphed.captures == 1 and len(kv_ptrs) == 2 and kv_ptrs[0] == kv_ptrs[1]
    # Sweep: layout at batch 1, focus branched to 3 rows -> one more capture; equal to the eager stepper.
    eager3 = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True), rows=3)
    graphed3 = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    assert all(torch.equal(a, b) for a, b in zip(gbsd_run(unet, graphed3, rows=3), eager3))
    assert graphed3.captures == 2
    # Another stepper (graphed3) re-pointed the UNet's K/V cache at batch 3, a caller then at batch 6: the graph
    # notices, re-installs its own K/V buffers (recomputed from its context buffer) and replays; it never captures
    # again, and its K/V never move (a real graph reads them by address).
    ctx, x = torch.randn(2, 77, 48), torch.randn(1, 4, 8, 8)
    graphed.set_context(ctx)
    first = graphed.step(x, 0, None)
    set_context_kv(unet, torch.randn(6, 77, 48))
    second = graphed.step(x, 0, None)
    assert graphed.captures == 1 and torch.equal(first[0], second[0]) and _kv_ptrs(graphed) == kv_ptrs[0]
    graphed.close()
    reference = FastStepper(unet, graphed.sampler, 7.5, 0.0)
    reference.set_context(ctx)
    with torch.inference_mode():
        assert rel_err(first[0], reference.step(x, 0, None)[0]) <= 1e-6


def test_graph_rechecks_v_as_well_as_k():
    """Issue item 6: the graphed step checked only K's storage to decide whether the cached K/V it reads had moved.
    Re-point V alone (K untouched, same context): the next step must put the graph's own V back before replaying."""
    unet = tiny_unet()
    graphed = FastStepper(unet, DDIMSampler(), 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    graphed.sampler.timesteps(10)
    ctx, x = torch.randn(2, 77, 48), torch.randn(1, 4, 8, 8)
    graphed.set_context(ctx)
    first = graphed.step(x, 0, None)
    attn = graphed._attn2[0]
    source, k, v = attn.context_kv
    attn.context_kv = (source, k, torch.zeros_like(v))  # another V tensor; K and the context are the graph's own
    second = graphed.step(x, 0, None)
    assert attn.context_kv[2] is v and graphed.captures == 1
    assert torch.equal(first[0], second[0])


def test_graphs_survive_close_and_alternate_shapes_without_recapture():
    """Issue item 9 at the stepper: a second run after close() (what `with make_stepper(...)` does after each
    generate) replays the graphs it has, one per shape, each with its own K/V buffers, instead of capturing again."""
    unet = tiny_unet()
    graphed = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    eager = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True)
    for rows in (1, 3, 1, 3):  # generate, sweep, generate, sweep
        ref = gbsd_run(unet, eager, rows=rows)
        out = gbsd_run(unet, graphed, rows=rows)
        graphed.close()
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
        assert all(site.module.context_kv is None for site in attention_sites(unet))  # close() took the cache off
    assert graphed.captures == 2  # batch 1 and batch 3, once each


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
        ts = stepper.sampler.timesteps(8)
        cond = torch.cat([b2.encode_prompt(PROMPT), b2.encode_prompt(FOCUS)]).cuda()
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
        list(denoise(stepper, x, ts, gbsd_stages(cond[:1], cond[1:], 8, 0.5), b2.encode_prompt("").cuda()))
        assert stepper.captures == 1  # the stage switch did not re-capture
    graphed = fast_generate(b2, p, opts)
    again = fast_generate(b2, p, opts)  # the cached stepper: replays, no capture (issue item 9)
    print(f"CUDA graphs {dtype}: PSNR vs eager fast {psnr(graphed.image, eager.image):.1f} dB")
    assert psnr(graphed.image, eager.image) >= 40.0 and psnr(again.image, graphed.image) == float("inf")
    assert make_stepper(b2, opts, 7.5).captures == 1  # generate reuses the graph the denoise above captured


@pytest.mark.skipif(not CUDA, reason="needs CUDA (bench/gpu.sh runs it)")
@pytest.mark.parametrize("sampler, schedule", [("euler_a", "karras"), ("dpmpp_2m", "karras"), ("euler", "normal")])
def test_cuda_graphs_real_for_the_sigma_samplers(fresh, sampler, schedule):
    """Real CUDA graphs of a σ sampler's step (Euler a's noise, DPM++'s history and the fractional t in static buffers):
    one capture for the whole GBSD run, the image as the eager fast path's."""
    p = GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=0.5, steps=8, seed=3, sampler=sampler,
                         schedule=schedule, **SIZE)
    images = []
    for graphs in (False, True):
        b = fresh()
        b.unet.cuda(), b.vae.cuda(), b.text_encoder.cuda()
        opts = FastOptions(dtype=torch.float16, cache_context_kv=True, fuse_qkv=True, cuda_graphs=graphs)
        images.append(fast_generate(b, p, opts).image)
        if graphs:
            assert make_stepper(b, opts, 7.5, 0.0, sampler, schedule).captures == 1
    print(f"CUDA graphs {sampler} {schedule}: PSNR vs eager fast {psnr(images[1], images[0]):.1f} dB")
    assert psnr(images[1], images[0]) >= 40.0


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


def test_generate_runs_every_sampler_through_the_fast_stepper(fresh, plain):
    """make_stepper(..., sampler, schedule) runs that sampler (Euler a's noise from the run's generator, DPM++'s history
    across the switch): generate through it equals the plain generate within 1/255; a stepper of another sampler is
    refused by generate()."""
    from gbsd_core.pipeline import generate

    b = fresh()
    opts = FastOptions(cache_context_kv=True, fuse_qkv=True)
    for name, schedule in (("euler_a", "karras"), ("dpmpp_2m", "normal"), ("euler", "karras")):
        p = GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=0.5, steps=6, seed=3, sampler=name,
                             schedule=schedule, **SIZE)
        fast = fast_generate(b, p, opts)
        diff = np.abs(np.asarray(fast.image, np.int16) - np.asarray(generate(plain, p).image, np.int16)).max()
        print(f"generate {name} {schedule}, fast fp32 vs plain: max pixel diff {diff}/255")
        assert diff <= 1 and fast.boundary_sigma == generate(plain, p).boundary_sigma
    with make_stepper(b, opts, 7.5) as stepper, pytest.raises(ValueError, match="the stepper runs sampler 'ddim'"):
        generate(b, GenerationParams(PROMPT, steps=4, sampler="euler", **SIZE), stepper=stepper)
    assert make_stepper(b, opts, 7.5, 0.0, "euler") is not make_stepper(b, opts, 7.5)


# ----------------------------------------------------------------------------------------------------- recompiles
@pytest.fixture
def dynamo_reset():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_twelve_guidance_batch_size_variants_through_the_compiled_step(monkeypatch, dynamo_reset):
    """Issue item 4: every compiled stepper shares one compiled step function (dynamo keeps its graphs on the
    function's code). It specialised on every distinct guidance scale, batch and size, and under fullgraph=True the
    9th variant (torch's default recompile limit is 8) was a hard error. A long-running process — several CFG
    values, batches, sizes — must never crash: 12 variants here, each checked against the plain CFG step. The
    guidance is a tensor input now, so they need only the two shapes' compiles. (Dynamo alone, backend "eager": the
    recompiles are dynamo's; test_apply.py runs the step through aot_eager.)"""
    from _fast import compile_as, tiny_bundle

    compile_as(monkeypatch, "eager")
    b, plain = tiny_bundle(), tiny_bundle()  # same seed, same weights; `plain` is never accelerated
    opts = FastOptions(compile="default", cache_context_kv=True, cpu_prepack=False)
    worst, done = 0.0, 0
    for guidance in (2.0, 3.0, 4.5, 5.5, 7.5, 9.0):
        with make_stepper(b, opts, guidance) as step:
            for batch, hw in ((1, 8), (2, 16)):
                worst = max(worst, _step_vs_plain(step, plain, guidance, batch, hw, seed=done))
                done += 1
    print(f"12 (guidance, batch, size) variants through the compiled step: worst rel err vs CFGStep {worst:.2e}")
    assert done == 12 and worst <= 1e-4


def _step_vs_plain(step, plain, guidance, batch, hw, seed) -> float:
    """One step of `step` on random inputs against the plain CFGStep (the same sampler) on the same weights."""
    from gbsd_core.sampling import CFGStep

    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(2 * batch, 77, 48, generator=g)
    x = torch.randn(batch, 4, hw, hw, generator=g)
    step.sampler.timesteps(10)
    step.set_context(ctx)
    ref_step = CFGStep(plain.unet, step.sampler, guidance)
    ref_step.set_context(ctx)
    with torch.inference_mode():
        return rel_err(step.step(x, 3, None)[0], ref_step.step(x, 3, None, None)[0])


def test_past_the_recompile_limit_the_stepper_warns_and_runs_eager_steps(monkeypatch, dynamo_reset):
    """Beyond even the raised limit a new shape must not crash the process either: one warning, then eager steps
    that still compute the right thing. (The limit is lowered to 1 here so that the second shape is past it.)"""
    import torch._dynamo
    from _fast import compile_as, tiny_bundle

    import gbsd_core.fast.step as fast_step

    compile_as(monkeypatch, "eager")
    monkeypatch.setattr(fast_step, "RECOMPILE_LIMIT", 1)
    # (config.patch, not monkeypatch: pytest's undo deletes a config attribute, which hides it for good)
    key = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    b, plain = tiny_bundle(), tiny_bundle()
    with torch._dynamo.config.patch(**{key: 1}), \
            make_stepper(b, FastOptions(compile="default", cpu_prepack=False), 7.5) as step:
        err = _step_vs_plain(step, plain, 7.5, 1, 8, seed=0)
        with pytest.warns(UserWarning, match="recompile limit"):
            err = max(err, _step_vs_plain(step, plain, 7.5, 2, 8, seed=1))
        err = max(err, _step_vs_plain(step, plain, 7.5, 1, 16, seed=2))
    assert step._fn.eager and err <= 1e-4


# ----------------------------------------------------------------------------------------------------- outputs
def _cudagraph_like_compile(monkeypatch):
    """CPU stand-in for torch.compile in a mode with inductor's CUDA graphs: each call's outputs are written into the
    same memory (as a replay does), which the next call overwrites."""
    def compile_(fn, **_):
        outs: list[torch.Tensor] = []

        def replay(*args):
            results = fn(*args)
            if not outs:
                outs.extend(torch.empty_like(r) for r in results)
            for o, r in zip(outs, results):
                o.copy_(r)
            return tuple(outs)

        return replay

    monkeypatch.setattr(torch, "compile", compile_)


def test_earlier_step_outputs_survive_later_steps_under_modes_with_graphs(monkeypatch):
    """Issue item 5: a caller keeps every step's latents and x̂0 (previews, the StepStates). Under compile modes that
    bring inductor's CUDA graphs the compiled outputs were returned as they were, so the next replay overwrote them;
    our own graphs copy out of their static buffers. Every kept state must still equal the eager run's."""
    _cudagraph_like_compile(monkeypatch)
    unet = tiny_unet()
    with FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True) as reference:
        eager = gbsd_run(unet, reference, n=4)
    for name, stepper in [
        ("compile='reduce-overhead'", FastStepper(unet, None, 7.5, 0.0, compile_mode="reduce-overhead")),
        ("compile='max-autotune'", FastStepper(unet, None, 7.5, 0.0, compile_mode="max-autotune")),
        ("cuda_graphs (CPU stand-in)", FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True,
                                                   capture=eager_capture)),
    ]:
        kept = gbsd_run(unet, stepper, n=4)
        stepper.close()
        err = max_rel(kept, eager)
        print(f"{name}: kept states vs eager run {err:.2e}")
        assert err <= 1e-6, name


def test_aot_eager_traces_the_ancestral_and_multistep_steps(monkeypatch, dynamo_reset):
    """The σ samplers' steps (Euler a's noise input, DPM++'s history input, fractional t) through dynamo + AOTAutograd
    (fullgraph), as inductor would receive them: equal to the eager fast step, one compile for both samplers' runs."""
    from _fast import compile_as

    import torch._dynamo

    compile_as(monkeypatch, "aot_eager")
    unet = tiny_unet()
    for name in ("euler_a", "dpmpp_2m"):
        eager = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0), sampler=name, schedule="karras")
        # the first run compiles; the second sampler's whole run (its other stepper too) must not compile again
        with torch._dynamo.config.patch(error_on_recompile=name == "dpmpp_2m"):
            traced = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, compile_mode="default"), sampler=name,
                              schedule="karras")
        err = max_rel(traced, eager)
        print(f"{name} karras, aot_eager vs eager fast step: {err:.2e}")
        assert err <= 1e-6


def test_long_contexts_through_the_graphed_step():
    """Prompts of k 75-token chunks make contexts of 77·k positions (gbsd_core/prompts/): the graphed step (CPU stand-in
    for the capture) keys its buffers and cached K/V on that shape, one capture per length, and equals the eager
    stepper bit for bit and the plain CFGStep within 1e-5."""
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    sched = make_sampler(SD_SCHEDULE, "epsilon")
    ts = sched.timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=g)
    graphed = FastStepper(unet, sched, 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    for k in (3, 2, 3):  # 231, 154, 231 positions: the third run replays the first length's graph
        glob, focus, unc = (torch.randn(1, 77 * k, 48, generator=g) for _ in range(3))
        stages = gbsd_stages(glob, focus, 4, 0.5)
        runs = []
        for step in (CFGStep(unet, sched, 7.5), FastStepper(unet, sched, 7.5, 0.0, cache_context_kv=True), graphed):
            with torch.inference_mode():
                runs.append([s.latents for s in denoise(step, x, ts, stages, unc)])
            if hasattr(step, "close"):
                step.close()  # the K/V cache off the UNet: the next stepper (or the plain UNet) sets its own
        assert all(torch.equal(a, b) for a, b in zip(runs[2], runs[1]))
        assert max_rel(runs[2], runs[0]) <= 1e-5
    assert graphed.captures == 2

"""The stage schedule and the denoise loop, with a recording stand-in for the UNet (no weights needed)."""
from __future__ import annotations

import itertools

import pytest
import torch

from gbsd_core.ddim import DDIMSampler
from gbsd_core.sampling import (
    CFGStep,
    Stage,
    blend_embeddings,
    check_stages,
    denoise,
    focus_conditioning,
    gbsd_stages,
    layout_steps,
)


class RecordingModel:
    """Returns a deterministic function of (x, t, context) and records the context of every call."""

    def __init__(self):
        self.contexts: list[torch.Tensor] = []
        self.timesteps: list[int] = []

    def __call__(self, x, t, context):
        self.contexts.append(context.clone())
        self.timesteps.append(int(t[0]))
        return 0.1 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def _emb(value: float, rows: int = 1) -> torch.Tensor:
    return torch.full((rows, 77, 8), value)


@pytest.mark.parametrize(
    "n, layout, expected", [(50, 0.8, 40), (10, 0.7, 7), (5, 0.5, 3), (1, 0.8, 1), (1, 0.4, 0), (7, 1.0, 7), (7, 0.0, 0)]
)
def test_layout_steps_rounds_half_up(n, layout, expected):
    assert layout_steps(n, layout) == expected


def test_layout_steps_is_monotonic_in_the_layout_fraction_and_n():
    for n in range(1, 60):
        counts = [layout_steps(n, s / 100) for s in range(101)]
        assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == n
    for s in (0.25, 0.5, 0.7, 0.8, 0.95):
        counts = [layout_steps(n, s) for n in range(1, 200)]
        assert counts == sorted(counts)


def test_layout_steps_rejects_out_of_range():
    with pytest.raises(ValueError, match="layout fraction"):
        layout_steps(10, 1.5)


def test_focus_conditioning_is_the_papers_interpolation():
    g, loc = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    torch.testing.assert_close(focus_conditioning(g, loc, 0.3), 0.3 * g + 0.7 * loc)
    rows = focus_conditioning(g.expand(3, -1, -1), loc.expand(3, -1, -1), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(rows[0], loc[0])
    torch.testing.assert_close(rows[2], g[0])


def test_check_stages_rejects_gaps_and_wrong_totals():
    c = _emb(0)
    check_stages([Stage("a", range(0, 3), c), Stage("b", range(3, 5), c)], 5)
    with pytest.raises(ValueError, match="starting at 3"):
        check_stages([Stage("a", range(0, 3), c), Stage("b", range(4, 5), c)], 5)
    with pytest.raises(ValueError, match="cover 3 steps"):
        check_stages([Stage("a", range(0, 3), c)], 5)


@pytest.mark.parametrize(
    "steps, layout, strength",
    list(itertools.product([1, 2, 5, 10, 23, 50], [0.0, 0.3, 0.7, 0.8, 1.0], [1.0, 0.75, 0.5, 0.2])),
)
def test_every_step_uses_the_conditioning_the_schedule_says(steps, layout, strength):
    sched = DDIMSampler()
    try:
        timesteps = sched.timesteps(steps, strength)
    except ValueError:
        assert int(steps * strength) == 0  # nothing to run: the scheduler refuses, as it should
        return
    n = len(timesteps)
    assert n == int(steps * strength)
    g, loc, u = _emb(1.0), _emb(-1.0), _emb(0.25)
    alpha = 0.5
    focus = focus_conditioning(g, loc, alpha)
    model = RecordingModel()
    states = list(denoise(CFGStep(model, sched, 7.5), torch.randn(1, 4, 2, 2), timesteps, gbsd_stages(g, focus, n, layout), u))
    n_layout = layout_steps(n, layout)
    assert [s.step for s in states] == list(range(n))
    assert [s.timestep for s in states] == [int(t) for t in timesteps] == model.timesteps
    for i, (state, ctx) in enumerate(zip(states, model.contexts)):
        want = g if i < n_layout else focus
        assert state.stage == ("layout" if i < n_layout else "focus")
        torch.testing.assert_close(ctx[:1], u, rtol=0, atol=0)  # unconditional row identical in both stages
        torch.testing.assert_close(ctx[1:], want, rtol=0, atol=0)


def test_context_tensor_is_built_once_per_stage():
    sched = DDIMSampler()
    timesteps = sched.timesteps(6)
    model = RecordingModel()
    seen = []
    model_call = model.__call__

    def spy(x, t, context):
        seen.append(context.data_ptr())
        return model_call(x, t, context)

    list(denoise(CFGStep(spy, sched, 3.0), torch.randn(1, 4, 2, 2), timesteps, gbsd_stages(_emb(1), _emb(2), 6, 0.5), _emb(0)))
    assert len(set(seen[:3])) == 1 and len(set(seen[3:])) == 1 and seen[0] != seen[3]


def test_a_stage_switch_is_told_each_stage_before_its_conditioning_is_set():
    """`denoise(switch=)`: `enter(stage)` once per stage, at its first step, before the stepper gets the stage's
    conditioning (what the stepper derives from the weights then sees the switched ones), nothing in between."""
    sched = DDIMSampler()
    timesteps = sched.timesteps(6)
    events = []

    class Switch:
        def enter(self, stage):
            events.append(("enter", stage.name))

    class Step(CFGStep):
        def set_context(self, context, vector=None):
            events.append(("set_context", float(context[1, 0, 0])))
            super().set_context(context, vector)

        def step(self, latents, i, noise, prev_x0):
            events.append(("step", i))
            return super().step(latents, i, noise, prev_x0)

    list(denoise(Step(RecordingModel(), sched, 3.0), torch.randn(1, 4, 2, 2), timesteps,
                 gbsd_stages(_emb(1), _emb(2), 6, 0.5), _emb(0), switch=Switch()))
    assert events == [("enter", "layout"), ("set_context", 1.0), *(("step", i) for i in range(3)),
                      ("enter", "focus"), ("set_context", 2.0), *(("step", i) for i in range(3, 6))]


def test_branching_stage_equals_independent_runs_and_counts_evaluations():
    sched = DDIMSampler()
    n, layout = 10, 0.8
    timesteps = sched.timesteps(n)
    g, u = _emb(0.3), _emb(0.0)
    locals_ = [_emb(v) for v in (-1.0, 0.5, 2.0)]
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    focus_rows = torch.cat([focus_conditioning(g, loc, 0.4) for loc in locals_])
    model = RecordingModel()
    branched = list(denoise(CFGStep(model, sched, 5.0), x_T, timesteps, gbsd_stages(g, focus_rows, n, layout), u))
    calls = sum(c.shape[0] // 2 for c in model.contexts)
    n_layout = layout_steps(n, layout)
    assert calls == n_layout + len(locals_) * (n - n_layout)
    for k, row in enumerate(focus_rows):
        single = list(denoise(CFGStep(RecordingModel(), sched, 5.0), x_T, timesteps, gbsd_stages(g, row[None], n, layout), u))
        torch.testing.assert_close(branched[-1].latents[k : k + 1], single[-1].latents, rtol=1e-6, atol=1e-6)


def test_eta_noise_is_shared_across_branches():
    sched = DDIMSampler()
    n = 8
    timesteps = sched.timesteps(n)
    g, u = _emb(0.3), _emb(0.0)
    rows = torch.cat([_emb(-1.0), _emb(1.0)])
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(5)
    branched = list(denoise(CFGStep(RecordingModel(), sched, 2.0, 1.0), x_T, timesteps, gbsd_stages(g, rows, n, 0.5), u, generator=gen))
    for k in range(2):
        gen = torch.Generator().manual_seed(5)
        single = list(
            denoise(CFGStep(RecordingModel(), sched, 2.0, 1.0), x_T, timesteps, gbsd_stages(g, rows[k : k + 1], n, 0.5), u, generator=gen)
        )
        torch.testing.assert_close(branched[-1].latents[k : k + 1], single[-1].latents, rtol=1e-6, atol=1e-6)


def test_guidance_scale_one_runs_without_the_unconditional_batch():
    sched = DDIMSampler()
    model = RecordingModel()
    list(denoise(CFGStep(model, sched, 1.0), torch.randn(1, 4, 2, 2), sched.timesteps(3), [Stage("g", range(3), _emb(1))], _emb(0)))
    assert all(c.shape[0] == 1 for c in model.contexts)


def test_mismatched_branch_is_refused():
    sched = DDIMSampler()
    stages = [Stage("a", range(2), torch.cat([_emb(0)] * 2)), Stage("b", range(2, 3), torch.cat([_emb(1)] * 3))]
    with pytest.raises(ValueError, match="3 conditionings for 2 latents"):
        list(denoise(CFGStep(RecordingModel(), sched, 1.0), torch.randn(1, 4, 2, 2), sched.timesteps(3), stages, None))


def test_blend_embeddings_is_exact_at_the_ends_and_the_same_bits_alone_or_batched():
    a, b = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    assert torch.equal(blend_embeddings(a, b, 0.0), a) and torch.equal(blend_embeddings(a, b, 1.0), b)
    torch.testing.assert_close(blend_embeddings(a, b, 0.25), 0.75 * a + 0.25 * b)
    mixes = [0.0, 1 / 3, 2 / 3, 1.0]
    rows = blend_embeddings(a.expand(4, -1, -1), b, torch.tensor(mixes))  # a rack's K rows at once
    for k, m in enumerate(mixes):
        assert torch.equal(rows[k:k + 1], blend_embeddings(a, b, m))  # bit for bit: frames equal their own runs


def test_step_states_carry_no_sigma_for_ddim():
    sched = DDIMSampler()
    states = list(denoise(CFGStep(RecordingModel(), sched, 2.0), torch.randn(1, 4, 2, 2), sched.timesteps(3),
                          [Stage("g", range(3), _emb(1))], _emb(0)))
    assert [s.sigma for s in states] == [None, None, None]  # DDIM steps by timestep; σ-based samplers set it


def test_eta_noise_is_drawn_once_per_run_with_the_per_step_draws():
    """η > 0: the run's noise is drawn when it starts and reaches the device in one copy (pinned and non-blocking on
    CUDA), not one blocking copy per step. The draws are those one per step makes, in step order (a hand-written loop
    here, 3×3 latents: 36 values per draw, not a multiple of CPU randn's 16-value blocks), so a seed keeps its image."""
    sched = DDIMSampler()
    n = 6
    timesteps = sched.timesteps(n)
    g, u = _emb(0.3), _emb(0.0)
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []

    class Spy(CFGStep):
        def step(self, latents, i, noise, prev_x0):
            seen.append(noise)
            return super().step(latents, i, noise, prev_x0)

    states = list(denoise(Spy(RecordingModel(), sched, 2.0, 1.0), x_T, timesteps, [Stage("g", range(n), g)], u,
                          generator=torch.Generator().manual_seed(5)))
    gen, x, step = torch.Generator().manual_seed(5), x_T, CFGStep(RecordingModel(), sched, 2.0, 1.0)
    step.set_context(torch.cat([u, g]))
    for i, t in enumerate(timesteps):
        noise = torch.randn(x_T.shape, generator=gen)
        assert torch.equal(seen[i], noise), i
        x, _ = step.step(x, i, noise, None)
        assert torch.equal(states[i].latents, x), i
    assert len({s.untyped_storage().data_ptr() for s in seen}) == 1  # views into one buffer: one draw, one copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it)")
def test_cuda_eta_noise_comes_from_the_cpu_generator_in_one_copy():
    """On CUDA the run's noise is drawn on the CPU generator (same image on any device), pinned, moved once."""
    sched = DDIMSampler()
    timesteps = sched.timesteps(4)
    g, u = _emb(0.3).cuda(), _emb(0.0).cuda()
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    seen = []

    class Spy(CFGStep):
        def step(self, latents, i, noise, prev_x0):
            seen.append(noise)
            return super().step(latents, i, noise, prev_x0)

    list(denoise(Spy(RecordingModel(), sched, 2.0, 1.0), x_T.cuda(), timesteps, [Stage("g", range(4), g)], u,
                 generator=torch.Generator().manual_seed(5)))
    gen = torch.Generator().manual_seed(5)
    for noise in seen:
        assert noise.is_cuda and torch.equal(noise.cpu(), torch.randn(x_T.shape, generator=gen))
    assert len({n.untyped_storage().data_ptr() for n in seen}) == 1

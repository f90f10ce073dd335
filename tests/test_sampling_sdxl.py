"""The SDXL side of the conditioning seam (gbsd_core/sampling.py): `Conditioning` (context + pooled + micro), the
focus interpolation of both text parts with the size embeddings kept, and what the denoise loop hands the model."""
from __future__ import annotations

import torch

from gbsd_core.ddim import DDIMSampler
from gbsd_core.sampling import (
    CFGStep,
    Conditioning,
    Stage,
    cat_conditioning,
    denoise,
    focus_conditioning,
    gbsd_stages,
)


class RecordingSDXLModel:
    """A deterministic function of (x, t, context, y) that records every call's context and y."""

    def __init__(self):
        self.contexts: list[torch.Tensor] = []
        self.vectors: list[torch.Tensor] = []

    def __call__(self, x, t, context, y):
        self.contexts.append(context.clone())
        self.vectors.append(y.clone())
        return 0.1 * x + (context.mean(dim=(1, 2)) + y.mean(dim=1)).view(-1, 1, 1, 1)


def _cond(value: float, rows: int = 1, micro: float = 7.0) -> Conditioning:
    return Conditioning(torch.full((rows, 77, 8), value), torch.full((rows, 4), 2 * value), torch.full((rows, 3), micro))


def test_vector_is_pooled_then_micro():
    c = Conditioning(torch.zeros(2, 77, 8), torch.ones(2, 4), torch.full((2, 3), 5.0))
    assert torch.equal(c.vector, torch.tensor([[1.0] * 4 + [5.0] * 3] * 2))
    assert Conditioning(torch.zeros(1, 77, 8)).vector is None
    both = cat_conditioning([c, c.map(lambda t: t + 1)])
    assert both.context.shape == (4, 77, 8) and torch.equal(both.pooled[2:], c.pooled + 1)


def test_focus_mixes_context_and_pooled_and_keeps_the_size_embeddings_bit_for_bit():
    g = Conditioning(torch.randn(1, 77, 8), torch.randn(1, 4), torch.randn(1, 3))
    loc = Conditioning(torch.randn(1, 77, 8), torch.randn(1, 4), torch.randn(1, 3))
    f = focus_conditioning(g, loc, 0.3)
    torch.testing.assert_close(f.context, 0.3 * g.context + 0.7 * loc.context, rtol=0, atol=0)
    torch.testing.assert_close(f.pooled, 0.3 * g.pooled + 0.7 * loc.pooled, rtol=0, atol=0)
    assert torch.equal(f.micro, g.micro)  # not α·s + (1−α)·s, which rounds
    rows = focus_conditioning(g, loc, torch.tensor([0.0, 0.5, 1.0]))  # a sweep's K rows from one global row
    assert rows.context.shape == (3, 77, 8) and rows.micro.shape == (3, 3)
    assert torch.equal(rows.pooled[0], loc.pooled[0]) and torch.equal(rows.pooled[2], g.pooled[0])
    assert torch.equal(rows.micro, g.micro.expand(3, -1))
    # plain tensors (SD1/SD2) still mix as before and stay tensors
    assert isinstance(focus_conditioning(g.context, loc.context, 0.3), torch.Tensor)


def test_every_step_gets_the_stage_vector_with_cfg():
    sched = DDIMSampler()
    n, layout = 6, 0.5
    g, loc, u = _cond(1.0), _cond(-1.0), _cond(0.0, micro=3.0)  # the negative row has its own micro (refiner)
    focus = focus_conditioning(g, loc, 0.25)
    model = RecordingSDXLModel()
    states = list(denoise(CFGStep(model, sched, 7.5), torch.randn(1, 4, 2, 2), sched.timesteps(n),
                          gbsd_stages(g, focus, n, layout), u))
    assert len(states) == len(model.vectors) == n
    for i, (ctx, y) in enumerate(zip(model.contexts, model.vectors)):
        want = g if i < 3 else focus
        assert torch.equal(y[:1], u.vector) and torch.equal(ctx[:1], u.context)  # [uncond; cond], uncond fixed
        assert torch.equal(y[1:], want.vector) and torch.equal(ctx[1:], want.context)
    assert torch.equal(model.vectors[3][1:, 4:], model.vectors[0][1:, 4:])  # the micro part does not switch
    assert not torch.equal(model.vectors[3][1:, :4], model.vectors[0][1:, :4])  # the pooled part does


def test_branching_repeats_vectors_and_plain_tensors_call_without_y():
    sched = DDIMSampler()
    model = RecordingSDXLModel()
    stages = [Stage("layout", range(2), _cond(0.5)), Stage("focus", range(2, 4), cat_conditioning([_cond(1), _cond(2)]))]
    list(denoise(CFGStep(model, sched, None), torch.randn(1, 4, 2, 2), sched.timesteps(4), stages))
    assert [y.shape[0] for y in model.vectors] == [1, 1, 2, 2]
    calls = []
    list(denoise(CFGStep(lambda x, t, c: calls.append(c) or x, sched, None), torch.randn(1, 4, 2, 2),
                 sched.timesteps(2), [Stage("g", range(2), torch.zeros(1, 77, 8))]))
    assert len(calls) == 2  # an SD1/SD2 model is called with (x, t, context) only

"""Every sampler × σ schedule through the fast step (gbsd_core/fast/step.py), eager, compiled and CUDA-graphed (the
CPU stand-in for the capture), against the plain `CFGStep` on the same tiny UNet, on a GBSD run with its stage switch
and on a sweep whose focus stage branches the batch (Euler a's noise and DPM++'s history branched with it), in fp32:

- in lockstep (each fast step from the plain run's own input latents, noise and history): within 1e-6 relative, the
  rounding of the coefficient form;
- whole runs (each path on its own latents): every step within 1e-5 relative. A random UNet amplifies a difference in
  its input ~20-60x per step, and a v-prediction one the most: there the bound is 2e-5 (DDIM's fast form, unchanged
  since it was first written, measures 5-7e-6 on the same v-model).

The compiled step (dynamo, fullgraph, a counting eager backend) compiles once per shape for all samplers together:
never again across steps, at the stage switch, between first- and second-order DPM++ steps, or for another sampler."""
from __future__ import annotations

import pytest
import torch
from _fast import gbsd_run, max_rel, tiny_unet
from _util import rel_err

from gbsd_core.fast.step import FastStepper, eager_capture
from gbsd_core.sampling import CFGStep

COMBOS = [("ddim", "normal", "epsilon")] + [(name, schedule, "epsilon") for name in ("euler", "euler_a", "dpmpp_2m")
                                             for schedule in ("normal", "karras")] + [("dpmpp_2m", "karras",
                                                                                        "v_prediction")]
STEP_TOL, RUN_TOL, RUN_TOL_V = 1e-6, 1e-5, 2e-5


class Lockstep:
    """A stepper that runs the plain CFGStep and a fast stepper on the same inputs at every step, keeps the fast one's
    error, and hands the plain result on (so the run follows the plain trajectory)."""

    def __init__(self, reference, fast: FastStepper) -> None:
        self.unet, self.fast, self.errs = reference, fast, []
        self.guidance_scale, self.eta = fast.guidance_scale, fast.eta

    @property
    def sampler(self):
        return self.fast.sampler

    @sampler.setter
    def sampler(self, sampler) -> None:
        self.fast.sampler = sampler
        self.plain = CFGStep(self.unet, sampler, self.guidance_scale)

    def set_context(self, context, vector=None) -> None:
        self.plain.set_context(context)
        self.fast.set_context(context)

    def step(self, latents, i, noise, prev_x0):
        ref = self.plain.step(latents, i, noise, prev_x0)
        mine = self.fast.step(latents, i, noise, prev_x0)
        self.errs.append(max(rel_err(mine[0], ref[0]), rel_err(mine[1], ref[1])))
        return ref


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()  # the fast steppers' (its attention swapped for FastCrossAttention, with the K/V cache)


@pytest.fixture(scope="module")
def reference():
    return tiny_unet()  # the same weights, never touched by the fast path: the plain CFGStep's


@pytest.fixture(scope="module")
def compiles():
    """torch.compile with dynamo (fullgraph, as the stepper asks) and an eager backend that counts the graphs it is
    given: one per new (shape, CFG) variant of the shared step, whatever the sampler."""
    import torch._dynamo

    count = [0]

    def counting(gm, example_inputs):
        count[0] += 1
        return gm.forward

    real = torch.compile
    torch.compile = lambda fn, **kw: real(fn, backend=counting, fullgraph=kw["fullgraph"], dynamic=kw.get("dynamic"))
    torch._dynamo.reset()
    try:
        yield count
    finally:
        torch.compile = real
        torch._dynamo.reset()


def _runs(unet, reference, make, name, schedule, prediction_type):
    """(GBSD run, sweep) latents through the stepper `make()` gives, and the worst lockstep error of its steps on the
    same two runs; each stepper closed after its run."""
    out, lockstep = [], 0.0
    for rows in (1, 3):
        stepper = make()
        out.append(gbsd_run(unet, stepper, rows=rows, sampler=name, schedule=schedule,
                            prediction_type=prediction_type))
        stepper.close()
        locked = Lockstep(reference, make())
        gbsd_run(unet, locked, rows=rows, sampler=name, schedule=schedule, prediction_type=prediction_type)
        locked.fast.close()
        lockstep = max(lockstep, *locked.errs)
    return out, lockstep


@pytest.mark.parametrize("name, schedule, prediction_type", COMBOS)
def test_fast_eager_compiled_and_graphed_equal_the_plain_step(unet, reference, compiles, name, schedule,
                                                               prediction_type):
    plain = [gbsd_run(reference, rows=rows, sampler=name, schedule=schedule, prediction_type=prediction_type)
             for rows in (1, 3)]
    assert max_rel(plain[1][:3], [x[:1] for x in plain[0][:3]]) == 0.0  # the layout stage runs un-branched
    # Each variant on its own stepper; the K/V cache on, as the fast path runs it.
    variants = {
        "eager": lambda: FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True),
        "compiled": lambda: FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, compile_mode="default"),
        "graphed": lambda: FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, capture=eager_capture),
    }
    before = compiles[0]
    errs, steps = {}, {}
    for label, make in variants.items():
        (gbsd, sweep), steps[label] = _runs(unet, reference, make, name, schedule, prediction_type)
        errs[label] = max(max_rel(gbsd, plain[0]), max_rel(sweep, plain[1]))
    print(f"{name} {schedule} {prediction_type}, fast vs plain CFGStep (GBSD switch at 3 of 6, and a 3-row sweep): "
          + ", ".join(f"{k} step {steps[k]:.1e} run {errs[k]:.1e}" for k in variants))
    assert all(e <= STEP_TOL for e in steps.values()), steps
    assert all(e <= (RUN_TOL_V if prediction_type == "v_prediction" else RUN_TOL) for e in errs.values()), errs
    # Compiled once per shape (batch 1 and the branched batch 3) for the whole module: only the first case compiles.
    assert compiles[0] - before == (2 if before == 0 else 0), (before, compiles[0])


def test_the_graphed_step_keeps_dpmpp_history_in_its_buffer_and_never_recaptures(unet):
    """DPM++ 2M's previous x̂_0 is a static buffer of the graph: the run's first step (first order, zeros there), the
    second-order steps and the stage switch all replay the one graph, which equals the eager stepper bit for bit."""
    eager = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True), sampler="dpmpp_2m",
                     schedule="karras")
    graphed = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    seen = []
    real = graphed._graphed
    graphed._graphed = lambda x, t, coefs, noise, prev: (seen.append(float(prev.abs().max())),
                                                          real(x, t, coefs, noise, prev))[1]
    out = gbsd_run(unet, graphed, sampler="dpmpp_2m", schedule="karras")
    graphed.close()
    assert all(torch.equal(a, b) for a, b in zip(out, eager)) and graphed.captures == 1
    assert seen[0] == 0.0 and all(v > 0 for v in seen[1:])  # step 0 has no history; every later step has one
    (g,) = graphed._graphs.values()
    assert g.prev_x0.abs().max() > 0  # the last step's history went through the static buffer

"""The fast stepper's lifecycle (gbsd_core/fast/step.py): CUDA-graph memory pools across `release()` and eviction, and
a stepper that follows another one on the same UNet. Both were crashes reachable from the public API (issue 19); the
pool one is checked on the CPU through a stand-in for torch's CUDA-graph API that keeps the caching allocator's pool
rules, and on a real GPU where there is one."""
from __future__ import annotations

import contextlib

import pytest
import torch
from _fast import CUDA, gbsd_run, max_rel, tiny_unet
from _util import rel_err

from gbsd_core.ddim import DDIMSampler
from gbsd_core.fast.step import CudaGraphCapture, FastStepper, eager_capture
from gbsd_core.noise_schedule import SD as SD_SCHEDULE
from gbsd_core.samplers import make_sampler


# ----------------------------------------------------------------------------------------------------- graph pools
class _Pools:
    """The caching allocator's private pools as CUDA-graph capture uses them (c10/cuda/CUDACachingAllocator.cpp,
    create_or_incref_pool / releasePool): a capture without a pool makes a new one (use count 1); a capture into an
    existing pool asserts that its use count is > 0, then increments it; a destroyed graph decrements it. A pool whose
    count reached 0 stays registered (until empty_cache frees its memory), so a capture into it trips the assert."""

    def __init__(self) -> None:
        self.use_count: dict[tuple[int, int], int] = {}

    def begin(self, pool: tuple[int, int] | None) -> tuple[int, int]:
        if pool is None:
            pool = (0, len(self.use_count) + 1)
            self.use_count[pool] = 1
        elif pool in self.use_count:
            if self.use_count[pool] <= 0:
                raise RuntimeError("INTERNAL ASSERT FAILED at CUDACachingAllocator.cpp: it->second->use_count > 0")
            self.use_count[pool] += 1
        else:
            self.use_count[pool] = 1
        return pool

    def live(self) -> dict[tuple[int, int], int]:
        return {pool: n for pool, n in self.use_count.items() if n > 0}


def _fake_cuda_graphs(monkeypatch) -> _Pools:
    """torch.cuda's Stream / stream / current_stream / CUDAGraph / graph, enough for CudaGraphCapture on a CPU. A
    "replay" does nothing (nothing was recorded): these tests are about pools, not values."""
    pools = _Pools()

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    class Graph:
        def __init__(self) -> None:
            self._pool = None

        def pool(self):
            return self._pool

        def replay(self) -> None:
            pass

        def __del__(self) -> None:  # CUDAGraph::reset -> releasePool
            if self._pool is not None:
                pools.use_count[self._pool] -= 1

    @contextlib.contextmanager
    def graph(g: Graph, pool=None, **_):
        g._pool = pools.begin(pool)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return pools


def _step(stepper: FastStepper, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    stepper.set_context(torch.randn(2 * rows, 77, 48, generator=g))
    with torch.inference_mode():
        return stepper.step(torch.randn(rows, 4, 8, 8, generator=g), 0, None)[0]


def test_graph_pools_across_eviction_and_release(monkeypatch):
    """Issue 19: with max_graphs=1 a new shape evicted the only graph before capturing into its pool, and after
    release() the next capture reused the pool handle of graphs that were all gone: both captures went into a pool
    no graph held any more, which trips the allocator's `use_count > 0` assert. Now the new graph is captured into
    the pool while the old one still holds it, and evicted after; a capture after release() starts a fresh pool."""
    pools = _fake_cuda_graphs(monkeypatch)
    unet = tiny_unet()
    sampler = make_sampler(SD_SCHEDULE, "epsilon", "ddim", "normal")
    sampler.timesteps(4)
    stepper = FastStepper(unet, sampler, 7.5, 0.0, cache_context_kv=True, capture=CudaGraphCapture(warmup=1),
                          max_graphs=1)
    _step(stepper, rows=1)
    (first,) = pools.live()
    _step(stepper, rows=3)  # a new shape past max_graphs: captured into the same pool, then the old graph goes
    _step(stepper, rows=1)  # and back
    assert stepper.captures == 3 and len(stepper._graphs) == 1 and pools.live() == {first: 1}
    stepper.release()
    assert pools.live() == {}
    _step(stepper, rows=1)  # a new capture round: a pool of its own
    assert stepper.captures == 4 and list(pools.live()) != [first] and len(pools.live()) == 1
    print(f"pools used: {sorted(pools.use_count)}, live after the last capture: {pools.live()}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA (bench/gpu.sh runs it)")
def test_cuda_graph_pools_across_eviction_and_release():
    """The same on a GPU, with real graphs: every step's latents equal the eager stepper's."""
    torch.manual_seed(0)
    unet = tiny_unet().cuda()
    sampler = make_sampler(SD_SCHEDULE, "epsilon", "ddim", "normal")
    sampler.timesteps(4)
    graphed = FastStepper(unet, sampler, 7.5, 0.0, cache_context_kv=True, capture=CudaGraphCapture(), max_graphs=1)
    eager = FastStepper(unet, sampler, 7.5, 0.0, cache_context_kv=True)
    worst = 0.0
    for round_ in range(2):
        for seed, rows in enumerate((1, 3, 1)):
            worst = max(worst, rel_err(_step(graphed, rows, seed), _step(eager, rows, seed)))
        graphed.release()
    print(f"CUDA graphs across eviction and release vs eager: worst rel err {worst:.2e}")
    assert graphed.captures == 6 and worst <= 1e-5


# ----------------------------------------------------------------------------------------------------- two steppers
def test_a_stepper_after_an_unclosed_graphed_one_runs_outside_inference_mode():
    """Issue 19: a graphed stepper that was not closed leaves its K/V buffers (inference tensors) on the UNet. A second
    stepper's set_context then wrote its K/V into them in place outside inference mode when the caller drove
    `denoise` outside it ("Inplace update to inference tensor outside InferenceMode"). Its run must equal the same
    stepper's run on a UNet nobody used before, and the graphed stepper's next run its first."""
    unet = tiny_unet()
    graphed = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, capture=eager_capture)
    graphed_run = gbsd_run(unet, graphed)  # not closed: its K/V buffers stay installed
    with FastStepper(tiny_unet(), None, 7.5, 0.0, cache_context_kv=True) as reference:
        expected = gbsd_run(reference.unet, reference)
    second = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True)
    err = max_rel(gbsd_run(unet, second, inference=False), expected)
    print(f"second stepper outside inference mode vs a fresh UNet's run: {err:.2e}")
    assert err <= 1e-6
    assert max_rel(gbsd_run(unet, graphed), graphed_run) == 0.0  # its own K/V recomputed, not the second's

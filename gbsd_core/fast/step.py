"""The fast CFG + DDIM step: one function for the whole step (UNet on [x; x], guidance, DDIM update), run eagerly,
through torch.compile, or replayed from a CUDA graph.

The readable step is `sampling.CFGStep` (core); this one computes the same thing in a form that compiles and captures:

- the DDIM update is written with per-timestep coefficients held in a tensor (`ddim_coefficients`), so neither
  torch.compile nor a CUDA graph sees a Python float that changes every step (no recompiles, nothing baked in);
- the η-noise is always an input (zeros when η = 0), the timestep an input tensor;
- with CUDA graphs every input lives in a static buffer. A GBSD stage switch is a copy of the new [uncond; cond]
  context into the static context buffer (and, with the K/V cache, an in-place update of the cached cross-attention
  K/V that the graph reads), never a re-capture. Only a new shape (a sweep's focus stage branching the batch, another
  image size) captures again; one graph is kept at a time, because the K/V cache's storage is re-allocated with it.

The capture itself is `cuda_graph_capture`, a few lines; everything else (buffers, copies, stage switches) is plain
tensor code that `FastStepper(capture=eager_capture)` exercises on CPU, where "replay" runs the step on the buffers.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .attention import FastCrossAttention, set_context_kv, swap_attention

if TYPE_CHECKING:
    from torch.nn.attention import SDPBackend

    from ..ddim import DDIMScheduler
    from ..unet import UNetModel

# capture(body) runs `body` as needed to record it and returns a replay function
Capture = Callable[[Callable[[], None]], Callable[[], None]]


def ddim_coefficients(scheduler: DDIMScheduler, t: int, eta: float) -> Tensor:
    """[c_x, c_out, d_x, d_out, σ] in float64, such that for this step

        x_prev = c_x·x_t + c_out·out + σ·z        x̂_0 = d_x·x_t + d_out·out

    (out = the guided model output, ε or v). DDIM's update is linear in (x_t, out) for both prediction types (see
    ddim.py), so the coefficients are the scheduler's own `step()` evaluated on unit inputs in float64: one source of
    truth for the math. Needs `scheduler.timesteps(n)` called first, like `step()`.
    """
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    c_x, d_x = scheduler.step(zero, t, one, eta=eta, noise=zero)
    c_out, d_out = scheduler.step(one, t, zero, eta=eta, noise=zero)
    return torch.cat([c_x, c_out, d_x, d_out, torch.tensor([scheduler.sigma(t, eta)], dtype=torch.float64)])


def cfg_ddim_step(unet: UNetModel, x: Tensor, t_in: Tensor, context: Tensor, coefs: Tensor, noise: Tensor,
                  guidance_scale: float | None, channels_last: bool,
                  vector: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step. x, noise: [B,4,h,w] fp32; t_in: [2B] (CFG) or [B] long; context: [2B or B,77,D] in the UNet's dtype;
    coefs: [5] fp32 from `ddim_coefficients`; vector: SDXL's y [2B or B, adm] (else None). -> (x_prev, x̂_0), fp32
    [B,4,h,w]."""
    x_in = torch.cat([x, x]) if guidance_scale is not None else x
    if channels_last:
        x_in = x_in.contiguous(memory_format=torch.channels_last)
    out = unet(x_in, t_in, context, vector).float()
    if guidance_scale is not None:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    x_prev = coefs[0] * x + coefs[1] * out + coefs[4] * noise
    x0 = coefs[2] * x + coefs[3] * out
    return x_prev, x0


def compile_step(mode: str, device: torch.device) -> Callable:
    """torch.compile of `cfg_ddim_step`, compiled once per shape: every per-step value is a tensor input, so the 50
    steps share one graph. fullgraph: a graph break would leave parts in Python (and break CUDA-graph capture).

    On CPU the modes mean little (no CUDA graphs, no Triton autotuning); what makes compiled convolutions and matmuls
    fast there is inductor's *freezing*: the weights become constants, pre-packed once for oneDNN. So on CPU every
    mode compiles with freezing (and "max-autotune" also autotunes its GEMM templates). Frozen weights are baked in:
    loading other weights afterwards needs a new stepper.
    """
    if device.type == "cpu":
        options = {"freezing": True, "max_autotune": mode == "max-autotune"}
        return torch.compile(cfg_ddim_step, options=options, fullgraph=True, dynamic=False)
    return torch.compile(cfg_ddim_step, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)


def eager_capture(body: Callable[[], None]) -> Callable[[], None]:
    """CPU stand-in for a CUDA graph: nothing is recorded, "replay" runs the body again on the static buffers."""
    return body


def cuda_graph_capture(body: Callable[[], None], warmup: int = 2) -> Callable[[], None]:
    """Record `body` into a CUDA graph and return its replay. The warm-up runs on a side stream first, as PyTorch's
    CUDA-graph notes require (lazy initialisation, cuBLAS/cuDNN workspace and algorithm choice happen outside the
    capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


@dataclass
class _Graph:
    """Static buffers of one captured step (one shape) and its replay function."""

    key: tuple
    x: Tensor
    t_in: Tensor
    context: Tensor
    coefs: Tensor
    noise: Tensor
    x_prev: Tensor
    x0: Tensor
    replay: Callable[[], None] | None = None
    kv_storage: list[int] | None = None  # data_ptr of each cached K the graph reads (K/V cache on)


class FastStepper:
    """A `sampling.Stepper` running `cfg_ddim_step` eagerly, compiled (`compile_mode`), and/or from a CUDA graph
    (`capture`). Latents stay fp32 whatever the UNet's dtype. Made by `fast.make_stepper`; call `close()` (or use it
    as a context manager) to drop the K/V cache it installs on the UNet."""

    def __init__(self, unet: UNetModel, scheduler: DDIMScheduler, guidance_scale: float | None, eta: float, *,
                 cache_context_kv: bool = False, channels_last: bool = False, compile_mode: str | None = None,
                 capture: Capture | None = None, sdpa_backend: SDPBackend | None = None) -> None:
        self.unet, self.scheduler, self.guidance_scale, self.eta = unet, scheduler, guidance_scale, eta
        self.cache_context_kv, self.channels_last, self.capture = cache_context_kv, channels_last, capture
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._sdpa_backend = sdpa_backend
        self._fn = cfg_ddim_step
        if compile_mode is not None:
            self._fn = compile_step(compile_mode, self.device)
        self._attn2: list[FastCrossAttention] = []
        if cache_context_kv:
            # The K/V cache lives in FastCrossAttention (`accelerate` has swapped it in already; swapping is idempotent).
            swap_attention(unet)
            self._attn2 = [site.module for site in unet.attention_sites()]
        self._context: Tensor | None = None
        self._vector: Tensor | None = None  # SDXL's y
        self._context_dirty = False
        self._coefs: dict[tuple[int, int | None], Tensor] = {}  # (t, n) -> device fp32 [5]
        self._graph: _Graph | None = None
        self.captures = 0  # graphs recorded so far (tests check stage switches do not add any)

    # ----------------------------------------------------------------- Stepper protocol
    def set_context(self, context: Tensor, vector: Tensor | None = None) -> None:
        # [2B or B, 77, D] -> the UNet's device and dtype, once per stage. Always a fresh inference-mode tensor: a
        # compiled step guards on such tensor properties and would otherwise compile twice.
        if vector is not None and self.capture is not None:
            raise NotImplementedError("CUDA-graph capture of SDXL's vector conditioning is not implemented yet")
        with torch.inference_mode():
            self._context = context.to(self.device, self.dtype, copy=True)
            self._vector = None if vector is None else vector.to(self.device, self.dtype, copy=True)
        if self.capture is not None:
            self._context_dirty = True  # copied into the static buffer at the next step (its shape may be new)
        elif self.cache_context_kv:
            set_context_kv(self.unet, self._context)

    def __call__(self, latents: Tensor, t: int, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        if self._context is None:
            raise RuntimeError("set_context() must be called before the first step")
        with torch.inference_mode():
            x = latents.to(self.device, torch.float32, copy=True)  # fresh inference tensors (see set_context)
            noise = torch.zeros_like(x) if noise is None else noise.to(self.device, torch.float32, copy=True)
            coefs = self._coefficients(t)
            if self.capture is not None:
                return self._graphed(x, t, coefs, noise)
            if not self._kv_cached_for(self._context):
                # Another stepper (or a caller) re-pointed the UNet's K/V cache; compiled code no longer checks the
                # context's identity, so re-install ours here, in Python.
                set_context_kv(self.unet, self._context)
            t_in = torch.full((self._context.shape[0],), t, device=self.device, dtype=torch.long)
            with self._attention_backend():
                return self._fn(self.unet, x, t_in, self._context, coefs, noise, self.guidance_scale,
                                self.channels_last, self._vector)

    def step(self, latents: Tensor, i: int, noise: Tensor | None,
             prev_x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Executed step i of the scheduler's run (the loop's entry, `sampling.Stepper.step`): DDIM only for now, a
        single-step sampler, so `prev_x0` is unused."""
        if getattr(self.scheduler, "name", "ddim") != "ddim":
            raise ValueError(f"the fast step runs DDIM only; sampler {self.scheduler.name!r} runs with the plain "
                             "CFGStep")
        return self(latents, int(self.scheduler.run_timesteps[i]), noise)

    # ----------------------------------------------------------------- helpers
    def close(self) -> None:
        """Drop the cross-attention K/V cache and the graph; the UNet is usable by plain callers again."""
        if self.cache_context_kv:
            set_context_kv(self.unet, None)
        self._graph = None
        self._context = None

    def __enter__(self) -> FastStepper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _attention_backend(self):
        if self._sdpa_backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._sdpa_backend)

    def _kv_cached_for(self, context: Tensor) -> bool:
        return all(attn.context_kv is not None and attn.context_kv[0] is context for attn in self._attn2)

    def _kv_storage(self) -> list[int]:
        return [attn.context_kv[1].data_ptr() for attn in self._attn2]

    def _coefficients(self, t: int) -> Tensor:
        # One host->device copy per (timestep, schedule length), not per step of every run.
        key = (t, self.scheduler.num_inference_steps)
        if key not in self._coefs:
            self._coefs[key] = ddim_coefficients(self.scheduler, t, self.eta).to(self.device, torch.float32)
        return self._coefs[key]

    def _graphed(self, x: Tensor, t: int, coefs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        key = (tuple(x.shape), tuple(self._context.shape))
        g = self._graph if self._graph is not None and self._graph.key == key else None
        if g is not None and (self._context_dirty or not self._kv_cached_for(g.context)):
            # Stage switch (or another user re-pointed the UNet's K/V cache): copy, recompute K/V in place.
            self._switch_context(g)
            if self._kv_storage() != g.kv_storage:
                g = None  # the K/V storage moved: the graph would read freed memory, so capture again
        if g is None:
            self._graph = None  # free the old graph first (its pool and buffers)
            g = _Graph(key, x.clone(), torch.full((self._context.shape[0],), t, device=self.device, dtype=torch.long),
                       self._context.clone(), coefs.clone(), noise.clone(), torch.empty_like(x), torch.empty_like(x))
            self._switch_context(g)
            g.kv_storage = self._kv_storage()
            with self._attention_backend():
                g.replay = self.capture(lambda: self._body(g))
            self.captures += 1
            self._graph = g
        g.x.copy_(x)
        g.t_in.fill_(t)
        g.coefs.copy_(coefs)
        g.noise.copy_(noise)
        g.replay()
        # The buffers are overwritten by the next replay; callers (and the yielded StepStates) keep their own copies.
        return g.x_prev.clone(), g.x0.clone()

    def _switch_context(self, g: _Graph) -> None:
        # The GBSD stage switch under a graph: a copy into the static buffer, then (K/V cache) the cached
        # cross-attention K/V recomputed in place from it, outside the graph.
        g.context.copy_(self._context)
        if self.cache_context_kv:
            set_context_kv(self.unet, g.context)
        self._context_dirty = False

    def _body(self, g: _Graph) -> None:
        x_prev, x0 = self._fn(self.unet, g.x, g.t_in, g.context, g.coefs, g.noise, self.guidance_scale,
                              self.channels_last)
        g.x_prev.copy_(x_prev)
        g.x0.copy_(x0)

"""The fast CFG + DDIM step: one function for the whole step (UNet on [x; x], guidance, DDIM update), run eagerly,
through torch.compile, or replayed from a CUDA graph.

The readable step is `sampling.CFGStep` (core); this one computes the same thing in a form that compiles and captures:

- the DDIM update is written with per-timestep coefficients held in a tensor (`ddim_coefficients`), so neither
  torch.compile nor a CUDA graph sees a Python float that changes every step (no recompiles, nothing baked in); a
  schedule's coefficients are uploaded in one copy, once per stepper;
- the guidance scale is a 0-d tensor input too, so steppers with other CFG values share one compiled graph;
- the η-noise is always an input (zeros when η = 0), the timestep an input tensor;
- with CUDA graphs every input lives in a static buffer. A GBSD stage switch is a copy of the new [uncond; cond]
  context into the static context buffer (SDXL: and of its vector y, [uncond; cond] pooled text + size embeddings,
  into the static vector buffer; and, with the K/V cache, an in-place update of the cached cross-attention K/V that
  the graph reads), never a re-capture. Each shape (a sweep's focus stage branching the batch, another image
  size) gets its own graph, kept with its own K/V buffers (up to `max_graphs`, sharing one memory pool), so
  alternating shapes, or a second `generate`, replay instead of capturing again.

Compiled steps: all steppers share one compiled function (dynamo keeps its graphs on `cfg_ddim_step`'s code), which
still specialises on batch, size, dtype and CFG on/off. Its recompile limit is raised to `RECOMPILE_LIMIT` for this
function's calls only, and past it the stepper warns and runs the step eagerly: a long-running process never fails
on a new shape. Under compile modes with inductor's own CUDA graphs the outputs are copied (the next replay would
overwrite them).

The capture itself is `CudaGraphCapture`, a few lines; everything else (buffers, copies, stage switches) is plain
tensor code that `FastStepper(capture=eager_capture)` exercises on CPU, where "replay" runs the step on the buffers.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .attention import FastCrossAttention, set_context_kv, swap_attention
from .options import CUDAGRAPH_COMPILE_MODES

if TYPE_CHECKING:
    from torch.nn.attention import SDPBackend

    from ..ddim import DDIMScheduler
    from ..unet import UNetModel

# capture(body) runs `body` as needed to record it and returns a replay function
Capture = Callable[[Callable[[], None]], Callable[[], None]]

# Distinct (batch, size, dtype, CFG) variants the shared compiled step may compile before steppers fall back to eager
# steps. torch's own default is 8, and under fullgraph=True the 9th variant is a hard error.
RECOMPILE_LIMIT = 64


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
                  guidance: Tensor | None, channels_last: bool,
                  vector: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step. x, noise: [B,4,h,w] fp32; t_in: [2B] (CFG) or [B] long; context: [2B or B,77,D] in the UNet's dtype;
    coefs: [5] fp32 from `ddim_coefficients`; guidance: 0-d fp32 (None: no CFG); vector: SDXL's y [2B or B, adm]
    (else None). -> (x_prev, x̂_0), fp32 [B,4,h,w]."""
    x_in = torch.cat([x, x]) if guidance is not None else x
    if channels_last:
        x_in = x_in.contiguous(memory_format=torch.channels_last)
    out = unet(x_in, t_in, context, vector).float()
    if guidance is not None:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance * (out_cond - out_uncond)
    x_prev = coefs[0] * x + coefs[1] * out + coefs[4] * noise
    x0 = coefs[2] * x + coefs[3] * out
    return x_prev, x0


def compile_step(mode: str, device: torch.device) -> Callable:
    """torch.compile of `cfg_ddim_step`, compiled once per shape: every per-step value is a tensor input, so the 50
    steps share one graph. fullgraph: a graph break would leave parts in Python (and break CUDA-graph capture).

    On CPU the modes mean little (no CUDA graphs, no Triton autotuning); what makes compiled convolutions and matmuls
    fast there is inductor's *freezing*: the weights become constants, pre-packed once for oneDNN. So on CPU every
    mode compiles with freezing (and the max-autotune modes also autotune its GEMM templates). Frozen weights are
    baked in: loading other weights afterwards needs a new stepper.
    """
    if device.type == "cpu":
        options = {"freezing": True, "max_autotune": mode.startswith("max-autotune")}
        return torch.compile(cfg_ddim_step, options=options, fullgraph=True, dynamic=False)
    return torch.compile(cfg_ddim_step, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)


class CompiledStep:
    """`compile_step(mode)` as a stepper calls it: recompile limit raised for these calls, an eager step (with one
    warning) once even that is reached, and the outputs copied when the mode brings inductor's CUDA graphs."""

    def __init__(self, mode: str, device: torch.device) -> None:
        import torch._dynamo  # only when compiling: its import is slow

        self.fn = compile_step(mode, device)
        self.copy_outputs = mode in CUDAGRAPH_COMPILE_MODES
        self.eager = False
        config = torch._dynamo.config
        self._limit_key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        # torch >= 2.6 names it FailOnRecompileLimitHit, older releases FailOnCacheLimitHit
        self._limit_errors = tuple(getattr(torch._dynamo.exc, name) for name in
                                   ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
                                   if hasattr(torch._dynamo.exc, name))

    def __call__(self, *args) -> tuple[Tensor, Tensor]:
        if self.eager:
            return cfg_ddim_step(*args)
        import torch._dynamo

        limit = max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, self._limit_key))
        if self.copy_outputs:
            # a new inference step for inductor's CUDA-graph trees: the previous replay's outputs (already copied) may
            # be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with torch._dynamo.config.patch(**{self._limit_key: limit}):
                x_prev, x0 = self.fn(*args)
        except self._limit_errors as e:
            warnings.warn(f"the compiled step reached its recompile limit ({limit} shapes/dtypes in this process); "
                          f"this stepper runs eager steps from now on ({type(e).__name__})")
            self.eager = True
            return cfg_ddim_step(*args)
        if self.copy_outputs:  # inductor's CUDA graphs write every replay's outputs into the same memory
            x_prev, x0 = x_prev.clone(), x0.clone()
        return x_prev, x0


def eager_capture(body: Callable[[], None]) -> Callable[[], None]:
    """CPU stand-in for a CUDA graph: nothing is recorded, "replay" runs the body again on the static buffers."""
    return body


class CudaGraphCapture:
    """Records a body into a CUDA graph and returns its replay. The warm-up runs on a side stream first, as PyTorch's
    CUDA-graph notes require (lazy initialisation, cuBLAS/cuDNN workspace and algorithm choice happen outside the
    capture). All graphs of one instance share one memory pool: a stepper's graphs (one per shape) never run at the
    same time, and no tensor allocated inside a capture outlives it (the static inputs and outputs are allocated
    before), so each graph uses the pool as scratch and the pool costs the largest graph, not their sum."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.pool = None

    def __call__(self, body: Callable[[], None]) -> Callable[[], None]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`: through pinned memory and a non-blocking copy on CUDA (a pageable copy makes the
    host wait for the GPU), a plain .to() elsewhere."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
    vector: Tensor | None = None  # SDXL's y, [2B or B, adm]; None for SD1/SD2
    replay: Callable[[], None] | None = None
    kv: list[tuple[Tensor, Tensor]] | None = None  # the cached K, V of each cross-attention the graph reads


class FastStepper:
    """A `sampling.Stepper` running `cfg_ddim_step` eagerly, compiled (`compile_mode`), and/or from CUDA graphs
    (`capture`). Latents stay fp32 whatever the UNet's dtype. Made (and cached per bundle) by `fast.make_stepper`;
    `close()` (or leaving a `with` block) removes the K/V cache from the UNet and keeps the compiled step and the
    graphs for the next run; `release()` drops those too. One run at a time per stepper."""

    def __init__(self, unet: UNetModel, scheduler: DDIMScheduler, guidance_scale: float | None, eta: float, *,
                 cache_context_kv: bool = False, channels_last: bool = False, compile_mode: str | None = None,
                 capture: Capture | None = None, sdpa_backend: SDPBackend | None = None, max_graphs: int = 4) -> None:
        self.unet, self.scheduler = unet, scheduler
        self.cache_context_kv, self.channels_last, self.capture = cache_context_kv, channels_last, capture
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._guidance_scale, self._eta = guidance_scale, eta
        # a device tensor, so the compiled step does not specialise on its value (and a graph reads it in place)
        self._guidance = None if guidance_scale is None else torch.tensor(guidance_scale, device=self.device)
        self._sdpa_backend = sdpa_backend
        self._fn: Callable[..., tuple[Tensor, Tensor]] = cfg_ddim_step
        if compile_mode is not None:
            self._fn = CompiledStep(compile_mode, self.device)
        self._attn2: list[FastCrossAttention] = []
        if cache_context_kv:
            # The K/V cache lives in FastCrossAttention (`accelerate` has swapped it in already; swapping is idempotent).
            swap_attention(unet)
            self._attn2 = [site.module for site in unet.attention_sites()]
        self._context: Tensor | None = None
        self._vector: Tensor | None = None  # SDXL's y
        self._context_dirty = False
        self._coefs: dict[tuple[int, int | None], Tensor] = {}  # (t, n) -> device fp32 [5]
        self._coefs_scheduler: DDIMScheduler | None = None
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()  # least recently used first
        self.captures = 0  # graphs recorded so far (tests check stage switches and reruns do not add any)

    # ----------------------------------------------------------------- Stepper protocol
    @property
    def guidance_scale(self) -> float | None:
        return self._guidance_scale

    @property
    def eta(self) -> float:
        return self._eta

    def set_context(self, context: Tensor, vector: Tensor | None = None) -> None:
        # [2B or B, 77, D] (SDXL: and y [2B or B, adm]) -> the UNet's device and dtype, once per stage. Always a fresh
        # inference-mode tensor: a compiled step guards on such tensor properties and would otherwise compile twice.
        with torch.inference_mode():
            self._context = context.to(self.device, self.dtype, copy=True)
            self._vector = None if vector is None else vector.to(self.device, self.dtype, copy=True)
        if self.capture is not None:
            self._context_dirty = True  # copied into the static buffers at the next step (its shape may be new)
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
            if self.cache_context_kv and not self._kv_cached_for(self._context):
                # Another stepper (or a caller, or close()) re-pointed the UNet's K/V cache; compiled code no longer
                # checks the context's identity, so re-install ours here, in Python.
                set_context_kv(self.unet, self._context)
            t_in = torch.full((self._context.shape[0],), t, device=self.device, dtype=torch.long)
            with self._attention_backend():
                return self._fn(self.unet, x, t_in, self._context, coefs, noise, self._guidance, self.channels_last,
                                self._vector)

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
        """Drop the cross-attention K/V cache from the UNet, so plain callers can use it again. The compiled step,
        the graphs and their K/V buffers stay for this stepper's next run."""
        if self.cache_context_kv:
            set_context_kv(self.unet, None)

    def release(self) -> None:
        """close(), and free the graphs (their static buffers, K/V buffers and memory pool)."""
        self.close()
        self._graphs.clear()
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

    def _coefficients(self, t: int) -> Tensor:
        # The whole schedule's coefficients in one host->device copy, once per (schedule length, stepper): a cached
        # stepper's later runs copy nothing.
        n = self.scheduler.num_inference_steps
        if self._coefs_scheduler is not self.scheduler:
            self._coefs, self._coefs_scheduler = {}, self.scheduler
        if (t, n) not in self._coefs:
            ts = [int(s) for s in self.scheduler.timesteps(n)] if n is not None else []
            ts = ts if t in ts else [t]
            table = torch.stack([ddim_coefficients(self.scheduler, s, self.eta) for s in ts]).to(torch.float32)
            rows = to_device(table, self.device).unbind(0)
            # each its own tensor (aligned storage, as compiled code expects of its inputs)
            self._coefs.update({(s, n): row.clone() for s, row in zip(ts, rows)})
        return self._coefs[(t, n)]

    def _graphed(self, x: Tensor, t: int, coefs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        vector = None if self._vector is None else tuple(self._vector.shape)
        key = (tuple(x.shape), tuple(self._context.shape), vector)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture_graph(key, x, t, coefs, noise)
        else:
            self._graphs.move_to_end(key)
            if self._context_dirty or not self._kv_installed(g):
                # A stage switch, another shape's graph ran in between, close(), or another user re-pointed the
                # UNet's K/V cache: copy the context in, re-install this graph's K/V buffers, recompute them in place.
                self._switch_context(g)
        g.x.copy_(x)
        g.t_in.fill_(t)
        g.coefs.copy_(coefs)
        g.noise.copy_(noise)
        g.replay()
        # The buffers are overwritten by the next replay; callers (and the yielded StepStates) keep their own copies.
        return g.x_prev.clone(), g.x0.clone()

    def _capture_graph(self, key: tuple, x: Tensor, t: int, coefs: Tensor, noise: Tensor) -> _Graph:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)  # least recently used; frees its buffers
        g = _Graph(key, x.clone(), torch.full((self._context.shape[0],), t, device=self.device, dtype=torch.long),
                   self._context.clone(), coefs.clone(), noise.clone(), torch.empty_like(x), torch.empty_like(x),
                   None if self._vector is None else self._vector.clone())
        if self.cache_context_kv:
            set_context_kv(self.unet, None)  # this graph gets K/V buffers of its own (the others keep theirs)
        self._switch_context(g)
        with self._attention_backend():
            g.replay = self.capture(lambda: self._body(g))
        self.captures += 1
        self._graphs[key] = g
        return g

    def _kv_installed(self, g: _Graph) -> bool:
        """Whether every cross-attention reads exactly this graph's K and V tensors (both: the allocator may move
        one without the other), computed from its context buffer."""
        if not self.cache_context_kv:
            return True
        return g.kv is not None and all(
            attn.context_kv is not None and attn.context_kv[0] is g.context
            and attn.context_kv[1] is k and attn.context_kv[2] is v for attn, (k, v) in zip(self._attn2, g.kv))

    def _switch_context(self, g: _Graph) -> None:
        # The GBSD stage switch under a graph: a copy into the static buffers (SDXL: the vector y too, whose pooled half
        # GBSD mixes like the context), then (K/V cache) the graph's own cached cross-attention K/V recomputed in place
        # from the context, outside the graph.
        g.context.copy_(self._context)
        if g.vector is not None:
            g.vector.copy_(self._vector)
        if self.cache_context_kv:
            if g.kv is not None:
                for attn, (k, v) in zip(self._attn2, g.kv):
                    attn.context_kv = (g.context, k, v)
            set_context_kv(self.unet, g.context)  # same shapes: written into those very tensors
            kv = [(attn.context_kv[1], attn.context_kv[2]) for attn in self._attn2]
            if g.kv is not None and any(a is not b for old, new in zip(g.kv, kv) for a, b in zip(old, new)):
                raise RuntimeError("the cached K/V moved under a captured CUDA graph")  # set_context_kv's contract
            g.kv = kv
        self._context_dirty = False

    def _body(self, g: _Graph) -> None:
        x_prev, x0 = self._fn(self.unet, g.x, g.t_in, g.context, g.coefs, g.noise, self._guidance,
                              self.channels_last, g.vector)
        g.x_prev.copy_(x_prev)
        g.x0.copy_(x0)

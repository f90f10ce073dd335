"""The fast CFG step: one function for the whole step (c_in, UNet on [x; x], guidance, the sampler's update), run
eagerly, through torch.compile, or replayed from a CUDA graph, for every sampler (DDIM, Euler, Euler a, DPM++ 2M).

The readable step is `sampling.CFGStep` (core); this one computes the same thing in a form that compiles and captures:

- every sampler's update is linear in (x, guided model output, previous x̂_0, fresh noise), and its model input is
  c_in·x = x / √(σ²+1), so a step is written with seven per-step coefficients held in a tensor (`step_coefficients`: the sampler's
  own `update` and `model_input` evaluated on unit inputs in float64, one source of truth for the math). Neither
  torch.compile nor a CUDA graph sees a Python float that changes every step (no recompiles, nothing baked in); a
  run's coefficients are uploaded in one copy, once per run and stepper;
- the timestep is a float32 tensor input (fractional under Karras σ; the UNet embeds t in fp32 anyway), the guidance
  scale a 0-d tensor (steppers with other CFG values share one compiled graph), the fresh noise and the previous x̂_0
  (DPM++ 2M's history) always inputs, zeros where a step has none: the first-order and second-order steps of DPM++,
  the ancestral and deterministic ones, all run the same graph;
- with CUDA graphs every input lives in a static buffer, the history included. A GBSD stage switch is a copy of the new
  [uncond; cond] context into the static context buffer (SDXL: and its vector y, [uncond; cond] pooled text + size
  embeddings, into the static vector buffer; and, with the K/V cache, an in-place update of the cached
  cross-attention K/V that the graph reads), never a re-capture. Each shape (a sweep's focus stage branching the
  batch, another image size) gets its own graph, kept with its own K/V buffers (up to `max_graphs`, sharing one
  memory pool), so alternating shapes, or a second `generate`, replay instead of capturing again.

Compiled steps: all steppers share one compiled function (dynamo keeps its graphs on `cfg_step`'s code), which
still specialises on batch, size, dtype and CFG on/off, not on the sampler. Its recompile limit is raised to
`RECOMPILE_LIMIT` for this function's calls only, and past it the stepper warns and runs the step eagerly: a
long-running process never fails on a new shape. Under compile modes with inductor's own CUDA graphs the outputs are
copied (the next replay would overwrite them).

The capture itself is `CudaGraphCapture`, a few lines; everything else (buffers, copies, stage switches) is plain
tensor code that `FastStepper(capture=eager_capture)` exercises on CPU, where "replay" runs the step on the buffers.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..attention_sites import attention_sites
from .attention import FastCrossAttention, set_context_kv, swap_attention
from .options import CUDAGRAPH_COMPILE_MODES

if TYPE_CHECKING:
    from torch.nn.attention import SDPBackend

    from ..samplers import Sampler
    from ..unet import UNetModel

# capture(body) runs `body` as needed to record it and returns a replay function
Capture = Callable[[Callable[[], None]], Callable[[], None]]

# Distinct (batch, size, dtype, CFG) variants the shared compiled step may compile before steppers fall back to eager
# steps. torch's own default is 8, and under fullgraph=True the 9th variant is a hard error.
RECOMPILE_LIMIT = 64
# The layout of one step's coefficient vector (`step_coefficients`), as `cfg_step` reads it.
COEFFICIENTS = ("in_scale", "a_x", "a_out", "a_prev", "a_noise", "d_x", "d_out")
RUN_TABLES = 8  # coefficient tables (one per run: sampler, steps, strength) a stepper keeps on the device


def step_coefficients(sampler: Sampler, i: int, eta: float, second_order: bool) -> Tensor:
    """[in_scale, a_x, a_out, a_prev, a_noise, d_x, d_out] in float64, such that executed step i of `sampler`'s run is

        UNet input = x / in_scale    x_next = a_x·x + a_out·out + a_prev·x̂_0,prev + a_noise·z    x̂_0 = d_x·x + d_out·out

    (out = the guided model output, ε or v; x̂_0,prev = the previous step's x̂_0, DPM++ 2M's history; z = the fresh
    noise). Every sampler's update is linear in these for both prediction types (ddim.py, euler.py,
    euler_ancestral.py, dpmpp_2m.py), so the coefficients are its own `update` and `model_input` evaluated on unit
    inputs in float64; in_scale = 1/c_in, √(σ²+1) for the σ samplers, 1 for DDIM (a division, as `model_input` does
    it, so the UNet sees the very bits the plain step gives it). `second_order`: the step gets a history (DPM++ 2M's second-order step; the single-step samplers
    ignore it, and step 0 never has one). Needs `sampler.timesteps(n)` called first, like `update`.
    """
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    prev = zero if second_order and i > 0 else None

    def update(x: Tensor, out: Tensor, history: Tensor | None, z: Tensor) -> tuple[Tensor, Tensor]:
        return sampler.update(x, i, out, eta=eta, noise=z, prev_x0=history)

    a_x, d_x = update(one, zero, prev, zero)
    a_out, d_out = update(zero, one, prev, zero)
    a_prev = update(zero, zero, one, zero)[0] if prev is not None else zero
    a_noise = update(zero, zero, prev, one)[0]
    in_scale = 1.0 / sampler.model_input(one, i)
    return torch.cat([in_scale, a_x, a_out, a_prev, a_noise, d_x, d_out])


def cfg_step(unet: UNetModel, x: Tensor, t_in: Tensor, context: Tensor, coefs: Tensor, noise: Tensor,
             prev_x0: Tensor, guidance: Tensor | None, channels_last: bool,
             vector: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step. x, noise, prev_x0: [B,4,h,w] fp32 (noise, prev_x0 zeros where the step has none); t_in: [2B] (CFG) or
    [B] fp32; context: [2B or B,77,D] in the UNet's dtype; coefs: [7] fp32 from `step_coefficients`; guidance: 0-d
    fp32 (None: no CFG); vector: SDXL's y [2B or B, adm] (else None). -> (x_next, x̂_0), fp32 [B,4,h,w]."""
    x_in = x / coefs[0]  # c_in·x: the σ samplers' x_t = x/√(σ²+1); DDIM's latent is x_t itself (in_scale = 1)
    x_in = torch.cat([x_in, x_in]) if guidance is not None else x_in
    if channels_last:
        x_in = x_in.contiguous(memory_format=torch.channels_last)
    out = unet(x_in, t_in, context, vector).float()
    if guidance is not None:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance * (out_cond - out_uncond)
    x_next = coefs[1] * x + coefs[2] * out + coefs[3] * prev_x0 + coefs[4] * noise
    x0 = coefs[5] * x + coefs[6] * out
    return x_next, x0


def compile_step(mode: str, device: torch.device) -> Callable:
    """torch.compile of `cfg_step`, compiled once per shape: every per-step value is a tensor input, so the 50
    steps (of any sampler) share one graph. fullgraph: a graph break would leave parts in Python (and break CUDA-graph capture).

    On CPU the modes mean little (no CUDA graphs, no Triton autotuning); what makes compiled convolutions and matmuls
    fast there is inductor's *freezing*: the weights become constants, pre-packed once for oneDNN. So on CPU every
    mode compiles with freezing (and the max-autotune modes also autotune its GEMM templates). Measured on torch
    2.14 (fp32 and bf16): the compiled step still reads the parameters' current values, so weights changed in place
    (load_state_dict, gbsd_core.lora's merges) are seen without a recompile; tests/lora/test_fast.py holds that.
    """
    if device.type == "cpu":
        options = {"freezing": True, "max_autotune": mode.startswith("max-autotune")}
        return torch.compile(cfg_step, options=options, fullgraph=True, dynamic=False)
    return torch.compile(cfg_step, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)


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
            return cfg_step(*args)
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
            return cfg_step(*args)
        if self.copy_outputs:  # inductor's CUDA graphs write every replay's outputs into the same memory
            x_prev, x0 = x_prev.clone(), x0.clone()
        return x_prev, x0


def eager_capture(body: Callable[[], None]) -> Callable[[], None]:
    """CPU stand-in for a CUDA graph: nothing is recorded, "replay" runs the body again on the static buffers."""
    return body


class CudaGraphCapture:
    """Records a body into a CUDA graph and returns its replay. The warm-up runs on a side stream first, as PyTorch's
    CUDA-graph notes require (lazy initialisation, cuBLAS/cuDNN workspace and algorithm choice happen outside the
    capture). The graphs of one instance that are alive at the same time share one memory pool: a stepper's graphs
    (one per shape) never run at the same time, and no tensor allocated inside a capture outlives it (the static
    inputs and outputs are allocated before), so each graph uses the pool as scratch and the pool costs the largest
    graph, not their sum.

    A pool lives while a graph holds it. Once every graph captured into it is gone (`FastStepper.release()`), the
    caching allocator keeps the pool registered with a use count of 0 until `empty_cache` frees it, and a capture
    into it trips its `use_count > 0` assert: so a capture with no live graph begins a new round in a fresh pool."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.pool = None
        self._graphs: weakref.WeakSet = weakref.WeakSet()  # this round's graphs that are still alive

    def __call__(self, body: Callable[[], None]) -> Callable[[], None]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                body()
        torch.cuda.current_stream().wait_stream(side)
        if not self._graphs:
            self.pool = None  # a new round: the old pool (if any) is held by no graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        if self.pool is None:
            self.pool = graph.pool()
        self._graphs.add(graph)
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
    prev_x0: Tensor  # DPM++ 2M's history (zeros for a first-order step and the single-step samplers)
    x_next: Tensor
    x0: Tensor
    vector: Tensor | None = None  # SDXL's y, [2B or B, adm]; None for SD1/SD2
    replay: Callable[[], None] | None = None
    kv: list[tuple[Tensor, Tensor]] | None = None  # the cached K, V of each cross-attention the graph reads


class FastStepper:
    """A `sampling.Stepper` running `cfg_step` eagerly, compiled (`compile_mode`), and/or from CUDA graphs
    (`capture`), for the sampler `sampler` (any samplers.Sampler). Latents stay fp32 whatever the UNet's dtype. Made
    (and cached per bundle) by `fast.make_stepper`; `close()` (or leaving a `with` block) removes the K/V cache from
    the UNet and keeps the compiled step and the graphs for the next run; `release()` drops those too. One run at a
    time per stepper."""

    def __init__(self, unet: UNetModel, sampler: Sampler, guidance_scale: float | None, eta: float, *,
                 cache_context_kv: bool = False, channels_last: bool = False, compile_mode: str | None = None,
                 capture: Capture | None = None, sdpa_backend: SDPBackend | None = None, max_graphs: int = 4) -> None:
        self.unet, self.sampler = unet, sampler
        self.cache_context_kv, self.channels_last, self.capture = cache_context_kv, channels_last, capture
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._guidance_scale, self._eta = guidance_scale, eta
        # a device tensor, so the compiled step does not specialise on its value (and a graph reads it in place)
        self._guidance = None if guidance_scale is None else torch.tensor(guidance_scale, device=self.device)
        self._sdpa_backend = sdpa_backend
        self._fn: Callable[..., tuple[Tensor, Tensor]] = cfg_step
        if compile_mode is not None:
            self._fn = CompiledStep(compile_mode, self.device)
        self._attn2: list[FastCrossAttention] = []
        if cache_context_kv:
            # The K/V cache lives in FastCrossAttention (`accelerate` has swapped it in already; swapping is idempotent).
            swap_attention(unet)
            self._attn2 = [site.module for site in attention_sites(unet)]
        self._context: Tensor | None = None
        self._vector: Tensor | None = None  # SDXL's y
        self._context_dirty = False
        # run -> per executed step (first-order, second-order) device fp32 [7], least recently used first
        self._tables: OrderedDict[tuple, list[tuple[Tensor, Tensor]]] = OrderedDict()
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
                # Inside inference mode: the K/V it replaces may be inference tensors (another stepper's, say a graphed
                # one that was not closed), which same-shaped K/V are written into in place.
                set_context_kv(self.unet, self._context)

    def step(self, latents: Tensor, i: int, noise: Tensor | None,
             prev_x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Executed step i of the sampler's run (`sampler.timesteps(n, strength)` fixes it): latents [B,4,h,w] ->
        (next latents, x̂_0). `noise`: the step's fresh noise, None when it adds none; `prev_x0`: step i−1's x̂_0, None
        at a first-order step (what `sampling.denoise` passes)."""
        if self._context is None:
            raise RuntimeError("set_context() must be called before the first step")
        with torch.inference_mode():
            coefs = self._coefficients(i, prev_x0 is not None)
            t = float(self.sampler.run_timesteps[i])  # the UNet embeds t in fp32: float32(t) is what it sees
            # fresh inference tensors (see set_context); zeros where the step has no noise or no history
            x = latents.to(self.device, torch.float32, copy=True)
            noise = torch.zeros_like(x) if noise is None else noise.to(self.device, torch.float32, copy=True)
            prev = torch.zeros_like(x) if prev_x0 is None else prev_x0.to(self.device, torch.float32, copy=True)
            if self.capture is not None:
                return self._graphed(x, t, coefs, noise, prev)
            if self.cache_context_kv and not self._kv_cached_for(self._context):
                # Another stepper (or a caller, or close()) re-pointed the UNet's K/V cache; compiled code no longer
                # checks the context's identity, so re-install ours here, in Python.
                set_context_kv(self.unet, self._context)
            t_in = torch.full((self._context.shape[0],), t, device=self.device, dtype=torch.float32)
            with self._attention_backend():
                return self._fn(self.unet, x, t_in, self._context, coefs, noise, prev, self._guidance,
                                self.channels_last, self._vector)

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

    def _coefficients(self, i: int, second_order: bool) -> Tensor:
        """Step i's coefficients on the device. The whole run's table in one host->device copy, once per run (the
        sampler, its steps, strength and σ): a cached stepper's later runs copy nothing."""
        sampler = self.sampler
        if sampler.run_timesteps is None:
            raise ValueError("call sampler.timesteps(num_inference_steps) first: it fixes the run the steps index into")
        key = (sampler, sampler.num_inference_steps, sampler.run_timesteps.numpy().tobytes(),
               sampler.sigmas.numpy().tobytes())
        table = self._tables.get(key)
        if table is None:
            n = len(sampler.run_timesteps)
            rows = torch.stack([step_coefficients(sampler, j, self.eta, order) for j in range(n)
                                for order in (False, True)]).to(torch.float32)
            rows = to_device(rows, self.device).unbind(0)
            # each its own tensor (aligned storage, as compiled code expects of its inputs)
            table = [(rows[2 * j].clone(), rows[2 * j + 1].clone()) for j in range(n)]
            while len(self._tables) >= RUN_TABLES:
                self._tables.popitem(last=False)
            self._tables[key] = table
        else:
            self._tables.move_to_end(key)
        if not 0 <= i < len(table):
            raise ValueError(f"step index {i} is outside the run's {len(table)} steps")
        return table[i][second_order]

    def _graphed(self, x: Tensor, t: float, coefs: Tensor, noise: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
        vector = None if self._vector is None else tuple(self._vector.shape)
        key = (tuple(x.shape), tuple(self._context.shape), vector)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture_graph(key, x, t, coefs, noise, prev)
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
        g.prev_x0.copy_(prev)
        g.replay()
        # The buffers are overwritten by the next replay; callers (and the yielded StepStates) keep their own copies.
        return g.x_next.clone(), g.x0.clone()

    def _capture_graph(self, key: tuple, x: Tensor, t: float, coefs: Tensor, noise: Tensor, prev: Tensor) -> _Graph:
        t_in = torch.full((self._context.shape[0],), t, device=self.device, dtype=torch.float32)
        g = _Graph(key, x.clone(), t_in, self._context.clone(), coefs.clone(), noise.clone(), prev.clone(),
                   torch.empty_like(x), torch.empty_like(x), None if self._vector is None else self._vector.clone())
        if self.cache_context_kv:
            set_context_kv(self.unet, None)  # this graph gets K/V buffers of its own (the others keep theirs)
        self._switch_context(g)
        with self._attention_backend():
            g.replay = self.capture(lambda: self._body(g))
        self.captures += 1
        # Evict only now: the graphs share one memory pool, which lives while a graph holds it, so the new graph is
        # captured into it before the least recently used one (its buffers, its K/V) is dropped.
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
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
        x_next, x0 = self._fn(self.unet, g.x, g.t_in, g.context, g.coefs, g.noise, g.prev_x0, self._guidance,
                              self.channels_last, g.vector)
        g.x_next.copy_(x_next)
        g.x0.copy_(x0)

"""What one benchmark configuration measures, for ours and for the diffusers baseline.

Per configuration, on identical weights (see models.py) and identical inputs (x_T from one seed, the same prompt):

    text_ms   the two text-encoder calls of a CFG run (negative and positive prompt, as both pipelines do)
    step_ms   one CFG step: UNet on [x; x] (batch 2B), guidance, DDIM update; median over timesteps of the schedule
    loop      the whole denoise loop of `steps` steps (it/s = steps / seconds); ours: `sampling.denoise` with the
              config's stepper; diffusers: `StableDiffusionPipeline(prompt_embeds=..., output_type="latent")`
    vae_ms    VAE decode of the final latents [B,4,h,w] -> [B,3,8h,8w]
    e2e_s     the user-level call: `pipeline.generate` / `pipe(prompt)` from prompt to PIL image (batch 1 only)
    warmup_s  the first step call (compilation, CUDA-graph capture, cuDNN autotuning land here)
    peak_gb   peak GPU memory allocated during the configuration (CPU: the process' peak RSS)
"""
from __future__ import annotations

import gc
import itertools
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from gbsd_core.bundle import SDBundle
from gbsd_core.fast import FastOptions, accelerate, make_stepper
from gbsd_core.pipeline import GenerationParams, GenerationResult, generate, sweep
from gbsd_core.sampling import CFGStep, Stage, Stepper, denoise, layout_steps

from .models import build_bundle, parameter_counts
from .timing import Clock

Flush = Callable[[dict[str, Any]], None]  # called with the partial record after each measurement

PROMPT = "a bunny and a carrot in a garden, bokeh, photograph"
FOCUS = "a carrot"
NEGATIVE = ""


@dataclass(frozen=True)
class Preset:
    """A named configuration. `fast` holds `gbsd_core.fast.FastOptions` fields (dtype and vae_dtype come from the
    command line); None is the plain readable path. `compile` is a torch.compile mode ("" = none)."""

    name: str
    impl: str  # "ours" | "diffusers"
    fast: dict[str, Any] | None = None
    compile: str = ""
    cuda_only: bool = False
    doc: str = ""


_FAST = dict(channels_last=True, fuse_qkv=True, cache_context_kv=True)  # triton=None: on by itself on CUDA
PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("eager", "ours", None, doc="plain fp32-style path (modules cast to --dtype), SDPA attention"),
    Preset("fast", "ours", dict(_FAST), doc="channels-last, fused QKV, cached cross-attn K/V; oneDNN weight prepacking "
                                           "on CPU, Triton on CUDA"),
    Preset("fast-noprepack", "ours", dict(_FAST, cpu_prepack=False),
           doc="fast without the CPU weight prepacking (to see what prepacking adds)"),
    Preset("fast+compile", "ours", dict(_FAST, compile="default"), compile="default",
           doc="fast + torch.compile(step) in the default mode"),
    Preset("fast+compile-max", "ours", dict(_FAST, compile="max-autotune"), compile="max-autotune",
           doc="fast + torch.compile(step, mode='max-autotune') (long compile)"),
    Preset("graphs", "ours", dict(_FAST, cuda_graphs=True), cuda_only=True,
           doc="fast + the whole CFG+DDIM step captured in one CUDA graph"),
    Preset("graphs+compile", "ours", dict(_FAST, compile="default", cuda_graphs=True), compile="default",
           cuda_only=True, doc="fast + compiled step captured in a CUDA graph"),
    Preset("diffusers", "diffusers", doc="diffusers 0.42 StableDiffusionPipeline, eager (SDPA)"),
    Preset("diffusers+compile", "diffusers", compile="reduce-overhead",
           doc="diffusers docs' recipe: UNet channels-last + torch.compile(unet, fullgraph=True); CUDA default mode "
               "reduce-overhead (CUDA graphs), CPU default mode 'default'"),
]}


@dataclass
class Settings:
    arch: str
    device: torch.device
    dtype: torch.dtype
    size: int
    steps: int
    cfg: float
    batch: int
    repeat: int
    warmup: int
    loop_repeat: int
    e2e_repeat: int  # 0: only the first call, reported as the median too (e.g. on a slow CPU)
    tiny: bool
    seed: int
    compile_mode: str | None  # overrides the presets' compile mode
    parts: tuple[str, ...] = ("text", "step", "loop", "vae", "e2e")
    vae_dtype: torch.dtype | None = None  # None: same as dtype for every configuration (diffusers has one dtype)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gbsd-bench-")))

    @property
    def latent_hw(self) -> int:
        return self.size // 8


def fast_options(preset: Preset, s: Settings) -> FastOptions | None:
    """The FastOptions a preset stands for, or None for the plain path."""
    if preset.fast is None:
        return None
    kw = dict(preset.fast)
    if s.compile_mode and kw.get("compile"):
        kw["compile"] = s.compile_mode
    return FastOptions(dtype=s.dtype, vae_dtype=s.vae_dtype or s.dtype, **kw)


def compile_mode(preset: Preset, s: Settings) -> str:
    mode = s.compile_mode or preset.compile
    if preset.impl == "diffusers" and mode == "reduce-overhead" and s.device.type != "cuda":
        mode = "default"  # reduce-overhead means CUDA graphs; on CPU it is the default mode plus warnings
    return mode


def make_inputs(s: Settings, dtype: torch.dtype) -> torch.Tensor:
    """x_T from a CPU generator (same bits on every device), [B,4,h,w]."""
    g = torch.Generator("cpu").manual_seed(s.seed)
    return torch.randn(s.batch, 4, s.latent_hw, s.latent_hw, generator=g).to(s.device, dtype)


def _step_indices(n: int, k: int) -> list[int]:
    """k step indices spread over an n-step schedule (the step cost does not depend on t; spreading avoids any
    caching of one timestep's values)."""
    return [int(i) for i in torch.linspace(0, n - 1, max(k, 1)).round().long()]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------- ours
def build_ours(preset: Preset, s: Settings, clock: Clock, rec: dict[str, Any]):
    """(bundle, FastOptions or None): the seeded bundle, accelerated as the preset says."""
    t0 = time.perf_counter()
    bundle = build_bundle(s.arch, s.device, s.dtype, s.tiny, s.seed)
    rec["params"] = parameter_counts(bundle)
    opts = fast_options(preset, s)
    if opts is not None:
        accelerate(bundle, opts)
    clock.sync()
    rec["build_s"] = time.perf_counter() - t0
    return bundle, opts


def ours_stepper(bundle: SDBundle, opts: FastOptions | None, s: Settings) -> Stepper:
    if opts is not None:
        return make_stepper(bundle, opts, s.cfg)
    return CFGStep(bundle.unet, bundle.scheduler, s.cfg)


def ours_generate(bundle: SDBundle, params: GenerationParams, opts: FastOptions | None) -> GenerationResult:
    """`pipeline.generate` as a user runs it: the plain path, or through a fast stepper made for these parameters."""
    if opts is None:
        return generate(bundle, params)
    with make_stepper(bundle, opts, params.cfg, params.eta) as step:
        return generate(bundle, params, stepper=step)


def ours_sweep(bundle: SDBundle, params: GenerationParams, alphas: list[float],
               opts: FastOptions | None) -> list[GenerationResult]:
    if opts is None:
        return sweep(bundle, params, alphas=alphas)
    with make_stepper(bundle, opts, params.cfg, params.eta) as step:
        return sweep(bundle, params, alphas=alphas, stepper=step)


def ours_step_call(stepper: Stepper, uncond: torch.Tensor, cond: torch.Tensor, x_T: torch.Tensor,
                   timesteps: torch.Tensor, s: Settings) -> Callable[[], torch.Tensor]:
    """One CFG step per call, cycling through steps spread over the schedule."""
    stepper.set_context(torch.cat([uncond, cond]))
    steps = itertools.cycle(_step_indices(len(timesteps), s.warmup + s.repeat))
    return lambda: stepper.step(x_T, next(steps), None, None)


def ours_contexts(bundle: SDBundle, s: Settings, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    uncond, cond = (bundle.encode_prompt(p).to(s.device, dtype) for p in (NEGATIVE, PROMPT))
    return uncond.expand(s.batch, -1, -1), cond.expand(s.batch, -1, -1)


def run_ours(preset: Preset, s: Settings, clock: Clock, rec: dict[str, Any], flush: Flush) -> None:
    bundle, opts = build_ours(preset, s, clock, rec)
    clock.reset_peak()
    # The fast stepper keeps latents in fp32 and casts only the UNet input; the plain path runs in the UNet's dtype.
    lat_dtype = torch.float32 if opts is not None else s.dtype
    with torch.inference_mode():
        if "text" in s.parts:
            t = clock.measure(lambda: [bundle.encode_prompt(p) for p in (NEGATIVE, PROMPT)], s.repeat, s.warmup)
            rec["text"] = t.as_dict()
            flush(rec)
        uncond, cond = ours_contexts(bundle, s, lat_dtype)
        x_T = make_inputs(s, lat_dtype)
        scheduler = bundle.scheduler
        timesteps = scheduler.timesteps(s.steps)
        stepper = ours_stepper(bundle, opts, s)
        latents = x_T  # what the VAE decodes when the loop is not run (the same values on both sides)
        try:
            if "step" in s.parts:
                step = ours_step_call(stepper, uncond, cond, x_T, timesteps, s)
                rec["step"] = clock.measure(step, s.repeat, s.warmup).as_dict()
                flush(rec)
            if "loop" in s.parts:
                stages = [Stage("global", range(len(timesteps)), cond)]

                def loop() -> torch.Tensor:
                    latents = x_T
                    for state in denoise(stepper, x_T, timesteps, stages, uncond):
                        latents = state.latents
                    return latents

                t, latents = clock.once(loop)  # warm-up (and the latents for the VAE)
                runs = [clock.once(loop)[0] for _ in range(s.loop_repeat)]
                rec["loop"] = {"first_s": t, "median_s": _median(runs), "runs_s": runs}
                flush(rec)
        finally:
            if hasattr(stepper, "close"):
                stepper.close()
        if "vae" in s.parts:
            z = latents / bundle.vae.config.scale_factor
            t = clock.measure(lambda: bundle.vae.decode(z), s.repeat, s.warmup)
            rec["vae"] = t.as_dict()
            flush(rec)
            rec["vae_dtype"] = str(bundle.vae.dtype).removeprefix("torch.")  # decode may have upcast itself
    if "e2e" in s.parts and s.batch == 1:
        params = GenerationParams(PROMPT, negative=NEGATIVE, steps=s.steps, cfg=s.cfg, seed=s.seed,
                                  width=s.size, height=s.size)
        t = clock.measure(lambda: ours_generate(bundle, params, opts), s.e2e_repeat, 1)
        rec["e2e"] = t.as_dict()
        flush(rec)
    rec["peak_gb"] = clock.peak_memory_gb()
    del bundle
    free_memory()


# ------------------------------------------------------------------------------------------------------ diffusers
def build_diffusers(preset: Preset, s: Settings, clock: Clock, rec: dict[str, Any]):
    """The diffusers StableDiffusionPipeline on the seeded weights, compiled as the preset says."""
    from .reference import diffusers_sd_pipeline

    t0 = time.perf_counter()
    bundle = build_bundle(s.arch, s.device, s.dtype, s.tiny, s.seed)
    rec["params"] = parameter_counts(bundle)
    # The twin takes the bundle's tensors (share=True: one copy in memory); SDPA attention in the text encoder, as a
    # diffusers user gets by default.
    pipe = diffusers_sd_pipeline(bundle, s.tmp, share=True, attn_implementation="sdpa")
    del bundle
    pipe.set_progress_bar_config(disable=True)
    mode = compile_mode(preset, s)
    if mode:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    rec["compile_mode"] = mode or None
    clock.sync()
    rec["build_s"] = time.perf_counter() - t0
    return pipe


def diffusers_step_call(unet, sched, pe: torch.Tensor, npe: torch.Tensor, x_T: torch.Tensor,
                        s: Settings) -> Callable[[], torch.Tensor]:
    """One CFG step per call as StableDiffusionPipeline makes it, cycling through timesteps of the schedule."""
    sched.set_timesteps(s.steps, device=s.device)
    ctx = torch.cat([npe, pe])
    # t as the pipeline passes it: a 0-d tensor from the schedule (a Python int would make a compiled UNet
    # specialise on, and recompile for, every timestep)
    ts = itertools.cycle([sched.timesteps[i] for i in _step_indices(len(sched.timesteps), s.warmup + s.repeat)])

    def step() -> torch.Tensor:
        t = next(ts)
        # the call exactly as StableDiffusionPipeline makes it (other kwargs = another compiled graph)
        out = unet(torch.cat([x_T, x_T]), t, encoder_hidden_states=ctx, timestep_cond=None,
                   cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + s.cfg * (out_cond - out_uncond)
        return sched.step(out, t, x_T).prev_sample

    return step


def run_diffusers(preset: Preset, s: Settings, clock: Clock, rec: dict[str, Any], flush: Flush) -> None:
    pipe = build_diffusers(preset, s, clock, rec)
    clock.reset_peak()
    h = w = s.size
    with torch.inference_mode():
        if "text" in s.parts:
            t = clock.measure(lambda: pipe.encode_prompt(PROMPT, s.device, 1, True, negative_prompt=NEGATIVE),
                              s.repeat, s.warmup)
            rec["text"] = t.as_dict()
            flush(rec)
        pe, npe = pipe.encode_prompt(PROMPT, s.device, s.batch, True, negative_prompt=NEGATIVE)
        x_T = make_inputs(s, s.dtype)
        if "step" in s.parts:
            step = diffusers_step_call(pipe.unet, pipe.scheduler, pe, npe, x_T, s)
            rec["step"] = clock.measure(step, s.repeat, s.warmup).as_dict()
            flush(rec)
        latents = x_T  # what the VAE decodes when the loop is not run (the same values on both sides)
        if "loop" in s.parts:
            def loop() -> torch.Tensor:
                return pipe(prompt_embeds=pe, negative_prompt_embeds=npe, num_inference_steps=s.steps,
                            guidance_scale=s.cfg, height=h, width=w, latents=x_T, output_type="latent").images

            t, latents = clock.once(loop)
            runs = [clock.once(loop)[0] for _ in range(s.loop_repeat)]
            rec["loop"] = {"first_s": t, "median_s": _median(runs), "runs_s": runs}
            flush(rec)
        if "vae" in s.parts:
            z = latents / pipe.vae.config.scaling_factor
            rec["vae"] = clock.measure(lambda: pipe.vae.decode(z).sample, s.repeat, s.warmup).as_dict()
            flush(rec)
            rec["vae_dtype"] = str(pipe.vae.dtype).removeprefix("torch.")
        if "e2e" in s.parts and s.batch == 1:
            def e2e():
                return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=s.steps, guidance_scale=s.cfg,
                            height=h, width=w, latents=x_T, output_type="pil").images

            rec["e2e"] = clock.measure(e2e, s.e2e_repeat, 1).as_dict()
            flush(rec)
    rec["peak_gb"] = clock.peak_memory_gb()
    del pipe
    free_memory()


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def describe(preset: Preset, s: Settings, rec: dict[str, Any]) -> bool:
    """Fill `rec` with the configuration's settings; False (and rec["skipped"]) where it cannot run here."""
    opts = fast_options(preset, s)
    rec.update({
        "config": preset.name, "impl": preset.impl, "doc": preset.doc, "arch": s.arch, "tiny": s.tiny,
        "device": str(s.device), "dtype": _name(s.dtype), "size": s.size, "batch": s.batch, "steps": s.steps,
        "cfg": s.cfg, "attention": opts.attention if opts else "sdpa",
        "compile": (opts.compile if opts else compile_mode(preset, s) or None),
        "cuda_graphs": bool(opts and opts.cuda_graphs) or (preset.impl == "diffusers" and
                                                           compile_mode(preset, s) == "reduce-overhead"),
        "fast_options": None if opts is None else {k: _name(v) for k, v in opts.__dict__.items()},
        "complete": False,
    })
    if preset.cuda_only and s.device.type != "cuda":
        rec["skipped"] = "needs CUDA"
        return False
    return True


def run_config(preset: Preset, s: Settings, clock: Clock, rec: dict[str, Any], flush: Flush) -> None:
    """Fill `rec` with one configuration's settings and measurements (or the error that stopped it), calling
    `flush(rec)` after every measurement so a run cut short keeps the parts it finished."""
    if not describe(preset, s, rec):
        return

    def flush_derived(r: dict[str, Any]) -> None:
        r["peak_gb"] = clock.peak_memory_gb()
        derive(r, s)
        flush(r)

    try:
        run = run_ours if preset.impl == "ours" else run_diffusers
        run(preset, s, clock, rec, flush_derived)
        rec["complete"] = True
    except Exception as e:  # a failing configuration must not lose the others' results
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        free_memory()
    derive(rec, s)


def derive(rec: dict[str, Any], s: Settings) -> None:
    if "step" in rec:
        rec["step_ms"] = rec["step"]["median_s"] * 1e3
        rec["warmup_s"] = rec["step"]["first_s"]
    if rec.get("loop") and rec["loop"]["median_s"]:
        rec["loop_s"] = rec["loop"]["median_s"]
        rec["loop_it_s"] = s.steps / rec["loop_s"]
    for part in ("text", "vae"):
        if part in rec:
            rec[f"{part}_ms"] = rec[part]["median_s"] * 1e3
    if "e2e" in rec:
        rec["e2e_s"] = rec["e2e"]["median_s"]


def _name(v: Any) -> Any:
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v


# ---------------------------------------------------------------------------------------------------------- sweep
def run_sweep(preset: Preset, s: Settings, clock: Clock, k: int, layout: float, size: int, steps: int,
              independent: str) -> dict[str, Any]:
    """GBSD sweep cost: K α values sharing one layout stage vs K independent runs (same seed, same images)."""
    alphas = [i / (k - 1) for i in range(k)] if k > 1 else [0.5]
    opts = fast_options(preset, s)
    rec: dict[str, Any] = {"config": preset.name, "k": k, "layout": layout, "size": size, "steps": steps,
                           "alphas": alphas, "independent_mode": independent}
    try:
        bundle = build_bundle(s.arch, s.device, s.dtype, s.tiny, s.seed)
        params = GenerationParams(PROMPT, focus=FOCUS, layout=layout, negative=NEGATIVE, steps=steps, cfg=s.cfg,
                                  seed=s.seed, width=size, height=size)
        with torch.inference_mode():
            ours_generate(bundle, params, opts)  # warm-up (compilation / capture at batch 1)
            if opts is not None and (opts.compile or opts.cuda_graphs):
                ours_sweep(bundle, params, alphas, opts)  # and at batch K (a new shape for both)
            t_shared, results = clock.once(lambda: ours_sweep(bundle, params, alphas, opts))
            rec["shared_s"] = t_shared
            rec["shared_unet_calls"] = results[0].unet_calls
            if independent == "measure":
                times, calls = [], 0
                for a in alphas:
                    t, r = clock.once(lambda: ours_generate(bundle, replace(params, alpha=a), opts))
                    times.append(t)
                    calls += r.unet_calls
                rec["independent_s"], rec["independent_unet_calls"] = sum(times), calls
            else:  # K x one measured run: each independent run does the same work
                t, r = clock.once(lambda: ours_generate(bundle, replace(params, alpha=alphas[0]), opts))
                rec["single_run_s"] = t
                rec["independent_s"], rec["independent_unet_calls"] = k * t, k * r.unet_calls
        n_layout = layout_steps(steps, layout)
        rec["expected_shared_unet_calls"] = n_layout + k * (steps - n_layout)
        rec["speedup"] = rec["independent_s"] / rec["shared_s"]
        del bundle
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
    free_memory()
    return rec

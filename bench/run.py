"""What one benchmark configuration measures, for ours and for the diffusers baseline.

Per configuration and shape (image size x batch), on identical weights (see models.py) and identical inputs (x_T from
one seed, the same prompt), in this order, each flushed to the JSON as soon as it is measured (a run cut short by a
time cap keeps the step and loop figures, which come first):

    step_ms   one CFG step: UNet on [x; x] (batch 2B), guidance, DDIM update; median over timesteps of the schedule
    loop      the whole denoise loop of `steps` steps (it/s = steps / seconds); ours: `sampling.denoise` with the
              config's stepper; diffusers: `StableDiffusionPipeline(prompt_embeds=..., output_type="latent")`
              (SDXL: `StableDiffusionXLPipeline`, with the pooled embeddings too)
    text_ms   the two text-encoder calls of a CFG run (negative and positive prompt, as both pipelines do)
    vae_ms    VAE decode of the final latents [B,4,h,w] -> [B,3,8h,8w]
    e2e_s     the user-level call: `pipeline.generate` / `pipe(prompt)` from prompt to PIL image (batch 1 only)
    samplers  ours, with --samplers: the loop of each sampler, timed round-robin (bench/samplers.py)
    warmup_s  the first step call (compilation, CUDA-graph capture, cuDNN autotuning land here)
    peak_gb   peak GPU memory allocated during the shape (CPU: the process' peak RSS)

A configuration's models are built once and serve every shape; its fast stepper is cached on the bundle, so the
loop and e2e reuse the step's compiled code and graphs. FLOPs and the derived figures: flops.py, schema.py.
"""
from __future__ import annotations

import gc
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from gbsd_core.bundle import SDBundle
from gbsd_core.fast import FastOptions, accelerate, make_stepper, release_steppers
from gbsd_core.pipeline import GenerationParams, GenerationResult, generate
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import (
    CFGStep,
    Conditioning,
    Stage,
    Stepper,
    cat_conditioning,
    denoise,
)

from .models import build_bundle, parameter_counts
from .report import progress
from .presets import (
    TUTORIAL_INDUCTOR_OPTIONS,
    Preset,
    compile_mode,
    fast_options_kwargs,
)
from .samplers import sampler_loops
from .schema import derive
from .timing import Clock

Flush = Callable[[dict[str, Any]], None]  # called with the partial record after each measurement

PROMPT = "a bunny and a carrot in a garden, bokeh, photograph"
FOCUS = "a carrot"
NEGATIVE = ""


@dataclass
class Settings:
    arch: str
    device: torch.device
    dtype: torch.dtype
    size: int  # the shape being measured (one of `shapes`)
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
    parts: tuple[str, ...] = ("step", "loop", "text", "vae", "e2e")
    vae_dtype: torch.dtype | None = None  # None: same as dtype for every configuration (diffusers has one dtype)
    shapes: tuple[tuple[int, int], ...] = ()  # every (size, batch) of the run; () = just (size, batch)
    flops: dict[tuple[int, int], int] = field(default_factory=dict)  # (size, batch) -> FLOPs per step
    machine: str = ""
    gpu: str | None = None
    samplers: tuple[str, ...] = ()  # --samplers: our per-sampler loops (bench/samplers.py)
    schedule: str = "normal"  # the σ samplers' schedule there
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark during the run (both sides)

    @property
    def latent_hw(self) -> int:
        return self.size // 8

    def each_shape(self) -> list[Settings]:
        """These settings at each (size, batch) of the run."""
        return [replace(self, size=size, batch=batch) for size, batch in (self.shapes or ((self.size, self.batch),))]


def fast_options(preset: Preset, s: Settings) -> FastOptions | None:
    """The FastOptions a preset stands for, or None for the plain path."""
    kw = fast_options_kwargs(preset, s.compile_mode)
    if kw is None:
        return None
    return FastOptions(dtype=s.dtype, vae_dtype=s.vae_dtype or s.dtype, **kw)


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


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _time_loop(clock: Clock, loop: Callable[[], torch.Tensor], s: Settings) -> tuple[dict[str, Any], torch.Tensor]:
    t, latents = clock.once(loop)  # warm-up (and the latents for the VAE)
    runs = [clock.once(loop)[0] for _ in range(s.loop_repeat)]
    return {"first_s": t, "median_s": _median(runs), "runs_s": runs}, latents


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
        return make_stepper(bundle, opts, s.cfg)  # cached on the bundle: the loop and e2e reuse it
    return CFGStep(bundle.unet, make_sampler(bundle.noise_schedule, bundle.family.prediction_type), s.cfg)


def ours_generate(bundle: SDBundle, params: GenerationParams, opts: FastOptions | None) -> GenerationResult:
    """`pipeline.generate` as a user runs it: the plain path, or through the fast stepper for these parameters."""
    if opts is None:
        return generate(bundle, params)
    with make_stepper(bundle, opts, params.cfg, params.eta) as step:
        return generate(bundle, params, stepper=step)


def ours_step_call(stepper: Stepper, uncond: Conditioning, cond: Conditioning, x_T: torch.Tensor,
                   timesteps: torch.Tensor, s: Settings) -> Callable[[], torch.Tensor]:
    """One CFG step per call, cycling through steps spread over the schedule."""
    both = cat_conditioning([uncond, cond])
    if both.vector is None:
        stepper.set_context(both.context)
    else:  # SDXL: the vector y as well
        stepper.set_context(both.context, both.vector)
    steps = itertools.cycle(_step_indices(len(timesteps), s.warmup + s.repeat))
    return lambda: stepper.step(x_T, next(steps), None, None)


def ours_contexts(bundle: SDBundle, s: Settings, dtype: torch.dtype) -> tuple[Conditioning, Conditioning]:
    """(negative, prompt) conditioning at s's batch, as `pipeline.generate` builds them (SDXL: with the pooled text
    and the size embeddings of an s.size² image)."""
    def rows(c: Conditioning) -> Conditioning:
        return c.map(lambda t: t.to(s.device, dtype).expand(s.batch, *t.shape[1:]))

    return tuple(rows(bundle.conditioning(p, (s.size, s.size), negative=i == 0))  # type: ignore[return-value]
                 for i, p in enumerate((NEGATIVE, PROMPT)))


def run_ours_shape(bundle: SDBundle, opts: FastOptions | None, s: Settings, clock: Clock, rec: dict[str, Any],
                   flush: Flush) -> None:
    clock.reset_peak()
    # The fast stepper keeps latents in fp32 and casts only the UNet input; the plain path runs in the UNet's dtype.
    lat_dtype = torch.float32 if opts is not None else s.dtype
    with torch.inference_mode():
        uncond, cond = ours_contexts(bundle, s, lat_dtype)
        x_T = make_inputs(s, lat_dtype)
        stepper = ours_stepper(bundle, opts, s)
        timesteps = stepper.sampler.timesteps(s.steps)
        latents = x_T  # what the VAE decodes when the loop is not run (the same values on both sides)
        try:
            if "step" in s.parts:
                rec["step"] = clock.measure(ours_step_call(stepper, uncond, cond, x_T, timesteps, s), s.repeat,
                                            s.warmup).as_dict()
                flush(rec)
            if "loop" in s.parts:
                stages = [Stage("global", range(len(timesteps)), cond)]

                def loop() -> torch.Tensor:
                    out = x_T
                    for state in denoise(stepper, x_T, timesteps, stages, uncond):
                        out = state.latents
                    return out

                rec["loop"], latents = _time_loop(clock, loop, s)
                flush(rec)
            if s.samplers:
                rec["samplers"] = sampler_loops(bundle, opts, s, clock, (uncond, cond), x_T)
                flush(rec)
        finally:
            if hasattr(stepper, "close"):
                stepper.close()
        if "text" in s.parts:
            rec["text"] = clock.measure(lambda: [bundle.encode_prompt(p) for p in (NEGATIVE, PROMPT)], s.repeat,
                                        s.warmup).as_dict()
            flush(rec)
        if "vae" in s.parts:
            z = latents / bundle.vae.config.scale_factor
            rec["vae"] = clock.measure(lambda: bundle.vae.decode(z), s.repeat, s.warmup).as_dict()
            rec["vae_dtype"] = str(bundle.vae.dtype).removeprefix("torch.")  # decode may have upcast itself
            flush(rec)
    if "e2e" in s.parts and s.batch == 1:
        params = GenerationParams(PROMPT, negative=NEGATIVE, steps=s.steps, cfg=s.cfg, seed=s.seed,
                                  width=s.size, height=s.size)
        rec["e2e"] = clock.measure(lambda: ours_generate(bundle, params, opts), s.e2e_repeat, 1).as_dict()
        flush(rec)


# ------------------------------------------------------------------------------------------------------ diffusers
def build_diffusers(preset: Preset, s: Settings, clock: Clock, rec: dict[str, Any]):
    """The diffusers StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) on the seeded weights, set up as the
    preset's recipe says."""
    from .reference import diffusers_sd_pipeline
    from .reference_sdxl import diffusers_sdxl_pipeline

    t0 = time.perf_counter()
    bundle = build_bundle(s.arch, s.device, s.dtype, s.tiny, s.seed)
    rec["params"] = parameter_counts(bundle)
    # The twin takes the bundle's tensors (share=True: one copy in memory); SDPA attention in the text encoder, as a
    # diffusers user gets by default.
    make = diffusers_sdxl_pipeline if bundle.unet.config.adm_in_channels else diffusers_sd_pipeline
    # The tokenizer files are read into memory while the pipeline is built, so their folder need not outlive it.
    with tempfile.TemporaryDirectory(prefix="gbsd-bench-") as tmp:
        pipe = make(bundle, Path(tmp), share=True, attn_implementation="sdpa")
    del bundle
    pipe.set_progress_bar_config(disable=True)
    mode = compile_mode(preset, s.compile_mode, s.device.type)
    if mode:
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        if preset.full_recipe:  # torch.compile takes a mode or options: the mode's options plus the docs' flags
            import torch._inductor as inductor

            options = {**inductor.list_mode_options(mode), **dict(TUTORIAL_INDUCTOR_OPTIONS)}
            pipe.unet = torch.compile(pipe.unet, options=options, fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, options=options, fullgraph=True)
        else:
            pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    rec["compile_mode"] = mode or None
    clock.sync()
    rec["build_s"] = time.perf_counter() - t0
    return pipe


def diffusers_added_cond(pooled: tuple[torch.Tensor, torch.Tensor] | None, s: Settings,
                         dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """SDXL's `added_cond_kwargs` for [negative; prompt] rows: the pooled text embeddings and the size ids,
    (original h, w, crop top, left, target h, w) = (size, size, 0, 0, size, size), as StableDiffusionXLPipeline
    builds them by default (`_get_add_time_ids`). None for SD1/SD2."""
    if pooled is None:
        return None
    time_ids = torch.tensor([[s.size, s.size, 0, 0, s.size, s.size]], device=s.device, dtype=dtype)
    return {"text_embeds": torch.cat(pooled), "time_ids": time_ids.repeat(2 * s.batch, 1)}


def diffusers_step_call(unet, sched, pe: torch.Tensor, npe: torch.Tensor, x_T: torch.Tensor, s: Settings,
                        added: dict[str, torch.Tensor] | None = None) -> Callable[[], torch.Tensor]:
    """One CFG step per call as StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline, `added`) makes it, cycling
    through timesteps of the schedule."""
    sched.set_timesteps(s.steps, device=s.device)
    ctx = torch.cat([npe, pe])
    # t as the pipeline passes it: a 0-d tensor from the schedule (a Python int would make a compiled UNet
    # specialise on, and recompile for, every timestep)
    ts = itertools.cycle([sched.timesteps[i] for i in _step_indices(len(sched.timesteps), s.warmup + s.repeat)])

    def step() -> torch.Tensor:
        t = next(ts)
        # the call exactly as StableDiffusionPipeline makes it (other kwargs = another compiled graph)
        out = unet(torch.cat([x_T, x_T]), t, encoder_hidden_states=ctx, timestep_cond=None,
                   cross_attention_kwargs=None, added_cond_kwargs=added, return_dict=False)[0]
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + s.cfg * (out_cond - out_uncond)
        return sched.step(out, t, x_T).prev_sample

    return step


def diffusers_negative(pipe) -> str | None:
    """The negative prompt that makes diffusers condition as ours does: SDXL base's empty negative prompt is zeros in
    ours (Family.force_zeros_for_empty_prompt, sgm's sampling), which diffusers does for negative_prompt=None."""
    return None if not NEGATIVE and getattr(pipe.config, "force_zeros_for_empty_prompt", False) else NEGATIVE


def diffusers_embeddings(pipe, s: Settings) -> tuple[torch.Tensor, torch.Tensor,
                                                      tuple[torch.Tensor, torch.Tensor] | None]:
    """(prompt embeds, negative embeds, SDXL's pooled pair [negative; prompt] or None) as the pipeline encodes them
    for s.batch images, with the negative prompt that conditions as ours does (`diffusers_negative`)."""
    # keywords: StableDiffusionXLPipeline.encode_prompt has prompt_2 second; it also returns the pooled pair
    embeds = pipe.encode_prompt(PROMPT, device=s.device, num_images_per_prompt=s.batch,
                                do_classifier_free_guidance=True, negative_prompt=diffusers_negative(pipe))
    pooled = (embeds[3], embeds[2]) if len(embeds) == 4 else None
    return embeds[0], embeds[1], pooled


def run_diffusers_shape(pipe, s: Settings, clock: Clock, rec: dict[str, Any], flush: Flush) -> None:
    clock.reset_peak()
    h = w = s.size
    negative = diffusers_negative(pipe)
    with torch.inference_mode():
        pe, npe, pooled = diffusers_embeddings(pipe, s)
        x_T = make_inputs(s, s.dtype)
        if "step" in s.parts:
            added = diffusers_added_cond(pooled, s, pe.dtype)
            rec["step"] = clock.measure(diffusers_step_call(pipe.unet, pipe.scheduler, pe, npe, x_T, s, added),
                                        s.repeat, s.warmup).as_dict()
            flush(rec)
        latents = x_T  # what the VAE decodes when the loop is not run (the same values on both sides)
        if "loop" in s.parts:
            extra = {} if pooled is None else {"negative_pooled_prompt_embeds": pooled[0],
                                               "pooled_prompt_embeds": pooled[1]}

            def loop() -> torch.Tensor:
                return pipe(prompt_embeds=pe, negative_prompt_embeds=npe, num_inference_steps=s.steps,
                            guidance_scale=s.cfg, height=h, width=w, latents=x_T, output_type="latent",
                            **extra).images

            rec["loop"], latents = _time_loop(clock, loop, s)
            flush(rec)
        if "text" in s.parts:
            rec["text"] = clock.measure(lambda: pipe.encode_prompt(PROMPT, device=s.device, num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True,
                                                                   negative_prompt=negative),
                                        s.repeat, s.warmup).as_dict()
            flush(rec)
        if "vae" in s.parts:
            z = latents / pipe.vae.config.scaling_factor
            rec["vae"] = clock.measure(lambda: pipe.vae.decode(z).sample, s.repeat, s.warmup).as_dict()
            rec["vae_dtype"] = str(pipe.vae.dtype).removeprefix("torch.")
            flush(rec)
        if "e2e" in s.parts and s.batch == 1:
            def e2e():
                return pipe(PROMPT, negative_prompt=negative, num_inference_steps=s.steps, guidance_scale=s.cfg,
                            height=h, width=w, latents=x_T, output_type="pil").images

            rec["e2e"] = clock.measure(e2e, s.e2e_repeat, 1).as_dict()
            flush(rec)


# ---------------------------------------------------------------------------------------------------- one config
def _name(v: Any) -> Any:
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v


def describe(preset: Preset, s: Settings, rec: dict[str, Any]) -> bool:
    """Fill `rec` with the configuration's settings at s's shape; False (and rec["skipped"]) where it cannot run."""
    try:
        opts = fast_options(preset, s)
        opts_error = None
    except ValueError as e:  # e.g. a --compile-mode override these options refuse
        opts, opts_error = None, f"ValueError: {e}"
    mode = compile_mode(preset, s.compile_mode, s.device.type)
    rec.update({
        "config": preset.name, "impl": preset.impl, "recipe": preset.recipe, "machine": s.machine, "arch": s.arch,
        "tiny": s.tiny, "device": str(s.device), "dtype": _name(s.dtype), "size": s.size, "batch": s.batch,
        "steps": s.steps, "cfg": s.cfg, "attention": opts.attention if opts else "sdpa",
        "compile": (opts.compile if opts else mode or None),
        "cuda_graphs": bool(opts and opts.cuda_graphs) or (s.device.type == "cuda" and (
            (opts is not None and opts.compile in ("reduce-overhead", "max-autotune"))
            or (preset.impl == "diffusers" and mode in ("reduce-overhead", "max-autotune")))),
        "fast_options": None if opts is None else {k: _name(v) for k, v in opts.__dict__.items()},
        "flops_per_step": s.flops.get((s.size, s.batch)),
        "cudnn_benchmark": s.cudnn_benchmark,
        "complete": False,
    })
    if opts_error:
        rec["error"] = opts_error
        return False
    if preset.cuda_only and s.device.type != "cuda":
        rec["skipped"] = "needs CUDA"
        return False
    return True


def run_config(preset: Preset, s: Settings, clock: Clock, recs: list[dict[str, Any]], flush: Flush) -> None:
    """Build the configuration once, then fill one record per shape of `s` (described already, in order), calling
    `flush(rec)` after every measurement so a run cut short keeps the parts it finished. A failing shape (say, out of
    memory at the largest batch) records its error and the next shape runs."""
    shapes = s.each_shape()
    todo = [(ss, rec) for ss, rec in zip(shapes, recs) if "skipped" not in rec and "error" not in rec]
    if not todo:
        return

    def flush_derived(r: dict[str, Any]) -> None:
        r["peak_gb"] = clock.peak_memory_gb()
        derive(r, s.gpu)
        flush(r)
        print(progress(r), file=sys.stderr, flush=True)  # the log has each figure as soon as it exists

    try:
        built = build_ours(preset, s, clock, todo[0][1]) if preset.impl == "ours" else \
            build_diffusers(preset, s, clock, todo[0][1])
    except Exception as e:  # a failing configuration must not lose the others' results
        for _, rec in todo:
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        free_memory()
        return
    for ss, rec in todo:
        for key in ("params", "build_s", "compile_mode"):
            if key in todo[0][1]:
                rec[key] = todo[0][1][key]
        try:
            if preset.impl == "ours":
                run_ours_shape(*built, ss, clock, rec, flush_derived)
            else:
                run_diffusers_shape(built, ss, clock, rec, flush_derived)
            rec["complete"] = True
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            free_memory()
        rec["peak_gb"] = clock.peak_memory_gb()
        derive(rec, s.gpu)
        flush(rec)
    if preset.impl == "ours":
        release_steppers(built[0])
    del built
    free_memory()

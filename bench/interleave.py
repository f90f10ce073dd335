"""`python -m bench --interleave --parts step`: one CFG step of several configurations, timed round-robin.

Why: a CPU shared with other machines' jobs, or one that changes its clock, drifts by 10-40 % within minutes
(measured here: the same configuration timed 0.6 s per step in one run and 1.0 s in the next). Configurations timed
one after another (the default) can gain or lose that much against each other. Interleaved, every configuration is
built first, then call 1 of each is timed, then call 2 of each, and so on: all of them see the same drift, so their
ratios hold even while the absolute times move. Only the step is timed this way, and every configuration stays in
memory at once (each keeps only its UNet: the prompts are encoded first, the text encoder and VAE dropped).
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from .presets import Preset
from .run import (
    Settings,
    build_diffusers,
    build_ours,
    describe,
    diffusers_added_cond,
    diffusers_embeddings,
    diffusers_step_call,
    free_memory,
    make_inputs,
    ours_contexts,
    ours_step_call,
    ours_stepper,
)
from .schema import derive
from .timing import Clock


def _prepare(preset: Preset, s: Settings, clock: Clock, rec: dict[str, Any]) -> tuple[Callable, Callable]:
    """(step call, close) of one configuration, holding no more than it needs."""
    if preset.impl == "ours":
        bundle, opts = build_ours(preset, s, clock, rec)
        lat_dtype = torch.float32 if opts is not None else s.dtype  # as run_ours: the fast stepper keeps fp32 latents
        uncond, cond = ours_contexts(bundle, s, lat_dtype)
        stepper = ours_stepper(bundle, opts, s)
        call = ours_step_call(stepper, uncond, cond, make_inputs(s, lat_dtype), stepper.sampler.timesteps(s.steps), s)
        return call, getattr(stepper, "close", lambda: None)
    pipe = build_diffusers(preset, s, clock, rec)
    pe, npe, pooled = diffusers_embeddings(pipe, s)  # SDXL: and the pooled pair, for its added_cond_kwargs
    added = diffusers_added_cond(pooled, s, pe.dtype)
    return diffusers_step_call(pipe.unet, pipe.scheduler, pe, npe, make_inputs(s, s.dtype), s, added), lambda: None


def run_interleaved(presets: list[Preset], s: Settings, clock: Clock, records: list[dict[str, Any]],
                    flush: Callable[[], None]) -> None:
    """Append one record per preset to `records` with its step timed round-robin against the others' (at s's one
    shape; `python -m bench` calls this once per size and batch)."""
    live: list[tuple[dict[str, Any], Callable, Callable]] = []
    with torch.inference_mode():
        for preset in presets:
            rec: dict[str, Any] = {}
            records.append(rec)
            if not describe(preset, s, rec):
                continue
            try:
                call, close = _prepare(preset, s, clock, rec)
                first, _ = clock.once(call)  # warm-up: compilation, capture, first-touch
                for _ in range(s.warmup - 1):
                    clock.once(call)
                rec["step"] = {"first_s": first, "runs_s": [], "interleaved": True}
                live.append((rec, call, close))
            except Exception as e:  # a failing configuration must not stop the others
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                free_memory()
            flush()
        for _ in range(s.repeat):
            for rec, call, _close in live:
                rec["step"]["runs_s"].append(clock.once(call)[0])
    for rec, _call, close in live:
        close()
        rec["step"]["median_s"] = statistics.median(rec["step"]["runs_s"])
        rec["peak_gb"] = clock.peak_memory_gb()
        rec["complete"] = True
        derive(rec, s.gpu)
    flush()

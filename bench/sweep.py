"""`python -m bench --sweep CONFIG`: the GBSD sweep's cost, K α values sharing one layout stage against K independent
runs (same seed, same images), in UNet evaluations and seconds."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from gbsd_core.fast import FastOptions, make_stepper, release_steppers
from gbsd_core.pipeline import GenerationParams, GenerationResult, sweep
from gbsd_core.sampling import layout_steps

from .models import build_bundle
from .presets import Preset
from .run import (
    FOCUS,
    NEGATIVE,
    PROMPT,
    Settings,
    fast_options,
    free_memory,
    ours_generate,
)
from .timing import Clock


def ours_sweep(bundle, params: GenerationParams, alphas: list[float],
               opts: FastOptions | None) -> list[GenerationResult]:
    if opts is None:
        return sweep(bundle, params, alphas=alphas)
    with make_stepper(bundle, opts, params.cfg, params.eta) as step:
        return sweep(bundle, params, alphas=alphas, stepper=step)


def run_sweep(preset: Preset, s: Settings, clock: Clock, k: int, layout: float, size: int, steps: int,
              independent: str, flush: Callable[[dict[str, Any]], None] = lambda rec: None) -> dict[str, Any]:
    """GBSD sweep cost: K α values sharing one layout stage vs K independent runs (same seed, same images).
    `flush(rec)` after each measurement (the shared sweep, each independent run), so a run cut short keeps them."""
    alphas = [i / (k - 1) for i in range(k)] if k > 1 else [0.5]
    rec: dict[str, Any] = {"config": preset.name, "k": k, "layout": layout, "size": size, "steps": steps,
                           "alphas": alphas, "independent_mode": independent}
    try:
        opts = fast_options(preset, s)
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
            flush(rec)
            if independent == "measure":
                times, calls = rec.setdefault("independent_runs_s", []), 0
                for a in alphas:
                    t, r = clock.once(lambda: ours_generate(bundle, replace(params, alpha=a), opts))
                    times.append(t)
                    calls += r.unet_calls
                    flush(rec)
                rec["independent_s"], rec["independent_unet_calls"] = sum(times), calls
            else:  # K x one measured run: each independent run does the same work
                t, r = clock.once(lambda: ours_generate(bundle, replace(params, alpha=alphas[0]), opts))
                rec["single_run_s"] = t
                rec["independent_s"], rec["independent_unet_calls"] = k * t, k * r.unet_calls
        n_layout = layout_steps(steps, layout)
        rec["expected_shared_unet_calls"] = n_layout + k * (steps - n_layout)
        rec["speedup"] = rec["independent_s"] / rec["shared_s"]
        release_steppers(bundle)
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
    free_memory()
    flush(rec)
    return rec

"""`python -m bench --samplers ddim,euler,euler_a,dpmpp_2m`: the denoise loop of each sampler, for each of our
configurations, timed round-robin (loop 1 of each sampler, then loop 2 of each, ...: a drifting machine moves them
alike, as `--interleave` does for the step).

What it shows: what a step costs whichever sampler runs it. Every sampler calls the UNet once per step, and its update
is a few element-wise operations on the latents (in the fast path the same compiled / graphed step with other
coefficients), so a sampler's loop should cost what DDIM's costs per step; the gain of Euler or DPM++ 2M is that they
need fewer steps (20-25 instead of 50) for a finished image. Each loop runs `--steps` steps of the plain text-to-image
schedule from the same x_T (Euler a's noise from a seeded generator), the σ samplers on `--schedule`.

Per record, `samplers` = {name: {first_s, median_s, runs_s, schedule, loop_it_s, step_ms, x_ddim}}: `step_ms` is the
loop's median time per step and `x_ddim` that over DDIM's (1.00 = the same cost per step; present when DDIM is in the
list).
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gbsd_core.fast import make_stepper
from gbsd_core.samplers import SAMPLERS, make_sampler
from gbsd_core.sampling import CFGStep, Stage, Stepper, denoise

if TYPE_CHECKING:
    from gbsd_core.bundle import SDBundle
    from gbsd_core.fast import FastOptions

    from .run import Settings
    from .timing import Clock

__all__ = ["SAMPLERS", "sampler_loops", "samplers_table"]


def _stepper(bundle: SDBundle, opts: FastOptions | None, cfg: float, name: str, schedule: str) -> Stepper:
    if opts is not None:
        return make_stepper(bundle, opts, cfg, 0.0, name, schedule)  # cached on the bundle per sampler
    return CFGStep(bundle.unet, make_sampler(bundle.noise_schedule, bundle.family.prediction_type, name, schedule), cfg)


def _loop(stepper: Stepper, x_T: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, steps: int,
          seed: int) -> Callable[[], torch.Tensor]:
    """One whole text-to-image loop of the stepper's sampler per call."""
    def loop() -> torch.Tensor:
        sampler = stepper.sampler
        ts = sampler.timesteps(steps)  # (re)fixes the run of the stepper's own sampler
        out = x_T
        for state in denoise(stepper, sampler.start_latents(x_T), ts, [Stage("global", range(len(ts)), cond)],
                             uncond, generator=torch.Generator().manual_seed(seed)):
            out = state.latents
        return out

    return loop


def sampler_loops(bundle: SDBundle, opts: FastOptions | None, s: Settings, clock: Clock,
                  contexts: tuple[torch.Tensor, torch.Tensor], x_T: torch.Tensor) -> dict[str, dict[str, Any]]:
    """{sampler: timings} for s.samplers, round-robin: one warm-up loop each (compilation, capture), then
    s.loop_repeat rounds of one loop per sampler."""
    uncond, cond = contexts
    live = []
    with torch.inference_mode():
        for name in s.samplers:
            schedule = "normal" if name == "ddim" else s.schedule
            stepper = _stepper(bundle, opts, s.cfg, name, schedule)
            live.append((name, schedule, stepper, _loop(stepper, x_T, uncond, cond, s.steps, s.seed)))
        out: dict[str, dict[str, Any]] = {}
        try:
            for name, schedule, _, loop in live:
                out[name] = {"first_s": clock.once(loop)[0], "runs_s": [], "schedule": schedule}
            for _ in range(s.loop_repeat):
                for name, _, _, loop in live:
                    out[name]["runs_s"].append(clock.once(loop)[0])
        finally:
            for *_, stepper, _ in live:
                if hasattr(stepper, "close"):
                    stepper.close()
    for t in out.values():
        t["median_s"] = statistics.median(t["runs_s"])
        t["loop_it_s"] = s.steps / t["median_s"]
        t["step_ms"] = 1e3 * t["median_s"] / s.steps
    if "ddim" in out:
        for t in out.values():
            t["x_ddim"] = t["step_ms"] / out["ddim"]["step_ms"]
    return out


def samplers_table(records: list[dict[str, Any]]) -> str:
    """The per-sampler loops of every record that has them, as a markdown table ("" when none has)."""
    rows = [(r, name, t) for r in records for name, t in (r.get("samplers") or {}).items()]
    if not rows:
        return ""
    lines = ["Per-sampler denoise loop (the samplers timed round-robin, median of the rounds):", "",
             "| config | dtype | size | batch | sampler | schedule | steps | loop it/s | ms/step | per step x DDIM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r, name, t in rows:
        ratio = f"{t['x_ddim']:.3f}" if "x_ddim" in t else "–"
        lines.append(f"| {r['config']} | {r['dtype']} | {r['size']} | {r['batch']} | {name} | {t['schedule']} | "
                     f"{r['steps']} | {t['loop_it_s']:.2f} | {t['step_ms']:.1f} | {ratio} |")
    return "\n".join(lines)

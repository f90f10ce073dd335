"""`--trace DIR` of `gbsd generate` and `gbsd img2img`: the denoising trajectory beside the image.

    gbsd generate "a bunny and a carrot in a garden, bokeh" --focus "a carrot" --trace trace/ -o bokeh.png

writes bokeh.png as without the flag (bit for bit), plus trace/bokeh_trace.png -- one sheet of x̂0 after every
k-th step, captioned, the first focus-stage frame marked red -- and trace/bokeh_trace.webp, the same frames as an
animation (gbsd_core/bokeh/trace.py). DIR may be new (its parent must exist); everything is checked before the
weights are read. The sheet carries the image's PNG metadata, so `--from-png` on it reproduces the image.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .common import UsageError, shown
from .outputs import check_files_in, check_output_dir

if TYPE_CHECKING:
    from ..bokeh.trace import Tracer
    from ..bundle import SDBundle
    from ..pipeline import GenerationParams
    from .pngmeta import ImageRecord

PREVIEWS = ("vae", "linear")


def add_trace_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace (the x̂0 filmstrip, gbsd_core/bokeh/trace.py)")
    g.add_argument("--trace", metavar="DIR", help="also write DIR/NAME_trace.png (x̂0 after every k-th step, "
                   "captioned, the start of the focus stage marked) and DIR/NAME_trace.webp (the same frames animated)")
    g.add_argument("--trace-every", type=int, metavar="K", help="keep every K-th step (default: the smallest K "
                   "that keeps at most 16 frames); the first focus step and the last step are always kept")
    g.add_argument("--trace-preview", choices=PREVIEWS, help="vae (default): one VAE decode per kept frame, the "
                   "exact x̂0; linear: a fixed latent-to-RGB projection, nearly free but approximate")


@dataclass(frozen=True)
class TracePlan:
    sheet: Path  # DIR/NAME_trace.png
    animation: Path  # DIR/NAME_trace.webp
    every: int | None
    preview: str


def plan_trace(args: argparse.Namespace, output: Path) -> TracePlan | None:
    """The trace request of a command line (None without --trace); raises UsageError. Writes nothing."""
    if args.trace is None:
        for flag, value in (("--trace-every", args.trace_every), ("--trace-preview", args.trace_preview)):
            if value is not None:
                raise UsageError(f"{flag} needs --trace DIR")
        return None
    if args.trace_every is not None and args.trace_every < 1:
        raise UsageError(f"--trace-every must be at least 1, got {args.trace_every}")
    d = Path(args.trace)
    check_output_dir(d, "--trace")  # an existing writable folder, or a new one whose parent is
    plan = TracePlan(d / f"{output.stem}_trace.png", d / f"{output.stem}_trace.webp", args.trace_every,
                     args.trace_preview or "vae")
    # every name the trace writes, under its own name (NAME_trace.webp is longer than -o's NAME.png)
    check_files_in(d, (plan.sheet.name, plan.animation.name), f"--trace {shown(d)}")
    for path in (plan.sheet, plan.animation):
        if path.resolve() == output.resolve():
            raise UsageError(f"--trace {d}: {path} would overwrite the image -o {output}")
    return plan


def make_tracer(plan: TracePlan, bundle: SDBundle) -> Tracer:
    from ..bokeh.trace import Tracer, latent_rgb_preview

    return Tracer(bundle.decode_latents if plan.preview == "vae" else latent_rgb_preview, every=plan.every)


def write_trace(plan: TracePlan, tracer: Tracer, params: GenerationParams, record: ImageRecord) -> list[Path]:
    """The sheet (with the image's metadata and a "trace" entry: kept steps, captions) and the animation."""
    from ..bokeh.pictures import save_animation
    from .pngmeta import pnginfo, save_png_atomic

    plan.sheet.parent.mkdir(exist_ok=True)
    extra = {"trace": {"steps": tracer.steps, "every": plan.every, "preview": plan.preview,
                       "captions": tracer.captions()}}
    save_png_atomic(tracer.sheet(), plan.sheet, pnginfo(params, record, extra))
    save_animation(tracer.cells(), plan.animation)
    return [plan.sheet, plan.animation]

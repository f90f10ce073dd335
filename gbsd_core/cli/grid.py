"""`gbsd grid`: an α (rows) × layout fraction (columns) contact sheet of GBSD images, each cell captioned with the
variance of the Laplacian of its target and background ("T 95.5 / B 12.1"), plus the same sheet with the target masks
overlaid and as local-sharpness heat maps (one colour scale for every cell).

One `sweep` per layout fraction: the α values share its layout stage, so a column costs n_layout + K·(n − n_layout)
UNet calls. Each cell's target is its own focus-word attention mask (gbsd_core/bokeh/attnmaps.py) unless --mask or
--box gives one. A layout fraction with no focus stage (1, plain SD on the global prompt: round(layout·n) = n) has no
attention map of its own; its cells take the mask of the same row at the nearest layout fraction that has one. Masks
and boxes are checked against the image size before any weights load.

    gbsd grid "a bunny and a carrot on grass" --focus "a carrot" --alphas 0,0.5,1 --layouts 0.7,0.8,0.9 -o grid/
    gbsd grid "a bunny and a carrot on grass" --focus "a carrot" --sampler dpmpp_2m --schedule karras --steps 20
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from typing import TYPE_CHECKING

from . import common
from . import loras as loras_cli
from .common import UsageError, check_box, check_image, parse_floats, parse_size, shown, usage_errors
from .outputs import check_files_in, check_output_dir, write_text_atomic
from .generate import add_prompt_args, add_sampler_args

if TYPE_CHECKING:
    from PIL import Image


OUTPUTS = ("grid.png", "grid_overlay.png", "grid_heatmap.png", "grid.json")
MIN_CELL = 160  # pixels: smaller images (test models) are enlarged on the sheet so the captions fit under them


def _enlarge(image: Image.Image) -> Image.Image:
    """Nearest-neighbour enlargement by a whole factor (pixels stay pixels) for images narrower than MIN_CELL."""
    k = -(-MIN_CELL // image.width)
    return image if k <= 1 else image.resize((image.width * k, image.height * k), resample=0)  # 0 = NEAREST


def _nearest(j: int, layouts: tuple[float, ...], has_focus: list[bool]) -> int:
    """The column with a focus stage whose layout fraction is nearest to column j's (the lower one on a tie)."""
    return min((i for i in range(len(layouts)) if has_focus[i]), key=lambda i: (abs(layouts[i] - layouts[j]), layouts[i]))


def run_grid(args: argparse.Namespace) -> int:
    """α (rows) × layout fraction (columns) contact sheet, one `sweep` per column (the α values share its layout stage)."""
    from ..params import GenerationParams, check_schedule, image_size
    from ..sampling import layout_steps

    alphas, layouts = parse_floats(args.alphas, "--alphas", "alpha"), parse_floats(args.layouts, "--layouts", "layout")
    if args.mask and args.box:
        raise UsageError("give --mask or --box, not both")
    box = None
    if args.box:
        try:
            values = [float(v) for v in args.box.split(",")]
        except ValueError:
            raise UsageError(f"--box {args.box!r}: expected x0,y0,x1,y1") from None
        box = check_box(values, f"--box {args.box}")
    mask_size = check_image(args.mask, "--mask") if args.mask else None
    width, height = parse_size(args.size) if args.size else (None, None)
    out = Path(args.output)
    check_output_dir(out)
    check_files_in(out, OUTPUTS, f"-o {shown(out)}")
    prompt, tag_loras = loras_cli.split_tags(args.prompt, "prompt", "both")
    focus, focus_loras = loras_cli.split_tags(args.focus, "--focus", "focus")
    with usage_errors():
        base = GenerationParams(prompt, focus=focus, steps=args.steps, cfg=args.cfg, negative=args.negative,
                                seed=args.seed, width=width, height=height, sampler=args.sampler or "ddim",
                                schedule=args.schedule or "normal", spacing=args.spacing,
                                emphasis=args.emphasis or "original", chunk_padding=args.chunk_padding or "repeat")
    has_focus = [layout_steps(base.steps, s) < base.steps for s in layouts]
    if not any(has_focus) and not (args.mask or box):
        raise UsageError(f"--layouts {args.layouts}: with {base.steps} steps every layout fraction leaves no focus stage (round(layout·n) = "
                         "n), so no cell has an attention mask to measure on: give --mask or --box, or a smaller layout fraction")
    model_path, family = common.resolve_model(args, None)
    device, dtype = common.device_dtype(args)
    checkpoint = common.inspect_checkpoint(model_path, family)
    with usage_errors(f"--steps {base.steps}: "):  # the sampler's own schedule on the model's noise schedule
        check_schedule(base, img2img=False, noise_schedule=checkpoint.noise_schedule)
    with usage_errors(f"--size {args.size}: " if args.size else ""):
        w, h = image_size(base, checkpoint.limits())
    if mask_size is not None and mask_size != (w, h):
        raise UsageError(f"--mask {args.mask} is {mask_size[0]}x{mask_size[1]} (W x H) but the images are {w}x{h}")
    library = common.embedding_library(args)
    common.check_prompts(base, [focus], checkpoint, library)
    run_loras = loras_cli.plan_loras(args, checkpoint, [*tag_loras, *focus_loras], None, has_focus=True)

    from .. import pipeline
    from ..bokeh.attnmaps import CrossAttentionCollector, prompt_positions
    from ..bokeh.masks import box_to_mask, load_mask
    from ..bokeh.metrics import SharpnessReport, local_variance_of_laplacian, to_gray
    from ..bokeh.pictures import contact_sheet, overlay_mask, sharpness_heatmap

    with usage_errors("--box: " if box else "--mask: "):
        given = load_mask(args.mask, (h, w)) if args.mask else box_to_mask(box, (h, w)) if box else None
    bundle = common.load_checkpoint(checkpoint, device, dtype)
    bundle.embeddings = library
    images = [[None] * len(layouts) for _ in alphas]
    masks, reports = [row[:] for row in images], [row[:] for row in images]
    with loras_cli.merged(run_loras, bundle) as loras:
        for j, layout in enumerate(layouts):
            collector = None
            if given is None and has_focus[j]:  # the focus words' positions where this column's focus stage starts
                with usage_errors("--focus: "):
                    positions, period = prompt_positions(bundle, focus, replace(base, layout=layout))
                collector = CrossAttentionCollector(bundle.unet, positions, period=period)
            with common.prompt_errors():
                results = pipeline.sweep(bundle, replace(base, layout=layout), alphas=alphas, probe=collector,
                                         progress=not args.quiet, switch=loras)
            for i, r in enumerate(results):
                images[i][j] = r.image
                if collector is not None:
                    with usage_errors(f"layout {layout:g}, alpha {alphas[i]:g}: "):
                        masks[i][j] = collector.mask(i, (h, w))
    for j in range(len(layouts)):
        for i in range(len(alphas)):
            if given is not None:
                masks[i][j] = given
            elif not has_focus[j]:  # no focus stage, no attention map: the row's mask at the nearest layout fraction
                masks[i][j] = masks[i][_nearest(j, layouts, has_focus)]
            reports[i][j] = SharpnessReport.measure(to_gray(images[i][j]), masks[i][j])
    out.mkdir(exist_ok=True)
    # ASCII labels: Pillow's default font has no Greek letters.
    rows, cols = [f"alpha {a:g}" for a in alphas], [f"layout {s:g}" for s in layouts]
    captions = [[rep.caption() for rep in row] for row in reports]
    vmax = max(float(local_variance_of_laplacian(to_gray(im)).max()) for row in images for im in row)
    pictures = {  # OUTPUTS, with grid.json
        "grid.png": images,
        "grid_overlay.png": [[overlay_mask(im, m) for im, m in zip(ri, rm)] for ri, rm in zip(images, masks)],
        "grid_heatmap.png": [[sharpness_heatmap(im, vmax=max(vmax, 1.0)) for im in row] for row in images],
    }
    sheets = {name: contact_sheet([[_enlarge(im) for im in row] for row in cells], rows, cols, captions)
              for name, cells in pictures.items()}
    from .pngmeta import save_png_atomic

    for name, sheet in sheets.items():
        save_png_atomic(sheet, out / name)
        print(out / name)
    cells = [{"alpha": a, "layout": s, "mask_fraction": float(masks[i][j].mean()),
              "target": asdict(reports[i][j].target), "background": asdict(reports[i][j].background)}
             for i, a in enumerate(alphas) for j, s in enumerate(layouts)]
    write_text_atomic(out / "grid.json", json.dumps({"prompt": args.prompt, "focus": args.focus, "seed": args.seed,
                                                     "steps": base.steps, "sampler": base.sampler,
                                                     "schedule": base.schedule, "model": model_path.name,
                                                     "loras": list(run_loras.records()), "cells": cells}, indent=1))
    return 0


def add_grid_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="α × layout-fraction contact sheet with target/background sharpness")
    p.add_argument("prompt", help="the global prompt")
    p.add_argument("--focus", required=True, help="the local prompt (the object kept sharp)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="rows: α values (0,0.25,0.5,0.75,1)")
    p.add_argument("--layouts", default="0.7,0.8,0.9", help="columns: layout fractions (0.7,0.8,0.9)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (50)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (7.5)")
    p.add_argument("--negative", default="", help="negative prompt ('')")
    p.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    p.add_argument("--size", metavar="WxH", help="image size (family default)")
    p.add_argument("--mask", metavar="PNG", help="target mask for every cell (default: each cell's attention mask)")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="target box for every cell, in pixels")
    add_sampler_args(p)
    add_prompt_args(p)
    p.add_argument("-o", "--output", default="grid", help="output folder (grid)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_model_args(p)
    loras_cli.add_lora_args(p)
    p.set_defaults(run=run_grid)

"""`gbsd rack`: a rack focus -- one shared layout stage, then K focus branches pulling focus from one object to
another (gbsd_core/bokeh/rack.py), written as an animation, a contact sheet and one PNG per frame.

    gbsd rack "a bunny and a carrot in a garden, bokeh" --from "a bunny" --to "a carrot" --frames 12 -o rack.webp

writes rack.webp (or .gif), rack_sheet.png (every frame captioned with its mix m and, per object, the target /
background variance of the Laplacian on that object's attention mask) and rack_00.png … rack_11.png beside it.
Every PNG carries the metadata of its frame (the sheet: of frame 0, plus a "rack" entry), so
`gbsd generate --from-png rack_04.png` reproduces frame 4 alone and `gbsd rack --from-png rack_sheet.png` the rack.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import common
from . import loras as loras_cli
from .common import UsageError, usage_errors, warn
from .outputs import check_not_inputs, check_output
from .generate import add_run_args, params_from_args, read_from_png, recorded, strip_lora_tags

if TYPE_CHECKING:
    import torch

    from ..bokeh.rack import Rack
    from ..loading import Checkpoint
    from ..pipeline import GenerationParams
    from ..prompts.embeddings import EmbeddingLibrary

DEFAULT_FRAMES = 12
FRAME_MS = 250  # display time of one frame in the animation


def add_rack_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rack", help="pull focus from one object to another, sharing the layout stage")
    p.add_argument("prompt", nargs="?", help="the global prompt, naming both objects (optional with --from-png)")
    p.add_argument("--from", dest="focus", metavar="PROMPT", help="the object in focus in the first frame")
    p.add_argument("--to", dest="focus_to", metavar="PROMPT", help="the object in focus in the last frame")
    p.add_argument("--frames", type=int, help=f"number of frames K, 2 to 64 ({DEFAULT_FRAMES})")
    add_run_args(p)  # --alpha (here < 1), --layout (here < 1: a layout fraction of 1 has no focus stage), --steps, --cfg, ...
    p.add_argument("--from-png", metavar="FILE", help="take the parameters from a rack frame or sheet; flags override")
    p.add_argument("-o", "--output", default="rack.webp",
                   help="the animation, .webp or .gif (rack.webp); NAME_sheet.png and NAME_00.png … go beside it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_model_args(p)
    loras_cli.add_lora_args(p)
    p.set_defaults(run=cmd_rack)


@dataclass(frozen=True)
class RackPlan:
    params: GenerationParams  # focus = --from, focus_to = --to
    frames: int
    animation: Path
    sheet: Path
    frame_paths: tuple[Path, ...]
    model_path: Path
    checkpoint: Checkpoint  # read and checked, not yet loaded
    device: torch.device
    dtype: torch.dtype
    progress: bool
    loras: loras_cli.RunLoras | None = None
    typed: tuple[str, str | None] | None = None  # the prompt as given (LoRA tags in it), and --from
    library: EmbeddingLibrary | None = None  # the textual inversions prompts may name
    embeddings: dict[str, str] = field(default_factory=dict)  # the ones they do: name -> sha256


def rack_outputs(output: str, frames: int) -> tuple[Path, Path, tuple[Path, ...]]:
    """(animation, sheet, frame PNGs) for `-o`, all checked writable (check_output probes the folder); raises
    UsageError."""
    from ..bokeh.pictures import ANIMATION_FORMATS

    animation = Path(output)
    check_output(animation, suffixes=tuple(ANIMATION_FORMATS))
    stem = animation.with_suffix("")
    sheet = Path(f"{stem}_sheet.png")
    frame_paths = tuple(Path(f"{stem}_{k:02d}.png") for k in range(frames))
    for path in (sheet, *frame_paths):
        check_output(path)
    return animation, sheet, frame_paths


def plan_rack(args: argparse.Namespace) -> RackPlan:
    """Validate a `gbsd rack` command line; raises UsageError. Loads no weights (reads the checkpoint's header and
    configs for the model's limits), writes nothing."""
    from ..bokeh.rack import MAX_FRAMES, check_rack, same_prompt
    from ..params import check_schedule, image_size
    from ..pipeline import LAYOUT_WARN_BELOW
    from ..sampling import layout_steps

    png_meta = read_from_png(args.from_png)
    base = png_meta["params"] if png_meta else {}
    stored = ((png_meta or {}).get("json") or {}).get("rack") or {}
    stored = stored if isinstance(stored, dict) else {}  # a PNG is anyone's file
    frames = args.frames if args.frames is not None else stored.get("frames", DEFAULT_FRAMES)
    if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= MAX_FRAMES:
        raise UsageError(f"--frames must be an integer in [2, {MAX_FRAMES}], got {frames!r}")
    for flag, name, which in (("--from", "focus", "first"), ("--to", "focus_to", "last")):
        prompt = getattr(args, name) if getattr(args, name) is not None else base.get(name)
        if prompt is None:
            raise UsageError(f"rack needs {flag} PROMPT, the object in focus in the {which} frame")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{flag} is empty: name an object in the scene")
    loras_cli.refuse_tags([t for t in (args.focus, args.focus_to, base.get("focus"), base.get("focus_to"))
                           if isinstance(t, str)], "--from / --to", "the frames share one focus stage: use --focus-lora")
    typed = replace(params_from_args(args, base), focus_mix=0.0)  # each frame gets its own mix
    params, tag_loras = strip_lora_tags(typed)
    if same_prompt(params.focus, params.focus_to):
        raise UsageError(f"--from and --to are the same prompt ({params.focus!r}): nothing to pull focus between")
    with usage_errors():
        check_rack(params, frames)
    if layout_steps(params.steps, params.layout) == params.steps:
        raise UsageError(f"--layout {params.layout} with {params.steps} steps leaves no focus stage (round(layout·n) = n): "
                         "every frame would be the same image")
    animation, sheet, frame_paths = rack_outputs(args.output, frames)
    check_not_inputs((animation, sheet, *frame_paths), {"--from-png": args.from_png})
    if params.layout < LAYOUT_WARN_BELOW:
        warn(f"--layout {params.layout} < {LAYOUT_WARN_BELOW}: the GBSD paper reports objects start to mix "
             "below a layout fraction of 0.7")
    model_path, family = common.resolve_model(args, png_meta)
    device, dtype = common.device_dtype(args)
    checkpoint = common.inspect_checkpoint(model_path, family)
    with usage_errors(f"--steps {params.steps}: "):  # the sampler's own schedule on the model's noise schedule
        check_schedule(params, img2img=False, noise_schedule=checkpoint.noise_schedule)
    with usage_errors(f"--size {args.size}: " if args.size else ""):
        image_size(params, checkpoint.limits())
    library = common.embedding_library(args)
    embeddings = common.check_prompts(params, [params.focus, params.focus_to], checkpoint, library)
    if png_meta is not None:
        common.compare_embeddings(png_meta, embeddings, library)
    loras = loras_cli.plan_loras(args, checkpoint, tag_loras, png_meta, has_focus=True)
    return RackPlan(params, frames, animation, sheet, frame_paths, model_path, checkpoint, device, dtype,
                    progress=not args.quiet, loras=loras, typed=(typed.prompt, typed.focus), library=library,
                    embeddings=embeddings)


def _sheet_record(rack: Rack) -> dict[str, Any]:
    """The sheet's "rack" metadata entry: the mixes, the masks' coverage and every frame's sharpness numbers."""
    from dataclasses import asdict

    return {"frames": len(rack.frames), "mixes": [f.mix for f in rack.frames],
            "mask_fraction": {p: float(m.mean()) for p, m in rack.masks.items()},
            "sharpness": [{p: {"target": asdict(r.target), "background": asdict(r.background)}
                           for p, r in f.sharpness.items()} for f in rack.frames]}


def execute_rack(p: RackPlan) -> None:
    """Load the weights, run the rack, write frames, sheet and animation (each atomically), print their paths."""
    from ..bokeh.pictures import animation_frames, save_animation
    from ..bokeh.rack import rack_focus
    from . import pngmeta, weights

    bundle = common.load_checkpoint(p.checkpoint, p.device, p.dtype)
    bundle.embeddings = p.library
    sha = weights.model_sha256(p.model_path, progress=p.progress)
    with loras_cli.merged(p.loras, bundle) as loras, common.prompt_errors():
        rack = rack_focus(bundle, p.params, p.frames, progress=p.progress, switch=loras)
    first = rack.frames[0].result
    record = pngmeta.ImageRecord(width=first.image.width, height=first.image.height, model_file=p.model_path.name,
                                 model_sha256=sha, executed_steps=first.executed_steps, layout_steps=first.layout_steps,
                                 loras=p.loras.records() if p.loras is not None else (), embeddings=p.embeddings)
    for k, (frame, path) in enumerate(zip(rack.frames, p.frame_paths, strict=True)):
        extra = {"rack": {"frame": k, "frames": p.frames}}
        params = recorded(frame.result.params, p.typed, p.params.focus)
        pngmeta.save_png_atomic(frame.result.image, path, pngmeta.pnginfo(params, record, extra))
        print(path)
    pngmeta.save_png_atomic(rack.sheet(), p.sheet, pngmeta.pnginfo(recorded(first.params, p.typed, p.params.focus),
                                                                     record, {"rack": _sheet_record(rack)}))
    print(p.sheet)
    save_animation(rack.images(), p.animation, FRAME_MS)
    print(p.animation)
    kept = animation_frames(p.animation)
    if kept < p.frames:
        warn(f"{p.animation}: {p.frames - kept} of the {p.frames} frames equal the frame before them"
             + (" in GIF's 256 colours" if p.animation.suffix.lower() == ".gif" else "")
             + " and were merged into it (shown longer); the frame PNGs hold every frame"
             + ("; .webp keeps every frame's own pixels" if p.animation.suffix.lower() == ".gif" else ""))


def cmd_rack(args: argparse.Namespace) -> int:
    execute_rack(plan_rack(args))  # plan_rack raises UsageError (exit 2) before any weights are read
    return 0

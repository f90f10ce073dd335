"""`gbsd generate`, `gbsd img2img` and `gbsd sweep`: validate everything (`plan`), then load and run (`execute`).

    gbsd generate "a bunny and a carrot in a garden, bokeh" --focus "a carrot" --seed 1 -o bokeh.png
    gbsd img2img "a watercolor garden" --init photo.png --strength 0.6 -o out.png
    gbsd sweep "a bunny and a carrot, bokeh" --focus-stack "a carrot" "a bunny" --alphas 0,0.5,1 -o sweeps/
    gbsd generate "a bunny and a carrot, bokeh" --focus "a carrot" --sampler dpmpp_2m --schedule karras --steps 20
    gbsd generate --from-png bokeh.png --seed 2 -o again.png     # every other parameter from bokeh.png
    gbsd generate "a bunny and a carrot, bokeh" --focus "a carrot" --trace trace/ -o bokeh.png   # + x̂0 filmstrip

`sweep -o` is either an existing directory (files are named with the default pattern inside it) or a file-name
pattern with the fields {index}, {alpha}, {focus} (a file-name-safe slug of the focus prompt) and {seed}, e.g.
`-o "out/{focus}_{alpha:.2f}.png"`. Every result must get a distinct name; that is checked before anything runs.
Output PNGs are written atomically and carry A1111 `parameters` + `gbsd` JSON metadata (pngmeta.py).
`--trace DIR` (generate, img2img) is trace.py's: the filmstrip of x̂0 is written beside the image.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import common, outputs
from . import loras as loras_cli
from . import trace as trace_cli
from .common import UsageError, parse_floats, parse_size, read_image, slug, usage_errors, warn
from .outputs import check_not_inputs, check_output, format_names

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..fast import FastOptions
    from ..loading import Checkpoint
    from ..params import GenerationParams
    from ..prompts.embeddings import EmbeddingLibrary

SWEEP_PATTERN = "sweep_{index:02d}_{focus}_a{alpha:g}.png"


# ------------------------------------------------------------------------------------------------- arguments


def add_speed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (gbsd_core.fast; the default is the plain fp32 path)")
    g.add_argument("--fast", action="store_true",
                   help="fast path in --dtype: channels-last, fused QKV, cross-attention K/V once per stage, "
                        "weights prepacked for oneDNN on CPU (the Triton kernels stay off: opt-in from Python, "
                        "FastOptions(triton=True))")
    g.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the whole CFG step, any sampler (implies --fast; first step compiles)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of every GBSD run besides its prompts (generate, img2img, sweep, rack); defaults None (see below)."""
    p.add_argument("--alpha", type=float, help="focus-stage mix α·E(prompt) + (1-α)·E(focus), in [0,1] (0.5)")
    p.add_argument("--layout", type=float, help="the layout fraction: the share of steps in the layout stage, in [0,1] (0.8)")
    p.add_argument("--steps", type=int, help="sampler steps (50)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (7.5)")
    p.add_argument("--negative", help="negative prompt ('')")
    p.add_argument("--seed", type=int, help="noise seed (0)")
    p.add_argument("--size", metavar="WxH", help="image size, multiples of 8 (family default, or the input's size)")
    p.add_argument("--eta", type=float, help="DDIM η (0 = deterministic; ddim only)")
    add_sampler_args(p)
    add_prompt_args(p)


# The names of prompts.EMPHASIS / chunks.PADDINGS, written out so `--help` imports no torch (a test holds them equal)
EMPHASIS_HELP = ("how (word:1.2) is read, A1111's modes: original (default: weights, then the mean restored), "
                 "no_norm, ignore (syntax read, weights not applied), none (brackets and BREAK are text)")
PADDING_HELP = ("prompts of different 75-token chunk counts: repeat (default; A1111's separate calls, exactly) or "
                "empty (pad with the chunk of \"\", A1111's 'Pad prompt/negative prompt')")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """How prompts are read (README, Prompts), checked by the core's rules (params.FIELDS) like every parameter."""
    p.add_argument("--emphasis", metavar="MODE", help=EMPHASIS_HELP)
    p.add_argument("--no-emphasis", dest="emphasis", action="store_const", const="none",
                   help="brackets are text: --emphasis none")
    p.add_argument("--chunk-padding", metavar="MODE", help=PADDING_HELP)


# The names of samplers.SAMPLERS / sigmas.SCHEDULES, written out so `--help` imports no torch (a test holds them equal)
SAMPLER_HELP = "ddim (default, the paper's), euler, euler_a (ancestral), dpmpp_2m (DPM++ 2M), lcm (LCM / LCM-LoRA)"
SCHEDULE_HELP = "normal (default) or karras: the σ schedule of euler, euler_a and dpmpp_2m"
SPACING_HELP = ("which timesteps a run visits: leading (the default; trailing for zero-SNR and turbo models), "
                "trailing, linspace, k-diffusion (the last two: σ samplers only)")


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """--sampler / --schedule / --spacing, checked by the core's rules (params.FIELDS) like every other parameter."""
    p.add_argument("--sampler", metavar="NAME", help=SAMPLER_HELP)
    p.add_argument("--schedule", metavar="NAME", help=SCHEDULE_HELP)
    p.add_argument("--spacing", metavar="NAME", help=SPACING_HELP)


def add_params_args(p: argparse.ArgumentParser, *, img2img: bool | None) -> None:
    """Generation flags; img2img: True = --init required, False = optional, None = no --init/--strength."""
    # Defaults are None so `--from-png` values are only overridden by flags the user actually gave.
    p.add_argument("prompt", nargs="?", help="the global prompt (optional with --from-png)")
    p.add_argument("--focus", help="GBSD local prompt: the object kept in focus (omit for plain SD)")
    p.add_argument("--focus-to", metavar="PROMPT", help="a second local prompt: the focus stage uses "
                   "(1-m)·E(focus) + m·E(focus-to), m = --focus-mix (what a `gbsd rack` frame records)")
    p.add_argument("--focus-mix", type=float, metavar="M", help="m in [0,1] for --focus-to (0)")
    add_run_args(p)
    if img2img is not None:
        p.add_argument("--init", metavar="IMAGE", required=img2img,
                       help="input image for img2img" + ("" if img2img else " (makes the sweep an img2img sweep)"))
        p.add_argument("--strength", type=float, help="img2img: fraction of the schedule re-run, in (0,1] (0.75)")
    p.add_argument("--from-png", metavar="FILE", help="take all parameters from an earlier PNG; flags override")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_generate_commands(sub: argparse._SubParsersAction) -> None:
    for name, help_, img2img in (("generate", "text to image (GBSD when --focus is given)", None),
                                 ("img2img", "image to image (SDEdit), GBSD when --focus is given", True),
                                 ("sweep", "several focus prompts and/or α values sharing one layout stage", False)):
        p = sub.add_parser(name, help=help_)
        add_params_args(p, img2img=img2img)
        common.add_model_args(p)
        add_speed_args(p)
        loras_cli.add_lora_args(p)
        if name == "sweep":
            p.add_argument("--alphas", metavar="A,B,...", help="comma-separated α values, e.g. 0,0.25,0.5")
            p.add_argument("--focus-stack", nargs="+", metavar="PROMPT", help="focus prompts, one image (row) each")
            p.add_argument("-o", "--output", default=".",
                           help=f"directory (files named {SWEEP_PATTERN} inside) or a pattern using "
                                "{index} {alpha} {focus} {seed} (default: current directory)")
        else:
            p.add_argument("-o", "--output", default="gbsd.png", help="output PNG (default gbsd.png)")
            trace_cli.add_trace_args(p)
        p.set_defaults(run=cmd_generate)


# ------------------------------------------------------------------------------------------------ validation


def sweep_outputs(output: str, cells: Sequence[tuple[str | None, float]], seed: int) -> list[Path]:
    """One distinct .png path per (focus, α) cell, in the pipeline's (focus-major) result order."""
    problem = outputs.link_problem(Path(output))
    if problem:
        raise UsageError(f"-o {common.shown(output)}: {problem}")
    try:
        pattern = str(Path(output) / SWEEP_PATTERN) if Path(output).is_dir() else output
    except (OSError, ValueError) as e:  # a name too long to stat, a NUL
        raise UsageError(f"-o {common.shown(output)!r}: {getattr(e, 'strerror', None) or e}") from None
    names = format_names(pattern, [dict(index=i, alpha=a, focus=slug(f), seed=seed) for i, (f, a) in enumerate(cells)])
    paths = [Path(n) for n in names]
    if len(set(paths)) != len(paths):
        raise UsageError(f"-o {output}: names repeat across the {len(paths)} sweep images; add {{index}} to it")
    for p in paths:
        check_output(p)
    return paths


def params_from_args(args: argparse.Namespace, base: dict[str, Any]) -> GenerationParams:
    """The run's parameters: the PNG's (`base`), overridden by every flag the user gave. Each value is checked by
    its rule (params.FIELDS), and a bad one is blamed on where it came from."""
    from ..params import FIELDS, GenerationParams, check_field

    values = {k: v for k, v in base.items() if k in FIELDS}  # a newer version's extra keys are ignored
    from_png = set(values)
    # Every field a command has a flag for (the flags' dest names are the field names; size is --size).
    flags = {field: getattr(args, field, None) for field in FIELDS if field not in ("width", "height")}
    if args.size is not None:
        flags["width"], flags["height"] = parse_size(args.size)
    for field, v in flags.items():
        if v is not None:
            values[field] = v
            from_png.discard(field)
    if values.get("prompt") is None:
        raise UsageError("a prompt is required (positional PROMPT, or --from-png FILE)")
    for field, v in values.items():
        with usage_errors(f"--from-png {args.from_png}: " if field in from_png else ""):
            check_field(field, v)
    with usage_errors(f"--from-png {args.from_png}: " if from_png else ""):  # the rules that tie fields together
        return GenerationParams(**values)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A fully validated generation request: everything `execute` needs, found before any weights are loaded."""

    mode: str  # generate | img2img | sweep
    params: GenerationParams
    outputs: tuple[Path, ...]  # one per result, in the pipeline's result order
    model_path: Path
    checkpoint: Checkpoint  # read and checked, not yet loaded
    device: torch.device
    dtype: torch.dtype
    init_image: Image.Image | None = None  # decoded whole, RGB
    alphas: tuple[float, ...] | None = None
    focus_stack: tuple[str, ...] | None = None
    png_meta: dict[str, Any] | None = None
    progress: bool = True
    fast: FastOptions | None = None  # None: the plain path
    trace: trace_cli.TracePlan | None = None  # --trace DIR: the x̂0 filmstrip beside the image
    loras: loras_cli.RunLoras | None = None  # --lora / --layout-lora / --focus-lora and the prompts' tags
    typed: tuple[str, str | None] | None = None  # prompt and focus as given, LoRA tags in them (for the PNG)
    library: EmbeddingLibrary | None = None  # the textual inversions prompts may name
    embeddings: dict[str, str] = dataclasses.field(default_factory=dict)  # the ones they do: name -> sha256


def read_from_png(path: str | None) -> dict[str, Any] | None:
    """The metadata of `--from-png FILE` (pngmeta.read_metadata of the image decoded whole), None without the flag;
    raises UsageError."""
    from . import pngmeta

    if path is None:
        return None
    png = read_image(path, "--from-png")
    with usage_errors(f"--from-png {path}: "):
        meta = pngmeta.read_metadata(png)
    if meta.get("hires"):
        hires = ", ".join(f"{k}: {v}" for k, v in meta["hires"].items() if v is not None)
        warn(f"--from-png {path}: made with A1111's hires fix ({hires}); gbsd makes its first pass only, the "
             "txt2img image at its Size")
    return meta


def plan(args: argparse.Namespace) -> Plan:
    """Validate a generate/img2img/sweep command line; raises UsageError. Loads no weights: it reads the checkpoint's
    header and configs only (`common.inspect_checkpoint`), for the checks that need the model's facts."""
    from ..ddim import executed_steps
    from ..params import check_schedule, image_size

    png_meta = read_from_png(args.from_png)
    typed = params_from_args(args, png_meta["params"] if png_meta else {})
    params, tag_loras = strip_lora_tags(typed)

    init_path = getattr(args, "init", None)
    init_image = read_image(init_path, "--init", rgb=True) if init_path is not None else None
    # Every schedule's rule: img2img runs int(strength * steps) steps, at least one. (The model's own timesteps are
    # checked once its configs are read, below.)
    steps_flags = f"--steps {params.steps}" + (f" --strength {params.strength}: " if init_path else ": ")
    with usage_errors(steps_flags):
        executed_steps(params.steps, params.strength if init_path is not None else 1.0)

    alphas = focus_stack = None
    if args.command == "sweep":
        alphas = parse_floats(args.alphas, "--alphas", "alpha") if args.alphas is not None else None
        if args.focus_stack:
            loras_cli.refuse_tags(args.focus_stack, "--focus-stack", "the branches share one focus stage: use "
                                                                     "--focus-lora")
            with usage_errors("--focus-stack: "):
                focus_stack = tuple(dataclasses.replace(params, focus=f).focus for f in args.focus_stack)
        if alphas is None and not focus_stack:
            raise UsageError("sweep needs --alphas and/or --focus-stack")
        if focus_stack is None and params.focus is None:
            raise UsageError("sweep --alphas needs a focus prompt: --focus PROMPT or --focus-stack PROMPT ...")
        cells = [(f, a) for f in (focus_stack or [params.focus]) for a in (alphas or [params.alpha])]
        outputs = tuple(sweep_outputs(args.output, cells, params.seed))
    else:
        outputs = (Path(args.output),)
        check_output(outputs[0])
    trace = trace_cli.plan_trace(args, outputs[0]) if args.command != "sweep" else None
    written = (*outputs, *((trace.sheet, trace.animation) if trace is not None else ()))
    check_not_inputs(written, {"--init": init_path, "--from-png": args.from_png})

    from ..pipeline import LAYOUT_WARN_BELOW

    if 0.0 < params.cfg < 1.0:
        warn(f"--cfg {params.cfg:g} <= 1 turns guidance off: the conditional image, as --cfg 0 and 1 (diffusers' "
             "rule; A1111 would mix towards the negative prompt's image below 1)")

    if (params.focus is not None or focus_stack) and params.layout < LAYOUT_WARN_BELOW:
        warn(f"--layout {params.layout} < {LAYOUT_WARN_BELOW}: the GBSD paper reports objects start to mix "
             "below a layout fraction of 0.7")
    model_path, family = common.resolve_model(args, png_meta)
    device, dtype = common.device_dtype(args)
    checkpoint = common.inspect_checkpoint(model_path, family)
    recipe = checkpoint.family.recipe
    if recipe is not None:  # a few-step model: its card's sampler, spacing, steps and guidance unless given
        params = params_from_args(args, {**recipe.params(), **(png_meta["params"] if png_meta else {})})
        steps_flags = f"--steps {params.steps}" + (f" --strength {params.strength}: " if init_path else ": ")
    with usage_errors(steps_flags):  # the sampler's own schedule on the model's noise schedule (the run's)
        check_schedule(params, img2img=init_path is not None, noise_schedule=checkpoint.noise_schedule)
    # The image size against the model: a multiple of its VAE's factor, within its family's largest size.
    source = (f"--size {args.size}: " if args.size is not None else f"--init {init_path}: "
              if init_image is not None and params.width is None and params.height is None
              else f"--from-png {args.from_png}: " if png_meta is not None else "")
    with usage_errors(source):
        image_size(params, checkpoint.limits(), init_image.size if init_image is not None else None)
    library = common.embedding_library(args)
    local_prompts = [p for p in (*(focus_stack or [params.focus]), params.focus_to) if p is not None]
    embeddings = common.check_prompts(params, local_prompts, checkpoint, library)
    if png_meta is not None:
        common.compare_embeddings(png_meta, embeddings, library)
    fast = None
    if args.fast or args.compile:
        from ..fast import FastOptions

        fast = FastOptions(dtype=dtype, channels_last=True, fuse_qkv=True, cache_context_kv=True, compile=args.compile)
    loras = loras_cli.plan_loras(args, checkpoint, tag_loras, png_meta, params.focus is not None or bool(focus_stack))
    return Plan(args.command, params, outputs, model_path, checkpoint, device, dtype, init_image, alphas, focus_stack,
                png_meta, progress=not args.quiet, fast=fast, trace=trace, loras=loras,
                typed=(typed.prompt, typed.focus), library=library, embeddings=embeddings)


def strip_lora_tags(params: GenerationParams) -> tuple[GenerationParams, list[loras_cli.LoraSpec]]:
    """The parameters the pipeline runs (A1111's LoRA tags taken out of the prompts: the global prompt's for both
    stages, the focus prompt's for the focus stage) and the tags. Raises UsageError."""
    prompt, tags = loras_cli.split_tags(params.prompt, "prompt", "both")
    focus, focus_tags = loras_cli.split_tags(params.focus, "--focus", "focus")
    if params.focus_to is not None:
        loras_cli.refuse_tags([params.focus_to], "--focus-to", "use --focus-lora")
    if not tags and not focus_tags:
        return params, []
    with usage_errors("without its LoRA tags, "):
        return dataclasses.replace(params, prompt=prompt, focus=focus), [*tags, *focus_tags]


def recorded(params: GenerationParams, typed: tuple[str, str | None] | None, run_focus: str | None) -> GenerationParams:
    """A result's parameters as the PNG records them: the prompts as given, LoRA tags in them."""
    if typed is None:
        return params
    focus = typed[1] if params.focus is not None and params.focus == run_focus else params.focus
    return dataclasses.replace(params, prompt=typed[0], focus=focus)


# -------------------------------------------------------------------------------------------------- running


def execute(p: Plan) -> None:
    """Load the weights, run the pipeline, write the PNGs (atomically) and print their paths."""
    from .. import pipeline
    from . import pngmeta, weights

    bundle = common.load_checkpoint(p.checkpoint, p.device, p.dtype)
    bundle.embeddings = p.library
    sha = weights.model_sha256(p.model_path, progress=p.progress)
    made_with = (p.png_meta or {}).get("model_sha256")
    if made_with and sha and made_with != sha:
        warn(f"--from-png image was made with model sha256 {made_with[:10]}, "
             f"this is {sha[:10]} ({p.model_path.name}): the image will differ")
    init_image = p.init_image
    if init_image is not None:
        from ..samplers import make_sampler

        # the chosen sampler's own truncation of its schedule (the one the run will make)
        sampler = make_sampler(bundle.noise_schedule, bundle.family.prediction_type, p.params.sampler, p.params.schedule,
                               p.params.spacing)
        executed = len(sampler.timesteps(p.params.steps, p.params.strength))
        label = pngmeta.sampler_label(p.params.sampler, p.params.schedule)
        print(f"img2img: strength {p.params.strength} runs {executed} of {p.params.steps} steps ({label})",
              file=sys.stderr)

    stepper, tracer = None, trace_cli.make_tracer(p.trace, bundle) if p.trace is not None else None
    if p.fast is not None:
        from ..fast import make_stepper

        stepper = make_stepper(bundle, p.fast, p.params.cfg, p.params.eta, p.params.sampler, p.params.schedule,
                               p.params.spacing)
    try:
        # prompt_errors: what only the weights show (weights that cancel a chunk's mean)
        with loras_cli.merged(p.loras, bundle) as loras, common.prompt_errors():
            if p.mode == "sweep":
                results = pipeline.sweep(bundle, p.params, alphas=p.alphas, focus_prompts=p.focus_stack,
                                         init_image=init_image, progress=p.progress, stepper=stepper, switch=loras)
            else:
                results = [pipeline.generate(bundle, p.params, init_image=init_image, progress=p.progress,
                                             stepper=stepper, watch=tracer, switch=loras)]
    finally:
        if stepper is not None:
            stepper.close()
    for result, out in zip(results, p.outputs, strict=True):
        record = pngmeta.ImageRecord(
            width=result.image.width, height=result.image.height, model_file=p.model_path.name, model_sha256=sha,
            img2img=init_image is not None, executed_steps=result.executed_steps,
            layout_steps=result.layout_steps if result.params.focus is not None else None,
            loras=p.loras.records() if p.loras is not None else (), embeddings=p.embeddings,
        )
        params = recorded(result.params, p.typed, p.params.focus)
        pngmeta.save_png_atomic(result.image, out, pngmeta.pnginfo(params, record))
        print(out)
        if tracer is not None:
            for path in trace_cli.write_trace(p.trace, tracer, params, record):
                print(path)


def cmd_generate(args: argparse.Namespace) -> int:
    execute(plan(args))  # plan() raises UsageError (exit 2) before any weights are loaded
    return 0

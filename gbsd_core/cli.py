"""The `gbsd` command line: generate, img2img, sweep, download, info, eval, grid.

    gbsd download sd15
    gbsd generate "a bunny and a carrot in a garden, bokeh" --focus "a carrot" --seed 1 -o bokeh.png
    gbsd img2img "a watercolor garden" --init photo.png --strength 0.6 -o out.png
    gbsd sweep "a bunny and a carrot, bokeh" --focus-stack "a carrot" "a bunny" --alphas 0,0.5,1 -o sweeps/
    gbsd generate --from-png bokeh.png --seed 2 -o again.png     # every other parameter from bokeh.png
    gbsd info weights/v1-5-pruned-emaonly.safetensors

Contract (tests/test_cli.py holds it):
* Everything that can be checked without the model is checked first -- parameter ranges (GenerationParams.validate),
  `--size`, the input image, the weights path, the output path -- and a problem is one line on stderr and exit
  status 2, before any weights are read. Exit 1 is a failure after that point.
* Output PNGs are written atomically (pngmeta.save_png_atomic) and carry A1111 `parameters` + `gbsd` JSON metadata.
* Imports of torch and the model code happen inside the commands, so `gbsd --help` is instant.

`sweep -o` is either an existing directory (files are named with the default pattern inside it) or a file-name
pattern with the fields {index}, {alpha}, {focus} (a file-name-safe slug of the focus prompt) and {seed}, e.g.
`-o "out/{focus}_{alpha:.2f}.png"`. Every result must get a distinct name; that is checked before anything runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_FAILURE = 1
EXIT_USAGE = 2
SWEEP_PATTERN = "sweep_{index:02d}_{focus}_a{alpha:g}.png"
_DTYPES = ("fp32", "fp16", "bf16")


class UsageError(Exception):
    """Bad input found before any compute: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we keep it to the promised single line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------- arguments


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--weights", metavar="PATH|NAME",
                   help="checkpoint file, diffusers folder, or registry name (sd15, sd21-base, sd21); "
                        "default: sd15 in $GBSD_WEIGHTS or ./weights")
    g.add_argument("--family", help="force the model family: sd1, sd2-512, sd2-768-v (default: detect)")
    g.add_argument("--dtype", choices=_DTYPES, default="fp32", help="weights/compute dtype (default fp32)")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (gbsd_core.fast; the default is the plain fp32 path)")
    g.add_argument("--fast", action="store_true",
                   help="fast path in --dtype: channels-last, fused QKV, cross-attention K/V once per stage, "
                        "weights prepacked for oneDNN on CPU, Triton kernels on CUDA")
    g.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the whole CFG+DDIM step (implies --fast; first step compiles)")


def _add_params_args(p: argparse.ArgumentParser, *, img2img: bool | None) -> None:
    """Generation flags; img2img: True = --init required, False = optional, None = no --init/--strength."""
    # Defaults are None so `--from-png` values are only overridden by flags the user actually gave.
    p.add_argument("prompt", nargs="?", help="the global prompt (optional with --from-png)")
    p.add_argument("--focus", help="GBSD local prompt: the object kept in focus (omit for plain SD)")
    p.add_argument("--alpha", type=float, help="focus-stage mix α·E(prompt) + (1-α)·E(focus), in [0,1] (0.5)")
    p.add_argument("--layout", type=float, help="σ: fraction of steps in the layout stage, in [0,1] (0.8)")
    p.add_argument("--steps", type=int, help="DDIM steps (50)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (7.5)")
    p.add_argument("--negative", help="negative prompt ('')")
    p.add_argument("--seed", type=int, help="noise seed (0)")
    p.add_argument("--size", metavar="WxH", help="image size, multiples of 8 (family default, or the input's size)")
    p.add_argument("--eta", type=float, help="DDIM η (0 = deterministic)")
    if img2img is not None:
        p.add_argument("--init", metavar="IMAGE", required=img2img,
                       help="input image for img2img" + ("" if img2img else " (makes the sweep an img2img sweep)"))
        p.add_argument("--strength", type=float, help="img2img: fraction of the schedule re-run, in (0,1] (0.75)")
    p.add_argument("--from-png", metavar="FILE", help="take all parameters from an earlier PNG; flags override")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gbsd", description="Generative Bokeh with Stage Diffusion on Stable Diffusion 1.x/2.x.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="text to image (GBSD when --focus is given)")
    _add_params_args(g, img2img=None)
    _add_model_args(g)
    _add_speed_args(g)
    g.add_argument("-o", "--output", default="gbsd.png", help="output PNG (default gbsd.png)")

    i = sub.add_parser("img2img", help="image to image (SDEdit), GBSD when --focus is given")
    _add_params_args(i, img2img=True)
    _add_model_args(i)
    _add_speed_args(i)
    i.add_argument("-o", "--output", default="gbsd.png", help="output PNG (default gbsd.png)")

    s = sub.add_parser("sweep", help="several focus prompts and/or α values sharing one layout stage")
    _add_params_args(s, img2img=False)
    _add_model_args(s)
    _add_speed_args(s)
    s.add_argument("--alphas", metavar="A,B,...", help="comma-separated α values, e.g. 0,0.25,0.5")
    s.add_argument("--focus-stack", nargs="+", metavar="PROMPT", help="focus prompts, one image (row) each")
    s.add_argument("-o", "--output", default=".",
                   help=f"directory (files named {SWEEP_PATTERN} inside) or a pattern using "
                        "{index} {alpha} {focus} {seed} (default: current directory)")

    d = sub.add_parser("download", help="fetch a registry checkpoint into $GBSD_WEIGHTS or ./weights")
    d.add_argument("name", nargs="?", help="sd15, sd21-base or sd21 (omit to list them)")
    d.add_argument("--dir", help="target folder (default $GBSD_WEIGHTS or ./weights)")
    d.add_argument("--repo", help="fetch the file from this Hub repo instead (a mirror; the sha256 is still checked)")

    n = sub.add_parser("info", help="family, parameter counts and dtype of a checkpoint")
    n.add_argument("checkpoint", help="checkpoint file or diffusers folder")
    n.add_argument("--family", help="force the model family (sd1, sd2-512, sd2-768-v)")

    from .eval import add_eval_arguments  # argparse only; the work is imported on use
    from .grid import add_grid_arguments

    add_eval_arguments(sub.add_parser("eval", help="score GBSD vs plain SD on prompt pairs (bokeh sharpness table)"))
    add_grid_arguments(sub.add_parser("grid", help="α × σ contact sheet with target/background sharpness"))
    return parser


# ------------------------------------------------------------------------------------------------ validation


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--size {text!r} is not WIDTHxHEIGHT (e.g. 512x512)")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise UsageError(f"--size {text}: width and height must be positive multiples of 8 (the VAE's factor)")
    return w, h


def check_image(path: str, flag: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with Image.open(p) as im:
            im.verify()  # reads the whole file: catches truncated images too
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not a readable image ({e.__class__.__name__})") from None


def check_output(path: Path, flag: str = "-o") -> None:
    """The output's folder must exist and accept a new file (probed, since os.access lies for root)."""
    import tempfile

    if path.suffix.lower() != ".png":
        raise UsageError(f"{flag} {path}: output must be a .png file (metadata is stored in PNG text chunks)")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, expected a .png file name")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: output directory {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: output directory {parent} is not writable ({e.strerror})") from None


def _slug(text: str | None) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", (text or "none").lower()).strip("-")
    return s[:40] or "x"


def sweep_outputs(output: str, cells: Sequence[tuple[str | None, float]], seed: int) -> list[Path]:
    """One distinct .png path per (focus, α) cell, in the pipeline's (focus-major) result order."""
    pattern = str(Path(output) / SWEEP_PATTERN) if Path(output).is_dir() else output
    try:
        paths = [Path(pattern.format(index=i, alpha=a, focus=_slug(f), seed=seed)) for i, (f, a) in enumerate(cells)]
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"-o {output}: bad pattern ({e}); fields are {{index}} {{alpha}} {{focus}} {{seed}}") from None
    if len(set(paths)) != len(paths):
        raise UsageError(f"-o {output}: names repeat across the {len(paths)} sweep images; add {{index}} to it")
    for p in paths:
        check_output(p)
    return paths


def _params_from_args(args: argparse.Namespace, base: dict[str, Any]):
    from .pipeline import GenerationParams

    values = dict(base)
    if args.prompt is not None:
        values["prompt"] = args.prompt
    if values.get("prompt") is None:
        raise UsageError("a prompt is required (positional PROMPT, or --from-png FILE)")
    for field in ("focus", "alpha", "layout", "steps", "cfg", "negative", "seed", "eta", "strength"):
        v = getattr(args, field, None)
        if v is not None:
            values[field] = v
    if args.size is not None:
        values["width"], values["height"] = parse_size(args.size)
    known = {f.name for f in dataclasses.fields(GenerationParams)}
    params = GenerationParams(**{k: v for k, v in values.items() if k in known})
    try:
        params.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return params


def _warn(msg: str) -> None:
    print(f"gbsd: warning: {msg}", file=sys.stderr)


# -------------------------------------------------------------------------------------------------- commands


def _resolve_model(args: argparse.Namespace, png_meta: dict | None) -> tuple[Path, str | None]:
    from . import weights
    from .family import family_by_name

    spec = args.weights
    if spec is None and png_meta and png_meta.get("model_file"):
        candidate = weights.weights_dir() / Path(png_meta["model_file"]).name
        if candidate.exists():  # same model the PNG was made with, when we have it
            spec = str(candidate)
    try:
        path = weights.resolve_weights(spec)
    except weights.WeightsError as e:
        raise UsageError(str(e)) from None
    family = args.family or weights.registry_family(path)
    if family is not None:
        try:
            family = family_by_name(family).name
        except ValueError as e:
            raise UsageError(f"--family: {e}") from None
    return path, family


def _device_dtype(args: argparse.Namespace):
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:0, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device, dtype


def load_checkpoint(path: Path, family: str | None, device, dtype):
    """`loading.load` for the commands: a rejected checkpoint becomes a one-line usage error (exit 2).

    The eval/grid commands call it as `cli.load_checkpoint` (an attribute lookup at call time), so tests can replace
    it for every command at once.
    """
    from .loading import CheckpointError, load

    try:
        return load(path, family=family, dtype=dtype, device=str(device))
    except CheckpointError as e:
        msg = str(e)
        raise UsageError(msg if str(path) in msg else f"{path}: {msg}") from None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A fully validated generation request: everything `execute` needs, found before any weights are read."""

    mode: str  # generate | img2img | sweep
    params: Any  # pipeline.GenerationParams
    outputs: tuple[Path, ...]  # one per result, in the pipeline's result order
    model_path: Path
    family: str | None
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    init_path: str | None = None
    alphas: tuple[float, ...] | None = None
    focus_stack: tuple[str, ...] | None = None
    png_meta: dict | None = None
    progress: bool = True
    fast: Any = None  # fast.FastOptions, or None for the plain path


def plan(args: argparse.Namespace) -> Plan:
    """Validate a generate/img2img/sweep command line; raises UsageError. Reads no weights."""
    from . import pngmeta

    png_meta = None
    if args.from_png is not None:
        check_image(args.from_png, "--from-png")
        try:
            png_meta = pngmeta.read_metadata(args.from_png)
        except ValueError as e:
            raise UsageError(f"--from-png {e}") from None
    params = _params_from_args(args, png_meta["params"] if png_meta else {})

    init_path = getattr(args, "init", None)
    if init_path is not None:
        w, h = check_image(init_path, "--init")
        if args.size is None and params.width is None and (w % 8 or h % 8):
            raise UsageError(f"--init {init_path} is {w}x{h}, not multiples of 8; pass --size WxH to resize it")
        if int(params.steps * params.strength) < 1:  # CompVis img2img runs int(strength * steps) steps
            raise UsageError(f"--strength {params.strength} with --steps {params.steps} leaves no denoising step")

    alphas = focus_stack = None
    if args.command == "sweep":
        alphas = _parse_alphas(args.alphas)
        focus_stack = tuple(args.focus_stack) if args.focus_stack else None
        if alphas is None and not focus_stack:
            raise UsageError("sweep needs --alphas and/or --focus-stack")
        if focus_stack is None and params.focus is None:
            raise UsageError("sweep --alphas needs a focus prompt: --focus PROMPT or --focus-stack PROMPT ...")
        cells = [(f, a) for f in (focus_stack or [params.focus]) for a in (alphas or [params.alpha])]
        outputs = tuple(sweep_outputs(args.output, cells, params.seed))
    else:
        outputs = (Path(args.output),)
        check_output(outputs[0])

    from .pipeline import LAYOUT_WARN_BELOW

    if (params.focus is not None or focus_stack) and params.layout < LAYOUT_WARN_BELOW:
        _warn(f"--layout {params.layout} < {LAYOUT_WARN_BELOW}: the GBSD paper reports objects start to mix "
              "below σ = 0.7")
    model_path, family = _resolve_model(args, png_meta)
    device, dtype = _device_dtype(args)
    fast = None
    if args.fast or args.compile:
        from .fast import FastOptions

        fast = FastOptions(dtype=dtype, channels_last=True, fuse_qkv=True, cache_context_kv=True, compile=args.compile)
    return Plan(args.command, params, outputs, model_path, family, device, dtype, init_path, alphas, focus_stack,
                png_meta, progress=not args.quiet, fast=fast)


def execute(p: Plan) -> None:
    """Load the weights, run the pipeline, write the PNGs (atomically) and print their paths."""
    from PIL import Image

    from . import pipeline, pngmeta, weights

    bundle = load_checkpoint(p.model_path, p.family, p.device, p.dtype)
    sha = weights.model_sha256(p.model_path, progress=p.progress)
    made_with = (p.png_meta or {}).get("model_sha256")
    if made_with and sha and made_with != sha:
        _warn(f"--from-png image was made with model sha256 {made_with[:10]}, "
              f"this is {sha[:10]} ({p.model_path.name}): the image will differ")
    init_image = Image.open(p.init_path).convert("RGB") if p.init_path is not None else None
    if init_image is not None:
        executed = len(bundle.scheduler.timesteps(p.params.steps, p.params.strength))
        print(f"img2img: strength {p.params.strength} runs {executed} of {p.params.steps} steps", file=sys.stderr)

    if p.mode == "sweep":
        results = pipeline.sweep(bundle, p.params, alphas=p.alphas, focus_prompts=p.focus_stack,
                                 init_image=init_image, progress=p.progress, fast=p.fast)
    else:
        results = [pipeline.generate(bundle, p.params, init_image=init_image, progress=p.progress, fast=p.fast)]
    for result, out in zip(results, p.outputs, strict=True):
        record = pngmeta.ImageRecord(
            width=result.image.width, height=result.image.height, model_file=p.model_path.name, model_sha256=sha,
            img2img=init_image is not None, executed_steps=result.executed_steps,
            layout_steps=result.layout_steps if result.params.focus is not None else None,
        )
        pngmeta.save_png_atomic(result.image, out, pngmeta.pnginfo(result.params, record))
        print(out)


def cmd_generate(args: argparse.Namespace) -> int:
    execute(plan(args))  # plan() raises UsageError (exit 2) before any weights are read
    return 0


def _parse_alphas(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        alphas = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--alphas {text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5") from None
    if not alphas:
        raise UsageError("--alphas is empty")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise UsageError(f"--alphas: alpha must be in [0, 1], got {a}")
    return alphas


def cmd_download(args: argparse.Namespace) -> int:
    from . import weights

    directory = Path(args.dir) if args.dir else weights.weights_dir()
    if args.name is None:
        for e in weights.REGISTRY.values():
            state = "present" if (directory / e.filename).exists() else "missing"
            print(f"{e.name:10s} {e.family:10s} {e.size / 2**30:5.1f} GiB  {state:8s} {e.description}")
        return 0
    if args.name not in weights.REGISTRY:
        raise UsageError(f"unknown model {args.name!r}; known: {', '.join(weights.REGISTRY)}")
    try:
        path = weights.download(args.name, directory, repo_id=args.repo)
    except weights.WeightsError as e:
        print(f"gbsd: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import weights

    path = Path(args.checkpoint)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    import torch

    bundle = load_checkpoint(path, args.family, "cpu", torch.float32)
    desc = bundle.describe()
    print(f"file: {path}")
    sha = weights.model_sha256(path, progress=True)
    if sha:
        print(f"sha256: {sha}  (model hash {sha[:10]})")
    _print_tree(desc)
    return 0


def _print_tree(d: dict, indent: str = "") -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            _print_tree(v, indent + "  ")
        else:
            print(f"{indent}{k}: {f'{v:,}' if isinstance(v, int) and not isinstance(v, bool) else v}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and argparse errors; keep main() usable from tests
        return int(e.code or 0)
    from .eval import run_eval
    from .grid import run_grid

    command = {"generate": cmd_generate, "img2img": cmd_generate, "sweep": cmd_generate,
               "download": cmd_download, "info": cmd_info, "eval": run_eval, "grid": run_grid}[args.command]
    try:
        return command(args)
    except UsageError as e:
        print(f"gbsd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gbsd: interrupted (no output written for unfinished images)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Bokeh evaluation: is the focused object sharper with GBSD than with plain SD, and sharper than its background?

    gbsd eval                                   # the 28 shipped prompt pairs (gbsd_core/cli/data/pairs.jsonl)
    gbsd eval my_pairs.jsonl -o eval_out/ --alpha 0.5 --layout 0.8 --steps 50
    gbsd eval -o eval_dpmpp/ --sampler dpmpp_2m --schedule karras --steps 20   # the table for another sampler
    gbsd eval pairs.jsonl --init-dir eval_out/ -o eval_i2i/            # image to image: GBSD vs its input
    torchrun --nproc_per_node 8 -m gbsd_core.cli.eval pairs.jsonl -o eval_out/   # one model copy per GPU

The pairs file's format is pairs.py's. Per pair, text to image: the baseline is plain SD on the global prompt and GBSD the two-stage run,
both from the same seed (the same x_T). Image to image: GBSD runs on the input image and the input is the baseline.
Both images are scored on ONE mask: the given mask or box, else the GBSD run's cross-attention map of the focus
words (gbsd_core/bokeh/attnmaps.py), Otsu-thresholded. Target = inside the mask, background = outside.
`gbsd grid` (grid.py) draws α × layout-fraction contact sheets.

Output folder: run.json (settings), pairs/<id>/ (the images, mask.png, overlay.png, heatmap_*.png, record.json),
results.csv and results.json (one row per image), table.md (means over pairs in the form of the paper's Table 1).
A pair whose record.json exists is skipped when the command is run again (resume); the settings must match (the sampler
and schedule among them: a folder holds one sampler's table; a run.json written before they were recorded is DDIM's).

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) pairs are dealt out round by round, one per rank;
each round's results are gathered on rank 0, which writes every file, so an interrupted run still resumes. The
backend is NCCL when CUDA is available (rank r on cuda:LOCAL_RANK), else gloo.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import common
from . import loras as loras_cli
from .common import EXIT_FAILURE, Parser, UsageError, parse_or_exit, parse_size, run_main, shown, usage_errors
from .outputs import check_files_in, check_output_dir, link_problem, write_text_atomic
from .evaltable import finished_record, write_pair, write_summary
from .generate import add_prompt_args, add_sampler_args
from .pairs import DEFAULT_PAIRS, Pair, read_pairs

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from ..bundle import SDBundle
    from ..loading import Checkpoint
    from ..params import GenerationParams, ModelLimits
    from ..prompts.embeddings import EmbeddingLibrary
    from ..sampling import StageSwitch

# -------------------------------------------------------------------------------------------- one pair's run


@dataclass(frozen=True)
class Settings:
    """Everything besides the pair that decides the numbers; a resumed run must have the same."""

    model: str
    alpha: float = 0.5
    layout: float = 0.8
    steps: int = 50
    cfg: float = 7.5
    negative: str = ""
    width: int | None = None
    height: int | None = None
    strength: float = 0.75
    sampler: str = "ddim"  # samplers.SAMPLERS: the paper's table is DDIM 50
    schedule: str = "normal"
    spacing: str | None = None  # None: the model's own
    emphasis: str = "original"  # how prompts are read (gbsd_core/prompts/)
    chunk_padding: str = "repeat"
    loras: str = ""  # the LoRAs merged (cli/loras.py), "name sha256[:10] scale stage; ...": both images get them

    def params(self, pair: Pair, focus: str | None) -> GenerationParams:
        from ..params import GenerationParams

        return GenerationParams(pair.prompt, focus=focus, alpha=self.alpha, layout=self.layout, steps=self.steps,
                                cfg=self.cfg, negative=self.negative, seed=pair.seed, width=self.width,
                                height=self.height, strength=self.strength, sampler=self.sampler,
                                schedule=self.schedule, spacing=self.spacing, emphasis=self.emphasis,
                                chunk_padding=self.chunk_padding)


@dataclass
class PairResult:
    """What a rank sends to rank 0: the record (JSON-able) and the pictures to write."""

    record: dict[str, Any]
    images: dict[str, Image.Image]  # "sd" or "input", and "gbsd"
    mask: np.ndarray  # bool [H, W]


def _open_init(pair: Pair) -> Image.Image:
    from PIL import Image

    from ..images import to_rgb

    with Image.open(pair.init) as im:
        im.load()
        return to_rgb(im)  # read_pairs checked that it converts


def evaluate_pair(bundle: SDBundle, pair: Pair, settings: Settings, progress: bool = False,
                  switch: StageSwitch | None = None) -> PairResult:
    """Generate the pair's images, find the target mask and measure both images on it. `switch`: per-stage LoRAs
    (gbsd_core.lora), which the plain-SD baseline sees as GBSD with a layout fraction of 1 does (the layout
    stage's set)."""
    from PIL import Image

    from .. import pipeline
    from ..bokeh.attnmaps import focus_collector
    from ..bokeh.masks import box_to_mask, load_mask
    from ..bokeh.metrics import SharpnessReport, to_gray

    init = _open_init(pair) if pair.init is not None else None
    collector = None
    if pair.mask is None and pair.box is None:
        collector = focus_collector(bundle, pair.focus, settings.params(pair, pair.focus))
    gbsd = pipeline.generate(bundle, settings.params(pair, pair.focus), init_image=init, probe=collector,
                             progress=progress, switch=switch).image
    if init is None:
        baseline_name = "sd"
        baseline = pipeline.generate(bundle, settings.params(pair, None), progress=progress, switch=switch).image
    else:
        # The pipeline resizes the input the same way when --size differs from it.
        baseline_name = "input"
        baseline = init if init.size == gbsd.size else init.resize(gbsd.size, Image.Resampling.LANCZOS)
    size = (gbsd.height, gbsd.width)
    if pair.mask is not None:
        mask, source = load_mask(pair.mask, size), "file"
    elif pair.box is not None:
        mask, source = box_to_mask(pair.box, size), "box"
    else:
        mask, source = collector.mask(0, size), "attention"
    metrics = {}
    for name, image in ((baseline_name, baseline), ("gbsd", gbsd)):
        report = SharpnessReport.measure(to_gray(image), mask)
        metrics[name] = {"target": asdict(report.target), "background": asdict(report.background)}
    record = {**pair.key(), "line": pair.line, "mode": "txt2img" if init is None else "img2img",
              "baseline": baseline_name, "mask_source": source, "mask_fraction": float(mask.mean()),
              "size": [gbsd.width, gbsd.height], "metrics": metrics}
    return PairResult(record, {baseline_name: baseline, "gbsd": gbsd}, mask)


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """(World, device): torchrun's env vars -> a process group (NCCL on CUDA, else gloo); else one process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World(), device
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        if device.index is None:  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # the object collectives of NCCL go through the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size), device


def _broadcast(world: World, obj: Any) -> Any:
    if world.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(world: World, obj: Any) -> list[Any]:
    """Every rank's object on rank 0 (in rank order); other ranks get []."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size if world.rank == 0 else []
    dist.gather_object(obj, out if world.rank == 0 else None, dst=0)
    return out


# --------------------------------------------------------------------------------------------------- gbsd eval


# What `gbsd eval` writes into each pair's folder (evaltable.write_pair) and into the output folder.
PAIR_FILES = ("sd.png", "input.png", "gbsd.png", "mask.png", "overlay.png", "heatmap_sd.png", "heatmap_input.png",
              "heatmap_gbsd.png", "record.json")
RUN_FILES = ("run.json", "results.json", "results.csv", "table.md")


def _not_a_file(path: Path) -> None:
    from ..readers import file_kind

    problem = link_problem(path)
    if problem is None and os.path.lexists(path) and file_kind(path) is not None:
        problem = f"is {file_kind(path)}"
    if problem:
        raise UsageError(f"{path}: {problem}, where gbsd eval writes a file; use another --output")


def _pending(out: Path, pairs: list[Pair], settings: Settings) -> list[str]:
    """Rank 0: check/create the output folder and list the pairs without a matching finished record. Everything the
    run will write must be writable as what it is (a folder where a file goes is refused), and a damaged run.json is
    refused; a damaged record.json only means its pair runs again."""
    run_file, current = out / "run.json", asdict(settings)
    for name in RUN_FILES:
        _not_a_file(out / name)
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            previous = None
        if not isinstance(previous, dict):
            raise UsageError(f"{run_file}: damaged (not the JSON object gbsd eval writes); use another --output, or "
                             "delete it to start over")
        # A run.json from before a setting was recorded ran that setting's default (the sampler: DDIM)
        defaults = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}
        diff = [f"{k}: {previous.get(k, defaults.get(k))!r} there, {v!r} now" for k, v in current.items()
                if previous.get(k, defaults.get(k)) != v]
        if diff:
            raise UsageError(f"{out} holds a run with other settings ({'; '.join(diff)}); use another --output")
    folders = [out / "pairs", *(out / "pairs" / p.id for p in pairs)]
    for d in folders:
        if os.path.lexists(d) and not d.is_dir():
            raise UsageError(f"{d}: {link_problem(d) or 'is not a folder'}, where gbsd eval keeps a pair's files; use "
                             "another --output")
    pending = []
    for p in pairs:
        if finished_record(out / "pairs" / p.id / "record.json", p) is not None:
            continue
        for name in PAIR_FILES:
            _not_a_file(out / "pairs" / p.id / name)
        pending.append(p.id)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_file, json.dumps(current, indent=1))
    return pending


def _check_sizes(pairs: list[Pair], settings: Settings, limits: ModelLimits, source: Path) -> None:
    """Each pair's image size against the model (the VAE's factor, the family's largest size), and its mask or box
    against that size: found before any weights load, not after the first pairs have run."""
    from PIL import Image

    from ..bokeh.masks import box_to_mask
    from ..params import image_size

    for p in pairs:
        where = f"{source} line {p.line}: "
        init_size = None
        if p.init is not None:
            with Image.open(p.init) as im:  # decoded whole by read_pairs already
                init_size = im.size
        with usage_errors(where + (f"init {p.init}: " if init_size and settings.width is None else "")):
            w, h = image_size(settings.params(p, p.focus), limits, init_size)
        if p.mask is not None:
            with Image.open(p.mask) as im:
                if im.size != (w, h):
                    raise UsageError(f"{where}mask {p.mask} is {im.width}x{im.height} (W x H) but the images are {w}x{h}")
        if p.box is not None:
            with usage_errors(where):
                box_to_mask(p.box, (h, w))


def run_eval(args: argparse.Namespace) -> int:
    from ..params import check_schedule

    source = Path(args.pairs) if args.pairs else DEFAULT_PAIRS
    init_dir = Path(args.init_dir) if args.init_dir else None
    if init_dir is not None and not init_dir.is_dir():
        raise UsageError(f"--init-dir {init_dir}: no such folder")
    pairs = read_pairs(source, init_dir)
    if args.limit is not None:
        if args.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {args.limit}")
        pairs = pairs[: args.limit]
    width, height = parse_size(args.size) if args.size else (None, None)
    for p in pairs:
        loras_cli.refuse_tags([p.prompt, p.focus], f"{source} line {p.line}", "give them as --lora / --focus-lora")
    model_path, family = common.resolve_model(args, None)
    settings = Settings(model_path.name, args.alpha, args.layout, args.steps, args.cfg, args.negative, width, height,
                        args.strength, args.sampler or "ddim", args.schedule or "normal", spacing=args.spacing,
                        emphasis=args.emphasis or "original", chunk_padding=args.chunk_padding or "repeat")
    with usage_errors():
        params = settings.params(pairs[0], pairs[0].focus)  # the flags by the core's rules (pairs' fields: pairs.py)
    out = Path(args.output)
    check_output_dir(out)
    # every name the run writes fits: the run's files, and a pair's files in the folder of the longest id
    check_files_in(out, RUN_FILES, f"-o {shown(out)}")
    check_files_in(out / "pairs" / max((p.id for p in pairs), key=len), PAIR_FILES, f"-o {shown(out)}")
    device, dtype = common.device_dtype(args)
    checkpoint = common.inspect_checkpoint(model_path, family)
    for img2img in {p.init is not None for p in pairs}:  # the schedule of each mode the pairs use, the model's
        with usage_errors(f"--steps {settings.steps}" + (f" --strength {settings.strength}: " if img2img else ": ")):
            check_schedule(params, img2img, noise_schedule=checkpoint.noise_schedule)
    _check_sizes(pairs, settings, checkpoint.limits(), source)
    library = common.embedding_library(args)
    for p in pairs:  # every pair's prompts, before any weights load (a pairs file is anyone's file)
        common.check_prompts(settings.params(p, p.focus), [p.focus], checkpoint, library, f"{source} line {p.line}: ")
    loras = loras_cli.plan_loras(args, checkpoint, [], None, has_focus=True)
    settings = replace(settings, loras="; ".join(f"{r['name']} {r['sha256'][:10]} {r['scale']!r} {r['stage']}"
                                                 for r in loras.records()))

    world, device = init_world(device)
    try:
        return _run_eval(world, pairs, settings, out, checkpoint, device, dtype, not args.quiet, loras, library)
    finally:
        if world.size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_eval(world: World, pairs: list[Pair], settings: Settings, out: Path, checkpoint: Checkpoint,
              device: torch.device, dtype: torch.dtype, progress: bool,
              loras: loras_cli.RunLoras | None = None, library: EmbeddingLibrary | None = None) -> int:
    pending, error = [], None
    if world.rank == 0:
        try:
            pending = _pending(out, pairs, settings)
        except UsageError as e:
            error = str(e)
    pending, error = _broadcast(world, (pending, error))
    if error:
        raise UsageError(error)
    todo = [p for p in pairs if p.id in set(pending)]
    say = (lambda msg: print(msg, file=sys.stderr)) if world.rank == 0 else (lambda msg: None)
    say(f"{len(pairs) - len(todo)} of {len(pairs)} pairs already done in {out}; {len(todo)} to run"
        + (f" on {world.size} processes" if world.size > 1 else ""))
    failures: list[str] = []
    if todo:
        bundle = common.load_checkpoint(checkpoint, device, dtype)
        bundle.embeddings = library
        applied = loras.apply(bundle) if loras is not None and loras.specs else None
        done = 0
        for start in range(0, len(todo), world.size):  # one pair per rank per round
            index = start + world.rank
            payload: PairResult | str | None = None
            if index < len(todo):
                try:  # the LoRAs merged for each pair (a merge costs far less than its two runs)
                    with applied if applied is not None else contextlib.nullcontext():
                        payload = evaluate_pair(bundle, todo[index], settings, progress and world.size == 1, applied)
                except Exception as e:  # one bad pair must not stop the others (or hang the other ranks)
                    payload = f"pair {todo[index].id} (line {todo[index].line}): {type(e).__name__}: {e}"
            for rank, r in enumerate(_gather(world, payload)):
                if isinstance(r, str):
                    failures.append(r)
                    say(f"gbsd eval: error: {r}")
                elif r is not None:
                    write_pair(out, r)
                    done += 1
                    m = r.record["metrics"]
                    say(f"[{done}/{len(todo)}] {r.record['id']}: target VoL {r.record['baseline']} "
                        f"{m[r.record['baseline']]['target']['laplacian_var']:.2f} -> GBSD "
                        f"{m['gbsd']['target']['laplacian_var']:.2f} (mask {r.record['mask_fraction']:.0%})"
                        + (f" [rank {rank}]" if world.size > 1 else ""))
    if world.rank == 0:
        print(write_summary(out, pairs, settings))
        say(f"wrote {out / 'table.md'}, {out / 'results.csv'}, {out / 'results.json'}")
        if failures:
            say(f"gbsd eval: {len(failures)} pair(s) failed; run the command again to retry them")
    return EXIT_FAILURE if failures else 0


# -------------------------------------------------------------------------------------------------- arguments


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score GBSD vs plain SD on prompt pairs (bokeh sharpness table)")
    add_eval_arguments(p)
    p.set_defaults(run=run_eval)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pairs", nargs="?", help=f"JSONL of prompt pairs (default: the shipped {DEFAULT_PAIRS.name})")
    p.add_argument("-o", "--output", default="eval_out", help="output folder, resumed if it exists (eval_out)")
    p.add_argument("--alpha", type=float, default=0.5, help="GBSD focus-stage mix α (0.5)")
    p.add_argument("--layout", type=float, default=0.8, help="GBSD's layout fraction: the share of steps in the layout stage (0.8)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (50)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (7.5)")
    p.add_argument("--negative", default="", help="negative prompt ('')")
    p.add_argument("--size", metavar="WxH", help="image size (family default, or the input image's)")
    p.add_argument("--init-dir", metavar="DIR", help="image to image: inputs DIR/<id>.png, or DIR/pairs/<id>/sd.png "
                                                     "of an earlier eval")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: fraction of the schedule re-run (0.75)")
    p.add_argument("--limit", type=int, help="only the first N pairs")
    add_sampler_args(p)
    add_prompt_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_model_args(p)
    loras_cli.add_lora_args(p)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gbsd_core.cli.eval` (and torchrun … -m gbsd_core.cli.eval): the same as `gbsd eval`."""
    parser = Parser(prog="python -m gbsd_core.cli.eval", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    args = parse_or_exit(parser, argv)
    if isinstance(args, int):
        return args
    return run_main(parser.prog, run_eval, args, "interrupted; finished pairs are kept, run again to resume")


if __name__ == "__main__":
    sys.exit(main())

"""Bokeh evaluation: is the focused object sharper with GBSD than with plain SD, and sharper than its background?

    gbsd eval                                   # the 28 shipped prompt pairs (gbsd_core/data/pairs.jsonl)
    gbsd eval my_pairs.jsonl -o eval_out/ --alpha 0.5 --layout 0.8 --steps 50
    gbsd eval pairs.jsonl --init-dir eval_out/ -o eval_i2i/            # image to image: GBSD vs its input
    torchrun --nproc_per_node 8 -m gbsd_core.eval pairs.jsonl -o eval_out/   # one model copy per GPU

A pairs file has one JSON object per line: {"prompt": global prompt, "focus": local prompt, "seed": int} plus
optional "id" (file-name-safe; default: the line number and the focus words), "mask" (PNG, nonzero = object),
"box" ([x0, y0, x1, y1] pixels, half-open) and "init" (an input image: image-to-image). Paths are relative to the
pairs file. Per pair, text to image: the baseline is plain SD on the global prompt and GBSD the two-stage run,
both from the same seed (the same x_T). Image to image: GBSD runs on the input image and the input is the baseline.
Both images are scored on ONE mask: the given mask or box, else the GBSD run's cross-attention map of the focus
words (gbsd_core.attnmaps), Otsu-thresholded. Target = inside the mask, background = outside.
`gbsd grid` (gbsd_core/grid.py) draws α × σ contact sheets.

Output folder: run.json (settings), pairs/<id>/ (the images, mask.png, overlay.png, heatmap_*.png, record.json),
results.csv and results.json (one row per image), table.md (means over pairs in the form of the paper's Table 1).
A pair whose record.json exists is skipped when the command is run again (resume); the settings must match.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) pairs are dealt out round by round, one per rank;
each round's results are gathered on rank 0, which writes every file, so an interrupted run still resumes. The
backend is NCCL when CUDA is available (rank r on cuda:LOCAL_RANK), else gloo.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from . import cli
from .cli import (EXIT_FAILURE, EXIT_USAGE, UsageError, _add_model_args, _device_dtype, _Parser, _resolve_model,
                  check_image, parse_size)
from .evaltable import write_pair, write_summary, write_text_atomic

DEFAULT_PAIRS = Path(__file__).with_name("data") / "pairs.jsonl"
_FIELDS = ("id", "prompt", "focus", "seed", "mask", "box", "init")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


# ------------------------------------------------------------------------------------------------- the pairs


@dataclass(frozen=True)
class Pair:
    id: str
    line: int
    prompt: str
    focus: str
    seed: int
    mask: str | None = None  # resolved paths
    box: tuple[float, float, float, float] | None = None
    init: str | None = None

    def key(self) -> dict[str, Any]:
        """What a finished record must agree on to be reused."""
        d = asdict(self)
        d.pop("line")
        d["box"] = list(self.box) if self.box else None
        return d


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:30] or "x"


def read_pairs(path: Path, init_dir: Path | None = None) -> list[Pair]:
    """Parse and check a pairs file; every problem is a UsageError naming the line."""
    if not path.is_file():
        raise UsageError(f"{path}: no such pairs file")
    base = path.parent
    pairs: list[Pair] = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(_FIELDS))
        if unknown:
            raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
        for name in ("prompt", "focus", "seed"):
            if name not in obj:
                raise UsageError(f"{where}: missing field {name!r}")
        for name in ("prompt", "focus"):
            if not isinstance(obj[name], str) or not obj[name].strip():
                raise UsageError(f"{where}: {name!r} must be a non-empty string")
        seed = obj["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise UsageError(f"{where}: 'seed' must be an integer >= 0, got {seed!r}")
        pid = obj.get("id", f"{n:03d}-{_slug(obj['focus'])}")
        if not isinstance(pid, str) or not _ID.fullmatch(pid):
            raise UsageError(f"{where}: 'id' must be 1-80 characters of letters, digits, '.', '_', '-', got {pid!r}")
        if "mask" in obj and "box" in obj:
            raise UsageError(f"{where}: give 'mask' or 'box', not both")
        mask = box = init = None
        if "mask" in obj:
            if not isinstance(obj["mask"], str):
                raise UsageError(f"{where}: 'mask' must be a path string")
            mask = str(base / obj["mask"])
            check_image(mask, f"{where}: mask")
        if "box" in obj:
            b = obj["box"]
            if (not isinstance(b, list) or len(b) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
                raise UsageError(f"{where}: 'box' must be [x0, y0, x1, y1] (4 numbers), got {b!r}")
            if b[2] <= b[0] or b[3] <= b[1]:
                raise UsageError(f"{where}: 'box' {b} is empty: need x0 < x1 and y0 < y1")
            box = tuple(float(v) for v in b)
        if "init" in obj:
            if not isinstance(obj["init"], str):
                raise UsageError(f"{where}: 'init' must be a path string")
            init = str(base / obj["init"])
        elif init_dir is not None:
            # A folder of <id>.png, or an earlier `gbsd eval` output folder (its plain-SD images).
            found = [p for p in (init_dir / f"{pid}.png", init_dir / "pairs" / pid / "sd.png") if p.is_file()]
            if not found:
                raise UsageError(f"{where}: --init-dir {init_dir} has no {pid}.png nor pairs/{pid}/sd.png")
            init = str(found[0])
        if init is not None:
            check_image(init, f"{where}: init")
        if any(p.id == pid for p in pairs):
            raise UsageError(f"{where}: id {pid!r} is used twice")
        pairs.append(Pair(pid, n, obj["prompt"], obj["focus"], seed, mask, box, init))
    if not pairs:
        raise UsageError(f"{path}: no pairs in the file")
    return pairs


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

    def params(self, pair: Pair, focus: str | None):
        from .pipeline import GenerationParams

        return GenerationParams(pair.prompt, focus=focus, alpha=self.alpha, layout=self.layout, steps=self.steps,
                                cfg=self.cfg, negative=self.negative, seed=pair.seed, width=self.width,
                                height=self.height, strength=self.strength)


@dataclass
class PairResult:
    """What a rank sends to rank 0: the record (JSON-able) and the pictures to write."""

    record: dict[str, Any]
    images: dict[str, Any]  # name -> PIL image ("sd" or "input", and "gbsd")
    mask: Any  # bool [H, W]


def _open_init(pair: Pair):
    from PIL import Image

    with Image.open(pair.init) as im:
        image = im.convert("RGB")
    return image


def output_size(pair: Pair, settings: Settings, resolution: int) -> tuple[int, int]:
    """(W, H) of the pair's images: --size, else the input image's size (img2img), else the family's native size."""
    if settings.width is not None:
        return settings.width, settings.height
    if pair.init is not None:
        from PIL import Image

        with Image.open(pair.init) as im:
            return im.size
    return resolution, resolution


def evaluate_pair(bundle, pair: Pair, settings: Settings, progress: bool = False) -> PairResult:
    """Generate the pair's images, find the target mask and measure both images on it."""
    from PIL import Image

    from . import pipeline
    from .attnmaps import CrossAttentionCollector, word_positions
    from .masks import box_to_mask, load_mask
    from .metrics import SharpnessReport, to_gray

    init = _open_init(pair) if pair.init is not None else None
    collector = None
    if pair.mask is None and pair.box is None:
        collector = CrossAttentionCollector(bundle.unet, word_positions(bundle.tokenizer(pair.focus)))
    gbsd = pipeline.generate(bundle, settings.params(pair, pair.focus), init_image=init, attention=collector,
                             progress=progress).image
    if init is None:
        baseline_name = "sd"
        baseline = pipeline.generate(bundle, settings.params(pair, None), progress=progress).image
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


def init_world(device):
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


def _pending(out: Path, pairs: list[Pair], settings: Settings) -> list[str]:
    """Rank 0: check/create the output folder and list the pairs without a matching finished record."""
    run_file, current = out / "run.json", asdict(settings)
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        diff = [f"{k}: {previous.get(k)!r} there, {v!r} now" for k, v in current.items() if previous.get(k) != v]
        if diff:
            raise UsageError(f"{out} holds a run with other settings ({'; '.join(diff)}); use another --output")
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_file, json.dumps(current, indent=1))
    pending = []
    for p in pairs:
        rec = out / "pairs" / p.id / "record.json"
        if rec.is_file():
            r = json.loads(rec.read_text())
            if all(r.get(k) == v for k, v in p.key().items()):
                continue
        pending.append(p.id)
    return pending


def _check_mask_sizes(pairs: list[Pair], settings: Settings, resolution: int, source: Path) -> None:
    from PIL import Image

    from .masks import box_to_mask

    for p in pairs:
        w, h = output_size(p, settings, resolution)
        if p.mask is not None:
            with Image.open(p.mask) as im:
                if im.size != (w, h):
                    raise UsageError(f"{source} line {p.line}: mask {p.mask} is {im.width}x{im.height} (W x H) "
                                     f"but the images are {w}x{h}")
        if p.box is not None:
            try:
                box_to_mask(p.box, (h, w))
            except ValueError as e:
                raise UsageError(f"{source} line {p.line}: {e}") from None
        if p.init is not None and settings.width is None and (w % 8 or h % 8):
            raise UsageError(f"{source} line {p.line}: input image {p.init} is {w}x{h}, not multiples of 8; "
                             "pass --size WxH")


def run_eval(args: argparse.Namespace) -> int:
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
    model_path, family = _resolve_model(args, None)
    settings = Settings(model_path.name, args.alpha, args.layout, args.steps, args.cfg, args.negative, width, height,
                        args.strength)
    try:
        settings.params(pairs[0], pairs[0].focus).validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if any(p.init for p in pairs) and int(settings.steps * settings.strength) < 1:
        raise UsageError(f"--strength {settings.strength} with --steps {settings.steps} leaves no denoising step")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: parent folder {out.parent} does not exist")
    device, dtype = _device_dtype(args)

    world, device = init_world(device)
    try:
        return _run_eval(world, pairs, settings, out, source, model_path, family, device, dtype, not args.quiet)
    finally:
        if world.size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_eval(world: World, pairs: list[Pair], settings: Settings, out: Path, source: Path, model_path: Path,
              family: str | None, device, dtype, progress: bool) -> int:
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
        bundle = cli.load_checkpoint(model_path, family, device, dtype)
        _check_mask_sizes(todo, settings, bundle.family.resolution, source)
        done = 0
        for start in range(0, len(todo), world.size):  # one pair per rank per round
            index = start + world.rank
            payload: PairResult | str | None = None
            if index < len(todo):
                try:
                    payload = evaluate_pair(bundle, todo[index], settings, progress and world.size == 1)
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


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pairs", nargs="?", help=f"JSONL of prompt pairs (default: the shipped {DEFAULT_PAIRS.name})")
    p.add_argument("-o", "--output", default="eval_out", help="output folder, resumed if it exists (eval_out)")
    p.add_argument("--alpha", type=float, default=0.5, help="GBSD focus-stage mix α (0.5)")
    p.add_argument("--layout", type=float, default=0.8, help="GBSD σ, fraction of steps in the layout stage (0.8)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (50)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (7.5)")
    p.add_argument("--negative", default="", help="negative prompt ('')")
    p.add_argument("--size", metavar="WxH", help="image size (family default, or the input image's)")
    p.add_argument("--init-dir", metavar="DIR", help="image to image: inputs DIR/<id>.png, or DIR/pairs/<id>/sd.png "
                                                     "of an earlier eval")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: fraction of the schedule re-run (0.75)")
    p.add_argument("--limit", type=int, help="only the first N pairs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_model_args(p)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gbsd_core.eval` (and torchrun … -m gbsd_core.eval): the same as `gbsd eval`."""
    parser = _Parser(prog="python -m gbsd_core.eval", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return run_eval(args)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; finished pairs are kept, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

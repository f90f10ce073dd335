"""`gbsd download` (fetch a registry checkpoint, sha256-checked) and `gbsd info` (what a checkpoint holds).

    gbsd download                 # list the registry and what is present
    gbsd download sd15            # into $GBSD_WEIGHTS or ./weights
    gbsd download sdxl            # SDXL 1.0 base (sdxl-refiner: the refiner)
    gbsd info weights/v1-5-pruned-emaonly.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common, outputs
from .common import EXIT_FAILURE, UsageError


def add_model_file_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("download", help="fetch a registry checkpoint into $GBSD_WEIGHTS or ./weights")
    d.add_argument("name", nargs="?", help="sd15, sd21-base, sd21, sdxl or sdxl-refiner (omit to list them)")
    d.add_argument("--dir", help="target folder (default $GBSD_WEIGHTS or ./weights)")
    d.add_argument("--repo", help="fetch the file from this Hub repo instead (a mirror; the sha256 is still checked)")
    d.set_defaults(run=cmd_download)

    n = sub.add_parser("info", help="family, parts, parameter counts and dtype of a checkpoint (or what a LoRA holds)")
    n.add_argument("checkpoint", help="checkpoint file, diffusers folder or LoRA file")
    n.add_argument("--family", help="force the model family (sd1, sd2-512, sd2-768-v, sdxl-base, sdxl-refiner)")
    n.set_defaults(run=cmd_info)


def cmd_download(args: argparse.Namespace) -> int:
    from . import weights

    directory = Path(args.dir) if args.dir else weights.weights_dir()
    where = f"--dir {directory}" if args.dir else f"weights folder {directory}"
    problem = outputs.link_problem(directory)
    if problem:
        raise UsageError(f"{where} {problem}")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{where} is not a folder; pass --dir FOLDER or set ${weights.WEIGHTS_ENV} to one")
    if args.name is None:
        for e in weights.REGISTRY.values():
            state = "present" if (directory / e.filename).exists() else "missing"
            print(f"{e.name:12s} {e.family:12s} {e.size / 2**30:5.1f} GiB  {state:8s} {e.description}")
        return 0
    if args.name not in weights.REGISTRY:
        raise UsageError(f"unknown model {args.name!r}; known: {', '.join(weights.REGISTRY)}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{where}: cannot be created ({e.strerror})") from None
    outputs.check_writable(directory, where, weights.REGISTRY[args.name].filename)  # before the download, not after
    try:
        path = weights.download(args.name, directory, repo_id=args.repo)
    except weights.WeightsError as e:
        print(f"gbsd: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import weights

    path = Path(args.checkpoint)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    from .loras import describe_lora, looks_like_lora

    if looks_like_lora(path):  # a LoRA: its format, family, ranks and targets (cli/loras.py)
        print(f"file: {path}")
        print_tree(describe_lora(path))
        return 0
    family = None
    if args.family is not None:
        from ..family import family_by_name

        try:
            family = family_by_name(args.family).name
        except ValueError as e:
            raise UsageError(f"--family: {e}") from None
    bundle = common.load_checkpoint(common.inspect_checkpoint(path, family), "cpu", torch.float32)
    desc = bundle.describe()
    print(f"file: {path}")
    sha = weights.model_sha256(path, progress=True)
    if sha:
        print(f"sha256: {sha}  (model hash {sha[:10]})")
    print_tree(desc)
    return 0


def print_tree(d: dict, indent: str = "") -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            print_tree(v, indent + "  ")
        else:
            print(f"{indent}{k}: {f'{v:,}' if isinstance(v, int) and not isinstance(v, bool) else v}")

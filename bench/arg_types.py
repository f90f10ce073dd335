"""The argument types of `python -m bench` and its subcommands: every flag is parsed and checked by argparse (a
`type`), so a bad value is one line and exit status 2 before anything is built (gbsd_core.cli.common.Parser); the
generation values by the core's own rules (gbsd_core/params.py), the device and output files by the CLI's."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def at_least(lo: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    return convert


def field(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A value of GenerationParams' field `name`, by its rule: steps in [1, 1000], a finite CFG in [0, 100], ..."""
    from gbsd_core.params import check_field

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if parse is int else 'a number'}, got "
                                             f"{text!r}") from None
        try:
            return check_field(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def dtypes(text: str) -> str:
    """fp32 | fp16 | bf16, comma-separated; kept as written (it is recorded in the JSON's args)."""
    bad = [d for d in text.split(",") if d not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad))}: choose from {', '.join(DTYPES)}, "
                                         "comma-separated")
    return text


def device(text: str) -> str:
    """A device this machine has (cpu, cuda[:N], mps), by the CLI's rule (gbsd_core.cli.common.device_dtype)."""
    from gbsd_core.cli.common import UsageError, device_dtype

    try:
        device_dtype(argparse.Namespace(device=text, dtype="fp32"))
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--device {text}: ")) from None
    return text


def output(text: str) -> str:
    """A file the run writes (--json, --markdown): its folder (made if missing, as report.write does) takes it under
    its name, probed now rather than after the run (gbsd_core.cli.common's checks)."""
    from gbsd_core.cli.common import UsageError
    from gbsd_core.cli.outputs import check_files_in, link_problem

    path = Path(text)
    folder = path.parent
    try:
        problem = link_problem(path) or ("is a folder" if path.is_dir() else None)
        while problem is None and not folder.is_dir():  # the nearest existing ancestor must be a folder
            problem = link_problem(folder) or (f"{folder} is not a folder" if os.path.lexists(folder) else None)
            folder = folder.parent
        if problem is None:
            check_files_in(path.parent, [path.name], text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"{text}: ")) from None
    except (OSError, ValueError) as e:
        problem = getattr(e, "strerror", None) or str(e)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text

"""What every `gbsd` command shares: the usage-error contract, argument groups, input checks, the model resolver.

The contract (tests/cli hold it): everything that can be checked without the model is checked first, and a problem
is a `UsageError`: one line on stderr, exit status 2, before any weights are read and with nothing written
(`run_main`). Exit 1 is a failure after that point; 130 is Ctrl-C.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

if TYPE_CHECKING:
    import torch

    from ..bundle import SDBundle

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DTYPES = ("fp32", "fp16", "bf16")


class UsageError(Exception):
    """Bad input found before any compute: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error of the contract (argparse's own prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_main(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace,
             interrupted: str = "interrupted (no output written for unfinished images)") -> int:
    """Run a parsed command under the contract: UsageError -> one line, exit 2; Ctrl-C -> exit 130."""
    try:
        return command(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED


def warn(msg: str) -> None:
    print(f"gbsd: warning: {msg}", file=sys.stderr)


T = TypeVar("T")


def checked(value: T) -> T:
    """`value.validate()` (GenerationParams and friends), its ValueError turned into a UsageError."""
    try:
        value.validate()  # type: ignore[attr-defined]
    except ValueError as e:
        raise UsageError(str(e)) from None
    return value


# ---------------------------------------------------------------------------------------------- argument groups


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--weights", metavar="PATH|NAME",
                   help="checkpoint file, diffusers folder, or registry name (sd15, sd21-base, sd21); "
                        "default: sd15 in $GBSD_WEIGHTS or ./weights")
    g.add_argument("--family", help="force the model family: sd1, sd2-512, sd2-768-v (default: detect)")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="UNet/text encoder dtype (default fp32; the VAE "
                   "stays fp32)")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")


# ------------------------------------------------------------------------------------------------ input checks


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--size {text!r} is not WIDTHxHEIGHT (e.g. 512x512)")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise UsageError(f"--size {text}: width and height must be positive multiples of 8 (the VAE's factor)")
    return w, h


def parse_floats(text: str, flag: str, lo: float = 0.0, hi: float = 1.0) -> tuple[float, ...]:
    """A comma-separated list of numbers in [lo, hi], e.g. `--alphas 0,0.25,0.5`."""
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    for v in values:
        if not lo <= v <= hi:
            raise UsageError(f"{flag}: values must be in [{lo:g}, {hi:g}], got {v}")
    return values


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


def check_writable(folder: Path, label: str) -> None:
    """`folder` accepts a new file: probed by making one, since os.access lies for root. UsageError otherwise."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"{label}: output directory {folder} is not writable ({e.strerror})") from None


def check_output(path: Path, flag: str = "-o") -> None:
    """The output's folder must exist and accept a new file (probed, since os.access lies for root)."""
    if path.suffix.lower() != ".png":
        raise UsageError(f"{flag} {path}: output must be a .png file (metadata is stored in PNG text chunks)")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, expected a .png file name")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: output directory {parent} does not exist")
    check_writable(parent, f"{flag} {path}")


def write_text_atomic(path: Path, text: str) -> None:
    """A UTF-8 text file written whole or not at all (`loading.atomic_write`)."""
    from ..loading import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def slug(text: str | None, limit: int = 40) -> str:
    """A file-name-safe form of a prompt: lower-case words joined by '-', at most `limit` characters."""
    s = re.sub(r"[^a-z0-9]+", "-", (text or "none").lower()).strip("-")
    return s[:limit] or "x"


# ----------------------------------------------------------------------------------------------------- the model


def resolve_model(args: argparse.Namespace, png_meta: dict | None) -> tuple[Path, str | None]:
    """(checkpoint path, family name or None) from --weights / --family, or the model a PNG was made with."""
    from ..family import family_by_name
    from . import weights

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


def device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
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


def load_checkpoint(path: Path, family: str | None, device: torch.device | str, dtype: torch.dtype) -> SDBundle:
    """`loading.load` for the commands: a rejected checkpoint becomes a one-line usage error (exit 2).

    The commands call it as `common.load_checkpoint` (an attribute lookup at call time), so tests can replace it
    for every command at once.
    """
    from ..loading import CheckpointError, load

    try:
        return load(path, family=family, dtype=dtype, device=str(device))
    except CheckpointError as e:
        msg = str(e)
        raise UsageError(msg if str(path) in msg else f"{path}: {msg}") from None


def parse_or_exit(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """parse_args, but --help and argparse errors return their exit status instead of raising SystemExit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)


"""What every `gbsd` command shares: the usage-error contract, argument groups, input checks, the model resolver.

The contract (tests/cli hold it): everything that can be checked without the model is checked first, then what the
model's files say (`inspect_checkpoint`: its VAE factor, its family's largest size, whether its parts fit), and a
problem is a `UsageError`: one line on stderr, exit status 2, before any weights are loaded and with nothing written
(`run_main`). The parameter rules themselves are the core's (gbsd_core/params.py), so the Python API refuses the
same values with the same words. Input files are checked for what they are before they are opened (a named pipe
would block) and images are decoded whole, within a pixel limit, before they are accepted. Exit 1 is a failure
after that point (a run whose result holds NaN or inf, and an unexpected failure: one line, no traceback,
nothing written). Ctrl-C, SIGTERM and SIGHUP end a command the same way (`signals_as_interrupts`): it unwinds,
so no temporary file stays behind, and exits with 128 + the signal's number, what a shell reports for a process
its signal ended (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import string
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..errors import NonFiniteError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..bundle import SDBundle
    from ..loading import Checkpoint
    from ..params import GenerationParams
    from ..prompts.embeddings import EmbeddingLibrary

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: Ctrl-C; SIGTERM and SIGHUP exit with 128 + theirs
DTYPES = ("fp32", "fp16", "bf16")
# The most pixels an input image may have: 8192 x 8192, a large photo. Checked from the header, before decoding; a
# file claiming more (a "decompression bomb": a few bytes that inflate to gigabytes) is refused.
IMAGE_MAX_PIXELS = 2**26
DEBUG_ENV = "GBSD_DEBUG"  # set to 1 to get the traceback of an unexpected error


class UsageError(Exception):
    """Bad input found before any compute: printed as one line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread while a command runs (`signals_as_interrupts`). A
    KeyboardInterrupt, so whatever cleans up after Ctrl-C cleans up after it too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The signals that end a command as Ctrl-C does. Python's default action for them ends the process on the spot,
# running no `finally` and no `except`: the atomic writer's temporary file stayed behind. (No SIGHUP on Windows.)
_ENDING_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `Terminated` in the main thread, as Ctrl-C raises KeyboardInterrupt.

    Only a signal whose handler is the default is taken: one that is ignored stays ignored (`nohup` ignores SIGHUP
    so that a run survives its terminal), and another program's handler is left alone. A second signal of the same
    kind during the cleanup gets the default action again. The previous handlers are restored on the way out (tests
    run commands in their own process). Outside the main thread Python cannot set handlers: nothing changes.
    """
    def handler(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _ENDING_SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error of the contract (argparse's own prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(text: object) -> str:
    """A message as one printable line: line breaks become spaces, other control characters (a NUL in a file name,
    a lone surrogate from undecodable bytes) their escapes."""
    text = re.sub(r"\s*\n\s*", " ", str(text)).strip()
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run_main(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace,
             interrupted: str = "interrupted (no output written for unfinished images)") -> int:
    """Run a parsed command under the contract: UsageError -> one line, exit 2; Ctrl-C, SIGTERM, SIGHUP -> one line,
    exit 128 + the signal (130, 143, 129); stdout closed by its reader (`gbsd info | head`) -> exit 1 quietly;
    anything unexpected -> one line naming it, exit 1."""
    try:
        with signals_as_interrupts():
            code = command(args)
            sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe is seen in the handler below
        return code
    except UsageError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # Ctrl-C, or Terminated (SIGTERM, SIGHUP)
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"{prog}: " + (f"{signal.Signals(signum).name}: " if signum != signal.SIGINT else "") + interrupted,
              file=sys.stderr)
        return 128 + signum
    except NonFiniteError as e:  # a result, not an input: exit 1, and nothing was written
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader is gone: send the rest to /dev/null, so the final flush at exit cannot fail again (the recipe of
        # Python's `signal` docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as e:  # the last resort: no input should get here, and none may show a user a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        first = one_line(str(e).split("\n", 1)[0])[:300]
        print(f"{prog}: error: unexpected {type(e).__name__}: {first} (set {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


def warn(msg: str) -> None:
    print(f"gbsd: warning: {one_line(msg)}", file=sys.stderr)


@contextlib.contextmanager
def usage_errors(prefix: str = "") -> Iterator[None]:
    """A ValueError raised inside (a refused parameter, a rejected file) becomes a UsageError, after `prefix`."""
    try:
        yield
    except ValueError as e:
        raise UsageError(f"{prefix}{e}") from None


# ---------------------------------------------------------------------------------------------- argument groups


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--weights", metavar="PATH|NAME",
                   help="checkpoint file, diffusers folder, or registry name (sd15, sd21-base, sd21, sdxl, "
                        "sdxl-refiner); default: sd15 in $GBSD_WEIGHTS or ./weights")
    g.add_argument("--family", help="force the model family: sd1, sd2-512, sd2-768-v, sdxl-base, sdxl-refiner, "
                   "sd-turbo, sdxl-turbo (default: detect; a turbo single file has SD2's / SDXL's keys: say so)")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="UNet/text encoder dtype (default fp32; the VAE "
                   "stays fp32)")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--embedding", action="append", metavar="PATH",
                   help="a textual-inversion embedding (.pt, .bin, .safetensors), named in prompts by its file stem; "
                        "repeatable (the weights folder's embeddings/ is searched too)")


# ------------------------------------------------------------------------------------------------ input checks


def parse_size(text: str) -> tuple[int, int]:
    """--size WxH as two positive integers; whether the model can render them is `params.image_size`'s to say."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*", text)
    if not m:
        raise UsageError(f"--size {text!r} is not WIDTHxHEIGHT (e.g. 512x512)")
    w, h = int(m.group(1)), int(m.group(2))
    from ..params import check_field

    with usage_errors(f"--size {text}: "):
        check_field("width", w)
        check_field("height", h)
    return w, h


def parse_floats(text: str, flag: str, field: str) -> tuple[float, ...]:
    """A comma-separated list of values of GenerationParams' `field` (its rule decides), e.g. `--alphas 0,0.25,0.5`."""
    from ..params import check_field

    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    with usage_errors(f"{flag} {text}: "):
        for v in values:
            check_field(field, v)
    return values


def check_box(box: object, where: str) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] in pixels: four finite numbers, x0 < x1 and y0 < y1 (a pairs file's "box", grid --box)."""
    import math

    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise UsageError(f"{where} must be [x0, y0, x1, y1] (4 numbers), got {box!r:.80}")
    try:
        values = tuple(float(v) for v in box)
    except OverflowError:
        values = (math.inf,)
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{where} must be 4 finite numbers, got {box!r:.80}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"{where} {list(values)} is empty: need x0 < x1 and y0 < y1")
    return values  # type: ignore[return-value]


def _file_problem(path: Path) -> str | None:
    """Why `path` is not a readable regular file (checked by stat, before anything opens it), or None."""
    from ..readers import file_kind

    try:
        if not os.path.lexists(path):
            return "no such file"
        kind = file_kind(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        return f"cannot be read ({getattr(e, 'strerror', None) or e})"
    return None if kind is None else f"is {kind}, not a regular file"


def read_image(path: str | os.PathLike, flag: str, rgb: bool = False) -> Image.Image:
    """An input image decoded whole (a broken stream behind valid checksums is found here, not after the model has
    run), refused above IMAGE_MAX_PIXELS from its header alone; with `rgb`, as the 8-bit RGB the model takes
    (`images.to_rgb`: 16-bit scaled, transparency flattened, a mode without a white level refused)."""
    from PIL import Image

    what = f"{flag} {path}"
    problem = _file_problem(Path(path))
    if problem:
        raise UsageError(f"{what}: {problem}")
    bomb = f"{what}: claims more than the {IMAGE_MAX_PIXELS:,} pixels gbsd decodes (a decompression bomb?)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own limit, as an error
            image = Image.open(path)
            w, h = image.size
            if w * h > IMAGE_MAX_PIXELS:
                raise UsageError(f"{what}: claims {w}x{h} = {w * h:,} pixels, more than the {IMAGE_MAX_PIXELS:,} gbsd "
                                 "decodes (a decompression bomb?)")
            image.load()
    except UsageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(bomb) from None
    except Exception as e:  # Pillow's decoders raise many classes on hostile data (OSError, SyntaxError, zlib.error,
        # struct.error, ValueError, EOFError, ...); whichever it is, the file is not an image gbsd can use
        raise UsageError(f"{what}: not a readable image ({type(e).__name__}: {one_line(e)[:120]})") from None
    if not rgb:
        return image
    from ..images import to_rgb

    with usage_errors(f"{what}: "):
        return to_rgb(image)


def check_image(path: str | os.PathLike, flag: str, rgb: bool = False) -> tuple[int, int]:
    """(width, height) of an image file that `read_image` accepts (with `rgb`: also as the model's RGB)."""
    with read_image(path, flag, rgb) as image:
        return image.size


def link_problem(path: Path) -> str | None:
    """Why `path` is a symbolic link that cannot be followed -- "is a symlink to nothing" or "is a symlink loop" (or
    "leads through a symlink loop": a loop in a folder above it) -- else None. `Path.exists()` is False for both, so a
    check that asks only that takes them for a free name, and the write fails after the work is done."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop" if os.path.islink(path) else "leads through a symlink loop"
        if os.path.islink(path):
            return f"is a symlink to nothing (it points to {os.readlink(path)!r:.80}, which does not exist)"
    except ValueError:  # a NUL in the name: the callers name that themselves
        pass
    return None


def check_writable(folder: Path, label: str, name: str = "probe") -> None:
    """`folder` accepts a new file named like `name`, and its temporary twin (loading.temp_beside, what the atomic
    writer makes): probed by making one, since os.access lies for root. UsageError (after `label`) otherwise."""
    from ..loading import temp_beside

    try:
        temp_beside(folder / name).unlink()
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{label}: file name too long for the file system ({len(os.fsencode(name))} bytes)") from None
        raise UsageError(f"{label}: output directory {folder} is not writable ({e.strerror})") from None


def shown(path: Path | str) -> str:
    """A path for a message: a very long file name is cut in its middle."""
    path = Path(path)
    name = path.name
    return str(path if len(name) <= 60 else path.parent / f"{name[:30]}...{name[-20:]}")


def _folder_state(folder: Path) -> str:
    """Why `folder`, which is not a directory, cannot hold an output: a broken link, a file, or nothing there."""
    return link_problem(folder) or ("is not a directory" if os.path.lexists(folder) else "does not exist")


def check_output(path: Path, flag: str = "-o", suffixes: tuple[str, ...] = (".png",)) -> None:
    """An output file: one of `suffixes` (PNG: its metadata goes into PNG text chunks), not a folder nor a symlink
    that cannot be followed, in a folder that exists and accepts it under its name (probed, since os.access lies
    for root)."""
    what = f"{flag} {shown(path)}"
    if "\0" in str(path):
        raise UsageError(f"{flag} {str(path)!r}: contains a NUL character")
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{what}: output must be a {' or '.join(suffixes)} file"
                         + (" (metadata is stored in PNG text chunks)" if suffixes == (".png",) else ""))
    try:
        problem = link_problem(path)
        if problem:
            raise UsageError(f"{what}: {problem}")
        if path.is_dir():
            raise UsageError(f"{what}: is a directory, expected a {path.suffix} file name")
        parent = path.parent
        if not parent.is_dir():
            raise UsageError(f"{what}: output directory {parent} {_folder_state(parent)}")
    except OSError as e:
        raise UsageError(f"{what}: {'file name too long' if e.errno == errno.ENAMETOOLONG else e.strerror}") from None
    check_writable(parent, what, path.name)


def check_output_dir(path: Path, flag: str = "-o") -> None:
    """An output folder: an existing folder, or a new one whose parent folder exists; either must take files. A
    symlink that cannot be followed is refused by name (a link to a folder is a folder)."""
    what = f"{flag} {shown(path)}"
    if "\0" in str(path):
        raise UsageError(f"{flag} {str(path)!r}: contains a NUL character")
    try:
        problem = link_problem(path)
        if problem:
            raise UsageError(f"{what}: {problem}")
        if path.exists():
            if not path.is_dir():
                raise UsageError(f"{what}: {'is a file' if path.is_file() else 'exists'}, not a folder")
            check_writable(path, what)
            return
        if not path.parent.is_dir():
            raise UsageError(f"{what}: parent folder {path.parent} {_folder_state(path.parent)}")
        if len(os.fsencode(path.name)) > os.pathconf(path.parent, "PC_NAME_MAX"):
            raise UsageError(f"{what}: folder name too long for the file system ({len(os.fsencode(path.name))} bytes)")
    except OSError as e:
        raise UsageError(f"{what}: {'name too long' if e.errno == errno.ENAMETOOLONG else e.strerror}") from None
    check_writable(path.parent, what)  # the new folder is made there, so its files go on that file system


# loading.temp_beside names a file's temporary twin ".NAME." + 8 random characters + ".tmp" (tempfile.mkstemp)
_TWIN_EXTRA = len("..") + 8 + len(".tmp")


def check_files_in(folder: Path, names: Sequence[str], label: str) -> None:
    """The files a command will write into `folder` (which check_output_dir accepted: an existing folder, or a new
    one that the command makes, with any folders between, e.g. eval's pairs/<id>/): each name is free or a regular
    file, and each name and path, with its temporary twin, fits the file system. The names are probed in the nearest
    folder that exists (the new ones are made there, on its file system), so nothing is created up front; the path
    is held to PATH_MAX. The trace's NAME_trace.webp under a long -o once failed after the image was written."""
    from ..readers import file_kind

    home = folder
    while not home.is_dir():  # check_output_dir found an existing parent
        home = home.parent
    try:
        name_max, path_max = os.pathconf(home, "PC_NAME_MAX"), os.pathconf(home, "PC_PATH_MAX")
    except OSError as e:
        raise UsageError(f"{label}: {folder} cannot be checked ({e.strerror})") from None
    for part in folder.relative_to(home).parts if home != folder else ():
        if len(os.fsencode(part)) > name_max:
            raise UsageError(f"{label}: folder name too long for the file system ({len(os.fsencode(part))} bytes)")
    for name in names:
        path = folder / name
        longest = len(os.fsencode(os.path.abspath(path))) + _TWIN_EXTRA  # mkstemp makes it by its absolute path
        if longest >= path_max:  # PATH_MAX counts the terminating NUL
            raise UsageError(f"{label}: the path of {shown(path)} is too long for the file system ({longest} bytes "
                             f"with its temporary twin, {path_max - 1} at most)")
        if home == folder:
            problem = link_problem(path)
            if problem is None and os.path.lexists(path):
                kind = file_kind(path)
                problem = None if kind is None else f"is {kind}"
            if problem:
                raise UsageError(f"{label}: {shown(path)} {problem}, where gbsd writes a file")
        check_writable(home, f"{label}: {shown(path)}", name)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b)


def check_not_inputs(outputs: Sequence[Path], inputs: Mapping[str, str | None]) -> None:
    """No output may be one of the inputs ({flag: path}): writing it would destroy what the user gave."""
    for out in outputs:
        for flag, src in inputs.items():
            if src is not None and _same_file(out, Path(src)):
                raise UsageError(f"-o {out}: is the {flag} input; writing it would overwrite it (choose another -o)")


SWEEP_FIELDS = ("index", "alpha", "focus", "seed")


def format_names(pattern: str, cells: Sequence[Mapping[str, object]], flag: str = "-o") -> list[str]:
    """`pattern.format(**cell)` per cell, for file-name patterns such as "{focus}_{alpha:.2f}.png": only the plain
    fields SWEEP_FIELDS, with a format spec but no attribute, index, conversion or nested field.

    Folders are the pattern's own: a field's text may hold no path separator (`{seed:c}` of seed 47 is "/", a fill
    character may be one, `{alpha:/>8}`) nor NUL, and may not turn a folder of the pattern into "." or ".."."""
    fields = " ".join(f"{{{f}}}" for f in SWEEP_FIELDS)
    bad = f"{flag} {pattern}: bad pattern"
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as e:
        raise UsageError(f"{bad} ({e}); fields are {fields}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in SWEEP_FIELDS:
            raise UsageError(f"{bad} (field {{{field}}}); fields are {fields}, e.g. {{alpha:.2f}}")
        if conversion is not None or "{" in spec or "}" in spec:
            raise UsageError(f"{bad} ({{{field}{'!' + conversion if conversion else ''}:{spec}}}: no conversions or "
                             f"nested fields); fields are {fields}")
        if any(int(d) > 255 for d in re.findall(r"\d+", spec)):
            raise UsageError(f"{bad} ({{{field}:{spec}}} is wider than a file name can be)")
    separators = re.compile("[" + re.escape(os.sep + (os.altsep or "")) + "]")
    names = []
    for cell in cells:
        made, own = [], []  # the name, and the pattern's own text in it (each field's text as one NUL)
        for literal, field, spec, _ in parsed:
            made.append(literal)
            own.append(literal)
            if field is None:
                continue
            what = f"{{{field}{':' + spec if spec else ''}}} of {field} {cell[field]!r}"
            try:
                text = format(cell[field], spec)
            except (ValueError, TypeError, OverflowError) as e:  # a spec the value's type does not take, e.g.
                # {alpha:q} or {focus:d}; {seed:c} beyond Unicode's last character
                raise UsageError(f"{bad} ({what}: {e}); fields are {fields}") from None
            if "\0" in text:
                raise UsageError(f"{bad} ({what} is {text!r}: a NUL, which no file name may hold)")
            if separators.search(text):
                raise UsageError(f"{bad} ({what} is {text!r}, a path separator: only the pattern's own text may "
                                 "name folders)")
            made.append(text)
            own.append("\0")
        name = "".join(made)
        for part, mine in zip(separators.split(name), separators.split("".join(own)), strict=True):
            if part in (".", "..") and part != mine:
                raise UsageError(f"{bad} (its fields make the folder {part!r} in {name!r}: only the pattern's own "
                                 "text may name folders)")
        names.append(name)
    return names


def write_text_atomic(path: Path, text: str) -> None:
    """A UTF-8 text file written whole or not at all (`loading.atomic_write`)."""
    from ..loading import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def slug(text: str | None, limit: int = 40) -> str:
    """A file-name-safe form of a prompt: lower-case words joined by '-', at most `limit` characters."""
    s = re.sub(r"[^a-z0-9]+", "-", (text or "none").lower()).strip("-")
    return s[:limit] or "x"


# ----------------------------------------------------------------------------------------------------- the model


def _model_named_in(png_meta: Mapping) -> Path | None:
    """The weights-folder entry a PNG's metadata names, if present there. The name comes from a file anyone may have
    made, so it may only be a plain file name, looked up inside the weights folder; A1111's "Model" is the name
    without its extension, so the checkpoint suffixes are tried too."""
    from ..readers import WEIGHT_SUFFIXES
    from . import weights

    name = png_meta.get("model_file")
    if name is None:
        return None
    if (not isinstance(name, str) or name in ("", ".", "..") or len(name) > 255
            or any(c in name for c in "/\\\0") or name != name.strip()):
        raise UsageError(f"--from-png: its model {name!r:.60} is not a plain file name; a PNG may only name a "
                         f"model inside the weights folder ({weights.weights_dir()}), by file name (or pass --weights)")
    folder = weights.weights_dir()
    for candidate in (folder / name, *(folder / (name + s) for s in WEIGHT_SUFFIXES)):
        if os.path.lexists(candidate):
            return candidate
    return None


def resolve_model(args: argparse.Namespace, png_meta: Mapping | None) -> tuple[Path, str | None]:
    """(checkpoint path, family name or None) from --weights / --family, or the model a PNG was made with."""
    from ..family import family_by_name
    from . import weights

    spec = args.weights
    if spec is None and png_meta:
        named = _model_named_in(png_meta)
        if named is not None:  # same model the PNG was made with, when we have it
            spec = str(named)
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
    """--device and --dtype: a device this machine has (cpu, cuda[:N], mps), never the meta device."""
    import torch

    from ..params import check_device

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    name = args.device if args.device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    with usage_errors("--"):  # the core's rule, its "device ..." message as "--device ..."
        return check_device(name), dtype


def inspect_checkpoint(path: Path, family: str | None) -> Checkpoint:
    """`loading.inspect_checkpoint` for the commands: what the files are, their configs, whether the parts fit --
    without loading any weights. A rejected checkpoint is a one-line usage error (exit 2)."""
    from ..loading import CheckpointError, inspect_checkpoint

    try:
        return inspect_checkpoint(path, family=family)
    except (CheckpointError, FileNotFoundError) as e:
        msg = one_line(e)
        raise UsageError(msg if str(path) in msg else f"{path}: {msg}") from None


def load_checkpoint(checkpoint: Checkpoint, device: torch.device | str, dtype: torch.dtype) -> SDBundle:
    """`loading.build` for the commands: the weights converted, checked finite and assigned; a rejected tensor becomes
    a one-line usage error (exit 2). (The commands then give it the embeddings library: `SDBundle.embeddings`.)

    The commands call it as `common.load_checkpoint` (an attribute lookup at call time), so tests can replace it
    for every command at once.
    """
    from ..loading import CheckpointError, build

    try:
        return build(checkpoint, dtype=dtype, device=str(device))
    except CheckpointError as e:
        msg = one_line(e)
        raise UsageError(msg if str(checkpoint.path) in msg else f"{checkpoint.path}: {msg}") from None


# ---------------------------------------------------------------------------------------------------- prompts


@contextlib.contextmanager
def prompt_errors() -> Iterator[None]:
    """A prompt refused while it is encoded (prompts.PromptError, after the weights are loaded: nothing is written
    yet) becomes a UsageError: one line, exit 2."""
    from ..prompts.parser import PromptError

    try:
        yield
    except PromptError as e:
        raise UsageError(str(e)) from None



def embedding_library(args: argparse.Namespace) -> EmbeddingLibrary:
    """The embeddings prompts may name: `--embedding` files, and the weights folder's embeddings/ (read on demand)."""
    from ..prompts.embeddings import EmbeddingLibrary
    from . import weights

    with usage_errors():
        return EmbeddingLibrary(getattr(args, "embedding", None) or (), weights.weights_dir() / "embeddings")


def check_prompts(params: GenerationParams, local_prompts: Sequence[str], checkpoint: Checkpoint,
                  library: EmbeddingLibrary, where: str = "") -> dict[str, str]:
    """Everything about a run's prompts that needs no weights (gbsd_core/prompts/encode.check_run): syntax, chunk
    counts, the embeddings they name and whether those fit the model's text towers, the run's one context length.
    Returns {embedding name: its file's sha256} for the metadata. A refusal is a UsageError after `where`."""
    import hashlib

    from ..prompts.encode import check_run, text_towers
    from ..tokenizer import Tokenizer

    prompts = [("prompt", params.prompt), ("negative", params.negative), *(("focus", p) for p in local_prompts)]
    with usage_errors(where):
        names = check_run(prompts, params.steps, params.emphasis, params.chunk_padding,
                          Tokenizer(checkpoint.family.pad_token_id), library,
                          text_towers(checkpoint.configs["text_encoder"]), checkpoint.family.name)
    return {name: hashlib.sha256(library.get(name).path.read_bytes()).hexdigest() for name in names}


def compare_embeddings(png_meta: Mapping, used: Mapping[str, str], library: EmbeddingLibrary) -> None:
    """Warn when a PNG was made with embeddings this run does not have, or has other files of (by sha256, or the
    10-digit prefix A1111 writes)."""
    for name, digest in (png_meta.get("embeddings") or {}).items():
        if name not in used:
            warn(f"--from-png image was made with the embedding {name!r}, which this prompt does not name here (no "
                 f"file {name}.pt/.safetensors in {library.folder} or --embedding): it is read as text, the image "
                 "will differ")
        elif not used[name].startswith(digest.lower()):
            warn(f"--from-png image was made with embedding {name!r} sha256 {digest[:10]}, this file is "
                 f"{used[name][:10]}: the image will differ")


def parse_or_exit(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """parse_args, but --help and argparse errors return their exit status instead of raising SystemExit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)


"""What every `gbsd` command shares: the usage-error contract, argument groups, input checks, the model resolver
(outputs are checked in outputs.py).

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
import os
import re
import signal
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


def shown(path: Path | str) -> str:
    """A path for a message: a very long file name is cut in its middle."""
    path = Path(path)
    name = path.name
    return str(path if len(name) <= 60 else path.parent / f"{name[:30]}...{name[-20:]}")


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


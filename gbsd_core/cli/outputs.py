"""What every command checks about the files it will write, before any work: an output path that can be written
under its name (no symlink to nothing, no loop, a folder that accepts it, names the file system can hold), output
folders, `-o` patterns of a sweep, outputs that would overwrite an input; and the atomic text writer. The exit-2
contract (UsageError) and the argument helpers are in common.py."""
from __future__ import annotations

import errno
import os
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

from .common import UsageError, shown


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

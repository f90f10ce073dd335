"""The pairs file of `gbsd eval`: one JSON object per line, a global prompt and the local prompt to keep sharp.

    {"prompt": "a bunny and a carrot on grass", "focus": "a carrot", "seed": 1000}

Required: "prompt" (global prompt), "focus" (local prompt), "seed" (an integer in [0, 2**64 - 1]: the rules of
gbsd_core/params.py apply to the three). Optional: "id" (file-name-safe; default: the line number and the focus
words), "mask" (PNG, nonzero = object), "box" ([x0, y0, x1, y1] pixels, half-open) and "init" (an input image: image
to image). Paths are relative to the pairs file. Every problem is a UsageError naming the line, found before any
image is made: first every line is parsed (UTF-8, JSON, fields), then the files are checked (each image decoded
once), so a broken last line of a long file is reported at once.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import UsageError, check_box, check_image, slug, usage_errors

DEFAULT_PAIRS = Path(__file__).with_name("data") / "pairs.jsonl"  # the 28 shipped pairs
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


def _parse_line(obj: object, n: int, where: str, base: Path, init_dir: Path | None) -> Pair:
    from ..params import check_field

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
    with usage_errors(f"{where}: "):
        prompt, focus, seed = (check_field(name, obj[name]) for name in ("prompt", "focus", "seed"))
    pid = obj.get("id", f"{n:03d}-{slug(focus, limit=30)}")
    if not isinstance(pid, str) or not _ID.fullmatch(pid):
        raise UsageError(f"{where}: 'id' must be 1-80 characters of letters, digits, '.', '_', '-', got {pid!r:.90}")
    if "mask" in obj and "box" in obj:
        raise UsageError(f"{where}: give 'mask' or 'box', not both")
    paths = {}
    for name in ("mask", "init"):
        if name in obj:
            if not isinstance(obj[name], str) or not obj[name] or "\0" in obj[name]:
                raise UsageError(f"{where}: {name!r} must be a path string")
            paths[name] = str(base / obj[name])
    box = check_box(obj["box"], f"{where}: 'box'") if "box" in obj else None
    if "init" not in paths and init_dir is not None:
        # A folder of <id>.png, or an earlier `gbsd eval` output folder (its plain-SD images).
        found = [p for p in (init_dir / f"{pid}.png", init_dir / "pairs" / pid / "sd.png") if p.is_file()]
        if not found:
            raise UsageError(f"{where}: --init-dir {init_dir} has no {pid}.png nor pairs/{pid}/sd.png")
        paths["init"] = str(found[0])
    return Pair(pid, n, prompt, focus, seed, paths.get("mask"), box, paths.get("init"))


def read_pairs(path: Path, init_dir: Path | None = None) -> list[Pair]:
    """Parse and check a pairs file; every problem is a UsageError naming the line."""
    if not path.is_file():
        raise UsageError(f"{path}: no such pairs file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None
    pairs: list[Pair] = []
    lines: dict[str, int] = {}  # id -> line: the duplicate check is a set lookup, not a scan of the pairs so far
    for n, raw in enumerate(data.splitlines(), start=1):
        where = f"{path} line {n}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise UsageError(f"{where}: not valid JSON (nested too deeply)") from None
        pair = _parse_line(obj, n, where, path.parent, init_dir)
        if pair.id in lines:
            raise UsageError(f"{where}: id {pair.id!r} is used twice (also on line {lines[pair.id]})")
        lines[pair.id] = n
        pairs.append(pair)
    if not pairs:
        raise UsageError(f"{path}: no pairs in the file")
    # The files, once every line has parsed; an image used by many lines is decoded once.
    checked: dict[tuple[str, str], tuple[int, int]] = {}
    for p in pairs:
        for name, file in (("mask", p.mask), ("init", p.init)):
            if file is not None and (name, file) not in checked:
                checked[(name, file)] = check_image(file, f"{path} line {p.line}: {name}", rgb=name == "init")
    return pairs

"""The pairs file of `gbsd eval`: one JSON object per line, a global prompt and the local prompt to keep sharp.

    {"prompt": "a bunny and a carrot on grass", "focus": "a carrot", "seed": 1000}

Required: "prompt" (global prompt), "focus" (local prompt), "seed" (int >= 0). Optional: "id" (file-name-safe;
default: the line number and the focus words), "mask" (PNG, nonzero = object), "box" ([x0, y0, x1, y1] pixels,
half-open) and "init" (an input image: image to image). Paths are relative to the pairs file. Every problem is a
UsageError naming the line, found before any image is made.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import UsageError, check_image, slug

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
        pid = obj.get("id", f"{n:03d}-{slug(obj['focus'], limit=30)}")
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

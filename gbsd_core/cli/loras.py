"""LoRAs on the command line: `--lora PATH[:SCALE]` (both stages), `--layout-lora` / `--focus-lora` (that GBSD stage
only, UNet only), A1111's prompt tags `<lora:NAME:WEIGHT>`, their PNG record, and what `gbsd info` says of a LoRA.

    gbsd generate "a bunny and a carrot, bokeh <lora:style:0.8>" --focus "a carrot" -o out.png
    gbsd generate "a bunny and a carrot, bokeh" --focus "a carrot" --lora style:0.8 --focus-lora detail -o out.png

A tag in the global prompt applies to both stages, a tag in `--focus` to the focus stage; the prompt parser finds
them (gbsd_core/prompts/parser.py, through lora.split_lora_tags), they are taken out of the text before it is encoded
(A1111 does the same) and stay in the PNG's prompt. A NAME (a tag's, or a flag's that
is not an existing path) is a file inside `$GBSD_WEIGHTS/loras` (or `weights/loras`), by plain name only.

The PNG records the LoRAs as A1111 does -- tags in the prompt (LoRAs given by flag are added as tags: both-stage ones
to the prompt, focus-stage ones to `GBSD focus`, layout-stage ones under `GBSD layout loras`) and `Lora hashes:
"name: hash"` (A1111's 12-digit hash) -- and the gbsd chunk lists each with its file's sha256, scale and stage.
`--from-png` re-applies them by name from the loras folder (a sha256 that differs is a warning, as for the model);
LoRA flags given with `--from-png` replace the PNG's flag LoRAs.

Every file is read and checked against the model (its configs, on the meta device) before any weights load: a
missing name, a bad file, a LoRA for another family -- exit 2, one line, nothing written.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import UsageError, usage_errors, warn

if TYPE_CHECKING:
    from ..bundle import SDBundle
    from ..loading import Checkpoint
    from ..lora import AppliedLoras, LoraFile

STAGES = ("both", "layout", "focus")
FLAGS = {"both": "--lora", "layout": "--layout-lora", "focus": "--focus-lora"}
DESTS = {"both": "lora", "layout": "layout_lora", "focus": "focus_lora"}  # the flags' argparse names


def loras_dir() -> Path:
    """Where LoRAs are looked up by name: `loras/` in the weights folder ($GBSD_WEIGHTS or ./weights)."""
    from .weights import weights_dir

    return weights_dir() / "loras"


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (also <lora:NAME:WEIGHT> in the prompt; NAME in $GBSD_WEIGHTS/loras)")
    g.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="merge a LoRA for the whole run, UNet and text encoders (scale 1; repeatable)")
    g.add_argument("--layout-lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA for the GBSD layout stage only (UNet; repeatable)")
    g.add_argument("--focus-lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA for the GBSD focus stage only (UNet; needs --focus; repeatable)")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a run: which file, how strong, in which stage, and where it was asked for."""

    path: Path
    scale: float
    stage: str  # "both", "layout" or "focus"
    source: str  # "flag" or "tag": a tag lives in the prompt text, a flag's is added to the PNG record

    @property
    def name(self) -> str:
        return self.path.stem


def _check_scale(scale: object, where: str) -> float:
    from ..lora.merge import SCALE_LIMIT

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or abs(scale) > SCALE_LIMIT:
        raise UsageError(f"{where}: scale must be a number in [-{SCALE_LIMIT:g}, {SCALE_LIMIT:g}], got {scale!r:.40}")
    return float(scale)


def _resolve(name_or_path: str, where: str) -> Path:
    """An existing path as given, else a plain name inside the loras folder."""
    from ..lora.tags import plain_name

    path = Path(name_or_path)
    if "\0" not in name_or_path and path.is_file():
        return path
    if not plain_name(name_or_path) or os.path.lexists(path):
        what = "is not a regular file" if os.path.lexists(path) else "no such file"
        raise UsageError(f"{where}: {what}")
    return _by_name(name_or_path, f"{where}: ")


def parse_flag(text: str, stage: str) -> LoraSpec:
    """`PATH[:SCALE]` (an existing path that holds ':' is taken whole)."""
    where = f"{FLAGS[stage]} {text}"
    head, sep, tail = text.rpartition(":")
    scale: object = 1.0
    if sep and not Path(text).is_file():
        try:
            scale = float(tail)
        except ValueError:
            raise UsageError(f"{where}: {tail!r} is not a scale (write PATH:SCALE, e.g. style.safetensors:0.8)") from None
        text = head
    return LoraSpec(_resolve(text, where), _check_scale(scale, where), stage, "flag")


def split_tags(text: str | None, what: str, stage: str) -> tuple[str | None, list[LoraSpec]]:
    """(text without its LoRA tags, the tags as specs of `stage`)."""
    from ..lora.tags import split_lora_tags

    if text is None:
        return None, []
    with usage_errors("" if what == "prompt" else f"{what}: "):
        stripped, tags = split_lora_tags(text)
    # by name only, inside the loras folder: a prompt may come from anyone's PNG
    return stripped, [LoraSpec(_by_name(t.name, f"{what} tag {t.text}: "), _check_scale(t.weight, f"{what} tag {t.text}"),
                               stage, "tag") for t in tags]


def refuse_tags(texts: Sequence[str], what: str, instead: str) -> None:
    """Prompts whose branches share one stage (a focus stack, rack's --from / --to, pairs files) cannot carry tags."""
    from ..prompts.parser import LORA_KINDS, split_extra_networks

    for text in texts:
        tags = split_extra_networks(text, LORA_KINDS)[1]
        if tags:
            raise UsageError(f"{what}: LoRA tags are not read here ({tags[0]}); {instead}")


# ------------------------------------------------------------------------------------------------ the PNG record
def _png_specs(png_meta: Mapping[str, Any] | None, where: str) -> list[LoraSpec]:
    """The flag LoRAs an earlier PNG recorded (the tag ones come back with its prompts), looked up by name."""
    if not png_meta:
        return []
    from ..lora.tags import split_lora_tags

    specs = []
    if png_meta.get("source") == "json":
        entries = (png_meta.get("json") or {}).get("loras") or []
        if not isinstance(entries, list):
            raise UsageError(f"{where}: broken 'gbsd' metadata chunk (loras must be a list)")
        for e in entries:
            if (not isinstance(e, dict) or not isinstance(e.get("name"), str) or e.get("stage") not in STAGES
                    or e.get("from") not in ("flag", "tag")):
                raise UsageError(f"{where}: broken 'gbsd' metadata chunk (a LoRA entry {e!r:.80})")
            if e["from"] == "flag":
                spec = LoraSpec(_resolve_png(e["name"], where), _check_scale(e.get("scale"), f"{where}: LoRA {e['name']}"),
                                e["stage"], "flag")
                _check_sha(spec, e.get("sha256"), where)
                specs.append(spec)
        return specs
    with usage_errors(f"{where}: GBSD layout loras: "):
        _, tags = split_lora_tags(png_meta.get("layout_loras") or "")
    return [LoraSpec(_resolve_png(t.name, where), _check_scale(t.weight, where), "layout", "flag") for t in tags]


def _by_name(name: str, where: str) -> Path:
    from ..lora.tags import find_lora

    with usage_errors(where):
        return find_lora(name, loras_dir())


def _resolve_png(name: str, where: str) -> Path:
    return _by_name(name, f"{where}: the image was made with LoRA {name!r:.60}; ")


def _check_sha(spec: LoraSpec, recorded: object, where: str) -> None:
    from .weights import file_sha256

    if isinstance(recorded, str) and recorded != file_sha256(spec.path):
        warn(f"{where}: LoRA {spec.name} was sha256 {recorded[:10]} there, {spec.path} is another file "
             f"({file_sha256(spec.path)[:10]}): the image will differ")


@dataclass(frozen=True)
class RunLoras:
    """The LoRAs of one command, read and checked against the model: what `apply` merges and `record` writes."""

    specs: tuple[LoraSpec, ...]
    files: Mapping[Path, LoraFile]

    def uses(self, stage: str) -> list[tuple[LoraFile, float]]:
        return [(self.files[s.path], s.scale) for s in self.specs if s.stage == stage]

    def apply(self, bundle: SDBundle) -> AppliedLoras:
        """The merge for a `with` block, also the run's stage switch (pipeline's `switch=`)."""
        from ..lora import apply_loras

        with usage_errors():
            return apply_loras(bundle, self.uses("both"), layout=self.uses("layout"), focus=self.uses("focus"))

    def records(self) -> tuple[dict[str, Any], ...]:
        """The gbsd chunk's "loras" entries (pngmeta.ImageRecord.loras)."""
        return tuple({"name": s.name, "file": s.path.name, "sha256": self.files[s.path].sha256,
                      "a1111_hash": self.files[s.path].a1111_hash, "scale": s.scale, "stage": s.stage,
                      "from": s.source} for s in self.specs)


def plan_loras(args: argparse.Namespace, checkpoint: Checkpoint, tag_specs: Sequence[LoraSpec],
               png_meta: Mapping[str, Any] | None, has_focus: bool) -> RunLoras:
    """Flags (or, without any, the PNG's flag LoRAs) and the prompts' tags: each file read and placed on the model
    (its configs on the meta device) before any weights load. Raises UsageError."""
    from ..lora import load_lora, lora_targets_of_configs
    from ..lora.merge import plan_patches
    from ..readers import CheckpointError

    flags = [parse_flag(text, stage) for stage in STAGES for text in (getattr(args, DESTS[stage], None) or [])]
    if not flags:
        flags = _png_specs(png_meta, f"--from-png {getattr(args, 'from_png', None)}")
    specs = (*flags, *tag_specs)
    if not has_focus and any(s.stage == "focus" for s in specs):
        raise UsageError("--focus-lora needs a focus stage: give --focus (GBSD) or drop it")
    files: dict[Path, LoraFile] = {}
    for spec in specs:
        if spec.path not in files:
            where = FLAGS[spec.stage] if spec.source == "flag" else "prompt tag"
            try:
                files[spec.path] = load_lora(spec.path)
            except (CheckpointError, OSError) as e:
                raise UsageError(f"{where} {spec.name}: {e}") from None
    if specs:
        targets = lora_targets_of_configs(checkpoint.configs["unet"], checkpoint.configs["text_encoder"])
        for stage in STAGES:
            with usage_errors():
                plan_patches(targets, [(files[s.path], s.scale) for s in specs if s.stage == stage],
                             unet_only=stage != "both")
        stage_text = sum(m.part != "unet" for s in specs if s.stage != "both" for m in files[s.path].modules)
        if stage_text:
            warn(f"stage LoRAs adapt the UNet only: {stage_text} text-encoder modules of --layout-lora / --focus-lora "
                 "files are not merged (the prompts are encoded once, before the first stage)")
    return RunLoras(tuple(specs), files)


@contextlib.contextmanager
def merged(loras: RunLoras | None, bundle: SDBundle) -> Iterator[AppliedLoras | None]:
    """A command's LoRAs merged for a `with` block (None without any), the bundle restored after it. A merge the
    weights' dtype cannot hold (an fp16 overflow) is a UsageError, the weights rolled back."""
    if loras is None or not loras.specs:
        yield None
        return
    applied = loras.apply(bundle)
    with usage_errors():
        applied.__enter__()
    try:
        yield applied
    finally:
        applied.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------------- gbsd info
def looks_like_lora(path: Path) -> bool:
    """A .safetensors whose tensor names are a LoRA's (from the header alone), or a .pt / .bin LoRA."""
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in (".safetensors", ".pt", ".bin"):
        return False
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        else:
            from ..readers import read_torch

            keys = list(read_torch(path))
    except Exception:  # not readable as such: the checkpoint reader names the problem
        return False
    return bool(keys) and all(k.startswith("lora_") or re.search(r"\.lora[._]|_lora\.|\.alpha$", k) for k in keys)


def describe_lora(path: Path) -> dict[str, Any]:
    """What `gbsd info` prints for a LoRA file."""
    from ..lora import load_lora
    from ..readers import CheckpointError

    try:
        lora = load_lora(path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    by_part: dict[str, int] = {}
    for m in lora.modules:
        by_part[m.part] = by_part.get(m.part, 0) + 1
    convs = [m for m in lora.modules if m.down.ndim == 4 and (m.mid is not None or m.down.shape[2:] != (1, 1))]
    return {
        "kind": "LoRA" + (" (LoCon: 3x3 convs)" if convs else ""),
        "format": lora.format,
        "family": lora.family_hint() or "unknown (not in its metadata; its widths are no SD family's)",
        "ranks": ", ".join(map(str, lora.ranks())),
        "alpha / rank": ", ".join(f"{s:g}" for s in sorted({m.scale for m in lora.modules})),
        "targets": f"{len(lora.modules)} modules (" + ", ".join(f"{p} {n}" for p, n in sorted(by_part.items())) + ")",
        "Tucker (lora_mid) modules": sum(m.mid is not None for m in lora.modules),
        "A1111 hash": lora.a1111_hash,
        "sha256": lora.sha256,
    }

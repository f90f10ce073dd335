"""A1111's prompt tags, `<lora:NAME:WEIGHT>`, and where NAME is looked up.

A1111 (modules/extra_networks.py) finds `<name:arg1:arg2...>` tags in a prompt, takes them out of the text before it
is encoded, and hands the `lora` ones (and `lyco`, the old LyCORIS extension's alias) to the LoRA network: arg1 is
the file's name without its suffix, arg2 the weight (1.0 when omitted). A1111's per-part form (`te=`, `unet=`,
`dyn=`, or a third value for the UNet) is not read: such a tag is refused, not half-applied.

The prompt parser (gbsd_core/prompts/parser.py, `split_extra_networks`) is the one reader of the tag syntax; this
module reads what it hands over: `lora_tag` a tag's NAME:WEIGHT, `split_lora_tags` a whole prompt (the command
line's). `find_lora` looks NAME up inside one folder, by plain file name only: a name from a prompt or a PNG may not
walk the file system.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..prompts.parser import LORA_KINDS, ExtraNetwork, split_extra_networks
from .files import LORA_SUFFIXES


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float
    text: str  # the tag as written, e.g. "<lora:detail:0.8>"


def lora_tag(tag: ExtraNetwork) -> LoraTag:
    """A `lora` / `lyco` tag's NAME and WEIGHT. Raises ValueError for a tag without a name, with a weight that is not
    a finite number, or with more fields than NAME:WEIGHT."""
    text = str(tag)
    fields = [f.strip() for f in tag.args]
    if not fields[0]:
        raise ValueError(f"prompt tag {text!r} names no LoRA: write <lora:NAME:WEIGHT>")
    if len(fields) > 2 or any("=" in f for f in fields):
        raise ValueError(f"prompt tag {text!r}: gbsd reads <lora:NAME:WEIGHT> only (no per-part weights)")
    try:
        weight = float(fields[1]) if len(fields) > 1 else 1.0
    except ValueError:
        raise ValueError(f"prompt tag {text!r}: weight {fields[1]!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"prompt tag {text!r}: weight {fields[1]!r} is not a finite number")
    return LoraTag(fields[0], weight, text)


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt with its LoRA tags taken out, the tags in order), read by the prompt parser; tags of other kinds
    stay in the text (the prompt check refuses them by name). Raises ValueError as `lora_tag`."""
    text, tags = split_extra_networks(prompt, LORA_KINDS)
    return text, [lora_tag(t) for t in tags]


def plain_name(name: str) -> bool:
    """A file name without any directory part (what a tag or a PNG may name)."""
    return (bool(name) and name not in (".", "..") and len(name) <= 255 and name == name.strip()
            and not any(c in name for c in "/\\\0"))


def find_lora(name: str, folder: Path) -> Path:
    """The file NAME (or NAME plus a LoRA suffix) inside `folder`. Raises ValueError when NAME is not a plain file
    name or no such file is there."""
    if not plain_name(name):
        raise ValueError(f"LoRA {name!r:.60} is not a plain file name; LoRAs are looked up by name in {folder}")
    for candidate in (folder / name, *(folder / (name + s) for s in LORA_SUFFIXES)):
        if candidate.is_file():
            return candidate
    raise ValueError(f"no LoRA named {name!r} in {folder} (looked for {name}{', '.join(LORA_SUFFIXES)})")

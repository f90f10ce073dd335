"""Safe readers for the files a checkpoint is made of: regular files only, tensors only, JSON objects only.

Everything here refuses before it reads: a path must be a regular file (a named pipe would block `open` forever, a
device would stream without end), a pickle may hold tensors and containers only (`torch.load(weights_only=True)`:
nothing runs), keys must be strings and values real, dense, floating-point tensors with data, and a config must be a
JSON object. Every refusal is a `CheckpointError` (a ValueError) naming the file and the offending entries.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# The dtypes a weight may be stored in. Integer, bool and complex tensors are not weights of these networks, and
# fp8 files would need scaling factors gbsd does not read.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the offending keys."""


def key_list(keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def file_kind(path: Path) -> str | None:
    """None for a regular file (symbolic links followed), else what it is ("a named pipe", ...), from stat alone."""
    mode = os.stat(path).st_mode
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_regular_file(path: Path) -> None:
    """Refuse anything but an existing regular file, before it is opened."""
    try:
        kind = file_kind(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if kind is not None:
        raise CheckpointError(f"{path}: is {kind}, not a regular file")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    check_regular_file(path)
    try:
        # get_tensor returns tensors on a private (copy-on-write) mmap of the file: no RAM is spent until touched.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError) as e:  # a dtype torch lacks is a TypeError
        raise CheckpointError(f"{path}: not a readable safetensors file, probably truncated or corrupt ({e})") from e


def read_pickle(path: Path) -> object:
    """What a `.ckpt`/`.pt`/`.pth`/`.bin` file holds, unpickled with weights_only=True: tensors, containers, numbers
    and strings only (a pickle that names any other class is refused: loading it would run code)."""
    check_regular_file(path)

    def _load(mmap: bool) -> object:
        with warnings.catch_warnings():
            # torch validates sparse tensors and says so; a sparse tensor is then refused by check_weights anyway
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = _load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = _load(mmap=False)  # legacy (pre-zip) torch.save format cannot be memory-mapped
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused to unpickle{what}. This file needs Python code to load, which could do anything; gbsd "
            "only reads tensors (torch.load(weights_only=True)). Convert it to .safetensors with a tool you trust, or "
            "use the .safetensors release of the model."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # a damaged zip or pickle stream raises any of these from inside torch.load
        raise CheckpointError(f"{path}: not a readable torch checkpoint, probably truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
    return obj


def read_torch(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt`/`.pt`/`.pth`/`.bin` state dict, unpickled with weights_only=True (tensors and containers only)."""
    obj = read_pickle(path)
    # Lightning checkpoints wrap the weights: {"state_dict": {...}, "global_step": ..., ...}.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    not_str = [repr(k) for k in obj if not isinstance(k, str)]
    if not_str:
        raise CheckpointError(f"{path}: state dict keys that are not strings: {key_list(not_str)}")
    not_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensor:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {key_list(not_tensor)}")
    return obj


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)[0]
    if suffix in WEIGHT_SUFFIXES:
        return read_torch(path)
    raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (expected {', '.join(WEIGHT_SUFFIXES)} or a "
                          "diffusers folder)")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON config file that must hold an object (diffusers' config.json, scheduler_config.json)."""
    check_regular_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def check_weights(sd: Mapping[str, torch.Tensor], path: Path, prefix: str = "") -> None:
    """Every tensor a weight can be: dense, strided, holding data, and of a floating dtype gbsd converts from."""
    problems = []
    for key, t in sd.items():
        if t.layout != torch.strided:
            problems.append(f"{prefix}{key} is a {str(t.layout).removeprefix('torch.')} tensor")
        elif t.is_meta:
            problems.append(f"{prefix}{key} holds no data (meta tensor)")
        elif t.dtype not in FLOAT_DTYPES:
            problems.append(f"{prefix}{key} is {str(t.dtype).removeprefix('torch.')}")
    if problems:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise CheckpointError(f"{path}: {len(problems)} tensors are not floating-point weights ({accepted}): "
                              + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))

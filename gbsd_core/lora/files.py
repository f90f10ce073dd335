"""Reading LoRA files: kohya / A1111 LoRA and LoCon, and diffusers / PEFT LoRA, into one form (`LoraFile`).

**kohya / A1111** (`.safetensors`; old ones `.pt`, unpickled with weights_only=True), one group of keys per adapted
module (kohya-ss/sd-scripts networks/lora.py; A1111 extensions-builtin/Lora/network_lora.py):

    lora_unet_<module>.lora_down.weight   [r, in]          conv: [r, in, kh, kw]
    lora_unet_<module>.lora_up.weight     [out, r]         conv: [out, r, 1, 1]
    lora_unet_<module>.lora_mid.weight    [r, r, kh, kw]   LoCon's Tucker form (down and up are then 1x1)
    lora_unet_<module>.alpha              0-d              missing: alpha = r

ΔW = (alpha / r) · up @ down (`merge.delta_weight`). `<module>` is the module path with "." turned into "_":
diffusers names for SD1/SD2 UNets (`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), sgm's (original)
names for SDXL (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`). The text encoders are `lora_te_` (SD1/SD2),
`lora_te1_` / `lora_te2_` (SDXL's CLIP-L / bigG), with HF CLIP names even for the OpenCLIP towers
(`text_model_encoder_layers_0_self_attn_q_proj`). LoCon adds the ResBlocks' 3x3 convs and the down/upsamplers.

**diffusers / PEFT**: `<part>.<dotted module>.lora_A.weight` / `.lora_B.weight` (A = down, B = up), part = unet,
text_encoder, text_encoder_2 (text modules with or without `text_model.`); older files `.lora.down/up.weight` or
`.lora_linear_layer.down/up.weight`, the oldest ("attention processors") `…attn1.processor.to_q_lora.down.weight`
without a part (the UNet). No alpha per key: the safetensors metadata `lora_adapter_metadata` (JSON, as diffusers'
`save_lora_weights` writes it: `<part>.r`, `<part>.lora_alpha`, `<part>.rank_pattern`, `<part>.alpha_pattern`,
`<part>.use_rslora`) gives scale = alpha / r (rsLoRA: alpha / √r); without it the scale is 1 (diffusers' default,
alpha = r). Some converted files carry `<part>.<module>.alpha` keys: read as kohya's.

Each module keeps the file's own spelling of its name (dots made "_", kohya's form); targets.py looks it up among the
model's modules in both the original and the diffusers spelling. Everything is checked here, before a model is
touched: tensors only (a pickle that wants to run code is refused), floating point, finite, consistent ranks and
shapes. LyCORIS formats and DoRA are refused by name.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..readers import FLOAT_DTYPES, CheckpointError, check_regular_file, key_list, read_safetensors, read_torch

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te_": "te"}
DIFFUSERS_PARTS = ("unet", "text_encoder", "text_encoder_2")
# Tensors of adapters gbsd does not merge, by the key suffix that gives them away (LyCORIS, A1111's network_*.py).
REFUSED = {
    "dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "lokr_w1_a": "LyCORIS LoKr", "diff": "LyCORIS full",
    "on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT", "a1": "GLoRA", "w_norm": "LyCORIS norm",
    "dyn_up": "DyLoRA",
}


@dataclass(frozen=True, eq=False)  # compared by identity: a merge tells its sets apart by the modules they hold
class LoraModule:
    """One adapted module of a file: ΔW = scale · up @ down (with `mid` between them for Tucker LoCon)."""

    part: str  # kohya: "unet", "te", "te1", "te2"; diffusers: "unet", "text_encoder", "text_encoder_2"
    name: str  # the module as the file names it, "." -> "_" (kohya's spelling; the lookup key)
    source: str  # the file's key prefix, for messages: "lora_unet_…" or "unet.down_blocks.…"
    down: Tensor  # [r, in] or [r, in, kh, kw] (Tucker: [r, in, 1, 1])
    up: Tensor  # [out, r] or [out, r, 1, 1]
    scale: float  # alpha / r (A1111's calc_scale; PEFT's lora_alpha / r)
    mid: Tensor | None = None  # Tucker core [r, r, kh, kw]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA file read and checked: its modules, its metadata and its hashes."""

    path: Path
    format: str  # "kohya" or "diffusers"
    modules: tuple[LoraModule, ...]
    metadata: Mapping[str, str]
    sha256: str  # of the whole file: what the gbsd PNG chunk records
    a1111_hash: str  # A1111's "Lora hashes" value (12 hex digits), see `file_hashes`

    @property
    def name(self) -> str:
        """The name a prompt tag uses: the file name without its suffix (A1111's)."""
        return self.path.stem

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})

    def parts(self) -> list[str]:
        return sorted({m.part for m in self.modules})

    def family_hint(self) -> str | None:
        """Which model family the file was made for, from its metadata (kohya's `ss_base_model_version` / `ss_v2`,
        as A1111 reads them) or its shapes (the text towers it has, the cross-attention context width)."""
        meta = self.metadata
        if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
            return "sdxl"
        if str(meta.get("ss_v2", "")) == "True":
            return "sd2"
        if any(p in ("te1", "te2", "text_encoder_2") for p in self.parts()):
            return "sdxl"
        widths = {int(m.down.shape[1]) for m in self.modules if m.part == "unet" and re.search(r"attn2_to_[kv]$", m.name)}
        return {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}.get(widths.pop()) if len(widths) == 1 else None


def file_hashes(path: Path, metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sha256 of the file, A1111's LoRA hash) in one read. A1111 >= 1.6 (extensions-builtin/Lora/network.py) takes
    the file's `sshs_model_hash` metadata, else for a .safetensors the kohya "addnet" hash (sha256 of everything after
    the 8 + n byte header, so editing metadata keeps it), else the file's sha256; "Lora hashes" shows 12 digits."""
    full, tensors = hashlib.sha256(), hashlib.sha256()
    is_safetensors = path.suffix.lower() == ".safetensors"
    with open(path, "rb") as f:
        head = f.read(8)
        full.update(head)
        skip = int.from_bytes(head, "little") if is_safetensors and len(head) == 8 else 0
        while chunk := f.read(1 << 22):
            full.update(chunk)
            cut = min(skip, len(chunk))
            skip -= cut
            tensors.update(chunk[cut:])
    digest = full.hexdigest()
    short = metadata.get("sshs_model_hash") or (tensors.hexdigest() if is_safetensors else digest)
    return digest, str(short)[:12]


def _refuse_adapters(path: Path, keys: list[str]) -> None:
    """Refuse other adapters' tensors (REFUSED), naming the kind and a few of their modules."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        for marker, kind in REFUSED.items():
            m = re.match(rf"(.*)\.{re.escape(marker)}(?:\.weight)?$", key)
            if m:
                kinds[kind].append(m.group(1))
    if kinds:
        what = "; ".join(f"{kind}: {len(mods)} module(s), e.g. {key_list(mods, 2)}" for kind, mods in kinds.items())
        raise CheckpointError(f"{path}: not a plain LoRA ({what}); gbsd merges LoRA and LoCon (lora_down / lora_up "
                              "/ lora_mid, lora_A / lora_B)")


def _scalar(t: Tensor, where: str) -> float:
    if t.numel() != 1 or t.dtype.is_complex or t.dtype == torch.bool:
        raise CheckpointError(f"{where}: alpha must be one real number, got a {t.dtype} tensor of shape {tuple(t.shape)}")
    value = float(t.reshape(()).item())
    if not math.isfinite(value):
        raise CheckpointError(f"{where}: alpha is {value}")
    return value


def _check_pair(path: Path, where: str, down: Tensor, up: Tensor, mid: Tensor | None) -> None:
    """Floating point, finite, and shapes that multiply: down [r, in(, kh, kw)], up [out, r(, 1, 1)]."""
    for role, t in (("down", down), ("up", up), ("mid", mid)):
        if t is None:
            continue
        if t.layout != torch.strided or t.is_meta or t.dtype not in FLOAT_DTYPES:
            kind = f"{str(t.dtype).removeprefix('torch.')}, {str(t.layout).removeprefix('torch.')}"
            raise CheckpointError(f"{path}: {where} {role} ({kind}{', meta' if t.is_meta else ''}) is not a "
                                  "floating-point weight")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: {where} {role} holds {int(torch.isnan(t).sum())} NaN and "
                                  f"{int(torch.isinf(t).sum())} inf values")
    ok = down.ndim in (2, 4) and up.ndim in (2, 4) and up.shape[1] == down.shape[0] and down.shape[0] > 0
    ok = ok and (up.ndim == 2 or tuple(up.shape[2:]) == (1, 1))
    if mid is not None:
        ok = ok and mid.ndim == 4 and tuple(mid.shape[:2]) == (up.shape[1], down.shape[0])
        ok = ok and down.ndim == 4 and tuple(down.shape[2:]) == (1, 1)
    if not ok:
        shapes = f"down {tuple(down.shape)}, up {tuple(up.shape)}" + (f", mid {tuple(mid.shape)}" if mid is not None else "")
        raise CheckpointError(f"{path}: {where}: LoRA shapes that do not multiply ({shapes})")


def _kohya_modules(path: Path, sd: Mapping[str, Tensor]) -> tuple[LoraModule, ...]:
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, t in sd.items():
        lora_name, _, suffix = key.partition(".")
        groups[lora_name][suffix] = t
    modules, unknown = [], []
    for lora_name, g in groups.items():
        prefix = next((p for p in KOHYA_PARTS if lora_name.startswith(p)), None)
        extra = set(g) - {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}
        if prefix is None or extra or "lora_down.weight" not in g or "lora_up.weight" not in g:
            unknown.append(lora_name)
            continue
        down, up, mid = g["lora_down.weight"], g["lora_up.weight"], g.get("lora_mid.weight")
        _check_pair(path, lora_name, down, up, mid)
        alpha = _scalar(g["alpha"], f"{path}: {lora_name}") if "alpha" in g else float(down.shape[0])
        modules.append(LoraModule(KOHYA_PARTS[prefix], lora_name[len(prefix):], lora_name, down, up,
                                  alpha / down.shape[0], mid))
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} key groups are not kohya LoRA modules (a lora_unet_ / lora_te_ "
                              f"/ lora_te1_ / lora_te2_ name with lora_down.weight, lora_up.weight and optional "
                              f"lora_mid.weight, alpha): {key_list(unknown)}")
    return tuple(modules)


# diffusers' spellings of a LoRA tensor, oldest last: (pattern on the key after the part, module rewrite, role)
_DIFFUSERS_ROLES = (
    (re.compile(r"(.+)\.lora_A\.weight$"), r"\1", "down"),
    (re.compile(r"(.+)\.lora_B\.weight$"), r"\1", "up"),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.down\.weight$"), r"\1", "down"),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.up\.weight$"), r"\1", "up"),
    (re.compile(r"(.+)\.alpha$"), r"\1", "alpha"),
)
# attention processors (diffusers < 0.20): `attn1.processor.to_q_lora.down.weight`; text: `self_attn.to_q_lora…`
_ATTN_PROCS = re.compile(r"(.+?)\.(?:processor\.)?to_(q|k|v|out)_lora\.(down|up)\.weight$")


def _diffusers_module(part: str, key: str) -> tuple[str, str] | None:
    """(dotted module, role) of one diffusers key (part stripped), or None when it is no LoRA tensor."""
    m = _ATTN_PROCS.match(key)
    if m:
        module, which, role = m.groups()
        text = part != "unet"
        leaf = (f"{which}_proj" if which != "out" else "out_proj") if text else (f"to_{which}" if which != "out"
                                                                                   else "to_out.0")
        return f"{module}.{leaf}", role
    for pattern, rewrite, role in _DIFFUSERS_ROLES:
        if pattern.match(key):
            return pattern.sub(rewrite, key), role
    return None


def _metadata_scale(meta: Mapping[str, object], part: str, module: str, rank: int) -> float:
    """alpha / r of a PEFT module from `lora_adapter_metadata`: its alpha_pattern entry (a key naming the module or
    the end of its dotted name, as PEFT matches `(.*\\.)?key$`; read literally here, not as a regex from the file),
    else lora_alpha; rsLoRA (`use_rslora`) divides by √r. 1 without metadata (diffusers' default, alpha = r)."""
    def pattern(field: str) -> object:
        table = meta.get(f"{part}.{field}") or {}
        for key, value in (table.items() if isinstance(table, dict) else ()):
            if module == key or module.endswith("." + key):
                return value
        return None

    alpha = pattern("alpha_pattern")
    alpha = alpha if alpha is not None else meta.get(f"{part}.lora_alpha")
    if alpha is None:
        return 1.0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"lora_alpha {alpha!r} for {part}.{module} is not a number")
    return float(alpha) / (math.sqrt(rank) if meta.get(f"{part}.use_rslora") else rank)


def _diffusers_modules(path: Path, sd: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[LoraModule, ...]:
    meta: dict[str, object] = {}
    if "lora_adapter_metadata" in metadata:
        try:
            meta = json.loads(metadata["lora_adapter_metadata"])
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: unreadable lora_adapter_metadata ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: lora_adapter_metadata is not a JSON object")
        if any(meta.get(f"{p}.use_dora") for p in DIFFUSERS_PARTS):
            raise CheckpointError(f"{path}: a DoRA adapter (use_dora in its metadata); gbsd merges LoRA only")
    groups: dict[tuple[str, str], dict[str, Tensor]] = defaultdict(dict)
    unknown = []
    for key, t in sd.items():
        part = next((p for p in sorted(DIFFUSERS_PARTS, key=len, reverse=True) if key.startswith(p + ".")), None)
        rest = key[len(part) + 1:] if part else key
        part = part or "unet"  # attention-processor files carry no part: they adapt the UNet
        found = _diffusers_module(part, rest)
        if found is None:
            unknown.append(key)
        else:
            groups[(part, found[0])][found[1]] = t
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys are neither kohya (lora_unet_…) nor diffusers / PEFT "
                              f"(…lora_A.weight / lora_B.weight) LoRA tensors: {key_list(unknown)}")
    modules = []
    for (part, module), g in groups.items():
        where = f"{part}.{module}"
        if "down" not in g or "up" not in g:
            raise CheckpointError(f"{path}: {where} has no {'up (lora_B)' if 'down' in g else 'down (lora_A)'} weight")
        down, up = g["down"], g["up"]
        _check_pair(path, where, down, up, None)
        if "alpha" in g:
            scale = _scalar(g["alpha"], f"{path}: {where}") / down.shape[0]
        else:
            try:
                scale = _metadata_scale(meta, part, module, int(down.shape[0]))
            except ValueError as e:
                raise CheckpointError(f"{path}: lora_adapter_metadata: {e}") from None
        modules.append(LoraModule(part, module.replace(".", "_"), where, down, up, scale))
    return tuple(modules)


def load_lora(path: str | Path) -> LoraFile:
    """Read and check a LoRA file (.safetensors, or .pt / .ckpt / .bin unpickled with weights_only=True). Raises
    CheckpointError (a ValueError) naming the file and the problem; FileNotFoundError when it does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    check_regular_file(path)
    suffix = path.suffix.lower()
    if suffix not in LORA_SUFFIXES:
        raise CheckpointError(f"{path}: unknown LoRA file type {suffix!r} (expected {', '.join(LORA_SUFFIXES)})")
    sd, metadata = read_safetensors(path) if suffix == ".safetensors" else (read_torch(path), {})
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    kohya = [k for k in sd if k.startswith("lora_")]
    if kohya and len(kohya) < len(sd):
        raise CheckpointError(f"{path}: mixes kohya keys (lora_unet_…) with others: {key_list([k for k in sd if k not in kohya])}")
    if not kohya and not any(re.search(r"lora|\.alpha$", k) for k in sd):
        raise CheckpointError(f"{path}: not a LoRA file (no lora_down / lora_A tensors; keys such as "
                              f"{key_list(list(sd), 3)}): a checkpoint goes to --weights")
    _refuse_adapters(path, list(sd))
    modules = _kohya_modules(path, sd) if kohya else _diffusers_modules(path, sd, metadata)
    modules = tuple(sorted(modules, key=lambda m: (m.part, m.name)))  # safetensors sorts its keys, a pickle does not
    sha, a1111 = file_hashes(path, metadata)
    return LoraFile(path, "kohya" if kohya else "diffusers", modules, dict(metadata), sha, a1111)

"""Merging LoRAs into a bundle's weights, in place, with a backup; per GBSD stage if asked.

    with apply_loras(bundle, [(load_lora("style.safetensors"), 0.8)]):
        generate(bundle, params)                                  # the bundle is byte-identical again afterwards
    with apply_loras(bundle, [(style, 0.8)], focus=[(detail, 1.0)]) as loras:
        generate(bundle, params, switch=loras)                    # `detail` only while the focus stage runs

How (as A1111 and ComfyUI merge): W = W₀ + Σ scaleᵢ · ΔWᵢ, computed in fp32 from a backup W₀ of every weight a LoRA
touches (kept on the CPU, as A1111 keeps its), then written into the parameter with `copy_`; removing or changing
the set writes W₀ (+ the new sum) again from the backup -- never a subtraction, so nothing drifts, and the weights
are exactly the loaded ones after the last LoRA is gone. Only weights whose sum changes are rewritten.

Why in place: the fast path's copies follow the parameters' storage. Fused QKV weights are views of one stacked
tensor, so writing into `to_q.weight` writes the stack; the oneDNN-packed copies are keyed by the weight's in-place
version and repack on the next call; the cached cross-attention K/V are recomputed whenever a stage sets its context
(after the switch below); a CUDA graph reads the parameters' memory, which keeps its address. Rebinding `.weight`
instead would leave a captured graph on the old weights (stable-fast's known bug). tests/lora/test_fast.py checks
all of it against the plain path.

Per stage (GBSD): `AppliedLoras` is a `sampling.StageSwitch`; `denoise` calls its `enter(stage)` at every stage
boundary before the stage's conditioning is set: the focus stage gets `loras + focus`, every other stage (layout,
and plain SD's single stage) `loras + layout`. A sweep still shares its layout stage. Stage LoRAs adapt the UNet
only: the prompts are encoded once, before the first stage, with the text encoders of `loras` (their text-encoder
modules are counted in `skipped_text`).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .files import LoraFile, LoraModule
from .targets import LoraTargets, Target, lora_targets

if TYPE_CHECKING:
    from ..bundle import SDBundle
    from ..sampling import Stage

LoraUse = tuple[LoraFile, float]  # a file and its scale ("weight" in A1111's tag)
# The text towers a file's parts name (files.py), for messages
TOWERS = {"te": "SD1/SD2's one text encoder (lora_te_)", "te1": "SDXL's CLIP-L (lora_te1_)",
          "te2": "SDXL's bigG (lora_te2_)", "text_encoder": "a text encoder (text_encoder.)",
          "text_encoder_2": "SDXL's bigG (text_encoder_2.)", "unet": "a UNet"}
SCALE_LIMIT = 10.0  # |scale| beyond this is refused as a typo (A1111's slider goes to ±2; "sliders" use up to ±5)


@dataclass(frozen=True)
class Patch:
    """One module of one file, placed: ΔW(module) · scale added to `target`."""

    target: Target
    module: LoraModule
    scale: float  # the user's scale (module.scale, alpha / r, is applied by delta_weight)
    lora: str  # the file's name, for messages


def delta_weight(module: LoraModule, device: torch.device | str = "cpu") -> Tensor:
    """ΔW = (alpha / r) · up @ down in fp32, shaped [out, in] or [out, in, kh, kw]; with LoCon's Tucker core
    mid [r, r, kh, kw]: ΔW[o, i, h, w] = Σ_{a,b} up[o, a] · mid[a, b, h, w] · down[b, i] (A1111's
    lyco_helpers.rebuild_cp_decomposition)."""
    up = module.up.to(device, torch.float32).flatten(1)  # [out, r]
    down = module.down.to(device, torch.float32)
    if module.mid is not None:
        mid = module.mid.to(device, torch.float32)
        delta = torch.einsum("a b h w, o a, b i -> o i h w", mid, up, down.flatten(1))
    else:
        delta = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return delta * module.scale


def _delta_shape(module: LoraModule) -> tuple[int, ...]:
    kernel = tuple(module.mid.shape[2:]) if module.mid is not None else tuple(module.down.shape[2:])
    return (int(module.up.shape[0]), int(module.down.shape[1]), *kernel)


def _fits(delta: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Equal shapes, or a 1x1 conv against a Linear (SD1's proj_in/out are 1x1 convs, SD2's and SDXL's Linear)."""
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    return delta == target or squeeze(delta) == squeeze(target)


def _hint(lora: LoraFile, targets: LoraTargets) -> str:
    found = lora.family_hint()
    return f" (it looks made for {found.upper()}; this model's cross-attention reads {targets.context_dim}-wide " \
           "context)" if found else ""


def plan_patches(targets: LoraTargets, uses: Sequence[LoraUse], *, unet_only: bool = False) -> tuple[list[Patch], int]:
    """Place every module of every file, or raise ValueError naming what does not fit: a part (text tower) the model
    lacks, modules that match no module of the model (strict, like checkpoint loading), shapes that disagree, a
    weight adapted twice by one file, a scale that is not a finite number within ±SCALE_LIMIT. unet_only: text-encoder
    modules are left out (stage LoRAs); returns (patches, modules left out)."""
    patches: list[Patch] = []
    skipped = 0
    for lora, scale in uses:
        if not isinstance(lora, LoraFile):
            raise ValueError(f"expected (LoraFile, scale) pairs, got a {type(lora).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) <= SCALE_LIMIT:
            raise ValueError(f"LoRA {lora.name}: scale must be a number in [-{SCALE_LIMIT:g}, {SCALE_LIMIT:g}], "
                             f"got {scale!r}")
        where = f"LoRA {lora.path}"
        absent = sorted({m.part for m in lora.modules} - targets.parts)
        if absent:
            has = ", ".join(TOWERS[p] for p in ("te", "te1", "te2") if p in targets.parts) or "no text encoder"
            raise ValueError(f"{where}: has modules for {' and '.join(TOWERS[p] for p in absent)}, which this model "
                             f"does not have (it has {has}): a LoRA for another model family" + _hint(lora, targets))
        unmatched, mismatched, seen = [], [], {}
        for m in lora.modules:
            if unet_only and m.part != "unet":
                skipped += 1
                continue
            target = targets.get(m.part, m.name)
            if target is None:
                unmatched.append(m.source)
            elif not _fits(_delta_shape(m), target.shape):
                mismatched.append(f"{m.source} makes {list(_delta_shape(m))} for {target.name} {list(target.shape)}")
            elif target.name in seen:
                raise ValueError(f"{where}: {m.source} and {seen[target.name]} both adapt {target.name}")
            else:
                seen[target.name] = m.source
                patches.append(Patch(target, m, float(scale), lora.name))
        if unmatched:
            shown = ", ".join(sorted(unmatched)[:3]) + (", ..." if len(unmatched) > 3 else "")
            raise ValueError(f"{where}: {len(unmatched)} of its {len(lora.modules)} modules match no module of this "
                             f"model: {shown}" + _hint(lora, targets))
        if mismatched:
            raise ValueError(f"{where}: {len(mismatched)} module(s) have the wrong shape for this model: "
                             + "; ".join(mismatched[:2]) + (" ..." if len(mismatched) > 2 else "") + _hint(lora, targets))
    return patches, skipped


@dataclass(frozen=True)
class MergeReport:
    modules: int  # LoRA modules in the merged set
    written: int  # weight tensors rewritten by this merge (the others already held the same sum)
    restored: int  # of which back to the original (no LoRA left on them)


class LoraWeights:
    """The LoRA state of one bundle: a CPU backup of every weight a LoRA has touched, and the sum merged on each."""

    def __init__(self, bundle: SDBundle) -> None:
        self.bundle = bundle
        self.targets = lora_targets(bundle.unet, bundle.text_encoder)
        self._backups: dict[tuple[str, str], Tensor] = {}  # (component, param) -> the loaded weight
        self._merged: dict[tuple[str, str], tuple] = {}  # (component, param) -> the contributions merged on it

    def plan(self, uses: Sequence[LoraUse], *, unet_only: bool = False) -> tuple[list[Patch], int]:
        return plan_patches(self.targets, uses, unet_only=unet_only)

    def set(self, uses: Sequence[LoraUse]) -> MergeReport:
        """Merge exactly these (file, scale) pairs, UNet and text encoders (checked whole before anything changes)."""
        return self.merge(self.plan(uses)[0])

    @torch.no_grad()
    def merge(self, patches: Sequence[Patch]) -> MergeReport:
        """Make the weights exactly loaded + Σ patches (a weight no patch names goes back to its loaded value). If a
        result is not finite (a half-precision overflow), the previous state is restored and ValueError raised."""
        previous = dict(self._merged)
        wanted: dict[tuple[str, str], list[Patch]] = defaultdict(list)
        # Summed in one order whatever order the LoRAs were listed in (fp32 addition is not associative): a PNG's
        # A1111 text lists flag LoRAs after the prompt's tags, and must make the same weights again.
        for p in sorted(patches, key=lambda p: (p.lora, p.module.name, p.scale)):
            wanted[(p.target.component, p.target.param)].append(p)
        try:
            written, restored = self._write({k: tuple(v) for k, v in wanted.items()})
        except ValueError:
            self._write({k: v for k, v in previous.items()})
            raise
        return MergeReport(len(patches), written, restored)

    def restore(self) -> None:
        """Every weight back to its loaded value, backups dropped."""
        self.merge([])

    def _write(self, wanted: dict[tuple[str, str], tuple]) -> tuple[int, int]:
        written = restored = 0
        for key in sorted(set(wanted) | set(self._merged)):
            contributions = wanted.get(key, ())
            if self._merged.get(key, ()) == contributions:
                continue
            param = getattr(self.bundle, key[0]).get_parameter(key[1])
            if key not in self._backups:
                self._backups[key] = param.detach().to("cpu", copy=True)
            if contributions:
                value = self._sum(self._backups[key], contributions, param.device).to(param.dtype)
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"merging {', '.join(sorted({p.lora for p in contributions}))} into "
                                     f"{key[0]}.{key[1]} overflows {str(param.dtype).removeprefix('torch.')}")
                param.copy_(value)
                self._merged[key] = contributions
            else:
                param.copy_(self._backups.pop(key))
                del self._merged[key]
                restored += 1
            written += 1
        return written, restored

    @staticmethod
    def _sum(backup: Tensor, contributions: Sequence[Patch], device: torch.device) -> Tensor:
        """W₀ + Σ scale · ΔW in fp32. A plain LoRA goes through one `addmm_` (W += s·(alpha/r) · up @ down, the
        scales folded into the GEMM's alpha): no ΔW tensor and no extra passes over the weight, which is what the
        merge's time is made of (it is memory-bound: an SDXL LoRA touches 2.2 G weights)."""
        weight = backup.to(device, torch.float32, memory_format=torch.contiguous_format, copy=True)
        for p in contributions:
            t, m = p.target, p.module
            view = weight[t.rows[0]:t.rows[1]] if t.rows else weight
            view = view.t() if t.transpose else view  # bigG's text_projection is stored [in, out]
            if m.mid is not None:  # Tucker LoCon: the einsum of delta_weight
                view.add_(delta_weight(m, device).reshape(view.shape), alpha=p.scale)
            else:  # [out, in·kh·kw] += up [out, r] @ down [r, in·kh·kw]: a view of the contiguous weight
                matrix = view if view.ndim == 2 else view.view(view.shape[0], -1)
                matrix.addmm_(m.up.to(device, torch.float32).flatten(1), m.down.to(device, torch.float32).flatten(1),
                              alpha=p.scale * m.scale)
        return weight


class AppliedLoras:
    """LoRAs merged into a bundle for the length of a `with` block, switched per GBSD stage (a sampling.StageSwitch:
    pass it as `switch=` to generate / sweep / denoise when `layout` or `focus` is given). Every file is placed and
    checked before any weight changes; the bundle is byte-identical to before when the block ends."""

    def __init__(self, bundle: SDBundle, loras: Sequence[LoraUse] = (), *, layout: Sequence[LoraUse] = (),
                 focus: Sequence[LoraUse] = ()) -> None:
        self.weights = LoraWeights(bundle)
        both, _ = self.weights.plan(loras)
        layout_only, skipped_layout = self.weights.plan(layout, unet_only=True)
        focus_only, skipped_focus = self.weights.plan(focus, unet_only=True)
        self.sets = {"layout": both + layout_only, "focus": both + focus_only}
        self.skipped_text = skipped_layout + skipped_focus  # text-encoder modules of stage LoRAs, not merged
        self.report: MergeReport | None = None

    def enter(self, stage: Stage) -> None:
        """The StageSwitch seam: the focus stage's set at the focus stage, the layout set at any other."""
        self.report = self.weights.merge(self.sets["focus" if stage.name == "focus" else "layout"])

    def __enter__(self) -> AppliedLoras:
        self.report = self.weights.merge(self.sets["layout"])
        return self

    def __exit__(self, *exc: object) -> None:
        self.weights.restore()


def apply_loras(bundle: SDBundle, loras: Sequence[LoraUse] = (), *, layout: Sequence[LoraUse] = (),
                focus: Sequence[LoraUse] = ()) -> AppliedLoras:
    """`with apply_loras(bundle, [(lora, scale), ...], focus=[...]) as applied:` -- see the module docstring.
    `loras` apply to both stages (UNet and text encoders), `layout` / `focus` to that stage only (UNet)."""
    return AppliedLoras(bundle, loras, layout=layout, focus=focus)

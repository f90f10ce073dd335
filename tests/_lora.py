"""Helpers of the LoRA tests (tests/lora/): synthetic kohya files named after the reference libraries' own modules,
diffusers' count of the layers it adapted, state-dict snapshots."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK, ALPHA = 4, 2.0  # alpha != rank: the files' own scale alpha / r = 0.5 must be applied


def layers(module: torch.nn.Module, convs: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of every Linear (and Conv2d) of a module, in the module's own names."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    return [(n, tuple(m.weight.shape)) for n, m in module.named_modules() if isinstance(m, kinds)]


def hf_text_layers(text_encoder: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """A transformers CLIP text model's Linear layers under the `text_model.` names kohya writes (transformers 5
    builds the model without that level), its projection left out (kohya's networks target attention and MLP)."""
    return [(n if n.startswith("text_model.") else "text_model." + n, s) for n, s in layers(text_encoder, convs=False)
            if "projection" not in n]


def lora_pair(shape: tuple[int, ...], g: torch.Generator, rank: int = RANK, tucker: bool = False,
              std: float = 0.1) -> dict[str, torch.Tensor]:
    """lora_down / lora_up (and lora_mid for a Tucker LoCon) for a weight of `shape` ([out, in] or [out, in, kh, kw]),
    the shapes kohya writes."""
    out, inp, *kernel = shape
    if not kernel:
        return {"lora_down.weight": torch.randn(rank, inp, generator=g) * std,
                "lora_up.weight": torch.randn(out, rank, generator=g) * std}
    if tucker:
        return {"lora_down.weight": torch.randn(rank, inp, 1, 1, generator=g) * std,
                "lora_mid.weight": torch.randn(rank, rank, *kernel, generator=g) * std,
                "lora_up.weight": torch.randn(out, rank, 1, 1, generator=g) * std}
    return {"lora_down.weight": torch.randn(rank, inp, *kernel, generator=g) * std,
            "lora_up.weight": torch.randn(out, rank, 1, 1, generator=g) * std}


def kohya_state_dict(groups: Iterable[tuple[str, Iterable[tuple[str, tuple[int, ...]]]]], seed: int = 0,
                     rank: int = RANK, alpha: float | None = ALPHA, std: float = 0.1) -> dict[str, torch.Tensor]:
    """A kohya LoRA over (prefix, layers) groups: `<prefix><name with . -> _>.lora_down.weight` etc., alpha per
    module (None: no alpha keys, so alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, group in groups:
        for name, shape in group:
            key = prefix + name.replace(".", "_")
            for suffix, t in lora_pair(shape, g, rank, std=std).items():
                sd[f"{key}.{suffix}"] = t
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def write(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    if path.suffix == ".safetensors":
        save_file(sd, str(path), metadata=metadata)
    else:
        torch.save(sd, path)
    return path


def adapted(*models: torch.nn.Module) -> int:
    """How many layers PEFT adapted (diffusers only warns about keys it could not place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for model in models for m in model.modules())


def snapshot(*modules: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def same_state(before: list[dict[str, torch.Tensor]], *modules: torch.nn.Module) -> bool:
    """Whether every tensor of the modules is bit-identical to the snapshot."""
    for snap, m in zip(before, modules, strict=True):
        now = m.state_dict()
        if now.keys() != snap.keys() or not all(torch.equal(now[k], snap[k]) for k in snap):
            return False
    return True

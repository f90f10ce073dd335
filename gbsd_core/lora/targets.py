"""Where each module of a LoRA file goes: the model's weights listed under every name a file may give them.

Parsing a kohya name back (`_` -> `.`) is ambiguous (`to_q`, `proj_in`, `time_emb_proj`), so the lookup goes the
other way, as A1111 and ComfyUI build theirs: every Linear / Conv2d weight of the model is listed under each spelling
a file may use, flattened with "_":

- UNet: its original (CompVis / sgm) name and its diffusers name (`diffusers_layout.unet_diffusers_names`, the one
  conversion seam). SD1/SD2 kohya files use the diffusers names, SDXL kohya files sgm's; either works on any UNet.
- CLIP text towers (SD1, SDXL's CLIP-L): the HF names they already have, with or without `text_model.`.
- OpenCLIP towers (SD2's ViT-H, SDXL's bigG): the HF names a file uses for them (`self_attn.q_proj`, `mlp.fc1`, …:
  `diffusers_layout.OPENCLIP_LAYER` read backwards); q/k/v are row slices [0:d], [d:2d], [2d:3d] of the fused
  `attn.in_proj_weight`, and bigG's `text_projection` [width, embed] is an HF Linear weight transposed.

Which text tower a file's part addresses: `lora_te_` / `text_encoder` the one tower of SD1/SD2; on SDXL `lora_te1_` /
`text_encoder` CLIP-L and `lora_te2_` / `text_encoder_2` bigG (the refiner has bigG alone). Modules of towers the
model lacks mark a LoRA for another family (merge.py says so).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..clip_text import CLIPTextConfig, CLIPTextEncoder
from ..diffusers_layout import OPENCLIP_LAYER, unet_diffusers_names
from ..openclip_text import OpenCLIPTextEncoder
from ..sdxl_conditioner import SDXLConditioner, SDXLConditionerConfig
from ..unet import UNetConfig, UNetModel

UNET_PARTS = ("unet",)
SINGLE_TOWER_PARTS = ("te", "text_encoder")  # kohya's and diffusers' name of SD1/SD2's text encoder
CLIP_L_PARTS = ("te1", "text_encoder")  # SDXL base's embedders.0
BIGG_PARTS = ("te2", "text_encoder_2")  # SDXL's bigG tower (the refiner's embedders.0)


@dataclass(frozen=True)
class Target:
    """One weight a LoRA module can adapt: `component`.`param` of the bundle, or rows of it."""

    component: str  # the bundle attribute: "unet" or "text_encoder"
    param: str  # the parameter's path in that component, e.g. "input_blocks.1.1.proj_in.weight"
    shape: tuple[int, ...]  # the shape ΔW must have (the rows', or the HF Linear's [out, in] when transposed)
    rows: tuple[int, int] | None = None  # OpenCLIP q/k/v: rows [start, stop) of the fused in_proj_weight
    transpose: bool = False  # bigG's text_projection: stored [in, out], x @ P

    @property
    def name(self) -> str:
        rows = f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else ""
        return f"{self.component}.{self.param}{rows}"


@dataclass(frozen=True)
class LoraTargets:
    """The lookup of one model: (file part, flattened module name) -> Target, and facts for messages."""

    by_name: Mapping[tuple[str, str], Target]
    parts: frozenset[str]  # the file parts this model has (see the module docstring)
    context_dim: int  # the UNet's cross-attention width (768 SD1, 1024 SD2, 2048 SDXL base, 1280 refiner)

    def get(self, part: str, name: str) -> Target | None:
        return self.by_name.get((part, name))


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _weights(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every Linear and Conv2d (the fast path's packed subclasses included)."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            yield name, m


def _unet_entries(unet: UNetModel) -> Iterator[tuple[str, Target]]:
    modules = dict(_weights(unet))
    diffusers = unet_diffusers_names(list(modules), unet.config.num_res_blocks)
    for name, m in modules.items():
        target = Target("unet", f"{name}.weight", tuple(m.weight.shape))
        yield _flat(name), target
        if name in diffusers:
            yield _flat(diffusers[name]), target


def _clip_entries(tower: CLIPTextEncoder, prefix: str) -> Iterator[tuple[str, Target]]:
    for name, m in _weights(tower):
        hf = name.removeprefix("transformer.")  # text_model.encoder.layers.N.self_attn.q_proj
        target = Target("text_encoder", f"{prefix}{name}.weight", tuple(m.weight.shape))
        yield _flat(hf), target
        yield _flat(hf.removeprefix("text_model.")), target


def _openclip_entries(tower: OpenCLIPTextEncoder, prefix: str) -> Iterator[tuple[str, Target]]:
    hf_of = {openclip: hf for hf, openclip in OPENCLIP_LAYER.items()}  # attn.out_proj -> self_attn.out_proj, ...
    width = tower.config.width
    entries: list[tuple[str, Target]] = []
    for n, block in enumerate(tower.model.transformer.resblocks):
        here = f"{prefix}model.transformer.resblocks.{n}."
        for i, which in enumerate("qkv"):  # nn.MultiheadAttention's in_proj is [W_q; W_k; W_v]
            entries.append((f"encoder.layers.{n}.self_attn.{which}_proj",
                            Target("text_encoder", here + "attn.in_proj_weight", (width, width),
                                   rows=(i * width, (i + 1) * width))))
        for name, m in _weights(block):
            if name in hf_of:
                entries.append((f"encoder.layers.{n}.{hf_of[name]}",
                                Target("text_encoder", f"{here}{name}.weight", tuple(m.weight.shape))))
    projection = getattr(tower.model, "text_projection", None)
    if projection is not None:  # HF CLIPTextModelWithProjection's Linear weight is [embed, width]
        entries.append(("text_projection", Target("text_encoder", prefix + "model.text_projection",
                                                  tuple(projection.shape[::-1]), transpose=True)))
    for hf, target in entries:
        yield _flat(hf), target
        if hf != "text_projection":
            yield _flat("text_model." + hf), target


def _tower_entries(tower: nn.Module, prefix: str) -> Iterator[tuple[str, Target]]:
    if isinstance(tower, CLIPTextEncoder):
        return _clip_entries(tower, prefix)
    if isinstance(tower, OpenCLIPTextEncoder):
        return _openclip_entries(tower, prefix)
    raise TypeError(f"no LoRA lookup for a {type(tower).__name__} text encoder")


def lora_targets(unet: UNetModel, text_encoder: nn.Module | None) -> LoraTargets:
    """The lookup for a model's UNet and text encoder (real or on the meta device: only names and shapes are read)."""
    table: dict[tuple[str, str], Target] = {}
    for name, target in _unet_entries(unet):
        table[("unet", name)] = target
    towers: list[tuple[tuple[str, ...], nn.Module, str]] = []
    if isinstance(text_encoder, SDXLConditioner):
        for i, tower in enumerate(text_encoder.embedders):
            parts = CLIP_L_PARTS if isinstance(tower, CLIPTextEncoder) else BIGG_PARTS
            towers.append((parts, tower, f"embedders.{i}."))
    elif text_encoder is not None:
        towers.append((SINGLE_TOWER_PARTS, text_encoder, ""))
    for parts, tower, prefix in towers:
        for name, target in _tower_entries(tower, prefix):
            for part in parts:
                table[(part, name)] = target
    parts = frozenset(UNET_PARTS + tuple(p for parts, _, _ in towers for p in parts))
    return LoraTargets(table, parts, unet.config.context_dim)


def lora_targets_of_configs(unet: UNetConfig, text: object) -> LoraTargets:
    """The lookup of a model described by its configs (a checkpoint inspected, not loaded): the networks are built
    on the meta device, which holds names and shapes and no memory."""
    with torch.device("meta"):
        text_encoder = (SDXLConditioner(text) if isinstance(text, SDXLConditionerConfig)
                        else CLIPTextEncoder(text) if isinstance(text, CLIPTextConfig) else OpenCLIPTextEncoder(text))
        return lora_targets(UNetModel(unet), text_encoder)

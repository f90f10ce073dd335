"""The one conversion seam: diffusers-layout names -> original (CompVis / Stability) names; the configs are
diffusers_configs.py's.

Everything in gbsd speaks the original names; a diffusers folder is translated *into* them here, once, on load. The
table is declared as data (rename dicts) plus the block-index arithmetic of the UNet/VAE level loops, both read off
the keys themselves, so tiny test models and finetunes with other depths convert too. Diffusers ships only the
opposite direction (`diffusers/loaders/single_file_utils.py`: `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`); tests check this table against it.

Each `*_plan(keys)` returns {original_key: (diffusers_keys, op)} and `apply_plan` executes it:
- "copy": the tensor as is;
- "conv1x1": a Linear weight [C, C] becomes a 1x1 conv weight [C, C, 1, 1] (VAE mid-block attention: CompVis
  `AttnBlock` uses Conv2d q/k/v/proj_out, diffusers `Attention` uses Linear);
- "cat": q, k, v Linear weights/biases concatenated into one fused `in_proj` (OpenCLIP uses nn.MultiheadAttention);
- "transpose": a Linear weight [out, in] becomes a matrix applied as x @ P [in, out] (OpenCLIP's `text_projection`).

`SD_PARTS`, `SDXL_BASE_PARTS` and `SDXL_REFINER_PARTS` declare, per component folder of a pipeline, where its keys go
in the original layout, its weight files, its config translation (each folder's config.json, checked strictly by
diffusers_configs.py) and its key plan; more components are more rows. SDXL's two text towers are the same tables as
SD1's CLIP and SD2's OpenCLIP, placed under sgm's `conditioner.embedders.N.`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

import torch

from .diffusers_configs import (
    bigg_config,
    clip_l_config,
    text_encoder_config,
    unet_config,
    vae_config,
)
from .openclip_text import OpenCLIPTextConfig

Op = Literal["copy", "conv1x1", "cat", "transpose"]
Plan = dict[str, tuple[tuple[str, ...], Op]]

# --- UNet ---------------------------------------------------------------------------------------------------------
# Top-level modules of openaimodel.UNetModel (index = position in its nn.Sequential, SiLU slots included).
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL: diffusers' "text_time" TimestepEmbedding on [pooled text ; size embeddings] is sgm's label_emb
    # (num_classes: sequential): label_emb.0 = Sequential(Linear, SiLU, Linear)
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# diffusers ResnetBlock2D → openaimodel.ResBlock (in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv]).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers Transformer2DModel and CompVis SpatialTransformer share every inner name (norm, proj_in,
# transformer_blocks.N.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}, proj_out): no renames needed.

# --- VAE ----------------------------------------------------------------------------------------------------------
VAE_TOP = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
# Mid-block attention; old diffusers (< ~0.14) wrote query/key/value/proj_attn, current writes to_q/to_k/to_v/to_out.0.
VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q", "query": "q",
    "to_k": "k", "key": "k",
    "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}

# --- Text encoders --------------------------------------------------------------------------------------------------
# SD2's diffusers text_encoder is a transformers CLIPTextModel holding the first 23 of OpenCLIP ViT-H's 24 layers
# (diffusers' convert_open_clip_checkpoint drops the last one because SD2 reads the penultimate layer).
OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "model.token_embedding.weight",
    "embeddings.position_embedding.weight": "model.positional_embedding",
    "final_layer_norm.weight": "model.ln_final.weight",
    "final_layer_norm.bias": "model.ln_final.bias",
}


def _indices(keys: list[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over `keys`."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _rename_first(suffix: str, table: dict[str, str]) -> str:
    """Rename the leading dotted component(s) of `suffix` by `table` (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if suffix == old or suffix.startswith(old + "."):
            return table[old] + suffix[len(old):]
    return suffix


def unet_block_prefixes(keys: list[str]) -> dict[str, str]:
    """diffusers block prefix → original block prefix, by the level loop of openaimodel.UNetModel.

    input_blocks: 0 is conv_in, then per level `num_res_blocks` x [ResBlock, (SpatialTransformer)] followed by a
    Downsample on all but the last level. output_blocks: per level (lowest resolution first, like diffusers'
    up_blocks) `num_res_blocks + 1` x [ResBlock, (SpatialTransformer), (Upsample on the level's last block)].
    """
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    nrb = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    out: dict[str, str] = {}
    for lvl in levels:
        for j in range(nrb):
            i = 1 + lvl * (nrb + 1) + j
            out[f"down_blocks.{lvl}.resnets.{j}"] = f"input_blocks.{i}.0"
            out[f"down_blocks.{lvl}.attentions.{j}"] = f"input_blocks.{i}.1"
        out[f"down_blocks.{lvl}.downsamplers.0.conv"] = f"input_blocks.{1 + lvl * (nrb + 1) + nrb}.0.op"
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    for lvl in levels:  # up_blocks are as many as down_blocks
        has_attn = any(k.startswith(f"up_blocks.{lvl}.attentions.") for k in keys)
        for j in range(nrb + 1):
            i = lvl * (nrb + 1) + j
            out[f"up_blocks.{lvl}.resnets.{j}"] = f"output_blocks.{i}.0"
            out[f"up_blocks.{lvl}.attentions.{j}"] = f"output_blocks.{i}.1"
        last = lvl * (nrb + 1) + nrb
        out[f"up_blocks.{lvl}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if has_attn else 1}.conv"
    return out


def unet_plan(keys: list[str]) -> Plan:
    """Plan for a diffusers UNet2DConditionModel state dict → openaimodel.UNetModel names."""
    blocks = unet_block_prefixes(keys)
    tops = {**UNET_TOP, **blocks}
    plan: Plan = {}
    for key in keys:
        new = None
        for old in sorted(tops, key=len, reverse=True):
            if key.startswith(old + "."):
                suffix = key[len(old) + 1:]
                if ".resnets." in old:
                    suffix = _rename_first(suffix, UNET_RESNET)
                new = f"{tops[old]}.{suffix}"
                break
        if new is None:
            raise KeyError(f"diffusers UNet key {key!r} has no original counterpart")
        plan[new] = ((key,), "copy")
    return plan


def unet_diffusers_names(names: list[str], num_res_blocks: int) -> dict[str, str]:
    """The table read backwards, for lookups by either spelling: original UNet module names (or keys) -> diffusers
    names, e.g. `input_blocks.1.1.proj_in` -> `down_blocks.0.attentions.0.proj_in` (LoRA files name modules in
    both). The level loop is `unet_block_prefixes`' own, fed the diffusers blocks the original names imply; names
    that have no diffusers counterpart (none in a UNet this module builds) are left out."""
    outs = _indices(names, r"output_blocks\.(\d+)\.")
    levels = (max(outs) + 1) // (num_res_blocks + 1) if outs else 0
    blocks = [f"down_blocks.{lvl}.resnets.{j}.x" for lvl in range(levels) for j in range(num_res_blocks)]
    # an up level has attention when its first output block holds a SpatialTransformer at index 1
    blocks += [f"up_blocks.{lvl}.attentions.0.x" for lvl in range(levels)
               if any(n.startswith(f"output_blocks.{lvl * (num_res_blocks + 1)}.1.") for n in names)]
    to_diffusers = {orig: diff for diff, orig in {**UNET_TOP, **unet_block_prefixes(blocks)}.items()}
    resnet_back = {orig: diff for diff, orig in UNET_RESNET.items()}
    out: dict[str, str] = {}
    for name in names:
        for orig in sorted(to_diffusers, key=len, reverse=True):
            if name == orig or name.startswith(orig + "."):
                diff, suffix = to_diffusers[orig], name[len(orig) + 1:]
                if ".resnets." in diff:
                    suffix = _rename_first(suffix, resnet_back)
                out[name] = f"{diff}.{suffix}" if suffix else diff
                break
    return out


def vae_plan(keys: list[str]) -> Plan:
    """Plan for a diffusers AutoencoderKL state dict → CompVis AutoencoderKL names.

    Encoder `down_blocks.i` is `down.i`; decoder `up_blocks.i` is `up.(L-1-i)` because CompVis stores the decoder's
    `up` list with `up.0` at full resolution and walks it backwards, while diffusers stores it in execution order.
    """
    n_up = len(_indices(keys, r"decoder\.up_blocks\.(\d+)\."))
    plan: Plan = {}
    for key in keys:
        op: Op = "copy"
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)",
                     key)
        mid = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            side, kind, lvl, block, j, suffix = m.groups()
            lvl_new = int(lvl) if kind == "down" else n_up - 1 - int(lvl)
            if block.startswith("resnets"):
                new = f"{side}.{kind}.{lvl_new}.block.{j}.{_rename_first(suffix, VAE_RESNET)}"
            else:
                new = f"{side}.{kind}.{lvl_new}.{'downsample' if kind == 'down' else 'upsample'}.{suffix}"
        elif mid:
            side, kind, j, suffix = mid.groups()
            if kind == "resnets":
                new = f"{side}.mid.block_{int(j) + 1}.{suffix}"
            else:
                suffix = _rename_first(suffix, VAE_ATTN)
                new = f"{side}.mid.attn_1.{suffix}"
                op = "conv1x1" if suffix.endswith("weight") and not suffix.startswith("norm") else "copy"
        else:
            new = _rename_first(key, VAE_TOP)  # conv_in/conv_out/quant_conv/post_quant_conv keep their names
        plan[new] = ((key,), op)
    return plan


def clip_plan(keys: list[str]) -> Plan:
    """SD1: transformers CLIPTextModel → `transformer.text_model.*` (CompVis FrozenCLIPEmbedder holds the HF model
    as `.transformer`). transformers >= 5 saves without the `text_model.` level, older versions with it."""
    plan: Plan = {}
    for key in keys:
        if key.endswith("embeddings.position_ids"):
            continue  # a buffer of arange(77), see loading.DROPPABLE
        inner = key if key.startswith("text_model.") else "text_model." + key
        plan["transformer." + inner] = ((key,), "copy")
    return plan


def openclip_plan(keys: list[str]) -> Plan:
    """SD2: the 23-layer transformers CLIPTextModel of a diffusers folder → OpenCLIP names (`model.*`). SDXL: the
    32-layer CLIPTextModelWithProjection of `text_encoder_2` (bigG), whose `text_projection` is a bias-free Linear:
    its weight [embed, width] is OpenCLIP's `text_projection` [width, embed] transposed (x @ P = Linear(x))."""
    plan: Plan = {}
    for key in keys:
        inner = key.removeprefix("text_model.")
        if inner.endswith("embeddings.position_ids"):
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", inner)
        if inner in OPENCLIP_TOP:
            plan[OPENCLIP_TOP[inner]] = ((key,), "copy")
        elif inner == "text_projection.weight":
            plan["model.text_projection"] = ((key,), "transpose")
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            n, _, kind = m.groups()
            # nn.MultiheadAttention's in_proj is [q; k; v] stacked along the output dim.
            src = tuple(f"{key[:len(key) - len(inner)]}encoder.layers.{n}.self_attn.{p}_proj.{kind}" for p in "qkv")
            plan[f"model.transformer.resblocks.{n}.attn.in_proj_{kind}"] = (src, "cat")
        elif m and m.group(2) in OPENCLIP_LAYER:
            n, name, kind = m.groups()
            plan[f"model.transformer.resblocks.{n}.{OPENCLIP_LAYER[name]}.{kind}"] = ((key,), "copy")
        else:
            raise KeyError(f"diffusers text-encoder key {key!r} has no OpenCLIP counterpart")
    return plan


def apply_plan(plan: Plan, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Execute a plan; every key of `sd` must be consumed (the plans are built from its keys)."""
    out: dict[str, torch.Tensor] = {}
    for new, (src, op) in plan.items():
        if op == "cat":
            out[new] = torch.cat([sd[k] for k in src], dim=0)
        elif op == "conv1x1":
            t = sd[src[0]]
            out[new] = t[:, :, None, None] if t.ndim == 2 else t
        elif op == "transpose":
            out[new] = sd[src[0]].t().contiguous()
        else:
            out[new] = sd[src[0]]
    return out


def text_encoder_plan(sd: Mapping[str, torch.Tensor], config: object | None) -> Plan:
    """The CLIP or the OpenCLIP plan, as the config says; without one, OpenCLIP-H's width 1024 means SD2."""
    if config is None:
        tok = [t for k, t in sd.items() if k.endswith("token_embedding.weight")]
        openclip = bool(tok) and tok[0].ndim == 2 and tok[0].shape[1] == 1024
    else:
        openclip = isinstance(config, OpenCLIPTextConfig)
    return openclip_plan(list(sd)) if openclip else clip_plan(list(sd))


# ================================================================================================================
# The component folders of a diffusers pipeline
# ================================================================================================================
@dataclass(frozen=True)
class DiffusersPart:
    """One component folder: where its keys go in the original single-file layout (`prefix`), its weight files (in
    order of preference, full precision first), its config.json's translation (diffusers_configs.py) and its key
    plan (from the tensors and the translated config, None without a config.json)."""

    prefix: str
    weights: tuple[str, ...]
    config: Callable[[Mapping[str, Any]], object]
    plan: Callable[[Mapping[str, torch.Tensor], object | None], Plan]


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                      "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")

# The prefixes are the original files' subtrees (loading.PREFIXES, SDXL_PREFIXES): LatentDiffusion's
# model.diffusion_model / first_stage_model / cond_stage_model, and sgm's conditioner.embedders.N for SDXL's towers.
_UNET = DiffusersPart("model.diffusion_model.", _DIFFUSERS_WEIGHTS, unet_config, lambda sd, cfg: unet_plan(list(sd)))
_VAE = DiffusersPart("first_stage_model.", _DIFFUSERS_WEIGHTS, vae_config, lambda sd, cfg: vae_plan(list(sd)))
_CLIP_L = DiffusersPart("conditioner.embedders.0.", _TRANSFORMERS_WEIGHTS, clip_l_config,
                        lambda sd, cfg: clip_plan(list(sd)))
_BIGG = DiffusersPart("conditioner.embedders.1.", _TRANSFORMERS_WEIGHTS, bigg_config,
                      lambda sd, cfg: openclip_plan(list(sd)))

# Folder name -> part, per kind of pipeline. Which kind a folder is follows from its text encoders (`pipeline_parts`):
# StableDiffusionPipeline (SD1/SD2) has `text_encoder`; StableDiffusionXLPipeline has `text_encoder` (CLIP-L) and
# `text_encoder_2` (bigG), the refiner's StableDiffusionXLImg2ImgPipeline `text_encoder_2` alone, which sgm keeps as
# its conditioner's first embedder.
SD_PARTS: Mapping[str, DiffusersPart] = MappingProxyType({
    "unet": _UNET, "vae": _VAE,
    "text_encoder": DiffusersPart("cond_stage_model.", _TRANSFORMERS_WEIGHTS, text_encoder_config, text_encoder_plan),
})
SDXL_BASE_PARTS: Mapping[str, DiffusersPart] = MappingProxyType({
    "unet": _UNET, "vae": _VAE, "text_encoder": _CLIP_L, "text_encoder_2": _BIGG,
})
SDXL_REFINER_PARTS: Mapping[str, DiffusersPart] = MappingProxyType({
    "unet": _UNET, "vae": _VAE, "text_encoder_2": replace(_BIGG, prefix="conditioner.embedders.0."),
})


def pipeline_parts(has_folder: Callable[[str], bool]) -> Mapping[str, DiffusersPart]:
    """The component folders of a pipeline, told apart by its text encoders (`has_folder(name)`: the folder holds
    one of the part's weight files): `text_encoder_2` makes it SDXL, the base with `text_encoder`, else the refiner."""
    if has_folder("text_encoder_2"):
        return SDXL_BASE_PARTS if has_folder("text_encoder") else SDXL_REFINER_PARTS
    return SD_PARTS

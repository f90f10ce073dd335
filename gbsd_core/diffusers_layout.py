"""The one conversion seam: diffusers-layout names → original (CompVis / Stability) checkpoint names.

Everything in gbsd speaks the original names; a diffusers folder is translated *into* them here, once, on load. The
table is declared as data (rename dicts) plus the block-index arithmetic of the UNet/VAE level loops, both read off
the keys themselves, so tiny test models and finetunes with other depths convert too. Diffusers ships only the
opposite direction (`diffusers/loaders/single_file_utils.py`: `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`); tests check this table against it.

Each `*_plan(keys)` returns {original_key: (diffusers_keys, op)} and `apply_plan` executes it:
- "copy": the tensor as is;
- "conv1x1": a Linear weight [C, C] becomes a 1x1 conv weight [C, C, 1, 1] (VAE mid-block attention: CompVis
  `AttnBlock` uses Conv2d q/k/v/proj_out, diffusers `Attention` uses Linear);
- "cat": q, k, v Linear weights/biases concatenated into one fused `in_proj` (OpenCLIP uses nn.MultiheadAttention).
"""
from __future__ import annotations

import re
from typing import Literal

import torch

Op = Literal["copy", "conv1x1", "cat"]
Plan = dict[str, tuple[tuple[str, ...], Op]]

# --- UNet ---------------------------------------------------------------------------------------------------------
# Top-level modules of openaimodel.UNetModel (index = position in its nn.Sequential, SiLU slots included).
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
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
    """SD2: the 23-layer transformers CLIPTextModel of a diffusers folder → OpenCLIP names (`model.*`)."""
    plan: Plan = {}
    for key in keys:
        inner = key.removeprefix("text_model.")
        if inner.endswith("embeddings.position_ids"):
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", inner)
        if inner in OPENCLIP_TOP:
            plan[OPENCLIP_TOP[inner]] = ((key,), "copy")
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
        else:
            out[new] = sd[src[0]]
    return out

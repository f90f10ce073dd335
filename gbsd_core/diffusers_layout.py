"""The one conversion seam: diffusers-layout names and configs → original (CompVis / Stability) names and our configs.

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

Each component folder's config.json becomes our config (`unet_config`, `vae_config`, `text_encoder_config`): what
shapes cannot say (head counts, the MLP width of small towers, the VAE's scaling factor) comes from there, and every
option our modules do not have must keep SD's value, or the folder is refused naming the option. `DIFFUSERS_PARTS`
declares, per component folder, its weight files, its config translation and its key plan; more components are
more rows.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch

from .clip_text import CLIPTextConfig
from .openclip_text import OpenCLIPTextConfig
from .unet import UNetConfig
from .vae import VAEConfig

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


# ================================================================================================================
# Configs: a component's config.json -> our config
# ================================================================================================================
# Options of diffusers' UNet2DConditionModel that gbsd's UNet (openaimodel's, as SD uses it) does not have: a folder
# may state them only with SD's value (absent means diffusers' default, which is SD's).
UNET_FIXED: Mapping[str, Any] = MappingProxyType({
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "cross_attention_norm": None, "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False, "reverse_transformer_layers_per_block": None,
})
# AutoencoderKL options with no counterpart in CompVis' KL autoencoder (SD3/Flux VAEs set the shift and drop the
# quant convs).
VAE_FIXED: Mapping[str, Any] = MappingProxyType({
    "norm_num_groups": 32, "act_fn": "silu", "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True, "latents_mean": None, "latents_std": None,
})
TEXT_FIXED: Mapping[str, Any] = MappingProxyType({"layer_norm_eps": 1e-5})


def _fixed(cfg: Mapping[str, Any], table: Mapping[str, Any]) -> None:
    for key, want in table.items():
        if key in cfg and cfg[key] != want:
            raise ValueError(f"{key} is {cfg[key]!r}; gbsd builds what SD has ({want!r})")


def _int(cfg: Mapping[str, Any], key: str, default: int, lo: int = 1) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
    return v


def _ints(cfg: Mapping[str, Any], key: str, default: Any, levels: int | None = None) -> tuple[int, ...]:
    """An int or a list of ints (one per level): a tuple, `levels` long when given."""
    v = cfg.get(key, default)
    if levels is not None and isinstance(v, int) and not isinstance(v, bool):
        v = [v] * levels
    if (not isinstance(v, (list, tuple)) or not v or levels is not None and len(v) != levels
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)):
        n = f"{levels} " if levels is not None else ""
        raise ValueError(f"{key} must be a list of {n}positive integers, got {v!r}")
    return tuple(v)


def _strs(cfg: Mapping[str, Any], key: str, default: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    v = cfg.get(key, default)
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{key} must be a list of block names, got {v!r}")
    bad = [x for x in v if x not in allowed]
    if bad:
        raise ValueError(f"{key} has {bad[0]!r}; gbsd builds {' and '.join(allowed)} blocks")
    return tuple(v)


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


def _same(key: str, values: tuple[int, ...]) -> int:
    if len(set(values)) != 1:
        raise ValueError(f"{key} {list(values)} differs between levels; gbsd's UNet uses one value for all")
    return values[0]


def unet_config(cfg: Mapping[str, Any]) -> UNetConfig:
    """diffusers UNet2DConditionModel config.json -> UNetConfig (defaults: diffusers')."""
    _fixed(cfg, UNET_FIXED)
    only_cross = cfg.get("only_cross_attention", False)
    if only_cross is True or isinstance(only_cross, list) and any(only_cross):
        raise ValueError(f"only_cross_attention is {only_cross!r}; SD's transformer blocks have self-attention")
    channels = _ints(cfg, "block_out_channels", (320, 640, 1280, 1280))
    levels = len(channels)
    down = _strs(cfg, "down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 ("CrossAttnDownBlock2D", "DownBlock2D"))
    up = _strs(cfg, "up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, ("CrossAttnUpBlock2D", "UpBlock2D"))
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    mirrored = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    if len(down) != levels or up != mirrored:
        raise ValueError(f"down_block_types {list(down)} / up_block_types {list(up)} do not match the "
                         f"{levels} levels of block_out_channels mirrored (expected up {list(mirrored)})")
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ValueError(f"block_out_channels {list(channels)} are not multiples of the first")
    # diffusers' attention_head_dim is a head *count* (a long-standing misnomer); num_attention_heads, when set,
    # is the same thing under its right name. Per level; the mid block uses the last level's.
    heads_key = "num_attention_heads" if cfg.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _ints(cfg, heads_key, 8, levels)
    used = [i for i in range(levels) if attn[i]] + [levels - 1]
    if any(channels[i] % heads[i] for i in used):
        raise ValueError(f"{heads_key} {list(heads)} does not divide block_out_channels {list(channels)}")
    counts, widths = {heads[i] for i in used}, {channels[i] // heads[i] for i in used}
    if len(counts) == 1:
        num_heads, num_head_channels = counts.pop(), -1
    elif len(widths) == 1:
        num_heads, num_head_channels = -1, widths.pop()
    else:
        raise ValueError(f"{heads_key} {list(heads)}: head counts that are neither the same on every level nor of "
                         "the same width are not what SD's UNet builds")
    depths = _ints(cfg, "transformer_layers_per_block", 1, levels)
    return UNetConfig(
        in_channels=_int(cfg, "in_channels", 4), out_channels=_int(cfg, "out_channels", 4), model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=_same("layers_per_block", _ints(cfg, "layers_per_block", 2, levels)),
        attention_resolutions=tuple(2**i for i in range(levels) if attn[i]),
        num_heads=num_heads, num_head_channels=num_head_channels,
        context_dim=_int(cfg, "cross_attention_dim", 1280),
        use_linear_in_transformer=_flag(cfg, "use_linear_projection", False),
        transformer_depth=depths,  # per level (the mid block takes the last level's, as in diffusers)
        upcast_attention=_flag(cfg, "upcast_attention", False),
    )


def unet_sample_size(cfg: Mapping[str, Any]) -> int | None:
    """The latent side the UNet was trained at (diffusers' default image size is this x the VAE factor), if stated."""
    v = cfg.get("sample_size")
    if isinstance(v, list) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def vae_config(cfg: Mapping[str, Any]) -> VAEConfig:
    """diffusers AutoencoderKL config.json -> VAEConfig, the scaling factor included (defaults: diffusers')."""
    _fixed(cfg, VAE_FIXED)
    channels = _ints(cfg, "block_out_channels", (64,))
    down = _strs(cfg, "down_block_types", ("DownEncoderBlock2D",), ("DownEncoderBlock2D",))
    up = _strs(cfg, "up_block_types", ("UpDecoderBlock2D",), ("UpDecoderBlock2D",))
    if len(down) != len(channels) or len(up) != len(channels):
        raise ValueError(f"down_block_types / up_block_types must have one block per block_out_channels entry "
                         f"({len(channels)})")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {list(channels)} are not multiples of the first")
    scale = cfg.get("scaling_factor", 0.18215)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scaling_factor must be a positive number, got {scale!r}")
    latent = _int(cfg, "latent_channels", 4)
    return VAEConfig(ch=ch, ch_mult=tuple(c // ch for c in channels), num_res_blocks=_int(cfg, "layers_per_block", 1),
                     z_channels=latent, embed_dim=latent, in_channels=_int(cfg, "in_channels", 3),
                     out_ch=_int(cfg, "out_channels", 3), scale_factor=float(scale))


def text_encoder_config(cfg: Mapping[str, Any]) -> CLIPTextConfig | OpenCLIPTextConfig:
    """transformers CLIPTextConfig (config.json) -> our CLIP (quick_gelu: SD1) or OpenCLIP (gelu: SD2) config.

    SD2's folder holds OpenCLIP-H converted to a CLIPTextModel, its last block already dropped, so all of it runs
    (penultimate=False) and it has no projection. Defaults: transformers'.
    """
    _fixed(cfg, TEXT_FIXED)
    width, heads = _int(cfg, "hidden_size", 512), _int(cfg, "num_attention_heads", 8)
    if width % heads:
        raise ValueError(f"hidden_size {width} is not divisible by num_attention_heads {heads}")
    common = dict(vocab_size=_int(cfg, "vocab_size", 49408), width=width, layers=_int(cfg, "num_hidden_layers", 12),
                  heads=heads, context_length=_int(cfg, "max_position_embeddings", 77),
                  mlp_ratio=_int(cfg, "intermediate_size", 2048) / width)
    act = cfg.get("hidden_act", "quick_gelu")
    if act == "quick_gelu":
        return CLIPTextConfig(**common)
    if act == "gelu":
        return OpenCLIPTextConfig(**common, penultimate=False, has_projection=False)
    raise ValueError(f"hidden_act {act!r} is not one of SD's text encoders (quick_gelu: SD1's CLIP, gelu: SD2's "
                     "OpenCLIP)")


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
    """One component folder: its weight files (in order of preference, full precision first), its config.json's
    translation, and its key plan (from the tensors and the translated config, None without a config.json)."""

    weights: tuple[str, ...]
    config: Callable[[Mapping[str, Any]], object]
    plan: Callable[[Mapping[str, torch.Tensor], object | None], Plan]


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                      "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")

# Folder name -> part; the names are also the original-layout parts (loading.PREFIXES).
DIFFUSERS_PARTS: Mapping[str, DiffusersPart] = MappingProxyType({
    "unet": DiffusersPart(_DIFFUSERS_WEIGHTS, unet_config, lambda sd, cfg: unet_plan(list(sd))),
    "vae": DiffusersPart(_DIFFUSERS_WEIGHTS, vae_config, lambda sd, cfg: vae_plan(list(sd))),
    "text_encoder": DiffusersPart(_TRANSFORMERS_WEIGHTS, text_encoder_config, text_encoder_plan),
})

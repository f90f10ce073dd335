"""Every count a config builds, compared with the block indices the weight keys hold, before any module is built.

Building a module takes time per block, even on the meta device: a diffusers config.json that says
`layers_per_block: 1000000` (or a single file with one stray key `...encoder.layers.1000000.…`, from which the shapes
infer a million layers) would be built layer by layer for hours before `loading.check_strict` could compare it with
the weights. So the counts -- levels, ResBlocks per level, transformer blocks per attention site, text layers -- are
checked first, against the indices present in the keys (original names, prefix stripped), which must be exactly
0 … N−1. Every other number a config carries (widths, head counts, vocabulary, positions) costs nothing to build on the
meta device and is compared with the tensors' shapes by `check_strict`; a width too large to build at all is refused
there too (loading._meta_module).

Where two counts multiply (levels × blocks per level), the outer one is checked first, so no loop here runs over a
count the keys have not confirmed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from .clip_text import CLIPTextConfig
from .openclip_text import OpenCLIPTextConfig
from .sdxl_conditioner import SDXLConditionerConfig
from .unet import UNetConfig
from .vae import VAEConfig


def indices(keys: Mapping[str, Tensor], prefix: str) -> list[int]:
    """The distinct N of the keys `prefix.N.…`, sorted."""
    rx = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _held(present: list[int]) -> str:
    if not present:
        return "none"
    if present == list(range(len(present))):
        return f"{len(present)}"
    shown = ", ".join(map(str, present[:6])) + (", ..." if len(present) > 6 else "")
    return f"indices {shown} (not 0 to N-1)"


def _expect(count: int, present: list[int], what: str, field: str, where: str) -> None:
    """ValueError unless the keys under `where` hold exactly the indices 0 … count−1."""
    if present != list(range(count)):
        raise ValueError(f"builds {count} {what} ({field}), but its weights hold {_held(present)} under {where}")


def check_block_counts(config: object, sd: Mapping[str, Tensor]) -> None:
    """ValueError ("builds N …, but its weights hold M …") when a count of `config` (a UNet, VAE, text-encoder or
    SDXL conditioner config) differs from the block indices of `sd` (that part's tensors, original names)."""
    if isinstance(config, UNetConfig):
        _unet(config, sd)
    elif isinstance(config, VAEConfig):
        _vae(config, sd)
    elif isinstance(config, SDXLConditionerConfig):
        towers = [t for t in (config.clip, config.openclip) if t is not None]
        for i, tower in enumerate(towers):
            _text(tower, {k[len(f"embedders.{i}."):]: t for k, t in sd.items() if k.startswith(f"embedders.{i}.")},
                  f"embedders.{i}.")
    elif isinstance(config, (CLIPTextConfig, OpenCLIPTextConfig)):
        _text(config, sd)
    else:
        raise TypeError(f"no block counts known for {type(config).__name__}")


def _text(config: CLIPTextConfig | OpenCLIPTextConfig, sd: Mapping[str, Tensor], prefix: str = "") -> None:
    where = ("transformer.text_model.encoder.layers" if isinstance(config, CLIPTextConfig)
             else "model.transformer.resblocks")
    _expect(config.layers, indices(sd, where), "transformer layers", "layers; transformers: num_hidden_layers",
            prefix + where)


def _vae(config: VAEConfig, sd: Mapping[str, Tensor]) -> None:
    levels = len(config.ch_mult)
    for side in ("encoder.down", "decoder.up"):
        _expect(levels, indices(sd, side), "levels", "ch_mult; diffusers: block_out_channels", side)
    for i in range(levels):
        _expect(config.num_res_blocks, indices(sd, f"encoder.down.{i}.block"), "ResnetBlocks per encoder level",
                "num_res_blocks; diffusers: layers_per_block", f"encoder.down.{i}.block")
        _expect(config.num_res_blocks + 1, indices(sd, f"decoder.up.{i}.block"), "ResnetBlocks per decoder level",
                "num_res_blocks + 1; diffusers: layers_per_block + 1", f"decoder.up.{i}.block")


def _unet(config: UNetConfig, sd: Mapping[str, Tensor]) -> None:
    """The level loop of unet.UNetModel: input_blocks = [conv_in] + per level R × [Res (+ ST)] + a Downsample on all
    but the last level; output_blocks = per level R + 1 × [Res (+ ST) (+ Upsample)]; a SpatialTransformer (ST) of
    depth(level) transformer blocks where the level's ds is in attention_resolutions, and in the middle block."""
    levels, res = len(config.channel_mult), config.num_res_blocks
    inputs = indices(sd, "input_blocks")
    downsamplers = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in sd]
    if len(downsamplers) != levels - 1:
        raise ValueError(f"builds {levels} levels (channel_mult; diffusers: block_out_channels), but its weights hold "
                         f"{len(downsamplers) + 1} (a Downsample after each level but the last: "
                         f"{_held(downsamplers)} under input_blocks)")
    field = "num_res_blocks; diffusers: layers_per_block"
    _expect(1 + levels * res + levels - 1, inputs, f"input blocks, {res} ResBlocks per level", field, "input_blocks")
    _expect(levels * (res + 1), indices(sd, "output_blocks"), f"output blocks, {res + 1} ResBlocks per level", field,
            "output_blocks")
    # Every SpatialTransformer the config builds, with its level (whose depth it has).
    sites = {"middle_block.1": levels - 1}
    for level in range(levels):
        if 2**level in config.attention_resolutions:
            sites.update({f"input_blocks.{1 + level * (res + 1) + j}.1": level for j in range(res)})
            first_out = (levels - 1 - level) * (res + 1)
            sites.update({f"output_blocks.{first_out + j}.1": level for j in range(res + 1)})
    for site, level in sites.items():
        _expect(config.depth(level), indices(sd, f"{site}.transformer_blocks"), f"transformer blocks at level {level}",
                "transformer_depth; diffusers: transformer_layers_per_block", site)

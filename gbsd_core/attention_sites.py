"""Where each attention module of a UNet sits: its name and the downsampling factor of its feature map.

Not needed to run SD. The wings use it: `fast/` swaps in fused attention and caches the cross-attention K/V per stage;
`bokeh/attnmaps.py` reads the focus words' cross-attention maps, which it must reshape to the map's h x w. The sites
are found by walking the UNet's blocks in forward order, so they follow whatever config built it.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from .attention import CrossAttention, SpatialTransformer
from .unet import UNetModel
from .unet_blocks import Downsample, Upsample


class AttentionSite(NamedTuple):
    """One attention module and where it sits: `ds` is the downsampling factor of its feature map (1, 2, 4, 8), so a
    latent of size h x w gives Nq = query_hw(h, ds) * query_hw(w, ds) query tokens."""

    name: str
    module: CrossAttention
    ds: int


def query_hw(n: int, ds: int) -> int:
    """Spatial size after log2(ds) stride-2 convs (each maps n to ceil(n/2))."""
    while ds > 1:
        n, ds = (n + 1) // 2, ds // 2
    return n


def attention_sites(unet: UNetModel, cross: bool = True) -> Iterator[AttentionSite]:
    """All cross-attention (`attn2`; `cross=False`: self-attention `attn1`) modules of `unet`, in forward order.

    The feature map halves after each input block holding a Downsample and doubles after each output block holding
    an Upsample (UNetModel's level loop); the middle block sits at the deepest level.
    """
    which = "attn2" if cross else "attn1"
    ds = 1
    blocks = [*(f"input_blocks.{i}" for i in range(len(unet.input_blocks))), "middle_block",
              *(f"output_blocks.{i}" for i in range(len(unet.output_blocks)))]
    for prefix in blocks:
        block = unet.get_submodule(prefix)
        for j, layer in enumerate(block):
            if isinstance(layer, SpatialTransformer):
                for k, transformer_block in enumerate(layer.transformer_blocks):
                    yield AttentionSite(f"{prefix}.{j}.transformer_blocks.{k}.{which}",
                                        getattr(transformer_block, which), ds)
        if any(isinstance(layer, Downsample) for layer in block):
            ds *= 2
        if any(isinstance(layer, Upsample) for layer in block):
            ds //= 2

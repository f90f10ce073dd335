"""The Stable Diffusion denoiser: `openaimodel.UNetModel` with `SpatialTransformer` attention (SD1.x, SD2.x, SDXL).

Same construction loop, module names and numerics as CompVis/stable-diffusion and Stability-AI/stablediffusion
(`ldm/modules/diffusionmodules/openaimodel.py`) and, for SDXL, Stability-AI/generative-models
(`sgm/modules/diffusionmodules/openaimodel.py`, the same loop plus a per-level transformer depth and the label
embedding), so `state_dict()` keys are the checkpoint's `model.diffusion_model.*` keys with that prefix stripped and a
checkpoint loads with `load_state_dict(strict=True)`.

Read in order: `UNetConfig` (the YAML's numbers), `UNetModel` (the level loop that builds the blocks and the forward
that runs them), then `unet_config_from_state_dict`, which reads a config off a checkpoint's shapes for the loader.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .attention import SpatialTransformer
from .norm import GroupNorm32
from .unet_blocks import Downsample, ResBlock, TimestepEmbedSequential, Upsample, timestep_embedding


@dataclass(frozen=True)
class UNetConfig:
    """UNet hyper-parameters, named as the `unet_config.params` of the original YAMLs; defaults are SD1's.

    Fixed in every SD1/SD2/SDXL YAML and therefore not fields here: dims=2, use_spatial_transformer=True,
    legacy=False, conv_resample=True, use_scale_shift_norm=False, dropout=0.
    Heads: exactly one of `num_heads` (fixed head count, SD1: 8) or `num_head_channels` (fixed head width, SD2 and
    SDXL: 64) is used; the other is -1, as in the reference.
    `transformer_depth`: SpatialTransformer blocks per level, one int for every level (SD1/SD2: 1, SDXL refiner: 4) or
    one per level (SDXL base: [1, 2, 10]); the middle block uses the last level's, as sgm's default
    `transformer_depth_middle = transformer_depth[-1]`. A list with one value throughout is stored as that int.
    `adm_in_channels`: sgm's `num_classes: sequential` with `adm_in_channels`, the width of the vector `y` that SDXL
    adds to the timestep embedding (`label_emb`); None (SD1/SD2) builds no label embedding.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors ("ds") that get a SpatialTransformer
    num_heads: int = 8
    num_head_channels: int = -1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    transformer_depth: int | tuple[int, ...] = 1
    adm_in_channels: int | None = None
    upcast_attention: bool = False  # attention in fp32 (SD2-768-v in fp16 needs it); not stored in checkpoints

    def __post_init__(self) -> None:
        # Accept lists (as read from YAML/JSON); store tuples so configs compare and hash. attention_resolutions is
        # a set in meaning, kept in the YAMLs' descending order.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True)))
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError(f"set exactly one of num_heads / num_head_channels, got {self.num_heads}, {self.num_head_channels}")
        depth = self.transformer_depth
        if not isinstance(depth, int):
            depth = tuple(depth)
            if len(depth) != len(self.channel_mult):
                raise ValueError(f"transformer_depth {list(depth)} needs one entry per level ({len(self.channel_mult)})")
            if len(set(depth)) == 1:
                depth = depth[0]
        object.__setattr__(self, "transformer_depth", depth)

    @classmethod
    def sd1(cls) -> UNetConfig:
        """configs/stable-diffusion/v1-inference.yaml"""
        return cls()

    @classmethod
    def sd2(cls) -> UNetConfig:
        """configs/stable-diffusion/v2-inference(-v).yaml (the 768-v model also wants upcast_attention=True in fp16)."""
        return cls(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        """generative-models configs/inference/sd_xl_base.yaml: three levels, no attention at the first."""
        return cls(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64,
                   context_dim=2048, use_linear_in_transformer=True, transformer_depth=(1, 2, 10), adm_in_channels=2816)

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """generative-models configs/inference/sd_xl_refiner.yaml: four levels, attention on the middle two."""
        return cls(model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2), num_heads=-1,
                   num_head_channels=64, context_dim=1280, use_linear_in_transformer=True, transformer_depth=4,
                   adm_in_channels=2560)

    def depth(self, level: int) -> int:
        """SpatialTransformer blocks at a level (0 = full resolution); `len(channel_mult) - 1` is also the middle's."""
        return self.transformer_depth if isinstance(self.transformer_depth, int) else self.transformer_depth[level]

    def heads_and_dim(self, ch: int) -> tuple[int, int]:
        """(heads, head dim) of a SpatialTransformer on `ch` channels (the reference's legacy=False rule)."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels


class UNetModel(nn.Module):
    """eps/v-predicting UNet: (x_t [B,4,h,w], t [B], text context [B,77,D], SDXL: vector y [B,adm]) -> [B,4,h,w].

    Block indices (ch = channels, ds = downsampling factor, ST = SpatialTransformer with its number of transformer
    blocks; every Res receives the timestep embedding, every ST the text context):

      SD1/SD2 (four levels, ST at ds 1, 2, 4, depth 1)
        input_blocks  contents        ds  ch      output_blocks  contents            ds  ch
        0             conv 4->320     1   320     0, 1           Res                 8   1280
        1, 2          Res, ST         1   320     2              Res, Upsample       8   1280
        3             Downsample      2   320     3, 4           Res, ST             4   1280
        4, 5          Res, ST         2   640     5              Res, ST, Upsample   4   1280
        6             Downsample      4   640     6, 7           Res, ST             2   640
        7, 8          Res, ST         4   1280    8              Res, ST, Upsample   2   640
        9             Downsample      8   1280    9, 10, 11      Res, ST             1   320
        10, 11        Res             8   1280
        middle_block: Res, ST, Res at ds 8, 1280 channels. out: GroupNorm, SiLU, conv 320->4.

      SDXL base (three levels, ST at ds 2 and 4 only, 2 and 10 transformer blocks deep)
        input_blocks  contents        ds  ch      output_blocks  contents              ds  ch
        0             conv 4->320     1   320     0, 1           Res, ST x10           4   1280
        1, 2          Res             1   320     2              Res, ST x10, Upsample 4   1280
        3             Downsample      2   320     3, 4           Res, ST x2            2   640
        4, 5          Res, ST x2      2   640     5              Res, ST x2, Upsample  2   640
        6             Downsample      4   640     6, 7, 8        Res                   1   320
        7, 8          Res, ST x10     4   1280
        middle_block: Res, ST x10, Res at ds 4, 1280 channels. label_emb: Linear 2816->1280, SiLU, Linear 1280->1280
        on y, added to the timestep embedding. (The refiner: four levels of 384, 768, 1536, 1536 channels, ST x4 at
        ds 2 and 4 and in the middle, y of 2560.)

    Output block j concatenates the latest unused input-block output (a U-Net skip) before its ResBlock.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config if config is not None else UNetConfig()
        mc = cfg.model_channels
        emb_dim = mc * 4
        # time_embed.1 is a SiLU slot, kept for the key indices.
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # SDXL (sgm `num_classes: sequential`): an MLP on the vector y, added to the timestep embedding. label_emb.0.1
        # is a SiLU slot; the extra level of nesting is the reference's.
        self.label_emb = None if cfg.adm_in_channels is None else nn.Sequential(nn.Sequential(
            nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        def transformer(ch: int, level: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_and_dim(ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.depth(level), cfg.context_dim,
                                      cfg.use_linear_in_transformer, cfg.upcast_attention)

        # Encoder: the reference's level loop.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        # Bottleneck: always has attention, whatever attention_resolutions says, as deep as the last level's.
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch), transformer(ch, len(cfg.channel_mult) - 1),
                                                    ResBlock(ch, emb_dim, ch))

        # Decoder: levels in reverse, one more ResBlock per level than the encoder (it also consumes the skip of the
        # Downsample / conv_in), each ResBlock's input = current channels + the popped skip's channels.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # out.1 is a SiLU slot. (The reference zero-initialises out.2; irrelevant for inference.)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, in_channels, h, w] any h, w >= 1; timesteps: [B] (or a scalar, broadcast); context: [B, 77, D];
        # y: [B, adm_in_channels] for SDXL (pooled text + size embeddings), else None
        # -> [B, out_channels, h, w] in x's dtype; the network runs in its parameters' dtype.
        if (y is None) != (self.label_emb is None):
            raise ValueError("this UNet takes a vector y (SDXL's adm_in_channels)" if y is None else
                             "y given, but this UNet has no label embedding (adm_in_channels is None)")
        dtype = self.out[2].weight.dtype
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))  # [B, 4*mc]
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(dtype))  # sgm: emb = emb + self.label_emb(y)
        context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # An Upsample in this block must land on the size of the next skip (odd sizes: not simply 2x).
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype)


# ------------------------------------------------------------------ reading a config off a checkpoint (the loader's)


def unet_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> UNetConfig:
    """Infer the config from a UNet state dict (prefix already stripped) using only key names and shapes.

    Everything is read off the shapes except the head split, which no weight shape records. Heuristic: context
    width 768 (CLIP ViT-L, SD1.x) means 8 heads, anything else (1024, OpenCLIP ViT-H, SD2.x; 2048 / 1280, SDXL)
    means 64-wide heads. A checkpoint that breaks the rule needs an explicit config, e.g.
    `dataclasses.replace(config, num_heads=...)`. upcast_attention is a runtime choice and stays False.

    A level without attention has no transformer depth to read. One depth throughout (with the middle block's)
    is the YAMLs' scalar form; otherwise the list has the middle block's depth at the last level and 1 at other
    attention-free levels, which is what SDXL base's [1, 2, 10] has at its first level.
    """
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    downs = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in sd]
    levels = len(downs) + 1
    num_res_blocks = (n_in - 1 - len(downs)) // levels
    # input_blocks: [conv_in] + per level (num_res_blocks ResBlocks [+ Downsample except at the last level])
    if downs != [(lvl + 1) * (num_res_blocks + 1) for lvl in range(levels - 1)]:
        raise ValueError(f"input_blocks layout not recognised (downsamplers at {downs} of {n_in} blocks)")
    first_res = [1 + lvl * (num_res_blocks + 1) for lvl in range(levels)]
    channel_mult = tuple(sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] // model_channels for i in first_res)
    attention_resolutions = tuple(2**lvl for lvl, i in enumerate(first_res) if f"input_blocks.{i}.1.norm.weight" in sd)
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    transformer_depth = _infer_depth(sd, levels, num_res_blocks)
    num_heads, num_head_channels = (8, -1) if context_dim == 768 else (-1, 64)
    return UNetConfig(
        in_channels=in_channels,
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_resolutions,
        context_dim=context_dim,
        use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].ndim == 2,
        transformer_depth=transformer_depth,
        adm_in_channels=sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
    )


def _infer_depth(sd: Mapping[str, torch.Tensor], levels: int, num_res_blocks: int) -> int | tuple[int, ...]:
    """`transformer_depth` from the `transformer_blocks.N.` keys (see unet_config_from_state_dict for the rule)."""
    blocks: dict[str, int] = {}  # SpatialTransformer prefix -> number of transformer blocks
    for k in sd:
        m = re.match(r"(.*)\.transformer_blocks\.(\d+)\.", k)
        if m:
            blocks[m[1]] = max(blocks.get(m[1], 0), int(m[2]) + 1)
    middle = blocks.pop("middle_block.1")
    per_level: dict[int, set[int]] = {}
    for prefix, depth in blocks.items():
        kind, index = prefix.split(".")[:2]
        # input block i >= 1 sits at level (i-1) // (nrb+1); output block j at level L-1 - j // (nrb+1)
        level = (int(index) - 1) // (num_res_blocks + 1) if kind == "input_blocks" else \
            levels - 1 - int(index) // (num_res_blocks + 1)
        per_level.setdefault(level, set()).add(depth)
    if any(len(d) > 1 for d in per_level.values()):
        raise ValueError(f"transformer depth differs within a level: {blocks}")
    depth = {level: d.pop() for level, d in per_level.items()}
    if set(depth.values()) <= {middle}:
        return middle
    if depth.get(levels - 1, middle) != middle:
        raise ValueError(f"the middle block's transformer depth {middle} differs from the last level's "
                         f"{depth[levels - 1]} (sgm's transformer_depth_middle is not supported)")
    return tuple(depth.get(level, middle if level == levels - 1 else 1) for level in range(levels))

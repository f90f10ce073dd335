"""SD2 text encoder: OpenCLIP ViT-H/14 text tower (checkpoint subtree `cond_stage_model.`). SDXL's OpenCLIP
ViT-bigG/14 (`conditioner.embedders.1.`, the refiner's `.0.`) is the same tower at another size, read at the
penultimate block without `ln_final` plus a pooled vector (`hidden_states`, `pool`; see sdxl_conditioner.py).

Stability's `FrozenOpenCLIPEmbedder` (stablediffusion, ldm/modules/encoders/modules.py) keeps the whole open_clip
`CLIP` model as `self.model`, deletes `model.visual`, and with `layer="penultimate"` encodes text as
(`encode_with_transformer`):
    x = token_embedding(tokens) + positional_embedding
    x = resblocks[0 .. N-2](x, attn_mask=causal)      # all blocks but the last
    x = ln_final(x)
`text_projection` and `logit_scale` are never used for SD2 but are in every SD2 file, so they stay parameters here
and the state dict matches strictly (SDXL pools with the projection; `logit_scale` is unused everywhere).

Blocks (open_clip transformer.py, ResidualAttentionBlock): pre-LN, `nn.MultiheadAttention` with one fused
`in_proj_weight` holding Q, K, V stacked in that order along dim 0, exact (erf) GELU, LayerNorm eps 1e-5.

diffusers' SD2 `text_encoder` folder stores a 23-layer HF CLIPTextModel (the last block already dropped). The loader
maps it into these names and sets `penultimate=False`, so all (23) blocks run; it also has no projection, hence
`has_projection=False`. No diffusers folder has `logit_scale` (`has_logit_scale=False`); SDXL's `text_encoder_2` is
the whole bigG tower with its projection.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Released OpenCLIP text towers use 64-channel heads (ViT-H/14: 1024 = 16 x 64); shapes do not reveal the count.
OPENCLIP_HEAD_DIM = 64


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """open_clip `CLIPTextCfg` field names; defaults are ViT-H/14 as used by SD2."""

    vocab_size: int = 49408
    width: int = 1024
    layers: int = 24
    heads: int = 16
    context_length: int = 77
    embed_dim: int = 1024  # text_projection output size (open_clip's CLIP embed_dim)
    penultimate: bool = True  # True: skip the last block (Stability, layer="penultimate"); False: run all blocks
    has_projection: bool = True  # whether `text_projection` exists (absent in SD2's diffusers folders)
    # whether `logit_scale` exists: CLIP's contrastive temperature, unused by SD, in every original file; diffusers'
    # converters drop it, so no diffusers folder has it (SDXL's text_encoder_2 keeps the projection, not this)
    has_logit_scale: bool = True
    mlp_ratio: float = 4.0  # MLP hidden width / width (open_clip's name): 4 in every released tower

    @property
    def mlp_width(self) -> int:
        return round(self.width * self.mlp_ratio)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], heads: int | None = None,
                        penultimate: bool = True) -> "OpenCLIPTextConfig":
        """Infer the config from a state dict keyed like our module (`model.…`).

        `heads` defaults to width // 64 (see OPENCLIP_HEAD_DIM). `penultimate` is not visible in the keys: a full
        24-block SD2 tower and a 23-block diffusers conversion look alike, so the caller states it.
        """
        tok = sd["model.token_embedding.weight"]
        pos = sd["model.positional_embedding"]
        layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"model\.transformer\.resblocks\.(\d+)\.", k))}
        if not layer_ids:
            raise ValueError("no 'model.transformer.resblocks.N.' keys in the state dict")
        width = tok.shape[1]
        if heads is None:
            if width % OPENCLIP_HEAD_DIM:
                raise ValueError(f"width {width} is not a multiple of {OPENCLIP_HEAD_DIM}; pass heads= explicitly")
            heads = width // OPENCLIP_HEAD_DIM
        c_fc = sd["model.transformer.resblocks.0.mlp.c_fc.weight"]
        has_projection = "model.text_projection" in sd
        # without a projection embed_dim means nothing; keep the default so configs compare equal
        embed_dim = sd["model.text_projection"].shape[1] if has_projection else cls.embed_dim
        return cls(vocab_size=tok.shape[0], width=width, layers=max(layer_ids) + 1, heads=heads,
                   context_length=pos.shape[0], embed_dim=embed_dim, penultimate=penultimate,
                   has_projection=has_projection, has_logit_scale="model.logit_scale" in sd,
                   mlp_ratio=c_fc.shape[0] / width)


class MultiheadSelfAttention(nn.Module):
    """The parameters of `torch.nn.MultiheadAttention` (same names), computed with SDPA."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))  # rows: [W_q; W_k; W_v]
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, L, C] -> qkv [B, L, 3C] -> q, k, v [B, heads, L, C/heads] -> [B, L, C]
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        # open_clip's attn_mask is the causal mask (-inf above the diagonal) and SD passes no padding mask, so
        # SDPA's is_causal is the same computation.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.attn = MultiheadSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=1e-5)
        # Named slots as open_clip builds them, so keys read mlp.c_fc / mlp.c_proj. Exact GELU: ViT-H/14 is not a
        # quick_gelu model.
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(cfg.width, cfg.mlp_width)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(cfg.mlp_width, cfg.width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class _OpenCLIPModel(nn.Module):
    """The text half of open_clip's `CLIP` (FrozenOpenCLIPEmbedder's `.model` after `del model.visual`)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=1e-5)
        if cfg.has_projection:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        if cfg.has_logit_scale:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # scalar, as open_clip initialises


class OpenCLIPTextEncoder(nn.Module):
    """SD2 cond stage. state_dict() keys == the checkpoint's `cond_stage_model.*` keys minus that prefix."""

    def __init__(self, config: OpenCLIPTextConfig = OpenCLIPTextConfig()):
        super().__init__()
        if config.penultimate and config.layers < 2:
            raise ValueError("penultimate=True needs at least 2 layers")
        self.config = config
        self.model = _OpenCLIPModel(config)
        self._init_weights()

    def _init_weights(self) -> None:
        # Only so a fresh model is finite (torch.empty is not); real use always loads weights.
        for name, p in self.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if ".ln_" in name:  # ln_1, ln_2, ln_final
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02)

    def hidden_states(self, tokens: torch.Tensor, layers: int | None = None) -> list[torch.Tensor]:
        """[embeddings, output of block 1, ..., of block `layers` (default: all)], each [B, L, width], none through
        `ln_final` (the order of HF's `hidden_states`). SDXL's context is the penultimate one, un-normalised."""
        m = self.model
        blocks = m.transformer.resblocks
        layers = len(blocks) if layers is None else layers
        if not 0 <= layers <= len(blocks):
            raise ValueError(f"layers must be in [0, {len(blocks)}], got {layers}")
        states = [m.token_embedding(tokens) + m.positional_embedding[: tokens.shape[1]]]
        for block in blocks[:layers]:
            states.append(block(states[-1]))
        return states

    def pool(self, last: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The text embedding open_clip's `encode_text` computes, SDXL's "pooled" vector: `ln_final` of the last
        block's output at each row's end token, times `text_projection` (x @ P). [B, L, width] -> [B, embed_dim].

        The end token 49407 is the largest id of a row (open_clip pads with 0), so `argmax` finds it, as in
        open_clip and sgm's FrozenOpenCLIPEmbedder2.pool.
        """
        if not self.config.has_projection:
            raise ValueError("this OpenCLIP tower has no text_projection to pool with")
        end = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)]  # [B, width]
        return self.model.ln_final(end) @ self.model.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L<=77] long -> [B, L, width]: penultimate (or last, see config) block, then ln_final."""
        n = len(self.model.transformer.resblocks)
        return self.model.ln_final(self.hidden_states(tokens, n - 1 if self.config.penultimate else n)[-1])

"""SD1 text encoder: OpenAI CLIP ViT-L/14 text transformer (checkpoint subtree `cond_stage_model.`; in SDXL base,
`conditioner.embedders.0.`, read at another layer: `hidden_states`).

CompVis' `FrozenCLIPEmbedder` (ldm/modules/encoders/modules.py) wraps a HuggingFace `CLIPTextModel` as
`self.transformer` and returns `outputs.last_hidden_state`, i.e. the last layer's output after
`final_layer_norm`. The wrapped model of the transformers version SD1 was trained with (4.19) keeps a
`text_model.` level, so real SD1 files name the weights `cond_stage_model.transformer.text_model.…`. We build
the same module tree so that a checkpoint loads with `load_state_dict(strict=True)` and no renaming.

Architecture (CLIP paper, openai/CLIP model.py; HF modeling_clip.py):
  token + learned position embedding -> N pre-LN blocks [x + attn(ln1(x)); x + mlp(ln2(x))] -> final LayerNorm.
  Attention is causal; the MLP uses quick_gelu, x * sigmoid(1.702 x), OpenAI's cheap GELU approximation, which
  the released weights were trained with (swapping in exact GELU changes the embeddings). LayerNorm eps 1e-5.

`position_ids` is not a buffer here: older transformers saved it as a persistent buffer, so many real files
carry `…embeddings.position_ids`; the loader drops it (it is always arange(77)).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Every released CLIP / OpenCLIP text tower uses 64-channel attention heads (ViT-L/14 text: 768 = 12 x 64), and
# the head count is not recoverable from weight shapes, so state-dict inference assumes it.
CLIP_HEAD_DIM = 64


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of the CLIP text transformer (field names as open_clip / the CLIP paper); SD1 defaults."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    context_length: int = 77
    mlp_ratio: float = 4.0  # MLP hidden width / width: 4 in every released CLIP (small test towers differ)

    @property
    def mlp_width(self) -> int:
        return round(self.width * self.mlp_ratio)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], heads: int | None = None) -> "CLIPTextConfig":
        """Infer the config from a state dict keyed like our module (`transformer.text_model.…`).

        `heads` cannot be read from shapes; by default it is width // 64 (see CLIP_HEAD_DIM). A diffusers folder's
        config.json says it (diffusers_configs.text_encoder_config).
        """
        prefix = "transformer.text_model."
        tok = sd[prefix + "embeddings.token_embedding.weight"]
        pos = sd[prefix + "embeddings.position_embedding.weight"]
        layer_ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
        if not layer_ids:
            raise ValueError(f"no '{prefix}encoder.layers.N.' keys in the state dict")
        width = tok.shape[1]
        if heads is None:
            if width % CLIP_HEAD_DIM:
                raise ValueError(f"width {width} is not a multiple of {CLIP_HEAD_DIM}; pass heads= explicitly")
            heads = width // CLIP_HEAD_DIM
        fc1 = sd[prefix + "encoder.layers.0.mlp.fc1.weight"]
        return cls(vocab_size=tok.shape[0], width=width, layers=max(layer_ids) + 1, heads=heads,
                   context_length=pos.shape[0], mlp_ratio=fc1.shape[0] / width)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens [B, L] -> [B, L, width]; positions are 0..L-1 (HF's position_ids buffer is just arange).
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (HF CLIPAttention names)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, L, C] -> q, k, v [B, heads, L, C/heads] -> [B, L, C]
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # SD never passes a padding mask to the text encoder (FrozenCLIPEmbedder calls transformer(input_ids=…)),
        # so the causal mask is the only mask and SDPA's built-in is_causal expresses it exactly.
        # Scale defaults to head_dim ** -0.5, as in CLIP.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu (OpenAI CLIP)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # pre-LN residual blocks
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """HF's `CLIPTextTransformer` (the `text_model` level): embeddings, encoder, final_layer_norm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)


class _HFCLIPTextModel(nn.Module):
    """Stands for HF's `CLIPTextModel` (FrozenCLIPEmbedder's `.transformer`); it only adds the `text_model.` level."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class CLIPTextEncoder(nn.Module):
    """SD1 cond stage. state_dict() keys == the checkpoint's `cond_stage_model.*` keys minus that prefix."""

    def __init__(self, config: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = config
        self.transformer = _HFCLIPTextModel(config)
        self._init_weights()

    def _init_weights(self) -> None:
        # Only so a fresh model is finite and sane; real use always loads weights. Std 0.02 as in HF CLIP init.
        for name, p in self.named_parameters():
            if "layer_norm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02)

    def hidden_states(self, tokens: torch.Tensor, layers: int | None = None) -> list[torch.Tensor]:
        """[embeddings, output of layer 1, ..., of layer `layers` (default: all)], each [B, L, width]: HF's
        `hidden_states`, so none of them has been through `final_layer_norm`.

        SDXL's CLIP-L embedder (sgm FrozenCLIPEmbedder, `layer: hidden, layer_idx: 11`) takes hidden_states[11] of the
        12 layers, the penultimate layer's output, un-normalised (see sdxl_conditioner.py).
        """
        tm = self.transformer.text_model
        n_layers = len(tm.encoder.layers)
        layers = n_layers if layers is None else layers
        if not 0 <= layers <= n_layers:
            raise ValueError(f"layers must be in [0, {n_layers}], got {layers}")
        states = [tm.embeddings(tokens)]
        for layer in tm.encoder.layers[:layers]:
            states.append(layer(states[-1]))
        return states

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens [B, L<=77] long -> [B, L, width].

        clip_skip follows the AUTOMATIC1111 convention: 1 = last layer (what SD1 was trained with), 2 = stop after
        the penultimate layer, and so on. The result always goes through `final_layer_norm`, as A1111 does, so the
        UNet sees the normalised scale it expects (HF's `hidden_states[-clip_skip]` alone would not be normalised).
        """
        tm = self.transformer.text_model
        n_layers = len(tm.encoder.layers)
        if not 1 <= clip_skip <= n_layers:
            raise ValueError(f"clip_skip must be in [1, {n_layers}], got {clip_skip}")
        return tm.final_layer_norm(self.hidden_states(tokens, n_layers - (clip_skip - 1))[-1])

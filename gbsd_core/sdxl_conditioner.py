"""SDXL's conditioning (checkpoint subtree `conditioner.`): two text towers, and the size ("micro") conditioning.

sgm's `GeneralConditioner` (Stability-AI/generative-models, sgm/modules/encoders/modules.py) runs a list of embedders
and sorts their outputs by rank: 3-d outputs are concatenated along the feature axis into the cross-attention
context ("crossattn"), 2-d ones into the vector `y` ("vector") that the UNet's `label_emb` takes. SDXL 1.0 base
(configs/inference/sd_xl_base.yaml), in embedder order:

    embedders.0  FrozenCLIPEmbedder       CLIP ViT-L/14 text, output of layer 11 of 12 (no final LayerNorm)  [B,77,768]
    embedders.1  FrozenOpenCLIPEmbedder2  OpenCLIP ViT-bigG/14 text, penultimate block (no ln_final)        [B,77,1280]
                                          pooled: ln_final(last block)[end token] @ text_projection        [B,1280]
    embedders.2  ConcatTimestepEmbedderND original_size_as_tuple (h, w)                                    [B,512]
    embedders.3  ConcatTimestepEmbedderND crop_coords_top_left (top, left)                                 [B,512]
    embedders.4  ConcatTimestepEmbedderND target_size_as_tuple (h, w)                                      [B,512]

    context = [CLIP-L ; bigG] -> [B,77,2048]        y = [pooled ; sizes] -> [B,2816]

The refiner (sd_xl_refiner.yaml) has bigG alone, as embedders.0 (context [B,77,1280]), and original size, crop and
`aesthetic_score` (y: 1280 + 5·256 = 2560). Only the text towers have parameters, so they are this module's
`embedders`; the micro-conditioning embedders are the function `micro_embedding` (each value through the 256-wide
timestep sinusoid, the values' embeddings side by side, as ConcatTimestepEmbedderND does).

The two towers are the SD1 and SD2 modules (clip_text.py, openclip_text.py) read at other layers. They tokenize
alike but pad differently: CLIP-L's HF tokenizer with the end token 49407, open_clip's with 0 (`pad_token_ids`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .clip_text import CLIPTextConfig, CLIPTextEncoder
from .openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from .tokenizer import EOT_TOKEN_ID
from .unet_blocks import timestep_embedding

# OpenCLIP ViT-bigG/14's text tower (open_clip model config ViT-bigG-14.json): 32 blocks of width 1280, 20 heads.
BIGG = OpenCLIPTextConfig(width=1280, layers=32, heads=20, embed_dim=1280)

# The micro-conditioning of each model, by sgm's input keys, in embedder order.
BASE_MICRO = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
REFINER_MICRO = ("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")
# ConcatTimestepEmbedderND(outdim=256), every micro-conditioning embedder of SDXL 1.0's YAMLs (a diffusers folder says
# its own width: addition_time_embed_dim; diffusers' tiny SDXL test pipelines use 8)
MICRO_DIM = 256

# The refiner's aesthetic score for the prompt and for the negative prompt: the defaults of sgm's sampling scripts
# (scripts/demo/sampling.py) and of diffusers' StableDiffusionXLImg2ImgPipeline.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class SDXLConditionerConfig:
    """The text towers of the conditioner (CLIP-L absent: the refiner), its micro-conditioning keys, and the width of
    each value's sinusoid."""

    clip: CLIPTextConfig | None = CLIPTextConfig()  # embedders.0 of the base (ViT-L/14 text, as SD1's)
    openclip: OpenCLIPTextConfig = BIGG  # embedders.1 of the base, embedders.0 of the refiner
    micro_conditioning: tuple[str, ...] = BASE_MICRO
    micro_dim: int = MICRO_DIM  # ConcatTimestepEmbedderND's outdim (diffusers: addition_time_embed_dim)

    @classmethod
    def base(cls) -> SDXLConditionerConfig:
        return cls()

    @classmethod
    def refiner(cls) -> SDXLConditionerConfig:
        return cls(clip=None, micro_conditioning=REFINER_MICRO)

    @property
    def vector_dim(self) -> int:
        """Width of y: the pooled text vector plus micro_dim (256) per micro-conditioning value (the UNet's
        adm_in_channels)."""
        n_values = sum(1 if key == "aesthetic_score" else 2 for key in self.micro_conditioning)
        return self.openclip.embed_dim + self.micro_dim * n_values

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> SDXLConditionerConfig:
        """Infer the config from a state dict keyed like this module (`embedders.N.…`, prefix `conditioner.` off).

        Two towers (`embedders.0.transformer.` CLIP-L, `embedders.1.model.` bigG) are the base, bigG alone at
        `embedders.0.model.` the refiner; which micro-conditioning each has is the YAMLs' fact, not the keys'.
        """
        def sub(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}

        if any(k.startswith("embedders.0.transformer.") for k in sd):
            return cls.from_towers(CLIPTextConfig.from_state_dict(sub("embedders.0.")),
                                   OpenCLIPTextConfig.from_state_dict(sub("embedders.1.")))
        if any(k.startswith("embedders.0.model.") for k in sd):
            return cls.from_towers(None, OpenCLIPTextConfig.from_state_dict(sub("embedders.0.")))
        raise ValueError("no SDXL text embedders (embedders.0.transformer. or embedders.0.model.)")

    @classmethod
    def from_towers(cls, clip: CLIPTextConfig | None, openclip: OpenCLIPTextConfig,
                    micro_dim: int = MICRO_DIM) -> SDXLConditionerConfig:
        """The base (both towers) or the refiner (bigG alone), each with its YAML's micro-conditioning."""
        return cls(clip=clip, openclip=openclip, micro_conditioning=BASE_MICRO if clip is not None else REFINER_MICRO,
                   micro_dim=micro_dim)


class SDXLConditioner(nn.Module):
    """SDXL cond stage. state_dict() keys == the checkpoint's `conditioner.*` keys minus that prefix."""

    def __init__(self, config: SDXLConditionerConfig = SDXLConditionerConfig()) -> None:
        super().__init__()
        if not config.openclip.has_projection:
            raise ValueError("SDXL's OpenCLIP embedder needs its text_projection (the pooled vector)")
        self.config = config
        towers: list[nn.Module] = [] if config.clip is None else [CLIPTextEncoder(config.clip)]
        self.embedders = nn.ModuleList([*towers, OpenCLIPTextEncoder(config.openclip)])

    @property
    def pad_token_ids(self) -> tuple[int, ...]:
        """The padding id each embedder's tokenizer uses, in embedder order (CLIP-L: 49407, open_clip: 0)."""
        return tuple(EOT_TOKEN_ID if isinstance(e, CLIPTextEncoder) else 0 for e in self.embedders)

    def forward(self, tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One [B, 77] token tensor per embedder (padded with its `pad_token_ids`) -> (context [B, 77, sum of
        widths], pooled [B, embed_dim])."""
        if len(tokens) != len(self.embedders):
            raise ValueError(f"{len(self.embedders)} token tensors expected (one per text embedder), got {len(tokens)}")
        contexts = []
        for embedder, t in zip(self.embedders, tokens):
            if isinstance(embedder, CLIPTextEncoder):
                # sgm `layer: hidden, layer_idx: 11`: hidden_states[11] of 12 layers, the penultimate, not normalised
                contexts.append(embedder.hidden_states(t, embedder.config.layers - 1)[-1])
            else:
                # FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False): context without ln_final (SD2 applies
                # it), and the pooled vector from the last block
                *_, penultimate, last = embedder.hidden_states(t)
                contexts.append(penultimate)
                pooled = embedder.pool(last, t)
        return torch.cat(contexts, dim=-1), pooled

    def micro_values(self, size: tuple[int, int], negative: bool = False) -> list[float]:
        """The micro-conditioning values for an image of size (width, height), in embedder order: the original and
        target size are the image's own, the crop (0, 0), and the refiner's aesthetic score 6 (negative prompt: 2.5),
        as sgm's sampling scripts and diffusers pass them by default."""
        width, height = size
        score = NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE
        values = {"original_size_as_tuple": [height, width], "crop_coords_top_left": [0, 0],
                  "target_size_as_tuple": [height, width], "aesthetic_score": [score]}
        return [float(v) for key in self.config.micro_conditioning for v in values[key]]


def micro_embedding(values: torch.Tensor, dim: int = MICRO_DIM) -> torch.Tensor:
    """[B, n] values -> [B, dim·n] (dim 256): each value through the timestep sinusoid, side by side
    (ConcatTimestepEmbedderND: 'b d -> (b d)', embed, '(b d) d2 -> b (d d2)'; diffusers' add_time_proj is the same
    sinusoid, [cos, sin], an odd width padded with a zero)."""
    b, n = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(b, n * dim)

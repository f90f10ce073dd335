"""Reference-library twins of our SDXL modules: transformers text towers and a diffusers StableDiffusionXLPipeline.

As in reference.py, every twin carries OUR weights renamed by diffusers' own single-file converters, with the
prefixes diffusers' SDXL single-file loader uses (`create_diffusers_clip_model_from_ldm`):
`convert_ldm_clip_checkpoint` for `conditioner.embedders.0.transformer.` (CLIP-L, diffusers' `text_encoder`) and
`convert_open_clip_checkpoint(prefix="conditioner.embedders.1.model.")` (bigG, `text_encoder_2`, a
`CLIPTextModelWithProjection`; the refiner's bigG is `conditioner.embedders.0.model.`). Twins are built on the meta
device and take copies, or with `share=True` the very same storage.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .reference import DDIM_CONFIG, clip_tokenizer, diffusers_unet, diffusers_vae

if TYPE_CHECKING:
    from gbsd_core.bundle import SDBundle
    from gbsd_core.sdxl_conditioner import SDXLConditioner


def _conditioner_state_dict(conditioner: SDXLConditioner) -> dict[str, torch.Tensor]:
    return {"conditioner." + k: v for k, v in conditioner.state_dict().items()}


def _hf_text_config(width: int, layers: int, heads: int, vocab: int, act: str, projection_dim: int,
                    attn_implementation: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        projection_dim=projection_dim, attn_implementation=attn_implementation,
    )


def _load(ref: nn.Module, converted: dict[str, torch.Tensor], share: bool) -> nn.Module:
    """Strict, assigned load into a meta twin, then the one tensor outside its state dict: position_ids (arange)."""
    if not share:
        converted = {k: v.detach().clone() for k, v in converted.items()}
    ref.load_state_dict(converted, strict=True, assign=True)
    text_model = getattr(ref, "text_model", ref)  # CLIPTextModel is flat in transformers >= 5.6
    emb = text_model.embeddings
    n = emb.position_embedding.num_embeddings
    emb.register_buffer("position_ids", torch.arange(n, device=emb.position_embedding.weight.device)[None],
                        persistent=False)
    assert not any(t.is_meta for t in [*ref.parameters(), *ref.buffers()])
    return ref.eval()


def transformers_clip_l(conditioner: SDXLConditioner, share: bool = False, attn_implementation: str = "eager"):
    """diffusers' SDXL `text_encoder`: a transformers CLIPTextModel with the base's CLIP-L (embedders.0)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    c = conditioner.config.clip
    if c is None:
        raise ValueError("this conditioner (the refiner's) has no CLIP-L tower")
    with torch.device("meta"):
        ref = CLIPTextModel(_hf_text_config(c.width, c.layers, c.heads, c.vocab_size, "quick_gelu", c.width,
                                            attn_implementation))
    converted = convert_ldm_clip_checkpoint(_conditioner_state_dict(conditioner))
    if not hasattr(ref, "text_model"):  # flat CLIPTextModel (transformers >= 5.6), as diffusers' loader does
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return _load(ref, converted, share)


def transformers_bigg(conditioner: SDXLConditioner, share: bool = False, attn_implementation: str = "eager"):
    """diffusers' SDXL `text_encoder_2` (the refiner's `text_encoder_2` too): CLIPTextModelWithProjection."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    c = conditioner.config.openclip
    with torch.device("meta"):
        ref = CLIPTextModelWithProjection(_hf_text_config(c.width, c.layers, c.heads, c.vocab_size, "gelu",
                                                          c.embed_dim, attn_implementation))
    index = len(conditioner.embedders) - 1  # embedders.1 in the base, embedders.0 in the refiner
    converted = convert_open_clip_checkpoint(ref, _conditioner_state_dict(conditioner),
                                             prefix=f"conditioner.embedders.{index}.model.")
    return _load(ref, converted, share)


def diffusers_sdxl_pipeline(bundle: SDBundle, tmp: Path, share: bool = False, attn_implementation: str = "eager",
                            img2img: bool = False):
    """A diffusers StableDiffusionXLPipeline (`img2img`: StableDiffusionXLImg2ImgPipeline) assembled offline from
    twins of a loaded SDXL bundle, with DDIM at the CompVis settings and no watermark. The base zeroes an absent
    negative prompt (`force_zeros_for_empty_prompt`); the refiner (bigG alone, so no `text_encoder`) encodes it and
    takes the aesthetic score (`requires_aesthetics_score`), as the released refiner's pipeline config has it."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    conditioner = bundle.text_encoder
    base = conditioner.config.clip is not None
    if not base and not img2img:
        raise ValueError("diffusers runs the refiner as an img2img pipeline only")
    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    extra = {} if not img2img else {"requires_aesthetics_score": not base}
    return cls(
        vae=diffusers_vae(bundle.vae, share),
        text_encoder=transformers_clip_l(conditioner, share, attn_implementation) if base else None,
        text_encoder_2=transformers_bigg(conditioner, share, attn_implementation),
        tokenizer=clip_tokenizer(tmp / "tokenizer") if base else None,
        tokenizer_2=clip_tokenizer(tmp / "tokenizer_2", pad_token="!"),  # open_clip pads with 0, which is "!"
        unet=diffusers_unet(bundle.unet, share),
        scheduler=DDIMScheduler(**DDIM_CONFIG, prediction_type=bundle.family.prediction_type),
        force_zeros_for_empty_prompt=bundle.family.force_zeros_for_empty_prompt,
        add_watermarker=False,
        **extra,
    )

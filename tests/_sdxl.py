"""Tiny SDXL-shaped modules (base and refiner) with seeded random weights, and a single-file checkpoint of them.

Shapes keep what makes SDXL SDXL: a conditioner with CLIP-L + OpenCLIP towers (the refiner: OpenCLIP alone) whose
contexts are concatenated, a pooled vector plus 256-wide micro-conditioning embeddings feeding the UNet's label_emb,
a UNet without attention at its first level and with per-level transformer depths. Sizes are picked so that the
loader's `from_state_dict` inference gives these configs back (heads = width // 64).
"""
from __future__ import annotations

from pathlib import Path

import torch

from gbsd_core.clip_text import CLIPTextConfig
from gbsd_core.loading import save_single_file
from gbsd_core.openclip_text import OpenCLIPTextConfig
from gbsd_core.sdxl_conditioner import (
    REFINER_MICRO,
    SDXLConditioner,
    SDXLConditionerConfig,
)
from gbsd_core.unet import UNetConfig, UNetModel
from gbsd_core.vae import AutoencoderKL, VAEConfig

TINY_BIGG = OpenCLIPTextConfig(width=128, layers=3, heads=2, embed_dim=32)
TINY_CONDITIONER = SDXLConditionerConfig(clip=CLIPTextConfig(width=64, layers=2, heads=1), openclip=TINY_BIGG)
TINY_REFINER_CONDITIONER = SDXLConditionerConfig(clip=None, openclip=TINY_BIGG, micro_conditioning=REFINER_MICRO)

# Base-shaped: three levels, attention at ds 2 and 4 only, depths 1 and 2 (the middle block: 2), context 64 + 128.
TINY_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4, 2),
                       num_heads=-1, num_head_channels=64, context_dim=192, use_linear_in_transformer=True,
                       transformer_depth=(1, 1, 2), adm_in_channels=TINY_CONDITIONER.vector_dim)
# Refiner-shaped: four levels, attention on the middle two, one depth throughout, context 128 (bigG alone).
TINY_REFINER_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                               attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64, context_dim=128,
                               use_linear_in_transformer=True, transformer_depth=2,
                               adm_in_channels=TINY_REFINER_CONDITIONER.vector_dim)

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.13025)  # 8x down, as SDXL's


def tiny_sdxl_modules(refiner: bool = False, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Default init plus seeded noise everywhere (no layer left at exactly zero), then made to respond visibly to
    its conditioning, as tests/conftest.py's responsive_ckpt: the cross-attention value/output projections and the
    label embedding are amplified, as are bigG's text projection (the pooled vector) and the decoder's output conv (a
    tiny random decoder squeezes pixels to grey)."""
    torch.manual_seed(seed)
    modules = {
        "unet": UNetModel(TINY_REFINER_UNET if refiner else TINY_UNET),
        "vae": AutoencoderKL(TINY_VAE),
        "text_encoder": SDXLConditioner(TINY_REFINER_CONDITIONER if refiner else TINY_CONDITIONER),
    }
    with torch.no_grad():
        for module in modules.values():
            for name, p in module.named_parameters():
                if not name.endswith("logit_scale"):
                    p.add_(torch.randn_like(p) * 0.02)
        for name, p in modules["unet"].named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_out.0.weight" in name or name.startswith("label_emb.0.2."):
                p.mul_(6.0)
        modules["vae"].decoder.conv_out.weight.mul_(5.0)
        modules["text_encoder"].embedders[-1].model.text_projection.mul_(20.0)  # the pooled vector matters too
    return {name: m.eval() for name, m in modules.items()}


def write_tiny_sdxl(folder: Path, refiner: bool = False, seed: int = 0) -> Path:
    """The tiny modules as an original-layout single file (`conditioner.*` keys), written by our writer."""
    name = "tiny-sdxl-refiner.safetensors" if refiner else "tiny-sdxl-base.safetensors"
    return save_single_file(tiny_sdxl_modules(refiner, seed), folder / name)


# ------------------------------------------------------------------------------ a tiny SDXL diffusers pipeline
def save_tiny_sdxl_pipe(folder: Path, refiner: bool = False, seed: int = 0, time_dim: int = 256,
                        time_embedding_dim: int | None = None) -> Path:
    """A diffusers StableDiffusionXLPipeline folder (the refiner: StableDiffusionXLImg2ImgPipeline, bigG alone) built
    by diffusers and transformers themselves from SDXL-shaped configs with seeded weights, and written by their own
    save_pretrained (no network): a UNet with no attention at its first level, per-level transformer depths, head
    *counts* in attention_head_dim (16-wide heads: only the config says so) and the "text_time" added embedding on
    [pooled ; 256-wide size embeddings]; a CLIPTextModel (CLIP-L-shaped: quick_gelu, 4 heads of 8, MLP 37) and a
    CLIPTextModelWithProjection (bigG-shaped: gelu, projection 32); an 8x VAE with SDXL's scaling factor; CompVis
    DDIM. The UNet's sample_size 8 makes the folder's native size 64. `time_dim`: the size sinusoids' width
    (addition_time_embed_dim; diffusers' own tiny SDXL test pipelines use 8); `time_embedding_dim`: stated in the
    config (diffusers' default, None, means 4 x block_out_channels[0])."""
    from _reference import DDIM_CONFIG, clip_tokenizer
    from _tiny import randomize_
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import (
        DDIMScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    clip_width, bigg_width, projection = 32, 64, 32
    if refiner:
        levels = dict(block_out_channels=(32, 64, 64, 64), transformer_layers_per_block=2,
                      attention_head_dim=(2, 4, 4, 4),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        context, sizes = bigg_width, 5  # original (h, w), crop (top, left), aesthetic score
    else:
        levels = dict(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                      attention_head_dim=(2, 4, 4),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        context, sizes = clip_width + bigg_width, 6  # original, crop, target
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=context,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=projection + time_dim * sizes, time_embedding_dim=time_embedding_dim,
        **levels)
    vae = DAutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
    bigg = CLIPTextModelWithProjection(HFCLIPTextConfig(
        vocab_size=49408, hidden_size=bigg_width, intermediate_size=4 * bigg_width, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=projection))
    with torch.no_grad():
        randomize_(unet, seed)
        for name, p in unet.named_parameters():  # make the conditioning visible in the image (tiny_sdxl_modules)
            if ".attn2.to_v." in name or ".attn2.to_out.0.weight" in name or name.startswith("add_embedding.linear_2"):
                p.mul_(4.0)
        randomize_(vae, seed + 1)
        randomize_(bigg, seed + 3)
        bigg.text_projection.weight.mul_(8.0)
    common = dict(vae=vae, text_encoder_2=bigg, tokenizer_2=clip_tokenizer(folder.parent / f"{folder.name}-tok2",
                                                                            pad_token="!"),
                  unet=unet, scheduler=DDIMScheduler(**DDIM_CONFIG))
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False, add_watermarker=False, **common)
    else:
        clip = CLIPTextModel(HFCLIPTextConfig(
            vocab_size=49408, hidden_size=clip_width, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu"))
        randomize_(clip, seed + 2)
        tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-tok")
        pipe = StableDiffusionXLPipeline(text_encoder=clip, tokenizer=tokenizer, force_zeros_for_empty_prompt=True,
                                         add_watermarker=False, **common)
    pipe.save_pretrained(folder)
    return folder

"""Reference-library twins of our modules, for parity tests (test-only: diffusers / transformers / open_clip).

Every twin carries OUR weights, renamed by the reference library's own original→diffusers converter
(`diffusers.loaders.single_file_utils.convert_ldm_*`), so the key mapping is checked by an independent implementation.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

DDIM_CONFIG = dict(  # CompVis DDIM in diffusers' terms (../shared/GUIDE.md §2)
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def diffusers_unet_config(cfg) -> dict:
    """The UNet2DConditionModel config describing the same network (diffusers calls head counts attention_head_dim)."""
    attn = [2**lvl in cfg.attention_resolutions for lvl in range(len(cfg.channel_mult))]
    return dict(
        sample_size=8,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=tuple(cfg.heads_and_dim(cfg.model_channels * m)[0] for m in cfg.channel_mult),
        use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=cfg.transformer_depth,
        upcast_attention=cfg.upcast_attention,
    )


def diffusers_unet(ours):
    """A diffusers UNet2DConditionModel carrying our UNet's weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_unet_config(ours.config)
    sd = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(sd, config), strict=True)
    return ref


def diffusers_vae(ours):
    """A diffusers AutoencoderKL carrying our VAE's weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    c = ours.config
    ref = AutoencoderKL(
        in_channels=c.in_channels,
        out_channels=c.out_ch,
        down_block_types=("DownEncoderBlock2D",) * len(c.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(c.ch_mult),
        block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        layers_per_block=c.num_res_blocks,
        latent_channels=c.z_channels,
        norm_num_groups=32,
        scaling_factor=c.scale_factor,
    )
    sd = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_vae_checkpoint(sd, ref.config), strict=True)
    return ref.eval()


def transformers_clip(ours):
    """A transformers CLIPTextModel carrying our SD1 text encoder's weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    c = ours.config
    sd = {"cond_stage_model." + k: v for k, v in ours.state_dict().items()}
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level in its own state dict).
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
    cfg = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=4 * c.width, max_position_embeddings=c.context_length, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, attn_implementation="eager",  # eager: a reference that is not SDPA
    )
    ref = CLIPTextModel(cfg).eval()
    ref.load_state_dict(converted, strict=True)
    return ref


def write_clip_vocab(folder: Path) -> Path:
    """CLIP's vocab.json + merges.txt (what an SD1 diffusers folder's tokenizer/ holds), made from open_clip's BPE file
    the way OpenAI's CLIP defines the vocabulary: byte chars, byte chars + '</w>', merges, then the two specials."""
    import open_clip.tokenizer as oct

    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(folder: Path):
    """transformers CLIPTokenizer (SD1's reference tokenizer), built offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder)), model_max_length=77)


def diffusers_sd_pipeline(bundle, tmp: Path):
    """A diffusers StableDiffusionPipeline assembled offline from twins of a loaded SD1 bundle's modules."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=diffusers_vae(bundle.vae),
        text_encoder=transformers_clip(bundle.text_encoder),
        tokenizer=clip_tokenizer(tmp / "tokenizer"),
        unet=diffusers_unet(bundle.unet),
        scheduler=DDIMScheduler(**DDIM_CONFIG, prediction_type=bundle.family.prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

"""Reference-library twins of our modules (diffusers / transformers), shared by the parity tests and the benchmark.

Never imported by `gbsd_core`. Every twin carries OUR weights, renamed by the reference library's own
original→diffusers converter (`diffusers.loaders.single_file_utils.convert_ldm_*`), so the key mapping is checked by
an independent implementation, and the benchmark's baseline runs on exactly the weights ours runs on.

Twins are built on the meta device (no wasted random init: a full-size diffusers UNet initialises 860M parameters
for nothing otherwise) and then take the converted tensors: copies by default (the twin is independent, tests may
perturb either side), or the very same storage with `share=True` (the benchmark: one copy of 3.4 GB in RAM). With
`share=True` an in-place edit of one model's weights shows up in the other; `.to(dtype)` and friends replace tensors
and are safe.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from gbsd_core.bundle import SDBundle
    from gbsd_core.clip_text import CLIPTextEncoder
    from gbsd_core.openclip_text import OpenCLIPTextEncoder
    from gbsd_core.unet import UNetConfig, UNetModel
    from gbsd_core.vae import AutoencoderKL

DDIM_CONFIG = dict(  # CompVis DDIM in diffusers' terms (gbsd_core/ddim.py)
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def _take(ref: nn.Module, converted: dict[str, torch.Tensor], share: bool) -> nn.Module:
    """Fill a meta-device twin with converted tensors (strict), as copies unless `share`."""
    if not share:
        converted = {k: v.detach().clone() for k, v in converted.items()}
    ref.load_state_dict(converted, strict=True, assign=True)
    return ref.eval()


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel config describing the same network (diffusers calls head counts attention_head_dim)."""
    attn = [2**lvl in cfg.attention_resolutions for lvl in range(len(cfg.channel_mult))]
    # SDXL's label embedding on y = [pooled text ; 256-wide size embeddings] is diffusers' "text_time" embedding
    sdxl = {} if cfg.adm_in_channels is None else dict(
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return dict(
        **sdxl,
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


def diffusers_unet(ours: UNetModel, share: bool = False) -> nn.Module:
    """A diffusers UNet2DConditionModel carrying our UNet's weights (on their device and dtype)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_unet_config(ours.config)
    sd = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    return _take(ref, convert_ldm_unet_checkpoint(sd, config), share)


def diffusers_vae(ours: AutoencoderKL, share: bool = False) -> nn.Module:
    """A diffusers AutoencoderKL carrying our VAE's weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    c = ours.config
    with torch.device("meta"):
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
    return _take(ref, convert_ldm_vae_checkpoint(sd, ref.config), share)


def _hf_clip(width: int, layers: int, heads: int, vocab: int, act: str, attn_implementation: str):
    """A transformers CLIPTextModel on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        attn_implementation=attn_implementation,
    )
    with torch.device("meta"):
        return CLIPTextModel(cfg)


def _fill_hf_clip(ref: nn.Module, converted: dict[str, torch.Tensor], share: bool) -> nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level in its own state dict).
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    _take(ref, converted, share)
    # The only tensor outside the state dict: the non-persistent position_ids buffer (an arange).
    emb = ref.embeddings
    device = emb.position_embedding.weight.device
    emb.register_buffer("position_ids", torch.arange(emb.position_embedding.num_embeddings, device=device)[None],
                        persistent=False)
    assert not any(t.is_meta for t in [*ref.parameters(), *ref.buffers()])
    return ref


def transformers_clip(ours: CLIPTextEncoder, share: bool = False, attn_implementation: str = "eager") -> nn.Module:
    """A transformers CLIPTextModel carrying our SD1 text encoder's weights.

    attn_implementation "eager" (default) gives tests a reference that is not SDPA; the benchmark passes "sdpa",
    what a diffusers user gets by default.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    c = ours.config
    sd = {"cond_stage_model." + k: v for k, v in ours.state_dict().items()}
    ref = _hf_clip(c.width, c.layers, c.heads, c.vocab_size, "quick_gelu", attn_implementation)
    return _fill_hf_clip(ref, convert_ldm_clip_checkpoint(sd), share)


def transformers_openclip(ours: OpenCLIPTextEncoder, share: bool = False,
                          attn_implementation: str = "eager") -> nn.Module:
    """Our SD2 (OpenCLIP-H) text encoder as the 23-of-24-layer transformers CLIPTextModel diffusers' SD2 repos ship,
    through diffusers' own `convert_open_clip_checkpoint`."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    c = ours.config
    prefix = "cond_stage_model.model."
    n_blocks = c.layers if c.penultimate else c.layers + 1  # a diffusers-folder encoder already lacks the last block
    last = f"{prefix}transformer.resblocks.{n_blocks - 1}."
    # diffusers' ignore list hard-codes resblocks.23 (ViT-H); drop the last block by index so tiny sizes work too.
    sd = {"cond_stage_model." + k: v for k, v in ours.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(last)}
    ref = _hf_clip(c.width, n_blocks - 1, c.heads, c.vocab_size, "gelu", attn_implementation)
    return _fill_hf_clip(ref, convert_open_clip_checkpoint(ref, sd, prefix=prefix), share)


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


def clip_tokenizer(folder: Path, pad_token: str | None = None):
    """transformers CLIPTokenizer (SD1's reference tokenizer), built offline. SD2 repos pad with "!" (id 0)."""
    from transformers import CLIPTokenizer

    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder)), model_max_length=77, **extra)


def diffusers_sd_pipeline(bundle: SDBundle, tmp: Path, share: bool = False, attn_implementation: str = "eager"):
    """A diffusers StableDiffusionPipeline assembled offline from twins of a loaded SD1 or SD2 bundle's modules."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from gbsd_core.clip_text import CLIPTextEncoder

    if isinstance(bundle.text_encoder, CLIPTextEncoder):
        text_encoder = transformers_clip(bundle.text_encoder, share, attn_implementation)
        tokenizer = clip_tokenizer(tmp / "tokenizer")
    else:
        text_encoder = transformers_openclip(bundle.text_encoder, share, attn_implementation)
        tokenizer = clip_tokenizer(tmp / "tokenizer", pad_token="!")
    return StableDiffusionPipeline(
        vae=diffusers_vae(bundle.vae, share),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=diffusers_unet(bundle.unet, share),
        scheduler=DDIMScheduler(**DDIM_CONFIG, prediction_type=bundle.family.prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

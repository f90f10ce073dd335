"""Tiny but complete SD1/SD2 modules with non-trivial random weights, and the outputs a bundle uses (loading tests)."""
from __future__ import annotations

import torch

from gbsd_core.bundle import SDBundle
from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from gbsd_core.unet import UNetConfig, UNetModel
from gbsd_core.vae import AutoencoderKL, VAEConfig

TOL = 1e-5

# Tiny but complete: two levels, attention at level 0 and in the middle, one res block per level. The parts fit
# together as the loader checks (UNet context width = text width, latent channels = VAE channels), so the context is
# the text width 64 (SD2: 128), and heads are 64 wide: what unet.unet_config_from_state_dict infers for a context that is
# not CLIP-L's 768 (the 768 => 8 heads rule is covered by the golden full-size key lists).
TINY_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                       num_heads=-1, num_head_channels=64, context_dim=64)

TINY_UNET_SD2 = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                           num_heads=-1, num_head_channels=64, context_dim=128, use_linear_in_transformer=True)

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)

TINY_CLIP = CLIPTextConfig(width=64, layers=2, heads=1)  # heads = width // 64 is what from_state_dict infers

TINY_OPENCLIP = OpenCLIPTextConfig(width=128, layers=3, heads=2, embed_dim=32)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (biases, norm affines, zero-initialised output convs), scaled by fan-in so
    activations stay O(1) through a deep net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r / (p[0].numel() ** 0.5))
            elif "norm" in name or ".ln_" in name or "layer_norm" in name:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            else:
                p.copy_(0.05 * r)
    return module.eval()


def tiny_modules(sd2: bool = False, seed: int = 0) -> dict[str, torch.nn.Module]:
    return {
        "unet": randomize_(UNetModel(TINY_UNET_SD2 if sd2 else TINY_UNET), seed),
        "vae": randomize_(AutoencoderKL(TINY_VAE), seed + 1),
        "text_encoder": randomize_(OpenCLIPTextEncoder(TINY_OPENCLIP) if sd2 else CLIPTextEncoder(TINY_CLIP), seed + 2),
    }


def tokens(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    t = torch.randint(1, 49406, (n, 77), generator=g)
    t[:, 0], t[:, 12:] = 49406, 49407
    return t


@torch.no_grad()
def outputs(modules: dict[str, torch.nn.Module], context_dim: int = 64) -> dict[str, torch.Tensor]:
    """UNet noise prediction, VAE decode + encode mean, text embedding: everything a bundle uses."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, context_dim, generator=g)
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    vae = modules["vae"]
    return {
        "unet": modules["unet"](x, torch.tensor([10, 900]), ctx),
        "decode": vae.decode(x[:1]),
        "encode": vae.encode(img).mean,
        "text": modules["text_encoder"](tokens()),
    }


def bundle_modules(b: SDBundle) -> dict[str, torch.nn.Module]:
    return {"unet": b.unet, "vae": b.vae, "text_encoder": b.text_encoder}


def assert_same_weights(a: dict[str, torch.nn.Module], b: dict[str, torch.nn.Module]) -> None:
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


# ----------------------------------------------------------------------------------- a tiny diffusers pipeline


def save_tiny_pipe(folder, layers_per_block: int = 2, text_layers: int = 5, seed: int = 0, sd2: bool = False,
                   scheduler: dict | None = None):
    """A diffusers StableDiffusionPipeline folder shaped like the widely used tiny test pipelines
    (hf-internal-testing/tiny-stable-diffusion-pipe): text encoder width 32 with 4 heads (8 wide), MLP 37, 77
    positions; a 2-level VAE (block_out_channels [32, 64]: downsampling factor 2); a UNet with block_out_channels
    [32, 64], attention_head_dim 8 (diffusers' name for 8 heads), cross_attention_dim 32, sample_size 32. Built from
    explicit configs with seeded weights and written with diffusers' own save_pretrained (no network). The vocabulary
    is CLIP's 49408 (the tokenizer gbsd uses); the scheduler is CompVis DDIM. `sd2`: the text encoder is SD2's kind
    (exact GELU, a tokenizer that pads with "!", id 0); `scheduler`: DDIMScheduler options over CompVis DDIM's (e.g. a
    zero-terminal-SNR v-prediction schedule)."""
    from pathlib import Path

    from _reference import DDIM_CONFIG, clip_tokenizer
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=layers_per_block, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    vae = DAutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(HFCLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=text_layers, pad_token_id=1, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu"))
    pipe = StableDiffusionPipeline(
        vae=randomize_(vae, seed + 1), text_encoder=randomize_(text, seed + 2), unet=randomize_(unet, seed),
        tokenizer=clip_tokenizer(folder.parent / f"{folder.name}-tokenizer", pad_token="!" if sd2 else None),
        scheduler=DDIMScheduler(**{**DDIM_CONFIG, **(scheduler or {})}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder

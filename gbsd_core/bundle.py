"""`SDBundle`: a loaded Stable Diffusion -- the three networks, tokenizer, family and noise schedule -- and the three
conversions every pipeline needs: prompt -> text embeddings (the UNet's conditioning), latents -> images, images ->
latents.

Made by `loading.load` from a checkpoint; tests and the bench assemble one from modules they build themselves.
`check_parts_fit` is the loader's check that the three parts work together (each checkpoint part is read alone, so
a 9-channel inpainting UNet or a text encoder of the wrong width would otherwise load and fail inside the network),
and `model_limits` the image-size facts of a bundle (`SDBundle.limits`) or of a checkpoint before it is loaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from .clip_text import CLIPTextConfig, CLIPTextEncoder
from .errors import NonFiniteError
from .family import Family, Recipe
from .noise_schedule import SD, NoiseSchedule
from .openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from .params import ModelLimits
from .prompts.encode import encode
from .sampling import Conditioning
from .sdxl_conditioner import SDXLConditioner, SDXLConditionerConfig, micro_embedding
from .tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

if TYPE_CHECKING:  # the tokenizer's BPE tables (open_clip) load on first use; PIL is only needed for images
    from PIL import Image

    from .prompts.embeddings import EmbeddingLibrary
    from .tokenizer import Tokenizer

TextEncoder = Union[CLIPTextEncoder, OpenCLIPTextEncoder, SDXLConditioner]

# The three networks of a LatentDiffusion checkpoint, by their attribute names here. (SDXL's text_encoder is sgm's
# conditioner with both text towers.)
COMPONENTS = ("unet", "vae", "text_encoder")


TextConfig = Union[CLIPTextConfig, OpenCLIPTextConfig, SDXLConditionerConfig]


@dataclass
class SDBundle:
    """A loaded Stable Diffusion: the three networks, tokenizer, family and noise schedule."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    family: Family
    noise_schedule: NoiseSchedule = SD  # β/ᾱ the UNet was trained on (a diffusers folder's scheduler config; else SD's)
    path: Path | None = None
    native_size: int | None = None  # a diffusers folder's unet sample_size x VAE factor; None: the family's
    # textual-inversion embeddings that prompts may name (gbsd_core/prompts/embeddings.py); None: none
    embeddings: EmbeddingLibrary | None = None

    def limits(self) -> ModelLimits:
        """VAE factor, latent channels, native and largest image side (what `params.image_size` checks)."""
        return model_limits(self.vae.config, self.family, self.native_size)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str, clip_skip: int = 1) -> torch.Tensor | Conditioning:
        """prompts -> token embeddings [B, 77, D] (D = 768 for SD1, 1024 for SD2), in the text encoder's dtype.

        SDXL: `Conditioning(context, pooled)`, the context [B, 77, 2048] (refiner: 1280) and the pooled text
        embedding [B, 1280]; `conditioning` adds the size embeddings the UNet also needs.
        """
        device = next(self.text_encoder.parameters()).device
        if isinstance(self.text_encoder, CLIPTextEncoder):
            return self.text_encoder(self.tokenizer(prompts).to(device), clip_skip=clip_skip)  # tokens [B, 77]
        if clip_skip != 1:  # Stability's SD2/SDXL embedders are fixed at the penultimate layer
            raise ValueError(f"clip_skip applies to SD1's CLIP text encoder only, got clip_skip={clip_skip} for "
                             f"{self.family.name}")
        if isinstance(self.text_encoder, SDXLConditioner):
            tokens = [self.tokenizer(prompts, pad_token_id=pad).to(device) for pad in self.text_encoder.pad_token_ids]
            return Conditioning(*self.text_encoder(tokens))
        return self.text_encoder(self.tokenizer(prompts).to(device))

    @torch.no_grad()
    def conditioning(self, prompt: str, size: tuple[int, int], negative: bool = False,
                     emphasis: str = "original") -> Conditioning:
        """What the UNet is conditioned on for one prompt (one row) when making an image of size (width, height).

        SD1/SD2: the token embeddings. SDXL: the context and the pooled embedding, plus the micro-conditioning for
        that size (original = target = the image's size, no crop; refiner: aesthetic score 6, or 2.5 for the negative
        prompt). SDXL base's empty negative prompt is zeros, not E("") (`Family.force_zeros_for_empty_prompt`).

        The prompt is read as A1111 writes it (gbsd_core/prompts/: `(word:1.2)`, BREAK, any length in 75-token chunks,
        the embeddings' names; `emphasis` "none" reads brackets as text), so the context is [1, 77·k, D] for k chunks.
        A plain prompt of at most 75 tokens is `encode_prompt`'s call and bits. Prompt editing ([from:to:when]) is a
        schedule of texts, which the pipeline encodes one by one (prompts/schedule.py); here a text is one text.
        """
        text = encode(self.text_encoder, self.tokenizer, prompt, emphasis, self.embeddings, self.family.name)
        if not isinstance(self.text_encoder, SDXLConditioner):
            return text
        if negative and prompt == "" and self.family.force_zeros_for_empty_prompt:
            text = text.map(torch.zeros_like)
        values = torch.tensor([self.text_encoder.micro_values(size, negative)], device=text.context.device)
        return text._replace(micro=micro_embedding(values, self.text_encoder.config.micro_dim))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents [B, C, h, w] -> B RGB images of fh x fw (C = 4 and f = 8 for SD's VAE, see `limits`)."""
        from PIL import Image

        z = latents.to(next(self.vae.parameters()).device) / self.vae.config.scale_factor  # 0.18215; SDXL 0.13025
        x = self.vae.decode(z).float()  # [B, 3, fh, fw] in about [-1, 1]
        check_finite(x, "the VAE's decoded images")
        x = ((x + 1) / 2).clamp(0, 1)
        # round() as diffusers' numpy_to_pil; CompVis' scripts truncate, at most 1/255 darker
        arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in arr]

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image] | torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """Images (PIL, or a [B, 3, H, W] tensor in [-1, 1]) -> scaled latents [B, C, H/f, W/f].

        sample=True draws from the posterior (CompVis img2img: `encode_first_stage(...)` then `get_first_stage_encoding`
        samples); sample=False takes its mean.
        """
        if not isinstance(images, torch.Tensor):
            import numpy as np

            from .images import to_rgb

            arr = np.stack([np.asarray(to_rgb(im), dtype=np.float32) for im in images])  # [B, H, W, 3]
            images = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
        posterior = self.vae.encode(images.to(next(self.vae.parameters()).device))
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.vae.config.scale_factor

    def describe(self) -> dict:
        """Family, parts, sizes and dtype, for `gbsd info`."""
        p = next(self.unet.parameters())
        limits = self.limits()
        parameters = {name: sum(t.numel() for t in getattr(self, name).parameters()) for name in COMPONENTS}
        if isinstance(self.text_encoder, SDXLConditioner):  # and per text tower
            parameters.update({f"text_encoder.embedders.{i}": sum(t.numel() for t in e.parameters())
                               for i, e in enumerate(self.text_encoder.embedders)})
        return {
            "path": str(self.path) if self.path else None,
            "family": self.family.name,
            "prediction_type": self.family.prediction_type,
            "resolution": self.family.resolution,
            "native_size": limits.native_size,
            "max_size": limits.max_size,
            "dtype": str(p.dtype).removeprefix("torch."),
            "vae_dtype": str(next(self.vae.parameters()).dtype).removeprefix("torch."),
            "device": str(p.device),
            "noise_schedule": describe_schedule(self.noise_schedule),
            # a few-step family runs its card's recipe by default (family.Recipe), e.g. trailing spacing over the
            # schedule's own leading one
            **({"recipe": describe_recipe(self.family.recipe)} if self.family.recipe is not None else {}),
            "parts": describe_parts(self.unet.config, self.vae.config, self.text_encoder.config),
            "parameters": parameters,
            "configs": {name: asdict(getattr(self, name).config) for name in COMPONENTS},
        }


# ------------------------------------------------------------------ checks and facts about the parts (off the route)


def check_parts_fit(unet: UNetConfig, vae: VAEConfig, text: TextConfig) -> None:
    """Raise ValueError naming the part that disagrees, if the three networks cannot run together with gbsd's
    tokenizer: latents flow VAE -> UNet -> VAE, the text encoder's tokens [B, 77] -> context [B, 77, width] feeds the
    UNet's cross-attention (SDXL: its towers' widths side by side, and the vector y its label embedding), images are
    RGB."""
    towers = ([t for t in (text.clip, text.openclip) if t is not None] if isinstance(text, SDXLConditionerConfig)
              else [text])
    width = sum(t.width for t in towers)
    problems = []
    if (vae.in_channels, vae.out_ch) != (3, 3):
        problems.append(f"the vae reads {vae.in_channels}-channel and writes {vae.out_ch}-channel images, not RGB")
    if unet.in_channels != vae.embed_dim:
        what = " (an inpainting UNet: latents + mask + masked image; not supported)" if unet.in_channels == 9 else ""
        problems.append(f"the unet takes {unet.in_channels}-channel input{what} but the vae makes {vae.embed_dim}-channel "
                        "latents")
    elif unet.out_channels != vae.embed_dim:
        problems.append(f"the unet predicts {unet.out_channels} channels but the vae's latents have {vae.embed_dim}")
    if unet.context_dim != width:
        problems.append(f"the unet's cross-attention reads {unet.context_dim}-wide context but the text encoder "
                        f"makes {width}-wide embeddings")
    vector = text.vector_dim if isinstance(text, SDXLConditionerConfig) else None
    if unet.adm_in_channels != vector:  # SDXL's pooled text + size embeddings, the UNet's label_emb input
        takes = f"a {unet.adm_in_channels}-wide vector y" if unet.adm_in_channels else "no vector y"
        gives = "none"
        if isinstance(text, SDXLConditionerConfig):
            values = (vector - text.openclip.embed_dim) // text.micro_dim
            gives = (f"a {vector}-wide one (pooled {text.openclip.embed_dim} + {values} size values x "
                     f"{text.micro_dim}, diffusers' addition_time_embed_dim)")
        problems.append(f"the unet takes {takes} but the text encoder gives {gives}")
    positions, vocab = min(t.context_length for t in towers), min(t.vocab_size for t in towers)
    if positions < CONTEXT_LENGTH:
        problems.append(f"the text encoder has {positions} positions but prompts are {CONTEXT_LENGTH} tokens")
    if vocab <= EOT_TOKEN_ID:
        problems.append(f"the text encoder has {vocab} token embeddings but CLIP's tokenizer emits token ids "
                        f"up to {EOT_TOKEN_ID}")
    if problems:
        raise ValueError("the parts do not fit together: " + "; ".join(problems))


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError when `x` holds NaN or inf, counting them: a NaN latent decodes to black pixels (the cast
    to uint8 makes NaN 0), so nothing may be made from it. One reduction over the tensor."""
    if bool(torch.isfinite(x).all()):
        return
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    raise NonFiniteError(f"{what} hold {nan} NaN and {inf} inf values (of {x.numel()}); no image is made from them")


def model_limits(vae: VAEConfig, family: Family, native_size: int | None = None) -> ModelLimits:
    """The image-size facts of a model: its VAE's factor and latent channels, the native side (a diffusers folder's
    own when it has one, else the family's) and the family's largest side."""
    return ModelLimits(vae_factor=vae.downsample_factor, latent_channels=vae.embed_dim,
                       native_size=native_size or family.resolution, max_size=family.max_size)


def describe_schedule(ns: NoiseSchedule) -> str:
    """One line for `gbsd info`: the β schedule, T, zero terminal SNR, and the spacing the samplers run by default."""
    return (f"{ns.beta_schedule}, beta {ns.beta_start:g} to {ns.beta_end:g}, {ns.num_train_timesteps} timesteps"
            + (", rescaled to zero terminal SNR" if ns.zero_terminal_snr else "") + f"; {ns.spacing} spacing")


def describe_recipe(recipe: Recipe) -> str:
    """One line for `gbsd info`: what a few-step family runs when no flag says otherwise."""
    return (f"{recipe.sampler}, {recipe.spacing} spacing, {recipe.steps} step{'s' if recipe.steps != 1 else ''}, "
            f"cfg {recipe.cfg:g} (the CLI's defaults for this family)")


def _tower(config: CLIPTextConfig | OpenCLIPTextConfig) -> str:
    kind = "CLIP" if isinstance(config, CLIPTextConfig) else "OpenCLIP"
    return f"{kind} text transformer, {config.layers} layers x {config.width} wide, {config.heads} heads"


def describe_parts(unet: UNetConfig, vae: VAEConfig, text: TextConfig) -> dict[str, str]:
    """One line per network (per text tower for SDXL): what `gbsd info` says each part is."""
    depth = unet.transformer_depth if isinstance(unet.transformer_depth, int) else list(unet.transformer_depth)
    parts = {
        "unet": (f"UNet, {len(unet.channel_mult)} levels of {[unet.model_channels * m for m in unet.channel_mult]} "
                 f"channels, attention at ds {list(unet.attention_resolutions)} (depth {depth}), context "
                 f"{unet.context_dim}" + (f", label embedding of a {unet.adm_in_channels}-wide vector y"
                                          if unet.adm_in_channels else "")),
        "vae": (f"KL autoencoder, {vae.downsample_factor}x downsampling, {vae.embed_dim} latent channels, scale "
                f"{vae.scale_factor}"),
    }
    if not isinstance(text, SDXLConditionerConfig):
        parts["text_encoder"] = _tower(text)
        return parts
    towers = [t for t in (text.clip, text.openclip) if t is not None]
    for i, tower in enumerate(towers):
        read = ("penultimate layer" if isinstance(tower, CLIPTextConfig)
                else f"penultimate block, pooled {tower.embed_dim}")
        parts[f"text_encoder.embedders.{i}"] = f"{_tower(tower)} ({read})"
    parts["text_encoder.micro_conditioning"] = ", ".join(text.micro_conditioning)
    return parts

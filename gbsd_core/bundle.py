"""`SDBundle`: a loaded Stable Diffusion -- the three networks, tokenizer, scheduler and family -- and the three
conversions every pipeline needs: prompt -> text embeddings (the UNet's conditioning), latents -> images, images ->
latents.

Made by `loading.load` from a checkpoint; tests and the bench assemble one from modules they build themselves.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from .clip_text import CLIPTextEncoder
from .ddim import DDIMScheduler
from .family import Family
from .openclip_text import OpenCLIPTextEncoder
from .sampling import Conditioning
from .sdxl_conditioner import SDXLConditioner, micro_embedding
from .unet import UNetModel
from .vae import AutoencoderKL

if TYPE_CHECKING:  # the tokenizer pulls in open_clip's BPE tables; PIL is only needed for images
    from PIL import Image

    from .tokenizer import Tokenizer

TextEncoder = Union[CLIPTextEncoder, OpenCLIPTextEncoder, SDXLConditioner]

# The three networks of a LatentDiffusion checkpoint, by their attribute names here. (SDXL's text_encoder is sgm's
# conditioner with both text towers.)
COMPONENTS = ("unet", "vae", "text_encoder")


@dataclass
class SDBundle:
    """A loaded Stable Diffusion: the three networks, tokenizer, scheduler and family."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    scheduler: DDIMScheduler
    family: Family
    path: Path | None = None

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
    def conditioning(self, prompt: str, size: tuple[int, int], negative: bool = False) -> Conditioning:
        """What the UNet is conditioned on for one prompt (one row) when making an image of size (width, height).

        SD1/SD2: the token embeddings. SDXL: the context and the pooled embedding, plus the micro-conditioning for
        that size (original = target = the image's size, no crop; refiner: aesthetic score 6, or 2.5 for the negative
        prompt). SDXL base's empty negative prompt is zeros, not E("") (`Family.force_zeros_for_empty_prompt`).
        """
        text = self.encode_prompt(prompt)
        if not isinstance(self.text_encoder, SDXLConditioner):
            return Conditioning(text)
        if negative and prompt == "" and self.family.force_zeros_for_empty_prompt:
            text = text.map(torch.zeros_like)
        values = torch.tensor([self.text_encoder.micro_values(size, negative)], device=text.context.device)
        return text._replace(micro=micro_embedding(values))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents [B, 4, h, w] -> B RGB images of 8h x 8w."""
        from PIL import Image

        z = latents.to(next(self.vae.parameters()).device) / self.vae.config.scale_factor  # 0.18215; SDXL 0.13025
        x = self.vae.decode(z).float()  # [B, 3, 8h, 8w] in about [-1, 1]
        x = ((x + 1) / 2).clamp(0, 1)
        # round() as diffusers' numpy_to_pil; CompVis' scripts truncate, at most 1/255 darker
        arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in arr]

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image] | torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """Images (PIL, or a [B, 3, H, W] tensor in [-1, 1]) -> scaled latents [B, 4, H/8, W/8].

        sample=True draws from the posterior (CompVis img2img: `encode_first_stage(...)` then `get_first_stage_encoding`
        samples); sample=False takes its mean.
        """
        if not isinstance(images, torch.Tensor):
            import numpy as np

            arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # [B, H, W, 3]
            images = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
        posterior = self.vae.encode(images.to(next(self.vae.parameters()).device))
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.vae.config.scale_factor

    def describe(self) -> dict:
        """Family, sizes and dtype, for `gbsd info`."""
        p = next(self.unet.parameters())
        return {
            "path": str(self.path) if self.path else None,
            "family": self.family.name,
            "prediction_type": self.family.prediction_type,
            "resolution": self.family.resolution,
            "dtype": str(p.dtype).removeprefix("torch."),
            "vae_dtype": str(next(self.vae.parameters()).dtype).removeprefix("torch."),
            "device": str(p.device),
            "parameters": {name: sum(t.numel() for t in getattr(self, name).parameters()) for name in COMPONENTS},
            "configs": {name: asdict(getattr(self, name).config) for name in COMPONENTS},
        }

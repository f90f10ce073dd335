"""The walk: GBSD on Stable Diffusion 1.x / 2.x from prompt to pixels, in one straight-line function to read.

    python -m gbsd_core.walk "a bunny and a carrot in a garden, bokeh" --focus "a carrot" -o walk.png
    python -m gbsd_core.walk "a bunny and a carrot in a garden, bokeh" --focus "a carrot" --tiny   # no weights

It calls the networks of a loaded bundle (tokenizer, text encoder, UNet, VAE) and torch, nothing else; DDIM with
η = 0, classifier-free guidance and the GBSD switch are written out below. `pipeline.generate` computes the same
image, bit for bit (tests/test_learn.py), through stages as data, samplers, branching and checks: read this first.
The cells (`# %%`) follow docs/LEARN.md's route. Shapes are SD1.5's at 512x512 (SD2: D = 1024).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from .bundle import SDBundle


def _quiet(name: str, value: torch.Tensor) -> None:
    pass


@torch.no_grad()
def walk(bundle: SDBundle, prompt: str, focus: str | None = None, alpha: float = 0.5, layout: float = 0.8,
         steps: int = 50, cfg: float = 7.5, negative: str = "", seed: int = 0, size: tuple[int, int] | None = None,
         show: Callable[[str, torch.Tensor], None] = _quiet) -> torch.Tensor:
    """One image [1, 3, H, W] uint8. `focus` None is plain SD on `prompt`; `show(name, tensor)` sees each stage."""
    unet, vae, device = bundle.unet, bundle.vae, next(bundle.unet.parameters()).device

    # %% 1. Text -> E. The tokenizer frames a prompt as 77 ids: start, up to 75 BPE ids, end, padding. The text
    # encoder turns them into one vector per position (CLIP's last layer, SD1; OpenCLIP's penultimate, SD2).
    # ids [1, 77] -> E [1, 77, 768]. GBSD's focus conditioning mixes two prompts' E, position by position.
    e_neg, e_global, e_local = (bundle.text_encoder(bundle.tokenizer(text).to(device)).float()
                                for text in (negative, prompt, prompt if focus is None else focus))
    e_focus = alpha * e_global + (1 - alpha) * e_local  # GBSD's focus conditioning
    show("E(global)", e_global)

    # %% 2. The noise schedule. Training noised a latent x_0 to x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε over T = 1000 steps,
    # β_t linear in √β from 0.00085 to 0.012 (CompVis, built in float64, kept as float32). DDIM visits every
    # (T/n)-th timestep plus one: 50 steps are 981, 961, ..., 1. GBSD's layout fraction puts the first n_layout of
    # them in the layout stage (rounded half up; 1e-9 absorbs float error such as 0.7·10 = 7.000000000000001).
    # (Below ~5 steps the library also keeps one step in each stage: README, "Few-step models".)
    T = 1000
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)  # ᾱ_t [1000]
    timesteps = [i * (T // steps) + 1 for i in reversed(range(steps))]
    n_layout = math.floor(layout * steps + 0.5 + 1e-9) if focus is not None else steps

    # %% 3. x_T: pure noise in the VAE's latent space, 8x smaller than the image, 4 channels: [1, 4, 64, 64].
    # Drawn on a CPU generator, so a seed gives the same image on any device.
    width, height = size or (bundle.native_size or bundle.family.resolution,) * 2
    f = vae.config.downsample_factor
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, vae.config.embed_dim, height // f, width // f), generator=generator).to(device)
    show("x_T", x)

    # %% 4. The loop. One UNet call on the batch [x; x] with [E(negative); cond] predicts the noise both ways;
    # guidance moves from the unconditional towards the conditional prediction (Ho & Salimans 2022). DDIM's eq. 12
    # with η = 0 then steps x_t to x_prev: predict x̂_0, and re-noise it to the previous timestep along ε̂.
    # (At cfg ≤ 1 the library skips guidance and runs the conditional half alone, as diffusers does.)
    for i, t in enumerate(timesteps):
        cond = e_global if i < n_layout else e_focus  # the GBSD switch: layout stage, then focus stage
        out = unet(torch.cat([x, x]), torch.full((2,), t), torch.cat([e_neg, cond]))  # [2, 4, 64, 64]
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + cfg * (out_cond - out_uncond)
        a, a_prev = float(alphas_cumprod[t]), float(alphas_cumprod[max(t - T // steps, 0)])  # ᾱ_t, ᾱ_prev
        if bundle.family.prediction_type == "epsilon":  # the UNet predicts ε (SD1, SD2-512)
            eps = out
            x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        else:  # it predicts v = √ᾱ·ε − √(1−ᾱ)·x_0 (SD2-768-v)
            x0 = math.sqrt(a) * x - math.sqrt(1.0 - a) * out
            eps = math.sqrt(a) * out + math.sqrt(1.0 - a) * x
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    show("z_0", x)

    # %% 5. Decode: undo the latent scale (0.18215 for SD), run the VAE decoder: [1, 4, 64, 64] -> [1, 3, 512, 512]
    # in about [-1, 1], then to 0..255 (rounded, as diffusers).
    image = vae.decode(x / vae.config.scale_factor).float()
    show("image", image)
    return (((image + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)


def tiny_bundle() -> SDBundle:
    """An SD1-shaped bundle of small random networks, for stepping through the walk without a checkpoint."""
    from .clip_text import CLIPTextConfig, CLIPTextEncoder
    from .family import SD1
    from .tokenizer import Tokenizer
    from .unet import UNetConfig, UNetModel
    from .vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                                num_heads=-1, num_head_channels=32, context_dim=64))
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    text = CLIPTextEncoder(CLIPTextConfig(width=64, layers=2, heads=1))
    return SDBundle(unet.eval(), vae.eval(), text.eval(), Tokenizer(SD1.pad_token_id), SD1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gbsd_core.walk", description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--focus", help="the local prompt kept sharp (omit for plain SD)")
    for flag, kind, default in (("--alpha", float, 0.5), ("--layout", float, 0.8), ("--steps", int, 50),
                                ("--cfg", float, 7.5), ("--negative", str, ""), ("--seed", int, 0)):
        p.add_argument(flag, type=kind, default=default, help=f"as gbsd generate ({default!r})")
    p.add_argument("--size", metavar="WxH", help="image size (the model's native size)")
    p.add_argument("--weights", help="checkpoint file or diffusers folder (e.g. weights/v1-5-pruned-emaonly.safetensors)")
    p.add_argument("--tiny", action="store_true", help="small random networks, no weights; prints each stage's shape")
    p.add_argument("-o", "--output", default="gbsd.png")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    if args.tiny:
        bundle, size = tiny_bundle(), size or (64, 64)
    elif args.weights is None:
        p.error("--weights PATH is needed (or --tiny)")
    else:
        from . import load

        bundle = load(args.weights)
    show = (lambda name, v: print(f"{name:10s} {list(v.shape)}")) if args.tiny else _quiet
    image = walk(bundle, args.prompt, args.focus, args.alpha, args.layout, args.steps, args.cfg, args.negative,
                 args.seed, size, show)
    from PIL import Image

    Image.fromarray(image[0].permute(1, 2, 0).cpu().numpy()).save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()

"""The KL-f8 autoencoder of Stable Diffusion (checkpoint subtree ``first_stage_model.``).

Follows CompVis ``ldm/models/autoencoder.py`` (``AutoencoderKL``) and ``ldm/modules/diffusionmodules/model.py``
(``Encoder``, ``Decoder``, ``ResnetBlock``, ``AttnBlock``, ``Downsample``, ``Upsample``). Module names are the
checkpoint's key names, so a real file's ``first_stage_model.*`` tensors load with ``strict=True`` and no mapping::

    encoder.conv_in
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}   i < len(ch_mult), j < num_res_blocks
    encoder.down.{i}.downsample.conv                                    every level but the last
    encoder.mid.{block_1,attn_1,block_2}     attn_1 = {norm,q,k,v,proj_out}, q/k/v/proj_out are 1x1 convs
    encoder.norm_out, encoder.conv_out       conv_out gives 2*z_channels (mean and logvar)
    quant_conv                               1x1, 2*z_channels -> 2*embed_dim
    post_quant_conv                          1x1, embed_dim -> z_channels
    decoder.conv_in, decoder.mid.*
    decoder.up.{i}.block.{j}                 j < num_res_blocks + 1; up.0 is the FULL-resolution level
    decoder.up.{i}.upsample.conv             every level but up.0
    decoder.norm_out, decoder.conv_out

SD1 and SD2 share this VAE (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4): 248 keys, 83.65M parameters.

Precision note (what diffusers calls ``force_upcast``): the SD1/SD2 VAE is usually run in fp32 because its
activations grow large in the decoder (past fp16's 65504); diffusers upcasts it for that reason. Everything here runs
in whatever dtype the module's weights have (``encode``/``decode`` cast their input to it), so the caller chooses:
``loading.load`` keeps the VAE in fp32 even when the UNet runs in fp16. GroupNorm always computes its statistics in
fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .norm import GroupNorm32


# Released latent scales, x, from SDXL's 0.13025 and SD's 0.18215 to SD3's 1.5305 (Flux 0.3611): the factor that brings
# the encoder's latents to about unit variance. A factor far outside that range is a broken config (1e-30 passes as a
# positive number, and the decoder's division by it gives inf, then NaN pixels), refused by name.
SCALE_FACTOR_RANGE = (0.01, 10.0)


def check_scale_factor(value: float, name: str) -> None:
    """ValueError naming `name` (ours: scale_factor, diffusers': scaling_factor) unless `value` is in the range above."""
    lo, hi = SCALE_FACTOR_RANGE
    if not lo <= value <= hi:  # also False for NaN
        raise ValueError(f"{name} {value:g} is not a plausible latent scale: it brings latents to about unit "
                         f"variance, so it lies in [{lo:g}, {hi:g}] (released VAEs: 0.13025 to 1.5305); the decoder "
                         "divides by it")


@dataclass(frozen=True)
class VAEConfig:
    """``ddconfig`` + ``embed_dim`` of the ``first_stage_config`` in v1-inference.yaml / v2-inference.yaml.

    The YAML also has ``resolution: 256``, ``attn_resolutions: []`` and ``dropout: 0.0``. They are left out on purpose:
    resolution only decides where attention goes, SD's VAE has attention only in the mid blocks, and dropout is off.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True
    # Latents are multiplied by this before the UNet sees them (LatentDiffusion.scale_factor, a plain float in the
    # YAML, never stored in the checkpoint). Applied by the caller, not by encode/decode.
    scale_factor: float = 0.18215

    def __post_init__(self) -> None:
        # CompVis AutoencoderKL asserts double_z: the encoder must emit mean and logvar.
        if not self.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder outputs mean and log-variance)")
        check_scale_factor(self.scale_factor, "scale_factor")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side: 8 for SD (one stride-2 conv per level but the last)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "VAEConfig":
        """Infer the architecture from tensor shapes of a ``first_stage_model.`` subtree (prefix stripped).

        ``scale_factor`` is not stored in checkpoints; it keeps its SD default.
        """
        conv_in = sd["encoder.conv_in.weight"]  # [ch, in_channels, 3, 3]
        ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        # The first block of each level maps the previous width to ch * ch_mult[i].
        ch_mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels))
        num_res_blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        z_channels = int(sd["decoder.conv_in.weight"].shape[1])
        return cls(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            embed_dim=int(sd["post_quant_conv.weight"].shape[1]),
            in_channels=in_channels,
            out_ch=int(sd["decoder.conv_out.weight"].shape[0]),
            double_z=int(sd["encoder.conv_out.weight"].shape[0]) == 2 * z_channels,
        )


def Normalize(channels: int) -> GroupNorm32:
    # CompVis `Normalize`: 32 groups, eps 1e-6 everywhere in the VAE (the UNet's ResBlocks use 1e-5).
    return GroupNorm32(channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """CompVis ResnetBlock without the time embedding (temb_channels=0 in the VAE)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 conv when the width changes (use_conv_shortcut=False in SD, so never the 3x3 `conv_shortcut`).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W] -> [B, C_out, H, W]; dropout is 0.0 in SD, so it is omitted (it has no weights).
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj_out are 1x1 convs as in CompVis."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W]; attention over the H*W tokens, one head of width C, scale C**-0.5.
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CompVis pads right and bottom only, then a stride-2 conv with no padding: [B,C,H,W] -> [B,C,H/2,W/2].
        # (A symmetric padding=1 conv gives the same shape but different numbers.)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest-neighbour x2 then a 3x3 conv: [B,C,H,W] -> [B,C,2H,2W].
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """The `mid` container: block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder level (`encoder.down.{i}`): `block`, a list of ResnetBlocks, then an optional `downsample`.

    CompVis also gives each level an `attn` ModuleList; it is empty for SD (attn_resolutions: []) and holds no
    weights, so it is not built here.
    """

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(n_blocks)
        )
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class UpLevel(nn.Module):
    """One decoder level (`decoder.up.{i}`): `block`, a list of ResnetBlocks, then an optional `upsample`."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(n_blocks)
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if self.upsample is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            last = i == len(cfg.ch_mult) - 1
            self.down.append(DownLevel(cfg.ch * in_ch_mult[i], cfg.ch * mult, cfg.num_res_blocks, not last))
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.mid = MidBlock(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_channels, H, W] -> [B, 2*z_channels, H/f, W/f], f = 2**(len(ch_mult)-1)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        # CompVis builds the levels from the lowest resolution up but *prepends* each one (`self.up.insert(0, up)`),
        # so up.0 is the full-resolution level and the forward pass walks the list from the last index down.
        levels: list[UpLevel] = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            levels.insert(0, UpLevel(block_in, block_out, cfg.num_res_blocks + 1, upsample=i != 0))
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, z_channels, h, w] -> [B, out_ch, h*f, w*f]; no tanh (tanh_out=False in SD).
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)) returned by ``encode`` (CompVis DiagonalGaussianDistribution)."""

    def __init__(self, moments: torch.Tensor) -> None:
        # moments: [B, 2*embed_dim, h, w] = mean and log-variance stacked on the channel axis.
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        # CompVis clamps the log-variance so exp() can neither overflow nor underflow to 0.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps. eps is drawn in fp32 on the generator's device (CPU generator -> the same latent on any
        device for a given seed), then moved to the mean's device and dtype."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """encode: image in [-1, 1] -> DiagonalGaussian over latents; decode: latent -> image in about [-1, 1].

    Latents here are *unscaled*; the diffusion model works on ``config.scale_factor * z`` and the caller applies it.
    """

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def _check_size(self, x: torch.Tensor, what: str, multiple: int) -> None:
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        # x: [B, in_channels, H, W] in [-1, 1] -> posterior over [B, embed_dim, H/8, W/8] (f=8 for SD)
        # A size that is not a multiple of f would still run but decode to a different size; refuse it early.
        self._check_size(x, "image", self.config.downsample_factor)
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, embed_dim, h, w] (unscaled) -> [B, out_ch, 8h, 8w], computed and returned in the module's dtype
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

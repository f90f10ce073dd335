"""Where is the focused object? Cross-attention maps of the local prompt's words, collected while sampling.

GBSD needs a target region to score sharpness on, and we want it without running a segmentation model. The UNet
already says where each word goes: the cross-attention (`attn2`) of every SpatialTransformer distributes each image
position's attention over the 77 context tokens (Hertz et al. 2022, "Prompt-to-Prompt", use the same maps to edit
objects). The map we collect, for one image, is

    M[y, x] = mean over (focus-stage steps s, attn2 layers l at the chosen levels, heads h) of
              sum over focus positions j of softmax_k(q·k / sqrt(d))[s, l, h, (y, x), j]

i.e. the share of the position's attention that lands on the focus words, in [0, 1]. Layers at coarser levels are
upsampled bilinearly to the finest collected grid before the mean.

Choices, and why:
- Levels: ds 2 and 4 (a 64x64 latent gives 32x32 and 16x16 maps; 512² images). ds 1 maps are noisy and ds 8
  (8x8) too coarse to outline an object; the middle two are the ones Prompt-to-Prompt visualises.
- Steps: the focus stage only. Its context is α·E(global) + (1−α)·E(local) (sampling.focus_conditioning), mixed
  position by position, so context positions 1..len(local) hold the local prompt's word tokens (weighted 1−α,
  mixed with the global prompt's first words, weighted α). Those positions are the "focus tokens". Position 0
  (the start token, which soaks up most attention) and the end/padding positions are left out. A local prompt as
  A1111 writes it (gbsd_core/prompts/) has its words in each of its 77-token chunks, and a run whose prompts have
  other chunk counts repeats its context whole (`chunk_padding` "repeat"): then the words come back every
  77·k positions (`period`; `focus_collector` works both out).
- Classifier-free guidance runs the UNet on [uncond; cond]; only the conditional half is read: the unconditional
  branch attends to the empty prompt, whose positions carry no words.
- The probabilities are recomputed beside each attn2 (a forward pre-hook computes softmax(q k^T · scale) from the
  module's own inputs and weights, `attention_probs`), not taken out of the module's forward: that runs a fused
  SDPA kernel that never materialises them, and collecting must leave the image bit-identical. Hooks are attached
  only for the UNet calls of collected steps and removed right after; with no collector nothing is attached at all.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import CrossAttention
from ..attention_sites import attention_sites, query_hw
from ..prompts.encode import read_prompt
from ..prompts.schedule import prompt_schedule, text_at
from ..sampling import Denoiser, Stage, layout_steps
from ..tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, SOT_TOKEN_ID
from ..unet import UNetModel
from .masks import attention_to_mask

if TYPE_CHECKING:
    from ..bundle import SDBundle
    from ..params import GenerationParams

MIDDLE_LEVELS = (2, 4)  # downsampling factors ds of the collected attn2 layers (32x32 and 16x16 for 512² images)


def attention_probs(module: CrossAttention, x: Tensor, context: Tensor) -> Tensor:
    """The attention probabilities `module` computes for (x, context), recomputed in fp32: softmax_k(q·k / √d).

    x: [B, Nq, query_dim] (the module's input, already normalised); context: [B, Nk, context_dim]
    -> [B, heads, Nq, Nk], each row summing to 1 over the keys. fp32 whatever the model runs in: this is a
    measurement, and fp16 softmax sums drift.
    """
    with torch.no_grad():
        q = module.split_heads(module.to_q(x)).float()  # [B, heads, Nq, d]
        k = module.split_heads(module.to_k(context)).float()  # [B, heads, Nk, d]
        return (q @ k.transpose(-1, -2) * module.scale).softmax(dim=-1)


def word_positions(tokens: Tensor) -> list[int]:
    """Context positions of a prompt's word tokens: 1 .. n for a row [start, w_1 … w_n, end, pad …] of [77] ids."""
    row = [int(i) for i in tokens.reshape(-1)]
    if row[0] != SOT_TOKEN_ID:
        raise ValueError(f"token row does not begin with the start token {SOT_TOKEN_ID}")
    try:
        end = row.index(EOT_TOKEN_ID, 1)
    except ValueError:
        raise ValueError("token row has no end token") from None
    if end == 1:
        raise ValueError("the prompt has no words (empty focus prompt)")
    return list(range(1, end))


def prompt_positions(bundle: SDBundle, prompt: str, params: GenerationParams) -> tuple[list[int], int | None]:
    """(context positions of a local prompt's words, the period they repeat with in the run's context or None), as
    `params` reads and lays out prompts (gbsd_core/prompts/; an edited prompt: its text where the focus stage
    starts). ValueError when the prompt has no words."""
    n = params.steps
    text = text_at(prompt_schedule(prompt, n), layout_steps(n, params.layout))
    read = read_prompt(text, bundle.tokenizer, params.emphasis, bundle.embeddings)
    positions = read.word_positions()
    if not positions:
        raise ValueError("the prompt has no words (empty focus prompt)")
    return positions, CONTEXT_LENGTH * len(read.chunks) if params.chunk_padding == "repeat" else None


def focus_collector(bundle: SDBundle, prompt: str, params: GenerationParams) -> CrossAttentionCollector:
    """A collector of the focus-stage attention on `prompt`'s words in a run of `params` (eval, grid, rack)."""
    positions, period = prompt_positions(bundle, prompt, params)
    return CrossAttentionCollector(bundle.unet, positions, period=period)


class CrossAttentionCollector:
    """Accumulates the cross-attention mass on chosen context positions over the UNet calls of chosen steps.

        collector = focus_collector(bundle, focus, params)        # or CrossAttentionCollector(unet, positions)
        result = generate(bundle, params, probe=collector)        # pipeline wraps its denoiser with `wrap`
        mask = collector.mask(0, (height, width))                 # bool [H, W] for result row 0

    One collector serves one run (a `generate` or a `sweep`); `reset()` clears it for another.
    """

    def __init__(self, unet: UNetModel, positions: Sequence[int], levels: Sequence[int] = MIDDLE_LEVELS,
                 stage_names: Collection[str] = ("focus",), period: int | None = None) -> None:
        self.sites = [s for s in attention_sites(unet, cross=True) if s.ds in set(levels)]
        if not self.sites:
            have = sorted({s.ds for s in attention_sites(unet, cross=True)})
            raise ValueError(f"the UNet has no cross-attention at levels ds={tuple(levels)} (it has ds={have})")
        positions = sorted(set(int(p) for p in positions))
        if not positions:
            raise ValueError("no context positions to collect")
        self.positions = positions
        self.period = period  # the positions repeat every `period` context positions (a repeated context)
        self.stage_names = frozenset(stage_names)
        self._ds = {id(s.module): s.ds for s in self.sites}
        self.reset()

    def _at(self, length: int) -> list[int]:
        """The collected positions in a context of `length` positions."""
        if self.period is None:
            return [p for p in self.positions if p < length]
        return [p + k * self.period for k in range(length // self.period) for p in self.positions]

    def reset(self) -> None:
        self._sums: dict[int, Tensor] = {}  # ds -> float64 [B, h_ds, w_ds], summed over layers and steps
        self._count = 0  # (layer, step) contributions
        self.timesteps: list[int] = []  # the collected steps' timesteps, in order
        self._latent_hw: tuple[int, int] | None = None
        self._cfg = False

    # ------------------------------------------------------------------------------------------- collecting

    def _pre_hook(self, module: CrossAttention, args: tuple[Tensor, ...]) -> None:
        x, context = args[0], args[1]  # [N, Nq, C] (already norm2'ed), [N, 77, D]; N = 2B with CFG
        if self._cfg:
            x, context = x.chunk(2)[1], context.chunk(2)[1]  # the conditional half
        probs = attention_probs(module, x, context)  # [B, heads, Nq, 77]
        mass = probs[..., self._at(context.shape[1])].sum(-1).mean(1)  # [B, Nq]
        ds = self._ds[id(module)]
        h, w = (query_hw(n, ds) for n in self._latent_hw)
        m = mass.double().reshape(-1, h, w).cpu()
        if ds in self._sums and self._sums[ds].shape != m.shape:
            raise ValueError(f"collected maps changed shape between steps ({tuple(self._sums[ds].shape)} -> "
                             f"{tuple(m.shape)}); use one collector per run")
        self._sums[ds] = self._sums[ds] + m if ds in self._sums else m
        self._count += 1

    def wrap(self, model: Denoiser, timesteps: Tensor, stages: Sequence[Stage], cfg: bool) -> Denoiser:
        """A denoiser that collects during the UNet calls of the steps in stages named `stage_names`.

        `model` must end in the UNet this collector was built on (hooks sit on its attn2 modules); `cfg`: the model
        is called on [uncond; cond] batches. Steps are recognised by their timestep (unique within a schedule). The
        wrapper takes SDXL's fourth argument, the vector y, and passes it on unchanged.
        """
        active = {int(timesteps[i]) for st in stages if st.name in self.stage_names for i in st.steps}

        def call(x: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> Tensor:
            # SDXL's UNet also takes the vector y ([N, adm]); SD1/SD2 denoisers are called with three arguments
            return model(x, t, context) if y is None else model(x, t, context, y)

        def collecting(x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
            # x: [N,4,h,w], t: [N], context: [N,77,D]
            step_t = int(t.reshape(-1)[0])
            if step_t not in active:
                return call(x, t, context, y)
            self._latent_hw, self._cfg = (x.shape[-2], x.shape[-1]), cfg
            handles = [s.module.register_forward_pre_hook(self._pre_hook) for s in self.sites]
            try:
                out = call(x, t, context, y)
            finally:
                for handle in handles:
                    handle.remove()
            self.timesteps.append(step_t)
            return out

        return collecting

    # ------------------------------------------------------------------------------------------------ reading

    @property
    def collected(self) -> bool:
        return self._count > 0

    def token_map(self) -> Tensor:
        """The mean attention mass on the positions, float64 [B, h, w] on the finest collected grid (see module doc)."""
        if not self.collected:
            raise ValueError("no attention was collected (the run had no step in stages "
                             f"{sorted(self.stage_names)}: e.g. a layout fraction of 1 has no focus stage)")
        finest = min(self._sums)
        size = tuple(self._sums[finest].shape[-2:])
        total = torch.zeros_like(self._sums[finest])
        for ds, s in self._sums.items():
            total += s if ds == finest else F.interpolate(s[:, None], size=size, mode="bilinear",
                                                          align_corners=False)[:, 0]
        return total / self._count

    def mask(self, row: int, size: tuple[int, int]) -> np.ndarray:
        """Bool mask [H, W] of batch row `row` (size = (H, W)): the map upsampled and Otsu-thresholded."""
        return attention_to_mask(self.token_map()[row], size)

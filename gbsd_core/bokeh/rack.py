"""Rack focus: pull the focus from one object to another across a scene that stays put.

A cinematographer's rack focus keeps the shot and moves the plane of focus. GBSD can do the same without re-running
the layout: the layout stage (the global prompt) places the objects, and only the focus stage says which one is
sharp. So the layout stage runs ONCE, and the focus stage branches into K frames whose local embedding moves in a
straight line from E(from) to E(to):

    local_k = (1 − m_k)·E(from) + m_k·E(to),   m_k = k / (K − 1),  k = 0 … K−1    (sampling.blend_embeddings)
    focus-stage context_k = α·E(global) + (1 − α)·local_k                         (α fixed)

This is `pipeline.sweep` with `mixes=`: the K focus branches run as one batch, so the UNet is evaluated
n_layout + K·n_focus times instead of K·n, and frame k equals the independent `generate` run with
`focus=from, focus_to=to, focus_mix=m_k` (same seed, same x_T; up to batched-matmul rounding, ≤ 1/255).

Sharpness per frame, for both objects, needs each object's region. In the focus stage the context mixes the two
local prompts position by position, so one frame's attention cannot tell them apart; but the end frames are pure:
frame 0's focus stage is conditioned on E(from) alone and frame K−1's on E(to) alone. The mask of `from` is frame
0's cross-attention on its words, that of `to` frame K−1's (attnmaps.CrossAttentionCollector, which collects every
batch row). The shared layout keeps both objects where they are, so every frame is measured on those two masks:
target = inside, background = outside (metrics.SharpnessReport).

    rack = rack_focus(bundle, GenerationParams(prompt, focus="a bunny", focus_to="a carrot", seed=1), frames=12)
    save_animation(rack.images(), "rack.webp"); rack.sheet().save("rack_sheet.png")
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from torch import Tensor

from .. import pipeline
from ..pipeline import GenerationParams, GenerationResult
from ..sampling import Denoiser, Probe, Stage, StageSwitch
from .attnmaps import CrossAttentionCollector, focus_collector
from .metrics import SharpnessReport, to_gray
from .pictures import captioned, fit_cell, tile

if TYPE_CHECKING:
    from ..bundle import SDBundle

MAX_FRAMES = 64  # all frames run as one batch in the focus stage: K latents (2K with CFG) at once
LABEL_CHARS = 18  # object labels under the frames are cut to this many characters


def rack_mixes(frames: int) -> list[float]:
    """m_k = k / (K − 1) for k = 0 … K−1: from E(from) (m = 0) to E(to) (m = 1) in equal steps."""
    return [k / (frames - 1) for k in range(frames)]


def same_prompt(a: str, b: str) -> bool:
    """Whether two prompts tokenize alike: the CLIP tokenizer lower-cases and collapses white space."""
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def check_rack(params: GenerationParams, frames: int) -> None:
    """Raise ValueError naming the problem when `params` and `frames` do not make a rack focus."""
    if not isinstance(params, GenerationParams):
        raise ValueError(f"params must be a GenerationParams, got {type(params).__name__}")
    if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be an integer in [2, {MAX_FRAMES}], got {frames!r}")
    if params.focus is None or params.focus_to is None:
        raise ValueError("a rack focus needs the object to pull focus from (focus) and to (focus_to)")
    for name, prompt in (("focus", params.focus), ("focus_to", params.focus_to)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{name} is empty: name an object in the scene")
    if same_prompt(params.focus, params.focus_to):
        raise ValueError(f"focus and focus_to are the same prompt ({params.focus!r}): nothing to pull focus between")
    params.validate()
    if params.layout >= 1.0:
        raise ValueError("a layout fraction of 1 leaves no focus stage: every frame would be the same image")
    if params.alpha >= 1.0:
        raise ValueError("alpha 1 leaves the local prompts out of the focus stage: every frame would be the same image")


@dataclass(frozen=True)
class RackFrame:
    result: GenerationResult  # the image and the parameters that reproduce it alone (focus_mix = m_k)
    sharpness: dict[str, SharpnessReport]  # object prompt -> target/background sharpness; {} without masks

    @property
    def mix(self) -> float:
        return self.result.params.focus_mix


@dataclass(frozen=True)
class Rack:
    frames: list[RackFrame]
    masks: dict[str, np.ndarray]  # object prompt -> bool mask [H, W]; an object whose mask failed is absent
    unet_calls: int  # n_layout + K·n_focus

    def images(self) -> list[Image.Image]:
        return [f.result.image for f in self.frames]

    def captions(self) -> list[str]:
        """Per frame: "frame 3/12  m 0.18", then one line per object, "a bunny: T 95.5 / B 12.1" (the variance of
        the Laplacian inside / outside its mask), or "no masks" when none could be made."""
        lines = []
        for i, f in enumerate(self.frames):
            head = f"frame {i + 1}/{len(self.frames)}  m {f.mix:.2f}"
            objects = [f"{p[:LABEL_CHARS]}: {rep.caption()}" for p, rep in f.sharpness.items()] or ["no masks"]
            lines.append("\n".join([head, *objects]))
        return lines

    def sheet(self, columns: int | None = None) -> Image.Image:
        """Every frame at strip size above its caption, in order (at most 8 per row unless `columns` is given)."""
        return tile(captioned([fit_cell(im) for im in self.images()], self.captions()), columns)


class _Probes:
    """Several probes on one run: each wraps the denoiser the previous one returned (a `sampling.Probe`)."""

    def __init__(self, probes: Sequence[Probe]) -> None:
        self.probes = list(probes)

    def wrap(self, model: Denoiser, timesteps: Tensor, stages: Sequence[Stage], cfg: bool) -> Denoiser:
        for probe in self.probes:
            model = probe.wrap(model, timesteps, stages, cfg)
        return model


def _collectors(bundle: SDBundle, prompts: Sequence[str],
                params: GenerationParams) -> dict[str, CrossAttentionCollector]:
    """One focus-stage attention collector per object prompt; {} when the model has no attention to collect or a
    prompt has no words (the rack still runs, without masks)."""
    try:
        return {p: focus_collector(bundle, p, params) for p in prompts}
    except ValueError:
        return {}


def _measure(image: Image.Image, masks: dict[str, np.ndarray]) -> dict[str, SharpnessReport]:
    gray, reports = to_gray(image), {}
    for prompt, mask in masks.items():
        try:
            reports[prompt] = SharpnessReport.measure(gray, mask)
        except ValueError:  # a mask that covers everything leaves no background to compare with
            pass
    return reports


def rack_focus(bundle: SDBundle, params: GenerationParams, frames: int = 12, *, masks: bool = True,
               x_T: Tensor | None = None, progress: bool = False, switch: StageSwitch | None = None) -> Rack:
    """K = `frames` images pulling focus from `params.focus` to `params.focus_to`, sharing one layout stage.

    `params.focus_mix` is ignored (each frame gets its own m_k). masks=False skips the attention collection and the
    sharpness numbers. Raises ValueError (check_rack) before any compute when the request is not a rack focus.
    `switch`: told when each stage starts (sampling.StageSwitch, e.g. per-stage LoRAs), as in `pipeline.sweep`.
    """
    check_rack(params, frames)
    pipeline.check_run_args(bundle, params)
    start, end = params.focus, params.focus_to
    collectors = _collectors(bundle, [start, end], params) if masks else {}
    probe = _Probes(list(collectors.values())) if collectors else None
    # pipeline.sweep looked up at call time (not bound at import), so a test can watch the call
    results = pipeline.sweep(bundle, replace(params, focus_mix=0.0), mixes=rack_mixes(frames), x_T=x_T, probe=probe,
                             progress=progress, switch=switch)
    found: dict[str, np.ndarray] = {}
    size = (results[0].image.height, results[0].image.width)
    for prompt, row in ((start, 0), (end, frames - 1)):  # the pure end frames: E(from) alone, E(to) alone
        if prompt in collectors:
            try:
                found[prompt] = collectors[prompt].mask(row, size)
            except ValueError:  # a constant attention map localises nothing
                pass
    rack_frames = [RackFrame(r, _measure(r.image, found)) for r in results]
    return Rack(rack_frames, found, results[0].unet_calls)

"""Seeing the stages: a filmstrip of the denoising trajectory, x̂_0 after every k-th step, the GBSD boundary marked.

Every DDIM step estimates the clean image, x̂_0 = (x_t − √(1−ᾱ_t) ε_θ) / √ᾱ_t (ddim.py), long before the last step:
at first a blurry mean of what the prompt could be, then the layout, then the detail. GBSD's idea is *when* the
conditioning switches from the global prompt to the focus mix; the filmstrip shows what the image looked like on
both sides of that switch.

    tracer = Tracer(bundle.decode_latents)                     # or Tracer(latent_rgb_preview): no VAE, approximate
    result = generate(bundle, params, watch=tracer)            # the same image as without the tracer, bit for bit
    tracer.sheet().save("trace.png")
    save_animation(tracer.cells(), "trace.webp")

The `Tracer` is a `sampling.Watcher`: the pipeline hands it the run's state iterator, and it yields every state on
untouched, decoding x̂_0 of the kept steps on the side. Nothing it does reaches the latents, the stepper or the
random generator, so the final image is unchanged; the cost is one decode per kept frame (a full VAE decode with
`bundle.decode_latents`, a 4×3 matrix product with `latent_rgb_preview`).

Which steps are kept (`trace_steps`): the first, every k-th after it, the first step of every later stage (so the
marker sits on a frame) and the last; k is the smallest that keeps at most 16 frames unless given.
Each frame's caption: "step i/n" (1-based: x̂_0 after the i-th of n executed steps), "t <timestep>" (plus "sigma <σ>"
when the step state carries a noise level, as σ-based samplers' do; DDIM steps by t and has none), and the stage's
name, "<stage> starts" and a red bar on the first frame of each stage after the first.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from ..sampling import Stage, StepState
from .pictures import captioned, fit_cell, tile

MAX_FRAMES = 16  # the filmstrip's default cap: 16 frames stay readable on one sheet

# Latent -> RGB for Stable Diffusion's KL-f8 latent space (SD1.x; SD2 keeps SD1's autoencoder): rows are the four
# latent channels of the *scaled* latents the UNet works on, columns R, G, B. The published factors of ComfyUI's
# `latent_formats.SD15`, a least-squares fit of decoded colours that live previews use. The result lands in about
# [-1, 1] and is mapped to [0, 1] as a decoded image is. Approximate by design: one colour per 8×8 pixel block.
SD_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
LATENT_SCALE = 8  # pixels per latent position (the VAE's downsampling)


def latent_rgb_preview(latents: Tensor) -> list[Image.Image]:
    """Approximate images from scaled latents [B, 4, h, w] without the VAE: rgb = Σ_c latent_c · F[c], then
    (rgb + 1) / 2 clamped to [0, 1], rounded to 8 bits and enlarged 8× (nearest: one colour per 8×8 block, which
    is all the projection knows) to the image size."""
    if latents.ndim != 4 or latents.shape[1] != len(SD_LATENT_RGB_FACTORS):
        raise ValueError(f"expected latents [B, 4, h, w], got shape {tuple(latents.shape)}")
    factors = torch.tensor(SD_LATENT_RGB_FACTORS, dtype=torch.float32)  # [4, 3]
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), factors)  # [B, h, w, 3]
    arr = (((rgb + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    h, w = latents.shape[-2:]
    size = (w * LATENT_SCALE, h * LATENT_SCALE)
    return [Image.fromarray(a, mode="RGB").resize(size, Image.Resampling.NEAREST) for a in arr]


def _kept(n: int, every: int, starts: Sequence[int]) -> list[int]:
    return sorted({*range(0, n, every), *(s for s in starts if 0 < s < n), n - 1})


def trace_steps(n: int, stage_starts: Sequence[int] = (), every: int | None = None,
                max_frames: int = MAX_FRAMES) -> list[int]:
    """The executed-step indices (0-based) a trace keeps, ascending: 0, k, 2k, …, the first step of each later
    stage (`stage_starts`), and n − 1. `every` = k; None picks the smallest k that keeps at most `max_frames`
    (k = n if even that keeps more, i.e. more stage starts than frames)."""
    if n < 1:
        raise ValueError(f"a trace needs at least one step, got n={n}")
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        return _kept(n, every, stage_starts)
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    for k in range(1, n + 1):
        steps = _kept(n, k, stage_starts)
        if len(steps) <= max_frames:
            return steps
    return _kept(n, n, stage_starts)


@dataclass(frozen=True)
class TraceFrame:
    """One kept step: its decoded x̂_0 and what the caption says about it."""

    step: int  # executed-step index, 0-based
    n: int  # executed steps in the run
    timestep: int | float  # fractional where a Karras σ falls between training timesteps
    stage: str
    sigma: float | None  # the step state's noise level (σ-based samplers), None for DDIM
    starts_stage: bool  # the first step of a stage after the first: the marker goes here
    image: Image.Image

    def caption(self) -> str:
        """Three lines: "step 41/50", "t 181" (+ "  sigma 0.94" when known), "focus" or "focus starts"."""
        t = f"t {self.timestep:g}" + (f"  sigma {self.sigma:.3g}" if self.sigma is not None else "")
        return "\n".join((f"step {self.step + 1}/{self.n}", t, self.stage + (" starts" if self.starts_stage else "")))


class Tracer:
    """Keeps x̂_0 of chosen steps of one run, decoded, as `TraceFrame`s; a `sampling.Watcher` (pass `watch=`).

    decode: scaled latents [B, 4, h, w] -> images (`bundle.decode_latents`, or `latent_rgb_preview`);
    every / max_frames: which steps (`trace_steps`); row: which batch row of x̂_0 to show (generate has one).
    A tracer serves one run at a time; `watch` starts it afresh.
    """

    def __init__(self, decode: Callable[[Tensor], list[Image.Image]], every: int | None = None,
                 max_frames: int = MAX_FRAMES, row: int = 0) -> None:
        trace_steps(1, (), every, max_frames)  # fail on bad settings now, not at the first step
        self.decode, self.every, self.max_frames, self.row = decode, every, max_frames, row
        self.frames: list[TraceFrame] = []
        self.steps: list[int] = []  # the kept step indices of the last run

    def watch(self, states: Iterator[StepState], timesteps: Tensor,
              stages: Sequence[Stage]) -> Iterator[StepState]:
        n = len(timesteps)
        starts = {st.steps.start for st in stages[1:]}  # where the stage name changes: the GBSD boundary
        self.frames, self.steps = [], trace_steps(n, sorted(starts), self.every, self.max_frames)
        keep = set(self.steps)
        for state in states:
            if state.step in keep:
                image = self.decode(state.pred_x0[self.row:self.row + 1])[0]
                self.frames.append(TraceFrame(state.step, n, state.timestep, state.stage, state.sigma,
                                              state.step in starts, image))
            yield state

    def captions(self) -> list[str]:
        return [f.caption() for f in self.frames]

    def cells(self) -> list[Image.Image]:
        """The kept frames at strip size, each above its caption, the first frame of each later stage marked."""
        if not self.frames:
            raise ValueError("nothing traced yet: pass the tracer as watch= to a run first")
        marks = {i for i, f in enumerate(self.frames) if f.starts_stage}
        return captioned([fit_cell(f.image) for f in self.frames], self.captions(), marks)

    def sheet(self, columns: int | None = None) -> Image.Image:
        """One PNG-able sheet of every kept frame, in order (at most 8 per row unless `columns` says otherwise)."""
        return tile(self.cells(), columns)

"""What a generation may ask for: `GenerationParams`, and the rule of each of its fields, defined once (`FIELDS`).

Every entry point ends in a GenerationParams -- the CLI's flags, a PNG's metadata (`--from-png`), a pairs file of
`gbsd eval`, Python code -- and making one checks every field against FIELDS: its type (a bool is not an int, a
whole float is not an int, an int is a fine float), finiteness and range. A bad value raises ValueError naming the
field and what it must be; the CLI prints that as its one-line, exit-2 refusal. Numbers are stored as plain Python
int / float, so the metadata written from them is plain JSON.

What depends on the model -- the VAE's downsampling factor, the latent channels, the native and the largest size of
its family -- is `ModelLimits`, from `SDBundle.limits()` or, before any weights are read, from
`loading.inspect_checkpoint(path).limits()`; `image_size` checks an image size against it. The step count's
agreement with the schedule is `ddim.executed_steps`, every sampler's own rule.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

import torch

from .ddim import NUM_TRAIN_TIMESTEPS
from .noise_schedule import SD, NoiseSchedule
from .noise_schedule import SPACINGS as DDIM_SPACINGS
from .family import FAMILIES
from .prompts.chunks import PADDINGS
from .prompts.parser import EMPHASIS
from .prompts.schedule import check_prompt
from .samplers import SAMPLERS, make_sampler
from .sampling import layout_steps
from .sigmas import SCHEDULES, SPACINGS

TEXT_MAX_CHARS = 10_000  # prompts are read in 75-token chunks, at most 8 (prompts/chunks.py); this stops absurd input
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; seeds here are non-negative
CFG_MAX = 100.0  # guidance above ~30 burns images out; 100 is a bound with room, not a recommendation
SIZE_MAX = max(f.max_size for f in FAMILIES)  # no family renders more; a model's own bound is ModelLimits.max_size


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}{'...' if len(text) > 40 else ''} ({type(value).__name__})"


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # ints exactly (the largest seed), floats shortest


@dataclass(frozen=True)
class Field:
    """The rule of one field: its kind, an inclusive range [lo, hi] ((lo, hi] with lo_open), None allowed or not."""

    kind: type  # str, int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    optional: bool = False  # None is a value (focus: plain SD; width/height: the native size or the input's)
    nonblank: bool = False  # text that must hold more than white space
    choices: tuple[str, ...] | None = None  # text that must be one of these names (e.g. a sampler)

    def describe(self, finite: bool = False) -> str:
        what = {str: "text", int: "an integer", float: "a finite number" if finite else "a number"}[self.kind]
        if self.lo is not None:
            what += f" in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
        if self.kind is str and self.choices is not None:
            what = f"one of {', '.join(self.choices)}"
        elif self.kind is str:
            what += f" of at most {TEXT_MAX_CHARS:,} characters" + (", not blank" if self.nonblank else "")
        return what + (", or None" if self.optional else "")

    def check(self, name: str, value: Any) -> Any:
        """`value` as the field stores it (plain int / float / str), or ValueError naming `name`."""
        if value is None and self.optional:
            return None
        must = f"{name} must be {self.describe()}"
        if self.kind is str:
            if not isinstance(value, str) or self.choices is not None and value not in self.choices:
                raise ValueError(f"{must}, got {_show(value)}")
            return _check_text(name, value, self.nonblank)
        # numbers.Integral / Real take numpy's scalars too; bool is an int subclass and is refused by name.
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{must}, got {_show(value)}")
            value = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{must}, got {_show(value)}")
            try:
                value = float(value)
            except OverflowError:  # an int beyond float's range
                value = math.inf
            if not math.isfinite(value):
                raise ValueError(f"{name} must be {self.describe(finite=True)}, got {value}")
        if self.lo is not None:
            above_lo = self.lo < value if self.lo_open else self.lo <= value
            if not (above_lo and value <= self.hi):
                raise ValueError(f"{must}, got {value}")
        return value


def _check_text(name: str, text: str, nonblank: bool) -> str:
    if len(text) > TEXT_MAX_CHARS:
        raise ValueError(f"{name} is {len(text):,} characters long, more than the {TEXT_MAX_CHARS:,} accepted")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: undecodable bytes on a command line, "\ud800" in JSON
        raise ValueError(f"{name} is not valid Unicode text (a lone surrogate at character {e.start}; were its "
                         "bytes not UTF-8?)") from None
    if "\0" in text:
        raise ValueError(f"{name} contains a NUL character (at character {text.index(chr(0))})")
    if nonblank and not text.strip():
        raise ValueError(f"{name} must not be blank (leave it out instead)")
    return text


FIELDS: Mapping[str, Field] = MappingProxyType({
    "prompt": Field(str),
    "focus": Field(str, optional=True, nonblank=True),  # the object kept sharp; left out (None) for plain SD
    "alpha": Field(float, 0.0, 1.0),
    "layout": Field(float, 0.0, 1.0),
    # [1, T]; which (steps, strength) pairs the schedule can run is ddim.executed_steps (T steps need strength < 1)
    "steps": Field(int, 1, NUM_TRAIN_TIMESTEPS),
    "cfg": Field(float, 0.0, CFG_MAX),
    "negative": Field(str),
    "seed": Field(int, 0, SEED_MAX),
    "width": Field(int, 1, SIZE_MAX, optional=True),
    "height": Field(int, 1, SIZE_MAX, optional=True),
    "strength": Field(float, 0.0, 1.0, lo_open=True),
    # η = 1 is DDPM's posterior variance; beyond it the DDIM update's noise term can exceed the whole variance
    "eta": Field(float, 0.0, 1.0),
    "sampler": Field(str, choices=SAMPLERS),  # samplers.py
    "schedule": Field(str, choices=SCHEDULES),  # the σ schedule of the σ samplers (sigmas.py)
    # which timesteps a run visits (sigmas.py); None: the model's own (leading; trailing for zero-SNR and turbo models)
    "spacing": Field(str, optional=True, choices=SPACINGS),
    # rack focus (gbsd_core/bokeh/rack.py): the local embedding (1 − m)·E(focus) + m·E(focus_to), m = focus_mix
    "focus_to": Field(str, optional=True, nonblank=True),
    "focus_mix": Field(float, 0.0, 1.0),
    # how prompts are read (gbsd_core/prompts/): A1111's emphasis mode, and how prompts of different chunk counts
    # are brought to one length
    "emphasis": Field(str, choices=EMPHASIS),
    "chunk_padding": Field(str, choices=PADDINGS),
})


def check_together(p: GenerationParams) -> None:
    """The rules that tie fields to each other (each field's own rule is FIELDS')."""
    if p.focus_to is not None and p.focus is None:
        raise ValueError("focus_to needs a focus prompt to move from (focus)")
    if p.focus_mix != 0.0 and p.focus_to is None:
        raise ValueError(f"focus_mix {p.focus_mix} needs focus_to, the prompt to move the focus towards")
    if p.sampler in ("ddim", "lcm") and p.schedule != "normal":
        raise ValueError(f"schedule {p.schedule!r} is for the σ samplers (euler, euler_a, dpmpp_2m); {p.sampler} runs "
                         "its own timesteps")
    if p.sampler != "ddim" and p.eta != 0.0:
        raise ValueError(f"eta is DDIM's η; sampler {p.sampler!r} takes eta=0 (euler_a is ancestral, η = 1; lcm "
                         "re-noises every step by construction)")
    if p.sampler == "ddim" and p.spacing not in (None, *DDIM_SPACINGS):
        raise ValueError(f"spacing {p.spacing!r} is for the σ samplers (euler, euler_a, dpmpp_2m); ddim runs "
                         f"the {' or '.join(DDIM_SPACINGS)} spacing")
    if p.sampler == "lcm" and p.spacing is not None:
        raise ValueError(f"spacing {p.spacing!r}: the lcm sampler runs its own schedule (the timesteps the model "
                         "was distilled on); leave the spacing out")
    # The prompt syntax gbsd refuses, found without a model (prompts/): a weight that is not a number or beyond the
    # limit, AND, extra-network tags it cannot apply, prompt editing in the negative prompt.
    for name in ("prompt", "negative", "focus", "focus_to"):
        if getattr(p, name) is not None:
            check_prompt(getattr(p, name), p.emphasis, p.steps, name)


def check_schedule(p: GenerationParams, img2img: bool, noise_schedule: NoiseSchedule = SD,
                   spacing: str | None = None) -> int:
    """The number of steps the run `p` asks for executes, by the sampler's own schedule: on the model's noise
    schedule (`Checkpoint.noise_schedule`, `SDBundle.noise_schedule`; SD's by default), with its actual `spacing`
    (None: the schedule's own), so this check and the run cannot disagree: ValueError where the schedule cannot run it
    (DDIM at 1000 leading steps; a spacing whose steps would not descend; no step left at this strength)."""
    # the timesteps do not depend on what the model predicts; v, because a zero-SNR schedule allows only v models
    sampler = make_sampler(noise_schedule, "v_prediction", p.sampler, p.schedule, p.spacing if spacing is None
                           else spacing)
    n_run = len(sampler.timesteps(p.steps, p.strength if img2img else 1.0))
    if p.focus is not None:
        layout_steps(n_run, p.layout)  # GBSD's two stages need two steps (sampling.layout_steps)
    return n_run


def check_field(name: str, value: Any) -> Any:
    """One value by the rule of GenerationParams' field `name` (for sources that check fields one at a time)."""
    return FIELDS[name].check(name, value)


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides an image (with the weights). Field names are the CLI's flags; FIELDS has the rules,
    checked when one is made (also by `dataclasses.replace`), so an instance is always valid."""

    prompt: str
    focus: str | None = None  # GBSD local prompt: the object kept sharp. None = plain SD.
    alpha: float = 0.5  # focus-stage mix α·E(global) + (1−α)·E(local)
    layout: float = 0.8  # the layout fraction: the share of the executed steps in the global layout stage
    steps: int = 50
    cfg: float = 7.5
    negative: str = ""
    seed: int = 0
    width: int | None = None  # None: the model's native size (512, 768 for SD2-768-v); img2img: the input's size
    height: int | None = None
    strength: float = 0.75  # img2img only: fraction of the schedule that is re-run
    eta: float = 0.0  # DDIM η
    sampler: str = "ddim"  # samplers.SAMPLERS: "ddim" | "euler" | "euler_a" | "dpmpp_2m" | "lcm"
    schedule: str = "normal"  # σ schedule of the σ samplers: "normal" | "karras"
    spacing: str | None = None  # sigmas.SPACINGS; None: the model's own (noise_schedule.py, family defaults)
    # Rack focus (gbsd_core/bokeh/rack.py): the focus stage's local embedding is (1−m)·E(focus) + m·E(focus_to),
    # m = focus_mix, instead of E(focus). None / 0 = the plain GBSD local prompt.
    focus_to: str | None = None
    focus_mix: float = 0.0
    # Prompts (gbsd_core/prompts/, README "Prompts"): "original" reads A1111's (word:1.2) and rescales to the mean
    # (also "no_norm", "ignore", "none" = brackets are text); "repeat" brings prompts of different chunk counts to one
    # length by repeating them (A1111's separate calls, exactly), "empty" by padding with the empty prompt's chunk.
    emphasis: str = "original"
    chunk_padding: str = "repeat"

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_field(f.name, getattr(self, f.name)))
        check_together(self)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (construction already checked them: this re-checks)."""
        for f in fields(self):
            check_field(f.name, getattr(self, f.name))
        check_together(self)


def sweep_axes(p: GenerationParams, alphas: Any, focus_prompts: Any,
               mixes: Any) -> tuple[list[str], list[GenerationParams]]:
    """A sweep's focus prompts and its cells' parameters, focus-prompt-major, then α, then mix (an axis that is None:
    the parameters' own value). ValueError when an axis is not a list or is empty; each cell is checked as a
    GenerationParams."""
    for name, given in (("alphas", alphas), ("focus_prompts", focus_prompts), ("mixes", mixes)):
        if given is not None and (isinstance(given, (str, bytes)) or not isinstance(given, Sequence)):
            raise ValueError(f"{name} must be a list, got {type(given).__name__}")
    alphas = [p.alpha] if alphas is None else list(alphas)
    focus_prompts = list(focus_prompts) if focus_prompts is not None else [p.focus] if p.focus else []
    mixes = [p.focus_mix] if mixes is None else list(mixes)
    if not alphas:
        raise ValueError("a sweep needs at least one alpha")
    if not focus_prompts:
        raise ValueError("a sweep needs a focus prompt (params.focus or focus_prompts)")
    if not mixes:
        raise ValueError("a sweep needs at least one focus mix")
    cells = [replace(p, focus=f, alpha=a, focus_mix=m) for f in focus_prompts for a in alphas for m in mixes]
    return focus_prompts, cells


# ------------------------------------------------------------------------------------- where and how it runs
# The dtypes a model may be loaded in: the floating-point ones its weights convert to (readers.FLOAT_DTYPES).
LOAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_dtype(name: str, dtype: Any) -> torch.dtype:
    """`dtype` (of `name`: "dtype", "vae_dtype") if a model can run in it, else ValueError."""
    if not isinstance(dtype, torch.dtype) or dtype not in LOAD_DTYPES:
        shown = ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in LOAD_DTYPES)
        raise ValueError(f"{name} must be one of {shown}, got {_show(dtype)}")
    return dtype


def check_device(device: Any) -> torch.device:
    """A device this machine has and gbsd runs on (cpu, cuda[:N], mps), as a torch.device; ValueError otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:0, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device}: Apple's Metal (MPS) is not available on this machine")
    elif dev.type == "meta":
        raise ValueError(f"device {device}: the meta device holds no data, so no weights can be loaded onto it "
                         "(gbsd runs on cpu, cuda or mps)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device}: gbsd runs on cpu, cuda or mps, not {dev.type}")
    return dev


# ------------------------------------------------------------------------------------------ what the model says


@dataclass(frozen=True)
class ModelLimits:
    """The image-size facts of one model (a loaded bundle, or a checkpoint inspected before loading)."""

    vae_factor: int  # pixels per latent cell along each side: 2 ** (VAE levels - 1), 8 for SD's VAE
    latent_channels: int  # channels of the VAE's latents (= the UNet's input), 4 for SD
    native_size: int  # the side used when none is given (the family's resolution, or a diffusers folder's)
    max_size: int  # the largest side rendered (the family's, family.MAX_SIZE_FACTOR x its resolution)

    def latent_shape(self, width: int, height: int, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.latent_channels, height // self.vae_factor, width // self.vae_factor)

    def check_side(self, name: str, value: int) -> None:
        if value % self.vae_factor:
            raise ValueError(f"{name} {value} is not a multiple of {self.vae_factor} (the VAE's downsampling factor)")
        if value > self.max_size:
            raise ValueError(f"{name} {value} is larger than {self.max_size}, the largest side gbsd renders with "
                             "this model's family")


def image_size(params: GenerationParams, limits: ModelLimits,
               init_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height): explicit, else the input image's size (img2img), else the native size; checked against the
    model's limits (ValueError)."""
    if init_size is not None and params.width is None and params.height is None:
        w, h = init_size
        try:
            limits.check_side("width", w)
            limits.check_side("height", h)
        except ValueError as e:
            raise ValueError(f"input image is {w}x{h}: its {e}; give a size (width/height, --size) to resize "
                             "it") from None
        return w, h
    w, h = params.width or limits.native_size, params.height or limits.native_size
    limits.check_side("width", w)
    limits.check_side("height", h)
    return w, h

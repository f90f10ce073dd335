"""Model families: the facts about a checkpoint that its tensor names and shapes do not fully carry.

SD1 and SD2 are told apart by their text encoder keys (`cond_stage_model.transformer.*` is the OpenAI CLIP of
CompVis' FrozenCLIPEmbedder, `cond_stage_model.model.*` the OpenCLIP of Stability's FrozenOpenCLIPEmbedder), SDXL by
sgm's conditioner (`conditioner.embedders.0.transformer.*` + `.1.model.*`: base, CLIP-L and OpenCLIP bigG;
`conditioner.embedders.0.model.*` alone: the refiner). The two SD2 families, 512 eps-prediction and 768
v-prediction, have *identical* keys and shapes (fixtures/ldm_keys/sd2_v2-inference*.tsv), so that choice rests on
hints outside the tensors; `detect` takes them in a fixed order and warns when it has to guess.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# The largest image side a family is asked to render, as a multiple of its native side. SD composes well up to
# about twice its training size and repeats objects beyond that; 4x (16x the pixels) leaves room for that while
# refusing sizes whose activations would need tens of GB (the UNet's memory grows with the pixel count, its
# self-attention's compute with its square).
MAX_SIZE_FACTOR = 4

TextEncoderKind = Literal["clip", "openclip", "sdxl-clip+openclip", "sdxl-openclip"]


@dataclass(frozen=True)
class Recipe:
    """How a distilled few-step model is run by its card (README "Few-step"): the defaults of a run with its family,
    which the CLI's flags (and a PNG's parameters) override."""

    sampler: str  # samplers.SAMPLERS
    spacing: str  # sigmas.SPACINGS: "trailing" for the turbo models' shipped scheduler configs
    steps: int
    cfg: float  # ≤ 1: no classifier-free guidance (sampling.guidance)

    def params(self) -> dict[str, str | int | float]:
        """The GenerationParams fields it sets: `GenerationParams(prompt, **family.recipe.params())`."""
        return {"sampler": self.sampler, "spacing": self.spacing, "steps": self.steps, "cfg": self.cfg}


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2-512" | "sd2-768-v" | "sdxl-base" | "sdxl-refiner"
    prediction_type: Literal["epsilon", "v_prediction"]
    resolution: int  # the image side the model was trained at (pixels)
    # SD1's HF CLIPTokenizer pads with the end token 49407; open_clip's tokenizer pads with 0. (SDXL base has one of
    # each: its conditioner pads each tower's tokens its own way, see SDXLConditioner.pad_token_ids.)
    pad_token_id: int
    # cond_stage_model.transformer (SD1), cond_stage_model.model (SD2); SDXL's conditioner.embedders: CLIP-L + bigG
    # (base) or bigG alone (refiner)
    text_encoder: TextEncoderKind
    vae_scale_factor: float = 0.18215  # LatentDiffusion.scale_factor / sgm's scale_factor (SDXL: 0.13025)
    # The unconditional embedding for an empty negative prompt is zeros (context and pooled), not E(""): sgm's
    # sampling scripts for SDXL base (force_uc_zero_embeddings=["txt"]), diffusers' force_zeros_for_empty_prompt.
    # The refiner is an sgm "legacy" model there: it encodes the negative prompt.
    force_zeros_for_empty_prompt: bool = False
    recipe: Recipe | None = None  # few-step models: their card's sampler, spacing, steps and guidance

    @property
    def max_size(self) -> int:
        """The largest width or height (pixels) gbsd renders with this family: MAX_SIZE_FACTOR x `resolution`."""
        return MAX_SIZE_FACTOR * self.resolution


SD1 = Family("sd1", "epsilon", 512, 49407, "clip")
SD2_512 = Family("sd2-512", "epsilon", 512, 0, "openclip")  # v2-inference.yaml
SD2_768_V = Family("sd2-768-v", "v_prediction", 768, 0, "openclip")  # v2-inference-v.yaml
# generative-models configs/inference/sd_xl_base.yaml, sd_xl_refiner.yaml
SDXL_BASE = Family("sdxl-base", "epsilon", 1024, 49407, "sdxl-clip+openclip", vae_scale_factor=0.13025,
                   force_zeros_for_empty_prompt=True)
SDXL_REFINER = Family("sdxl-refiner", "epsilon", 1024, 0, "sdxl-openclip", vae_scale_factor=0.13025)
# The adversarial-diffusion-distilled models (Sauer et al. 2023, "Adversarial Diffusion Distillation"): SD 2.1's and
# SDXL base's networks and keys, made for 512² at 1–4 steps without guidance (their cards: guidance_scale=0.0),
# shipped with Euler ancestral on the trailing spacing. Their tensors do not tell them from SD2 / SDXL base: the
# family comes from --family or a diffusers folder's trailing scheduler config (README "Few-step").
# Checked against Stability's own demo, generative-models scripts/demo/turbo.py: SD-Turbo runs with
# configs/inference/sd_2_1.yaml, whose denoiser is EpsScaling (ε-prediction, as SD 2.1-base, not 2.1-768's v),
# SDXL-Turbo with sd_xl_base.yaml (ε); both at 512² through EulerAncestralSampler (η = 1), no unconditional branch.
# At n > 1 that demo takes t = 999, 899, 799, ... (every 100th of 1000); the recipe here is diffusers' trailing
# spacing (n = 4: 999, 749, 499, 249), what the cards' diffusers snippets run and the parity tests hold gbsd to.
TURBO = Recipe("euler_a", "trailing", 1, 0.0)
SD_TURBO = Family("sd-turbo", "epsilon", 512, 0, "openclip", recipe=TURBO)
SDXL_TURBO = Family("sdxl-turbo", "epsilon", 512, 49407, "sdxl-clip+openclip", vae_scale_factor=0.13025,
                    force_zeros_for_empty_prompt=True, recipe=TURBO)
FAMILIES: tuple[Family, ...] = (SD1, SD2_512, SD2_768_V, SDXL_BASE, SDXL_REFINER, SD_TURBO, SDXL_TURBO)

# Aliases a user may type for `family=`; the canonical names are the Family.name values.
_ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "sd2": "sd2-512", "sd2-base": "sd2-512", "sd2-v": "sd2-768-v",
            "sd2-768": "sd2-768-v", "sdxl": "sdxl-base", "sdxl-1.0": "sdxl-base", "sd_turbo": "sd-turbo",
            "sdxl_turbo": "sdxl-turbo"}


def family_by_name(name: str | Family) -> Family:
    """`Family` for a name such as "sd1", "sd2-512", "sd2-768-v" (or a Family, returned as is)."""
    if isinstance(name, Family):
        return name
    if not isinstance(name, str):
        raise ValueError(f"a model family is a name such as 'sd1', got {name!r}")
    key = _ALIASES.get(name.lower(), name.lower())
    for fam in FAMILIES:
        if fam.name == key:
            return fam
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def turbo_of(fam: Family, timestep_spacing: str | None, zero_terminal_snr: bool, native_size: int | None) -> Family:
    """A diffusers folder detected as SD2-512 or SDXL base whose scheduler config ships the trailing spacing (on SD's
    schedule, not a zero-SNR one) at a native 512²: the turbo family of that architecture (stabilityai/sd-turbo,
    stabilityai/sdxl-turbo); any other family as it is."""
    turbo = {SD2_512.name: SD_TURBO, SDXL_BASE.name: SDXL_TURBO}.get(fam.name)
    if turbo is None or timestep_spacing != "trailing" or zero_terminal_snr or native_size != turbo.resolution:
        return fam
    return turbo


def text_encoder_kind(keys: list[str] | set[str]) -> TextEncoderKind | None:
    """Which text encoder a state dict (original names, prefixes kept) holds, or None if none is recognised."""
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "clip"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "openclip"
    if any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
        return "sdxl-clip+openclip"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-openclip"
    return None


def _sidecar_parameterization(path: Path) -> str | None:
    """`parameterization` from an A1111-style `<name>.yaml` next to a single file (the copy of v2-inference-v.yaml
    users put beside 768-v models). Read with a regex, not a YAML parser: one scalar is all we need."""
    yaml = path.with_suffix(".yaml")
    if not path.is_file() or not yaml.is_file():
        return None
    match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"), re.MULTILINE)
    return match.group(1) if match else None


def _filename_hint(path: Path) -> str | None:
    """"768" or a "-v" token in the file name means v-prediction, "512"/"base" means eps (Stability's names:
    v2-1_768-ema-pruned, 768-v-ema, v2-1_512-ema-pruned, 512-base-ema)."""
    stem = path.name.lower()
    if "768" in stem or re.search(r"(^|[-_])v([-_.]|$)", stem):
        return "v_prediction"
    if "512" in stem or "base" in stem:
        return "epsilon"
    return None


def detect(keys: list[str] | set[str], path: Path, override: str | Family | None = None,
           prediction_type: str | None = None) -> Family:
    """The family of a checkpoint whose (original-layout) keys are `keys`.

    SD2 eps vs v is decided, first hit wins, by: `override`; `prediction_type` (a diffusers folder's
    scheduler_config.json); the sidecar yaml's `parameterization: "v"`; the file name; else SD2-512 with a warning.
    """
    kind = text_encoder_kind(keys)
    if override is not None:
        fam = family_by_name(override)
        if kind is not None and fam.text_encoder != kind:
            raise ValueError(f"family={fam.name!r} expects a {fam.text_encoder} text encoder but {path} holds a {kind} one")
        return fam
    if prediction_type is not None and prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"{path}: prediction_type {prediction_type!r} is not one gbsd samples (epsilon, v_prediction); "
                         "pass the family (--family) to load it anyway")
    only = {"clip": SD1, "sdxl-clip+openclip": SDXL_BASE, "sdxl-openclip": SDXL_REFINER}.get(kind)
    if only is not None:  # one family per text encoder: a file that says otherwise would be sampled wrongly (noise)
        if prediction_type is not None and prediction_type != only.prediction_type:
            raise ValueError(f"{path}: says prediction_type {prediction_type}, but its text encoder makes it "
                             f"{only.name}, which predicts {only.prediction_type}; gbsd has no such family")
        return only
    if kind is None:
        raise ValueError(f"{path}: no text encoder under cond_stage_model.transformer., cond_stage_model.model. or "
                         "conditioner.embedders.0.")

    if prediction_type is not None:
        return SD2_768_V if prediction_type == "v_prediction" else SD2_512
    param = _sidecar_parameterization(path)
    if param is not None:
        return SD2_768_V if param == "v" else SD2_512
    hint = _filename_hint(path)
    if hint is not None:
        return SD2_768_V if hint == "v_prediction" else SD2_512
    warnings.warn(
        f"{path.name}: SD2 checkpoints for 512 eps-prediction and 768 v-prediction have identical tensors; assuming "
        "sd2-512 (epsilon). If images come out as noise or grey, pass family='sd2-768-v' (CLI: --family sd2-768-v) "
        "or put a <name>.yaml with `parameterization: \"v\"` beside the file.",
        stacklevel=3,
    )
    return SD2_512

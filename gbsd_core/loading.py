"""Checkpoint files in and out: reading, checking, strict loading into our modules (an `SDBundle`), and the writer.

Our modules use the original checkpoint names (CompVis `LatentDiffusion`), so loading a single file is: read the
tensors, drop a short commented allowlist of non-weight keys, split by prefix, infer each config from shapes, build
the module on the meta device and `load_state_dict(strict=True, assign=True)`. Nothing is random-initialised and a
float32 file loaded as float32 is not even copied (safetensors and `torch.load(mmap=True)` hand out tensors backed by
a private, copy-on-write map of the file). Diffusers folders are translated into original names first, in
`diffusers_layout.py`, the one conversion seam, and each component is built from its own config.json there.

Loading is two steps. `inspect_checkpoint` reads and checks without touching the weights' values: what the files
are (readers.py: regular files, tensors only, float dtypes), the configs, that every part matches its config
strictly and that the parts fit together (`bundle.check_parts_fit`). Its `Checkpoint` tells the CLI the model's
limits before any weights load. `build` then converts the tensors, refuses NaN/inf (naming the tensor) and assigns
them. `load` is both.

Readers never execute code: `.ckpt`/`.pt`/`.pth`/`.bin` go through `torch.load(weights_only=True)` only, and a pickle
that needs anything beyond tensors and containers is refused.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping

import torch
from torch import nn

from . import diffusers_configs, diffusers_layout
from .block_counts import check_block_counts
from .bundle import COMPONENTS, SDBundle, check_parts_fit, model_limits
from .clip_text import CLIPTextConfig, CLIPTextEncoder
from .ddim import DDIMSampler
from .family import Family, detect, family_by_name, turbo_of
from .noise_schedule import SD as SD_NOISE_SCHEDULE
from .noise_schedule import NoiseSchedule
from .openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from .params import ModelLimits, check_device, check_dtype
from .readers import (
    CheckpointError,
    check_regular_file,
    check_weights,
    key_list,
    read_json_object,
    read_safetensors,
    read_weights_file,
)
from .sdxl_conditioner import MICRO_DIM, SDXLConditioner, SDXLConditionerConfig
from .unet import UNetModel, unet_config_from_state_dict
from .vae import AutoencoderKL, VAEConfig

# Subtrees of a LatentDiffusion state dict: model (DiffusionWrapper).diffusion_model, first_stage_model, cond_stage_model.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
# sgm's DiffusionEngine (SDXL) has the same UNet and VAE subtrees and its text towers in a GeneralConditioner.
SDXL_PREFIXES = {**PREFIXES, "text_encoder": "conditioner."}

# --- What a file may carry beyond the three networks' weights, and why it is safe to drop. ----------------------
# ddpm.py LatentDiffusion.register_schedule(): the DDPM schedule as 12 persistent [1000] buffers. They are a pure
# function of linear_start/linear_end (0.00085/0.012), which noise_schedule.py recomputes; files converted from diffusers
# lack them.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
})
# Training-only terms of ddpm.py: `logvar` (a parameter only with learn_logvar) and `lvlb_weights` (non-persistent,
# but some re-saved files have it).
TRAINING_KEYS = frozenset({"logvar", "lvlb_weights"})
# sgm's DiscreteDenoiser keeps the schedule as a persistent buffer, the sigmas sqrt((1 - ᾱ)/ᾱ) of the same linear
# schedule; the released SDXL files lack it, training checkpoints saved from the engine have it.
SGM_SCHEDULE_BUFFERS = frozenset({"denoiser.sigmas"})


def droppable(key: str) -> bool:
    """True for keys that hold no weights of the three networks (see the comments above each rule)."""
    if key in SCHEDULE_BUFFERS or key in TRAINING_KEYS or key in SGM_SCHEDULE_BUFFERS:
        return True
    # The EMA copy of the UNet in full training files (use_ema: True; "v1-5-pruned"). Like A1111 we load `model.*`;
    # "-emaonly" files already hold the EMA weights there.
    if key.startswith("model_ema."):
        return True
    # arange(77) buffer that transformers < 4.31 saved with CLIPTextModel (fixtures/ldm_keys/README.md); SDXL's CLIP-L
    # is the same model under conditioner.embedders.0.
    return key.startswith(("cond_stage_model.", "conditioner.")) and key.endswith("embeddings.position_ids")


def prefixes_of(keys: Iterable[str]) -> dict[str, str]:
    """The subtree prefixes of a single-file checkpoint: LatentDiffusion's, or sgm's (SDXL) when it has a
    `conditioner.`."""
    return SDXL_PREFIXES if any(k.startswith(SDXL_PREFIXES["text_encoder"]) for k in keys) else PREFIXES


# ================================================================================================================
# Reading
# ================================================================================================================
@dataclass
class RawCheckpoint:
    """Tensors of a checkpoint in original names (prefixes kept) plus what the file says beyond its tensors."""

    state_dict: dict[str, torch.Tensor]
    layout: Literal["single_file", "diffusers"]
    # From a diffusers folder's scheduler/scheduler_config.json, or the `prediction_type` metadata entry that
    # save_single_file writes into .safetensors headers (SD2 512-eps and 768-v files are otherwise indistinguishable).
    prediction_type: str | None = None
    # A diffusers folder's configs, translated (diffusers_configs.py), per component folder that has a config.json
    # (for SDXL the towers' own: "text_encoder" is CLIP-L's, "text_encoder_2" bigG's).
    configs: dict[str, object] = field(default_factory=dict)
    native_size: int | None = None  # a diffusers folder's unet sample_size x its VAE factor
    micro_dim: int | None = None  # an SDXL folder's micro-conditioning width (unet addition_time_embed_dim)
    # A diffusers folder's scheduler_config.json, built (diffusers_configs.scheduler_config); single files: SD's
    noise_schedule: NoiseSchedule = SD_NOISE_SCHEDULE
    timestep_spacing: str | None = None  # the scheduler config's; "trailing" + 512² tells a turbo folder (family.py)


def _present(path: Path) -> bool:
    return os.path.lexists(path)  # a dangling link or a pipe is "present" too, and then refused by what it is


def _read_diffusers(folder: Path) -> RawCheckpoint:
    """Each component folder of the pipeline (diffusers_layout.pipeline_parts: SD, SDXL base or refiner): its weights,
    its config.json when present (checked, translated), and its names mapped into the original layout."""
    sd: dict[str, torch.Tensor] = {}
    configs: dict[str, object] = {}
    sample_size = micro_dim = None

    def weights_of(name: str, part: diffusers_layout.DiffusersPart) -> Path | None:
        return next((folder / name / c for c in part.weights if _present(folder / name / c)), None)

    parts = diffusers_layout.pipeline_parts(
        lambda name: weights_of(name, diffusers_layout.SDXL_BASE_PARTS[name]) is not None)
    for name, part in parts.items():
        sub = folder / name
        file = weights_of(name, part)
        if file is None:
            raise CheckpointError(f"{folder}: not a Stable Diffusion diffusers folder, no {name}/ weights "
                                  f"(looked for {name}/{{{', '.join(part.weights)}}})")
        tensors = read_weights_file(file)
        config = None
        if _present(sub / "config.json"):
            raw = read_json_object(sub / "config.json")
            try:
                config = part.config(raw)
            except ValueError as e:
                raise CheckpointError(f"{sub / 'config.json'}: {e}") from None
            configs[name] = config
            if name == "unet":
                sample_size = diffusers_configs.unet_sample_size(raw)
                micro_dim = diffusers_configs.unet_micro_dim(raw)
        try:
            converted = diffusers_layout.apply_plan(part.plan(tensors, config), tensors)
        except KeyError as e:
            raise CheckpointError(f"{sub}: {e.args[0]}") from e
        sd.update({part.prefix + k: t for k, t in converted.items()})

    sched = folder / "scheduler" / "scheduler_config.json"
    prediction_type, noise_schedule = None, SD_NOISE_SCHEDULE  # no scheduler config: SD's, as for single files
    spacing = None
    if _present(sched):
        raw = read_json_object(sched)
        prediction_type = raw.get("prediction_type")
        spacing = raw.get("timestep_spacing")
        if prediction_type is not None and not isinstance(prediction_type, str):
            raise CheckpointError(f"{sched}: prediction_type must be a string, got {prediction_type!r}")
        try:
            noise_schedule = diffusers_configs.scheduler_config(raw)
        except ValueError as e:
            raise CheckpointError(f"{sched}: {e}") from None
    vae = configs.get("vae")
    native = sample_size * vae.downsample_factor if sample_size and isinstance(vae, VAEConfig) else None
    return RawCheckpoint(sd, "diffusers", prediction_type, configs, native, micro_dim, noise_schedule,
                         spacing if isinstance(spacing, str) else None)


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a single file (.safetensors/.ckpt/.pt/.pth/.bin) or a diffusers folder into original names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_diffusers(path)
    check_regular_file(path)
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = read_safetensors(path)
        return RawCheckpoint(tensors, "single_file", metadata.get("prediction_type"))
    return RawCheckpoint(read_weights_file(path), "single_file")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, keyed by original (CompVis/Stability) names with their prefixes."""
    return read_checkpoint(path).state_dict


# ================================================================================================================
# Strict loading
# ================================================================================================================
def split_components(sd: Mapping[str, torch.Tensor], path: Path,
                     prefixes: Mapping[str, str] = PREFIXES) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "vae": ..., "text_encoder": ...} with `prefixes` stripped (SDXL: SDXL_PREFIXES); allowlisted keys
    dropped; anything else outside the three subtrees, or a missing subtree, raises CheckpointError."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    unexpected = []
    for key, tensor in sd.items():
        if droppable(key):
            continue
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = tensor
                break
        else:
            unexpected.append(key)
    if not any(parts.values()):
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint: no keys under {', '.join(prefixes.values())} "
                              f"(it has {len(sd)} keys, e.g. {key_list(list(sd), 3)})")
    for name, part in parts.items():
        if not part:
            raise CheckpointError(f"{path}: has no {name} weights (no keys under {prefixes[name]}); gbsd needs a "
                                  "full checkpoint with UNet, VAE and text encoder")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected keys outside the UNet/VAE/text encoder: "
                              f"{key_list(unexpected)}")
    # Some SD1 files were saved from a CLIPTextModel without the `text_model.` level (transformers >= 5 does that
    # too); real files and our module have it. (SDXL: the same under embedders.0.)
    clip = "embedders.0.transformer." if prefixes["text_encoder"] == SDXL_PREFIXES["text_encoder"] else "transformer."
    te = parts["text_encoder"]
    if any(k.startswith(clip) and not k.startswith(clip + "text_model.") for k in te):
        parts["text_encoder"] = {
            (clip + "text_model." + k[len(clip):] if k.startswith(clip) and not k.startswith(clip + "text_model.")
             else k): t
            for k, t in te.items()
        }
    return parts


def check_strict(name: str, module: nn.Module, sd: Mapping[str, torch.Tensor], path: Path,
                 prefixes: Mapping[str, str] = PREFIXES) -> None:
    """Raise CheckpointError naming missing / unexpected / mis-shaped keys (with the file's full names)."""
    expected = module.state_dict()
    prefix = prefixes[name]
    missing = [prefix + k for k in expected if k not in sd]
    unexpected = [prefix + k for k in sd if k not in expected]
    shapes = [f"{prefix}{k}: file {list(t.shape)} vs model {list(expected[k].shape)}"
              for k, t in sd.items() if k in expected and t.shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {key_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {key_list(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes[:5])}")
    if problems:
        cfg = getattr(module, "config", None)
        raise CheckpointError(f"{path}: {name} does not match its architecture (from its config or shapes: {cfg}):\n  "
                              + "\n  ".join(problems))


def _meta_module(name: str, module_cls: type[nn.Module], config: object, path: Path) -> nn.Module:
    """`module_cls(config)` on the meta device (no memory); a config the module cannot be built from (channels GroupNorm's
    32 groups do not divide, zero-width heads, ...) is a CheckpointError."""
    try:
        with torch.device("meta"):
            return module_cls(config)
    except (ValueError, RuntimeError, ArithmeticError) as e:
        raise CheckpointError(f"{path}: the {name} cannot be built from its config ({config}): {e}") from None


def _check_finite(name: str, sd: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor],
                  dtype: torch.dtype, path: Path, prefixes: Mapping[str, str]) -> None:
    """Refuse NaN / inf, naming the tensors; values the conversion to `dtype` overflowed are told apart. One pass of
    torch.isfinite per tensor: the cost of reading the weights once."""
    bad = []
    for k, t in converted.items():
        if bool(torch.isfinite(t).all()):
            continue
        src = sd[k]
        if bool(torch.isfinite(src).all()):
            bad.append(f"{prefixes[name]}{k}: {int((~torch.isfinite(t)).sum())} values overflow "
                       f"{str(dtype).removeprefix('torch.')} (largest |x| = {float(src.abs().max()):.3g}); "
                       "load it in float32 or bfloat16")
        else:
            bad.append(f"{prefixes[name]}{k} holds {int(torch.isnan(src).sum())} NaN and "
                       f"{int(torch.isinf(src).sum())} inf values")
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors are not finite: " + "; ".join(bad[:5])
                              + (" ..." if len(bad) > 5 else ""))


def build_module(name: str, module_cls: type[nn.Module], config: object, sd: Mapping[str, torch.Tensor],
                 dtype: torch.dtype, device: str | torch.device, path: Path,
                 prefixes: Mapping[str, str] = PREFIXES) -> nn.Module:
    """Build `module_cls(config)` on the meta device and load `sd` into it strictly, converted to dtype/device.

    `assign=True` makes the loaded tensors the parameters themselves: no random init, no second copy. Every tensor
    must be finite after the conversion (a NaN in a weight gives black images, an fp16 overflow the same).
    """
    module = _meta_module(name, module_cls, config, path)
    check_strict(name, module, sd, path, prefixes)
    converted = {k: t.to(device=device, dtype=dtype) for k, t in sd.items()}
    _check_finite(name, sd, converted, dtype, path, prefixes)
    module.load_state_dict(converted, strict=True, assign=True)
    left = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a buffer created in __init__ and not saved: components must compute such things in forward
        raise RuntimeError(f"{module_cls.__name__} still has meta tensors after loading: {key_list(left)}")
    return module.eval().requires_grad_(False)


def _infer(name: str, infer: Callable[[], object], path: Path, prefixes: Mapping[str, str] = PREFIXES) -> object:
    """Run a `Config.from_state_dict` call, turning its complaints into CheckpointErrors that name the file."""
    try:
        return infer()
    except KeyError as e:
        raise CheckpointError(f"{path}: cannot infer the {name} architecture, missing key "
                              f"{prefixes[name]}{e.args[0]}") from e
    except (ValueError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: cannot infer the {name} architecture: {e}") from e


def _module_class(name: str, config: object) -> type[nn.Module]:
    if name == "unet":
        return UNetModel
    if name == "vae":
        return AutoencoderKL
    if isinstance(config, SDXLConditionerConfig):
        return SDXLConditioner
    return CLIPTextEncoder if isinstance(config, CLIPTextConfig) else OpenCLIPTextEncoder


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and checked but not built: what `build` makes an SDBundle of, and what the CLI checks a
    request against (`limits`) before any weights are loaded. The tensors are still the files' maps."""

    path: Path
    family: Family
    parts: Mapping[str, Mapping[str, torch.Tensor]]  # "unet"/"vae"/"text_encoder": original names, prefix stripped
    configs: Mapping[str, object]  # the same keys: UNetConfig, VAEConfig, and the text encoder's config
    native_size: int | None = None  # a diffusers folder's own default size; None: the family's
    prefixes: Mapping[str, str] = field(default_factory=lambda: dict(PREFIXES))  # SDXL: SDXL_PREFIXES
    noise_schedule: NoiseSchedule = SD_NOISE_SCHEDULE  # a diffusers folder's scheduler config; else SD's

    def limits(self) -> ModelLimits:
        return model_limits(self.configs["vae"], self.family, self.native_size)  # type: ignore[arg-type]


def _configs(raw: RawCheckpoint, parts: Mapping[str, Mapping[str, torch.Tensor]], fam: Family, path: Path,
             prefixes: Mapping[str, str]) -> dict[str, object]:
    """Each part's config: a diffusers folder's config.json translated, else inferred from the tensors' shapes."""
    unet_cfg = raw.configs.get("unet") or _infer("unet", lambda: unet_config_from_state_dict(parts["unet"]), path,
                                                 prefixes)
    if fam.prediction_type == "v_prediction":
        # Stability's 768-v model overflows fp16 in attention softmax; diffusers' sd2-1 config sets
        # upcast_attention=True for the same reason. No effect in fp32.
        unet_cfg = replace(unet_cfg, upcast_attention=True)
    vae_cfg = raw.configs.get("vae")
    if vae_cfg is None:  # a diffusers VAE config says its scaling factor; a single file does not: the family's
        vae_cfg = _infer("vae", lambda: VAEConfig.from_state_dict(parts["vae"]), path, prefixes)
        vae_cfg = replace(vae_cfg, scale_factor=fam.vae_scale_factor)
    if fam.text_encoder.startswith("sdxl"):
        te_cfg = _conditioner_config(raw, parts["text_encoder"], fam, path, prefixes)
    elif "text_encoder" in raw.configs:
        te_cfg = raw.configs["text_encoder"]
    elif fam.text_encoder == "clip":
        te_cfg = _infer("text_encoder", lambda: CLIPTextConfig.from_state_dict(parts["text_encoder"]), path)
    else:
        # A diffusers folder's 23-layer tower already ends at the penultimate block, so all of it runs.
        penultimate = raw.layout != "diffusers"
        te_cfg = _infer("text_encoder",
                        lambda: OpenCLIPTextConfig.from_state_dict(parts["text_encoder"], penultimate=penultimate), path)
    return {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": te_cfg}


def _conditioner_config(raw: RawCheckpoint, sd: Mapping[str, torch.Tensor], fam: Family, path: Path,
                        prefixes: Mapping[str, str]) -> SDXLConditionerConfig:
    """sgm's conditioner: each text tower's config from its folder's config.json (a diffusers folder: `text_encoder`
    is CLIP-L, `text_encoder_2` bigG), else from its shapes under `embedders.N.`."""
    def tower(index: int, infer: Callable[[dict[str, torch.Tensor]], object]) -> object:
        sub = f"embedders.{index}."
        tensors = {k[len(sub):]: t for k, t in sd.items() if k.startswith(sub)}
        return _infer("text_encoder", lambda: infer(tensors), path, {"text_encoder": prefixes["text_encoder"] + sub})

    base = fam.text_encoder == "sdxl-clip+openclip"  # else the refiner: bigG alone, as embedders.0
    clip = (raw.configs.get("text_encoder") or tower(0, CLIPTextConfig.from_state_dict)) if base else None
    bigg = raw.configs.get("text_encoder_2") or tower(1 if base else 0, OpenCLIPTextConfig.from_state_dict)
    # the size sinusoids' width: the folder's UNet config says it (sgm's files: 256, ConcatTimestepEmbedderND's)
    return SDXLConditionerConfig.from_towers(clip, bigg, raw.micro_dim or MICRO_DIM)  # type: ignore[arg-type]


def inspect_checkpoint(path: str | os.PathLike, family: str | Family | None = None) -> Checkpoint:
    """Read and check a checkpoint without using its weights' values: what the files are, the family, each part's
    config (a diffusers folder's config.json, else inferred from shapes), each part strictly against its config,
    and the parts against each other. Raises CheckpointError (FileNotFoundError for a missing path)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file or folder name (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    raw = read_checkpoint(path)
    prefixes = prefixes_of(raw.state_dict)
    parts = split_components(raw.state_dict, path, prefixes)
    for name, part in parts.items():
        check_weights(part, path, prefixes[name])
    try:
        fam = detect(raw.state_dict.keys(), path, override=family, prediction_type=raw.prediction_type)
        if family is None:
            fam = turbo_of(fam, raw.timestep_spacing, raw.noise_schedule.zero_terminal_snr, raw.native_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if raw.native_size is not None and raw.native_size > fam.max_size:
        # the size a run without one renders (gbsd info shows it): beyond what the family renders, no run could use it
        raise CheckpointError(f"{path / 'unet' / 'config.json'}: sample_size gives a native image side of "
                              f"{raw.native_size} pixels, larger than {fam.max_size}, the largest side gbsd renders "
                              f"with the {fam.name} family")
    configs = _configs(raw, parts, fam, path, prefixes)
    try:
        check_parts_fit(configs["unet"], configs["vae"], configs["text_encoder"])  # type: ignore[arg-type]
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for name, cfg in configs.items():
        try:  # the counts first: building a config's million layers would take hours (block_counts.py)
            check_block_counts(cfg, parts[name])
        except ValueError as e:
            raise CheckpointError(f"{path}: the {name} {e}") from None
        check_strict(name, _meta_module(name, _module_class(name, cfg), cfg, path), parts[name], path, prefixes)
    try:
        DDIMSampler(fam.prediction_type, raw.noise_schedule)  # e.g. zero terminal SNR with --family of an eps model
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Checkpoint(path, fam, parts, configs, raw.native_size, prefixes, raw.noise_schedule)


def build(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          vae_dtype: torch.dtype = torch.float32) -> SDBundle:
    """The SDBundle of an inspected checkpoint: tensors converted, checked finite, assigned (see `load`)."""
    from .tokenizer import Tokenizer

    if not isinstance(checkpoint, Checkpoint):
        raise ValueError(f"checkpoint must be a Checkpoint (inspect_checkpoint(path)), got {type(checkpoint).__name__}")
    device = _check_target(dtype, device, vae_dtype)
    c = checkpoint
    modules = {name: build_module(name, _module_class(name, cfg), cfg, c.parts[name],
                                  vae_dtype if name == "vae" else dtype, device, c.path, c.prefixes)
               for name, cfg in c.configs.items()}
    return SDBundle(**modules, tokenizer=Tokenizer(pad_token_id=c.family.pad_token_id),  # type: ignore[arg-type]
                    family=c.family, noise_schedule=c.noise_schedule, path=c.path,
                    native_size=c.native_size)


def load(path: str | os.PathLike, family: str | Family | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", vae_dtype: torch.dtype = torch.float32) -> SDBundle:
    """Load a single-file checkpoint or a diffusers folder into an `SDBundle` (`inspect_checkpoint`, then `build`).

    `family` ("sd1", "sd2-512", "sd2-768-v", "sdxl-base", "sdxl-refiner") overrides detection; it matters for SD2,
    whose 512-eps and 768-v files have identical tensors (see family.detect for the hints used otherwise). `dtype` is
    the UNet's and the text encoder's; the VAE stays in `vae_dtype`, fp32 by default, because the SD decoder's
    activations overflow fp16 (diffusers' `force_upcast` for the same reason).
    """
    _check_target(dtype, device, vae_dtype)  # before any file is read
    return build(inspect_checkpoint(path, family), dtype, device, vae_dtype)


def _check_target(dtype: object, device: object, vae_dtype: object) -> torch.device:
    """The dtypes and the device a model is loaded into (params.check_dtype / check_device: floating-point dtypes; a
    device this machine has, never the meta device, which holds no data)."""
    check_dtype("dtype", dtype)
    check_dtype("vae_dtype", vae_dtype)
    return check_device(device)


# ================================================================================================================
# Writing
# ================================================================================================================
def save_single_file(src: SDBundle | Mapping[str, nn.Module], path: str | os.PathLike,
                     dtype: torch.dtype | None = None, family: str | Family | None = None) -> Path:
    """Write an original-layout single-file .safetensors (`model.diffusion_model.*`, `first_stage_model.*`,
    `cond_stage_model.*`; SDXL: `conditioner.*`) from a bundle or a {"unet"/"vae"/"text_encoder": module} mapping
    (any subset).

    Written to a temporary file in the same folder and renamed into place, so a crash never leaves half a file.
    `dtype` converts floating tensors (e.g. torch.float16 for a half-size file). The family's prediction type (from
    `family`, else the bundle's) goes into the header's metadata, so an SD2-768-v file reloads as v-prediction whatever
    its name.
    """
    from safetensors.torch import save_file

    path = Path(path)
    modules = {name: getattr(src, name) for name in COMPONENTS} if isinstance(src, SDBundle) else dict(src)
    unknown = set(modules) - set(PREFIXES)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; expected a subset of {list(PREFIXES)}")
    if isinstance(src, SDBundle) and src.noise_schedule != SD_NOISE_SCHEDULE:
        raise ValueError(f"this model's noise schedule ({src.noise_schedule}) is not SD's, and a single file "
                         "has no place for it: it would load as SD's schedule; keep the diffusers folder")
    te = modules.get("text_encoder")
    prefixes = SDXL_PREFIXES if isinstance(te, SDXLConditioner) else PREFIXES
    if isinstance(te, OpenCLIPTextEncoder) and not te.config.penultimate:
        raise ValueError("this OpenCLIP text encoder came from a diffusers folder (23 layers, last layer dropped); "
                         "the original SD2 layout has 24 layers and cannot represent it")

    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            t = t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
            # safetensors refuses views into a larger storage (e.g. from torch.load'ed files): give those their own.
            if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            tensors[prefixes[name] + key] = t.contiguous()

    metadata = {"format": "pt"}
    fam = family_by_name(family) if family is not None else getattr(src, "family", None)
    if fam is not None:
        metadata["prediction_type"] = fam.prediction_type
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def temp_beside(path: str | os.PathLike) -> Path:
    """A new empty file `.<name>.<random>.tmp` in `path`'s folder (mkstemp: created, so no other writer has it).
    OSError when the folder does not take it (missing, read-only, or the name too long for the file system)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Have `write(tmp)` write a temporary file beside `path`, then rename it into place.

    The rename is atomic on one file system, so readers (a resumed run, a viewer) see the old file or the whole new
    one, never half of one, and a crash or Ctrl-C mid-write leaves nothing under `path`. The data is flushed to
    disk before the rename. Every file gbsd writes goes through here: checkpoints, PNGs, JSON and tables.
    """
    tmp = temp_beside(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; our outputs are not secrets
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

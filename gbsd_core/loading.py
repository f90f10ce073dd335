"""Checkpoint files in and out: reading, strict loading into our modules (an `SDBundle`), and the writer.

Our modules use the original checkpoint names (CompVis `LatentDiffusion`), so loading a single file is: read the
tensors, drop a short commented allowlist of non-weight keys, split by prefix, infer each config from shapes, build
the module on the meta device and `load_state_dict(strict=True, assign=True)`. Nothing is random-initialised and a
float32 file loaded as float32 is not even copied (safetensors and `torch.load(mmap=True)` hand out tensors backed by
a private, copy-on-write map of the file). Diffusers folders are translated into original names first, in
`diffusers_layout.py`, the one conversion seam.

Readers never execute code: `.ckpt`/`.pt`/`.pth`/`.bin` go through `torch.load(weights_only=True)` only, and a pickle
that needs anything beyond tensors and containers is refused.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping

import torch
from torch import nn

from . import diffusers_layout
from .bundle import COMPONENTS, SDBundle
from .clip_text import CLIPTextConfig, CLIPTextEncoder
from .ddim import DDIMScheduler
from .family import Family, detect, family_by_name
from .openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from .sdxl_conditioner import SDXLConditioner, SDXLConditionerConfig
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

# Subtrees of a LatentDiffusion state dict: model (DiffusionWrapper).diffusion_model, first_stage_model, cond_stage_model.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
# sgm's DiffusionEngine (SDXL) has the same UNet and VAE subtrees and its text towers in a GeneralConditioner.
SDXL_PREFIXES = {**PREFIXES, "text_encoder": "conditioner."}

# --- What a file may carry beyond the three networks' weights, and why it is safe to drop. ----------------------
# ddpm.py LatentDiffusion.register_schedule(): the DDPM schedule as 12 persistent [1000] buffers. They are a pure
# function of linear_start/linear_end (0.00085/0.012), which DDIMScheduler recomputes; files converted from diffusers
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the offending keys."""


def _key_list(keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


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


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        # get_tensor returns tensors on a private (copy-on-write) mmap of the file: no RAM is spent until touched.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, probably truncated or corrupt ({e})") from e


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    def _load(mmap: bool) -> object:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = _load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = _load(mmap=False)  # legacy (pre-zip) torch.save format cannot be memory-mapped
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused to unpickle{what}. This file needs Python code to load, which could do anything; gbsd "
            "only reads tensors (torch.load(weights_only=True)). Convert it to .safetensors with a tool you trust, or "
            "use the .safetensors release of the model."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint, probably truncated or corrupt ({e})") from e
    # Lightning checkpoints wrap the weights: {"state_dict": {...}, "global_step": ..., ...}.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {_key_list(bad)}")
    return obj


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)[0]
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _read_torch(path)
    raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (expected .safetensors, .ckpt, .pt, .pth, .bin "
                          "or a diffusers folder)")


# Weight files of a diffusers folder, in order of preference (full precision first).
DIFFUSERS_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e


def _read_diffusers(folder: Path) -> RawCheckpoint:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, candidates in DIFFUSERS_FILES.items():
        file = next((folder / name / c for c in candidates if (folder / name / c).is_file()), None)
        if file is None:
            raise CheckpointError(f"{folder}: not a Stable Diffusion diffusers folder, no {name}/ weights "
                                  f"(looked for {name}/{{{', '.join(candidates)}}})")
        parts[name] = _read_file(file)

    # SD2's text_encoder is an OpenCLIP tower converted to a HF CLIPTextModel; its config says "gelu" (exact GELU,
    # as OpenCLIP) where OpenAI CLIP-L says "quick_gelu". Without a config, fall back on ViT-H's width.
    te_config = folder / "text_encoder" / "config.json"
    if te_config.is_file():
        openclip = _read_json(te_config).get("hidden_act") == "gelu"
    else:
        tok = [t for k, t in parts["text_encoder"].items() if k.endswith("token_embedding.weight")]
        openclip = bool(tok) and tok[0].shape[1] == 1024
    plans = {
        "unet": diffusers_layout.unet_plan,
        "vae": diffusers_layout.vae_plan,
        "text_encoder": diffusers_layout.openclip_plan if openclip else diffusers_layout.clip_plan,
    }
    sd: dict[str, torch.Tensor] = {}
    for name, plan in plans.items():
        try:
            converted = diffusers_layout.apply_plan(plan(list(parts[name])), parts[name])
        except KeyError as e:
            raise CheckpointError(f"{folder / name}: {e.args[0]}") from e
        sd.update({PREFIXES[name] + k: t for k, t in converted.items()})

    sched = folder / "scheduler" / "scheduler_config.json"
    prediction_type = _read_json(sched).get("prediction_type") if sched.is_file() else None
    return RawCheckpoint(sd, "diffusers", prediction_type)


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a single file (.safetensors/.ckpt/.pt/.pth/.bin) or a diffusers folder into original names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_diffusers(path)
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        return RawCheckpoint(tensors, "single_file", metadata.get("prediction_type"))
    return RawCheckpoint(_read_file(path), "single_file")


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
                              f"(it has {len(sd)} keys, e.g. {_key_list(list(sd), 3)})")
    for name, part in parts.items():
        if not part:
            raise CheckpointError(f"{path}: has no {name} weights (no keys under {prefixes[name]}); gbsd needs a "
                                  "full checkpoint with UNet, VAE and text encoder")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected keys outside the UNet/VAE/text encoder: "
                              f"{_key_list(unexpected)}")
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
        problems.append(f"{len(missing)} missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_key_list(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes[:5])}")
    if problems:
        cfg = getattr(module, "config", None)
        raise CheckpointError(f"{path}: {name} does not match the architecture inferred from its shapes ({cfg}):\n  "
                              + "\n  ".join(problems))


def build_module(name: str, module_cls: type[nn.Module], config: object, sd: Mapping[str, torch.Tensor],
                 dtype: torch.dtype, device: str | torch.device, path: Path,
                 prefixes: Mapping[str, str] = PREFIXES) -> nn.Module:
    """Build `module_cls(config)` on the meta device and load `sd` into it strictly, converted to dtype/device.

    `assign=True` makes the loaded tensors the parameters themselves: no random init, no second copy. Non-float
    tensors keep their dtype.
    """
    with torch.device("meta"):
        module = module_cls(config)
    check_strict(name, module, sd, path, prefixes)
    converted = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in sd.items()}
    module.load_state_dict(converted, strict=True, assign=True)
    left = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a buffer created in __init__ and not saved: components must compute such things in forward
        raise RuntimeError(f"{module_cls.__name__} still has meta tensors after loading: {_key_list(left)}")
    return module.eval().requires_grad_(False)


def _infer(name: str, infer: Callable[[], object], path: Path, prefixes: Mapping[str, str] = PREFIXES) -> object:
    """Run a `Config.from_state_dict` call, turning its complaints into CheckpointErrors that name the file."""
    try:
        return infer()
    except KeyError as e:
        raise CheckpointError(f"{path}: cannot infer the {name} architecture, missing key "
                              f"{prefixes[name]}{e.args[0]}") from e
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot infer the {name} architecture: {e}") from e


def load(path: str | os.PathLike, family: str | Family | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", vae_dtype: torch.dtype = torch.float32) -> SDBundle:
    """Load a single-file checkpoint or a diffusers folder into an `SDBundle`.

    `family` ("sd1", "sd2-512", "sd2-768-v", "sdxl-base", "sdxl-refiner") overrides detection; it matters for SD2,
    whose 512-eps and 768-v files have identical tensors (see family.detect for the hints used otherwise). `dtype` is
    the UNet's and the text encoder's; the VAE stays in `vae_dtype`, fp32 by default, because the SD decoder's
    activations overflow fp16 (diffusers' `force_upcast` for the same reason; GUIDE §1.11).
    """
    from .tokenizer import Tokenizer

    path = Path(path)
    raw = read_checkpoint(path)
    prefixes = prefixes_of(raw.state_dict)
    parts = split_components(raw.state_dict, path, prefixes)
    try:
        fam = detect(raw.state_dict.keys(), path, override=family, prediction_type=raw.prediction_type)
    except ValueError as e:
        raise CheckpointError(str(e)) from e

    unet_cfg = _infer("unet", lambda: UNetConfig.from_state_dict(parts["unet"]), path, prefixes)
    if fam.prediction_type == "v_prediction":
        # Stability's 768-v model overflows fp16 in attention softmax; diffusers' sd2-1 config sets
        # upcast_attention=True for the same reason. No effect in fp32.
        unet_cfg = replace(unet_cfg, upcast_attention=True)
    vae_cfg = _infer("vae", lambda: VAEConfig.from_state_dict(parts["vae"]), path, prefixes)
    vae_cfg = replace(vae_cfg, scale_factor=fam.vae_scale_factor)  # not stored in checkpoints: the family's
    te_cfg: object
    if fam.text_encoder == "clip":
        te_cls: type[nn.Module] = CLIPTextEncoder
        te_cfg = _infer("text_encoder", lambda: CLIPTextConfig.from_state_dict(parts["text_encoder"]), path)
    elif fam.text_encoder == "openclip":
        te_cls = OpenCLIPTextEncoder
        # A diffusers folder's 23-layer tower already ends at the penultimate block, so all of it runs.
        penultimate = raw.layout != "diffusers"
        te_cfg = _infer("text_encoder",
                        lambda: OpenCLIPTextConfig.from_state_dict(parts["text_encoder"], penultimate=penultimate), path)
    else:  # SDXL base or refiner: sgm's conditioner
        te_cls = SDXLConditioner
        te_cfg = _infer("text_encoder", lambda: SDXLConditionerConfig.from_state_dict(parts["text_encoder"]), path,
                        prefixes)

    unet = build_module("unet", UNetModel, unet_cfg, parts["unet"], dtype, device, path, prefixes)
    vae = build_module("vae", AutoencoderKL, vae_cfg, parts["vae"], vae_dtype, device, path, prefixes)
    text_encoder = build_module("text_encoder", te_cls, te_cfg, parts["text_encoder"], dtype, device, path, prefixes)
    return SDBundle(unet=unet, vae=vae, text_encoder=text_encoder,  # type: ignore[arg-type]
                    tokenizer=Tokenizer(pad_token_id=fam.pad_token_id),
                    scheduler=DDIMScheduler(prediction_type=fam.prediction_type), family=fam, path=path)


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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Have `write(tmp)` write a temporary file beside `path`, then rename it into place.

    The rename is atomic on one file system, so readers (a resumed run, a viewer) see the old file or the whole new
    one, never half of one, and a crash or Ctrl-C mid-write leaves nothing under `path`. The data is flushed to
    disk before the rename. Every file gbsd writes goes through here: checkpoints, PNGs, JSON and tables.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
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

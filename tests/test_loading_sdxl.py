"""Loading SDXL single files (sgm layout: `model.diffusion_model.`, `first_stage_model.`, `conditioner.embedders.*`):
golden keys of the full-size modules on the meta device, strict loading of files with exactly the reference key
sets, family detection, and round trips of tiny random checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _sdxl import tiny_sdxl_modules, write_tiny_sdxl
from _tiny import assert_same_weights, bundle_modules
from _util import LDM_KEYS, meta_state_dict, read_keys_tsv
from safetensors.torch import load_file, save_file

from gbsd_core.family import SDXL_BASE, SDXL_REFINER, detect, family_by_name
from gbsd_core.loading import (
    SDXL_PREFIXES,
    CheckpointError,
    check_strict,
    load,
    save_single_file,
    split_components,
)
from gbsd_core.sdxl_conditioner import SDXLConditioner, SDXLConditionerConfig
from gbsd_core.unet import UNetConfig, UNetModel, unet_config_from_state_dict
from gbsd_core.vae import AutoencoderKL, VAEConfig

GOLDEN = {"sdxl-base": "sdxl_base.tsv", "sdxl-refiner": "sdxl_refiner.tsv"}
CONFIGS = {
    "sdxl-base": (UNetConfig.sdxl_base(), SDXLConditionerConfig.base()),
    "sdxl-refiner": (UNetConfig.sdxl_refiner(), SDXLConditionerConfig.refiner()),
}


def meta_modules(family: str) -> dict[str, torch.nn.Module]:
    unet_cfg, cond_cfg = CONFIGS[family]
    with torch.device("meta"):
        return {"unet": UNetModel(unet_cfg), "vae": AutoencoderKL(VAEConfig(scale_factor=0.13025)),
                "text_encoder": SDXLConditioner(cond_cfg)}


@pytest.mark.parametrize("family", list(GOLDEN))
def test_full_size_modules_match_golden_keys(family: str) -> None:
    golden = read_keys_tsv(LDM_KEYS / GOLDEN[family])
    ours = {SDXL_PREFIXES[name] + k: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for name, m in meta_modules(family).items() for k, t in m.state_dict().items()}
    required = {k for k, (_, _, opt) in golden.items() if opt is None}
    wrong = [(k, ours[k], golden[k][:2]) for k in ours.keys() & golden.keys() if ours[k] != golden[k][:2]]
    print(f"{family}: {len(ours)} keys ours, {len(required)} required, {len(golden)} in the golden list")
    assert sorted(required - ours.keys()) == [] and sorted(ours.keys() - golden.keys()) == []
    assert not wrong, wrong[:5]
    assert len(ours) == {"sdxl-base": 2514, "sdxl-refiner": 1858}[family]  # fixtures README: the required rows
    assert not [k for k in ours if golden[k][2] is not None]  # position_ids / denoiser.sigmas are not ours to have
    unet = {k: shape for k, (shape, _) in ours.items() if k.startswith("model.diffusion_model.")}
    counts = {"sdxl-base": (1680, 2_567_463_684), "sdxl-refiner": (1220, 2_259_526_660)}[family]
    assert (len(unet), sum(torch.Size(s).numel() for s in unet.values())) == counts


@pytest.mark.parametrize("family", list(GOLDEN))
def test_golden_file_passes_strict_loading(family: str) -> None:
    """A file with exactly the reference key set (optional rows included) splits cleanly under the sgm prefixes, is
    detected as its family, its configs are inferred from shapes alone, and the strict check accepts it."""
    rows = read_keys_tsv(LDM_KEYS / GOLDEN[family])
    sd = meta_state_dict(rows)
    path = Path(GOLDEN[family])
    assert detect(sd.keys(), path) is family_by_name(family)
    parts = split_components(sd, path, SDXL_PREFIXES)
    unet_cfg, cond_cfg = CONFIGS[family]
    assert unet_config_from_state_dict(parts["unet"]) == unet_cfg
    assert VAEConfig.from_state_dict(parts["vae"]) == VAEConfig()
    assert SDXLConditionerConfig.from_state_dict(parts["text_encoder"]) == cond_cfg
    assert cond_cfg.vector_dim == unet_cfg.adm_in_channels
    for name, module in meta_modules(family).items():
        check_strict(name, module, parts[name], path, SDXL_PREFIXES)


def test_families() -> None:
    assert family_by_name("sdxl") is SDXL_BASE and family_by_name("sdxl-refiner") is SDXL_REFINER
    for fam in (SDXL_BASE, SDXL_REFINER):
        assert (fam.resolution, fam.vae_scale_factor, fam.prediction_type) == (1024, 0.13025, "epsilon")
    assert SDXL_BASE.force_zeros_for_empty_prompt and not SDXL_REFINER.force_zeros_for_empty_prompt
    keys = ["model.diffusion_model.out.2.weight", "conditioner.embedders.0.model.ln_final.weight"]
    with pytest.raises(ValueError, match="expects a openclip text encoder"):
        detect(keys, Path("refiner.safetensors"), override="sd2-512")


# ------------------------------------------------------------------------------------------ tiny round trips
@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_single_file_round_trip(tmp_path: Path, refiner: bool) -> None:
    modules = tiny_sdxl_modules(refiner)
    path = save_single_file(modules, tmp_path / "tiny.safetensors")
    keys = set(load_file(str(path)))
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert ("conditioner.embedders.1.model.text_projection" in keys) != refiner
    b = load(path)
    assert b.family is (SDXL_REFINER if refiner else SDXL_BASE)
    assert b.vae.config.scale_factor == 0.13025 and b.family.prediction_type == "epsilon"
    assert_same_weights(modules, bundle_modules(b))
    c = b.encode_prompt(["a photo of a cat", "a dog"])
    assert c.context.shape == (2, 77, 128 if refiner else 192) and c.pooled.shape == (2, 32) and c.micro is None
    # what the conditioner gives for the same tokens, each tower padded its own way
    tokens = [b.tokenizer(["a photo of a cat", "a dog"], pad_token_id=p) for p in b.text_encoder.pad_token_ids]
    with torch.no_grad():
        context, pooled = modules["text_encoder"](tokens)
    assert torch.equal(c.context, context) and torch.equal(c.pooled, pooled)
    with pytest.raises(ValueError, match="clip_skip"):
        b.encode_prompt("a cat", clip_skip=2)
    # a bundle writes back the same file (conditioner.* names)
    again = save_single_file(b, tmp_path / "again.safetensors")
    assert set(load_file(str(again))) == keys
    info = b.describe()
    assert info["family"] == b.family.name and (info["configs"]["text_encoder"]["clip"] is None) == refiner


def test_allowlisted_sgm_keys_and_flat_clip_names_load(tmp_path: Path, base_file: Path) -> None:
    sd = dict(load_file(str(base_file)))
    extra = {"denoiser.sigmas": torch.rand(1000),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    b = load(_write(tmp_path / "full.safetensors", {**sd, **extra}))
    assert_same_weights(tiny_sdxl_modules(), bundle_modules(b))
    pre = "conditioner.embedders.0.transformer.text_model."
    flat = {k.replace(pre, "conditioner.embedders.0.transformer."): v for k, v in sd.items()}
    assert_same_weights(tiny_sdxl_modules(), bundle_modules(load(_write(tmp_path / "flat.safetensors", flat))))


def test_refusals(tmp_path: Path, base_file: Path) -> None:
    sd = dict(load_file(str(base_file)))
    with pytest.raises(CheckpointError, match="expects a clip text encoder"):
        load(base_file, family="sd1")
    missing = {k: v for k, v in sd.items() if k != "conditioner.embedders.1.model.ln_final.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing keys: conditioner\.embedders\.1\.model\.ln_final\.weight"):
        load(_write(tmp_path / "missing.safetensors", missing))
    stray = {**sd, "conditioner.embedders.2.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: conditioner\.embedders\.2\.weight"):
        load(_write(tmp_path / "stray.safetensors", stray))


def _write(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
